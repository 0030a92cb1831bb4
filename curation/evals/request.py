"""An eval run as the CLI and the dashboard both ask for one: a typed request, checked,
then run.  Commands and pages parse their input into an :class:`EvalRequest`, call
:func:`run`, and render what comes back; nothing else."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from distillery.core.config import Price
from distillery.core.errors import DistilleryError
from distillery.curation.endpoints import Endpoint
from distillery.curation.evals import evaluate
from distillery.curation.evals import items as eval_items
from distillery.curation.evals.generate import Candidate, Generator
from distillery.curation.evals.graders import Context, Grader
from distillery.curation.evals.items import Item
from distillery.store import Store, datasets, finetunes, query
from distillery.store.records import DatasetVersionRecord, EvalRunRecord


@dataclass(frozen=True)
class Source:
    """What to grade: one of a dataset version's split, a JSONL file, or stored calls."""

    dataset: DatasetVersionRecord | None = None
    split: Literal["train", "val"] = "val"
    file: Path | None = None
    filters: query.Filters | None = None

    def __post_init__(self) -> None:
        given = [self.dataset is not None, self.file is not None, self.filters is not None]
        if sum(given) != 1:
            raise DistilleryError(
                "Name what to grade: a dataset version, a JSONL file, or filters over stored "
                "calls (one of them)."
            )

    @property
    def label(self) -> str:
        if self.dataset is not None:
            return f"{self.dataset['name']}@{self.dataset['version']} ({self.split})"
        return str(self.file) if self.file is not None else "stored calls"

    def items(self, store: Store) -> list[Item]:
        if self.dataset is not None:
            return eval_items.from_dataset(store, self.dataset, self.split)
        if self.file is not None:
            return eval_items.from_jsonl(self.file)
        assert self.filters is not None
        return eval_items.from_filters(store, self.filters)


@dataclass(frozen=True)
class Calls:
    """How the candidates are called."""

    concurrency: int = 8
    timeout: float = 120.0
    retries: int = 4
    use_cache: bool = True


@dataclass(frozen=True)
class EvalRequest:
    source: Source
    candidates: list[Candidate]
    graders: list[Grader]
    endpoints: Mapping[str, Endpoint]  # where MODEL@NAME candidates and judges are called
    default: Endpoint  # where a candidate without @NAME is called
    prices: Mapping[str, Price] = field(default_factory=dict)
    limit: int | None = None
    seed: int = 0
    by_tag: str | None = None  # "tag:KEY": a breakdown by that tag
    calls: Calls = field(default_factory=Calls)
    allow_train_eval: bool = False  # grade a fine-tune on its own training examples anyway

    def __post_init__(self) -> None:
        if not self.candidates:
            raise DistilleryError("Name at least one candidate, MODEL[@ENDPOINT].")
        if not self.graders:
            raise DistilleryError("Choose at least one grader.")


@dataclass
class EvalResult:
    run: EvalRunRecord
    items: list[Item]
    uncached: set[str]  # models whose answers could not be cached (their endpoint hides them)


def run(
    store: Store,
    request: EvalRequest,
    *,
    start: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Read the items, call and grade every candidate, store the run.  ``start`` hears
    the number of answers to grade once the items are read; ``progress`` each one done."""
    items = eval_items.sample(request.source.items(store), request.limit, request.seed)
    if not items:
        raise DistilleryError(f"Nothing to grade in {request.source.label}.")
    if not request.allow_train_eval:
        refuse_training_examples(store, request.candidates, items)
    if start is not None:
        start(len(items) * len(request.candidates))
    calls = request.calls
    generator = Generator(
        store,
        concurrency=calls.concurrency,
        timeout=calls.timeout,
        retries=calls.retries,
        use_cache=calls.use_cache,
    )
    context = Context(generator, dict(request.endpoints), request.default)
    config = {
        "source": request.source.label,
        "limit": request.limit,
        "seed": request.seed,
        "by": request.by_tag,
    }
    stored = evaluate.run(
        store,
        items,
        request.candidates,
        request.graders,
        generator,
        context,
        config=config,
        prices=dict(request.prices),
        by_tag=request.by_tag[4:] if request.by_tag else None,
        progress=progress,
    )
    return EvalResult(stored, items, set(generator.uncached))


def refuse_training_examples(store: Store, candidates: list[Candidate], items: list[Item]) -> None:
    """Refuse to grade a fine-tune this store knows on the examples it was trained on: its
    score there says how well it learned them, not how it answers new calls."""
    sources = {item.source for item in items if item.source is not None}
    if not sources:
        return  # items from a file: nothing says where they came from
    models = {candidate.model: candidate.label for candidate in candidates}
    for job in finetunes.list_jobs(store, None):
        label = models.get(job["fine_tuned_model"] or "")
        version = datasets.get(store, job["dataset"], job["dataset_version"]) if label else None
        if label is None or version is None:
            continue
        trained = {
            source
            for source, split in datasets.example_ids(store, version["id"]).items()
            if split == "train"
        }
        seen = len(sources & trained)
        if seen:
            raise DistilleryError(
                f"{label} was fine-tuned on {version['name']}@{version['version']} "
                f"({job['id']}): {seen} of the {len(items)} items are its training examples, "
                "and a score on them says how well it learned them, not how it answers new "
                "calls. Grade the validation split (--split val) or calls captured since, or "
                "pass --allow-train-eval."
            )
