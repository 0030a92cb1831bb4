"""Graders, modelled on OpenAI's grader types; each returns a score and a pass/fail.

    exact            output text == reference text (whitespace-trimmed): 1 or 0
    string_check     eq | ne | like (contains) | ilike (contains, any case): 1 or 0
    text_similarity  fuzzy_match | bleu | rouge_1 | rouge_2 | rouge_l | cosine, 0..1,
                     passing at ``pass_threshold``
    json             parses (code fences allowed); valid against a JSON schema (the grader's
                     or the request's response_format); fraction of the reference's fields equal
    tool_call        same function calls as the reference, arguments compared as parsed JSON
    score_model      an LLM judge gives a number in ``range``; ``pairwise`` compares the
                     candidate with the reference in random order (win 1, tie 0.5, loss 0)
    label_model      an LLM judge picks one of ``labels``; passing if in ``passing_labels``
    python           a file with ``grade(sample, item) -> float`` (0..1)

Built-in names for ``--grader``: exact, fuzzy_match, bleu, rouge_1, rouge_2, rouge_l,
cosine, json, tool_call; anything else is a registered type, a TOML/YAML grader file or a
.py file.

This module is the interface: :class:`Grader` (a grader as configured), :class:`Sample`
(what it grades), :func:`register` (a new type).  The types above live in
``builtin_graders.py`` and register themselves the same way a user's do (the package's
``__init__`` imports them), as does a module named in a grader file's ``plugins`` or a
``distillery.graders`` entry point.
"""

from __future__ import annotations

import importlib.util
import json
import threading
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import openai

from distillery.core.errors import DistilleryError
from distillery.curation.endpoints import Endpoint
from distillery.curation.evals.generate import Candidate, Generation, Generator
from distillery.curation.evals.items import Item


class GraderError(DistilleryError):
    """A grader definition is invalid."""


@dataclass
class Grade:
    """One grader's verdict on one answer; ``score`` is ``None`` when there is none.

    No score is an error for that item (no answer to grade, a judge that gave
    no verdict, an embedding call that failed), counted apart and never a 0.
    """

    score: float | None
    passed: bool
    detail: str = ""


class NoGrade(Exception):
    """Raised inside a grader when it cannot produce a score; the message says why."""


@dataclass
class Context:
    generator: Generator
    judge_endpoints: dict[str, Endpoint] = field(default_factory=dict)
    # Judges and embedding models run here unless a grader names an endpoint: never on
    # the candidate's server, which may be a local student that knows no judge model.
    default_endpoint: Endpoint = field(default_factory=lambda: Endpoint.from_env("default"))

    def endpoint(self, name: str | None) -> Endpoint:
        if name and name not in self.judge_endpoints:
            raise GraderError(f"No endpoint {name!r} in the config: add [endpoints.{name}].")
        return self.judge_endpoints[name] if name else self.default_endpoint


@dataclass
class Grader:
    """A grader as configured: its name in results, its type, its pass bar and options."""

    name: str
    type: str
    pass_threshold: float | None = None
    options: dict[str, Any] = field(default_factory=dict)

    async def grade(
        self, generation: Generation, item: Item, candidate: Candidate, context: Context
    ) -> Grade:
        if generation.error is not None or generation.message is None:
            return Grade(None, False, f"no answer: {generation.error}")
        try:
            return await kind(self.type).grade(self, Sample(generation, item, candidate, context))
        except NoGrade as exc:
            return Grade(None, False, str(exc))
        except openai.OpenAIError as exc:  # an embedding call that failed for good
            return Grade(None, False, f"{type(exc).__name__}: {exc}"[:500])

    def scale(self) -> tuple[float, float]:
        """The range its scores fall in: what a --fail-under number means for it."""
        return kind(self.type).scale(self)

    def passes(self, score: float, default: float) -> bool:
        """Whether ``score`` passes: the configured ``pass_threshold``, else ``default``."""
        threshold = self.pass_threshold if self.pass_threshold is not None else default
        return score >= threshold


@dataclass(frozen=True)
class Sample:
    """What a grader sees: one candidate's answer to one item, and the tools to judge it."""

    generation: Generation
    item: Item
    candidate: Candidate
    context: Context


# A grader type is an async function from (the configured grader, a sample) to a Grade.
# It raises NoGrade when it cannot score (never a made-up 0) and GraderError when the
# grader's options are wrong.
GradeFunction = Callable[[Grader, Sample], Awaitable[Grade]]
ScaleFunction = Callable[[Grader], tuple[float, float]]


def _unit(_grader: Grader) -> tuple[float, float]:
    return 0.0, 1.0


@dataclass(frozen=True)
class GraderType:
    grade: GradeFunction
    scale: ScaleFunction = _unit


TYPES: dict[str, GraderType] = {}


def register(
    type_name: str, *, scale: ScaleFunction = _unit
) -> Callable[[GradeFunction], GradeFunction]:
    """Make ``type = "TYPE_NAME"`` in a grader file (and ``--grader TYPE_NAME``) use the
    decorated function; ``scale`` says the range its scores fall in (default 0..1)."""

    def decorate(function: GradeFunction) -> GradeFunction:
        TYPES[type_name] = GraderType(function, scale)
        return function

    return decorate


def kind(type_name: str) -> GraderType:
    _load_plugins()
    if type_name not in TYPES:
        raise GraderError(
            f"Unknown grader type {type_name!r}; use one of {', '.join(sorted(TYPES))}, "
            "or register your own (see 'Extending Distillery' in the README)."
        )
    return TYPES[type_name]


_plugins_loaded = False
_plugins_lock = threading.Lock()  # graders run in threads (a route's judge): load once


def _load_plugins() -> None:
    """Every ``distillery.graders`` entry point, imported once: importing one registers it."""
    global _plugins_loaded
    with _plugins_lock:
        if _plugins_loaded:
            return
        for entry in entry_points(group="distillery.graders"):
            try:
                entry.load()
            except Exception as exc:
                raise GraderError(
                    f"The grader plugin {entry.value!r} failed to load: {exc}"
                ) from None
        _plugins_loaded = True


# Types that mean nothing without options: `--grader TYPE` alone is an error for them.
NEEDS_OPTIONS = {"string_check", "score_model", "label_model", "python"}
BUILTIN = {
    "exact": ("exact", {}),
    "fuzzy_match": ("text_similarity", {"metric": "fuzzy_match"}),
    "bleu": ("text_similarity", {"metric": "bleu"}),
    "rouge_1": ("text_similarity", {"metric": "rouge_1"}),
    "rouge_2": ("text_similarity", {"metric": "rouge_2"}),
    "rouge_l": ("text_similarity", {"metric": "rouge_l"}),
    "cosine": ("text_similarity", {"metric": "cosine"}),
    "json": ("json", {}),
    "tool_call": ("tool_call", {}),
}


def load_all(specs: list[str] | tuple[str, ...]) -> list[Grader]:
    """Every grader the specs name, refusing two under one name (their columns would merge)."""
    graders = [g for spec in specs for g in load_graders(spec)]
    names = [g.name for g in graders]
    shared = sorted({n for n in names if names.count(n) > 1})
    if shared:
        raise GraderError(f"Two graders share a name ({', '.join(shared)}): name them apart.")
    return graders


def load_graders(spec: str) -> list[Grader]:
    """A built-in name, a registered type, a TOML/YAML file of ``[[graders]]``, or a .py file."""
    if spec in BUILTIN:
        type_name, options = BUILTIN[spec]
        return [Grader(spec, type_name, None, dict(options))]
    path = Path(spec)
    if not path.exists():
        _load_plugins()
        if spec in TYPES and spec not in NEEDS_OPTIONS:
            return [Grader(spec, spec)]
        raise GraderError(
            f"No grader {spec!r}: use one of {', '.join(BUILTIN)}, a registered type, "
            "or a .toml/.yaml/.py file."
        )
    if path.suffix == ".py":
        return [_python_grader(path, path.stem, {})]
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(path.read_text())
        else:
            data = tomllib.loads(path.read_text())
    except Exception as exc:
        raise GraderError(f"Cannot read grader file {path}: {exc}") from None
    for plugin in (data or {}).get("plugins") or []:
        # A module that registers grader types, beside the file: no package needed.
        _import_file(path.parent / plugin, f"distillery_plugin_{Path(plugin).stem}")
    entries = (data or {}).get("graders")
    if not isinstance(entries, list) or not entries:
        raise GraderError(f"{path} needs a list of graders: [[graders]] with name and type.")
    graders = []
    for entry in entries:
        entry = dict(entry)
        type_name = entry.pop("type", None)
        name = entry.pop("name", None) or type_name
        threshold = entry.pop("pass_threshold", None)
        _load_plugins()
        if type_name not in TYPES:
            raise GraderError(
                f"{path}: grader {name!r} has unknown type {type_name!r}; use one of "
                f"{', '.join(sorted(TYPES))}."
            )
        if type_name == "python":
            graders.append(
                _python_grader(path.parent / entry.pop("file"), name, {"pass_threshold": threshold})
            )
            continue
        graders.append(Grader(name, type_name, threshold, entry))
    return graders


def _import_file(path: Path, module_name: str) -> Any:
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise GraderError(f"Cannot load {path}.")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise GraderError(f"{path} failed to load: {exc}") from None
    return module


def _python_grader(path: Path, name: str, extra: dict[str, Any]) -> Grader:
    module = _import_file(path, f"distillery_grader_{name}")
    if not callable(getattr(module, "grade", None)):
        raise GraderError(f"{path} must define grade(sample, item) -> float.")
    return Grader(name, "python", extra.get("pass_threshold"), {"function": module.grade})


def describe(grader: Grader) -> dict[str, Any]:
    options = {k: v for k, v in grader.options.items() if k != "function"}
    return json.loads(  # type: ignore[no-any-return]
        json.dumps(
            {
                "name": grader.name,
                "type": grader.type,
                "pass_threshold": grader.pass_threshold,
                **options,
            },
            default=str,
        )
    )
