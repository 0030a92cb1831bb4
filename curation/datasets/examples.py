"""From a captured call to one fine-tuning example, and the rules that refuse one.

An example is OpenAI's chat fine-tuning line: ``{"messages": [...], "tools":
[...], "parallel_tool_calls": ...}``, where the messages are the request's
and the stored teacher output becomes the final assistant message (its tool
calls included).  Only the keys OpenAI's format knows are kept.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from distillery.core.shapes import message_text, output_messages

MESSAGE_KEYS = {
    "system": ("role", "content", "name"),
    "developer": ("role", "content", "name"),
    "user": ("role", "content", "name"),
    "assistant": ("role", "content", "name", "tool_calls", "function_call", "weight"),
    "tool": ("role", "content", "tool_call_id"),
    "function": ("role", "content", "name"),
}
PROMPT_ROLES = ("system", "developer")
_WORDS = re.compile(r"\w+", re.UNICODE)


def _clean(message: Mapping[str, Any]) -> dict[str, Any]:
    keys = MESSAGE_KEYS.get(str(message.get("role")), ("role", "content"))
    cleaned = {key: message[key] for key in keys if message.get(key) is not None}
    if cleaned.get("role") == "assistant" and "tool_calls" in cleaned:
        cleaned["tool_calls"] = [
            {
                "id": call.get("id"),
                "type": call.get("type", "function"),
                "function": {
                    "name": (call.get("function") or {}).get("name", ""),
                    "arguments": (call.get("function") or {}).get("arguments", ""),
                },
            }
            for call in cleaned["tool_calls"]
        ]
        if not cleaned.get("content"):
            cleaned.pop("content", None)
    return cleaned


@dataclass
class Candidate:
    """A captured call on its way to becoming an example."""

    record_id: str
    example: dict[str, Any]
    output: dict[str, Any]
    finish_reason: str | None
    metadata: dict[str, str]


def to_example(record: Mapping[str, Any], *, strip_system: bool = False) -> Candidate | None:
    """The example a record makes, or ``None`` when it has no output to learn from."""
    request = record.get("request") or {}
    outputs = output_messages(record.get("response"))
    messages = request.get("messages")
    if not outputs or not isinstance(messages, list):
        return None
    prompt = [_clean(m) for m in messages if isinstance(m, dict)]
    if strip_system:
        prompt = [m for m in prompt if m.get("role") not in PROMPT_ROLES]
    output = _clean({**outputs[0], "role": "assistant"})
    example: dict[str, Any] = {"messages": [*prompt, output]}
    if isinstance(request.get("tools"), list) and request["tools"]:
        example["tools"] = request["tools"]
    if isinstance(request.get("parallel_tool_calls"), bool):
        example["parallel_tool_calls"] = request["parallel_tool_calls"]
    choices = (record.get("response") or {}).get("choices") or [{}]
    return Candidate(
        record_id=record["id"],
        example=example,
        output=outputs[0],
        finish_reason=choices[0].get("finish_reason") if isinstance(choices[0], dict) else None,
        metadata=dict(record.get("metadata") or {}),
    )


def system_prompts(record: Mapping[str, Any]) -> list[str]:
    messages = (record.get("request") or {}).get("messages") or []
    return [
        message_text(m) for m in messages if isinstance(m, dict) and m.get("role") in PROMPT_ROLES
    ]


def prompt_messages(example: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list(example["messages"][:-1])


def exact_key(example: Mapping[str, Any]) -> bytes:
    """Identical prompts (whitespace and case aside) share this key."""
    normalised = [
        (m.get("role"), " ".join(message_text(m).lower().split()), m.get("tool_calls"))
        for m in prompt_messages(example)
    ]
    return hashlib.blake2b(
        orjson.dumps([normalised, example.get("tools")]), digest_size=16
    ).digest()


def varying_text(example: Mapping[str, Any]) -> str:
    """What differs between calls of one task: every prompt message but the system prompt."""
    return "\n".join(
        message_text(m) for m in prompt_messages(example) if m.get("role") not in PROMPT_ROLES
    )


def shingles(text: str) -> list[str]:
    """Word 3-grams of the lower-cased text (the words themselves when there are fewer)."""
    words = _WORDS.findall(text.lower())
    if len(words) < 3:
        return words or [""]
    return [" ".join(words[i : i + 3]) for i in range(len(words) - 2)]


REFUSAL_PREFIXES = (
    "i'm sorry, but i can't",
    "i'm sorry, i can't",
    "i cannot help with",
    "i can't help with",
    "i can't assist with",
    "i'm unable to",
    "sorry, i can't",
)


def is_refusal(output: Mapping[str, Any]) -> bool:
    """The model declined: an explicit ``refusal``, or an answer that opens like one."""
    if output.get("refusal"):
        return True
    text = message_text(output).strip().lower().replace("\u2019", "'")
    return text.startswith(REFUSAL_PREFIXES)
