"""Distillery: capture OpenAI traffic through a proxy, curate it, distil a student model."""

__version__ = "0.1.0.dev0"
