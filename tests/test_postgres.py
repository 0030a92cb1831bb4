"""The same capture path on a real Postgres (skipped where none is reachable)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from distillery.store import open_store

from fake_openai import FakeOpenAI
from helpers import RunningProxy, complete

MESSAGES = [
    {"role": "system", "content": "Classify the ticket."},
    {"role": "user", "content": "Refund please, reach me at +1 415 555 2671"},
]


def test_calls_and_tags_land_in_postgres(
    start_proxy: Callable[..., RunningProxy],
    upstream: FakeOpenAI,
    sdk: Callable[..., Any],
    postgres_url: str,
) -> None:
    proxy = start_proxy({"tags": {"env": "prod"}}, database_url=postgres_url)
    client = sdk(proxy.base_url)
    client.chat.completions.create(model="fake-model", messages=MESSAGES)
    list(client.chat.completions.create(model="fake-tools", messages=MESSAGES, stream=True))
    rows = proxy.wait_stored(2)
    assert [row["model_requested"] for row in rows] == ["fake-model", "fake-tools"]
    # JSONB on Postgres: the driver hands back objects, not strings.
    request = rows[0]["request"]
    request = json.loads(request) if isinstance(request, str) else request
    assert request["messages"][1]["content"] == "Refund please, reach me at [REDACTED:phone]"
    assert rows[1]["response"]["choices"][0]["message"]["tool_calls"][0]["id"] == "call_1"
    assert rows[0]["created_at"].tzinfo is not None

    with proxy.reader.engine.connect() as conn:
        # The lookup that dataset builds do: by tag, through the (key, value) index.
        by_tag = (
            conn.execute(
                sa.text(
                    "SELECT c.completion_id FROM completions c JOIN completion_tags t "
                    "ON t.completion_id = c.id WHERE t.key = 'env' AND t.value = 'prod' ORDER BY c.id"
                )
            )
            .scalars()
            .all()
        )
        indexes = (
            conn.execute(
                sa.text("SELECT indexname FROM pg_indexes WHERE tablename = 'completion_tags'")
            )
            .scalars()
            .all()
        )
    assert by_tag == [row["completion_id"] for row in rows]
    assert "ix_completion_tags_key_value" in indexes


def test_replaying_records_twice_inserts_once(postgres_url: str) -> None:
    store = open_store(postgres_url)
    record = complete(
        {
            "id": "cap_0000000000000001aaaaaaaaaaaa",
            "created_at": 1_700_000_000.5,
            "tenant": "anonymous",
            "upstream": "http://x/v1",
            "path": "/v1/chat/completions",
            "status": 200,
            "stream": False,
            "latency_ms": 3.0,
            "request": {"messages": []},
            "metadata": {"a": "1", "b": "2"},
        }
    )
    assert store.insert([record]) == 1
    assert store.insert([record, record]) == 0  # stored already: none new
    assert store.count() == 1
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM completion_tags")).scalar_one() == 2
    store.close()
