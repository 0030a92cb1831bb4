"""Auto-tagging, metadata limits and the prompt fingerprint."""

from __future__ import annotations

from typing import Any

from distillery.core.config import Settings
from distillery.proxy.tagging import Tagger, merge_metadata, prompt_fingerprint


def body(system: str, user: str = "hi", **extra: Any) -> dict[str, Any]:
    return {
        "model": "gpt-4o",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        **extra,
    }


def test_fingerprint_groups_one_template_and_separates_tasks() -> None:
    a = prompt_fingerprint(body("Summarise ticket 1234 dated 2026-01-02.", "first"))
    b = prompt_fingerprint(body("Summarise  ticket 98 dated 2025-12-31.", "second"))
    c = prompt_fingerprint(body("Translate to French."))
    assert a is not None and a == b and a != c and len(a) == 12
    parts = {"role": "developer", "content": [{"type": "text", "text": "Translate to French."}]}
    assert prompt_fingerprint({"messages": [parts]}) == c


def test_fingerprint_uses_tools_and_is_absent_without_a_template() -> None:
    tool = {"type": "function", "function": {"name": "lookup"}}
    assert prompt_fingerprint({"messages": [{"role": "user", "content": "x"}]}) is None
    with_tool = prompt_fingerprint({"messages": [], "tools": [tool]})
    assert with_tool is not None
    assert with_tool != prompt_fingerprint(
        {"messages": [], "tools": [{**tool, "function": {"name": "other"}}]}
    )


def test_sources_apply_in_documented_order() -> None:
    """static < header < app < fingerprint < rules: a later source wins the same key."""
    settings = Settings.model_validate(
        {
            "tags": {"env": "prod", "app": "static-app", "task": "static"},
            "apps": {"key-abc": "mapped-app"},
            "rules": [{"model": "^gpt-4", "set": {"task": "rule", "prompt_fp": "rule-fp"}}],
        }
    )
    tagger = Tagger(settings)
    headers = {"X-Distillery-Tag-Env": "staging", "X-Distillery-Tag-Task": "header", "Other": "x"}
    tags = tagger.tags(body("s"), headers, "key-abc", None, "fp123")
    assert tags == {"env": "staging", "app": "mapped-app", "task": "rule", "prompt_fp": "rule-fp"}
    assert tagger.tags(body("s"), {}, "key-abc", "from-path", None)["app"] == "from-path"


def test_text_rules_see_every_message() -> None:
    settings = Settings.model_validate(
        {"rules": [{"text": "(?i)\\bSELECT\\b", "set": {"task": "sql"}}]}
    )
    tagger = Tagger(settings)
    assert tagger.tags(body("You write SQL", "select * from t"), {}, "t", None, None) == {
        "task": "sql"
    }
    assert tagger.tags(body("You write SQL", "hello"), {}, "t", None, None) == {}


def test_merge_keeps_client_metadata_and_respects_limits() -> None:
    merged, dropped = merge_metadata({"user": "u1", "env": "mine"}, {"env": "prod", "a": "1"})
    assert merged == {"user": "u1", "env": "mine", "a": "1"}
    assert dropped == [("env", "the client set this key itself")]
    full = {f"k{i}": "v" for i in range(16)}
    merged, dropped = merge_metadata(full, {"a": "1"})
    assert merged == full and dropped == [("a", "metadata already holds 16 pairs")]
    merged, _ = merge_metadata(None, {"a": "1"})
    assert merged == {"a": "1"}
