"""Pool simulation: the real claim, preemption and reservation code on a real database with a virtual
clock, over a synthetic trace on a simulated cluster, against first-come-first-served.

Issue point: "the real claim, preemption and reservation code on a real database with a virtual
clock, over a synthetic trace of a few thousand jobs on a simulated cluster (4 nodes x 8 GPUs): teams
of different weights, job sizes 1/2/4/8 GPUs in the proportions of published cluster traces
(Microsoft Philly: most jobs 1 GPU, a tail of 8), heavy-tailed durations." Goals: utilisation >= 0.9
while jobs wait; Jain's index >= 0.95 (FIFO's printed beside it); p95 wait of 8-GPU jobs <= 2x FIFO's;
GPU time lost to preemption <= 2% (a checkpoint step at most per preemption).

What it does (run from the repository root; PostgreSQL at 127.0.0.1:5432, user postgres, trust auth,
or `--sqlite` for a SQLite file in a temporary directory):

1. The trace (seeded, `--seed`): `--jobs` jobs of six teams with share weights 1, 1, 2, 2, 3, 4 that
   submit at relative rates 3, 1, 2, 0.5, 1, 1.5 (the heaviest submitter has the smallest weight: what
   FIFO gets wrong). Jobs come in bursts (a sweep: one team, a geometric number of jobs, mean
   `--burst-mean`, 30 s apart on average); the bursts' start times follow a daily cycle (rate x
   1 +- `--diurnal`) over a span chosen so that the offered GPU time is `--load` times the cluster's
   over it (1.1: oversubscribed, work waits most of the time, with quieter hours in which the queue
   shrinks). GPUs per job 1/2/4/8 with weights 70/15/10/5 % (Philly: mostly single-GPU jobs, a tail
   of whole nodes); run time log-normal, median `--median-min` minutes, sigma `--sigma` (heavy-
   tailed: p99 ~ 30x the median), between 1 minute and `--max-hours`, whole seconds.
2. tunepool (`simulate_pool`): its own database (PostgreSQL `--database`, dropped and re-created,
   brought to head with the project's migrations as `tunepool migrate` does; dropped at the end
   unless `--keep-db`). Six `teams` rows (max_running_jobs 10,000: never in the way), a declared pool,
   4 `workers` rows of 8 slots (their heartbeats set once, far ahead: every node stays alive). A
   discrete-event loop:
   - arrival: the job is inserted as a queued `jobs` row (queued_at = the clock; model and files are
     dummies: nothing trains);
   - a node with free slots claims with the real `claim_next_job(db, pool, node, lease_s,
     free_slots=..., half_life_s=..., now=clock)` until it gets nothing, after every arrival, end and
     stop, and after each reconciler round (the reconciler re-sends dispatch messages to idle
     workers while jobs wait); the claims of one moment are 1 ms apart (`PoolSim.instant`); a
     claimed job runs its remaining work; its `estimated_finish` is set as the runner sets it (here
     exact, from the start; a real job has none until its first step);
   - end: its GPU-seconds go to its team's usage (`account_usage`, as the run's last fenced write
     does) and it becomes succeeded;
   - every `--tick-s` seconds while jobs wait, the reconciler's `schedule_pools(db, settings, now)`
     (preemption policy `--preempt-after-s`, `--preempt-min-runtime-s`, fair-share preemption on;
     half-life `--half-life-s`): it asks victims to stop (stop_request = 'preempt') and reserves
     their node for the claimant. A victim stops `--checkpoint-step-s` later (the step it is in, then
     a checkpoint) and goes back to the queue the way worker/job_end.py's `_stopped` does it
     (`set_status(QUEUED)`, preemptions + 1, stop request, worker, lease and estimated finish
     cleared); its remaining work is what it had when asked (that last step is counted as lost:
     gpus x step GPU-seconds). A victim whose work ends before the step does just ends;
   - every `--usage-every-s` seconds the running jobs' GPU-seconds are added to usage (the runner's
     heartbeats do it every few seconds; the claim adds what is not counted yet in between).
   `set_status` stamps `queued_at` with the wall clock; the simulation sets it to the virtual one.
3. FIFO (`simulate_fifo`), in memory on the same trace: one queue in arrival order; the head job
   starts when a node has its K slots free (the node with the fewest free slots that fits), nothing
   overtakes it (no backfill), nothing is preempted.

Figures, for both (`Meter` integrates the state between events):
- utilisation while work waits: busy GPU-seconds / (32 x seconds) over the time at least one job is
  queued; and the idle GPU-seconds in that time on nodes where some queued job would have fitted
  (reservations and FIFO's head-of-line blocking hold them back). For tunepool that idle time is
  split by cause, node by node (`PoolSim.idle_causes`): held by a reservation that lets no backfill
  in (the real `reservations` of worker/scheduling.py, read after each moment's claims: a job that
  preempted others holds its node); no team's first queued job fits the free slots though a later
  job of a team would (only a team's first job is a candidate); nothing queued fits; a team's first
  job fits but is not claimed yet (should be ~0: the sim claims at every event and reconciler
  round). Reservations that vanish before their job started on that node are counted as dropped,
  with the idle GPU time they held;
- fairness (Jain's index): over the time team i has queued work (it wants more than it has), x_i =
  GPU-seconds it held / GPU-seconds of its weighted max-min fair share. The fair share at a moment
  is water-filled over the teams' demands (GPUs running + GPUs queued): no team gets more than it
  asks for, and what one does not ask for is split by weight among the others. Jain = (sum x)^2 /
  (n sum x^2) over the teams that had queued work; 1 when every team got the same fraction of its
  fair share. Each team counts once, however long it had work queued: on a short trace (the smoke
  run) a team that waited minutes weighs as much as one that waited hours, and the index is noisy.
  Also shown: the simpler variant x_i = mean GPUs held while queued / weight (no correction for
  who else was competing or how much the team asked for);
- wait per job size: first start - arrival, p50 and p95 (nearest rank), max, mean; a preempted job's
  later waits are counted in `requeued_wait_s`;
- preemptions (victims stopped), GPU-seconds lost to them (gpus x checkpoint step each) over busy
  GPU-seconds; makespan. Thrashing: fair-share preemptions reversed within an hour (the victim's
  team preempts the claimant's team back), and those that left the claimant's team with more GPUs
  per weight than the victim's (the claimant's job counted), with examples in the JSON.
Sanity (either would be a bug of the simulation or the claim): every job finished in both
simulations, with its whole work run (busy - lost GPU-seconds = the trace's GPU-seconds); no node
ever given more GPUs than its slots by the real claim (`max_overcommit` = 0); the database agrees
(every job succeeded, preemptions counted the same).

A seed gives the same figures on every run, on either database (checked with 300 jobs): the claims
of one moment are 1 ms apart and the workers' rows are never rewritten, so no tie is left to the
order of rows in unordered reads, which PostgreSQL does not keep (the exception: teams tied in the
policy's "furthest above its share" order, rare). The figures are sensitive to small perturbations
all the same: before those two measures, two PostgreSQL runs of the default trace with the same
code gave utilisation 0.755 and 0.839 while jobs wait; compare seeds (`--seed`) rather than read
the third digit of one run. The JSON records the sha256 of the policy's files that were measured.

Output: one JSON line on stdout; progress, a table and one line per goal (met / MISSED) on stderr.
Exit status 0 whether or not the goals are met: it is a report.

    .venv/bin/python -m bench.pool_sim                          # 2,000 jobs on PostgreSQL (minutes)
    .venv/bin/python -m bench.pool_sim --smoke --sqlite         # 150 jobs on SQLite: seconds
    .venv/bin/python -m bench.pool_sim --jobs 4000 --load 1.3 --seed 7 --keep-db
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import heapq
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.claim_time import fresh_database, postgres_version
from bench.dispatch_latency import host_info

REPO = Path(__file__).resolve().parents[1]
POOL = "sim"
NODES = 4
SLOTS = 8
CAPACITY = NODES * SLOTS
SIZES = (1, 2, 4, 8)
SIZE_WEIGHTS = (0.70, 0.15, 0.10, 0.05)  # Philly-like: mostly 1 GPU, a tail of whole nodes
# name, share weight, relative submission rate
TEAMS = (
    ("t1", 1.0, 3.0),
    ("t2", 1.0, 1.0),
    ("t3", 2.0, 2.0),
    ("t4", 2.0, 0.5),
    ("t5", 3.0, 1.0),
    ("t6", 4.0, 1.5),
)
T0 = 1_700_000_000.0  # the virtual clock's zero: a fixed date, so that runs repeat
# The workers' heartbeats: set once, far ahead (every node stays alive; updating the rows would reorder
# them on PostgreSQL, and the policy breaks ties between nodes in row order).
ALIVE = T0 + 1e9
CLAIM_GAP_S = 0.001  # between the claims (and reconciler rounds) of one moment
DAY_S = 86400.0
MIN_WORK_S = 60.0
BURST_GAP_S = 30.0  # mean seconds between the jobs of one burst
THRASH_WINDOW_S = 3600.0
SMOKE = {"jobs": 150}
GOAL_UTILISATION = 0.9
# What a preemption was for, by its reason's words (worker/scheduling.py `preemptions`).
PREEMPTION_KINDS = (
    ("priority", "same team"),
    ("guarantee", "guaranteed"),
    ("fairshare", "fair share"),
    ("backfill_due", "reserved for that job"),
)
GOAL_JAIN = 0.95
GOAL_P95_8_RATIO = 2.0
GOAL_LOST = 0.02


def log(message: str) -> None:
    print(f"[pool_sim] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- trace


@dataclass(frozen=True)
class TraceJob:
    index: int
    team: str
    gpus: int
    work_s: float  # run time from start to end, uninterrupted
    arrival: float  # seconds after T0


def make_trace(args: argparse.Namespace) -> list[TraceJob]:
    rng = random.Random(args.seed)
    names = [t[0] for t in TEAMS]
    rates = [t[2] for t in TEAMS]
    mu = math.log(args.median_min * 60.0)
    max_s = args.max_hours * 3600.0
    bursts: list[tuple[str, list[tuple[int, float]]]] = []
    count = 0
    while count < args.jobs:
        team = rng.choices(names, weights=rates)[0]
        size = 1
        while rng.random() > 1.0 / args.burst_mean and count + size < args.jobs:
            size += 1
        jobs = [
            (
                rng.choices(SIZES, weights=SIZE_WEIGHTS)[0],
                float(round(min(max_s, max(MIN_WORK_S, rng.lognormvariate(mu, args.sigma))))),
            )
            for _ in range(size)
        ]
        bursts.append((team, jobs))
        count += size
    gpu_s = sum(g * w for _, jobs in bursts for g, w in jobs)
    span = gpu_s / (CAPACITY * args.load)

    def start() -> float:  # a daily cycle by thinning: rate ~ 1 + diurnal x sin(2 pi t / day)
        while True:
            t = rng.uniform(0.0, span)
            if rng.random() * (1.0 + args.diurnal) < 1.0 + args.diurnal * math.sin(2 * math.pi * t / DAY_S):
                return t

    starts = sorted(start() for _ in bursts)
    rows = []
    for (team, jobs), t in zip(bursts, starts, strict=True):
        for gpus, work in jobs:
            rows.append((float(round(t)), team, gpus, work))
            t += rng.expovariate(1.0 / BURST_GAP_S)
    rows.sort(key=lambda r: r[0])  # stable: a burst's jobs keep their order
    return [TraceJob(i, team, gpus, work, at) for i, (at, team, gpus, work) in enumerate(rows)]


def trace_summary(trace: list[TraceJob]) -> dict[str, Any]:
    gpu_s = sum(j.gpus * j.work_s for j in trace)
    span = max(j.arrival for j in trace) - min(j.arrival for j in trace)
    works = sorted(j.work_s for j in trace)
    sizes = Counter(j.gpus for j in trace)
    teams = Counter(j.team for j in trace)
    return {
        "jobs": len(trace),
        "arrival_span_h": round(span / 3600, 2),
        "gpu_hours": round(gpu_s / 3600, 1),
        "offered_load": round(gpu_s / (CAPACITY * span), 3) if span else None,
        "jobs_by_gpus": {str(k): sizes[k] for k in SIZES},
        "gpu_hours_by_gpus": {
            str(k): round(sum(j.gpus * j.work_s for j in trace if j.gpus == k) / 3600, 1) for k in SIZES
        },
        "jobs_by_team": {t[0]: teams[t[0]] for t in TEAMS},
        "work_min": {
            "p50": round(nearest_rank(works, 0.5) / 60, 1),
            "p95": round(nearest_rank(works, 0.95) / 60, 1),
            "p99": round(nearest_rank(works, 0.99) / 60, 1),
            "max": round(works[-1] / 60, 1),
            "mean": round(sum(works) / len(works) / 60, 1),
        },
    }


# ----------------------------------------------------------------------------- figures


def nearest_rank(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def max_min_shares(capacity: float, weights: dict[str, float], demand: dict[str, float]) -> dict[str, float]:
    """Weighted max-min fair split of `capacity` (water-filling): no team gets more than its demand,
    and what one does not use is split by weight among the others."""
    out = {}
    left = float(capacity)
    total = sum(weights.values())
    for team in sorted(weights, key=lambda t: demand[t] / weights[t]):
        give = min(demand[team], left * weights[team] / total) if total > 0 else 0.0
        out[team] = give
        left -= give
        total -= weights[team]
    return out


def jain(values: list[float]) -> float | None:
    if not values or not any(values):
        return None
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


class Meter:
    """One policy's state integrated over time: call `advance` with the state that held since the last
    call (the state is constant between events)."""

    def __init__(self, weights: dict[str, float]) -> None:
        self.weights = weights
        self.time = self.busy = 0.0
        self.wait_time = self.wait_busy = self.wait_idle_fit = 0.0
        self.gpu_s = dict.fromkeys(weights, 0.0)  # GPU-seconds held, all the time
        self.got = dict.fromkeys(weights, 0.0)  # ... while the team had work queued
        self.fair = dict.fromkeys(weights, 0.0)  # its max-min fair GPU-seconds then
        self.backlogged = dict.fromkeys(weights, 0.0)  # seconds it had work queued

    def advance(
        self, dt: float, held: dict[str, int], queued: dict[str, int], free: list[int], smallest: int | None
    ) -> None:
        """`held`: GPUs each team runs; `queued`: GPUs of its queued jobs; `free`: each node's free slots;
        `smallest`: the GPUs of the smallest queued job."""
        if dt <= 0:
            return
        busy = sum(held.values())
        self.time += dt
        self.busy += busy * dt
        for team, gpus in held.items():
            self.gpu_s[team] += gpus * dt
        backlogged = [t for t, n in queued.items() if n > 0]
        if not backlogged:
            return
        self.wait_time += dt
        self.wait_busy += busy * dt
        if smallest is not None:
            self.wait_idle_fit += dt * sum(f for f in free if f >= smallest)
        # what each team would run now if it could: its running and queued GPUs
        demand = {t: float(held.get(t, 0) + queued.get(t, 0)) for t in set(held) | set(queued)}
        demand = {t: d for t, d in demand.items() if d > 0}
        shares = max_min_shares(CAPACITY, {t: self.weights[t] for t in demand}, demand)
        for team in backlogged:
            self.got[team] += held.get(team, 0) * dt
            self.fair[team] += shares[team] * dt
            self.backlogged[team] += dt

    def figures(self) -> dict[str, Any]:
        ratio = {t: self.got[t] / self.fair[t] for t in self.weights if self.fair[t] > 0}
        simple = {
            t: self.got[t] / self.backlogged[t] / self.weights[t]
            for t in self.weights
            if self.backlogged[t] > 0
        }
        total = sum(self.gpu_s.values()) or 1.0
        weight_total = sum(self.weights.values())
        wait_capacity = CAPACITY * self.wait_time
        return {
            "utilisation_while_waiting": round(self.wait_busy / wait_capacity, 4) if wait_capacity else None,
            "idle_fit_fraction_while_waiting": round(self.wait_idle_fit / wait_capacity, 4)
            if wait_capacity
            else None,
            "waiting_fraction_of_time": round(self.wait_time / self.time, 4) if self.time else None,
            "utilisation_overall": round(self.busy / (CAPACITY * self.time), 4) if self.time else None,
            "busy_gpu_hours": round(self.busy / 3600, 2),
            "jain": round(j, 4) if (j := jain(list(ratio.values()))) is not None else None,
            "jain_simple": round(j, 4) if (j := jain(list(simple.values()))) is not None else None,
            "teams": {
                t: {
                    "weight": w,
                    "gpu_hours": round(self.gpu_s[t] / 3600, 1),
                    "gpu_time_share": round(self.gpu_s[t] / total, 4),
                    "weight_share": round(w / weight_total, 4),
                    "backlogged_h": round(self.backlogged[t] / 3600, 1),
                    "got_over_fair": round(ratio[t], 3) if t in ratio else None,
                    "gpus_per_weight_backlogged": round(simple[t], 3) if t in simple else None,
                }
                for t, w in self.weights.items()
            },
        }


def wait_figures(trace: list[TraceJob], first_start: dict[int, float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in (*SIZES, 0):
        waits = sorted(
            first_start[j.index] - j.arrival
            for j in trace
            if (k == 0 or j.gpus == k) and j.index in first_start
        )
        key = "all" if k == 0 else str(k)
        if not waits:
            out[key] = {"n": 0}
            continue
        out[key] = {
            "n": len(waits),
            "p50_s": round(nearest_rank(waits, 0.5), 1),
            "p95_s": round(nearest_rank(waits, 0.95), 1),
            "max_s": round(waits[-1], 1),
            "mean_s": round(sum(waits) / len(waits), 1),
        }
    return out


def smallest_queued(sizes: Counter[int]) -> int | None:
    return next((k for k in SIZES if sizes[k] > 0), None)


# ----------------------------------------------------------------------------- FIFO


def simulate_fifo(trace: list[TraceJob]) -> dict[str, Any]:
    """Strict arrival order; the head starts when a node has its K slots free; no backfill, no
    preemption."""
    weights = {t[0]: t[1] for t in TEAMS}
    meter = Meter(weights)
    free = [SLOTS] * NODES
    queue: deque[int] = deque()
    ends: list[tuple[float, int, int]] = []  # heap of (end, job, node)
    held = dict.fromkeys(weights, 0)
    queued = dict.fromkeys(weights, 0)  # GPUs of each team's queued jobs
    sizes: Counter[int] = Counter()
    first_start: dict[int, float] = {}
    finished: dict[int, float] = {}
    clock, a, n = 0.0, 0, len(trace)
    max_overcommit = 0
    while a < n or ends or queue:
        t = min(trace[a].arrival if a < n else math.inf, ends[0][0] if ends else math.inf)
        if math.isinf(t):
            raise RuntimeError("FIFO: jobs queued, nothing running, nothing arriving")
        meter.advance(t - clock, held, queued, free, smallest_queued(sizes))
        clock = t
        while ends and ends[0][0] <= clock:
            _, i, node = heapq.heappop(ends)
            free[node] += trace[i].gpus
            held[trace[i].team] -= trace[i].gpus
            finished[i] = clock
        while a < n and trace[a].arrival <= clock:
            queue.append(a)
            queued[trace[a].team] += trace[a].gpus
            sizes[trace[a].gpus] += 1
            a += 1
        while queue:
            job = trace[queue[0]]
            fits = [k for k in range(NODES) if free[k] >= job.gpus]
            if not fits:
                break  # head-of-line blocking
            node = min(fits, key=lambda k: (free[k], k))
            queue.popleft()
            queued[job.team] -= job.gpus
            sizes[job.gpus] -= 1
            free[node] -= job.gpus
            max_overcommit = max(max_overcommit, -free[node])
            held[job.team] += job.gpus
            first_start[job.index] = clock
            heapq.heappush(ends, (clock + job.work_s, job.index, node))
    work = sum(j.gpus * j.work_s for j in trace)
    return {
        **meter.figures(),
        "wait": wait_figures(trace, first_start),
        "requeued_wait_s": 0.0,
        "preemptions": 0,
        "preempt_lost_gpu_hours": 0.0,
        "preempt_lost_fraction": 0.0,
        "jobs_finished": len(finished),
        "makespan_h": round((max(finished.values()) - trace[0].arrival) / 3600, 2),
        "work_conserved": math.isclose(meter.busy, work, rel_tol=1e-9),
        "max_overcommit": max_overcommit,
    }


# ----------------------------------------------------------------------------- tunepool


@dataclass
class Run:
    index: int
    node: str
    team: str
    gpus: int
    start: float
    end: float  # when its remaining work is done, uninterrupted
    stop_at: float | None = None  # asked to stop: after its checkpoint step
    left_at_stop: float = 0.0  # its remaining work when asked

    @property
    def leaves(self) -> float:
        return self.stop_at if self.stop_at is not None and self.stop_at < self.end else self.end


class PoolSim:
    """The real claim and reconciler on a database, driven by the trace on a virtual clock."""

    def __init__(self, db: Any, settings: Any, trace: list[TraceJob], args: argparse.Namespace) -> None:
        self.db, self.settings, self.trace, self.args = db, settings, trace, args
        self.ids = [f"ftjob-sim{j.index:06d}" for j in trace]
        self.index = {job_id: i for i, job_id in enumerate(self.ids)}
        self.team_ids = {t[0]: f"team-sim-{t[0]}" for t in TEAMS}
        self.team_of = {v: k for k, v in self.team_ids.items()}
        self.weights = {t[0]: t[1] for t in TEAMS}
        self.nodes = {f"node-{k}": SLOTS for k in range(NODES)}
        self.used = dict.fromkeys(self.nodes, 0)
        self.remaining = [j.work_s for j in trace]
        self.running: dict[int, Run] = {}
        self.queued: dict[int, float] = {}  # job -> when it (last) joined the queue
        self.held = dict.fromkeys(self.weights, 0)
        self.queued_gpus = dict.fromkeys(self.weights, 0)  # GPUs of the team's queued jobs
        self.sizes: Counter[int] = Counter()
        self.first_start: dict[int, float] = {}  # seconds after T0, as the trace's arrivals
        self.finished: dict[int, float] = {}
        self.requeued_wait = 0.0
        self.preempted: Counter[int] = Counter()
        self.asked: list[dict[str, Any]] = []  # one per preemption asked by schedule_pools
        self.stops = 0
        self.stops_overtaken = 0  # asked, but its work ended within the checkpoint step
        self.lost_gpu_s = 0.0
        self.max_overcommit = 0
        self.anomalies: list[str] = []
        self.calls: Counter[str] = Counter()
        self.meter = Meter(self.weights)
        self.clock = T0
        self.moment = 0  # claims and reconciler rounds at this moment so far (`instant`)
        self.skew_gpu_s = 0.0  # GPU-seconds between a moment and its claims (`instant`)
        # The reservations the real policy holds after each moment's claims (`observe`): node -> (job,
        # GPUs, whether it is a preemption's claimant, whether backfill may use the slots meanwhile), and
        # the idle GPU-seconds while jobs wait, by cause.
        self.reserved: dict[str, tuple[int, int, bool, bool]] = {}
        self.idle: dict[str, float] = {}
        self.reservations_made = 0
        self.reservations_dropped = 0  # gone without their job starting on that node
        self.reserve_idle: dict[tuple[str, int], float] = {}  # (node, job) -> idle GPU-s held so far
        self.reserve_idle_dropped = 0.0  # idle GPU-s held by reservations that were then dropped

    # --- database writes

    def setup(self) -> None:
        from service.models import Team, Worker
        from service.pools import declare_pool

        with self.db.session() as session:
            for name, weight, _rate in TEAMS:
                session.add(
                    Team(
                        id=self.team_ids[name],
                        name=f"sim-{name}",
                        max_running_jobs=10_000,
                        max_queued_jobs=10**9,
                        max_storage_bytes=10**12,
                        share_weight=weight,
                        max_gpus=None,
                        created_at=int(T0),
                    )
                )
            declare_pool(session, POOL, "admin", "bench/pool_sim.py")
            for node, slots in self.nodes.items():
                session.add(
                    Worker(
                        id=node,
                        pool=POOL,
                        hostname=node,
                        gpu_name="simulated",
                        slots=slots,
                        free_slots=slots,
                        started_at=T0,
                        last_heartbeat_at=ALIVE,
                    )
                )
            session.commit()

    def instant(self) -> float:
        """The clock for one claim or reconciler round: CLAIM_GAP_S after the previous one of this
        moment. Real claims never start two runs at the same instant; the policy orders victims by
        their start and leaves ties to the database's row order, which PostgreSQL does not keep."""
        self.moment += 1
        return self.clock + CLAIM_GAP_S * self.moment

    def arrive(self, jobs: list[TraceJob]) -> None:
        from service.models import Job

        with self.db.session() as session:
            for j in jobs:
                session.add(
                    Job(
                        id=self.ids[j.index],
                        team_id=self.team_ids[j.team],
                        status="queued",
                        model="sim-model",
                        model_source="sim",
                        training_file="file-sim",
                        method={"type": "supervised"},
                        loss="sft",
                        hyperparameters={},
                        seed=0,
                        pool=POOL,
                        priority=0,
                        gpus=j.gpus,
                        queued_at=self.clock,
                        created_at=int(self.clock),
                    )
                )
            session.commit()
        for j in jobs:
            self.enqueue(j.index)

    def enqueue(self, i: int) -> None:
        job = self.trace[i]
        self.queued[i] = self.clock
        self.queued_gpus[job.team] += job.gpus
        self.sizes[job.gpus] += 1

    def fill(self, node: str) -> None:
        """The node claims until nothing fits its free slots (worker/process.py `fill`)."""
        from sqlalchemy import update

        from service.models import Job
        from worker.claim import claim_next_job

        while self.queued and (free := self.nodes[node] - self.used[node]) > 0:
            now = self.instant()
            got = claim_next_job(
                self.db,
                POOL,
                node,
                self.settings.lease_s,
                free_slots=free,
                half_life_s=self.settings.fairshare_half_life_s,
                now=now,
            )
            if got is None:
                self.calls["claims_empty"] += 1
                return
            self.calls["claims"] += 1
            i = self.index[got.job_id]
            job = self.trace[i]
            if i not in self.queued:
                self.anomalies.append(f"{self.clock - T0:.0f}s: claimed {got.job_id}, not queued here")
                continue
            if got.gpus != job.gpus:
                self.anomalies.append(f"{self.clock - T0:.0f}s: claim of {got.job_id} says {got.gpus} GPUs")
            joined = self.queued.pop(i)
            if i in self.first_start:
                self.requeued_wait += now - joined
            self.first_start.setdefault(i, now - T0)
            self.queued_gpus[job.team] -= job.gpus
            self.sizes[job.gpus] -= 1
            self.used[node] += got.gpus
            self.max_overcommit = max(self.max_overcommit, self.used[node] - self.nodes[node])
            self.held[job.team] += job.gpus
            run = Run(i, node, job.team, job.gpus, now, now + self.remaining[i])
            self.skew_gpu_s += job.gpus * (now - self.clock)  # the meter counts it from the moment
            self.running[i] = run
            with self.db.session() as session:  # the runner's progress sets it
                session.execute(update(Job).where(Job.id == got.job_id).values(estimated_finish=int(run.end)))
                session.commit()

    def leave(self, run: Run) -> None:
        self.running.pop(run.index)
        self.used[run.node] -= run.gpus
        self.held[run.team] -= run.gpus

    def end(self, run: Run) -> None:
        from sqlalchemy import select

        from service.jobs import set_status
        from service.models import Job, JobStatus
        from worker.claim import account_usage

        with self.db.session() as session:
            job = session.scalars(select(Job).where(Job.id == self.ids[run.index])).one()
            account_usage(session, job, self.clock, self.settings.fairshare_half_life_s)
            set_status(session, job, JobStatus.SUCCEEDED, "Job succeeded (simulated)")
            session.commit()
        if run.stop_at is not None:
            self.stops_overtaken += 1
        self.leave(run)
        self.remaining[run.index] = 0.0
        self.finished[run.index] = self.clock - T0

    def stop(self, run: Run) -> None:
        """A preempted run stops after its checkpoint step: worker/job_end.py `_stopped`."""
        from sqlalchemy import select

        from service.jobs import set_status
        from service.models import Job, JobStatus
        from worker.claim import account_usage

        with self.db.session() as session:
            job = session.scalars(select(Job).where(Job.id == self.ids[run.index])).one()
            account_usage(session, job, self.clock, self.settings.fairshare_half_life_s)
            request, reason = job.stop_request, job.stop_reason
            if request != "preempt":
                self.anomalies.append(
                    f"{self.clock - T0:.0f}s: {job.id} stopping with stop_request {request}"
                )
            job.stop_request = job.stop_reason = None
            job.worker_id = job.lease_expires_at = job.dispatched_at = None
            job.estimated_finish = None
            job.preemptions += 1
            set_status(
                session,
                job,
                JobStatus.QUEUED,
                f"{reason or 'Preempted'}; resumes from its checkpoint",
                level="warn",
            )
            job.queued_at = self.clock  # set_status stamps the wall clock
            session.commit()
        self.stops += 1
        self.preempted[run.index] += 1
        assert run.stop_at is not None
        self.lost_gpu_s += run.gpus * (run.stop_at - (run.end - run.left_at_stop))
        self.remaining[run.index] = run.left_at_stop
        self.leave(run)
        self.enqueue(run.index)

    def account_running(self) -> None:
        """What the runs' heartbeats do: their GPU-seconds so far into their teams' usage."""
        from sqlalchemy import select

        from service.models import Job
        from worker.claim import account_usage

        with self.db.session() as session:
            for job in session.scalars(select(Job).where(Job.pool == POOL, Job.status == "running")):
                account_usage(session, job, self.clock, self.settings.fairshare_half_life_s)
            session.commit()

    def reconcile(self) -> None:
        """One reconciler round: `schedule_pools`, then the idle workers claim (re-dispatch)."""
        from worker.reconciler import schedule_pools

        now = self.instant()
        self.calls["schedule_rounds"] += 1
        for p in schedule_pools(self.db, self.settings, now=now):
            claimant = self.index.get(p.job.job_id)
            kind = next((k for k, text in PREEMPTION_KINDS if text in p.reason), "other")
            victims = []
            for v in p.victims:
                i = self.index[v.job_id]
                run = self.running.get(i)
                if run is None or run.stop_at is not None:
                    self.anomalies.append(f"{self.clock - T0:.0f}s: victim {v.job_id} not running here")
                    continue
                run.stop_at = now + self.args.checkpoint_step_s
                run.left_at_stop = run.end - now
                victims.append({"job": i, "team": run.team, "gpus": run.gpus, "ran_s": now - run.start})
            self.asked.append(
                {
                    "t": self.clock - T0,
                    "kind": kind,
                    "node": p.node,
                    "claimant": claimant,
                    "claimant_team": self.team_of.get(p.job.team_id, p.job.team_id),
                    "claimant_gpus": p.job.gpus,
                    "victims": victims,
                    "gpus_by_team": {t: g for t, g in self.held.items() if g},
                    "reason": p.reason,
                }
            )
        for node in self.nodes:
            if self.used[node] < self.nodes[node]:
                self.fill(node)

    # --- the loop

    def observe(self) -> None:
        """The reservations the policy (worker/scheduling.py `reservations`) holds now, read as the claim
        reads the pool; a reservation that is gone without its job having started there was dropped
        (the job moved down the line, or to another node): the slots held for it were idle for nothing."""
        from worker.claim import read_snapshot
        from worker.scheduling import reservations

        now: dict[str, tuple[int, int, bool, bool]] = {}
        if self.queued and any(self.used[n] < self.nodes[n] for n in self.nodes):
            with self.db.session() as session:
                snapshot = read_snapshot(
                    session, POOL, self.instant(), self.settings.fairshare_half_life_s, self.settings.lease_s
                )
            for node, r in reservations(snapshot).items():
                now[node] = (
                    self.index[r.job.job_id],
                    r.job.gpus,
                    r.job.reserved_node is not None,
                    r.backfill,
                )
        for node, held in self.reserved.items():
            if now.get(node) == held:
                continue
            idle = self.reserve_idle.pop((node, held[0]), 0.0)
            run = self.running.get(held[0])
            if run is None or run.node != node or run.start < self.clock:
                self.reservations_dropped += 1
                self.reserve_idle_dropped += idle
        self.reservations_made += sum(1 for node, held in now.items() if self.reserved.get(node) != held)
        self.reserved = now

    def idle_causes(self, dt: float) -> None:
        """Why free slots stay free while jobs wait, node by node: held by a reservation that allows
        no backfill (for a job that preempted others, or for the first job in line that fits no
        node); or no team's first queued job fits them though a later job of a team would (only a
        team's first job is a candidate); or no queued job fits them at all; or a team's first job
        fits, not yet claimed (the next claim is at the next event or reconciler round). Slots of a
        reservation that backfill may use are classed like any others (every job here is
        preemptible)."""
        if dt <= 0 or not self.queued:
            return
        heads: dict[str, int] = {}
        for i in self.queued:
            team = self.trace[i].team
            if team not in heads or i < heads[team]:
                heads[team] = i
        head_sizes = [self.trace[i].gpus for i in heads.values()]
        smallest = smallest_queued(self.sizes) or math.inf
        for node, slots in self.nodes.items():
            free = slots - self.used[node]
            if free <= 0:
                continue
            held = self.reserved.get(node)
            if held is not None and not held[3]:
                cause = "reserved_for_preemptor" if held[2] else "reserved_for_first_in_line"
                self.reserve_idle[(node, held[0])] = self.reserve_idle.get((node, held[0]), 0.0) + free * dt
            elif any(g <= free for g in head_sizes):
                cause = "a_first_job_fits_unclaimed"
            elif smallest <= free:
                cause = "only_a_later_job_of_a_team_fits"
            else:
                cause = "nothing_queued_fits"
            self.idle[cause] = self.idle.get(cause, 0.0) + free * dt

    def state(self) -> tuple[dict[str, int], dict[str, int], list[int], int | None]:
        free = [self.nodes[n] - self.used[n] for n in self.nodes]
        return self.held, self.queued_gpus, free, smallest_queued(self.sizes)

    def run(self) -> None:
        trace, args = self.trace, self.args
        n, a = len(trace), 0
        tick, usage_every = args.tick_s, args.usage_every_s
        next_tick, next_usage = T0 + tick, T0 + usage_every
        span = trace[-1].arrival
        horizon = T0 + span + 20 * args.max_hours * 3600.0
        progress = time.monotonic()
        while a < n or self.running or self.queued:
            t = min(
                T0 + trace[a].arrival if a < n else math.inf,
                min((r.leaves for r in self.running.values()), default=math.inf),
                next_tick if self.queued else math.inf,
            )
            if t > horizon:
                self.anomalies.append(
                    f"stuck: at {self.clock - T0:.0f}s {len(self.queued)} jobs queued, {len(self.running)} "
                    f"running, none started since; simulation stopped"
                )
                break
            self.meter.advance(t - self.clock, *self.state())
            self.idle_causes(t - self.clock)
            self.clock = t
            self.moment = 0
            freed: list[str] = []
            for run in sorted((r for r in self.running.values() if r.leaves <= t), key=lambda r: r.index):
                if run.stop_at is not None and run.stop_at < run.end:
                    self.stop(run)
                else:
                    self.end(run)
                freed.append(run.node)
            arrivals = []
            while a < n and T0 + trace[a].arrival <= t:
                arrivals.append(trace[a])
                a += 1
            if arrivals:
                self.arrive(arrivals)
            if self.queued and (freed or arrivals):
                order = list(dict.fromkeys(freed)) + [x for x in self.nodes if x not in freed]
                for node in order:
                    if self.used[node] < self.nodes[node]:
                        self.fill(node)
            if t >= next_tick:
                if self.queued:
                    self.reconcile()
                next_tick = T0 + (math.floor((t - T0) / tick) + 1) * tick
            if t >= next_usage and self.running:
                self.account_running()
                next_usage = T0 + (math.floor((t - T0) / usage_every) + 1) * usage_every
            self.observe()
            if self.queued and not self.running and a >= n:
                self.anomalies.append(
                    f"stuck: at {t - T0:.0f}s {len(self.queued)} jobs queued on an idle pool, none claimed"
                )
                break
            if time.monotonic() - progress > 30:
                progress = time.monotonic()
                log(
                    f"  virtual {(t - T0) / 3600:.1f} h: {a}/{n} arrived, {len(self.finished)} finished, "
                    f"{len(self.queued)} queued, {len(self.running)} running, {self.stops} preempted"
                )

    def db_check(self) -> dict[str, Any]:
        from sqlalchemy import func, select

        from service.models import Job

        with self.db.session() as session:
            statuses = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            preemptions = session.scalar(select(func.coalesce(func.sum(Job.preemptions), 0)))
        return {"statuses": statuses, "preemptions": int(preemptions or 0)}

    def inverts(self, p: dict[str, Any]) -> bool:
        held, w = p["gpus_by_team"], self.weights
        claimant = (held.get(p["claimant_team"], 0) + p["claimant_gpus"]) / w[p["claimant_team"]]
        lost: Counter[str] = Counter()
        for v in p["victims"]:
            lost[v["team"]] += v["gpus"]
        return any(claimant > (held.get(t, 0) - n) / w[t] + 1e-9 for t, n in lost.items())

    def figures(self) -> dict[str, Any]:
        work = sum(j.gpus * j.work_s for j in self.trace)
        fair_share = [p for p in self.asked if p["kind"] == "fairshare"]
        reversals = 0
        examples: list[list[dict[str, Any]]] = []
        for k, p in enumerate(fair_share):
            teams = {v["team"] for v in p["victims"]}
            for q in fair_share[k + 1 :]:
                if q["t"] - p["t"] > THRASH_WINDOW_S:
                    break
                if q["claimant_team"] in teams and p["claimant_team"] in {v["team"] for v in q["victims"]}:
                    reversals += 1
                    if len(examples) < 4:
                        examples.append([p, q])
                    break
        # A fair-share preemption that leaves the claimant's team with more GPUs per weight than the
        # victim's (the claimant's job counted): the victim's team is then the one below, and may
        # preempt back once its job has waited preempt_after_s.
        inverting = [p for p in fair_share if self.inverts(p)]
        ran = sorted(v["ran_s"] for p in self.asked for v in p["victims"])
        busy = self.meter.busy
        return {
            **self.meter.figures(),
            "wait": wait_figures(self.trace, self.first_start),
            "requeued_wait_s": round(self.requeued_wait, 1),
            "preemptions": self.stops,
            "preemptions_asked": sum(len(p["victims"]) for p in self.asked),
            "preemptions_overtaken_by_end": self.stops_overtaken,
            "preemptions_by_kind": dict(Counter(p["kind"] for p in self.asked)),
            "preemption_reversals_within_1h": reversals,
            "fairshare_preemptions": len(fair_share),
            "fairshare_preemptions_inverting": len(inverting),
            "inverting_examples": inverting[:3],
            "preempted_jobs": len(self.preempted),
            "max_preemptions_of_a_job": max(self.preempted.values(), default=0),
            "victim_ran_min": {"p50": round(nearest_rank(ran, 0.5) / 60, 1), "min": round(ran[0] / 60, 1)}
            if ran
            else None,
            "preempt_lost_gpu_hours": round(self.lost_gpu_s / 3600, 2),
            "preempt_lost_fraction": round(self.lost_gpu_s / busy, 5) if busy else 0.0,
            "jobs_finished": len(self.finished),
            "makespan_h": round((max(self.finished.values(), default=0.0) - self.trace[0].arrival) / 3600, 2),
            "work_conserved": math.isclose(busy - self.skew_gpu_s - self.lost_gpu_s, work, rel_tol=1e-9),
            "max_overcommit": self.max_overcommit,
            "idle_gpu_hours_while_waiting_by_cause": {
                k: round(v / 3600, 1) for k, v in sorted(self.idle.items(), key=lambda kv: -kv[1])
            },
            "reservations_made": self.reservations_made,
            "reservations_dropped": self.reservations_dropped,
            "reserved_idle_gpu_hours_of_dropped": round(self.reserve_idle_dropped / 3600, 1),
            "preemption_reversal_examples": examples,
            "calls": dict(self.calls),
            "anomalies": self.anomalies[:20],
        }


def simulate_pool(trace: list[TraceJob], args: argparse.Namespace, result: dict[str, Any]) -> dict[str, Any]:
    from service.db import Database
    from service.migrate import upgrade
    from service.settings import load_settings

    with contextlib.ExitStack() as stack:
        home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tunepool-poolsim-")))
        if args.sqlite:
            url = f"sqlite:///{home}/pool_sim.db"
        else:
            url = stack.enter_context(fresh_database(args.database, args.keep_db))
        settings = load_settings(
            home=home,
            database_url=url,
            broker_url="redis://127.0.0.1:6379/15",
            fairshare_preempt=not args.no_fairshare_preempt,
            preempt_after_s=args.preempt_after_s,
            preempt_min_runtime_s=args.preempt_min_runtime_s,
            fairshare_half_life_s=args.half_life_s,
        )
        result["config"] |= {
            "database": "sqlite" if args.sqlite else f"postgresql/{args.database}",
            "lease_s": settings.lease_s,
            "fairshare_preempt": settings.fairshare_preempt,
            "preempt_after_s": settings.preempt_after_s,
            "preempt_min_runtime_s": settings.preempt_min_runtime_s,
            "fairshare_half_life_s": settings.fairshare_half_life_s,
        }
        log("migrating " + ("a SQLite file" if args.sqlite else args.database))
        upgrade(settings)
        db = Database(settings)
        try:
            sim = PoolSim(db, settings, trace, args)
            sim.setup()
            started = time.perf_counter()
            sim.run()
            seconds = time.perf_counter() - started
            figures = sim.figures()
            figures["db"] = sim.db_check()
            figures["wall_s"] = round(seconds, 1)
        finally:
            db.dispose()
    return figures


# ----------------------------------------------------------------------------- report


def goals(ours: dict[str, Any], fifo: dict[str, Any]) -> dict[str, Any]:
    util = ours["utilisation_while_waiting"]
    p95 = ours["wait"]["8"].get("p95_s")
    fifo_p95 = fifo["wait"]["8"].get("p95_s")
    ratio = p95 / fifo_p95 if p95 is not None and fifo_p95 else None
    out = {
        "utilisation_while_waiting": {
            "goal": f">= {GOAL_UTILISATION}",
            "value": util,
            "fifo": fifo["utilisation_while_waiting"],
        },
        "jain": {"goal": f">= {GOAL_JAIN}", "value": ours["jain"], "fifo": fifo["jain"]},
        "p95_wait_8_gpu_over_fifo": {
            "goal": f"<= {GOAL_P95_8_RATIO}x",
            "value": round(ratio, 3) if ratio else None,
            "p95_s": p95,
            "fifo_p95_s": fifo_p95,
        },
        "preempt_lost_fraction": {"goal": f"<= {GOAL_LOST}", "value": ours["preempt_lost_fraction"]},
    }
    out["utilisation_while_waiting"]["met"] = util is not None and util >= GOAL_UTILISATION
    out["jain"]["met"] = ours["jain"] is not None and ours["jain"] >= GOAL_JAIN
    out["p95_wait_8_gpu_over_fifo"]["met"] = ratio is not None and ratio <= GOAL_P95_8_RATIO
    out["preempt_lost_fraction"]["met"] = ours["preempt_lost_fraction"] <= GOAL_LOST
    return out


def reversal(p: dict[str, Any]) -> str:
    victims = ", ".join(
        f"job {v['job']} of {v['team']} ({v['gpus']} GPUs, ran {v['ran_s'] / 60:.0f} min)"
        for v in p["victims"]
    )
    held = " ".join(f"{t}:{g}" for t, g in sorted(p["gpus_by_team"].items()))
    return (
        f"at {p['t'] / 3600:.2f} h job {p['claimant']} of {p['claimant_team']} ({p['claimant_gpus']} GPUs) "
        f"preempted {victims} [GPUs held: {held}]"
    )


def summary(result: dict[str, Any]) -> list[str]:
    ours, fifo = result["policies"]["tunepool"], result["policies"]["fifo"]
    tr, cfg = result["trace"], result["config"]
    lines = [
        f"trace: {tr['jobs']} jobs over {tr['arrival_span_h']} h, {tr['gpu_hours']} GPU-h (offered load "
        f"{tr['offered_load']}), by GPUs {tr['jobs_by_gpus']}, run time min p50 {tr['work_min']['p50']} "
        f"p95 {tr['work_min']['p95']} max {tr['work_min']['max']}",
        f"tunepool: {cfg['database']}, reconciler every {cfg['tick_s']:g} s, preempt after "
        f"{cfg['preempt_after_s']:g} s, min runtime {cfg['preempt_min_runtime_s']:g} s, fair share "
        f"{'on' if cfg['fairshare_preempt'] else 'off'}, checkpoint step {cfg['checkpoint_step_s']:g} s; "
        f"{ours['wall_s']} s wall",
        f"{'':44s} {'tunepool':>12s} {'FIFO':>12s}",
    ]

    def row(label: str, a: Any, b: Any) -> None:
        lines.append(f"{label:44s} {a!s:>12s} {b!s:>12s}")

    row("utilisation while work waits", ours["utilisation_while_waiting"], fifo["utilisation_while_waiting"])
    row(
        "  idle GPUs where a queued job fits (frac.)",
        ours["idle_fit_fraction_while_waiting"],
        fifo["idle_fit_fraction_while_waiting"],
    )
    row(
        "time with work waiting (fraction)",
        ours["waiting_fraction_of_time"],
        fifo["waiting_fraction_of_time"],
    )
    row("Jain's index (GPU time / max-min fair share)", ours["jain"], fifo["jain"])
    row("  simple (GPUs per weight while queued)", ours["jain_simple"], fifo["jain_simple"])
    for k in (*map(str, SIZES), "all"):
        a, b = ours["wait"][k], fifo["wait"][k]

        def mins(w: dict[str, Any]) -> str:
            return f"{w['p50_s'] / 60:.0f}/{w['p95_s'] / 60:.0f}" if w["n"] else "-"

        row(f"wait p50/p95 min, {k} GPU jobs (n={a['n']})", mins(a), mins(b))
    row("preemptions (jobs stopped)", ours["preemptions"], fifo["preemptions"])
    row("GPU-h lost to preemption", ours["preempt_lost_gpu_hours"], 0)
    row("  fraction of busy GPU time", ours["preempt_lost_fraction"], 0)
    row("fair-share preemptions", ours["fairshare_preemptions"], "-")
    row("  reversed within 1 h", ours["preemption_reversals_within_1h"], "-")
    row("  leaving the claimant above the victim", ours["fairshare_preemptions_inverting"], "-")
    row("makespan h", ours["makespan_h"], fifo["makespan_h"])
    row("jobs finished", ours["jobs_finished"], fifo["jobs_finished"])
    row("max overcommit of a node (GPUs)", ours["max_overcommit"], fifo["max_overcommit"])
    causes = ", ".join(f"{k} {v}" for k, v in ours["idle_gpu_hours_while_waiting_by_cause"].items())
    lines.append(f"tunepool: idle GPU-h while jobs wait, by cause: {causes or '-'}")
    lines.append(
        f"tunepool: reservations made {ours['reservations_made']}, dropped before their job started there "
        f"{ours['reservations_dropped']} (holding {ours['reserved_idle_gpu_hours_of_dropped']} idle GPU-h)"
    )
    for p, q in ours["preemption_reversal_examples"][:2]:
        lines.append(f"tunepool: reversal: {reversal(p)}; then {reversal(q)}")
    lines.append("per team: weight, jobs, GPU-h, GPU time / fair share while queued (tunepool | FIFO)")
    for name, *_ in TEAMS:
        a, b = ours["teams"][name], fifo["teams"][name]
        lines.append(
            f"  {name}  w={a['weight']:g}  jobs {tr['jobs_by_team'][name]:4d}  "
            f"GPU-h {a['gpu_hours']:8.1f} | {b['gpu_hours']:8.1f}  "
            f"x {a['got_over_fair']} | {b['got_over_fair']}"
        )
    for anomaly in ours["anomalies"]:
        lines.append(f"ANOMALY: {anomaly}")
    for name, g in result["goals"].items():
        lines.append(f"goal {name} {g['goal']}: {g['value']} ({'met' if g['met'] else 'MISSED'})")
    lines.append(f"sanity: {'ok' if result['sanity']['ok'] else 'FAILED'} {result['sanity']}")
    return lines


def code_version() -> dict[str, Any]:
    files = (
        "worker/scheduling.py",
        "worker/claim.py",
        "worker/reconciler.py",
        "worker/job_end.py",
        "service/jobs.py",
        "service/models.py",
    )
    out: dict[str, Any] = {
        "sha256_12": {f: hashlib.sha256((REPO / f).read_bytes()).hexdigest()[:12] for f in files}
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(REPO)]
        out["commit"] = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        changed = subprocess.run(
            [*git, "status", "--porcelain", "--", *files, "migrations"], capture_output=True, text=True
        ).stdout
        out["uncommitted"] = [line[3:] for line in changed.splitlines()]
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    p.add_argument("--jobs", type=int, default=2000, help="jobs in the trace (default 2,000)")
    p.add_argument("--seed", type=int, default=1, help="the trace's random seed (default 1)")
    p.add_argument("--load", type=float, default=1.1, help="offered GPU time / capacity (default 1.1)")
    p.add_argument(
        "--diurnal", type=float, default=0.5, help="daily swing of the arrival rate (0.5: +-50 %%)"
    )
    p.add_argument("--burst-mean", type=float, default=4.0, help="mean jobs per burst (default 4)")
    p.add_argument("--median-min", type=float, default=10.0, help="median run time, minutes (default 10)")
    p.add_argument("--sigma", type=float, default=1.5, help="log-normal sigma of run times (default 1.5)")
    p.add_argument("--max-hours", type=float, default=12.0, help="longest run time, hours (default 12)")
    p.add_argument(
        "--tick-s", type=float, default=30.0, help="seconds between reconciler rounds (default 30)"
    )
    p.add_argument(
        "--checkpoint-step-s",
        type=float,
        default=30.0,
        help="a preempted job runs this long before it stops; counted as lost (default 30)",
    )
    p.add_argument("--preempt-after-s", type=float, default=300.0, help="TUNEPOOL_PREEMPT_AFTER_S (300)")
    p.add_argument(
        "--preempt-min-runtime-s", type=float, default=600.0, help="TUNEPOOL_PREEMPT_MIN_RUNTIME_S (600)"
    )
    p.add_argument("--no-fairshare-preempt", action="store_true", help="TUNEPOOL_FAIRSHARE_PREEMPT=false")
    p.add_argument(
        "--half-life-s", type=float, default=86400.0, help="TUNEPOOL_FAIRSHARE_HALF_LIFE_S (86400)"
    )
    p.add_argument(
        "--usage-every-s",
        type=float,
        default=300.0,
        help="running jobs' GPU time added to usage this often (default 300)",
    )
    p.add_argument("--smoke", action="store_true", help="a tiny run: 150 jobs")
    p.add_argument("--sqlite", action="store_true", help="a SQLite file instead of PostgreSQL")
    p.add_argument("--database", default="tunepool_bench_pool_sim", help="PostgreSQL database, re-created")
    p.add_argument("--keep-db", action="store_true", help="leave the PostgreSQL database for inspection")
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    if args.jobs < 1 or args.load <= 0 or args.burst_mean < 1 or not 0 <= args.diurnal < 1:
        p.error("--jobs >= 1, --load > 0, --burst-mean >= 1, 0 <= --diurnal < 1")
    if (
        min(args.tick_s, args.usage_every_s, args.median_min, args.max_hours) <= 0
        or args.checkpoint_step_s < 0
    ):
        p.error("--tick-s, --usage-every-s, --median-min, --max-hours: positive; --checkpoint-step-s >= 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result: dict[str, Any] = {"benchmark": "pool_sim", "smoke": args.smoke, "host": host_info()}
    result["versions"] = {"code": code_version()}
    if not args.sqlite:
        result["versions"]["postgresql"] = postgres_version()
    trace = make_trace(args)
    result["config"] = {
        "nodes": NODES,
        "slots_per_node": SLOTS,
        "teams": {t[0]: {"weight": t[1], "rate": t[2]} for t in TEAMS},
        "gpu_sizes": dict(zip(map(str, SIZES), SIZE_WEIGHTS, strict=True)),
        "seed": args.seed,
        "load": args.load,
        "diurnal": args.diurnal,
        "burst_mean": args.burst_mean,
        "median_min": args.median_min,
        "sigma": args.sigma,
        "max_hours": args.max_hours,
        "tick_s": args.tick_s,
        "checkpoint_step_s": args.checkpoint_step_s,
        "usage_every_s": args.usage_every_s,
    }
    result["trace"] = trace_summary(trace)
    log(f"trace: {len(trace)} jobs over {result['trace']['arrival_span_h']} h; FIFO in memory")
    fifo = simulate_fifo(trace)
    log("tunepool: the real claim and reconciler on a database, virtual clock")
    ours = simulate_pool(trace, args, result)
    result["policies"] = {"tunepool": ours, "fifo": fifo}
    result["goals"] = goals(ours, fifo)
    result["goals_met"] = all(g["met"] for g in result["goals"].values())
    n = len(trace)
    statuses = ours["db"]["statuses"]
    sanity = {
        "all_finished": ours["jobs_finished"] == n and fifo["jobs_finished"] == n,
        "work_conserved": ours["work_conserved"] and fifo["work_conserved"],
        "max_overcommit": max(ours["max_overcommit"], fifo["max_overcommit"]),
        "db_all_succeeded": statuses == {"succeeded": n},
        "db_preemptions_match": ours["db"]["preemptions"] == ours["preemptions"],
        "anomalies": len(ours["anomalies"]),
    }
    sanity["ok"] = (
        sanity["all_finished"]
        and sanity["work_conserved"]
        and sanity["max_overcommit"] == 0
        and sanity["db_all_succeeded"]
        and sanity["db_preemptions_match"]
        and not sanity["anomalies"]
    )
    result["sanity"] = sanity
    result["host"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    for line in summary(result):
        print(line, file=sys.stderr, flush=True)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
