"""``distillery distill``: dataset -> baseline -> fine-tune -> eval -> report, resumable.

State lives in ``<data dir>/distill/<dataset>/state.json``: which dataset version the
last loop used, the settings it ran with, its fine-tune job, and its final eval run.
Re-running with no new calls and the same settings does nothing (it prints the last
result); an interrupted run picks up its fine-tune job instead of starting another.
Changed settings redo what they affect, and say so: other filters rebuild the dataset
from scratch (and retrain), another student or training setting retrains, other
graders, teacher or sample re-grade the same fine-tune.  The final eval grades the teacher, the
base student and the fine-tuned student in one run; the generation cache means only
the new student is actually called when the others were graded before.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import ConfigDict

from distillery.core.errors import DistilleryError
from distillery.core.records import Record
from distillery.curation.datasets.build import BuildOptions, build
from distillery.curation.datasets.options import learnable
from distillery.curation.endpoints import Endpoint
from distillery.curation.evals import evaluate
from distillery.curation.evals import items as eval_items
from distillery.curation.evals.generate import Candidate, Generator
from distillery.curation.evals.graders import Context, Grader
from distillery.curation.training.backends import (
    BackendContext,
    FineTuneBackend,
    Hyperparameters,
    JobEvent,
    JobSpec,
    Method,
    new_job_id,
)
from distillery.curation.training.jobs import start_job, wait
from distillery.curation.training.registry import open_backend
from distillery.store import Store, datasets, evals, finetunes, query
from distillery.store.records import (
    DatasetVersionRecord,
    EvalRunRecord,
    FineTuneJobRecord,
    Summary,
)

Echo = Callable[[str], None]


@dataclass
class DistillOptions:
    name: str
    filters: query.Filters
    teacher: Candidate
    student_base: str
    backend: str
    graders: list[Grader]
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    method: Method = "auto"  # local: --full / --lora force a method; auto lets the trainer choose
    student_endpoint: Endpoint | None = (
        None  # API backends: the fine-tuning API, where ft: models run
    )
    limit: int | None = None
    seed: int = 0
    poll: float = 10.0
    prices: dict[str, Any] = field(default_factory=dict)
    use_cache: bool = True
    by_tag: str | None = None  # break scores down by this tag's values
    allow_train_eval: bool = False  # no validation split: grade on training examples anyway
    keep_checkpoints: bool = False  # local: keep the fine-tune's per-epoch checkpoints


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def served(model_dir: str, name: str) -> Iterator[Endpoint]:
    """`distillery serve` on a free port for the duration of the block."""
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distillery",
            "serve",
            model_dir,
            "--port",
            str(port),
            "--name",
            name,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                error = process.stderr.read().decode()[-500:] if process.stderr else ""
                raise DistilleryError(f"`distillery serve {model_dir}` exited: {error}")
            try:
                with urllib.request.urlopen(url + "/models", timeout=1) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise DistilleryError(f"`distillery serve {model_dir}` did not start in 180 s.")
            time.sleep(0.3)
        yield Endpoint(name, url, "local")
    finally:
        process.terminate()
        process.wait(30)
        if process.stderr is not None:
            process.stderr.close()


def _state_path(data_dir: Path, name: str) -> Path:
    return data_dir / "distill" / name / "state.json"


class DistillState(Record):
    """Where a distill loop stands between runs (``DATA_DIR/distill/NAME/state.json``):
    the dataset version it trained on, the settings it ran with, its fine-tune job and
    the run that graded it.  A field this version does not know, or one of the wrong
    kind, is an error naming it, never silently dropped."""

    model_config = ConfigDict(validate_assignment=True)

    dataset_version: int | None = None
    settings: dict[str, Any] | None = None
    job: str | None = None
    final_run: str | None = None

    @classmethod
    def load(cls, path: Path) -> DistillState:
        """The saved state, or a fresh one when there is none."""
        return cls.read(path) if path.exists() else cls()

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.write(path)


def graded_items(
    store: Store,
    version: DatasetVersionRecord,
    limit: int | None,
    seed: int,
    allow_train: bool = False,
) -> list[eval_items.Item]:
    """What the loop grades: the validation split (seeded sample); part of train only when
    allowed (``--allow-train-eval``: a score on what the student learned from)."""
    items = eval_items.sample(eval_items.from_dataset(store, version, "val"), limit, seed)
    if not items and allow_train:
        items = eval_items.sample(
            eval_items.from_dataset(store, version, "train"), limit or 50, seed
        )
    return items


def _check_gradable(version: DatasetVersionRecord, allow_train: bool) -> None:
    """Refuse to train a student that could only be graded on its own training examples."""
    if version["val_examples"] or allow_train:
        return
    ref = f"{version['name']}@{version['version']}"
    raise DistilleryError(
        f"{ref} has no validation split ({version['train_examples']} train examples): a "
        "student graded on the examples it trained on says nothing about new calls. Capture "
        f"more calls, or build it with one (`distillery dataset build {version['name']} "
        "--val-fraction 0.2` with the same filters), or pass --allow-train-eval."
    )


def settings(options: DistillOptions) -> dict[str, dict[str, Any]]:
    """What a run's result depends on, in three parts that are redone separately."""
    filters = {k: v for k, v in asdict(options.filters).items() if v not in (None, (), False)}
    plain: dict[str, dict[str, Any]] = _plain(
        {
            "data": {"filters": filters, "seed": options.seed},
            "train": {
                "backend": options.backend,
                "student": options.student_base,
                "method": options.method,
                "hyperparameters": options.hyperparameters.given(),
            },
            "eval": {
                "teacher": options.teacher.model,
                "teacher_url": options.teacher.endpoint.base_url,
                "graders": [
                    {"name": g.name, "type": g.type, "pass": g.pass_threshold, **g.options}
                    for g in options.graders
                ],
                "limit": options.limit,
                "by": options.by_tag,
            },
        }
    )
    return plain


def _plain(value: Any) -> Any:
    """JSON's view of a value (tuples as lists, datetimes as text), to compare with state."""
    return json.loads(json.dumps(value, default=str))


def changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """``part.key: old -> new`` for each top-level setting that differs."""
    out = []
    for part in ("data", "train", "eval"):
        old, new = before.get(part) or {}, after.get(part) or {}
        for key in sorted(old.keys() | new.keys()):
            if old.get(key) != new.get(key):
                out.append(
                    f"{part}.{key}: {json.dumps(old.get(key))} -> {json.dumps(new.get(key))}"
                )
    return out


def run(
    store: Store,
    options: DistillOptions,
    data_dir: Path,
    echo: Echo,
    on_event: Callable[[JobEvent], None] | None = None,
) -> EvalRunRecord:
    """The loop, saying what it does through ``echo`` and the fine-tune's progress through
    ``on_event`` (each of its events once, in order)."""
    state_path = _state_path(data_dir, options.name)
    state = DistillState.load(state_path)
    wanted = settings(options)
    before = state.settings
    changed = changes(before, wanted) if before is not None else []
    if changed:
        echo("Settings changed since the last run: " + "; ".join(changed))
    rebuild = before is not None and before["data"] != wanted["data"]
    selection = learnable(options.filters)
    local = (
        options.student_base
        if options.backend == "local" and Path(options.student_base).is_dir()
        else None
    )
    built = build(
        store,
        BuildOptions(
            name=options.name,
            filters=selection,
            incremental=not rebuild,  # other filters: a version of its own, from scratch
            seed=options.seed,
            # A local student counts tokens with its own tokenizer, and the estimate
            # uses its trainer's epochs, when it is a directory.
            tokenizer=local,
            student=local if options.hyperparameters.epochs is None else None,
            epochs=options.hyperparameters.epochs or 3,
        ),
        data_dir,
    )
    version = datasets.latest(store, options.name)
    if version is None:
        raise DistilleryError(f"{built.message} Nothing to distil yet.")
    same = state.dataset_version == version["version"]
    if same and state.final_run and not changed:
        echo(f"No new calls since {options.name}@{version['version']}; the last result stands.")
        found = evals.get_run(store, state.final_run)
        assert found is not None
        return found
    retrain = not same or (before is not None and before["train"] != wanted["train"])
    _check_gradable(version, options.allow_train_eval)
    echo(_plan(built.message if built.version else None, version, same, retrain, state))
    if retrain:
        state = DistillState(dataset_version=version["version"])  # train (again)
    else:
        state.final_run = None  # only grading changed: the same fine-tune, graded anew
    state.settings = wanted
    state.save(state_path)
    job, backend = _finetune(store, options, version, state, state_path, data_dir, echo, on_event)
    items = graded_items(
        store, version, options.limit, options.seed, allow_train=options.allow_train_eval
    )
    with _students(options, job, backend) as (base, tuned):
        generator = Generator(store, use_cache=options.use_cache)
        context = Context(generator, {}, options.teacher.endpoint)
        result = evaluate.run(
            store,
            items,
            [options.teacher, base, tuned],
            options.graders,
            generator,
            context,
            config={
                "source": f"{version['name']}@{version['version']} (distill)",
                "limit": options.limit,
                "seed": options.seed,
                "by": f"tag:{options.by_tag}" if options.by_tag else None,
                "finetune_job": job["id"],
            },
            prices=options.prices,
            by_tag=options.by_tag,
        )
    state.final_run = result["id"]
    state.save(state_path)
    return result


def _plan(
    built: str | None,
    version: DatasetVersionRecord,
    same: bool,
    retrain: bool,
    state: DistillState,
) -> str:
    """What this run will do and why, said before it does it (and nothing it will not)."""
    ref = f"{version['name']}@{version['version']}"
    size = f"{version['train_examples']} train and {version['val_examples']} validation examples"
    if built is not None:
        return f"{built}: {size}; fine-tuning the student on it."
    if not same:
        return (
            f"No new calls since {ref}; fine-tuning the student on it ({size}): "
            "no distill run has used it yet."
        )
    if retrain:
        return f"No new calls since {ref}; fine-tuning again: the training settings changed."
    if state.job and state.final_run is None:
        return f"No new calls since {ref}; picking up the fine-tune and grading it."
    return f"No new calls since {ref}; grading the same fine-tune again: the eval settings changed."


def verdict(summary: Summary, limits: dict[str, float]) -> list[str]:
    """One line per grader: the fine-tuned student's score, its share of the teacher's,
    and whether it met its ``--fail-under`` bar or by how much it missed."""
    candidates = summary["candidates"]
    teacher = next(iter(evaluate.with_role(summary, "teacher")), None)
    tuned = next(iter(evaluate.with_role(summary, "tuned")), None)
    if tuned is None:
        return []
    lines = []
    for name, stats in candidates[tuned]["graders"].items():
        score, n = stats["mean"], stats["n"]
        if score is None:
            lines.append(f"Verdict ({name}, n={n}): the fine-tuned student has no score.")
            continue
        line = f"Verdict ({name}, n={n}): the fine-tuned student scores {score:.3f}"
        teacher_stats = candidates[teacher]["graders"].get(name) if teacher else None
        reference = teacher_stats["mean"] if teacher_stats else None
        if reference:
            line += f", {score / reference:.0%} of the teacher's {reference:.3f}"
        bar = limits.get(name)
        if bar is not None:
            if score >= bar:
                line += f"; it reaches the bar of {bar:g} (+{score - bar:.3f})"
            else:
                line += f"; it misses the bar of {bar:g} by {bar - score:.3f}"
        lines.append(line + ".")
        if n < evaluate.FEW_GRADED:
            low, high = evaluate.wilson(score, n, stats["scale"])
            lines.append(
                f"Warning: {name} graded {n} examples (95% interval {low:.3f}-{high:.3f}): "
                f"too few to trust; grade {evaluate.FEW_GRADED} or more (a larger validation split, "
                "or no --limit)."
            )
    return lines


def _finetune(
    store: Store,
    options: DistillOptions,
    version: DatasetVersionRecord,
    state: DistillState,
    state_path: Path,
    data_dir: Path,
    echo: Echo,
    on_event: Callable[[JobEvent], None] | None = None,
) -> tuple[FineTuneJobRecord, FineTuneBackend]:
    backend = open_backend(
        options.backend,
        BackendContext(data_dir, options.student_endpoint or Endpoint.from_env("default")),
    )
    job = finetunes.get(store, state.job) if state.job else None
    if job is None or job["status"] in ("failed", "cancelled"):
        spec = JobSpec(
            job_id=new_job_id(),
            dataset=version,
            base_model=options.student_base,
            hyperparameters=replace(options.hyperparameters, seed=options.seed),
            method=options.method,
            merge=True,  # a local model is served for the final eval: a LoRA adapter merged in
            suffix=options.name[:40],
            keep_checkpoints=options.keep_checkpoints,
        )
        job = start_job(store, backend, spec)
        state.job = job["id"]
        state.save(state_path)
        echo(f"Fine-tuning {options.student_base} on {spec.label}: {job['id']}")
    else:
        echo(f"Resuming fine-tune {job['id']} ({job['status']})")
    job = wait(store, job, backend, options.poll, on_event)
    if job["status"] != "succeeded":
        raise DistilleryError(
            f"Fine-tune {job['id']} {job['status']}: {(job['error'] or {}).get('message')}"
        )
    echo(f"Fine-tuned: {job['fine_tuned_model']}")
    return job, backend


@contextmanager
def _students(
    options: DistillOptions, job: FineTuneJobRecord, backend: FineTuneBackend
) -> Iterator[tuple[Candidate, Candidate]]:
    tuned_model = job["fine_tuned_model"]
    assert tuned_model is not None  # the job succeeded
    if not backend.local_models:
        endpoint = options.student_endpoint or Endpoint.from_env("default")
        yield (
            Candidate(f"base:{options.student_base}", options.student_base, endpoint, role="base"),
            Candidate(f"tuned:{tuned_model}", tuned_model, endpoint, role="tuned"),
        )
        return
    with (
        served(options.student_base, "base") as base,
        served(tuned_model, "tuned") as tuned,
    ):
        # Known by their files, so the base student's answers are cached across runs on
        # whatever port it is served, and a new fine-tune never gets the last one's.
        from distillery.curation.serve import model_hash

        yield (
            Candidate(
                "base student",
                "base",
                base,
                f"files:{model_hash(Path(options.student_base))}",
                role="base",
            ),
            Candidate(
                "fine-tuned student",
                "tuned",
                tuned,
                f"files:{model_hash(Path(tuned_model))}",
                role="tuned",
            ),
        )
