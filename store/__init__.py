"""The one storage module that the capture path and the offline path both import."""

from distillery.store.db import Store, open_store
from distillery.store.models import Completion, CompletionTag

__all__ = ["Completion", "CompletionTag", "Store", "open_store"]
