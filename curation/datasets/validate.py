"""OpenAI's chat fine-tuning format rules, checked line by line.

Used on every file a build writes and by ``distillery dataset validate`` on any
file.  Errors are what the fine-tuning API would reject; warnings are what it
accepts but probably should not get.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from distillery.curation.datasets.examples import MESSAGE_KEYS
from distillery.curation.datasets.tokens import Counter as TokenCounter
from distillery.curation.datasets.tokens import estimate_tokens

MIN_EXAMPLES = 10
DEFAULT_MAX_TOKENS = 65_536  # gpt-4o-mini's per-example limit
LINE_KEYS = {"messages", "tools", "parallel_tool_calls", "functions"}


@dataclass
class Report:
    examples: int = 0
    tokens: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    warnings: Counter[str] = field(default_factory=Counter)
    first_error_line: dict[str, int] = field(default_factory=dict)

    def error(self, line: int, message: str) -> None:
        self.errors[message] += 1
        self.first_error_line.setdefault(message, line)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self, epochs: int = 3) -> dict[str, Any]:
        total = sum(self.tokens)
        return {
            "examples": self.examples,
            "tokens": total,
            "min_tokens": min(self.tokens, default=0),
            "mean_tokens": round(total / len(self.tokens), 1) if self.tokens else 0,
            "max_tokens": max(self.tokens, default=0),
            "epochs": epochs,
            "training_tokens": total * epochs,
            "errors": dict(self.errors),
            "warnings": dict(self.warnings),
        }


def _check_tool_calls(calls: Any, report: Report, number: int) -> list[str]:
    ids: list[str] = []
    if not isinstance(calls, list) or not calls:
        report.error(number, "assistant tool_calls must be a non-empty list")
        return ids
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(call, dict)
            or call.get("type") != "function"
            or not isinstance(call.get("id"), str)
            or not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not isinstance(function.get("arguments"), str)
        ):
            report.error(
                number,
                'tool call must be {"id": str, "type": "function", '
                '"function": {"name": str, "arguments": str}}',
            )
            continue
        ids.append(call["id"])
    return ids


def check_example(
    example: Any,
    number: int,
    report: Report,
    max_tokens: int,
    tokens: int | None = None,
    count: TokenCounter = estimate_tokens,
) -> None:
    if not isinstance(example, dict):
        report.error(number, "line is not a JSON object")
        return
    for key in example.keys() - LINE_KEYS:
        report.error(number, f"unknown key {key!r}")
    messages = example.get("messages")
    if not isinstance(messages, list) or not messages:
        report.error(number, "missing or empty 'messages'")
        return
    call_ids: set[str] = set()
    assistants = 0
    for message in messages:
        if not isinstance(message, dict):
            report.error(number, "message is not an object")
            continue
        role = message.get("role")
        if role not in MESSAGE_KEYS:
            report.error(number, f"unknown role {role!r}")
            continue
        for key in message.keys() - set(MESSAGE_KEYS[role]):
            report.error(number, f"unknown key {key!r} in a {role} message")
        content = message.get("content")
        if role == "assistant":
            assistants += 1
            if "tool_calls" in message:
                call_ids.update(_check_tool_calls(message["tool_calls"], report, number))
            elif not isinstance(content, str) or not content:
                report.error(number, "assistant message has neither content nor tool_calls")
            if "weight" in message and message["weight"] not in (0, 1):
                report.error(number, "weight must be 0 or 1")
        elif not isinstance(content, (str, list)):
            report.error(number, f"{role} message content must be a string or a list of parts")
        if role == "tool" and message.get("tool_call_id") not in call_ids:
            report.error(number, "tool message answers no earlier tool call id")
    if not assistants:
        report.error(number, "no assistant message to learn from")
    elif messages[-1].get("role") != "assistant" if isinstance(messages[-1], dict) else True:
        report.warnings["last message is not from the assistant"] += 1
    tools = example.get("tools")
    if tools is not None and (
        not isinstance(tools, list)
        or not all(
            isinstance(t, dict)
            and t.get("type") == "function"
            and isinstance((t.get("function") or {}).get("name"), str)
            for t in tools
        )
    ):
        report.error(
            number, 'tools must be a list of {"type": "function", "function": {"name": ...}}'
        )
    if tokens is None:
        tokens = count(example)
    report.tokens.append(tokens)
    if tokens > max_tokens:
        report.error(number, f"example is longer than {max_tokens} tokens")


def validate_lines(
    lines: Iterable[bytes],
    max_tokens: int = DEFAULT_MAX_TOKENS,
    report: Report | None = None,
    count: TokenCounter = estimate_tokens,
) -> Report:
    report = report or Report()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            report.warnings["blank line"] += 1
            continue
        report.examples += 1
        try:
            example = orjson.loads(line)
        except orjson.JSONDecodeError:
            report.error(number, "line is not valid JSON")
            continue
        check_example(example, number, report, max_tokens, count=count)
    return report


def validate_file(
    path: Path,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    min_examples: int = MIN_EXAMPLES,
    count: TokenCounter = estimate_tokens,
) -> Report:
    """Check a JSONL file; a training file needs ``min_examples`` (validation files 0)."""
    with path.open("rb") as handle:
        report = validate_lines(handle, max_tokens, count=count)
    if report.examples < min_examples:
        report.error(0, f"fewer than {min_examples} examples (OpenAI's minimum)")
    return report
