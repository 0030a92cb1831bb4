"""Long actions the dashboard starts (a Distill, an eval run): in the background, followed
by a page that polls them and opens the result when there is one.

Tasks are kept by the process that runs them; what they make (a dataset version, a
fine-tune job, an eval run) is in the store like anything else, so a reload that lands
on another worker says where to find it.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog
from aiohttp import web

from distillery.errors import DistilleryError
from distillery.ui.app import SESSION, render, url

log = structlog.get_logger()
TASKS = web.AppKey("ui_tasks", dict[str, "Task"])


@dataclass
class Task:
    id: str
    title: str
    state: str
    error: str | None = None
    done_url: str | None = None  # where the result is, once there is one
    started: float = field(default_factory=time.time)


def setup(app: web.Application) -> None:
    app[TASKS] = {}
    app.router.add_get("/tasks/{id}", task_page, name="task")


def start(
    request: web.Request, title: str, state: str, work: Callable[[Task], Awaitable[None]]
) -> web.HTTPSeeOther:
    """Run ``work`` in the background; the answer sends the browser to the task's page."""
    task = Task(secrets.token_hex(8), title, state)
    request.app[TASKS][task.id] = task

    async def run() -> None:
        try:
            await work(task)
        except DistilleryError as exc:
            task.state, task.error = "failed", str(exc)
        except Exception as exc:  # a bug: said on the page and in the log, never lost
            log.exception("dashboard task failed", task=task.title)
            task.state, task.error = "failed", f"{type(exc).__name__}: {exc}"

    asyncio.get_running_loop().create_task(run())
    return web.HTTPSeeOther(url(request, f"tasks/{task.id}"))


async def task_page(request: web.Request) -> web.StreamResponse:
    if not request[SESSION].admin:
        raise web.HTTPForbidden(text="Tasks belong to admins: sign in with an admin key.")
    task = request.app[TASKS].get(request.match_info["id"])
    if task is None:
        raise web.HTTPNotFound(
            text="No such task here (tasks live in the process that ran them); what it made, "
            "if anything, is under Datasets, Fine-tunes and Evals."
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
