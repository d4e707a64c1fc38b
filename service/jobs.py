"""The job lifecycle: one `set_status` for every transition, events, and the job object.

    validating_files -> queued -> running -> succeeded
          |               |   ^      |----> failed
          v               v   |      |----> cancelled
        failed        cancelled      |----> queued   (lease lost, worker shut down, storage full or
                          ^   |      |                read-only, preempted: worker/job_end.py)
                          |   v      '----> paused   (paused after a checkpoint of its step)
                          paused <-- queued          (held; resume: paused -> queued)

Every transition goes through `set_status`, which rejects illegal moves and writes an event.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import ColumnElement, Select, case, func, select
from sqlalchemy.orm import Session, aliased

from service.models import Job, JobEvent, JobStatus, now_s
from service.schemas import Job as JobSchema
from service.schemas import JobError, Progress
from service.webhooks import enqueue_job_event

S = JobStatus
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.VALIDATING_FILES: frozenset({S.QUEUED, S.FAILED, S.CANCELLED}),
    S.QUEUED: frozenset({S.RUNNING, S.FAILED, S.CANCELLED, S.PAUSED}),
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED, S.QUEUED, S.PAUSED}),
    S.PAUSED: frozenset({S.QUEUED, S.CANCELLED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}


class IllegalTransition(ValueError):
    def __init__(self, job: Job, new: JobStatus) -> None:
        super().__init__(f"job {job.id} cannot go from {job.status} to {new.value}")
        self.job = job
        self.new = new


def add_event(
    session: Session,
    job: Job,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
) -> JobEvent:
    event = JobEvent(job_id=job.id, attempt=job.attempt, level=level, type=type, message=message, data=data)
    session.add(event)
    return event


def set_status(
    session: Session,
    job: Job,
    new: JobStatus,
    message: str | None = None,
    *,
    level: str = "info",
    error: dict[str, Any] | None = None,
) -> None:
    """Move `job` to `new` (raises IllegalTransition) and record why; the caller commits."""
    old = JobStatus(job.status)
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(job, new)
    job.status = new.value
    if new == S.QUEUED:
        job.queued_at = time.time()  # the wait that preemption counts starts again
    else:
        job.queue_reason = None
    if new.is_terminal:
        job.finished_at = now_s()
        job.lease_expires_at = None
        job.estimated_finish = None
    if new == S.RUNNING and job.started_at is None:
        job.started_at = now_s()
    if error is not None:
        job.error = error
    add_event(
        session,
        job,
        message or f"Job {new.value.replace('_', ' ')}",
        level=level,
        data={"status": new.value, "from": old.value},
    )
    if new.is_terminal:  # the webhook outbox: written in this same transaction, so never lost
        enqueue_job_event(session, job, new)


def _queued_ahead(pool: Any, priority: Any, pk: Any) -> ColumnElement[int]:
    """Count of the pool's queued jobs ahead of a job (priority first, then age). The arguments are
    values, or the outer query's columns for a correlated subquery; the claim-order index serves it."""
    ahead = aliased(Job)
    return (
        select(func.count())
        .select_from(ahead)
        .where(
            ahead.pool == pool,
            ahead.status == S.QUEUED.value,
            (ahead.priority > priority) | ((ahead.priority == priority) & (ahead.pk < pk)),
        )
        .scalar_subquery()
    )


def queue_position(session: Session, job: Job) -> int | None:
    """1-based place among the pool's queued jobs; None unless queued."""
    if job.status != S.QUEUED.value:
        return None
    return int(session.scalar(select(_queued_ahead(job.pool, job.priority, job.pk))) or 0) + 1


# What the job object shows, as columns named like Job's attributes: rows of `select(*JOB_VIEW)`
# go to `to_schema` as they are. The queue position comes in the same round trip; the CASE keeps
# the count from running for jobs that are not queued.
_VIEW_COLUMNS = [
    "id",
    "created_at",
    "error",
    "fine_tuned_model",
    "finished_at",
    "hyperparameters",
    "model",
    "team_id",
    "result_files",
    "seed",
    "status",
    "trained_tokens",
    "training_file",
    "validation_file",
    "estimated_finish",
    "user_metadata",
    "method",
    "suffix",
    "pool",
    "priority",
    "gpus",
    "attempt",
    "cancel_requested",
    "stop_request",
    "preemptible",
    "preemptions",
    "queue_reason",
    "steps_completed",
    "total_steps",
    "tokens_per_sec",
]
JOB_VIEW = (
    *(getattr(Job, name).label(name) for name in _VIEW_COLUMNS),
    case((Job.status == S.QUEUED.value, _queued_ahead(Job.pool, Job.priority, Job.pk) + 1), else_=None).label(
        "queue_position"
    ),
)


def job_view() -> Select[Any]:
    return select(*JOB_VIEW)


def job_list_view() -> Select[Any]:
    """The job object's columns without the queue position. A list fills that in for its queued jobs
    with one ranked scan per pool (`queue_positions_queries`): a correlated count per row costs one index
    scan of the jobs ahead for each of them (a page of 20 jobs deep in a queue of 6,500 took 21 ms
    of PostgreSQL time; bench/api_load.py's list after its create workload)."""
    return select(*JOB_VIEW[:-1])


def queue_positions_queries(rows: list[Any]) -> list[Any]:
    """Queries of (job id, 1-based queue position) for the queued ones among `rows`, one per pool."""
    by_pool: dict[str, list[Any]] = {}
    for row in rows:
        if row.status == S.QUEUED.value:
            by_pool.setdefault(row.pool, []).append(row)
    queries: list[Any] = []  # Select statements of (id, position)
    for pool, queued in by_pool.items():
        if len(queued) == 1:  # one count of the jobs ahead: cheaper than ranking the whole queue
            ahead = _queued_ahead(pool, queued[0].priority, Job.pk).label("ahead")
            queries.append(select(Job.id, ahead + 1).where(Job.id == queued[0].id))
            continue
        order = func.row_number().over(order_by=(Job.priority.desc(), Job.pk)).label("position")
        ranked = select(Job.id, order).where(Job.pool == pool, Job.status == S.QUEUED.value).subquery()
        queries.append(select(ranked.c.id, ranked.c.position).where(ranked.c.id.in_([r.id for r in queued])))
    return queries


def to_schema(job: Job | Any, *, position: int | None = None) -> JobSchema:
    """The API's job object, from a Job or a row of `job_view()` (which carries its queue position) or
    of `job_list_view()` (whose position is given)."""
    if position is None and not isinstance(job, Job):
        position = getattr(job, "queue_position", None)
    hp = job.hyperparameters
    return JobSchema(
        id=job.id,
        created_at=job.created_at,
        error=JobError(**job.error) if job.error else None,
        fine_tuned_model=job.fine_tuned_model,
        finished_at=job.finished_at,
        hyperparameters={k: hp[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier") if k in hp},
        model=job.model,
        organization_id=job.team_id,
        result_files=list(job.result_files or []),
        seed=job.seed,
        status=job.status,
        trained_tokens=job.trained_tokens,
        training_file=job.training_file,
        validation_file=job.validation_file,
        estimated_finish=job.estimated_finish,
        metadata=job.user_metadata,
        method=job.method,
        user_provided_suffix=job.suffix,
        pool=job.pool,
        priority=job.priority,
        gpus=job.gpus,
        attempt=job.attempt,
        cancel_requested=job.cancel_requested,
        pause_requested=job.stop_request == "pause",
        preemptible=job.preemptible,
        preemptions=job.preemptions,
        progress=Progress(
            steps_completed=job.steps_completed,
            total_steps=job.total_steps,
            trained_tokens=job.trained_tokens,
            tokens_per_sec=job.tokens_per_sec,
        ),
        queue_position=position,
        queue_reason=job.queue_reason if job.status == S.QUEUED.value else None,
    )


def request_pause(session: Session, job: Job) -> None:
    """Queued: held at once (paused). Running: asked to checkpoint its step and stop; the worker makes
    it `paused` and frees its GPUs. Raises IllegalTransition for an ended job or one being cancelled."""
    status = JobStatus(job.status)
    if status.is_terminal or job.cancel_requested or status == S.VALIDATING_FILES:
        raise IllegalTransition(job, S.PAUSED)
    if status == S.QUEUED:
        set_status(session, job, S.PAUSED, "Job paused: held out of the queue until resumed")
    elif status == S.RUNNING and job.stop_request != "pause":
        job.stop_request, job.stop_reason = "pause", "paused on request"
        add_event(session, job, "Pause requested: the job checkpoints its current step, then frees its GPUs")
    session.commit()


def request_resume(session: Session, job: Job) -> None:
    """Paused: back in the queue (it resumes from its checkpoint). Running with a pause not yet done:
    the pause is withdrawn. Raises IllegalTransition for any other job."""
    status = JobStatus(job.status)
    if status == S.PAUSED:
        set_status(session, job, S.QUEUED, "Job resumed: back in the queue, it continues from its checkpoint")
        job.dispatched_at = None
    elif status == S.RUNNING and job.stop_request == "pause":
        job.stop_request = job.stop_reason = None
        add_event(session, job, "Pause withdrawn: the job goes on")
    else:
        raise IllegalTransition(job, S.QUEUED)
    session.commit()


def request_cancel(session: Session, job: Job) -> None:
    """Queued, paused (or validating): cancelled at once. Running: flagged; the worker stops at the next
    step."""
    status = JobStatus(job.status)
    if status.is_terminal:
        raise IllegalTransition(job, S.CANCELLED)
    if status == S.RUNNING:
        if not job.cancel_requested:
            job.cancel_requested = True
            add_event(session, job, "Cancellation requested; the job stops after its current step")
    else:
        job.cancel_requested = True
        set_status(session, job, S.CANCELLED, "Job cancelled")
    session.commit()
