"""Stopping: a call still running when ``proxy.shutdown_timeout`` runs out is cut then --
not at twice the timeout, as aiohttp alone does -- and recorded as cancelled; the
deployments give the proxy longer than that to stop."""

from __future__ import annotations

import configparser
import json
import signal
import sqlite3
import threading
import time
import tomllib
from pathlib import Path

import httpx
import pytest

from fake_openai import FakeOpenAI
from proxy_process import ProxyProcess

DEPLOY = Path(__file__).parent.parent / "deploy"
TIMEOUT = 4.0


@pytest.mark.slow
def test_a_stream_longer_than_the_shutdown_timeout_is_cut_at_the_timeout(
    upstream: FakeOpenAI, tmp_path: Path, unused_tcp_port: int
) -> None:
    upstream.slow_seconds = 120  # a chunk every 24 s
    config = tmp_path / "distillery.toml"
    config.write_text(f"[proxy]\nshutdown_timeout = {TIMEOUT}\n")
    database = tmp_path / "db.sqlite"
    proxy = ProxyProcess(
        unused_tcp_port,
        upstream.url + "/v1",
        tmp_path / "data",
        f"sqlite:///{database}",
        "--config",
        str(config),
    ).start()
    first, ended = threading.Event(), threading.Event()
    received: list[bytes] = []

    def stream() -> None:
        body = {
            "model": "fake-slow",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
        }
        try:
            with httpx.stream(
                "POST", proxy.base_url + "/chat/completions", json=body, timeout=60
            ) as response:
                for data in response.iter_raw():
                    received.append(data)
                    first.set()
        except httpx.HTTPError:
            pass  # cut: what the test is for
        finally:
            ended.set()

    client = threading.Thread(target=stream, daemon=True)
    client.start()
    assert first.wait(20), "the stream never started"
    stopped = time.monotonic()
    proxy.signal(signal.SIGTERM)
    assert ended.wait(30), "the stream was never cut"
    cut_after = time.monotonic() - stopped
    assert proxy.wait(30) == 0
    # The whole grace, and no more than it (aiohttp alone cut it at twice the timeout).
    assert TIMEOUT - 0.1 <= cut_after < TIMEOUT * 1.75, cut_after
    assert b"data: [DONE]" not in b"".join(received)
    with sqlite3.connect(database) as lite:
        [(error,)] = lite.execute("SELECT error FROM completions").fetchall()
    assert json.loads(error)["type"] == "cancelled"


def test_the_deployments_wait_longer_than_the_shutdown_timeout() -> None:
    """systemd, Kubernetes and compose stop the proxy no sooner than its config lets
    in-flight calls finish, plus time to flush the spool."""
    shipped = tomllib.loads((DEPLOY / "docker" / "distillery.toml").read_text())
    timeout = shipped["proxy"]["shutdown_timeout"]
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(DEPLOY / "systemd" / "distillery-proxy.service")
    assert float(unit["Service"]["TimeoutStopSec"]) >= timeout + 10
    k8s = (DEPLOY / "k8s" / "deployment.yaml").read_text()
    grace = int(k8s.split("terminationGracePeriodSeconds:")[1].split()[0])
    configmap = (DEPLOY / "k8s" / "configmap.yaml").read_text()
    assert f"shutdown_timeout = {timeout}" in configmap
    assert grace >= timeout + 10
    compose = (DEPLOY / "docker" / "compose.yaml").read_text()
    assert int(compose.split("stop_grace_period:")[1].split()[0].rstrip("s")) >= timeout + 10
