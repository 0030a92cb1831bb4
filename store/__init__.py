"""The one storage module that the capture path and the offline path both import."""

from distillery.store.db import Store, open_store
from distillery.store.models import Completion, CompletionTag, DatasetExample, DatasetVersion

__all__ = [
    "Completion",
    "CompletionTag",
    "DatasetExample",
    "DatasetVersion",
    "Store",
    "open_store",
]
