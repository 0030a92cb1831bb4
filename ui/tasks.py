"""Long actions the dashboard starts (a Distill, an eval run): in the background, followed
by a page that polls them and opens the result when there is one.

A task runs in the worker that started it and writes where it stands to
``<data dir>/ui-tasks/<id>.json`` at every step, so a reload that lands on another
worker of the same proxy still follows it.  What a task makes (a dataset version, a
fine-tune job, an eval run) is in the store like anything else.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from distillery.errors import DistilleryError
from distillery.ui.app import SESSION, SETTINGS, render, url

log = structlog.get_logger()
TASKS = web.AppKey("ui_tasks", dict[str, "Task"])
TASK_ID = re.compile(r"[0-9a-f]{16}")


@dataclass
class Task:
    id: str
    title: str
    state: str
    error: str | None = None
    done_url: str | None = None  # where the result is, once there is one
    started: float = field(default_factory=time.time)
    folder: Path | None = None

    def update(self, **changes: Any) -> None:
        """Change the task and write it down (atomically: readers see one state or the next)."""
        for name, value in changes.items():
            setattr(self, name, value)
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            record = {k: v for k, v in asdict(self).items() if k != "folder"}
            temporary = self.folder / f".{self.id}.json"
            temporary.write_text(json.dumps(record))
            temporary.replace(self.folder / f"{self.id}.json")


FOLDER = web.AppKey("ui_task_folder", Path)


def setup(app: web.Application) -> None:
    app[TASKS] = {}
    app[FOLDER] = Path(app[SETTINGS].storage.resolved_data_dir()) / "ui-tasks"
    app.router.add_get("/tasks/{id}", task_page, name="task")


def _load(app: web.Application, task_id: str) -> Task | None:
    """A task this worker runs, or one another worker wrote down."""
    if task_id in app[TASKS]:
        return app[TASKS][task_id]
    if not TASK_ID.fullmatch(task_id):
        return None
    try:
        record = json.loads((app[FOLDER] / f"{task_id}.json").read_text())
    except (OSError, ValueError):
        return None
    return Task(**record)


def start(
    request: web.Request, title: str, state: str, work: Callable[[Task], Awaitable[None]]
) -> web.HTTPSeeOther:
    """Run ``work`` in the background; the answer sends the browser to the task's page."""
    task = Task(secrets.token_hex(8), title, state, folder=request.app[FOLDER])
    request.app[TASKS][task.id] = task
    task.update()

    async def run() -> None:
        try:
            await work(task)
        except DistilleryError as exc:
            task.update(state="failed", error=str(exc))
        except Exception as exc:  # a bug: said on the page and in the log, never lost
            log.exception("dashboard task failed", task=task.title)
            task.update(state="failed", error=f"{type(exc).__name__}: {exc}")

    asyncio.get_running_loop().create_task(run())
    return web.HTTPSeeOther(url(request, f"tasks/{task.id}"))


async def task_page(request: web.Request) -> web.StreamResponse:
    if not request[SESSION].admin:
        raise web.HTTPForbidden(text="Tasks belong to admins: sign in with an admin key.")
    task = _load(request.app, request.match_info["id"])
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
        elapsed=round(time.time() - task.started),
    )
