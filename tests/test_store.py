"""The store on SQLite and Postgres: what the writer inserts, the ORM reads back whole."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, select

from distillery.core.errors import StoreError
from distillery.store import Completion, CompletionTag, open_store
from distillery.store.records import CaptureRecord

from helpers import complete


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


def record(i: int, **extra: Any) -> CaptureRecord:
    return complete(
        {
            "id": f"cap_{i:028d}",
            "completion_id": f"chatcmpl-{i}",
            "created_at": 1_764_300_000.123456 + i,
            "tenant": "key-0123456789abcdef",
            "upstream": "https://api.openai.com/v1",
            "path": "/v1/chat/completions",
            "model_requested": "gpt-4o",
            "status": 200,
            "stream": True,
            "latency_ms": 12.5,
            "request": {
                "messages": [{"role": "user", "content": "héllo \u2603"}],
                "temperature": 0.2,
            },
            "response": {"choices": [{"message": {"content": "hi"}}]},
            "metadata": {"env": "prod", "app": "support"},
            **extra,
        }
    )


def test_round_trip_through_the_orm(database_url: str) -> None:
    store = open_store(database_url)
    store.insert([record(1), record(2, response=None, error={"error": {"message": "x"}})])
    with Session(store.engine) as session:
        rows = session.exec(select(Completion).order_by(Completion.id)).all()
        tags = session.exec(select(CompletionTag).where(CompletionTag.key == "app")).all()
    first = rows[0]
    assert first.created_at.replace(tzinfo=UTC) == datetime.fromtimestamp(1_764_300_001.123456, UTC)
    assert first.request == record(1)["request"]
    assert first.metadata_ == {"env": "prod", "app": "support"}
    assert first.stream is True and first.status == 200
    assert rows[1].response is None and rows[1].error == {"error": {"message": "x"}}
    assert sorted(tag.completion_id for tag in tags) == [record(1)["id"], record(2)["id"]]
    store.close()


def test_unreachable_database_names_the_fix() -> None:
    with pytest.raises(StoreError, match="Cannot open database"):
        open_store("postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(StoreError, match="use sqlite:///path"):
        open_store("not a url")
