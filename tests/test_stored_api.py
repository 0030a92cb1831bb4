"""OpenAI's stored-completions API served by the proxy, driven by the official SDK."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import pytest

from distillery.core.config import key_fingerprint

from fake_openai import FakeOpenAI
from helpers import RunningProxy


def create(client: Any, text: Any, **kwargs: Any) -> Any:
    messages = [
        {"role": "system", "content": "You answer billing questions."},
        {"role": "user", "content": text},
    ]
    return client.chat.completions.create(model="fake-model", messages=messages, **kwargs)


@pytest.fixture(params=["sqlite", "postgres"])
def setup(
    request: pytest.FixtureRequest,
    start_proxy: Callable[..., RunningProxy],
    upstream: FakeOpenAI,
    sdk: Callable[..., Any],
) -> tuple[RunningProxy, Any, Any, list[str]]:
    database_url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    proxy = start_proxy(
        {"auth": {"admin_keys": [key_fingerprint("sk-admin")]}}, database_url=database_url
    )
    alice, bob = sdk(proxy.base_url, "sk-alice"), sdk(proxy.base_url, "sk-bob")
    made = [
        create(alice, "first", metadata={"topic": "billing"}, temperature=0.2, seed=7),
        create(alice, "second", metadata={"topic": "refunds"}),
        create(alice, "third", metadata={"topic": "billing"}),
        create(bob, "bobs question", metadata={"topic": "billing"}),
    ]
    proxy.wait_stored(4)
    return proxy, alice, bob, [c.id for c in made]


def test_list_filter_and_paginate_like_openai(setup: Any) -> None:
    _proxy, alice, _, ids = setup
    page = alice.chat.completions.list()
    assert [c.id for c in page.data] == ids[:3]  # oldest first, only alice's
    assert page.has_more is False
    first = page.data[0]
    assert first.object == "chat.completion"
    assert first.metadata["topic"] == "billing" and "prompt_fp" in first.metadata
    assert first.usage.total_tokens == 21
    assert first.choices[0].message.content.endswith("[REDACTED:email]")  # what was stored
    extra = first.model_extra
    assert extra["request_id"].startswith("req_")
    assert (extra["temperature"], extra["seed"]) == (0.2, 7)

    billing = alice.chat.completions.list(metadata={"topic": "billing"})
    assert [c.id for c in billing.data] == [ids[0], ids[2]]
    assert [c.id for c in alice.chat.completions.list(order="desc").data] == ids[2::-1]
    assert [c.id for c in alice.chat.completions.list(model="fake-model-2024-08-06").data] == ids[
        :3
    ]
    assert alice.chat.completions.list(model="other").data == []

    one = alice.chat.completions.list(limit=1)
    assert [c.id for c in one.data] == [ids[0]] and one.has_more is True
    assert [c.id for c in alice.chat.completions.list(limit=1)] == ids[:3]  # auto-pagination
    assert [c.id for c in alice.chat.completions.list(after=ids[0]).data] == ids[1:3]


def test_retrieve_update_messages_delete(setup: Any) -> None:
    _, alice, _, ids = setup
    got = alice.chat.completions.retrieve(ids[1])
    assert got.id == ids[1] and got.metadata["topic"] == "refunds"

    updated = alice.chat.completions.update(ids[1], metadata={"quality": "approved"})
    assert updated.metadata == {"quality": "approved"}
    assert alice.chat.completions.retrieve(ids[1]).metadata == {"quality": "approved"}
    assert [c.id for c in alice.chat.completions.list(metadata={"quality": "approved"}).data] == [
        ids[1]
    ]

    messages = alice.chat.completions.messages.list(ids[1])
    assert [(m.id, m.role, m.content) for m in messages.data] == [
        (f"{ids[1]}-0", "system", "You answer billing questions."),
        (f"{ids[1]}-1", "user", "second"),
    ]
    later = alice.chat.completions.messages.list(ids[1], after=f"{ids[1]}-0")
    assert [m.id for m in later.data] == [f"{ids[1]}-1"]
    assert [
        m.id for m in alice.chat.completions.messages.list(ids[1], order="desc", limit=1).data
    ] == [f"{ids[1]}-1"]

    deleted = alice.chat.completions.delete(ids[1])
    assert (deleted.id, deleted.deleted, deleted.object) == (
        ids[1],
        True,
        "chat.completion.deleted",
    )
    with pytest.raises(openai.NotFoundError):
        alice.chat.completions.retrieve(ids[1])
    assert [c.id for c in alice.chat.completions.list().data] == [ids[0], ids[2]]


def test_tenants_never_see_each_other(setup: Any, sdk: Callable[..., Any]) -> None:
    proxy, alice, bob, ids = setup
    assert [c.id for c in bob.chat.completions.list().data] == [ids[3]]
    calls: list[Callable[[], object]] = [
        lambda: bob.chat.completions.retrieve(ids[0]),
        lambda: bob.chat.completions.update(ids[0], metadata={"x": "y"}),
        lambda: bob.chat.completions.delete(ids[0]),
        lambda: bob.chat.completions.messages.list(ids[0]),
    ]
    for call in calls:
        with pytest.raises(openai.NotFoundError) as err:  # 404, never 403
            call()
        assert isinstance(err.value.body, dict) and err.value.body["code"] == "not_found"
    assert alice.chat.completions.retrieve(ids[0]).metadata["topic"] == "billing"
    anonymous = sdk(proxy.base_url, "sk-nobody")
    assert anonymous.chat.completions.list().data == []
    admin = sdk(proxy.base_url, "sk-admin")
    assert [c.id for c in admin.chat.completions.list().data] == ids


def test_bad_parameters_get_openai_errors(setup: Any) -> None:
    _, alice, _, ids = setup
    for kwargs, param in (
        ({"limit": -1}, "limit"),
        ({"order": "sideways"}, "order"),
        ({"after": "chatcmpl-nope"}, "after"),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            alice.chat.completions.list(**kwargs)
        assert isinstance(err.value.body, dict) and err.value.body["param"] == param
    with pytest.raises(openai.BadRequestError, match="at most 16 pairs"):
        alice.chat.completions.update(ids[0], metadata={f"k{i}": "v" for i in range(17)})
    with pytest.raises(openai.NotFoundError):
        alice.chat.completions.retrieve("chatcmpl-missing")


def test_upstream_mode_passes_the_routes_through(
    start_proxy: Callable[..., RunningProxy], upstream: FakeOpenAI, sdk: Callable[..., Any]
) -> None:
    proxy = start_proxy({"proxy": {"stored_completions": "upstream"}})
    client = sdk(proxy.base_url)
    assert client.chat.completions.list().data == []  # the fake upstream's answer
    assert upstream.requests[-1]["method"] == "GET"
    assert upstream.requests[-1]["path"] == "/v1/chat/completions"


def test_limit_takes_what_the_spec_allows(setup: Any) -> None:
    """The published spec puts no bounds on ``limit``: 0 is an empty page that still says
    whether there is more, and a large limit is a page of at most 100."""
    _, alice, _, ids = setup
    empty = alice.chat.completions.list(limit=0)
    assert empty.data == [] and empty.has_more is True
    big = alice.chat.completions.list(limit=1000)
    assert [c.id for c in big.data] == ids[:3] and big.has_more is False  # alice's three
