"""The reconciler: puts right what crashes and lost messages leave behind. Safe to run anywhere, and
in several places at once (every worker runs it; so does `tunepool up`).

- A running job whose lease expired (its worker died: SIGKILL, OOM, node lost) goes back to
  `queued` and will resume from its last checkpoint, or fails with `worker_lost` once it has used
  `max_attempts` attempts. The change is one conditional UPDATE on the expired lease, so two
  reconcilers cannot both act on it, and the dead worker's late writes are fenced off.
- Workers that stopped heartbeating long ago (killed before they could unregister) leave the
  registry.
- Temporary files in the storage's tmp/ older than `tmp_max_age_s` (a killed upload or results
  write) are deleted.
- Queued jobs that have waited `redispatch_after_s` since their last dispatch message get one sent
  again (the broker was down or lost it, or the API died between commit and send), keeping at most
  one message per pool in the broker (service/pools.py). Messages name a pool, so a surplus one
  costs a worker one empty claim.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import delete, func, select, update

from service.db import Database, rows_updated
from service.jobs import set_status
from service.models import Checkpoint, Job, JobStatus, Worker
from service.pools import dispatch_pending_since, request_dispatch
from service.settings import Settings
from service.storage import Storage
from worker.artifacts import remove_stale_temp_files

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
            if attempt >= settings.max_attempts:
                error = {
                    "code": "worker_lost",
                    "message": f"The job lost its worker {attempt} times ({lost})",
                    "param": None,
                }
                set_status(
                    session, job, S.FAILED, f"Job failed: {error['message']}", level="error", error=error
                )
            else:
                where = f"checkpoint step {step}" if step else "the start (no checkpoint yet)"
                set_status(
                    session, job, S.QUEUED, f"{lost}: restarted from {where} on another worker", level="warn"
                )
                job.worker_id = None
                job.lease_expires_at = None
                job.dispatched_at = None
                requeued.append(job_id)
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
    sent = redispatch_waiting(db, settings)
    try:
        remove_stale_temp_files(Storage(settings.artifacts), settings.tmp_max_age_s)
    except OSError as err:  # storage unreachable or read-only: the jobs above matter more
        log.warning("reconciler: cannot clean the storage's tmp/: %s", err)
    if requeued or sent:
        log.info("reconciler: re-queued %s, dispatch messages sent %s", requeued, sent)
    return {"requeued": requeued, "dispatched": sent}
