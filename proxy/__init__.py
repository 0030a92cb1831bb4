"""The capture path: an OpenAI-compatible reverse proxy that tags and records traffic."""

from distillery.proxy.app import make_app

__all__ = ["make_app"]
