"""Routes reloaded while the proxy serves: no request dropped, queues kept unless the
student or sizes change (in this process).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distillery.curation.judge import install_in_thread as install
from distillery.store import open_store

from fake_student import FakeStudent, ask, samples, served
from helpers import RunningProxy, ServerThread, wait_for


def test_a_reloaded_config_changes_routes_without_dropping_a_request(
    start_proxy: Callable[..., RunningProxy], servers: ServerThread, tmp_path: Path
) -> None:
    """What SIGHUP does: the config is read again; its routes take effect for new calls,
    calls in flight finish on the route they had, a config that does not load changes
    nothing."""
    from distillery.core.config import Settings
    from distillery.proxy.app import reload_routes

    student = served(FakeStudent(), servers)
    route = {"student": "tiny@student", "graders": ["exact"], "bar": 0.9}
    config: dict[str, Any] = {
        "endpoints": {"student": {"base_url": student.url + "/v1"}},
        "routes": {"support": {"match": {"app": "support"}, **route}},
    }
    current = {"config": config}

    def reload() -> Settings:
        return Settings.model_validate(current["config"])

    proxy = start_proxy(config, extensions=[install], reload=reload)
    errors: list[str] = []
    stop = threading.Event()

    def traffic() -> None:  # a client that keeps calling through the reloads
        n = 0
        while not stop.is_set():
            n += 1
            answer = ask(proxy, n, app="billing" if n % 2 else "support")
            if answer.status_code != 200:
                errors.append(answer.text)

    client = threading.Thread(target=traffic)
    client.start()
    try:
        assert ask(proxy, 1).headers["X-Distillery-Route"] == "support"
        assert "X-Distillery-Route" not in ask(proxy, 2, app="billing").headers
        current["config"] = {
            **config,
            "routes": {
                "billing": {"match": {"app": "billing"}, **route, "mode": "on", "holdout": 0}
            },
        }
        assert servers.call(reload_routes(proxy.app)) is True
        assert "X-Distillery-Route" not in ask(proxy, 3).headers
        moved = ask(proxy, 4, app="billing").headers
        assert moved["X-Distillery-Route"] == "billing"
        assert moved["X-Distillery-Served-By"] == "student"  # mode on, from the new config
        # An edit that does not load (a grader that does not exist): nothing changes.
        current["config"] = {
            **config,
            "routes": {"billing": {"match": {"app": "billing"}, **route, "graders": ["nope"]}},
        }
        assert servers.call(reload_routes(proxy.app)) is False
        assert ask(proxy, 5, app="billing").headers["X-Distillery-Route"] == "billing"
    finally:
        stop.set()
        client.join(30)
    assert errors == []
    wait_for(lambda: len(samples(proxy, "support")) >= 1, 10, "the first route's pairs")


def test_routes_reloaded_into_a_proxy_started_without_them_shadow_too(
    start_proxy: Callable[..., RunningProxy], servers: ServerThread
) -> None:
    """The judge starts with the first routes, here at a reload: their calls are routed
    and their pairs graded, with no restart."""
    from distillery.core.config import Settings
    from distillery.proxy.app import reload_routes

    student = served(FakeStudent(), servers)
    later = Settings.model_validate(
        {
            "endpoints": {"student": {"base_url": student.url + "/v1"}},
            "routes": {
                "support": {
                    "match": {"app": "support"},
                    "student": "tiny@student",
                    "graders": ["exact"],
                    "bar": 0.9,
                }
            },
        }
    )
    proxy = start_proxy({}, extensions=[install], reload=lambda: later)
    assert "X-Distillery-Route" not in ask(proxy, 1).headers
    assert servers.call(reload_routes(proxy.app)) is True
    assert ask(proxy, 2).headers["X-Distillery-Route"] == "support"
    wait_for(lambda: len(samples(proxy, "support")) == 1, 10, "the pair graded")
    assert [s["score"] for s in samples(proxy, "support")] == [1.0]
    assert len(student.requests) == 1


async def test_a_reload_keeps_a_routes_queue_unless_its_student_or_sizes_change(
    tmp_path: Path,
) -> None:
    """The judge's lanes across reloads: a new timeout or bar keeps the queue (and the pairs
    waiting in it); a new concurrency, or a route that went, does not."""
    from distillery.core.config import Settings
    from distillery.curation.judging import Runtime

    def settings(billing: bool = True, **change: Any) -> Settings:
        route = {
            "match": {"app": "support"},
            "student": "tiny@student",
            "graders": ["exact"],
            "bar": 0.9,
        }
        routes = {"support": {**route, **change}, **({"billing": route} if billing else {})}
        return Settings.model_validate(
            {"endpoints": {"student": {"base_url": "http://127.0.0.1:9/v1"}}, "routes": routes}
        )

    store = open_store(f"sqlite:///{tmp_path / 'lanes.db'}")
    runtime = Runtime(settings(), store, lambda route, outcome, record_id: None)
    await runtime.start()
    try:
        first = runtime.lanes["support"].queue
        runtime.reconfigure(settings(timeout=3, bar=0.5))
        assert runtime.lanes["support"].queue is first
        assert runtime.lanes["support"].timeout == 3
        runtime.reconfigure(settings(timeout=3, concurrency=2))
        assert runtime.lanes["support"].queue is not first
        assert len(runtime.lanes["support"].workers) == 2
        billing = runtime.lanes["billing"].workers
        runtime.reconfigure(settings(billing=False, timeout=3, concurrency=2))
        assert "billing" not in runtime.lanes
        # The removed route's workers end, cancelled (waited on, not given a moment).
        done, pending = await asyncio.wait(billing, timeout=10)
        assert not pending and all(task.cancelled() for task in done)
    finally:
        await runtime.stop()
        store.close()
