"""The reconciler: puts right what crashes and lost messages leave behind. Safe to run anywhere, and
in several places at once (every worker runs it; so does `tunepool up`).

- A running job whose lease expired (its worker died: SIGKILL, OOM, node lost) goes back to
  `queued` and will resume from its last checkpoint, or fails with `worker_lost` once it has used
  `max_attempts` attempts; a job that was being cancelled, paused or preempted when its worker died
  ends as that asked (cancelled, paused, queued: the stop is not lost with the worker). The change is
  one conditional UPDATE on the expired lease, so two reconcilers cannot both act on it, and the dead
  worker's late writes are fenced off.
- Workers that stopped heartbeating long ago (killed before they could unregister) leave the
  registry.
- Temporary files in the storage's tmp/ older than `tmp_max_age_s` (a killed upload or results
  write) are deleted.
- The pool's policy (worker/scheduling.py) acts: the preemption a pool needs now is asked of its
  victims (each checkpoints its step and returns to the queue; the slots they free are held for the
  job they make way for), and every queued job gets its `queue_reason`. One reconciler at a time per
  pool (the pool's row is locked).
- Queued jobs that have waited `redispatch_after_s` since their last dispatch message get one sent
  again (the broker was down or lost it, or the API died between commit and send), keeping at most
  one message per pool in the broker (service/pools.py). Messages name a pool, so a surplus one
  costs a worker one empty claim.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import Table, bindparam, delete, func, select, update

from service.db import Database, rows_updated
from service.jobs import add_event, set_status
from service.models import Checkpoint, Job, JobStatus, Pool, Worker
from service.pools import dispatch_pending_since, request_dispatch
from service.settings import Settings
from service.storage import Storage
from worker.artifacts import remove_stale_temp_files
from worker.claim import read_snapshot
from worker.scheduling import Candidate, Preemption, PreemptPolicy, preemptions, queue_reasons

log = logging.getLogger("tunepool.reconciler")
S = JobStatus


def requeue_expired(db: Database, settings: Settings, now: float | None = None) -> list[str]:
    """Expired leases -> queued (or failed after max_attempts); the ids of the jobs re-queued."""
    now = time.time() if now is None else now
    with db.session() as session:
        expired = session.execute(
            select(Job.id, Job.attempt).where(Job.status == S.RUNNING.value, Job.lease_expires_at < now)
        ).all()
    requeued = []
    for job_id, attempt in expired:
        with db.session() as session:
            still = rows_updated(
                session,
                update(Job)
                .where(
                    Job.id == job_id,
                    Job.attempt == attempt,
                    Job.status == S.RUNNING.value,
                    Job.lease_expires_at < now,
                )
                .values(attempt=Job.attempt),  # no-op: locks the row, proves the lease is still expired
            )
            if not still:
                continue
            job = session.scalars(select(Job).where(Job.id == job_id)).one()
            step = session.scalar(select(func.max(Checkpoint.step)).where(Checkpoint.job_id == job_id))
            lost = f"worker {job.worker_id} stopped renewing the lease of attempt {attempt}"
            where = f"checkpoint step {step}" if step else "the start (no checkpoint yet)"
            request, reason = job.stop_request, job.stop_reason
            job.stop_request = job.stop_reason = None
            if job.cancel_requested:
                set_status(session, job, S.CANCELLED, f"Job cancelled ({lost} while it stopped)")
            elif request == "pause":
                message = f"Job paused ({lost} while it stopped): it resumes from {where}"
                set_status(session, job, S.PAUSED, message)
            elif attempt >= settings.max_attempts:
                error = {
                    "code": "worker_lost",
                    "message": f"The job lost its worker {attempt} times ({lost})",
                    "param": None,
                }
                set_status(
                    session, job, S.FAILED, f"Job failed: {error['message']}", level="error", error=error
                )
            else:
                message = f"{lost}: restarted from {where} on another worker"
                if request == "preempt":
                    job.preemptions += 1
                    message = f"{reason or 'Preempted'} ({lost} while it stopped); resumes from {where}"
                set_status(session, job, S.QUEUED, message, level="warn")
                requeued.append(job_id)
            if job.status != S.FAILED.value:
                job.worker_id = None
                job.lease_expires_at = None
                job.dispatched_at = None
            session.commit()
    return requeued


def redispatch_waiting(db: Database, settings: Settings, now: float | None = None) -> dict[str, int]:
    """Dispatch messages for pools whose queued jobs waited `redispatch_after_s` since their last one.

    At most one message per pool waits in the broker (service/pools.py): a pool whose message is
    pending gets no other, unless it has been pending that long while an idle worker of the pool
    was alive, which would have taken it: the broker lost it, and it is sent again."""
    now = time.time() if now is None else now
    cutoff = now - settings.redispatch_after_s
    stale = (Job.dispatched_at.is_(None)) | (Job.dispatched_at < cutoff)
    with db.session() as session:
        waiting = session.scalars(
            select(Job.pool).where(Job.status == S.QUEUED.value, stale).group_by(Job.pool)
        ).all()
        idle = dict(
            session.execute(
                select(Worker.pool, func.count())
                .where(Worker.last_heartbeat_at > now - settings.lease_s, Worker.free_slots > 0)
                .group_by(Worker.pool)
            ).all()
        )
    sent: dict[str, int] = {}
    for pool in waiting:
        with db.session() as session:
            pending_since = dispatch_pending_since(session, pool)
            lost = pending_since is not None and pending_since < cutoff and idle.get(pool, 0) > 0
            if pending_since is not None and not lost:
                continue  # the pending message covers these jobs; a worker takes it once one is free
            if request_dispatch(session, settings, pool, force=lost) is None:
                continue  # the broker is unreachable: next round
            sent[pool] = 1
            session.execute(
                update(Job)
                .where(Job.pool == pool, Job.status == S.QUEUED.value, stale)
                .values(dispatched_at=now)
                .execution_options(synchronize_session=False)
            )
            session.commit()
    return sent


def schedule_pools(db: Database, settings: Settings, now: float | None = None) -> list[Preemption]:
    """For each pool with queued jobs: ask the victims of the preemption it needs now (if any) to
    stop, and write every queued job's reason for waiting. The preemptions asked."""
    now = time.time() if now is None else now
    policy = PreemptPolicy(
        settings.fairshare_preempt, settings.preempt_after_s, settings.preempt_min_runtime_s
    )
    with db.session() as session:
        pools = session.scalars(select(Job.pool).where(Job.status == S.QUEUED.value).group_by(Job.pool)).all()
    asked = []
    for pool in pools:
        with db.session() as session:
            session.execute(select(Pool.name).where(Pool.name == pool).with_for_update())  # one at a time
            snapshot = read_snapshot(
                session, pool, now, settings.fairshare_half_life_s, settings.lease_s
            )
            for preemption in preemptions(snapshot, policy):
                if _preempt(session, preemption):
                    asked.append(preemption)
            rows = session.execute(
                select(
                    Job.team_id, Job.id, Job.gpus, Job.priority, Job.pk, Job.queued_at, Job.reserved_worker,
                    Job.queue_reason,
                ).where(Job.pool == pool, Job.status == S.QUEUED.value)
            ).all()  # fmt: skip
            reasons = queue_reasons(snapshot, [Candidate(*row[:-1]) for row in rows])
            now_shown = {row[1]: row[-1] for row in rows}
            changed = [
                {"job_id": job_id, "reason": reason[:512]}
                for job_id, reason in reasons.items()
                if now_shown.get(job_id, reason) != reason
            ]
            if changed:  # one statement, many rows (Core: the ORM's bulk form wants primary keys)
                jobs = Job.__table__
                assert isinstance(jobs, Table)
                session.connection().execute(
                    update(jobs)
                    .where(jobs.c.id == bindparam("job_id"), jobs.c.status == S.QUEUED.value)
                    .values(queue_reason=bindparam("reason")),
                    changed,
                )
            session.commit()
    return asked


def _preempt(session: Any, preemption: Preemption) -> bool:
    """Ask the victims to stop (each still running and not stopping already) and hold their node for
    the job they make way for; whether every victim was asked."""
    for victim in preemption.victims:
        asked = rows_updated(
            session,
            update(Job)
            .where(
                Job.id == victim.job_id,
                Job.status == S.RUNNING.value,
                Job.stop_request.is_(None),
                Job.cancel_requested.is_(False),
            )
            .values(stop_request="preempt", stop_reason=preemption.reason),
        )
        if not asked:
            session.rollback()
            return False
    for victim in preemption.victims:
        job = session.scalars(select(Job).where(Job.id == victim.job_id)).one()
        add_event(
            session,
            job,
            f"{preemption.reason}: the job checkpoints its current step and returns to the queue",
            level="warn",
            data={"preempted_by": preemption.job.job_id, "node": preemption.node},
        )
    job = session.scalars(select(Job).where(Job.id == preemption.job.job_id)).one()
    job.reserved_worker = preemption.node
    names = ", ".join(v.job_id for v in preemption.victims)
    add_event(session, job, f"Preempting {names} on worker {preemption.node}: their GPUs go to this job")
    log.info("preempting %s for %s (%s)", names, preemption.job.job_id, preemption.reason)
    return True


def forget_dead_workers(db: Database, settings: Settings, now: float | None = None) -> int:
    """Drop registry rows of workers silent for ten leases (killed before they could unregister)."""
    cutoff = (time.time() if now is None else now) - 10 * settings.lease_s
    with db.session() as session:
        gone = rows_updated(session, delete(Worker).where(Worker.last_heartbeat_at < cutoff))
        session.commit()
    return gone


def reconcile(db: Database, settings: Settings) -> dict[str, Any]:
    forget_dead_workers(db, settings)
    requeued = requeue_expired(db, settings)
    try:
        preempted = schedule_pools(db, settings)
    except Exception:  # the policy must never keep the rest (re-dispatch, clean-up) from running
        log.exception("reconciler: scheduling the pools failed")
        preempted = []
    sent = redispatch_waiting(db, settings)
    try:
        remove_stale_temp_files(Storage(settings.artifacts), settings.tmp_max_age_s)
    except OSError as err:  # storage unreachable or read-only: the jobs above matter more
        log.warning("reconciler: cannot clean the storage's tmp/: %s", err)
    if requeued or sent:
        log.info("reconciler: re-queued %s, dispatch messages sent %s", requeued, sent)
    return {"requeued": requeued, "dispatched": sent, "preempted": [p.job.job_id for p in preempted]}
