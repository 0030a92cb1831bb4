"""Write tests/data/streams-v0005.sqlite with the release that had the stream bug.

The migration test (tests/test_migrations.py) upgrades a database that the previous
version wrote, not one this version imitates.  How it was made:

    git worktree add /tmp/old de4973a     # schema 0005, the assembler that refused "choices": []
    mkdir -p /tmp/oldpkg && ln -s /tmp/old /tmp/oldpkg/distillery
    PYTHONPATH=/tmp/oldpkg:/tmp/old/tests:tests python scripts/write_v0005_database.py out.sqlite

It replays the recorded OpenAI corpus (tests/corpus) through that version's proxy: every
stream as recorded and eight on the default path (the proxy asks for usage), six answers
that were not streamed (four of them errors), a stream with a chunk whose choices is a
string, and one with an error event.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import openai
import orjson


def main(out: Path) -> None:
    os.environ["DISTILLERY_DATA_DIR"] = tempfile.mkdtemp()
    import distillery.proxy.stream
    from distillery.core.config import Settings
    from distillery.proxy.server import open_capture_store

    from corpus import Exchange, Replay, call, exchanges
    from helpers import RunningProxy, ServerThread

    assert "or ()" in inspect.getsource(distillery.proxy.stream), "not the old version"
    servers = ServerThread()
    replay = Replay()
    replay.url, _ = servers.serve(replay.app)
    database = {"database_url": f"sqlite:///{out}"}
    settings = Settings.model_validate(
        {"upstream": {"url": replay.url + "/v1"}, "storage": database}
    )
    proxy = RunningProxy(servers, settings, open_capture_store(settings))
    client = openai.OpenAI(base_url=proxy.base_url, api_key="sk-old-user", max_retries=0)

    def ask(answer: Exchange, request: dict[str, Any]) -> None:
        replay.answer = answer
        call(client, request)

    corpus = exchanges()
    streams = [e for e in corpus if e.stream]
    made = [
        *((e, e.request) for e in streams),
        *((e, {k: v for k, v in e.request.items() if k != "stream_options"}) for e in streams[:8]),
        *((e, e.request) for e in [e for e in corpus if not e.stream][:6]),
    ]
    first = streams[0]
    events = first.body.split(b"\n\n")
    bad = json.loads(events[1][6:])
    bad["choices"] = "garbage"
    broken = b"\n\n".join([events[0], b"data: " + orjson.dumps(bad), *events[2:]])
    error = b'data: {"error":{"message":"The server had an error","type":"server_error"}}'
    failed = b"\n\n".join([*events[:3], error, b""])
    for name, body in (("broken-choices", broken), ("error-event", failed)):
        made.append((Exchange(name, first.request, 200, first.content_type, body), first.request))
    for answer, request in made:
        ask(answer, request)
    proxy.wait_stored(len(made), timeout=30)
    proxy.stop()
    proxy.reader.close()
    servers.close()
    print(len(made), "calls written to", out)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
