"""Long actions the dashboard starts (a Distill, an eval run): in the background, followed
by a page that polls them and opens the result when there is one.

A task runs in the process that started it and writes where it stands to the
database (``store/dashboard.py``) at every step and every few seconds while it
runs, so a reload that lands on another worker, or on another host of the same
database, still follows it, and one whose process died (a restart, a crash) says
so instead of running forever.  What a task makes (a dataset version, a fine-tune
job, an eval run) is in the store like anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from aiohttp import web

from distillery.core.errors import DistilleryError
from distillery.store import dashboard
from distillery.store.db import Store
from distillery.ui.base import SESSION, STORE, in_thread, render, url

log = structlog.get_logger()
TASK_ID = re.compile(r"[0-9a-f]{16}")
HEARTBEAT_S = 5.0  # how often a running task says it is alive
STOPPED_AFTER_S = 30.0  # silent this long: its process is gone
KEEP_DAYS = 7  # a task's page is kept this long after its last word
STOPPED = (
    "stopped: the process running it went away (a restart or a crash) before it finished; "
    "what it made so far is under Datasets, Fine-tunes and Evals"
)


@dataclass
class Task:
    id: str
    title: str
    state: str
    error: str | None = None
    done_url: str | None = None  # where the result is, once there is one
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    heartbeat_at: datetime | None = None
    store: Store | None = field(default=None, repr=False)
    # One write at a time, in order: a heartbeat never writes over the final state.
    _writing: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    @property
    def finished(self) -> bool:
        return self.done_url is not None or self.state == "failed"

    async def update(self, **changes: Any) -> None:
        """Change the task and write it down (off the event loop)."""
        async with self._writing:
            for name, value in changes.items():
                setattr(self, name, value)
            if self.store is not None:
                await asyncio.to_thread(dashboard.save_task, self.store, self.row())

    def row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "state": self.state,
            "error": self.error,
            "done_url": self.done_url,
            "started_at": self.started_at,
        }


def setup(app: web.Application) -> None:
    app.router.add_get("/tasks/{id}", task_page, name="task")


def _load(store: Store, task_id: str) -> Task | None:
    """The task as written down; one silent for too long has stopped."""
    if not TASK_ID.fullmatch(task_id):
        return None
    record = dashboard.load_task(store, task_id)
    if record is None:
        return None
    task = Task(**record)
    assert task.heartbeat_at is not None
    silent = (datetime.now(UTC) - task.heartbeat_at).total_seconds()
    if not task.finished and silent > STOPPED_AFTER_S:
        task.state, task.error = "failed", STOPPED
    return task


RUNNING: set[asyncio.Task[None]] = set()  # held, so that none is collected mid-run


async def start(
    request: web.Request, title: str, state: str, work: Callable[[Task], Awaitable[None]]
) -> web.HTTPSeeOther:
    """Run ``work`` in the background; the answer sends the browser to the task's page
    (written down first, so that the page finds it)."""
    task = Task(secrets.token_hex(8), title, state, store=request.app[STORE])
    await task.update()
    week_ago = task.started_at - timedelta(days=KEEP_DAYS)
    await in_thread(request, lambda store: dashboard.forget_tasks(store, week_ago))

    async def beat() -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            await task.update()

    async def run() -> None:
        beating = asyncio.create_task(beat())
        try:
            await work(task)
        except DistilleryError as exc:
            await task.update(state="failed", error=str(exc))
        except Exception as exc:  # a bug: said on the page and in the log, never lost
            log.exception("dashboard task failed", task=task.title)
            await task.update(state="failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating

    running = asyncio.get_running_loop().create_task(run())
    RUNNING.add(running)
    running.add_done_callback(RUNNING.discard)
    return web.HTTPSeeOther(url(request, f"tasks/{task.id}"))


async def task_page(request: web.Request) -> web.StreamResponse:
    if not request[SESSION].admin:
        raise web.HTTPForbidden(text="Tasks belong to admins: sign in with an admin key.")
    task = await in_thread(request, lambda store: _load(store, request.match_info["id"]))
    if task is None:
        raise web.HTTPNotFound(
            text="No such task. What it made, if anything, is under Datasets, Fine-tunes and Evals."
        )
    if task.done_url is not None:
        if request.headers.get("HX-Request"):
            return web.Response(headers={"HX-Redirect": task.done_url})
        raise web.HTTPSeeOther(task.done_url)
    return render(
        request,
        "_task.html" if request.headers.get("HX-Request") else "task.html",
        task=task,
        elapsed=round(time.time() - task.started_at.timestamp()),
    )
