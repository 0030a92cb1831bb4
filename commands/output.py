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
import math
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import IO, Any

import click

from distillery.core.serialize import csv_cell, dumps

FORMATS = ("table", "json", "nl", "csv")
MAX_CELL = 60
WIDE = "distillery.commands.output.wide"  # click context meta: --wide was given
SIGNIFICANT = 3  # digits every number in a table column shows at least


def output_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add --table/--json/--nl/--csv (and --wide); the command receives ``fmt``."""

    @click.option("--table", "as_table", is_flag=True, help="Aligned columns (the default).")
    @click.option(
        "--wide", is_flag=True, help="Tables: every cell whole, however wide the terminal."
    )
    @click.option("--json", "as_json", is_flag=True, help="A JSON array.")
    @click.option("--nl", "as_nl", is_flag=True, help="One JSON object per line.")
    @click.option("--csv", "as_csv", is_flag=True, help="CSV with a header row.")
    @functools.wraps(command)
    def wrapper(
        *args: Any,
        as_table: bool,
        wide: bool,
        as_json: bool,
        as_nl: bool,
        as_csv: bool,
        **kwargs: Any,
    ) -> Any:
        click.get_current_context().meta[WIDE] = wide
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


def _cell(value: Any) -> str:
    """A value as table text (numbers are formatted per column, see ``_numbers``)."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, (dict, list)):
        return dumps(value)
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _numbers(values: list[Any]) -> list[str] | None:
    """One format for a column of numbers: the decimals that give every value at least
    three significant digits (at most six), the same for all; ``None`` if not numeric."""
    present = [v for v in values if v is not None]
    if not present or not all(_is_number(v) for v in present):
        return None
    if all(isinstance(v, int) for v in present):
        return ["" if v is None else str(v) for v in values]
    decimals = 0
    for value in present:
        if value:
            magnitude = math.floor(math.log10(abs(value)))
            decimals = max(decimals, min(6, SIGNIFICANT - 1 - magnitude))
    return ["" if v is None else f"{v:.{decimals}f}" for v in values]


def _fit(widths: list[int], columns: Sequence[str], room: int) -> list[int]:
    """Narrow the widest columns until the table fits ``room`` characters."""
    widths = list(widths)
    floor = [min(w, max(len(c), 8)) for w, c in zip(widths, columns, strict=True)]
    while sum(widths) + 2 * (len(widths) - 1) > room:
        widest = max(range(len(widths)), key=lambda i: widths[i] - floor[i])
        if widths[widest] <= floor[widest]:
            break  # as narrow as it goes: the terminal wraps what is left
        widths[widest] -= 1
    return widths


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def write_rows(
    rows: Iterable[Mapping[str, Any]],
    fmt: str,
    columns: Sequence[str],
    out: IO[str] | None = None,
    empty: str | None = None,
) -> int:
    """Write ``rows`` in ``fmt``; table and CSV show ``columns``, JSON every key.

    A table on a terminal fits its width (cells cut with "…"; ``--wide`` shows them
    whole); numbers in a column share one format and are right-aligned.
    """
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
            writer.writerow([csv_cell(row.get(column)) for column in columns])
            written += 1
    else:
        values = [[row.get(column) for column in columns] for row in rows]
        written = len(values)
        if not values:
            if empty:
                click.echo(empty, err=True)
            return 0
        texts: list[list[str]] = [[] for _ in values]
        numeric = []
        for i in range(len(columns)):
            column = [r[i] for r in values]
            formatted = _numbers(column)
            numeric.append(formatted is not None)
            for r, text in zip(texts, formatted or [_cell(v) for v in column], strict=True):
                r.append(text)
        context = click.get_current_context(silent=True)
        wide = bool(context and context.meta.get(WIDE))
        if not wide:
            texts = [[_clip(c, MAX_CELL) for c in r] for r in texts]
        widths = [max(len(column), *(len(r[i]) for r in texts)) for i, column in enumerate(columns)]
        if not wide and out.isatty():
            widths = _fit(widths, columns, shutil.get_terminal_size().columns)

        def line(cells: Sequence[str]) -> str:
            return "  ".join(
                _clip(c, w).rjust(w) if number else _clip(c, w).ljust(w)
                for c, w, number in zip(cells, widths, numeric, strict=True)
            ).rstrip()

        out.write(
            line([c.rjust(w) if n else c for c, w, n in zip(columns, widths, numeric, strict=True)])
            + "\n"
        )
        out.write("  ".join("-" * w for w in widths) + "\n")
        for r in texts:
            out.write(line(r) + "\n")
    return written
