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
cosine, json, tool_call; anything else is a TOML/YAML grader file or a .py file.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import re
import tomllib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import orjson

from distillery.curation.endpoints import Endpoint
from distillery.curation.evals.generate import Candidate, Generation, Generator
from distillery.curation.evals.items import Item
from distillery.errors import DistilleryError

_TOKEN = re.compile(r"\w+", re.UNICODE)
_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)
LCS_LIMIT = 2000  # tokens per side for ROUGE-L (quadratic)


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


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _ngrams(words: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def bleu(candidate: str, reference: str, max_n: int = 4) -> float:
    """Sentence BLEU-4 with add-one smoothing of the 2..4-gram precisions (Lin & Och)."""
    cand, ref = tokens(candidate), tokens(reference)
    if not cand or not ref:
        return 1.0 if cand == ref else 0.0
    logs = []
    for n in range(1, max_n + 1):
        cand_grams, ref_grams = _ngrams(cand, n), _ngrams(ref, n)
        matches = sum(min(count, ref_grams[gram]) for gram, count in cand_grams.items())
        total = max(len(cand) - n + 1, 0)
        if n == 1:
            if matches == 0:
                return 0.0
            logs.append(math.log(matches / total))
        else:
            logs.append(math.log((matches + 1) / (total + 1)))
    brevity = 1.0 if len(cand) > len(ref) else math.exp(1 - len(ref) / len(cand))
    return brevity * math.exp(sum(logs) / max_n)


def _f1(overlap: int, cand_total: int, ref_total: int) -> float:
    if not overlap:
        return 0.0
    precision, recall = overlap / cand_total, overlap / ref_total
    return 2 * precision * recall / (precision + recall)


def rouge_n(candidate: str, reference: str, n: int) -> float:
    cand, ref = _ngrams(tokens(candidate), n), _ngrams(tokens(reference), n)
    if not cand and not ref:
        return 1.0
    overlap = sum(min(count, ref[gram]) for gram, count in cand.items())
    return _f1(overlap, sum(cand.values()), sum(ref.values()))


def rouge_l(candidate: str, reference: str) -> float:
    cand, ref = tokens(candidate)[:LCS_LIMIT], tokens(reference)[:LCS_LIMIT]
    if not cand and not ref:
        return 1.0
    previous = [0] * (len(ref) + 1)
    for word in cand:
        current = [0]
        for j, other in enumerate(ref, 1):
            current.append(
                previous[j - 1] + 1 if word == other else max(previous[j], current[j - 1])
            )
        previous = current
    return _f1(previous[-1], len(cand), len(ref))


def fuzzy(candidate: str, reference: str) -> float:
    from rapidfuzz import fuzz

    return float(fuzz.ratio(candidate, reference)) / 100


def parse_json(text: str) -> Any:
    """The JSON in a model's answer (a ```json fence is allowed); raises ValueError."""
    match = _FENCE.match(text)
    return orjson.loads(match.group(1) if match else text)


def _arguments(raw: Any) -> Any:
    try:
        return orjson.loads(raw) if isinstance(raw, str) else raw
    except orjson.JSONDecodeError:
        return raw


def _calls(message: dict[str, Any]) -> list[tuple[str, str]]:
    return sorted(
        (
            str((call.get("function") or {}).get("name")),
            orjson.dumps(
                _arguments((call.get("function") or {}).get("arguments")),
                option=orjson.OPT_SORT_KEYS,
            ).decode(),
        )
        for call in message.get("tool_calls") or ()
        if isinstance(call, dict)
    )


@dataclass
class Grader:
    name: str
    type: str
    pass_threshold: float | None = None
    options: dict[str, Any] = field(default_factory=dict)

    async def grade(
        self, generation: Generation, item: Item, candidate: Candidate, context: Context
    ) -> Grade:
        if generation.error is not None or generation.message is None:
            return Grade(None, False, f"no answer: {generation.error}")
        method: Callable[..., Any] = getattr(self, "_" + self.type)
        try:
            return await method(generation, item, candidate, context)  # type: ignore[no-any-return]
        except NoGrade as exc:
            return Grade(None, False, str(exc))
        except openai.OpenAIError as exc:  # an embedding call that failed for good
            return Grade(None, False, f"{type(exc).__name__}: {exc}"[:500])

    def scale(self) -> tuple[float, float]:
        """The range its scores fall in: what a --fail-under number means for it."""
        if self.type == "score_model" and not self.options.get("pairwise"):
            low, high = self.options.get("range", [0, 10])
            return float(low), float(high)
        low, high = self.options.get("range", [0, 1]) if self.type == "python" else (0, 1)
        return float(low), float(high)

    def _passes(self, score: float, default: float) -> bool:
        threshold = self.pass_threshold if self.pass_threshold is not None else default
        return score >= threshold

    async def _exact(self, generation: Generation, item: Item, *_: Any) -> Grade:
        same = generation.text.strip() == item.reference_text.strip()
        return Grade(float(same), same)

    async def _string_check(self, generation: Generation, item: Item, *_: Any) -> Grade:
        operation = self.options.get("operation", "eq")
        reference = self.options.get("reference", item.reference_text)
        text = generation.text
        checks: dict[str, Callable[[], bool]] = {
            "eq": lambda: text.strip() == reference.strip(),
            "ne": lambda: text.strip() != reference.strip(),
            "like": lambda: reference in text,
            "ilike": lambda: reference.lower() in text.lower(),
        }
        if operation not in checks:
            raise GraderError(
                f"string_check operation must be eq, ne, like or ilike, not {operation!r}"
            )
        ok = checks[operation]()
        return Grade(float(ok), ok)

    async def _text_similarity(
        self, generation: Generation, item: Item, candidate: Candidate, context: Context
    ) -> Grade:
        metric = self.options.get("metric", "fuzzy_match")
        text, reference = generation.text, item.reference_text
        if metric == "cosine":
            endpoint = context.endpoint(self.options.get("endpoint"))
            a, b = await context.generator.embed(
                endpoint,
                self.options.get("model", "text-embedding-3-small"),
                [text or " ", reference or " "],
            )
            norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
            score = sum(x * y for x, y in zip(a, b, strict=True)) / norm if norm else 0.0
        else:
            functions: dict[str, Callable[[str, str], float]] = {
                "fuzzy_match": fuzzy,
                "bleu": bleu,
                "rouge_1": lambda c, r: rouge_n(c, r, 1),
                "rouge_2": lambda c, r: rouge_n(c, r, 2),
                "rouge_l": rouge_l,
            }
            if metric not in functions:
                raise GraderError(f"Unknown text_similarity metric {metric!r}.")
            score = functions[metric](text, reference)
        score = round(score, 6)
        return Grade(score, self._passes(score, 0.5))

    async def _json(self, generation: Generation, item: Item, *_: Any) -> Grade:
        try:
            value = parse_json(generation.text)
        except ValueError:
            return Grade(0.0, False, "not JSON")
        schema = self.options.get("schema") or (
            ((item.params.get("response_format") or {}).get("json_schema") or {}).get("schema")
        )
        if schema:
            import jsonschema

            try:
                jsonschema.validate(value, schema)
            except jsonschema.ValidationError as exc:
                return Grade(0.0, False, f"schema: {exc.message}")
        try:
            reference = parse_json(item.reference_text)
        except ValueError:
            return Grade(1.0, True, "valid JSON (no JSON reference to compare)")
        if isinstance(reference, dict) and isinstance(value, dict) and reference:
            equal = sum(1 for key, want in reference.items() if value.get(key) == want)
            score = equal / len(reference)
        else:
            score = float(value == reference)
        return Grade(round(score, 6), self._passes(score, 1.0))

    async def _tool_call(self, generation: Generation, item: Item, *_: Any) -> Grade:
        want, got = _calls(item.reference), _calls(generation.message or {})
        if not want:
            ok = not got
            return Grade(float(ok), ok, "" if ok else "called a tool the reference did not")
        matched = sum((Counter(want) & Counter(got)).values())
        score = matched / max(len(want), len(got))
        return Grade(round(score, 6), score == 1.0)

    async def _score_model(
        self, generation: Generation, item: Item, candidate: Candidate, context: Context
    ) -> Grade:
        if self.options.get("pairwise"):
            return await self._pairwise(generation, item, candidate, context)
        low, high = self.options.get("range", [0, 10])
        answer = await self._judge(
            render(self.options.get("prompt", DEFAULT_SCORE_PROMPT), item, generation),
            {
                "type": "object",
                "properties": {"score": {"type": "number"}, "reason": {"type": "string"}},
                "required": ["score", "reason"],
                "additionalProperties": False,
            },
            item,
            candidate,
            context,
        )
        if not isinstance(answer, dict) or not isinstance(answer.get("score"), (int, float)):
            raise NoGrade(f"the judge gave no score: {str(answer)[:200]}")
        score = min(max(float(answer["score"]), low), high)
        return Grade(
            score, self._passes(score, (low + high) / 2), str(answer.get("reason", ""))[:500]
        )

    async def _label_model(
        self, generation: Generation, item: Item, candidate: Candidate, context: Context
    ) -> Grade:
        labels = list(self.options.get("labels") or [])
        passing = set(self.options.get("passing_labels") or [])
        if not labels or not passing:
            raise GraderError(f"label_model grader {self.name!r} needs labels and passing_labels.")
        answer = await self._judge(
            render(
                self.options.get("prompt", DEFAULT_LABEL_PROMPT), item, generation, labels=labels
            ),
            {
                "type": "object",
                "properties": {"label": {"type": "string", "enum": labels}},
                "required": ["label"],
                "additionalProperties": False,
            },
            item,
            candidate,
            context,
        )
        label = answer.get("label") if isinstance(answer, dict) else None
        if label not in labels:
            raise NoGrade(f"the judge gave no label from {labels}: {str(answer)[:200]}")
        ok = label in passing
        return Grade(float(ok), ok, f"label: {label}")

    async def _pairwise(
        self, generation: Generation, item: Item, candidate: Candidate, context: Context
    ) -> Grade:
        # The order is random per item and candidate (seeded, so re-runs hit the cache).
        swap = random.Random(f"{item.key}:{candidate.label}").random() < 0.5
        first, second = (item.reference_text, generation.text)
        if swap:
            first, second = second, first
        prompt = self.options.get("prompt", DEFAULT_PAIRWISE_PROMPT)
        prompt = (
            render(prompt, item, generation)
            .replace("{{answer_a}}", first)
            .replace("{{answer_b}}", second)
        )
        answer = await self._judge(
            prompt,
            {
                "type": "object",
                "properties": {"winner": {"type": "string", "enum": ["A", "B", "tie"]}},
                "required": ["winner"],
                "additionalProperties": False,
            },
            item,
            candidate,
            context,
        )
        winner = answer.get("winner") if isinstance(answer, dict) else None
        if winner not in ("A", "B", "tie"):
            raise NoGrade(f"the judge named no winner: {str(answer)[:200]}")
        candidate_slot = "A" if swap else "B"
        score = 0.5 if winner == "tie" else float(winner == candidate_slot)
        return Grade(score, score >= 0.5, f"winner: {winner} (candidate was {candidate_slot})")

    async def _judge(
        self,
        prompt: str,
        schema: dict[str, Any],
        item: Item,
        candidate: Candidate,
        context: Context,
    ) -> Any:
        model = self.options.get("model")
        if not model:
            raise GraderError(f"Grader {self.name!r} needs a judge `model`.")
        endpoint = context.endpoint(self.options.get("endpoint"))
        judge = Candidate(label=f"judge:{model}", model=model, endpoint=endpoint)
        params = {
            "temperature": 0,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "grade", "schema": schema, "strict": True},
            },
        }
        result = await context.generator.complete(
            judge, [{"role": "user", "content": prompt}], params
        )
        if result.error is not None:
            raise NoGrade(f"the judge call failed: {result.error}"[:500])
        try:
            return parse_json(result.text)
        except ValueError:
            raise NoGrade(f"the judge's answer is not JSON: {result.text[:200]!r}") from None

    async def _python(self, generation: Generation, item: Item, *_: Any) -> Grade:
        function = self.options["function"]
        sample = {
            "output_text": generation.text,
            "message": generation.message,
            "tool_calls": (generation.message or {}).get("tool_calls") or [],
        }
        score = float(
            function(
                sample,
                {
                    "input": item.messages,
                    "reference": item.reference,
                    "reference_text": item.reference_text,
                    "tags": item.tags,
                },
            )
        )
        return Grade(score, self._passes(score, 0.5))


DEFAULT_SCORE_PROMPT = (
    "Grade the answer to the conversation below against the reference answer, "
    "from 0 (useless) to 10 (as good as the reference or better).\n\n"
    "Conversation:\n{{item.input}}\n\nReference answer:\n{{item.reference}}\n\n"
    "Answer to grade:\n{{sample.output_text}}\n\nReply with JSON: score and reason."
)
DEFAULT_LABEL_PROMPT = (
    "Classify the answer to the conversation below with one of these labels: {{labels}}.\n\n"
    "Conversation:\n{{item.input}}\n\nReference answer:\n{{item.reference}}\n\n"
    "Answer:\n{{sample.output_text}}\n\nReply with JSON: label."
)
DEFAULT_PAIRWISE_PROMPT = (
    "Which answer to the conversation below is better? Say A, B, or tie if they are "
    "equally good.\n\nConversation:\n{{item.input}}\n\nAnswer A:\n{{answer_a}}\n\n"
    "Answer B:\n{{answer_b}}\n\nReply with JSON: winner."
)


def render(
    template: str, item: Item, generation: Generation, labels: list[str] | None = None
) -> str:
    values = {
        "{{item.input}}": item.input_text,
        "{{item.reference}}": item.reference_text,
        "{{sample.output_text}}": generation.text,
        "{{labels}}": ", ".join(labels or []),
    }
    for placeholder, value in values.items():
        template = template.replace(placeholder, value)
    return template


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
TYPES = {
    "exact",
    "string_check",
    "text_similarity",
    "json",
    "tool_call",
    "score_model",
    "label_model",
    "python",
}


def load_graders(spec: str) -> list[Grader]:
    """A built-in name, a TOML/YAML file of ``[[graders]]``, or a Python file."""
    if spec in BUILTIN:
        kind, options = BUILTIN[spec]
        return [Grader(spec, kind, None, dict(options))]
    path = Path(spec)
    if not path.exists():
        raise GraderError(
            f"No grader {spec!r}: use one of {', '.join(BUILTIN)}, or a .toml/.yaml/.py file."
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
    entries = (data or {}).get("graders")
    if not isinstance(entries, list) or not entries:
        raise GraderError(f"{path} needs a list of graders: [[graders]] with name and type.")
    graders = []
    for entry in entries:
        entry = dict(entry)
        kind = entry.pop("type", None)
        name = entry.pop("name", None) or kind
        threshold = entry.pop("pass_threshold", None)
        if kind not in TYPES:
            raise GraderError(
                f"{path}: grader {name!r} has unknown type {kind!r}; use one of {', '.join(sorted(TYPES))}."
            )
        if kind == "python":
            graders.append(
                _python_grader(path.parent / entry.pop("file"), name, {"pass_threshold": threshold})
            )
            continue
        graders.append(Grader(name, kind, threshold, entry))
    return graders


def _python_grader(path: Path, name: str, extra: dict[str, Any]) -> Grader:
    spec = importlib.util.spec_from_file_location(f"distillery_grader_{name}", path)
    if spec is None or spec.loader is None:
        raise GraderError(f"Cannot load {path}.")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise GraderError(f"{path} failed to load: {exc}") from None
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
