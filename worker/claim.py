"""Claiming a job (`claim_next_job`) and fencing every later write of that run (`Fence`).

A free worker takes the next job of its pool in one transaction: `queued -> running`, attempt + 1,
its worker id and a lease. Which job is decided here, when a GPU frees, from the database:

1. teams already at `max_running_jobs` (over all pools) are skipped;
2. then the team with the fewest running jobs in this pool per unit of share weight goes first,
   so one team's hundred jobs cannot starve another team's one;
3. between teams equally served now, the one that started fewer jobs in this pool in the last
   hour (per share weight): on a one-GPU pool, where nothing runs when the worker is free,
   teams take turns;
4. then higher priority, then older.

Races: two workers may pick the same job. On PostgreSQL the claimer locks the job's row with
`FOR UPDATE SKIP LOCKED` (a row another claimer holds is skipped, never waited for); on both
databases the claim is a conditional UPDATE (`WHERE status = 'queued'`), so exactly one wins and
the other tries the next candidate. The team's row is locked
first (PostgreSQL; on SQLite the whole database is), so two claims for one team cannot both pass
its `max_running_jobs` check.

Every later write of the run goes through `Fence`: it touches the job only `WHERE id = ? AND
attempt = ? AND status = 'running'`, so a worker that lost its lease (and whose job was handed to
another worker, attempt + 1) can no longer change anything: its writes raise `LeaseLost`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.db import Database, lock_team, rows_updated
from service.jobs import add_event
from service.models import Job, JobStatus, Team

S = JobStatus


# The window of recent usage that breaks ties between equally served teams.
RECENT_S = 3600.0


class LeaseLost(RuntimeError):
    """The job moved on (lease expired and re-queued, cancelled, finished): stop this run."""


@dataclass(frozen=True)
class Claim:
    job_id: str
    attempt: int
    pool: str


def _running_counts(session: Session, pool: str) -> tuple[dict[str, int], dict[str, int]]:
    """(running jobs per team in `pool`, running jobs per team in all pools)."""
    rows = session.execute(
        select(Job.team_id, Job.pool, func.count())
        .where(Job.status == S.RUNNING.value)
        .group_by(Job.team_id, Job.pool)
    ).all()
    in_pool: dict[str, int] = {}
    total: dict[str, int] = {}
    for team_id, job_pool, n in rows:
        total[team_id] = total.get(team_id, 0) + n
        if job_pool == pool:
            in_pool[team_id] = n
    return in_pool, total


def _recent_starts(session: Session, pool: str, since: float) -> dict[str, int]:
    """Jobs each team started in `pool` since `since` (running or finished)."""
    rows = session.execute(
        select(Job.team_id, func.count())
        .where(Job.pool == pool, Job.started_at >= int(since), Job.status != S.QUEUED.value)
        .group_by(Job.team_id)
    ).all()
    return {team_id: n for team_id, n in rows}


def _candidates(session: Session, pool: str) -> list[tuple[str, str, int, int]]:
    """Each team's first queued job in `pool` (priority, then age): (team id, job id, priority, pk)."""
    ranked = (
        select(
            Job.team_id,
            Job.id,
            Job.priority,
            Job.pk,
            func.row_number()
            .over(partition_by=Job.team_id, order_by=(Job.priority.desc(), Job.pk))
            .label("rank"),
        )
        .where(Job.pool == pool, Job.status == S.QUEUED.value)
        .subquery()
    )
    rows = session.execute(
        select(ranked.c.team_id, ranked.c.id, ranked.c.priority, ranked.c.pk).where(ranked.c.rank == 1)
    ).all()
    return [(r[0], r[1], r[2], r[3]) for r in rows]


def claim_next_job(db: Database, pool: str, worker_id: str, lease_s: float) -> Claim | None:
    """Move the pool's next job (fair share, priority, age) to `running` for this worker, or None."""
    tried: set[str] = set()
    while True:
        with db.session() as session:
            in_pool, total = _running_counts(session, pool)
            started = _recent_starts(session, pool, time.time() - RECENT_S)
            teams = {t.id: t for t in session.scalars(select(Team))}
            order = []
            for team_id, job_id, priority, pk in _candidates(session, pool):
                team = teams.get(team_id)
                if team is None or job_id in tried or total.get(team_id, 0) >= team.max_running_jobs:
                    continue
                weight = max(team.share_weight, 1e-9)
                share = in_pool.get(team_id, 0) / weight
                # Ties (always, on a one-GPU pool: nothing else runs when its worker is free) go
                # to the team that started fewer jobs here lately, so teams take turns.
                recent = started.get(team_id, 0) / weight
                order.append((share, recent, -priority, pk, team_id, job_id))
            if not order:
                return None
            *_, team_id, job_id = min(order)
            tried.add(job_id)
            # Serialise with the team's other claims, then check its quota again under the lock.
            lock_team(session, team_id)
            running = session.scalar(
                select(func.count()).where(Job.team_id == team_id, Job.status == S.RUNNING.value)
            )
            if (running or 0) >= teams[team_id].max_running_jobs:
                session.rollback()
                continue
            # PostgreSQL: lock the job's row, skipping it if a racing claimer holds it (SQLite has
            # no row locks: its single writer and the conditional update below do the same).
            free = session.scalar(
                select(Job.id)
                .where(Job.id == job_id, Job.status == S.QUEUED.value)
                .with_for_update(skip_locked=True)
            )
            if free is None:
                session.rollback()
                continue
            now = time.time()
            won = rows_updated(
                session,
                update(Job)
                .where(Job.id == job_id, Job.status == S.QUEUED.value)
                .values(
                    status=S.RUNNING.value,
                    attempt=Job.attempt + 1,
                    worker_id=worker_id,
                    lease_expires_at=now + lease_s,
                    started_at=func.coalesce(Job.started_at, int(now)),
                    cancel_requested=False,
                ),
            )
            if not won:  # another worker took it first
                session.rollback()
                continue
            job = session.scalars(select(Job).where(Job.id == job_id)).one()  # as the UPDATE left it
            add_event(
                session,
                job,
                f"Job started on worker {worker_id} (attempt {job.attempt})",
                data={"status": S.RUNNING.value, "from": S.QUEUED.value, "worker": worker_id},
            )
            session.commit()
            return Claim(job_id, job.attempt, pool)


class Fence:
    """The writes of one run (one attempt of one job), each refused once the job has moved on."""

    def __init__(self, db: Database, claim: Claim) -> None:
        self.db = db
        self.claim = claim

    @contextmanager
    def write(self) -> Iterator[tuple[Session, Job]]:
        """A transaction that first checks (and locks) the job as still ours; commits at the end."""
        with self.db.session() as session:
            # A no-op UPDATE: takes the row lock (PostgreSQL) or the write lock (SQLite) before
            # anything is read, and tells whether the job is still this attempt's.
            held = rows_updated(
                session,
                update(Job)
                .where(
                    Job.id == self.claim.job_id,
                    Job.attempt == self.claim.attempt,
                    Job.status == S.RUNNING.value,
                )
                .values(attempt=Job.attempt),
            )
            if not held:
                session.rollback()
                raise LeaseLost(
                    f"job {self.claim.job_id} attempt {self.claim.attempt} is no longer running here"
                )
            job = session.scalars(select(Job).where(Job.id == self.claim.job_id)).one()
            yield session, job
            session.commit()

    def heartbeat(self, lease_s: float, **values: Any) -> bool:
        """Extend the lease (and set `values`); returns whether cancellation was requested."""
        with self.write() as (_session, job):
            job.lease_expires_at = time.time() + lease_s
            for key, value in values.items():
                setattr(job, key, value)
            return bool(job.cancel_requested)
