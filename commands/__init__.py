"""The ``distillery`` command's groups, one module each, and what they share
(``shared.py``: options, the store; ``output.py``: tables, JSON, CSV).  Only ``cli.py``
imports this package."""
