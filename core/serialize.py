"""Records written out: JSON (timestamps as ISO text) and CSV cells.  The CLI's
``--json``/``--nl``/``--csv`` and the dashboard's export write the same bytes."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError


def dumps(value: Any, indent: bool = False) -> str:
    option = orjson.OPT_INDENT_2 if indent else 0
    return orjson.dumps(value, default=_json_default, option=option).decode()


def csv_cell(value: Any) -> str:
    """A value as CSV data: ISO timestamps with their offset, full-precision numbers."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (dict, list)):
        return dumps(value)
    return str(value)
