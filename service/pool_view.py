"""The pool as one team sees it (GET /v1/pool, the dashboard's Pool page): read-only queries.

Per pool (declared pools, pools that workers serve, pools with queued or running jobs):

- nodes: the live workers (heartbeat within `lease_s`), each with the running jobs it holds;
- GPUs total / busy / free over those nodes, and the queue (jobs, GPUs asked);
- the caller's team there: GPUs running, decayed usage, share weight, guaranteed GPUs, its share of
  the running GPUs against its fair share, and its queued jobs with their position and reason.

Isolation: a team key gets its own jobs by id and every other team's only as occupied GPUs; no other
team's job id, team name or metadata goes into the objects built here (tests/service/test_isolation.py
checks the response). An admin key (`admin=True`) gets every job id and a row per team.

Nothing here reads a clock or writes: `now` is given, so a test can build the view of any moment.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from service.models import Job, JobStatus, Pool, Team, TeamQuota, TeamUsage, Worker
from service.pool_schemas import (
    PoolGpus,
    PoolNode,
    PoolNodeJob,
    PoolQueue,
    PoolQueuedJob,
    PoolTeamShare,
    PoolView,
    PoolViewList,
)
from service.usage import decayed

RUNNING, QUEUED = JobStatus.RUNNING.value, JobStatus.QUEUED.value
# Queued jobs listed per pool (the counts cover them all): a team's own are bounded by its
# max_queued_jobs, an admin's view of a deep queue is not.
QUEUED_LIST_LIMIT = 500


def alive(now: float, lease_s: float) -> ColumnElement[bool]:
    """Workers that sent a heartbeat within the lease (as /metrics counts them)."""
    return Worker.last_heartbeat_at >= now - lease_s


def usage_now(
    session: Session, now: float, half_life_s: float, team_id: str | None = None
) -> dict[tuple[str, str], float]:
    """(team id, pool) -> GPU-seconds used there, decayed to `now`: the team_usage row plus the seconds
    its running jobs used since they were last counted (what worker/claim.py orders teams by).
    `team_id`: that team's only."""
    rows = select(TeamUsage.team_id, TeamUsage.pool, TeamUsage.gpu_seconds, TeamUsage.as_of)
    running = select(Job.team_id, Job.pool, Job.gpus, Job.usage_accounted_at).where(Job.status == RUNNING)
    if team_id is not None:
        rows = rows.where(TeamUsage.team_id == team_id)
        running = running.where(Job.team_id == team_id)
    usage: dict[tuple[str, str], float] = defaultdict(float)
    for team, pool, gpu_seconds, as_of in session.execute(rows):
        usage[team, pool] += decayed(gpu_seconds, as_of, now, half_life_s)
    for team, pool, gpus, accounted_at in session.execute(running):
        if accounted_at is not None and now > accounted_at:
            usage[team, pool] += gpus * (now - accounted_at)
    return dict(usage)


@dataclass
class _TeamInPool:
    gpus_running: int = 0
    queued_jobs: int = 0
    queued_gpus: int = 0


@dataclass
class _Pool:
    """What the queries found for one pool, before it is cut to what the caller may see."""

    teams: dict[str, _TeamInPool] = field(default_factory=lambda: defaultdict(_TeamInPool))
    gpus_running: int = 0  # every running job's GPUs


@dataclass(frozen=True)
class _ShareContext:
    """One pool's figures, from which each team's row is computed."""

    pool: str
    facts: _Pool
    total_gpus: int  # of the live nodes
    usage: dict[tuple[str, str], float]
    guaranteed: dict[tuple[str, str], int]
    teams: dict[str, Any]  # id -> row of (id, name, share_weight)

    def share(self, team_id: str) -> PoolTeamShare:
        team = self.teams[team_id]
        mine = self.facts.teams.get(team_id, _TeamInPool())
        # Fair share: its weight over the weights of the teams with running or queued jobs here,
        # its own counted even when it has none (what it would get by submitting now).
        active = {t for t, f in self.facts.teams.items() if f.gpus_running or f.queued_jobs} | {team_id}
        weights = sum(self.teams[t].share_weight for t in active if t in self.teams)
        fair = team.share_weight / weights if weights > 0 else 0.0
        running = self.facts.gpus_running
        return PoolTeamShare(
            name=team.name,
            gpus_running=mine.gpus_running,
            usage_gpu_seconds=round(self.usage.get((team_id, self.pool), 0.0), 3),
            share_weight=team.share_weight,
            guaranteed_gpus=self.guaranteed.get((team_id, self.pool), 0),
            share=mine.gpus_running / running if running else 0.0,
            fair_share=fair,
            fair_share_gpus=round(fair * self.total_gpus, 3),
            queued_jobs=mine.queued_jobs,
            queued_gpus=mine.queued_gpus,
        )


def _queued_jobs(
    session: Session, team: Team, admin: bool, names: dict[str, str]
) -> dict[str, list[PoolQueuedJob]]:
    """Per pool, the queued jobs the caller may see by id, in queue order (priority, then age) with
    their 1-based position in the whole pool's queue: the team's own, or (admin) the first of all."""
    position = func.row_number().over(partition_by=Job.pool, order_by=(Job.priority.desc(), Job.pk))
    columns = (Job.id, Job.team_id, Job.pool, Job.gpus, Job.priority, Job.created_at, Job.queue_reason)
    ranked = select(*columns, position.label("position")).where(Job.status == QUEUED).subquery()
    mine = ranked.c.position <= QUEUED_LIST_LIMIT if admin else ranked.c.team_id == team.id
    waiting: dict[str, list[PoolQueuedJob]] = defaultdict(list)
    for row in session.execute(select(ranked).where(mine).order_by(ranked.c.pool, ranked.c.position)):
        if len(waiting[row.pool]) < QUEUED_LIST_LIMIT:
            waiting[row.pool].append(
                PoolQueuedJob(
                    id=row.id,
                    team=names[row.team_id],
                    gpus=row.gpus,
                    priority=row.priority,
                    created_at=row.created_at,
                    queue_position=int(row.position),
                    queue_reason=row.queue_reason,
                )
            )
    return waiting


def _nodes(
    session: Session,
    team: Team,
    admin: bool,
    names: dict[str, str],
    on_node: dict[str, list[tuple[str, str, int]]],
    now: float,
    lease_s: float,
) -> dict[str, list[PoolNode]]:
    """Per pool, its live nodes with the running jobs each holds: the caller's by id (an admin:
    every one), another team's only as its GPU count."""
    nodes: dict[str, list[PoolNode]] = defaultdict(list)
    query = select(Worker).where(alive(now, lease_s)).order_by(Worker.pool, Worker.hostname, Worker.id)
    for worker in session.scalars(query):
        jobs = []
        for job_id, team_id, gpus in on_node.get(worker.id, []):
            shown = admin or team_id == team.id
            jobs.append(
                PoolNodeJob(
                    id=job_id if shown else None,
                    team=names[team_id] if shown else None,
                    own=team_id == team.id,
                    gpus=gpus,
                )
            )
        nodes[worker.pool].append(
            PoolNode(
                id=worker.id,
                hostname=worker.hostname,
                gpu_name=worker.gpu_name,
                slots=worker.slots,
                free_slots=min(max(worker.free_slots, 0), worker.slots),
                last_heartbeat_at=worker.last_heartbeat_at,
                jobs=jobs,
            )
        )
    return nodes


def pool_view(
    session: Session, team: Team, *, admin: bool, now: float, lease_s: float, half_life_s: float
) -> PoolViewList:
    """Every pool as `team` sees it (`admin`: as an admin key sees it)."""
    pools: dict[str, _Pool] = defaultdict(_Pool)
    on_node: dict[str, list[tuple[str, str, int]]] = defaultdict(list)  # worker -> (job, team, gpus)
    running = select(Job.id, Job.team_id, Job.pool, Job.gpus, Job.worker_id).where(Job.status == RUNNING)
    for job_id, team_id, pool, gpus, worker_id in session.execute(running.order_by(Job.pk)):
        pools[pool].teams[team_id].gpus_running += gpus
        pools[pool].gpus_running += gpus
        if worker_id is not None:
            on_node[worker_id].append((job_id, team_id, gpus))
    queued = session.execute(
        select(Job.pool, Job.team_id, func.count(), func.coalesce(func.sum(Job.gpus), 0))
        .where(Job.status == QUEUED)
        .group_by(Job.pool, Job.team_id)
    )
    for pool, team_id, count, gpus in queued:
        pools[pool].teams[team_id].queued_jobs = int(count)
        pools[pool].teams[team_id].queued_gpus = int(gpus)
    # A team key reads its own usage and guarantees only; the weights of the other teams with jobs in
    # a pool come in too (its fair share needs them), but no other team's name leaves this function.
    usage = usage_now(session, now, half_life_s, None if admin else team.id)
    quotas = select(TeamQuota.team_id, TeamQuota.pool, TeamQuota.guaranteed_gpus)
    quotas = quotas if admin else quotas.where(TeamQuota.team_id == team.id)
    guaranteed = {(t, p): g for t, p, g in session.execute(quotas)}
    involved = {t for facts in pools.values() for t in facts.teams} | {t for t, _ in usage}
    involved |= {t for t, _ in guaranteed} | {team.id}
    teams = {
        row.id: row
        for row in session.execute(select(Team.id, Team.name, Team.share_weight).where(Team.id.in_(involved)))
    }
    # The names the caller may read: every team's for an admin, its own otherwise.
    names = {t: row.name for t, row in teams.items() if admin or t == team.id}
    waiting = _queued_jobs(session, team, admin, names)
    nodes = _nodes(session, team, admin, names, on_node, now, lease_s)
    descriptions = dict(session.execute(select(Pool.name, Pool.description)).tuples().all())
    served = set(session.scalars(select(Worker.pool).distinct()))

    views = []
    for name in sorted(set(descriptions) | served | set(pools) | set(nodes)):
        facts = pools[name]
        live = nodes.get(name, [])
        total = sum(n.slots for n in live)
        free = sum(n.free_slots for n in live)
        context = _ShareContext(name, facts, total, usage, guaranteed, teams)
        rows = None
        if admin:
            present = set(facts.teams) | {t for t, p in usage if p == name}
            present |= {t for t, p in guaranteed if p == name}
            rows = sorted(
                (context.share(t) for t in present if t in teams),
                key=lambda s: (-s.gpus_running, -s.queued_jobs, s.name),
            )
        views.append(
            PoolView(
                name=name,
                description=descriptions.get(name),
                gpus=PoolGpus(total=total, busy=total - free, free=free),
                queue=PoolQueue(
                    jobs=sum(f.queued_jobs for f in facts.teams.values()),
                    gpus=sum(f.queued_gpus for f in facts.teams.values()),
                ),
                nodes=live,
                team=context.share(team.id),
                queued_jobs=waiting.get(name, []),
                teams=rows,
            )
        )
    return PoolViewList(data=views)
