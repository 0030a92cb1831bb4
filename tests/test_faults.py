"""Faults that must never stop capture or break a call: refused records, a full disk,
hostile input, malformed upstream answers, credentials.  The long campaign (10,000+
fuzzed requests, timings) is ``scripts/fault_campaign.py``; these are its fast cases."""

from __future__ import annotations

import asyncio
import gc
import gzip
import json
import os
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import sqlalchemy as sa
from openai.types.chat import ChatCompletionMessageParam
from structlog.testing import capture_logs

from distillery.core.config import CaptureSettings, key_fingerprint
from distillery.core.redact import Redactor
from distillery.proxy.capture import Capture
from distillery.proxy.spool import new_record_id
from distillery.store import open_store
from distillery.store.records import CaptureRecord
from distillery.store.repair import REPAIRED_TAG, RecordRefused

from fake_openai import FakeOpenAI
from helpers import RunningProxy, ServerThread, complete, distinct_words, fill, wait_for

MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "hi"}]


def health(proxy: Any) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(proxy.url + "/healthz").json()
    return body


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'faults.db'}"
    return str(request.getfixturevalue("postgres_url"))


# -- records the database refuses --------------------------------------------

POISON: dict[str, dict[str, Any]] = {
    "metadata value null": {"metadata": {"note": None}},
    "metadata value object": {"metadata": {"note": {"a": 1}}},
    "metadata value list": {"metadata": {"note": [1, 2]}},
    "metadata key of 65 characters": {"metadata": {"k" * 65: "v"}},
    "metadata value of 600 characters": {"metadata": {"note": "v" * 600}},
    "NUL in the prompt": {"messages": [{"role": "user", "content": "a\x00b"}]},
    "3 MB prompt of distinct words": {
        "messages": [{"role": "user", "content": distinct_words(3_000_000)}]
    },
    "upstream 400 with null metadata": {"model": "fake-error-400", "metadata": {"n": None}},
}
# What each database refuses as it is (SQLite has no length limits, stores NUL
# and indexes any size); everything else is stored untouched.
REFUSED = {
    "sqlite": {
        "metadata value null",
        "metadata value object",
        "metadata value list",
        "upstream 400 with null metadata",
    },
    # The 3 MB prompt is not refused: search indexes at most 200,000 characters.
    "postgresql": set(POISON) - {"3 MB prompt of distinct words"},
}


def test_refused_records_are_repaired_and_never_block_later_calls(
    start_proxy: Callable[..., RunningProxy], sdk: Callable[..., Any], db_url: str
) -> None:
    """Each record the database refuses is repaired and stored; the calls after it are
    stored too (before the fix, one such record stopped most later captures for good)."""
    proxy = start_proxy(database_url=db_url)
    client = sdk(proxy.base_url, api_key="sk-poison")
    sent: dict[str, str] = {}
    good = 0
    for name, change in POISON.items():
        call = {"model": "fake-model", "messages": MESSAGES, **change}
        try:
            client.chat.completions.create(**call)
        except openai.BadRequestError:
            assert call["model"] == "fake-error-400"
        sent[name] = change.get("model", "fake-model")
        for i in range(5):
            question = [*MESSAGES[:1], {"role": "user", "content": f"after {name} {i}"}]
            if i % 2:
                list(
                    client.chat.completions.create(
                        model="fake-model", messages=question, stream=True
                    )
                )
            else:
                client.chat.completions.create(model="fake-model", messages=question)
            good += 1
    total = len(POISON) + good
    rows = proxy.wait_stored(total, timeout=60)
    assert len(rows) == total
    capture = health(proxy)["capture"]
    dialect = proxy.reader.engine.dialect.name
    assert capture["repaired"] == len(REFUSED[dialect])
    assert capture["dead_lettered"] == 0 and capture["database"] == "ok"
    repaired = [row for row in rows if proxy.tags(row["id"]).get(REPAIRED_TAG)]
    assert len(repaired) == len(REFUSED[dialect])
    for row in repaired:
        tags = proxy.tags(row["id"])
        assert all(isinstance(value, str) and len(value) <= 512 for value in tags.values())
        assert all(len(key) <= 64 for key in tags)
    # The original metadata stays in the stored request, as it was sent upstream.
    nulls = [row for row in rows if proxy.tags(row["id"]).get("note") == "null"]
    assert nulls, "a null metadata value is stored as the string 'null'"
    request = nulls[0]["request"]
    request = json.loads(request) if isinstance(request, str) else request
    assert request["metadata"]["note"] is None


def test_unrepairable_record_goes_to_the_dead_letter_file(tmp_path: Path) -> None:
    """A record even repair cannot make storable is written aside with the reason; the
    records around it are stored."""
    url = f"sqlite:///{tmp_path / 'dead.db'}"
    store = open_store(url)
    capture = Capture(store, tmp_path / "data" / "spool", CaptureSettings(), Redactor([]))
    capture.start()
    records = [_record(f"m{i}") for i in range(5)]
    records[2]["created_at"] = "not a time"  # type: ignore[typeddict-item]  # no repair fixes a timestamp
    for record in records:
        capture.submit(record)
    capture.close()
    stored = {row[0] for row in _select(store, "SELECT id FROM completions")}
    assert stored == {r["id"] for i, r in enumerate(records) if i != 2}
    health = capture.health()
    assert health["dead_lettered"] == 1 and health["repaired"] == 0
    [letter_file] = (tmp_path / "data" / "dead-letter").iterdir()
    assert stat.S_IMODE(letter_file.stat().st_mode) == 0o600
    [letter] = [orjson.loads(line) for line in letter_file.read_bytes().splitlines()]
    assert letter["id"] == records[2]["id"] and letter["record"]["created_at"] == "not a time"
    assert "after repair" in letter["reason"]
    store.close()


def test_a_record_with_a_misspelled_key_is_dead_lettered_never_stored_with_a_null(
    tmp_path: Path,
) -> None:
    """The store takes whole capture records only: a key spelled wrong (in a spool, or by a
    bug) is refused with its name, never inserted with NULL where the value was meant."""
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    store = open_store(url)
    bad = _record("typo")
    bad["model_servd"] = "gpt-4o-2024-08-06"  # type: ignore[typeddict-unknown-key]
    del bad["model_served"]  # type: ignore[misc]
    with pytest.raises(RecordRefused, match="missing model_served; unknown model_servd"):
        store.insert([bad])
    capture = Capture(store, tmp_path / "data" / "spool", CaptureSettings(), Redactor([]))
    capture.start()
    good = [_record("a"), _record("b")]
    for record in (good[0], bad, good[1]):
        capture.submit(record)
    capture.close()
    stored = {row[0] for row in _select(store, "SELECT id FROM completions")}
    assert stored == {r["id"] for r in good}
    [letter_file] = (tmp_path / "data" / "dead-letter").iterdir()
    [letter] = [orjson.loads(line) for line in letter_file.read_bytes().splitlines()]
    assert letter["id"] == bad["id"] and letter["record"]["model_servd"] == "gpt-4o-2024-08-06"
    assert "unknown model_servd" in letter["reason"]
    store.close()


def test_a_poisoned_spool_left_by_an_older_proxy_is_replayed(tmp_path: Path) -> None:
    """Segments that an earlier version could never replay (a refused record inside)
    are replayed at start: every record stored, the bad one repaired."""
    spool = tmp_path / "spool"
    spool.mkdir()
    records = [_record(f"s{i}") for i in range(3)]
    records[1]["metadata"] = {"note": {"nested": True}}  # type: ignore[dict-item]
    (spool / "999-abcdef-00000001.jsonl").write_bytes(
        b"".join(orjson.dumps(r) + b"\n" for r in records)
    )
    url = f"sqlite:///{tmp_path / 'replay.db'}"
    store = open_store(url)
    capture = Capture(store, spool, CaptureSettings(), Redactor([]))
    capture.start()
    capture.close()
    assert {row[0] for row in _select(store, "SELECT id FROM completions")} == {
        r["id"] for r in records
    }
    assert capture.health()["repaired"] == 1 and list(spool.glob("*.jsonl")) == []
    store.close()


def _record(text: str) -> CaptureRecord:
    return complete(
        {
            "id": new_record_id(),
            "created_at": time.time(),
            "tenant": "key-test",
            "upstream": "http://x/v1",
            "path": "/v1/chat/completions",
            "status": 200,
            "stream": False,
            "latency_ms": 1.0,
            "request": {"messages": [{"role": "user", "content": text}]},
            "metadata": {"env": "test"},
        }
    )


def _select(store: Any, sql: str) -> list[Any]:
    with store.engine.connect() as conn:
        return list(conn.execute(sa.text(sql)))


# -- a full disk ----------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MB tmpfs to fill up; skipped where this process may not mount one."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def ask(client: openai.OpenAI, i: int) -> str:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": f"disk {i}"},
    ]
    if i % 2:
        chunks = client.chat.completions.create(model="fake-model", messages=messages, stream=True)
        ids = [chunk.id for chunk in chunks]  # read to the end: the call completes
        return ids[0]
    return client.chat.completions.create(model="fake-model", messages=messages).id


def test_full_disk_loses_nothing_once_space_returns(
    small_fs: Path, start_proxy: Callable[..., RunningProxy], sdk: Callable[..., Any]
) -> None:
    """Database and spool on a filesystem that fills up: every call is still answered,
    health says why it is degraded, and once space returns every call is stored once."""
    proxy = start_proxy(
        {"storage": {"data_dir": str(small_fs)}},
        database_url=f"sqlite:///{small_fs / 'db.sqlite'}",
    )
    client = sdk(proxy.base_url, api_key="sk-disk")
    answered = [ask(client, i) for i in range(5)]
    proxy.wait_stored(5)
    filler = fill(small_fs)
    answered += [ask(client, i) for i in range(5, 305)]
    body = health(proxy)
    assert body["status"] == "degraded"
    assert body["capture"]["spool"] == "failing" and body["capture"]["memory_buffered"] > 0
    assert any("spool not writable" in problem for problem in body["capture"]["problems"])
    metrics = httpx.get(proxy.url + "/metrics").text
    assert "distillery_spool_write_errors_total" in metrics
    assert "distillery_spool_write_errors_total 0.0" not in metrics

    filler.unlink()
    rows = proxy.wait_stored(305, timeout=60)
    stored = [row["completion_id"] for row in rows]
    assert sorted(stored) == sorted(answered), "a call was lost or stored twice"
    wait_for(lambda: health(proxy)["status"] == "ok", timeout=20, what="health ok again")
    assert health(proxy)["capture"]["dropped"] == 0


def test_a_full_memory_buffer_drops_with_an_error_but_answers(
    small_fs: Path, start_proxy: Callable[..., RunningProxy], sdk: Callable[..., Any]
) -> None:
    """Past the memory buffer a record is dropped -- logged with its id, counted -- and
    the client's call is still answered."""
    proxy = start_proxy(
        {"storage": {"data_dir": str(small_fs)}, "capture": {"memory_buffer_mb": 0.002}},
        database_url=f"sqlite:///{small_fs / 'db.sqlite'}",
    )
    client = sdk(proxy.base_url, api_key="sk-disk")
    ask(client, 0)
    proxy.wait_stored(1)
    filler = fill(small_fs)
    with capture_logs() as logs:
        answered = [ask(client, i) for i in range(1, 21)]
    assert len(answered) == 20
    drops = [e for e in logs if e["event"].startswith("capture dropped")]
    assert drops and all(e["log_level"] == "error" and e["record_id"] for e in drops)
    assert health(proxy)["capture"]["dropped"] == len(drops)
    assert (
        f"distillery_capture_dropped_total {len(drops)}.0" in httpx.get(proxy.url + "/metrics").text
    )
    filler.unlink()


# -- credentials ------------------------------------------------------------------


def test_a_fingerprint_presented_as_a_key_is_refused(
    start_proxy: Callable[..., RunningProxy],
    sdk: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fingerprints are in logs, the database and the config file: presenting one is
    presenting an unknown key, for clients and for admins alike."""
    monkeypatch.setenv("UPSTREAM_KEY", "sk-upstream")
    good, admin = key_fingerprint("sk-good"), key_fingerprint("sk-admin")
    proxy = start_proxy(
        {
            "upstream": {"api_key_env": "UPSTREAM_KEY"},
            "auth": {"keys": [good], "admin_keys": [admin]},
        }
    )
    for presented in (good, admin):
        client = sdk(proxy.base_url, api_key=presented)
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model="fake-model", messages=MESSAGES)
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.list()
    assert (
        sdk(proxy.base_url, api_key="sk-good")
        .chat.completions.create(model="fake-model", messages=MESSAGES)
        .id
    )
    assert sdk(proxy.base_url, api_key="sk-admin").chat.completions.list() is not None


def test_keyless_mode_fingerprint_is_not_admin(
    start_proxy: Callable[..., RunningProxy], sdk: Callable[..., Any]
) -> None:
    """Forwarding the caller's own key: a fingerprint as the key is a new tenant, never
    the admin whose fingerprint it is."""
    proxy = start_proxy({"auth": {"admin_keys": [key_fingerprint("sk-admin")]}})
    sdk(proxy.base_url, api_key="sk-someone").chat.completions.create(
        model="fake-model", messages=MESSAGES
    )
    proxy.wait_stored(1)
    impostor = sdk(proxy.base_url, api_key=key_fingerprint("sk-admin"))
    assert impostor.chat.completions.list().data == []
    assert len(sdk(proxy.base_url, api_key="sk-admin").chat.completions.list().data) == 1


def test_keyless_callers_cannot_list_stored_completions(
    start_proxy: Callable[..., RunningProxy], upstream: FakeOpenAI
) -> None:
    proxy = start_proxy()
    httpx.post(
        proxy.base_url + "/chat/completions", json={"model": "fake-model", "messages": MESSAGES}
    )
    proxy.wait_stored(1)
    response = httpx.get(proxy.base_url + "/chat/completions")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


# -- hostile input: always OpenAI's error JSON, never a traceback -------------------


def raw_request(url: str, data: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes; the status, headers and body of the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    return int(lines[0].split()[1]), headers, body


def assert_openai_error(
    status: int, headers: dict[str, str], body: bytes, expected: int
) -> dict[str, Any]:
    assert status == expected, body
    assert headers["content-type"].startswith("application/json"), headers
    assert headers.get("x-request-id", "").startswith("cap_")
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return dict(error)


def chat_request(body: bytes, *headers: bytes, path: bytes = b"/v1/chat/completions") -> bytes:
    return (
        b"POST "
        + path
        + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + b"".join(h + b"\r\n" for h in headers)
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


BAD_HTTP = {
    "bad chunk framing": (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        400,
    ),
    "garbage request line": (b"NOT HTTP AT ALL\r\n\r\n", 400),
    "too many headers": (
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(300))
        + b"\r\n",
        400,
    ),
    "header line too long": (
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n",
        400,
    ),
    "JSON nested 300 levels": (
        chat_request(b'{"model":"fake-model","messages":[],"x":' + b"[" * 300 + b"]" * 300 + b"}"),
        400,
    ),
    "body claims gzip but is not": (
        chat_request(b"this is not gzip", b"Content-Encoding: gzip"),
        400,
    ),
    "a pass-through body that claims gzip but is not": (
        chat_request(b"this is not gzip either", b"Content-Encoding: gzip", path=b"/v1/files"),
        400,
    ),
    "not JSON": (chat_request(b"{nope"), 400),
    "a JSON array": (chat_request(b"[1, 2]"), 400),
    "TRACE": (b"TRACE /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    "a .. segment": (b"GET /v1/../admin HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "an encoded .. segment": (b"GET /v1/%2e%2E/admin HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "Authorization not UTF-8": (
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-\xff\xfe\r\n\r\n",
        400,
    ),
    "unknown route": (b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", 404),
}


@pytest.mark.parametrize("case", list(BAD_HTTP))
def test_bad_requests_get_openai_error_json(
    start_proxy: Callable[..., RunningProxy],
    upstream: FakeOpenAI,
    caplog: pytest.LogCaptureFixture,
    case: Any,
) -> None:
    """What aiohttp's parser refuses and what the proxy refuses look the same to a
    client: OpenAI's error JSON with a request id; nothing reaches the upstream."""
    proxy = start_proxy()
    data, expected = BAD_HTTP[case]
    with capture_logs() as logs:
        status, headers, body = raw_request(proxy.url, data)
    assert_openai_error(status, headers, body, expected)
    assert upstream.requests == []
    assert not [e for e in logs if e.get("exc_info") or e["event"] == "unhandled error"]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_a_body_shorter_than_its_content_length_times_out(
    start_proxy: Callable[..., RunningProxy],
) -> None:
    proxy = start_proxy({"proxy": {"body_timeout": 0.5}})
    data = chat_request(b'{"model": "fake-model"')[:-5].replace(
        b"Content-Length: 22", b"Content-Length: 1000"
    )
    status, headers, body = raw_request(proxy.url, data)
    assert assert_openai_error(status, headers, body, 408)["code"] == "request_timeout"


def test_a_closed_server_loop_leaves_no_task_to_be_destroyed_pending(
    start_proxy: Callable[..., RunningProxy],
    servers: ServerThread,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After a short body's 408, aiohttp lingers on the connection (10 s) in a task no
    server tracks, so its cleanup leaves it.  Closing the loop must finish it: dropped
    pending, asyncio logs "Task was destroyed but it is pending!" whenever the collector
    finds it, in whichever test runs then (the fuzz test, which allows no error log)."""
    proxy = start_proxy({"proxy": {"body_timeout": 0.5}})
    data = chat_request(b'{"model": "fake-model"')[:-5].replace(
        b"Content-Length: 22", b"Content-Length: 1000"
    )
    assert raw_request(proxy.url, data)[0] == 408

    async def connections() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if "RequestHandler.start" in repr(t)]

    handlers = servers.call(connections())
    assert handlers
    proxy.stop()
    servers.close()
    assert all(task.done() for task in handlers)
    del handlers
    gc.collect()
    assert not [r for r in caplog.records if "destroyed but it is pending" in r.getMessage()]


def test_odd_but_valid_requests_are_forwarded_and_captured(
    start_proxy: Callable[..., RunningProxy], upstream: FakeOpenAI
) -> None:
    """Input the proxy used to fail on with a plain 500 is forwarded like any other."""
    proxy = start_proxy()
    tools_string = orjson.dumps(
        {
            "model": "fake-model",
            "messages": MESSAGES,
            "tools": [{"type": "function", "function": "f"}],
        }
    )
    tools_list = orjson.dumps(
        {
            "model": "fake-model",
            "messages": MESSAGES,
            "tools": [{"type": "function", "function": [1]}],
        }
    )
    for data in (
        chat_request(tools_string),
        chat_request(tools_list),
        chat_request(
            orjson.dumps({"model": "fake-model", "messages": MESSAGES}),
            b"X-Distillery-Tag-team: caf\xe9",
        ),
        chat_request(
            gzip.compress(orjson.dumps({"model": "fake-model", "messages": MESSAGES})),
            b"Content-Encoding: gzip",
        ),
    ):
        status, _, body = raw_request(proxy.url, data)
        assert status == 200, body
    rows = proxy.wait_stored(4)
    assert proxy.tags(rows[2]["id"])["team"] == "caf\ufffd"


MALFORMED = {
    "fake-malformed-choices": "choices is not a list",
    "fake-malformed-usage": "usage is not an object",
}


@pytest.mark.parametrize("model", [*MALFORMED, "fake-malformed-delta"])
def test_malformed_upstream_answers_are_relayed_as_sent_and_stored_as_errors(
    start_proxy: Callable[..., RunningProxy], upstream: FakeOpenAI, model: Any
) -> None:
    proxy = start_proxy()
    body = {"model": model, "messages": MESSAGES, "stream": model.endswith("delta")}
    direct = httpx.post(upstream.url + "/v1/chat/completions", json=body)
    relayed = httpx.post(proxy.base_url + "/chat/completions", json=body)
    assert relayed.status_code == direct.status_code == 200
    assert relayed.content == direct.content
    [row] = proxy.wait_stored(1)
    error = row["error"] if isinstance(row["error"], dict) else json.loads(row["error"])
    assert error["type"] == "upstream_malformed"
    assert MALFORMED.get(model, "chunk 2") in error["message"]


def test_an_answer_nested_too_deep_to_serialise_is_relayed_and_stored_as_text(
    start_proxy: Callable[..., RunningProxy], upstream: FakeOpenAI
) -> None:
    proxy = start_proxy()
    body = {"model": "fake-deep", "messages": MESSAGES}
    direct = httpx.post(upstream.url + "/v1/chat/completions", json=body)
    relayed = httpx.post(proxy.base_url + "/chat/completions", json=body)
    assert relayed.status_code == 200 and relayed.content == direct.content
    [row] = proxy.wait_stored(1)
    response = json.loads(row["response"])
    assert response["distillery_unstorable"] == "nested too deeply"
    assert json.loads(response["json"]) == direct.json()
    assert REPAIRED_TAG in proxy.tags(row["id"])


# -- streams, disconnects, shutdown ------------------------------------------------


@pytest.mark.slow
def test_a_32000_delta_stream_is_relayed_byte_for_byte_and_reassembled(
    start_proxy: Callable[..., RunningProxy], upstream: FakeOpenAI, sdk: Callable[..., Any]
) -> None:
    proxy = start_proxy()
    body = {"model": "fake-many", "messages": MESSAGES, "stream": True}
    direct = httpx.post(upstream.url + "/v1/chat/completions", json=body).content
    relayed = httpx.post(proxy.base_url + "/chat/completions", json=body, timeout=60).content
    assert relayed == direct
    text = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in sdk(proxy.base_url).chat.completions.create(**body)
    )
    expected = "".join(f"w{i} " for i in range(32_000))
    assert text == expected
    rows = proxy.wait_stored(2)
    response = rows[1]["response"]
    response = json.loads(response) if isinstance(response, str) else response
    assert response["choices"][0]["message"]["content"] == expected


def test_a_client_leaving_before_a_json_answer_is_stored_as_such(
    start_proxy: Callable[..., RunningProxy], upstream: FakeOpenAI
) -> None:
    upstream.slow_seconds = 1.0
    proxy = start_proxy()
    data = chat_request(orjson.dumps({"model": "fake-slow", "messages": MESSAGES}))
    host, port = proxy.url.removeprefix("http://").split(":")
    with capture_logs() as logs:
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(data)
            wait_for(lambda: len(upstream.requests) == 1, what="the upstream call")
        [row] = proxy.wait_stored(1)
    error = row["error"] if isinstance(row["error"], dict) else json.loads(row["error"])
    assert error["type"] == "client_error"
    assert any(e["event"].startswith("client went away") for e in logs)


@pytest.mark.slow
def test_a_stream_outliving_shutdown_is_still_recorded(
    servers: ServerThread, upstream: FakeOpenAI, tmp_path: Path
) -> None:
    """The shutdown timeout cancels a stream that will not end; its row says so."""
    from distillery.core.config import Settings
    from distillery.proxy.server import open_capture_store

    upstream.slow_seconds = 60
    settings = Settings.model_validate(
        {
            "upstream": {"url": upstream.url + "/v1"},
            "storage": {"database_url": f"sqlite:///{tmp_path / 'shutdown.db'}"},
        }
    )
    proxy = RunningProxy(servers, settings, open_capture_store(settings))
    first_chunk = threading.Event()

    def client() -> None:
        try:
            with httpx.stream(
                "POST",
                proxy.base_url + "/chat/completions",
                timeout=120,
                json={"model": "fake-slow", "messages": MESSAGES, "stream": True},
            ) as response:
                for _ in response.iter_raw():
                    first_chunk.set()
        except httpx.HTTPError:
            pass

    thread = threading.Thread(target=client)
    thread.start()
    assert first_chunk.wait(20)
    proxy.stop()  # the runner gives in-flight requests 5 s, then cancels them
    thread.join(30)
    [row] = proxy.rows()
    error = json.loads(row["error"])
    assert error["type"] == "cancelled"
    proxy.reader.close()


# -- what is stored -------------------------------------------------------------------


def test_model_names_and_card_numbers_are_redacted(
    start_proxy: Callable[..., RunningProxy], sdk: Callable[..., Any]
) -> None:
    proxy = start_proxy()
    client = sdk(proxy.base_url)
    messages = [{"role": "user", "content": "pay with 4111 1111 1111 1111 or 4111111111111111"}]
    with capture_logs() as logs:
        client.chat.completions.create(model="fake bob@example.com", messages=messages)
        [row] = proxy.wait_stored(1)
    assert row["model_requested"] == "fake [REDACTED:email]"
    request = json.loads(row["request"])
    assert request["model"] == "fake [REDACTED:email]"
    assert request["messages"][0]["content"] == "pay with [REDACTED:card] or [REDACTED:card]"
    assert "bob@example.com" not in repr(logs)


def test_the_sqlite_file_is_private(
    start_proxy: Callable[..., RunningProxy], sdk: Callable[..., Any], tmp_path: Path
) -> None:
    proxy = start_proxy(database_url=f"sqlite:///{tmp_path / 'new' / 'private.db'}")
    sdk(proxy.base_url).chat.completions.create(model="fake-model", messages=MESSAGES)
    proxy.wait_stored(1)
    for path in (tmp_path / "new").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700


def test_absolute_form_request_lines_stay_on_the_configured_upstream(
    start_proxy: Callable[..., RunningProxy], upstream: FakeOpenAI
) -> None:
    proxy = start_proxy()
    status, _, _ = raw_request(
        proxy.url,
        b"GET http://elsewhere.example/v1/models?x=1 HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n",
    )
    assert status == 200
    assert upstream.requests[-1]["path"] == "/v1/models?x=1"
