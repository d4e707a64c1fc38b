"""Which job a free worker takes (worker/claim.py), through real worker processes and real claims.

- fair share: one team's ten queued jobs do not make two other teams' one job each wait;
- a team's `max_running_jobs` holds with idle workers standing by;
- workers racing over the same queue claim every job exactly once (real OS processes, no training);
- the claim order itself: priority then age within a team, fewest running (per share weight)
  team first, teams at their limit skipped;
- fair share in GPU time: GPUs running count (not jobs), then decayed GPU-seconds (a half-life),
  and `max_gpus` over all pools.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select, update

from service.jobs import set_status
from service.models import Job, JobEvent, JobStatus, Team, TeamUsage, Worker
from service.teams import set_quota
from tests.e2e.conftest import TERMINAL, System
from tests.service.conftest import ROOT, TeamClient
from worker.claim import account_usage, claim_next_job
from worker.reconciler import schedule_pools

ONE_STEP = {"max_steps": 1}
STARTED = "Job started on worker %"


def quota(system: System, team: TeamClient, **limits: Any) -> None:
    with system.stack.db.session() as session:
        set_quota(session, team.name, **limits)


def start_events(system: System) -> list[tuple[str, str]]:
    """(job id, worker id) of every "Job started on worker" event, in commit order."""
    with system.stack.db.session() as session:
        rows = session.execute(
            select(JobEvent.job_id, JobEvent.data).where(JobEvent.message.like(STARTED)).order_by(JobEvent.pk)
        ).all()
    return [(job_id, (data or {})["worker"]) for job_id, data in rows]


def wait_until(condition: Callable[[], bool], timeout: float, what: str, system: System) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{system.worker_logs()}")
        if system.workers and all(p.poll() is not None for p in system.workers):
            raise AssertionError(f"every worker exited while waiting for {what}\n{system.worker_logs()}")
        time.sleep(0.2)


def stop_workers(system: System) -> None:
    """SIGTERM every worker at once (each takes seconds to shut down) and wait for them all."""
    for proc in system.workers:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in system.workers:
        proc.wait(60)


def statuses(system: System, job_ids: list[str]) -> dict[str, str]:
    with system.stack.db.session() as session:
        return dict(session.execute(select(Job.id, Job.status).where(Job.id.in_(job_ids))).all())


def test_fair_share_ten_jobs_of_one_team_do_not_starve_two_other_teams(system: System) -> None:
    a, b, c = system.team(), system.team(), system.team()
    quota(system, a, max_running_jobs=10)  # A's own limit is not what holds it back
    file_a, file_b, file_c = system.new_file(a, n=4), system.new_file(b, n=4), system.new_file(c, n=4)
    # Everything is queued before any worker exists: in arrival order B and C would be 11th and 12th.
    a_jobs = [system.submit(a, file_a, hyperparameters=ONE_STEP)["id"] for _ in range(10)]
    b_job = system.submit(b, file_b, hyperparameters=ONE_STEP)["id"]
    c_job = system.submit(c, file_c, hyperparameters=ONE_STEP)["id"]
    system.start_worker()
    system.start_worker()

    def started() -> set[str]:
        return {job for job, _ in start_events(system)}

    wait_until(lambda: {b_job, c_job} <= started(), 180, "B's and C's jobs to start", system)
    # The order is decided; the rest of A's queue would only make the test longer. Newest first, so
    # that a claim made meanwhile still takes A's oldest queued job.
    for job_id in reversed(a_jobs):
        if job_id not in started():
            a.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    every = [*a_jobs, b_job, c_job]
    wait_until(lambda: set(statuses(system, every).values()) <= TERMINAL, 180, "the jobs to end", system)

    events = start_events(system)
    order = [job for job, _ in events]
    names = {job: f"A{i + 1}" for i, job in enumerate(a_jobs)} | {b_job: "B", c_job: "C"}
    seen = [names[job] for job in order]  # e.g. A1 B A2 C A3 (the first two at once, one per worker)
    assert len(order) == len(set(order)), f"a job was started twice: {seen}"
    a_started = [job for job in order if job in a_jobs]
    assert a_started == a_jobs[: len(a_started)], f"A's jobs start in the order submitted: {seen}"
    # In arrival order they would start 11th and 12th; with fair share each goes at the first claim
    # where its team runs fewer jobs than A (typically A1 B A2 C, or A1 B C).
    a_before_b = sum(x.startswith("A") for x in seen[: seen.index("B")])
    a_before_c = sum(x.startswith("A") for x in seen[: seen.index("C")])
    assert a_before_b <= 2, f"B's job started after A's third job: {seen}"
    assert a_before_c <= 3, f"C's job started after A's fourth job: {seen}"
    assert len({worker for _, worker in events}) == 2, f"both workers took jobs: {events}"
    final = statuses(system, every)
    decided = order[: max(order.index(b_job), order.index(c_job)) + 1]  # none of these was cancelled
    assert all(final[job] == "succeeded" for job in decided), (final, system.worker_logs())
    stop_workers(system)


def test_max_running_jobs_holds_with_a_second_worker_idle(system: System) -> None:
    team = system.team()
    quota(system, team, max_running_jobs=1)
    file_id = system.new_file(team, n=4)
    jobs = [system.submit(team, file_id, hyperparameters=ONE_STEP)["id"] for _ in range(3)]
    system.start_worker()
    system.start_worker()

    most_running = 0
    workers_seen = 0
    deadline = time.monotonic() + 240
    while True:
        with system.stack.db.session() as session:
            running = session.scalar(
                select(func.count()).where(Job.team_id == team.team_id, Job.status == JobStatus.RUNNING.value)
            )
            done = session.scalar(select(func.count()).where(Job.id.in_(jobs), Job.status.in_(TERMINAL)))
            alive = session.scalar(select(func.count()).select_from(Worker))
        most_running = max(most_running, int(running or 0))
        if running:
            workers_seen = max(workers_seen, int(alive or 0))
        if done == len(jobs):
            break
        assert time.monotonic() < deadline, f"jobs still running\n{system.worker_logs()}"
        time.sleep(0.05)
    stop_workers(system)

    assert most_running == 1, f"{most_running} jobs of a team with max_running_jobs=1 ran at once"
    assert workers_seen == 2, "a second worker was registered (and idle) while a job ran"
    with system.stack.db.session() as session:
        rows = session.execute(
            select(JobEvent.job_id, JobEvent.pk, JobEvent.message).where(JobEvent.job_id.in_(jobs))
        ).all()
        ended = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(jobs)))}
    assert all(ended[job].status == "succeeded" for job in jobs), system.worker_logs()
    # Each run, from its claim to its last event (in commit order), lies wholly before the next one.
    spans = sorted(
        (
            min(pk for job_id, pk, message in rows if job_id == job and message.startswith("Job started")),
            max(pk for job_id, pk, _ in rows if job_id == job),
        )
        for job in jobs
    )
    assert all(prev[1] < nxt[0] for prev, nxt in itertools.pairwise(spans)), spans
    # And by the clock: each job started no earlier than the one before it finished.
    times = sorted((ended[job].started_at or 0, ended[job].finished_at or 0) for job in jobs)
    assert all(prev[1] <= nxt[0] for prev, nxt in itertools.pairwise(times)), times


# A claimer: waits for a common start time, then claims until nothing is left for it.
RACER = """
import json, sys, time
from service.db import Database
from service.settings import load_settings
from worker.claim import account_usage, claim_next_job

worker_id, start_at = sys.argv[1], float(sys.argv[2])
db = Database(load_settings())
time.sleep(max(0.0, start_at - time.time()))
while (claim := claim_next_job(db, "default", worker_id, 600.0)) is not None:
    print(json.dumps([claim.job_id, claim.attempt]), flush=True)
"""


def test_racing_workers_claim_each_job_exactly_once(system: System) -> None:
    x, y, z = system.team(), system.team(), system.team()
    quota(system, x, max_running_jobs=100)
    quota(system, y, max_running_jobs=100)
    # z's weight makes every racer go for z's jobs first, all at once: they must not take a fourth.
    quota(system, z, max_running_jobs=3, share_weight=100.0)
    files = {t.name: system.new_file(t, n=4) for t in (x, y, z)}
    limited = [system.submit(z, files[z.name])["id"] for _ in range(6)]
    free = [system.submit(t, files[t.name])["id"] for _ in range(10) for t in (x, y)]

    start_at = time.time() + 4  # after every racer has imported and connected
    racers = {
        f"racer-{i}": subprocess.Popen(
            [sys.executable, "-c", RACER, f"racer-{i}", str(start_at)],
            cwd=ROOT,
            env=system.stack.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(4)
    }
    claimed: list[tuple[str, str, int]] = []
    for name, proc in racers.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        claimed += [(name, *json.loads(line)) for line in out.decode().splitlines()]

    job_ids = [job for _, job, _ in claimed]
    assert sorted(job_ids) == sorted({*job_ids}), f"a job was claimed twice: {claimed}"
    assert set(free) <= set(job_ids), f"jobs left unclaimed: {set(free) - set(job_ids)}"
    assert len(set(limited) & set(job_ids)) == 3, f"team z (max_running_jobs=3) got {claimed}"
    assert len({name for name, _, _ in claimed}) >= 2, f"only one racer ever won: {claimed}"
    with system.stack.db.session() as session:
        rows = {j.id: j for j in session.scalars(select(Job))}
        started = session.execute(
            select(JobEvent.job_id, func.count())
            .where(JobEvent.message.like(STARTED))
            .group_by(JobEvent.job_id)
        ).all()
    for name, job_id, attempt in claimed:
        job = rows[job_id]
        assert (job.status, job.attempt, job.worker_id, attempt) == ("running", 1, name, 1), job_id
    assert dict(started) == dict.fromkeys(job_ids, 1)
    assert sum(j.status == "queued" for j in rows.values()) == 3


def test_claim_order_priority_age_fair_share_weights_and_limits(system: System) -> None:
    db = system.stack.db

    def claim(pool: str) -> str | None:
        got = claim_next_job(db, pool, f"test:{pool}", 600.0)
        return got.job_id if got else None

    def jobs(team: TeamClient, pool: str, *priorities: int) -> list[str]:
        file_id = system.new_file(team, n=4)
        system.stack.declare_pool(pool)
        return [system.submit(team, file_id, pool=pool, priority=p)["id"] for p in priorities]

    # Within a team: higher priority first, then older.
    solo = system.team()
    quota(system, solo, max_running_jobs=100)
    p0, p5, q0, q5, low = jobs(solo, "prio", 0, 5, 0, 5, -3)
    assert [claim("prio") for _ in range(6)] == [p5, q5, p0, q0, low, None]

    # Between teams: the one with fewer running jobs goes first, whatever the priorities and ages.
    a, b = system.team(), system.team()
    quota(system, a, max_running_jobs=100)
    quota(system, b, max_running_jobs=100)
    a1, a2, a3 = jobs(a, "fair", 9, 9, 0)
    b1, b2 = jobs(b, "fair", 0, 0)
    # Running (a, b) at each claim: (0, 0) a1; (1, 0) b1, though a2 is older and of priority 9;
    # (1, 1) a2; (2, 1) b2; (2, 2) a3.
    assert [claim("fair") for _ in range(6)] == [a1, b1, a2, b2, a3, None]

    # Share weight: running jobs count per unit of weight (heavy: 2, light: 1).
    heavy, light = system.team(), system.team()
    quota(system, heavy, max_running_jobs=100, share_weight=2.0)
    quota(system, light, max_running_jobs=100)
    h1, h2, h3, h4 = jobs(heavy, "weighted", 0, 0, 0, 0)
    l1, l2 = jobs(light, "weighted", 0, 0)
    # shares (heavy, light) at each claim: (0, 0) h1; (0.5, 0) l1; (0.5, 1) h2; (1, 1) h3 older;
    # (1.5, 1) l2; (1.5, 2) h4. With equal weights it would be h1 l1 h2 l2 h3 h4.
    assert [claim("weighted") for _ in range(7)] == [h1, l1, h2, h3, l2, h4, None]

    # A team at max_running_jobs is skipped, counting its jobs running in every pool.
    capped, other = system.team(), system.team()
    quota(system, capped, max_running_jobs=1)
    quota(system, other, max_running_jobs=100)
    m1, m2 = jobs(capped, "quota", 5, 5)
    n1, n2 = jobs(other, "quota", 0, 0)
    assert [claim("quota") for _ in range(4)] == [m1, n1, n2, None]
    with db.session() as session:  # m1 ends: capped may run one again
        job = session.scalars(select(Job).where(Job.id == m1)).one()
        set_status(session, job, JobStatus.SUCCEEDED)
        session.commit()
    [elsewhere] = jobs(capped, "elsewhere", 0)
    assert claim("elsewhere") == elsewhere  # now capped's one running job is in another pool
    assert claim("quota") is None
    quota(system, capped, max_running_jobs=2)
    assert [claim("quota"), claim("quota")] == [m2, None]

    with db.session() as session:
        rows = session.execute(select(Job.id, Job.status, Job.attempt, Job.worker_id)).all()
    claimed = [r for r in rows if r.status == "running"]
    assert all(r.attempt == 1 and r.worker_id and r.worker_id.startswith("test:") for r in claimed)


HALF_LIFE = 86400.0


def finish(system: System, job_id: str, at: float) -> None:
    """The job ran until `at` (its GPU-seconds counted, as its last fenced write would) and ended."""
    with system.stack.db.session() as session:
        job = session.scalars(select(Job).where(Job.id == job_id)).one()
        account_usage(session, job, at, HALF_LIFE)
        set_status(session, job, JobStatus.SUCCEEDED)
        session.commit()


def set_gpus(system: System, job_ids: list[str], gpus: int) -> None:
    with system.stack.db.session() as session:
        session.execute(update(Job).where(Job.id.in_(job_ids)).values(gpus=gpus))
        session.commit()


def test_one_worker_pool_teams_take_turns(system: System) -> None:
    """On a one-GPU pool nothing else runs when the worker is free: ties go to the team with less
    GPU time used there lately, so a team with many queued jobs does not go first every time."""
    db = system.stack.db
    a, b = system.team(), system.team()
    quota(system, a, max_running_jobs=100)
    a_file, b_file = system.new_file(a, n=4), system.new_file(b, n=4)
    system.stack.declare_pool("one")
    a1, a2, a3 = (system.submit(a, a_file, pool="one")["id"] for _ in range(3))
    b1, b2 = (system.submit(b, b_file, pool="one")["id"] for _ in range(2))
    order = []
    clock = time.time()
    for _ in range(6):
        got = claim_next_job(db, "one", "test:one", 600.0, now=clock)
        if got is None:
            break
        order.append(got.job_id)
        clock += 60.0  # each job runs a minute, then the one worker claims again
        finish(system, got.job_id, clock)
    assert order == [a1, b1, a2, b2, a3]
    with db.session() as session:
        used = {
            u.team_id: u.gpu_seconds
            for u in session.scalars(select(TeamUsage).where(TeamUsage.pool == "one"))
        }
    assert 119.0 < used[b.team_id] < 120.0  # two one-GPU minutes, the first slightly decayed
    assert 179.0 < used[a.team_id] < 180.0  # three


def test_fair_share_counts_gpus_and_decayed_usage(system: System) -> None:
    db = system.stack.db
    system.stack.declare_pool("gpus")

    def submit(team: TeamClient, n: int) -> list[str]:
        file_id = system.new_file(team, n=4)
        return [system.submit(team, file_id, pool="gpus")["id"] for _ in range(n)]

    def claim(at: float, free: int = 8) -> str | None:
        got = claim_next_job(db, "gpus", "test:gpus", 600.0, free_slots=free, half_life_s=HALF_LIFE, now=at)
        return got.job_id if got else None

    # Running one job each, a team on 2 GPUs is behind a team on 1: GPUs count, not jobs.
    a, b = system.team(), system.team()
    for t in (a, b):
        quota(system, t, max_running_jobs=100)
    (a1, a2), (b1, b2) = submit(a, 2), submit(b, 2)
    set_gpus(system, [a1], 2)
    now = time.time()
    assert [claim(now), claim(now)] == [a1, b1]  # a is older; then (2 GPUs, 0): b
    assert claim(now) == b2  # (2, 1): b again, though a2 is older
    assert claim(now) == a2  # (2, 2)
    # Usage: a running job's GPU-seconds count from its claim, K per second.
    with db.session() as session:
        job = session.scalars(select(Job).where(Job.id == a1)).one()
        account_usage(session, job, now + 100.0, HALF_LIFE)
        session.commit()
        usage = session.get(TeamUsage, (a.team_id, "gpus"))
        assert usage is not None and usage.gpu_seconds == pytest.approx(200.0)

    # Two teams equal now (nothing running); one used more GPU time: the other goes first, and a
    # half-life later its usage counts half.
    c, d = system.team(), system.team()
    (c1,), (d1,) = submit(c, 1), submit(d, 1)
    with db.session() as session:
        session.add(TeamUsage(team_id=c.team_id, pool="gpus", gpu_seconds=1000.0, as_of=now - HALF_LIFE))
        session.add(TeamUsage(team_id=d.team_id, pool="gpus", gpu_seconds=600.0, as_of=now))
        session.commit()
    # c: 1000 a day ago = 500 now < d's 600 (without the decay d would go first)
    assert claim(now) == c1
    assert claim(now) == d1


def test_max_gpus_counts_the_gpus_of_running_jobs_in_every_pool(system: System) -> None:
    db = system.stack.db
    system.stack.declare_pool("capped")
    system.stack.declare_pool("capped-b")
    capped, other = system.team(), system.team()
    quota(system, capped, max_running_jobs=100, max_gpus=3)
    quota(system, other, max_running_jobs=100)
    capped_file, other_file = system.new_file(capped, n=4), system.new_file(other, n=4)
    c1, c2 = (system.submit(capped, capped_file, pool="capped")["id"] for _ in range(2))
    elsewhere = system.submit(capped, capped_file, pool="capped-b")["id"]
    o1 = system.submit(other, other_file, pool="capped")["id"]
    set_gpus(system, [c1, c2], 2)

    def claim(pool: str) -> str | None:
        got = claim_next_job(db, pool, f"test:{pool}", 600.0, free_slots=8)
        return got.job_id if got else None

    assert claim("capped") == c1  # 2 of 3
    assert claim("capped") == o1
    assert claim("capped") is None  # c2 would make 4 of 3
    assert claim("capped-b") == elsewhere  # a 1-GPU job elsewhere fits: 3 of 3
    quota(system, capped, max_gpus=-1)  # no limit
    assert claim("capped") == c2
    with db.session() as session:
        team = session.get(Team, capped.team_id)
        assert team is not None and team.max_gpus is None


class Cluster:
    """Simulated nodes driving the real claim (worker/claim.py) on the real database, on a fake clock:
    each claimed job runs for its duration (its estimated finish set as a running job's progress would
    set it), then ends and its node claims again."""

    def __init__(self, system: System, pool: str, nodes: dict[str, int]) -> None:
        self.system, self.db, self.pool, self.nodes = system, system.stack.db, pool, nodes
        self.clock = time.time()
        self.duration: dict[str, float] = {}  # job id -> seconds it runs
        self.running: dict[str, tuple[str, str, int, float]] = {}  # job -> (node, team, gpus, end)
        self.preempted: list[str] = []
        # after each moment's claims: GPUs held per team, and the teams with jobs still queued
        self.rounds: list[tuple[dict[str, int], set[str]]] = []
        system.stack.declare_pool(pool)
        self.beat()

    def beat(self) -> None:
        with self.db.session() as session:
            for node, slots in self.nodes.items():
                free = slots - sum(g for n, _, g, _ in self.running.values() if n == node)
                session.merge(
                    Worker(id=node, pool=self.pool, hostname=node, gpu_name="cpu", slots=slots,
                           free_slots=free, started_at=self.clock, last_heartbeat_at=self.clock)
                )  # fmt: skip
            session.commit()

    def held(self) -> dict[str, int]:
        teams: dict[str, int] = {}
        for _, team, gpus, _ in self.running.values():
            teams[team] = teams.get(team, 0) + gpus
        return teams

    def fill(self, node: str) -> list[str]:
        started = []
        while True:
            free = self.nodes[node] - sum(g for n, _, g, _ in self.running.values() if n == node)
            got = claim_next_job(
                self.db, self.pool, node, 600.0, free_slots=free, half_life_s=HALF_LIFE, now=self.clock
            )
            if got is None:
                break
            end = self.clock + self.duration[got.job_id]
            with self.db.session() as session:
                job = session.scalars(select(Job).where(Job.id == got.job_id)).one()
                job.estimated_finish = int(end)
                self.running[got.job_id] = (node, job.team_id, got.gpus, end)
                session.commit()
            started.append(got.job_id)
        self.beat()
        return started

    def next_end(self) -> bool:
        """Advance to the next job's end, end it (and any ending with it), and let its node claim;
        then the reconciler's policy runs, and a job it preempts stops at once (its checkpoint of
        the step: it keeps the work done) and goes back to the queue."""
        if not self.running:
            return False
        self.clock = min(end for *_, end in self.running.values())
        ended = [j for j, (*_, end) in self.running.items() if end <= self.clock]
        nodes = {self.running[j][0] for j in ended}
        for job_id in ended:
            del self.running[job_id]
            finish(self.system, job_id, self.clock)
        for node in sorted(nodes):
            self.fill(node)
        while schedule_pools(self.db, self.system.stack.settings, now=self.clock):
            freed = set()
            with self.db.session() as session:
                for job in session.scalars(select(Job).where(Job.stop_request == "preempt")):
                    node, _, _, end = self.running.pop(job.id)
                    self.duration[job.id] = end - self.clock  # the rest of its work
                    account_usage(session, job, self.clock, HALF_LIFE)
                    job.stop_request = job.stop_reason = job.worker_id = job.lease_expires_at = None
                    job.preemptions += 1
                    set_status(session, job, JobStatus.QUEUED, "preempted (simulated stop)")
                    self.preempted.append(job.id)
                    freed.add(node)
                session.commit()
            for node in sorted(freed):
                self.fill(node)
        with self.db.session() as session:
            waiting = set(
                session.scalars(
                    select(Job.team_id).where(Job.pool == self.pool, Job.status == "queued")
                ).all()
            )
        self.rounds.append((self.held(), waiting))
        return True


def submit_many(
    system: System, team: TeamClient, pool: str, sizes: list[int], seconds: float, cluster: Cluster
) -> list[str]:
    file_id = system.new_file(team, n=4)
    ids = [system.submit(team, file_id, pool=pool, gpus=k)["id"] for k in sizes]
    cluster.duration.update({i: seconds for i in ids})
    return ids


def test_fair_share_on_four_slots_two_teams_hold_two_gpus_each(system: System) -> None:
    """Two 2-slot nodes: team A's ten 2-GPU jobs, then team B's ten 1-GPU jobs. With equal weights
    each team holds 2 GPUs after every claim while both wait; with A's weight 3, A holds 3 (a 2-GPU
    and a 1-GPU job) and B 1."""
    a, b = system.team(), system.team()
    for t in (a, b):
        quota(system, t, max_running_jobs=100)
    cluster = Cluster(system, "four", {"n1": 2, "n2": 2})
    submit_many(system, a, "four", [2] * 10, 300.0, cluster)
    cluster.fill("n1"), cluster.fill("n2")
    assert cluster.held() == {a.team_id: 4}  # alone: A takes all four
    submit_many(system, b, "four", [1] * 10, 200.0, cluster)
    while cluster.next_end():
        pass
    both = [held for held, waiting in cluster.rounds if waiting == {a.team_id, b.team_id}]
    assert len(both) >= 5 and all(held == {a.team_id: 2, b.team_id: 2} for held in both), cluster.rounds

    # A's weight 3 (of 4): A holds 3 as a 2-GPU and a 1-GPU job, B the fourth GPU.
    heavy, light = system.team(), system.team()
    quota(system, heavy, max_running_jobs=100, share_weight=3.0)
    quota(system, light, max_running_jobs=100)
    cluster = Cluster(system, "weighted-four", {"n1": 2, "n2": 2})
    submit_many(system, heavy, "weighted-four", [2, 1] * 5, 300.0, cluster)
    cluster.fill("n1"), cluster.fill("n2")
    submit_many(system, light, "weighted-four", [1] * 10, 200.0, cluster)
    while cluster.next_end():
        pass
    both = [held for held, waiting in cluster.rounds if waiting == {heavy.team_id, light.team_id}]
    # (the first moment both A jobs end at once, B goes first on the node that frees first: 2 + 2)
    assert len(both) >= 5 and all(held == {heavy.team_id: 3, light.team_id: 1} for held in both[1:]), both


def test_a_big_job_behind_a_stream_of_small_ones_starts_once_the_running_ones_end(system: System) -> None:
    """One 2-slot node busy with a stream of another team's 1-GPU jobs (each end brings a new one): a
    2-GPU job reserves the node, and starts when the two jobs running at its arrival have ended,
    not after the stream (the free slot is held for it meanwhile)."""
    stream, big = system.team(), system.team()
    quota(system, stream, max_running_jobs=100)
    cluster = Cluster(system, "stream", {"n1": 2})
    start = cluster.clock
    first = submit_many(system, stream, "stream", [1], 100.0, cluster)
    second = submit_many(system, stream, "stream", [1], 150.0, cluster)
    cluster.fill("n1")
    assert set(cluster.running) == {*first, *second}
    [gang] = submit_many(system, big, "stream", [2], 50.0, cluster)
    started_at = None
    for n in range(12):
        submit_many(system, stream, "stream", [1], 100.0 + 10 * n, cluster)  # the stream goes on
        cluster.next_end()
        if gang in cluster.running and started_at is None:
            started_at = cluster.clock
    assert started_at == start + 150.0, cluster.rounds  # when the second running job ended
    # meanwhile (100 s to 150 s) a stream job used the free slot as backfill, and made way at 150 s
    assert cluster.rounds[0][0] == {stream.team_id: 2}, cluster.rounds
    assert len(cluster.preempted) == 1, cluster.preempted
    with system.stack.db.session() as session:
        backfill = session.scalars(select(Job).where(Job.id == cluster.preempted[0])).one()
        assert backfill.backfill_for is None or backfill.status == "queued"  # re-queued, resumes later
