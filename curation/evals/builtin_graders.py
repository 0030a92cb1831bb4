"""The grader types Distillery ships, registered like anyone else's (see ``graders.register``)."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson

from distillery.curation.evals.generate import Candidate, Generation
from distillery.curation.evals.graders import Grade, Grader, GraderError, NoGrade, Sample, register
from distillery.curation.evals.items import Item
from distillery.curation.evals.metrics import bleu, fuzzy, parse_json, rouge_l, rouge_n


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


def _score_model_scale(grader: Grader) -> tuple[float, float]:
    if grader.options.get("pairwise"):
        return 0.0, 1.0
    low, high = grader.options.get("range", [0, 10])
    return float(low), float(high)


def _python_scale(grader: Grader) -> tuple[float, float]:
    low, high = grader.options.get("range", [0, 1])
    return float(low), float(high)


@register("exact")
async def exact(grader: Grader, sample: Sample) -> Grade:
    generation, item = sample.generation, sample.item
    same = generation.text.strip() == item.reference_text.strip()
    return Grade(float(same), same)


@register("string_check")
async def string_check(grader: Grader, sample: Sample) -> Grade:
    generation, item = sample.generation, sample.item
    operation = grader.options.get("operation", "eq")
    reference = grader.options.get("reference", item.reference_text)
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


@register("text_similarity")
async def text_similarity(grader: Grader, sample: Sample) -> Grade:
    generation, item, context = sample.generation, sample.item, sample.context
    metric = grader.options.get("metric", "fuzzy_match")
    text, reference = generation.text, item.reference_text
    if metric == "cosine":
        endpoint = context.endpoint(grader.options.get("endpoint"))
        a, b = await context.generator.embed(
            endpoint,
            grader.options.get("model", "text-embedding-3-small"),
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
    return Grade(score, grader.passes(score, 0.5))


@register("json")
async def json_grader(grader: Grader, sample: Sample) -> Grade:
    generation, item = sample.generation, sample.item
    try:
        value = parse_json(generation.text)
    except ValueError:
        return Grade(0.0, False, "not JSON")
    schema = grader.options.get("schema") or (
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
    return Grade(round(score, 6), grader.passes(score, 1.0))


@register("tool_call")
async def tool_call(grader: Grader, sample: Sample) -> Grade:
    generation, item = sample.generation, sample.item
    want, got = _calls(item.reference), _calls(generation.message or {})
    if not want:
        ok = not got
        return Grade(float(ok), ok, "" if ok else "called a tool the reference did not")
    matched = sum((Counter(want) & Counter(got)).values())
    score = matched / max(len(want), len(got))
    return Grade(round(score, 6), score == 1.0)


@register("score_model", scale=_score_model_scale)
async def score_model(grader: Grader, sample: Sample) -> Grade:
    generation, item = sample.generation, sample.item
    if grader.options.get("pairwise"):
        return await _pairwise(grader, sample)
    low, high = grader.options.get("range", [0, 10])
    answer = await _judge(
        grader,
        render(grader.options.get("prompt", DEFAULT_SCORE_PROMPT), item, generation),
        {
            "type": "object",
            "properties": {"score": {"type": "number"}, "reason": {"type": "string"}},
            "required": ["score", "reason"],
            "additionalProperties": False,
        },
        sample,
    )
    if not isinstance(answer, dict) or not isinstance(answer.get("score"), (int, float)):
        raise NoGrade(f"the judge gave no score: {str(answer)[:200]}")
    score = min(max(float(answer["score"]), low), high)
    return Grade(score, grader.passes(score, (low + high) / 2), str(answer.get("reason", ""))[:500])


@register("label_model")
async def label_model(grader: Grader, sample: Sample) -> Grade:
    generation, item = sample.generation, sample.item
    labels = list(grader.options.get("labels") or [])
    passing = set(grader.options.get("passing_labels") or [])
    if not labels or not passing:
        raise GraderError(f"label_model grader {grader.name!r} needs labels and passing_labels.")
    answer = await _judge(
        grader,
        render(grader.options.get("prompt", DEFAULT_LABEL_PROMPT), item, generation, labels=labels),
        {
            "type": "object",
            "properties": {"label": {"type": "string", "enum": labels}},
            "required": ["label"],
            "additionalProperties": False,
        },
        sample,
    )
    label = answer.get("label") if isinstance(answer, dict) else None
    if label not in labels:
        raise NoGrade(f"the judge gave no label from {labels}: {str(answer)[:200]}")
    ok = label in passing
    return Grade(float(ok), ok, f"label: {label}")


async def _pairwise(grader: Grader, sample: Sample) -> Grade:
    generation, item, candidate = sample.generation, sample.item, sample.candidate
    # The order is random per item and candidate (seeded, so re-runs hit the cache).
    swap = random.Random(f"{item.key}:{candidate.label}").random() < 0.5
    first, second = (item.reference_text, generation.text)
    if swap:
        first, second = second, first
    prompt = grader.options.get("prompt", DEFAULT_PAIRWISE_PROMPT)
    prompt = (
        render(prompt, item, generation)
        .replace("{{answer_a}}", first)
        .replace("{{answer_b}}", second)
    )
    answer = await _judge(
        grader,
        prompt,
        {
            "type": "object",
            "properties": {"winner": {"type": "string", "enum": ["A", "B", "tie"]}},
            "required": ["winner"],
            "additionalProperties": False,
        },
        sample,
    )
    winner = answer.get("winner") if isinstance(answer, dict) else None
    if winner not in ("A", "B", "tie"):
        raise NoGrade(f"the judge named no winner: {str(answer)[:200]}")
    candidate_slot = "A" if swap else "B"
    score = 0.5 if winner == "tie" else float(winner == candidate_slot)
    return Grade(score, score >= 0.5, f"winner: {winner} (candidate was {candidate_slot})")


async def _judge(grader: Grader, prompt: str, schema: dict[str, Any], sample: Sample) -> Any:
    context = sample.context
    model = grader.options.get("model")
    if not model:
        raise GraderError(f"Grader {grader.name!r} needs a judge `model`.")
    endpoint = context.endpoint(grader.options.get("endpoint"))
    judge = Candidate(label=f"judge:{model}", model=model, endpoint=endpoint)
    params = {
        "temperature": 0,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "grade", "schema": schema, "strict": True},
        },
    }
    result = await context.generator.complete(judge, [{"role": "user", "content": prompt}], params)
    if result.error is not None:
        raise NoGrade(f"the judge call failed: {result.error}"[:500])
    try:
        return parse_json(result.text)
    except ValueError:
        raise NoGrade(f"the judge's answer is not JSON: {result.text[:200]!r}") from None


@register("python", scale=_python_scale)
async def python(grader: Grader, sample: Sample) -> Grade:
    generation, item = sample.generation, sample.item
    function = grader.options["function"]
    answer = {
        "output_text": generation.text,
        "message": generation.message,
        "tool_calls": (generation.message or {}).get("tool_calls") or [],
    }
    score = float(
        function(
            answer,
            {
                "input": item.messages,
                "reference": item.reference,
                "reference_text": item.reference_text,
                "tags": item.tags,
            },
        )
    )
    return Grade(score, grader.passes(score, 0.5))


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
