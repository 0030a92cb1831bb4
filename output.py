"""How every listing command prints rows: one decorator, one row writer.

``@output_options`` adds ``--table`` (the default), ``--json`` (one JSON array,
streamed), ``--nl`` (one JSON object per line) and ``--csv`` to a command; the
command passes its rows to :func:`write_rows`, which streams them in the chosen
format.  Only the table waits for all rows, to size its columns, which is why
listing commands default to a small ``-n``.
"""

from __future__ import annotations

import csv
import functools
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import IO, Any

import click
import orjson

FORMATS = ("table", "json", "nl", "csv")
MAX_CELL = 60


def output_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add --table/--json/--nl/--csv; the command receives ``fmt``."""

    @click.option("--table", "as_table", is_flag=True, help="Aligned columns (the default).")
    @click.option("--json", "as_json", is_flag=True, help="A JSON array.")
    @click.option("--nl", "as_nl", is_flag=True, help="One JSON object per line.")
    @click.option("--csv", "as_csv", is_flag=True, help="CSV with a header row.")
    @functools.wraps(command)
    def wrapper(
        *args: Any, as_table: bool, as_json: bool, as_nl: bool, as_csv: bool, **kwargs: Any
    ) -> Any:
        chosen = [
            name
            for name, flag in zip(FORMATS, (as_table, as_json, as_nl, as_csv), strict=True)
            if flag
        ]
        if len(chosen) > 1:
            raise click.UsageError(
                f"Cannot use {' and '.join('--' + c for c in chosen)} together: pick one format."
            )
        return command(*args, fmt=chosen[0] if chosen else "table", **kwargs)

    return wrapper


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError


def dumps(value: Any, indent: bool = False) -> str:
    option = orjson.OPT_INDENT_2 if indent else 0
    return orjson.dumps(value, default=_json_default, option=option).decode()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, (dict, list)):
        return dumps(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_rows(
    rows: Iterable[Mapping[str, Any]],
    fmt: str,
    columns: Sequence[str],
    out: IO[str] | None = None,
    empty: str | None = None,
) -> int:
    """Write ``rows`` in ``fmt``; table and CSV show ``columns``, JSON every key."""
    out = out or sys.stdout
    written = 0
    if fmt == "json":
        out.write("[")
        for row in rows:
            out.write(("," if written else "") + "\n" + dumps(dict(row)))
            written += 1
        out.write("\n]\n" if written else "]\n")
    elif fmt == "nl":
        for row in rows:
            out.write(dumps(dict(row)) + "\n")
            written += 1
    elif fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(column)) for column in columns])
            written += 1
    else:
        cells = [[_cell(row.get(column)) for column in columns] for row in rows]
        written = len(cells)
        if not cells:
            if empty:
                click.echo(empty, err=True)
            return 0
        cells = [[c if len(c) <= MAX_CELL else c[: MAX_CELL - 1] + "…" for c in r] for r in cells]
        widths = [max(len(column), *(len(r[i]) for r in cells)) for i, column in enumerate(columns)]
        out.write(
            "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip() + "\n"
        )
        out.write("  ".join("-" * w for w in widths) + "\n")
        for r in cells:
            out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")
    return written
