"""The schema for captured traffic.

One row per chat completion call in ``completions``: the (redacted) request
and reassembled response as JSON, plus the columns that later commands filter
and aggregate on, pulled out so that they need no JSON parsing.  The final
metadata sent upstream is kept twice on purpose: as a JSON column (to show a
call whole) and as rows in ``completion_tags`` with a ``(key, value)`` index,
because dataset builds select millions of rows by tag and a JSON scan would
not scale on SQLite.

``id`` is ours, not the upstream's: it is minted before the response is
delivered, written to the spool with the record and used as the idempotency
key, so replaying a spool after a crash can never insert a call twice.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, DateTime, Index, UniqueConstraint
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

JSONColumn = JSON().with_variant(JSONB(), "postgresql")


class Completion(SQLModel, table=True):
    __tablename__ = "completions"

    id: str = Field(primary_key=True, max_length=40)
    completion_id: str | None = Field(default=None, index=True, description="upstream id")
    created_at: datetime = Field(
        sa_column=Column(DateTime(timezone=True), nullable=False, index=True),
        description="when the request arrived, UTC",
    )
    tenant: str = Field(index=True, description="fingerprint of the caller's API key")
    upstream: str
    path: str
    model_requested: str | None = Field(default=None, index=True)
    model_served: str | None = None
    status: int = Field(description="HTTP status the client received")
    stream: bool
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    latency_ms: float
    ttft_ms: float | None = Field(default=None, description="time to first byte of the body")
    upstream_request_id: str | None = None
    prompt_fingerprint: str | None = Field(default=None, index=True)
    request: dict[str, Any] = Field(sa_column=Column(JSONColumn, nullable=False))
    response: dict[str, Any] | None = Field(default=None, sa_column=Column(JSONColumn))
    error: dict[str, Any] | None = Field(default=None, sa_column=Column(JSONColumn))
    # `metadata` is taken by SQLModel itself, hence the attribute name.
    metadata_: dict[str, str] = Field(
        default_factory=dict, sa_column=Column("metadata", JSONColumn, nullable=False)
    )


class CompletionTag(SQLModel, table=True):
    __tablename__ = "completion_tags"
    # (key, value, completion_id): a tag filter walks this index in id order,
    # which is time order, so "newest 20 with k=v" never sorts.
    __table_args__ = (Index("ix_completion_tags_key_value", "key", "value", "completion_id"),)

    completion_id: str = Field(foreign_key="completions.id", primary_key=True, max_length=40)
    key: str = Field(primary_key=True, max_length=64)
    value: str = Field(max_length=512)


class DatasetVersion(SQLModel, table=True):
    """One immutable build of a dataset: its manifest, files and watermark.

    ``watermark`` is the newest completion record id the build considered, so
    ``--incremental`` reads only what was captured after it.
    """

    __tablename__ = "dataset_versions"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, max_length=200)
    version: int
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    content_hash: str = Field(max_length=64)
    watermark: str | None = Field(default=None, max_length=40)
    train_examples: int
    val_examples: int
    path: str = Field(description="directory holding train.jsonl, val.jsonl, manifest.json")
    manifest: dict[str, Any] = Field(sa_column=Column(JSONColumn, nullable=False))


class DatasetExample(SQLModel, table=True):
    """Which captured call became which example of a version (for diff and lineage)."""

    __tablename__ = "dataset_examples"

    version_id: int = Field(foreign_key="dataset_versions.id", primary_key=True)
    completion_id: str = Field(primary_key=True, max_length=40)
    split: str = Field(max_length=5)


class EvalRun(SQLModel, table=True):
    """One `distillery eval run`: what was asked, and the summary it produced."""

    __tablename__ = "eval_runs"

    id: str = Field(primary_key=True, max_length=40)
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    config: dict[str, Any] = Field(sa_column=Column(JSONColumn, nullable=False))
    summary: dict[str, Any] = Field(sa_column=Column(JSONColumn, nullable=False))


class EvalSample(SQLModel, table=True):
    """One candidate's answer to one item, with every grader's verdict."""

    __tablename__ = "eval_samples"

    run_id: str = Field(foreign_key="eval_runs.id", primary_key=True, max_length=40)
    item: int = Field(primary_key=True)
    candidate: str = Field(primary_key=True, max_length=200)
    item_key: str = Field(index=True, max_length=32, description="hash of the prompt")
    output: dict[str, Any] | None = Field(default=None, sa_column=Column(JSONColumn))
    error: str | None = None
    grades: dict[str, Any] = Field(sa_column=Column(JSONColumn, nullable=False))
    latency_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class EvalItem(SQLModel, table=True):
    """What one item of a run asked (the prompt's messages) and the answer it was graded
    against: shown beside every candidate's output."""

    __tablename__ = "eval_items"

    run_id: str = Field(foreign_key="eval_runs.id", primary_key=True, max_length=40)
    item: int = Field(primary_key=True)
    item_key: str = Field(max_length=32)
    messages: list[dict[str, Any]] = Field(sa_column=Column(JSONColumn, nullable=False))
    reference: dict[str, Any] | None = Field(default=None, sa_column=Column(JSONColumn))


class GenerationCache(SQLModel, table=True):
    """Model answers by (model, endpoint, messages, params): re-grading never re-calls."""

    __tablename__ = "generation_cache"

    key: str = Field(primary_key=True, max_length=64)
    model: str = Field(max_length=200)
    response: dict[str, Any] = Field(sa_column=Column(JSONColumn, nullable=False))
    latency_ms: float
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class FineTuneJob(SQLModel, table=True):
    """A fine-tune of a base model on one dataset version: every model traces to its data."""

    __tablename__ = "finetune_jobs"

    id: str = Field(primary_key=True, max_length=40)
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    updated_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    backend: str = Field(max_length=20)
    base_url: str | None = None
    provider_job_id: str | None = Field(default=None, index=True)
    dataset: str = Field(max_length=200)
    dataset_version: int
    base_model: str
    status: str = Field(max_length=40)
    fine_tuned_model: str | None = None
    hyperparameters: dict[str, Any] = Field(sa_column=Column(JSONColumn, nullable=False))
    metrics: dict[str, Any] = Field(sa_column=Column(JSONColumn, nullable=False))
    error: dict[str, Any] | None = Field(default=None, sa_column=Column(JSONColumn))


class _Counts(SQLModel):
    """What an aggregate row sums (see ``rollups.py``)."""

    calls: int
    errors: int
    prompt_tokens: int = Field(sa_type=BigInteger)
    completion_tokens: int = Field(sa_type=BigInteger)
    latency_ms_sum: float
    lat_00: int
    lat_01: int
    lat_02: int
    lat_03: int
    lat_04: int
    lat_05: int
    lat_06: int
    lat_07: int
    lat_08: int
    lat_09: int
    lat_10: int
    lat_11: int
    lat_12: int


class AppRollup(_Counts, table=True):
    """Calls per day, tenant, model and ``app`` tag: the overview's series and breakdowns."""

    __tablename__ = "rollup_apps"

    day: datetime = Field(sa_column=Column(DateTime(timezone=True), primary_key=True))
    tenant: str = Field(primary_key=True)
    model: str = Field(primary_key=True)
    app: str = Field(primary_key=True)


class TaskRollup(_Counts, table=True):
    """Calls per day, tenant, model and prompt fingerprint: the overview's top tasks."""

    __tablename__ = "rollup_tasks"

    day: datetime = Field(sa_column=Column(DateTime(timezone=True), primary_key=True))
    tenant: str = Field(primary_key=True)
    model: str = Field(primary_key=True)
    fingerprint: str = Field(primary_key=True)


class DashboardTask(SQLModel, table=True):
    """A long action the dashboard runs in the background, where every worker and host on
    the database can follow it (``ui/tasks.py``)."""

    __tablename__ = "ui_tasks"

    id: str = Field(primary_key=True, max_length=16)
    title: str
    state: str
    error: str | None = None
    done_url: str | None = None  # where the result is, once there is one
    started_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    # Written while the task runs: a task whose process died stops being written.
    heartbeat_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class Secret(SQLModel, table=True):
    """Secrets the processes sharing a database must agree on (the dashboard's cookie key)."""

    __tablename__ = "secrets"

    name: str = Field(primary_key=True, max_length=40)
    value: str


class DashboardSession(SQLModel, table=True):
    """A signed-in dashboard user: the cookie names it, and it ends here (sign-out, idle,
    ``db end-sessions``) for every process on the database at once."""

    __tablename__ = "ui_sessions"

    id: str = Field(primary_key=True, max_length=40)
    tenant: str = Field(max_length=64)
    admin: bool
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    seen_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    expires_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    ended_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))


class RouteState(SQLModel, table=True):
    """A route's mode as last changed (a command or the automatic policy): it overrides the
    config's starting mode for every proxy on the database."""

    __tablename__ = "route_states"

    name: str = Field(primary_key=True, max_length=100)
    mode: str = Field(max_length=10)
    reason: str
    changed_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    # The student the mode was decided for (as route_samples.student); another student
    # starts in shadow with no evidence.  Null: rows from before revision 0009.
    student: str | None = Field(default=None, max_length=300)


class RouteSample(SQLModel, table=True):
    """One live request answered by both: the teacher's call (in ``completions``) and the
    student's answer to the same request, graded against the teacher's."""

    __tablename__ = "route_samples"
    __table_args__ = (
        Index("ix_route_samples_route_id", "route", "id"),
        Index("ix_route_samples_route_student_id", "route", "student", "id"),
    )

    id: str = Field(primary_key=True, max_length=40)  # the teacher's call's record id
    route: str = Field(max_length=100)
    tenant: str = Field(max_length=64)
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    student_model: str
    # Who answered: MODEL@ENDPOINT, and #files:HASH when the endpoint reports the served
    # files' content hash; evidence counts for this student only (null before 0009).
    student: str | None = Field(default=None, max_length=300)
    # ok: answered and graded; error: the student failed (its error says how)
    status: str = Field(max_length=10)
    error: str | None = None
    response: dict[str, Any] | None = Field(default=None, sa_column=Column(JSONColumn))
    latency_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    teacher_model: str | None = None  # the model that answered as the teacher
    teacher_latency_ms: float | None = None
    teacher_prompt_tokens: int | None = None
    teacher_completion_tokens: int | None = None
    # {grader: score or null}; the sample's score is their mean (null if any is null)
    scores: dict[str, Any] = Field(sa_column=Column(JSONColumn, nullable=False))
    score: float | None = None
    # The teacher's answer graded the same way (against itself): 1 for reference graders,
    # a tie for a pairwise judge; what a relative bar and win/tie/loss compare with.
    teacher_score: float | None = None


class RouteCounter(SQLModel, table=True):
    """What a route's proxies counted (shadow calls dropped, fallbacks), summed over them."""

    __tablename__ = "route_counters"

    route: str = Field(primary_key=True, max_length=100)
    kind: str = Field(primary_key=True, max_length=40)
    count: int = Field(sa_type=BigInteger)
