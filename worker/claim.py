"""Claiming a job (`claim_next_job`), fencing every later write of that run (`Fence`), and
counting the GPU time each team uses (`account_usage`).

A free worker takes the next job of its pool in one transaction: `queued -> running`, attempt + 1,
its worker id and a lease. Which job is decided when a GPU frees, by worker/scheduling.py's
`rank` over a snapshot of the pool read here: teams at `max_running_jobs` or `max_gpus` skipped,
jobs that do not fit the node's free slots skipped, then the fewest GPUs running in the pool per
share weight, then the least decayed GPU-seconds used there per share weight (half-life
`TUNEPOOL_FAIRSHARE_HALF_LIFE_S`), then priority, then age.

Races: two workers may pick the same job. On PostgreSQL the claimer locks the job's row with
`FOR UPDATE SKIP LOCKED` (a row another claimer holds is skipped, never waited for); on both
databases the claim is a conditional UPDATE (`WHERE status = 'queued'`), so exactly one wins and
the other tries the next candidate. The team's row is locked
first (PostgreSQL; on SQLite the whole database is), so two claims for one team cannot both pass
its `max_running_jobs` and `max_gpus` checks.

Every later write of the run goes through `Fence`: it touches the job only `WHERE id = ? AND
attempt = ? AND status = 'running'`, so a worker that lost its lease (and whose job was handed to
another worker, attempt + 1) can no longer change anything: its writes raise `LeaseLost`. Each
fenced write (heartbeats every few seconds, the run's end) also adds the GPU-seconds the run used
since the last one to its team's usage row (created at the claim, under the team's lock, so that a
write locks only that row); a run that dies uncounted loses at most one heartbeat's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.db import Database, lock_team, rows_updated
from service.jobs import add_event
from service.models import Job, JobStatus, Team, TeamQuota, TeamUsage, Worker
from service.usage import add_usage, decayed
from worker.scheduling import (
    Candidate,
    Running,
    Snapshot,
    TeamState,
    backfill_for,
    limit_reason,
    rank,
)

S = JobStatus
DEFAULT_HALF_LIFE_S = 86400.0  # TUNEPOOL_FAIRSHARE_HALF_LIFE_S's default


class LeaseLost(RuntimeError):
    """The job moved on (lease expired and re-queued, cancelled, finished): stop this run."""


@dataclass(frozen=True)
class Claim:
    job_id: str
    attempt: int
    pool: str
    gpus: int = 1  # slots of the claiming node it takes


def read_snapshot(
    session: Session,
    pool: str,
    now: float,
    half_life_s: float,
    lease_s: float,
    *,
    node: str | None = None,
    free_slots: int = 0,
    skip: frozenset[str] = frozenset(),
) -> Snapshot:
    """The pool as worker/scheduling.py sees it: teams, each team's first queued job, the live
    nodes (workers heartbeating within the lease) and the running jobs; `node` is the claiming one."""
    running: list[Running] = []
    teams = _team_states(session, pool, now, half_life_s, running)
    nodes = dict(
        session.execute(
            select(Worker.id, Worker.slots).where(
                Worker.pool == pool, Worker.last_heartbeat_at > now - lease_s
            )
        ).all()
    )
    if node is not None and node not in nodes:  # not registered (yet): what it says it has
        nodes[node] = free_slots + sum(r.gpus for r in running if r.node == node)
    return Snapshot(teams, _candidates(session, pool), free_slots, skip, node, nodes, running, now, pool)


def _team_states(
    session: Session, pool: str, now: float, half_life_s: float, in_pool: list[Running]
) -> dict[str, TeamState]:
    """Every team with its running jobs and GPUs (all pools, this pool) and its usage here now; the
    pool's running jobs are added to `in_pool`."""
    running: dict[str, list[int]] = {}  # team -> [jobs, gpus, gpus in pool]
    unaccounted: dict[str, float] = {}  # team -> GPU-seconds of its running jobs here not yet counted
    rows = session.execute(
        select(
            Job.team_id, Job.pool, Job.gpus, Job.usage_accounted_at, Job.id, Job.worker_id, Job.priority,
            Job.preemptible, Job.attempt_started_at, Job.estimated_finish, Job.stop_request,
            Job.cancel_requested, Job.backfill_for,
        ).where(Job.status == S.RUNNING.value)
    ).all()  # fmt: skip
    for team_id, job_pool, gpus, accounted_at, *job in rows:
        counts = running.setdefault(team_id, [0, 0, 0])
        counts[0] += 1
        counts[1] += gpus
        if job_pool == pool:
            counts[2] += gpus
            if accounted_at is not None and now > accounted_at:
                unaccounted[team_id] = unaccounted.get(team_id, 0.0) + gpus * (now - accounted_at)
            job_id, worker, priority, preemptible, started, finish, stop, cancel, backfill = job
            stop = "cancel" if cancel else stop
            in_pool.append(
                Running(job_id, team_id, gpus, worker, priority, preemptible, started, finish, stop, backfill)
            )
    usage = {
        team_id: decayed(gpu_seconds, as_of, now, half_life_s)
        for team_id, gpu_seconds, as_of in session.execute(
            select(TeamUsage.team_id, TeamUsage.gpu_seconds, TeamUsage.as_of).where(TeamUsage.pool == pool)
        )
    }
    guaranteed = dict(
        session.execute(
            select(TeamQuota.team_id, TeamQuota.guaranteed_gpus).where(TeamQuota.pool == pool)
        ).all()
    )
    states = {}
    teams = session.execute(select(Team.id, Team.share_weight, Team.max_running_jobs, Team.max_gpus))
    for team_id, weight, max_running_jobs, max_gpus in teams:
        jobs, gpus, here = running.get(team_id, (0, 0, 0))
        states[team_id] = TeamState(
            id=team_id,
            share_weight=weight,
            max_running_jobs=max_running_jobs,
            max_gpus=max_gpus,
            running_jobs=jobs,
            gpus_running=gpus,
            gpus_in_pool=here,
            usage=usage.get(team_id, 0.0) + unaccounted.get(team_id, 0.0),
            guaranteed_gpus=guaranteed.get(team_id, 0),
        )
    return states


def _candidates(session: Session, pool: str) -> list[Candidate]:
    """Each team's first queued job in `pool` (priority, then age): one lookup of the queue index per
    team, so that the cost follows the number of teams, not the length of the queue (ranking the
    whole queue took ~100 ms at 10,000 queued jobs; bench/claim_time.py)."""
    first = (
        select(Job.pk)
        .where(Job.team_id == Team.id, Job.pool == pool, Job.status == S.QUEUED.value)
        .order_by(Job.priority.desc(), Job.pk)
        .limit(1)
        .correlate(Team)
        .scalar_subquery()
    )
    firsts = select(first).select_from(Team)
    rows = session.execute(
        select(
            Job.team_id, Job.id, Job.gpus, Job.priority, Job.pk, Job.queued_at, Job.reserved_worker,
            Job.preemptible,
        ).where(Job.pk.in_(firsts))
    ).all()  # fmt: skip
    return [Candidate(*r) for r in rows]


def claim_next_job(
    db: Database,
    pool: str,
    worker_id: str,
    lease_s: float,
    *,
    free_slots: int = 1,
    half_life_s: float = DEFAULT_HALF_LIFE_S,
    now: float | None = None,
) -> Claim | None:
    """Move the pool's next job that fits `free_slots` (worker/scheduling.py's order) to `running`
    for this worker, or None. `now` (default: the clock) is for tests of the decayed usage."""
    tried: set[str] = set()
    while True:
        with db.session() as session:
            at = time.time() if now is None else now
            snapshot = read_snapshot(
                session, pool, at, half_life_s, lease_s,
                node=worker_id, free_slots=free_slots, skip=frozenset(tried),
            )  # fmt: skip
            teams = snapshot.teams
            order = rank(snapshot)
            if not order:
                return None
            job_id, team_id = order[0].job_id, order[0].team_id
            backfill = backfill_for(snapshot, order[0])
            tried.add(job_id)
            # Serialise with the team's other claims, then check its limits again under the lock.
            lock_team(session, team_id)
            running, gpus = session.execute(
                select(func.count(), func.coalesce(func.sum(Job.gpus), 0)).where(
                    Job.team_id == team_id, Job.status == S.RUNNING.value
                )
            ).one()
            now_team = replace(teams[team_id], running_jobs=running, gpus_running=gpus)
            if limit_reason(now_team, order[0].gpus) is not None:
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
            won = rows_updated(
                session,
                update(Job)
                .where(Job.id == job_id, Job.status == S.QUEUED.value)
                .values(
                    status=S.RUNNING.value,
                    attempt=Job.attempt + 1,
                    worker_id=worker_id,
                    lease_expires_at=at + lease_s,
                    usage_accounted_at=at,
                    started_at=func.coalesce(Job.started_at, int(at)),
                    attempt_started_at=at,
                    cancel_requested=False,
                    stop_request=None,
                    stop_reason=None,
                    queue_reason=None,
                    reserved_worker=None,
                    backfill_for=backfill,
                ),
            )
            if not won:  # another worker took it first
                session.rollback()
                continue
            job = session.scalars(select(Job).where(Job.id == job_id)).one()  # as the UPDATE left it
            _ensure_usage_row(session, team_id, pool, at)  # its fenced writes lock only that row
            if backfill is not None:
                add_event(
                    session, job, f"Started as backfill on GPUs reserved for {backfill}: it is preempted "
                    "when they are due, and resumes from its checkpoint", level="warn",
                )  # fmt: skip
            add_event(
                session,
                job,
                f"Job started on worker {worker_id} (attempt {job.attempt})",
                data={"status": S.RUNNING.value, "from": S.QUEUED.value, "worker": worker_id},
            )
            session.commit()
            return Claim(job_id, job.attempt, pool, job.gpus)


def _ensure_usage_row(session: Session, team_id: str, pool: str, now: float) -> None:
    """The team's usage row in `pool` exists (the caller holds the team's lock)."""
    if session.get(TeamUsage, (team_id, pool)) is None:
        session.add(TeamUsage(team_id=team_id, pool=pool, gpu_seconds=0.0, as_of=now))


def account_usage(session: Session, job: Job, now: float, half_life_s: float) -> None:
    """Add the GPU-seconds `job` (running) used since it was last counted to its team's usage in
    its pool, decayed to `now`. Locks only the usage row, which the claim created under the team's
    lock (a heartbeat every few seconds per job must not queue behind the team's job creations)."""
    since = job.usage_accounted_at
    if since is None or now <= since:
        return
    usage = session.get(TeamUsage, (job.team_id, job.pool), with_for_update=True)
    used = job.gpus * (now - since)
    if usage is None:  # a job claimed before usage rows were made at claim time
        lock_team(session, job.team_id)
        _ensure_usage_row(session, job.team_id, job.pool, now)
        session.flush()
        usage = session.get(TeamUsage, (job.team_id, job.pool), with_for_update=True)
        assert usage is not None
    usage.gpu_seconds = add_usage(usage.gpu_seconds, usage.as_of, now, half_life_s, used)
    usage.as_of = max(usage.as_of, now)
    job.usage_accounted_at = now


class Fence:
    """The writes of one run (one attempt of one job), each refused once the job has moved on."""

    def __init__(self, db: Database, claim: Claim, half_life_s: float = DEFAULT_HALF_LIFE_S) -> None:
        self.db = db
        self.claim = claim
        self.half_life_s = half_life_s

    @contextmanager
    def write(self) -> Iterator[tuple[Session, Job]]:
        """A transaction that first checks (and locks) the job as still ours and counts the GPU time
        used since the last write; commits at the end."""
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
            account_usage(session, job, time.time(), self.half_life_s)
            yield session, job
            session.commit()

    def heartbeat(self, lease_s: float, **values: Any) -> str | None:
        """Extend the lease (and set `values`); returns the stop asked of the run, if any: "cancel",
        or "pause" / "preempt" (both checkpoint the current step first)."""
        with self.write() as (_session, job):
            job.lease_expires_at = time.time() + lease_s
            for key, value in values.items():
                setattr(job, key, value)
            return "cancel" if job.cancel_requested else job.stop_request
