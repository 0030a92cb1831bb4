"""Every error Distillery raises on purpose derives from one base class.

    DistilleryError           anything the user can fix; the CLI prints it, no traceback
    ├── ConfigError           a bad config file, flag or environment variable
    └── StoreError            the database cannot be opened or migrated

The CLI turns a ``DistilleryError`` into a ``click.ClickException``; anything
else reaching the top is a bug and keeps its traceback.
"""


class DistilleryError(Exception):
    """Base class: a problem the user can fix; the message says how."""


class ConfigError(DistilleryError):
    """The configuration (file, environment or flags) is invalid."""


class StoreError(DistilleryError):
    """The database could not be opened, migrated or written."""
