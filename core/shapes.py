"""Reading the chat-completion shapes stored in a record (request and response JSON)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def message_text(message: Mapping[str, Any]) -> str:
    """The text of a chat message, whether ``content`` is a string or a list of parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def system_prompt(request: Mapping[str, Any] | None) -> str:
    """The text of a request's system (or developer) messages, whitespace collapsed."""
    messages = (request or {}).get("messages")
    texts = [
        message_text(m)
        for m in (messages if isinstance(messages, list) else [])
        if isinstance(m, dict) and m.get("role") in ("system", "developer")
    ]
    return " ".join(" ".join(texts).split())


def output_messages(response: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The assistant message of every choice in a (reassembled) chat.completion."""
    if not isinstance(response, Mapping):
        return []
    choices = response.get("choices")
    if not isinstance(choices, list):
        return []
    return [
        choice["message"]
        for choice in choices
        if isinstance(choice, dict) and isinstance(choice.get("message"), dict)
    ]


def search_text(request: Mapping[str, Any] | None, response: Mapping[str, Any] | None) -> str:
    """What full-text search sees: every message's text, the output, tool calls."""
    parts: list[str] = []
    messages = (request or {}).get("messages")
    if isinstance(messages, list):
        parts.extend(message_text(m) for m in messages if isinstance(m, dict))
    for message in output_messages(response):
        parts.append(message_text(message))
        if isinstance(message.get("refusal"), str):
            parts.append(message["refusal"])
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                parts.append(f"{function.get('name', '')} {function.get('arguments', '')}")
    return "\n".join(part for part in parts if part)


# OpenAI's limits on metadata (Metadata in the OpenAPI spec).
MAX_PAIRS = 16
MAX_KEY = 64
MAX_VALUE = 512


def check_metadata(metadata: Any) -> str | None:
    """Why ``metadata`` would be refused by OpenAI, or ``None`` if it is valid."""
    if not isinstance(metadata, dict):
        return "metadata must be an object of string keys and string values"
    if len(metadata) > MAX_PAIRS:
        return f"metadata can hold at most {MAX_PAIRS} pairs, not {len(metadata)}"
    for key, value in metadata.items():
        if not isinstance(value, str):
            return f"metadata value for {key!r} must be a string"
        if len(key) > MAX_KEY:
            return f"metadata key {key[:20]!r}... is longer than {MAX_KEY} characters"
        if len(value) > MAX_VALUE:
            return f"metadata value for {key!r} is longer than {MAX_VALUE} characters"
    return None
