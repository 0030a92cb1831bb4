"""The records that cross the store's boundary, typed.

They are ``TypedDict``\\s, not classes, on purpose: a capture record is built on
the request path, serialised to the spool as JSON and read back after a crash,
and every other record is mostly JSON the store keeps (a manifest, an eval
summary) and the CLI prints with ``--json``.  A dict that type-checks keeps all
of that free, while mypy refuses a misspelled or missing key wherever one is
built or read; :func:`check_capture` refuses the same at run time for records
that come back from a spool.

SQLModel's table classes in ``models.py`` describe the *schema*; these
describe what the store takes and gives back.
"""

# No `from __future__ import annotations`: TypedDict reads NotRequired from real
# annotations only, and CAPTURE_KEYS below depends on it.
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal, NotRequired, TypedDict


class _Call(TypedDict):
    """The fields a captured call has, captured or stored (all but ``created_at``)."""

    id: str
    completion_id: str | None
    tenant: str
    upstream: str
    path: str
    model_requested: str | None
    model_served: str | None
    status: int
    stream: bool
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    latency_ms: float
    ttft_ms: float | None
    upstream_request_id: str | None
    prompt_fingerprint: str | None
    request: dict[str, Any]
    response: dict[str, Any] | None
    error: Any
    metadata: dict[str, str]


class CaptureRecord(_Call):
    """One call, as the proxy hands it to capture, the spool keeps it and the store inserts it.

    ``created_at`` is epoch seconds (cheap on the request path, JSON-safe in the spool).
    """

    created_at: float
    # Set by repair: how much of the call full-text search indexes.
    search_limit: NotRequired[int]


CAPTURE_KEYS = frozenset(CaptureRecord.__required_keys__)
CAPTURE_OPTIONAL = frozenset(CaptureRecord.__optional_keys__)


def check_capture(record: Mapping[str, Any]) -> str | None:
    """Why ``record`` is not a capture record (a key missing or unknown), or ``None``."""
    keys = record.keys()
    missing = CAPTURE_KEYS - keys
    unknown = keys - CAPTURE_KEYS - CAPTURE_OPTIONAL
    if missing or unknown:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(sorted(missing)))
        if unknown:
            parts.append("unknown " + ", ".join(sorted(map(str, unknown))))
        return "not a capture record: " + "; ".join(parts)
    return None


class StoredCompletion(_Call):
    """A captured call as the store gives it back (``created_at`` now a UTC datetime)."""

    created_at: datetime


class DatasetVersionRecord(TypedDict):
    """One immutable build of a dataset (see ``models.DatasetVersion``)."""

    id: int
    name: str
    version: int
    created_at: datetime
    content_hash: str
    watermark: str | None
    train_examples: int
    val_examples: int
    path: str
    manifest: dict[str, Any]


# Who a candidate is in an eval: what `distill` compares and `--fail-under` judges.
Role = Literal["teacher", "base", "tuned", "candidate"]


class CandidateConfig(TypedDict):
    label: str
    model: str
    base_url: str | None
    role: NotRequired[Role]  # runs stored before roles existed have none


class GraderStats(TypedDict):
    mean: float | None
    ci_low: float | None
    ci_high: float | None
    pass_rate: float | None
    n: int
    errors: int
    scale: list[float]
    by_tag: NotRequired[dict[str, dict[str, Any]]]


class CandidateSummary(TypedDict):
    model: str
    role: NotRequired[Role]
    errors: int
    failed_items: int
    first_error: str | None
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None
    graders: dict[str, GraderStats]


class Calls(TypedDict):
    made: int
    cached: int


class Summary(TypedDict):
    """An eval run's numbers: per candidate (by label), per grader."""

    items: int
    candidates: dict[str, CandidateSummary]
    calls: NotRequired[Calls]


class EvalRunRecord(TypedDict):
    id: str
    created_at: NotRequired[datetime]
    config: dict[str, Any]
    summary: Summary


class Grading(TypedDict):
    score: float | None
    passed: bool
    detail: str


class EvalSampleRecord(TypedDict):
    """One candidate's answer to one item, with every grader's verdict."""

    run_id: NotRequired[str]
    item: int
    candidate: str
    item_key: str
    output: dict[str, Any] | None
    error: str | None
    grades: dict[str, Grading]
    latency_ms: float | None
    prompt_tokens: int | None
    completion_tokens: int | None


class EvalItemRecord(TypedDict):
    """One item a run graded: the prompt's messages and the reference answer."""

    run_id: NotRequired[str]
    item: int
    item_key: str
    messages: list[dict[str, Any]]
    reference: dict[str, Any] | None


class FineTuneJobRecord(TypedDict):
    """A fine-tune of a base model on one dataset version (see ``models.FineTuneJob``)."""

    id: str
    created_at: datetime
    updated_at: datetime
    backend: str
    base_url: str | None
    provider_job_id: str | None
    dataset: str
    dataset_version: int
    base_model: str
    status: str
    fine_tuned_model: str | None
    hyperparameters: dict[str, Any]
    metrics: dict[str, Any]
    error: dict[str, Any] | None
