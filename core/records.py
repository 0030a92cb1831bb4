"""Typed JSON records: what one part writes and another part, or a later run, reads back.

A dataset version's manifest, the trainer's ``job.json`` and ``status.json``, a
distill loop's state: each is a :class:`Record` (a pydantic model) read through one
checked constructor, so a misspelled field, or a value of the wrong kind, fails at
once with the place and the field named, instead of turning into a ``KeyError``
(or a silent default) three calls later.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from distillery.core.errors import DistilleryError

_SAYS = {
    "extra_forbidden": "a field this version of Distillery does not know",
    "missing": "missing",
}


class RecordError(DistilleryError):
    """A stored record does not have the shape this version reads."""


class Record(BaseModel):
    """A JSON object with known fields: unknown ones are refused, not dropped."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def parse(cls, data: Any, where: str | Path) -> Self:
        """``data`` (decoded JSON) as this record; ``where`` names it in the error."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise RecordError(f"{where}: {_explain(exc)}") from None

    @classmethod
    def read(cls, path: Path) -> Self:
        """The record in the JSON file at ``path``."""
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise RecordError(f"Cannot read {path}: {exc.strerror}.") from None
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise RecordError(f"{path}: {_explain(exc)}") from None

    def write(self, path: Path, private: bool = False) -> None:
        """Write atomically: a reader sees the old record or the new one, never half.
        ``private``: readable by this user only (0600), from the first byte."""
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o666)
        with os.fdopen(fd, "w") as handle:
            handle.write(self.model_dump_json(indent=2))
        temporary.replace(path)

    def to_json(self) -> dict[str, Any]:
        """The record as plain JSON values (what a JSON column keeps)."""
        return self.model_dump(mode="json")


def _explain(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False):
        field = ".".join(str(part) for part in error["loc"]) or "(the record)"
        problems.append(f"{field}: {_SAYS.get(error['type'], error['msg'])}")
    return "; ".join(problems)
