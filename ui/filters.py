"""Template filters: how stored values read on a page (escaping stays jinja2's job)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from distillery.core.shapes import message_text, output_messages


def when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "—"


def pretty(value: Any) -> str:
    """JSON as a person reads it (the page escapes it like any text)."""
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def preview(record: Mapping[str, Any], limit: int = 160) -> str:
    """The last user message: what the call was about."""
    messages = (record.get("request") or {}).get("messages") or []
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    text = message_text(users[-1]) if users else ""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def number(value: float | int | None, digits: int = 0) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def outputs(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    return output_messages(record.get("response"))


def text(message: Mapping[str, Any]) -> str:
    return message_text(message)


def arguments(call: Mapping[str, Any]) -> str:
    """A tool call's arguments, pretty when they are JSON (they are a string)."""
    raw = (call.get("function") or {}).get("arguments") or ""
    try:
        return json.dumps(json.loads(raw), indent=2, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(raw)


def curl(request: Mapping[str, Any]) -> str:
    """The call again, as a shell command (through the proxy at $OPENAI_BASE_URL)."""
    body = json.dumps(request, indent=2, ensure_ascii=False)
    return (
        'curl "$OPENAI_BASE_URL/chat/completions" \\\n'
        '  -H "Authorization: Bearer $OPENAI_API_KEY" \\\n'
        "  -H 'Content-Type: application/json' \\\n"
        f"  --data-binary @- <<'JSON'\n{body}\nJSON"
    )


def conversation(messages: list[Mapping[str, Any]] | None) -> str:
    """A prompt's messages as ``role: text`` lines (what an eval item asked)."""
    return "\n".join(f"{m.get('role')}: {message_text(m)}" for m in messages or [])


def tag_lines(metadata: Mapping[str, str] | None) -> str:
    return "\n".join(f"{k}={v}" for k, v in (metadata or {}).items())


FILTERS: dict[str, Callable[..., Any]] = {
    "when": when,
    "pretty": pretty,
    "preview": preview,
    "number": number,
    "outputs": outputs,
    "text": text,
    "arguments": arguments,
    "tag_lines": tag_lines,
    "conversation": conversation,
    "curl": curl,
}
