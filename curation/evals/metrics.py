"""Text metrics for graders: BLEU, ROUGE, fuzzy match, and reading JSON out of an answer."""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

import orjson

_TOKEN = re.compile(r"\w+", re.UNICODE)


_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


LCS_LIMIT = 2000  # tokens per side for ROUGE-L (quadratic)


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
