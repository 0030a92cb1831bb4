"""Distill from the dashboard: the calls a filter selects -> a dataset version -> a fine-tune.

The dialog is the completions filter plus the `dataset build` rules that matter and
the fine-tune settings.  What the backend would refuse is refused before anything
starts.  Run builds the version in a separate process (a build is CPU work: in the
proxy's process it would hold the GIL the proxy's requests need), then starts the
job with ``start_job``, the same call as `finetune create`; the task page follows it
and hands over to the job's page.  Tasks are kept by the process that runs them;
the dataset version and the job they make are in the store like any other.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from distillery.core.errors import DistilleryError
from distillery.core.prices import AS_OF as PRICES_AS_OF
from distillery.core.prices import training_cost
from distillery.curation.datasets.build import (
    BuildOptions,
    BuildResult,
    Rules,
    build_in_process,
    check_name,
)
from distillery.curation.datasets.options import learnable
from distillery.curation.endpoints import Endpoint
from distillery.curation.training.backends import (
    LIMITS,
    BackendContext,
    Hyperparameters,
    JobSpec,
    check_model,
    new_job_id,
)
from distillery.curation.training.jobs import start_job
from distillery.curation.training.openai_api import MIN_EXAMPLES
from distillery.curation.training.registry import names, open_backend
from distillery.curation.training.trainer import estimate_epochs
from distillery.store import query
from distillery.ui import tasks
from distillery.ui.base import SESSION, SETTINGS, STORE, in_thread, render, url
from distillery.ui.pages import FILTER_FIELDS, page_filters
from distillery.ui.tasks import Task

POOL = web.AppKey("distill_pool", concurrent.futures.ProcessPoolExecutor)
TRAINER_EPOCHS_WAIT = 15.0  # seconds: the pool's first use starts a process and loads torch


def setup(app: web.Application) -> None:
    app.router.add_get("/distill", dialog, name="distill")
    app.router.add_post("/distill", run, name="distill_run")
    app.router.add_post("/distill/estimate", estimate, name="distill_estimate")
    app.cleanup_ctx.append(_pool)


async def _pool(app: web.Application) -> Any:
    # One build at a time, in a process of its own (spawned: no copy of the proxy's state).
    pool = concurrent.futures.ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("spawn")
    )
    app[POOL] = pool
    yield
    pool.shutdown(wait=False, cancel_futures=True)


def _admin(request: web.Request) -> None:
    if not request[SESSION].admin:
        raise web.HTTPForbidden(
            text="A dataset is built from every key's traffic: sign in with an admin key."
        )


@dataclass
class Estimate:
    calls: int
    tokens: int


async def _estimate(request: web.Request, filters: query.Filters) -> Estimate:
    calls, tokens = await in_thread(request, lambda store: query.totals(store, filters))
    return Estimate(calls, tokens)


def _values(source: Any) -> dict[str, str]:
    keys = (
        "name",
        "val_fraction",
        "min_tokens",
        "max_tokens",
        "backend",
        "base_model",
        "epochs",
        "batch_size",
        "learning_rate",
        "learning_rate_multiplier",
        "lora_r",
    )
    flags = ("no_exact_dedupe", "no_near_dedupe", "include_refusals", "strip_system_prompt")
    values = {k: str(source.get(k) or "") for k in keys}
    values.update({k: "on" if source.get(k) else "" for k in flags})
    return values


async def dialog(request: web.Request, error: str | None = None, form: Any = None) -> web.Response:
    _admin(request)
    try:
        filters = page_filters(request)
    except DistilleryError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    estimate = await _estimate(request, filters)
    kept = [(k, v) for k, v in request.query.items() if k in FILTER_FIELDS and v]
    values = _values(form or {"val_fraction": "0.1", "max_tokens": "", "backend": "openai"})
    return render(
        request,
        "distill.html",
        status=400 if error else 200,
        error=error,
        estimate=estimate,
        kept=kept,
        query=urlencode(kept),
        values=values,
        backends=names(),
        min_examples=MIN_EXAMPLES,
    )


async def estimate(request: web.Request) -> web.Response:
    """What the dialog's settings would cost: the selection's tokens as the upstream counted
    them, times the epochs, at the base model's training price (when it has one)."""
    _admin(request)
    form = await request.post()
    found = await _estimate(request, page_filters(request))
    try:
        epochs = _number(form, "epochs", int, 1)
    except DistilleryError:
        epochs = None
    base_model = str(form.get("base_model") or "").strip()
    fewest = most = epochs or 3
    trainers = None  # the local trainer's epochs for a student directory, when it can tell
    if epochs is None and form.get("backend") == "local" and Path(base_model).is_dir():
        trainers = await _trainer_epochs(request, base_model, found.calls, form)
        if trainers is not None:
            fewest, most = trainers
    trained = found.tokens * most
    price = (
        training_cost(base_model, trained, request.app[SETTINGS].prices)
        if base_model and form.get("backend") == "openai"
        else None
    )
    return render(
        request,
        "_estimate.html",
        estimate=found,
        epochs=epochs,
        fewest=fewest,
        most=most,
        trainers=trainers is not None,
        trained=trained,
        price=price,
        base_model=base_model,
        backend=str(form.get("backend") or ""),
        prices_as_of=PRICES_AS_OF,
    )


async def _trainer_epochs(
    request: web.Request, student: str, examples: int, form: Any
) -> tuple[int, int] | None:
    """The fewest and most epochs the local trainer runs for ``student`` (as a job would
    choose), worked out in the pool's process (it loads torch); None when it cannot tell."""
    try:
        split = _number(form, "val_fraction", float, 0)
    except DistilleryError:
        split = None
    split = 0.1 if split is None else split
    work = asyncio.get_running_loop().run_in_executor(
        request.app[POOL], estimate_epochs, student, max(examples, 1), split > 0
    )
    try:
        # The pool builds one dataset at a time: behind a build, the flat guess answers.
        return await asyncio.wait_for(work, TRAINER_EPOCHS_WAIT)
    except Exception:  # no training extra, not a model, busy: the flat guess, said as one
        return None


def _number(form: Any, name: str, kind: type, low: float | None = None) -> Any:
    raw = form.get(name)
    if raw in (None, ""):
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise DistilleryError(f"{name.replace('_', ' ')} must be a number, not {raw!r}.") from None
    if low is not None and value < low:
        raise DistilleryError(f"{name.replace('_', ' ')} must be at least {low}.")
    return value


async def run(request: web.Request) -> web.StreamResponse:
    """Check everything the backend would refuse, then build and start in the background."""
    _admin(request)
    form = await request.post()
    filters = page_filters(request)
    settings = request.app[SETTINGS]
    try:
        name = str(form.get("name") or "").strip()
        check_name(name)
        backend_name = str(form.get("backend") or "")
        base_model = str(form.get("base_model") or "").strip()
        val_fraction = _number(form, "val_fraction", float, 0) or 0.0
        if val_fraction >= 1:
            raise DistilleryError("validation fraction must be below 1.")
        hyper = Hyperparameters(
            **{
                name: _number(form, name, LIMITS[name].kind)
                for name in ("epochs", "batch_size", "learning_rate", "learning_rate_multiplier")
            },
            lora_r=_number(form, "lora_r", int),
        )
        check_model(base_model)
        rules = Rules(
            no_refusals=not form.get("include_refusals"),
            min_tokens=_number(form, "min_tokens", int, 0) or 1,
            max_tokens=_number(form, "max_tokens", int, 1) or Rules().max_tokens,
        )
        context = BackendContext(
            settings.storage.resolved_data_dir(), Endpoint.from_env("fine-tuning")
        )
        estimate = await _estimate(request, filters)
        if backend_name == "openai" and estimate.calls < MIN_EXAMPLES:
            raise DistilleryError(
                f"The filter selects {estimate.calls} calls; OpenAI's fine-tuning API needs at "
                f"least {MIN_EXAMPLES} examples. Widen the filter or capture more calls."
            )
        # Last: once open, the backend is the task's to close.
        backend = await in_thread(request, lambda _: open_backend(backend_name, context))
    except DistilleryError as exc:
        return await dialog(request, str(exc), form)
    options = BuildOptions(
        name=name,
        filters=learnable(replace(filters, tenants=None)),
        rules=rules,
        exact_dedupe=not form.get("no_exact_dedupe"),
        near_dedupe=not form.get("no_near_dedupe"),
        strip_system_prompt=bool(form.get("strip_system_prompt")),
        val_fraction=val_fraction,
        incremental=True,
        redact_defaults=settings.redact.defaults,
        redact_patterns=tuple((p.name, p.pattern) for p in settings.redact.patterns),
        epochs=hyper.epochs or 3,
        # A local student's own trainer says how many epochs, unless the form did.
        student=base_model
        if backend_name == "local" and hyper.epochs is None and Path(base_model).is_dir()
        else None,
    )
    app, prefix = request.app, url(request)

    async def work(task: Task) -> None:
        try:
            job_id = await _work(app, task, name, options, backend, base_model, hyper)
        finally:
            backend.close()
        await task.update(done_url=f"{prefix}jobs/{job_id}")

    raise await tasks.start(request, f"Distilling {name}", "building the dataset", work)


async def _work(
    app: web.Application,
    task: Task,
    name: str,
    options: BuildOptions,
    backend: Any,
    base_model: str,
    hyper: Hyperparameters,
) -> str:
    """Build in the pool's process, then start the job; returns the job's id."""
    settings, store = app[SETTINGS], app[STORE]
    built: BuildResult = await asyncio.get_running_loop().run_in_executor(
        app[POOL],
        build_in_process,
        store.connect_url,
        options,
        Path(settings.storage.resolved_data_dir()),
    )
    if built.version is None:
        raise DistilleryError(built.message)
    await task.update(state="starting the fine-tune")
    spec = JobSpec(new_job_id(), built.version, base_model, hyper, suffix=name[:40])
    job = await asyncio.to_thread(start_job, store, backend, spec)
    return job["id"]
