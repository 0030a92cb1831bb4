"""A ``distillery proxy`` process: started, waited for until it answers, by the tests, the
benches and the example alike (one way to start it, not five).

    proxy = process.start(8787, "http://127.0.0.1:9000/v1", database_url="sqlite:///x.db")
    process.wait_ready(8787, proxy)
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path


class NotReady(RuntimeError):
    """The process exited, or did not answer /healthz in time."""


def command(
    port: int,
    upstream: str,
    *,
    data_dir: Path | None = None,
    database_url: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line: this interpreter's ``distillery proxy`` on 127.0.0.1:PORT."""
    args = [
        sys.executable,
        "-m",
        "distillery",
        "proxy",
        "--port",
        str(port),
        "--upstream",
        upstream,
    ]
    if data_dir is not None:
        args += ["--data-dir", str(data_dir)]
    if database_url is not None:
        args += ["--database-url", database_url]
    return [*args, *extra]


def start(
    port: int,
    upstream: str,
    *,
    data_dir: Path | None = None,
    database_url: str | None = None,
    extra: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    new_session: bool = False,
) -> subprocess.Popen[bytes]:
    """Start the proxy (its output appended to ``log``, or dropped); do not wait for it.

    ``new_session``: in a process group of its own, so that whoever stops it can stop what
    it started too (its workers, a route's judge) with one signal to the group."""
    output = log.open("ab") if log is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            command(port, upstream, data_dir=data_dir, database_url=database_url, extra=extra),
            stdout=output,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            start_new_session=new_session,
        )
    finally:
        if log is not None:
            output.close()  # type: ignore[union-attr]


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """Until /healthz answers 200; :class:`NotReady` if the process exits first or the
    time runs out (its exit status said)."""
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{port}/healthz"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise NotReady(f"the proxy on port {port} exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise NotReady(f"the proxy on port {port} did not answer {url} within {timeout:g} s")
