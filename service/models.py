"""Database tables (SQLAlchemy 2.0 typed models): the source of truth of tunepool.

Conventions:
- Every listed resource has an integer `pk` (insertion order: lists and cursors use it) and a
  public string `id` with OpenAI's prefix (`file-`, `ftjob-`, `ftevent-`, `ftckpt-`).
- Times are unix seconds: `created_at`-style fields as integers (what the API returns), lease
  and heartbeat times as floats (sub-second arithmetic).
- JSON columns hold what the API echoes back (method, hyperparameters, metadata, error, metrics).
"""

from __future__ import annotations

import enum
import secrets
import string
import time
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

_ALPHABET = string.ascii_letters + string.digits
# Deterministic constraint names, so Alembic migrations are the same on SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def new_id(prefix: str, length: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(length))


def now_s() -> int:
    return int(time.time())


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class JobStatus(enum.StrEnum):
    """OpenAI's job statuses; legal moves are in service/jobs.py."""

    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PAUSED = "paused"  # held by its team: out of the queue, its slots free, resumed on request

    @property
    def is_terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class Team(Base):
    __tablename__ = "teams"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("team-", 16))
    name: Mapped[str] = mapped_column(String(64), unique=True)
    max_running_jobs: Mapped[int] = mapped_column(Integer)
    max_queued_jobs: Mapped[int] = mapped_column(Integer)
    max_storage_bytes: Mapped[int] = mapped_column(BigInteger)
    share_weight: Mapped[float] = mapped_column(Float, default=1.0)
    max_gpus: Mapped[int | None] = mapped_column(Integer, nullable=True)  # over all pools; None: no limit
    # Whether the team's jobs may set `preemptible: false` (an admin setting).
    may_exempt_preemption: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[int] = mapped_column(BigInteger, default=now_s)


class TeamUsage(Base):
    """A team's decayed GPU-seconds in one pool, as of `as_of` (worker/scheduling.py decays it)."""

    __tablename__ = "team_usage"

    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), primary_key=True)
    pool: Mapped[str] = mapped_column(String(64), primary_key=True)
    gpu_seconds: Mapped[float] = mapped_column(Float)
    as_of: Mapped[float] = mapped_column(Float)


class TeamQuota(Base):
    """A team's guaranteed GPUs in one pool: below it, its jobs go first and may reclaim GPUs that
    teams above their own guarantee borrowed (worker/scheduling.py)."""

    __tablename__ = "team_quotas"

    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), primary_key=True)
    pool: Mapped[str] = mapped_column(String(64), primary_key=True)
    guaranteed_gpus: Mapped[int] = mapped_column(Integer)


class ApiKey(Base):
    __tablename__ = "api_keys"

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)  # shown to people, e.g. "tp-AbC12xYz"
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the whole key
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now_s)
    last_used_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class File(Base):
    __tablename__ = "files"
    __table_args__ = (Index(None, "team_id", "pk"),)

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, default=lambda: new_id("file-"))
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))  # fine-tune | fine-tune-results
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    format: Mapped[str | None] = mapped_column(String(32), nullable=True)  # chat | prompt_completion
    n_examples: Mapped[int | None] = mapped_column(Integer, nullable=True)
    storage_path: Mapped[str] = mapped_column(String(512))  # relative to the artifact directory
    created_at: Mapped[int] = mapped_column(BigInteger, default=now_s)


class RegisteredModel(Base):
    """A model jobs may start from, registered by an admin."""

    __tablename__ = "base_models"

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)  # what `model` in a request names
    source: Mapped[str] = mapped_column(String(1024))  # HF directory, hub id (local cache) or .gguf path
    pool: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now_s)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index(None, "team_id", "pk"),  # list, newest first
        Index(None, "pool", "status", "priority", "pk"),  # claim order
        Index(None, "team_id", "pool", "status", "priority", "pk"),  # a team's first queued job (claim)
        Index(None, "status", "lease_expires_at"),  # reconciler: expired leases
        UniqueConstraint("team_id", "idempotency_key"),
    )

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, default=lambda: new_id("ftjob-"))
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(24), default=JobStatus.QUEUED.value)
    # What the request asked for, and what it resolved to.
    model: Mapped[str] = mapped_column(String(256))  # base model name or the team's ft: model
    model_source: Mapped[str] = mapped_column(String(1024))  # resolved source the worker loads
    training_file: Mapped[str] = mapped_column(String(40), index=True)
    validation_file: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    method: Mapped[dict[str, Any]] = mapped_column(JSON)  # OpenAI's method object, resolved
    loss: Mapped[str] = mapped_column(String(8))  # sft | dft
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)  # every trainer setting, resolved
    seed: Mapped[int] = mapped_column(BigInteger)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON, nullable=True)
    pool: Mapped[str] = mapped_column(String(64))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    # devices the job trains on, all on one node (K > 1: torchrun, worker/training/distributed.py)
    gpus: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Execution: claim, lease (fencing by attempt), cancel.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # A stop that keeps the job: "pause" (-> paused) or "preempt" (-> queued), each after a checkpoint
    # at the end of the current step; `stop_reason` is the event's text. A cancel wins over both.
    stop_request: Mapped[str | None] = mapped_column(String(16), nullable=True)
    stop_reason: Mapped[str | None] = mapped_column(String(512), nullable=True)
    preemptible: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    preemptions: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    queued_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # when it last joined the queue
    attempt_started_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # this attempt's claim
    queue_reason: Mapped[str | None] = mapped_column(String(512), nullable=True)  # why it waits (queued)
    # Queued: the worker whose jobs it preempted; the slots they free are its own (cleared at claim).
    reserved_worker: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # Running: it took slots reserved for this (queued) job, which preempts it once they are due.
    backfill_for: Mapped[str | None] = mapped_column(String(40), nullable=True)
    dispatched_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # While running: the time up to which its GPU-seconds are in its team's usage (team_usage).
    usage_accounted_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Progress and results.
    steps_completed: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    tokens_per_sec: Mapped[float | None] = mapped_column(Float, nullable=True)
    estimated_finish: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(256), nullable=True, index=True)
    result_files: Mapped[list[Any]] = mapped_column(JSON, default=list)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now_s)
    started_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (Index(None, "job_id", "pk"),)

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, default=lambda: new_id("ftevent-"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    level: Mapped[str] = mapped_column(String(8), default="info")  # info | warn | error
    type: Mapped[str] = mapped_column(String(16), default="message")  # message | metrics
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now_s)


class JobMetric(Base):
    """One row per optimizer step of a job (metrics.jsonl of the trainer); a resumed attempt overwrites."""

    __tablename__ = "job_metrics"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now_s)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step"), Index(None, "job_id", "pk"))

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, default=lambda: new_id("ftckpt-"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    storage_path: Mapped[str] = mapped_column(String(512))  # HF directory, relative to the artifacts
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    fine_tuned_model_checkpoint: Mapped[str] = mapped_column(String(300))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now_s)


class Worker(Base):
    """Heartbeat registry of GPU workers."""

    __tablename__ = "workers"
    __table_args__ = (Index(None, "pool", "last_heartbeat_at"),)

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    pool: Mapped[str] = mapped_column(String(64))
    hostname: Mapped[str] = mapped_column(String(255))
    gpu_name: Mapped[str] = mapped_column(String(128))  # or "cpu"
    gpu_memory_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    slots: Mapped[int] = mapped_column(Integer, default=1, server_default="1")  # GPUs it owns (CPU: slots)
    free_slots: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    current_job_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    started_at: Mapped[float] = mapped_column(Float)
    last_heartbeat_at: Mapped[float] = mapped_column(Float)


class WebhookEndpoint(Base):
    """A URL a team registered to be told when its jobs end (service/webhooks.py)."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (Index(None, "team_id", "pk"),)

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, default=lambda: new_id("wh_"))
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(String(2048))
    events: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)  # event types; None: all
    # The whsec_<base64 key> that signs every delivery, encrypted with the server key (service/webhooks.py).
    secret: Mapped[str] = mapped_column(String(512))
    # After a rotation: the secret it replaced, still accepted by receivers until it expires; each
    # delivery is signed with both until then (Standard Webhooks allows several signatures).
    previous_secret: Mapped[str | None] = mapped_column(String(512), nullable=True)
    previous_secret_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now_s)


class WebhookDelivery(Base):
    """The outbox: one row per (event, endpoint), written in the transaction that ended the job."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index(None, "status", "next_attempt_at"),  # the delivery loop: what is due
        Index(None, "endpoint_id", "pk"),  # an endpoint's deliveries, newest first
        Index(None, "created_at"),  # pruning settled rows past their retention
    )

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, default=lambda: new_id("whdel_"))
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    event_id: Mapped[str] = mapped_column(String(40))  # evt_...: the webhook-id header, same on retries
    event_type: Mapped[str] = mapped_column(String(64))  # fine_tuning.job.succeeded | failed | cancelled
    job_id: Mapped[str] = mapped_column(String(40))
    payload: Mapped[str] = mapped_column(Text)  # the exact JSON body, signed and sent on every attempt
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # None once settled
    last_response_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now_s)
    delivered_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class Pool(Base):
    """A pool jobs may name: declared by an admin, by registering a model in it, or by a worker that
    serves it. A job naming any other pool is refused (it would wait forever).

    Also the broker bookkeeping that keeps at most one dispatch message per pool pending: a message
    is sent only when none was sent since a worker of the pool last took one (service/dispatch.py).
    """

    __tablename__ = "pools"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    declared_by: Mapped[str] = mapped_column(String(16))  # admin | model | worker
    description: Mapped[str | None] = mapped_column(String(512), nullable=True)
    # When a dispatch message was last sent, and when a worker of the pool last consumed one.
    dispatch_sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    dispatch_taken_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now_s)
