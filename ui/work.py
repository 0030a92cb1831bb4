"""The dashboard's pages for datasets, fine-tune jobs and eval runs (admins only).

Datasets, jobs and runs are built from every tenant's traffic and belong to no
tenant, so only an admin key (or the open single-user dashboard) sees them.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp import web

from distillery.core.errors import DistilleryError
from distillery.curation.datasets.manifest import Manifest, describe
from distillery.curation.endpoints import Endpoint, configured
from distillery.curation.evals.evaluate import result_rows, with_role
from distillery.curation.evals.generate import parse_candidates
from distillery.curation.evals.graders import BUILTIN, load_all
from distillery.curation.evals.report import bars, compare, disagreements
from distillery.curation.evals.request import EvalRequest, Source
from distillery.curation.evals.request import run as run_eval
from distillery.curation.training import jobs
from distillery.curation.training.backends import TERMINAL, BackendContext, JobEvent
from distillery.curation.training.registry import open_backend
from distillery.store import Store, datasets, evals, finetunes
from distillery.store.records import (
    DatasetVersionRecord,
    EvalSampleRecord,
    FineTuneJobRecord,
)
from distillery.ui import tasks
from distillery.ui.base import SETTINGS, STORE, admin_only, in_thread, render, url
from distillery.ui.charts import lines
from distillery.ui.tasks import Task

SPLITS = {"train.jsonl", "val.jsonl"}
DISAGREEMENTS = 50  # items shown where the candidates disagree


def add_routes(app: web.Application) -> None:
    app.router.add_get("/datasets", dataset_list, name="datasets")
    app.router.add_get("/datasets/{name}", dataset_versions, name="dataset")
    app.router.add_get("/datasets/{name}/{version:\\d+}", dataset_version, name="version")
    app.router.add_get("/datasets/{name}/{version:\\d+}/{file}", dataset_file, name="dataset_file")
    app.router.add_get("/jobs", job_list, name="jobs")
    app.router.add_get("/jobs/{id}", job_page, name="job")
    app.router.add_post("/jobs/{id}/refresh", job_refresh, name="job_refresh")
    app.router.add_get("/evals", eval_list, name="evals")
    app.router.add_get("/evals/new", eval_form, name="eval_form")
    app.router.add_post("/evals/new", eval_start, name="eval_start")
    app.router.add_get("/evals/compare", eval_compare, name="eval_compare")
    app.router.add_get("/evals/{id}", eval_page, name="eval")


def _admin(request: web.Request) -> None:
    admin_only(request, "Datasets, fine-tunes and evals are built from every key's traffic")


# -- datasets -------------------------------------------------------------------------


async def dataset_list(request: web.Request) -> web.Response:
    _admin(request)
    rows = await in_thread(request, datasets.list_latest)
    return render(request, "datasets.html", rows=rows)


async def dataset_versions(request: web.Request) -> web.Response:
    _admin(request)
    name = request.match_info["name"]
    rows = await in_thread(request, lambda store: datasets.versions(store, name))
    if not rows:
        raise web.HTTPNotFound(text=f"No dataset {name!r}.")
    return render(request, "dataset.html", name=name, rows=rows)


async def _version(request: web.Request) -> DatasetVersionRecord:
    name, number = request.match_info["name"], int(request.match_info["version"])
    found = await in_thread(request, lambda store: datasets.get(store, name, number))
    if found is None:
        raise web.HTTPNotFound(text=f"No version {number} of dataset {name!r}.")
    return found


async def dataset_version(request: web.Request) -> web.Response:
    _admin(request)
    version = await _version(request)

    def diff(store: Store) -> dict[str, int] | None:
        """Examples added and removed since the version before, if there is one."""
        before = datasets.get(store, version["name"], version["version"] - 1)
        if before is None:
            return None
        old = datasets.example_ids(store, before["id"])
        new = datasets.example_ids(store, version["id"])
        return {"added": len(new.keys() - old.keys()), "removed": len(old.keys() - new.keys())}

    changes = await in_thread(request, diff)
    return render(
        request,
        "version.html",
        version=version,
        lines=describe(Manifest.of(version)),
        changes=changes,
    )


async def dataset_file(request: web.Request) -> web.StreamResponse:
    _admin(request)
    version = await _version(request)
    name = request.match_info["file"]
    if name not in SPLITS:
        raise web.HTTPNotFound(text="Only train.jsonl and val.jsonl can be downloaded.")
    path = Path(version["path"]) / name
    if not path.exists():
        raise web.HTTPNotFound(text=f"{path} is gone (was the data dir moved?).")
    download = f"{version['name']}-v{version['version']}-{name}"
    return web.FileResponse(
        path,
        headers={
            "Content-Disposition": f'attachment; filename="{download}"',
            "Content-Type": "application/x-ndjson",
        },
    )


# -- fine-tune jobs -------------------------------------------------------------------


async def job_list(request: web.Request) -> web.Response:
    _admin(request)
    rows = await in_thread(request, lambda store: finetunes.list_jobs(store, 100))
    return render(request, "jobs.html", rows=rows)


async def _job(request: web.Request) -> FineTuneJobRecord:
    ref = request.match_info["id"]
    found = await in_thread(request, lambda store: finetunes.get(store, ref))
    if found is None:
        raise web.HTTPNotFound(text=f"No fine-tune job {ref!r}.")
    return found


async def job_page(request: web.Request) -> web.Response:
    _admin(request)
    return _show_job(request, await _job(request), [], None)


def _show_job(
    request: web.Request, job: FineTuneJobRecord, events: list[JobEvent], error: str | None
) -> web.Response:
    fragment = bool(request.headers.get("HX-Request"))
    return render(
        request,
        "_job.html" if fragment else "job.html",
        fragment=fragment,
        job=job,
        events=events,
        error=error,
        losses=_losses(events),
        loss_chart=_loss_chart(events),
        checkpoints=(job["metrics"] or {}).get("checkpoints") or [],
        active=job["status"] not in TERMINAL,
    )


async def job_refresh(request: web.Request) -> web.Response:
    """Ask the job's backend where it stands (the page polls this while it runs)."""
    _admin(request)
    job = await _job(request)
    settings = request.app[SETTINGS]

    def work(store: Store) -> tuple[FineTuneJobRecord, list[JobEvent]]:
        context = BackendContext(
            Path(settings.storage.resolved_data_dir()),
            Endpoint.from_env("fine-tuning", job["base_url"]),
        )
        backend = open_backend(job["backend"], context)
        try:
            fresh = jobs.refresh(store, job, backend)
            return fresh, backend.events(fresh)
        finally:
            backend.close()

    try:
        fresh, events = await in_thread(request, work)
    except DistilleryError as exc:
        return _show_job(request, job, [], f"Could not refresh: {exc}")
    return _show_job(request, fresh, events, None)


def _loss_chart(events: list[JobEvent]) -> str:
    """Each loss the events report, over steps (or epochs when there are no steps)."""

    series: dict[str, list[tuple[float, float | None]]] = {}
    for event in events:
        data = event["data"] or {}
        x = data.get("step", data.get("epoch"))
        if not isinstance(x, (int, float)):
            continue
        for key, value in data.items():
            if "loss" in key and isinstance(value, (int, float)):
                series.setdefault(key, []).append((float(x), float(value)))
    return lines(series)


def _losses(events: list[JobEvent]) -> list[dict[str, Any]]:
    """Steps with a loss, for the table of training and validation loss."""
    rows = []
    for event in events:
        data = event["data"] or {}
        if any("loss" in key for key in data):
            rows.append({k: v for k, v in data.items() if "loss" in k or k in ("step", "epoch")})
    return rows


# -- eval runs ------------------------------------------------------------------------


async def eval_list(request: web.Request) -> web.Response:
    _admin(request)
    rows = await in_thread(request, lambda store: evals.list_runs(store, 100))
    return render(request, "evals.html", rows=rows)


ITEMS_PER_PAGE = 25


async def eval_page(request: web.Request) -> web.Response:
    """A run's scores, and its items: each prompt, its reference, and every candidate's
    output with each grader's verdict (where the candidates disagree, or all of them)."""
    _admin(request)
    ref = request.match_info["id"]
    run = await in_thread(request, lambda store: evals.get_run(store, ref))
    if run is None:
        raise web.HTTPNotFound(text=f"No eval run {ref!r}.")
    samples = await in_thread(request, lambda store: evals.samples(store, ref))
    stored_items = await in_thread(request, lambda store: evals.items(store, ref))
    summary = run["summary"]
    graders = sorted({g for c in summary["candidates"].values() for g in c["graders"]})
    split = disagreements(samples, graders)
    show = request.query.get("show") or ("disagree" if split else "all")
    if show == "all":
        by_item: dict[int, dict[str, EvalSampleRecord]] = {}
        for sample in samples:
            by_item.setdefault(sample["item"], {})[sample["candidate"]] = sample
        chosen = sorted(by_item.items())
    else:
        chosen = split
    try:
        page = max(1, int(request.query.get("page") or 1))
    except ValueError:
        raise web.HTTPBadRequest(text="page must be a number.") from None
    pages = max(1, -(-len(chosen) // ITEMS_PER_PAGE))
    shown = chosen[(page - 1) * ITEMS_PER_PAGE : page * ITEMS_PER_PAGE]
    others = await in_thread(request, lambda store: evals.list_runs(store, 50))
    return render(
        request,
        "eval.html",
        run=run,
        rows=result_rows(summary),
        charts=[(g, bars(g, summary["candidates"])) for g in graders],
        tuned=with_role(summary, "tuned"),
        labels=list(summary["candidates"]),
        graders=graders,
        items=stored_items,
        shown=shown,
        show=show,
        page=page,
        pages=pages,
        matching=len(chosen),
        disagreeing=len(split),
        graded=len({sample["item"] for sample in samples}),
        others=[r["id"] for r in others if r["id"] != ref],
    )


async def eval_compare(request: web.Request) -> web.Response:
    """Two runs compared: each candidate's score per grader in both, and every item whose
    verdict changed, with its prompt and both answers."""
    _admin(request)
    a_id, b_id = request.query.get("a", ""), request.query.get("b", "")

    def load(store: Store) -> tuple[Any, ...]:
        return tuple(
            (evals.get_run(store, ref), evals.samples(store, ref), evals.items(store, ref))
            for ref in (a_id, b_id)
        )

    (a, a_samples, _), (b, b_samples, b_items) = await in_thread(request, load)
    for ref, run in ((a_id, a), (b_id, b)):
        if run is None:
            raise web.HTTPNotFound(text=f"No eval run {ref!r}: pick two runs from the list.")
    scores, changed = compare(a["summary"], b["summary"], a_samples, b_samples)
    prompts = {item["item_key"]: item for item in b_items.values()}
    return render(
        request,
        "eval_compare.html",
        a=a,
        b=b,
        scores=scores,
        changed=changed[:DISAGREEMENTS],
        changed_count=len(changed),
        prompts=prompts,
    )


# -- a new eval run -------------------------------------------------------------------


async def eval_form(
    request: web.Request, error: str | None = None, values: dict[str, str] | None = None
) -> web.Response:
    """Choose what to grade (a dataset version), the candidates (fine-tuned ones too: any
    model at any configured endpoint) and the graders."""
    _admin(request)
    versions = await in_thread(request, datasets.list_latest)
    jobs_ = await in_thread(request, lambda store: finetunes.list_jobs(store, 20))
    tuned = [j["fine_tuned_model"] for j in jobs_ if j["fine_tuned_model"]]
    return render(
        request,
        "eval_form.html",
        status=400 if error else 200,
        error=error,
        versions=versions,
        endpoints=sorted(request.app[SETTINGS].endpoints),
        tuned=tuned,
        graders=list(BUILTIN),
        values=values or {"split": "val", "limit": "50", "graders": "exact"},
    )


async def eval_start(request: web.Request) -> web.StreamResponse:
    """Everything checked first (source, candidates and their keys, graders), then the run
    goes to the background; the task page opens the run when it is stored."""
    _admin(request)
    form = await request.post()
    values = {k: str(v) for k, v in form.items() if k != "csrf"}
    values["graders"] = " ".join(str(g) for g in form.getall("grader", []))
    settings = request.app[SETTINGS]
    try:
        ref = values.get("dataset", "")
        name, _, number = ref.partition("@")
        version = await in_thread(
            request, lambda store: datasets.get(store, name, int(number) if number else None)
        )
        if version is None:
            raise DistilleryError(f"No dataset version {ref!r}.")
        specs = [line.strip() for line in values.get("candidates", "").splitlines() if line.strip()]
        if not specs:
            raise DistilleryError("Name at least one candidate, one MODEL[@ENDPOINT] per line.")
        endpoints, default = configured(settings), Endpoint.from_env("default")
        wanted = EvalRequest(
            source=Source(
                dataset=version, split="train" if values.get("split") == "train" else "val"
            ),
            candidates=parse_candidates(specs, endpoints, default),
            graders=load_all(values["graders"].split()),
            endpoints=endpoints,
            default=default,
            prices=settings.prices,
            limit=int(values.get("limit") or 0) or None,
        )
    except (DistilleryError, ValueError) as exc:
        return await eval_form(request, str(exc), values)
    store, prefix = request.app[STORE], url(request)

    async def work(task: Task) -> None:
        done = await asyncio.to_thread(run_eval, store, wanted)
        await task.update(done_url=f"{prefix}evals/{done.run['id']}")

    raise await tasks.start(request, f"Evaluating on {ref}", "grading", work)
