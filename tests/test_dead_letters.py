"""Dead letters: a record the database refuses even after repair is written aside; when
even that cannot be written it is held back in the spool, /healthz says so, and the
records around it are stored all the same.  ``distillery db dead-letters`` lists them,
retries them once the cause is fixed, and purges them."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from distillery.cli import cli
from distillery.store import dead_letters, open_store

from fake_openai import FakeOpenAI
from helpers import capture_record, wait_for
from proxy_process import ProxyProcess

# A rule the database enforces that the proxy cannot repair around: the "cause" a user
# fixes before retrying (here, by dropping the trigger).
REFUSE = """CREATE TRIGGER no_poison BEFORE INSERT ON completions
WHEN NEW.model_requested = 'fake-poison' BEGIN SELECT RAISE(ABORT, 'poison refused'); END"""


def health(proxy: ProxyProcess) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"http://127.0.0.1:{proxy.port}/healthz").json()
    return body


def command(*args: str) -> Any:
    return CliRunner().invoke(cli, ["db", "dead-letters", *args], catch_exceptions=False)


@pytest.mark.slow
def test_an_unwritable_dead_letter_file_holds_back_one_record_and_says_so(
    upstream: FakeOpenAI, tmp_path: Path, unused_tcp_port: int, sdk: Callable[..., Any]
) -> None:
    path, data = tmp_path / "db.sqlite", tmp_path / "data"
    url = f"sqlite:///{path}"
    open_store(url).close()
    with sqlite3.connect(path) as lite:
        lite.execute(REFUSE)
    data.mkdir()
    (data / "dead-letter").write_text("a file where the directory goes: nothing can be written")
    proxy = ProxyProcess(unused_tcp_port, upstream.url + "/v1", data, url).start()
    client = sdk(proxy.base_url, api_key="sk-a")
    messages: Any = [{"role": "user", "content": "hi"}]
    models = ["fake-model", "fake-model", "fake-poison", "fake-model", "fake-model"]
    for i, model in enumerate(models):
        client.chat.completions.create(model=model, messages=messages, stream=bool(i % 2))

    def stored() -> list[str]:
        with sqlite3.connect(path) as lite:
            return [row[0] for row in lite.execute("SELECT model_requested FROM completions")]

    # The four around the refused one are stored; the refused one is held back, said so.
    wait_for(lambda: len(stored()) == 4, what="the four good records")
    wait_for(lambda: health(proxy)["capture"]["held_back"] == 1, what="held back on /healthz")
    body = health(proxy)
    assert body["status"] == "degraded"
    assert any("dead-letter file not writable" in p for p in body["capture"]["problems"])

    # The cause of the unwritable file is fixed: the writer tries again, by itself.
    (data / "dead-letter").unlink()
    wait_for(lambda: health(proxy)["status"] == "ok", timeout=30, what="/healthz ok again")
    assert health(proxy)["capture"]["dead_lettered"] == 1

    listed = command("--json", "--data-dir", str(data), "--database-url", url)
    [letter] = json.loads(listed.stdout)
    assert letter["model"] == "fake-poison" and "poison refused" in letter["reason"]

    # Retrying before the cause is fixed changes nothing; after, it is stored.
    again = command("--retry", "--data-dir", str(data), "--database-url", url)
    assert "Stored 0 dead letters; 1 still refused" in again.stdout
    assert len(json.loads(command("--json", "--data-dir", str(data)).stdout)) == 1
    with sqlite3.connect(path) as lite:
        lite.execute("DROP TRIGGER no_poison")
    fixed = command("--retry", "--data-dir", str(data), "--database-url", url)
    assert fixed.exit_code == 0 and "Stored 1 dead letters; 0 still refused." in fixed.stdout
    assert sorted(stored()) == sorted(models)
    assert json.loads(command("--json", "--data-dir", str(data)).stdout) == []


def test_listing_purging_and_bad_flags(tmp_path: Path) -> None:
    directory = tmp_path / "data" / "dead-letter"
    for i in range(3):
        dead_letters.append(directory, "proc-1", capture_record(f"r{i}"), f"reason {i}")
    table = command("--data-dir", str(tmp_path / "data"))
    assert table.exit_code == 0 and "reason 2" in table.stdout
    rows = json.loads(command("--json", "--data-dir", str(tmp_path / "data")).stdout)
    assert [row["reason"] for row in rows] == ["reason 0", "reason 1", "reason 2"]
    both = CliRunner().invoke(cli, ["db", "dead-letters", "--retry", "--purge"])
    assert both.exit_code == 2 and "Cannot use --retry and --purge together" in both.output
    purged = command("--purge", "--data-dir", str(tmp_path / "data"))
    assert "Deleted 3 dead letters." in purged.stdout
    empty = command("--data-dir", str(tmp_path / "data"))
    assert empty.stdout == "" and "No dead letters" in empty.stderr
