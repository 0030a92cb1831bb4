"""A real ``distillery proxy`` process for tests, stopped even when the test fails.

Every process started here is remembered; the autouse fixture ``reap_proxies``
in conftest kills whatever is still running when a test ends, pass or fail.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path
from typing import ClassVar

from distillery.proxy import process


class ProxyProcess:
    def __init__(
        self, port: int, upstream_url: str, data_dir: Path, database_url: str, *extra: str
    ) -> None:
        self.port = port
        self.upstream, self.data_dir, self.database_url = upstream_url, data_dir, database_url
        self.extra = ["--log-json", *extra]
        self.args = process.command(
            port, upstream_url, data_dir=data_dir, database_url=database_url, extra=self.extra
        )
        self.log = data_dir.parent / f"proxy-{port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    running: ClassVar[list[subprocess.Popen[bytes]]] = []

    @classmethod
    def reap(cls) -> None:
        """Kill every process a test started and left running, with what it started (the
        workers of ``--workers N``, a route's judge): each runs in a process group of its
        own, and the whole group goes (killing the supervisor alone orphaned its workers)."""
        for started in cls.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(started.pid, signal.SIGKILL)
            if started.poll() is None:
                started.wait(10)
        cls.running.clear()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> ProxyProcess:
        self.process = process.start(
            self.port,
            self.upstream,
            data_dir=self.data_dir,
            database_url=self.database_url,
            extra=self.extra,
            log=self.log,
            new_session=True,
        )
        self.running.append(self.process)
        try:
            process.wait_ready(self.port, self.process)
        except process.NotReady as exc:
            raise AssertionError(f"{exc}; its log:\n{self.log.read_text()}") from None
        return self

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float = 30) -> int:
        """The exit status; a process still running after ``timeout`` fails with its log."""
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the proxy did not exit within {timeout} s; its log:\n{self.log.read_text()}"
            ) from None
