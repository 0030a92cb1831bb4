"""A real ``distillery proxy`` process for tests, stopped even when the test fails.

Every process started here is remembered; the autouse fixture ``reap_proxies``
in conftest kills whatever is still running when a test ends, pass or fail.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import httpx

from helpers import wait_for


class ProxyProcess:
    def __init__(
        self, port: int, upstream_url: str, data_dir: Path, database_url: str, *extra: str
    ) -> None:
        self.port = port
        self.args = [
            sys.executable,
            "-m",
            "distillery",
            "proxy",
            "--port",
            str(port),
            "--upstream",
            upstream_url,
            "--data-dir",
            str(data_dir),
            "--database-url",
            database_url,
            "--log-json",
            *extra,
        ]
        self.log = data_dir.parent / f"proxy-{port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    running: ClassVar[list[subprocess.Popen[bytes]]] = []

    @classmethod
    def reap(cls) -> None:
        """Kill every process a test started and left running, with what it started (the
        workers of ``--workers N``, a route's judge): each runs in a process group of its
        own, and the whole group goes (killing the supervisor alone orphaned its workers)."""
        for process in cls.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            if process.poll() is None:
                process.wait(10)
        cls.running.clear()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> ProxyProcess:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.running.append(self.process)

        def ready() -> bool:
            assert self.process is not None and self.process.poll() is None, self.log.read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{self.port}/healthz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout=20, what="proxy process to listen")
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
