"""From a captured call to one fine-tuning example, and the rules that refuse one.

An example is OpenAI's chat fine-tuning line: ``{"messages": [...], "tools":
[...], "parallel_tool_calls": ...}``, where the messages are the request's
and the stored teacher output becomes the final assistant message (its tool
calls included).  Only the keys OpenAI's format knows are kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from distillery.errors import DistilleryError
from distillery.store.records import message_text, output_messages

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


# Tokens by script, from how GPT-family tokenizers (o200k, cl100k) cut text: plain
# words about 4.4 characters a token (spaces included), punctuation about 0.55 of a
# token a character (pairs such as ``":`` merge), digits in threes, a CJK character or
# full-width form about 0.8, other scripts about one token per 3 characters.  That
# gives English ~4.4 characters a token, JSON ~2.5, Chinese or Japanese ~1.25; the
# usual rule of four characters a token counts CJK at a third and JSON at a half.
# Counted with str.translate and one regex, all in C: a build estimates millions.
_CJK_CHAR = re.compile(
    "[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]"
)
_NO_PUNCT = {ord(c): None for c in string.punctuation}
_NO_DIGITS = {ord(c): None for c in string.digits}
TOKEN_METHOD = "estimate by script (words, punctuation, digits, CJK, other scripts)"


def text_tokens(text: str) -> int:
    """Tokens a text costs, estimated by script (see the constants above)."""
    size = len(text)
    if not size:
        return 0
    punct = size - len(text.translate(_NO_PUNCT))
    digits = size - len(text.translate(_NO_DIGITS))
    cjk = other = 0
    if not text.isascii():
        cjk = len(_CJK_CHAR.findall(text))
        other = size - len(text.encode("ascii", "ignore")) - cjk
    plain = size - punct - digits - cjk - other
    return math.ceil(plain / 4.4 + punct * 0.55 + digits / 2.5 + cjk * 0.8 + other / 3)


def token_counter(tokenizer: str | None) -> Callable[[Mapping[str, Any]], int]:
    """How a build counts an example's tokens: with the student's own tokenizer (a local
    model directory; its chat template when it has one), else :func:`estimate_tokens`."""
    if tokenizer is None:
        return estimate_tokens
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DistilleryError(
            "--tokenizer needs transformers: pip install 'distillery[train]'"
        ) from None
    try:
        loaded = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DistilleryError(
            f"Cannot load a tokenizer from {tokenizer}: {str(exc).splitlines()[0]} "
            "Point --tokenizer at a model directory that holds tokenizer files."
        ) from None

    def count(example: Mapping[str, Any]) -> int:
        messages = [
            {"role": m.get("role"), "content": _counted_text(m)} for m in example["messages"]
        ]
        if loaded.chat_template:
            with contextlib.suppress(Exception):  # a template that refuses these roles
                ids = loaded.apply_chat_template(messages, tokenize=True)
                ids = ids["input_ids"] if isinstance(ids, Mapping) else ids
                return len(ids)
        return 3 + sum(
            3 + len(loaded.encode(m["content"], add_special_tokens=False)) for m in messages
        )

    return count


def _counted_text(message: Mapping[str, Any]) -> str:
    text = message_text(message)
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        text += f"\n{function.get('name', '')} {function.get('arguments', '')}"
    return text


def token_method(tokenizer: str | None) -> str:
    return f"counted with the tokenizer at {tokenizer}" if tokenizer else TOKEN_METHOD


def estimate_tokens(example: Mapping[str, Any]) -> int:
    """Tokens an example costs, estimated without a tokenizer (see :func:`text_tokens`).

    Plus OpenAI's framing: three tokens a message and three to prime the reply; tool
    definitions count by their JSON.  Use it for limits and budgets, not billing.
    """
    total = 3
    for message in example.get("messages") or ():
        total += 3 + text_tokens(message_text(message))
        for call in message.get("tool_calls") or ():
            function = call.get("function") or {}
            total += 3 + text_tokens(f"{function.get('name', '')} {function.get('arguments', '')}")
    if example.get("tools"):
        total += text_tokens(orjson.dumps(example["tools"]).decode())
    return total


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
