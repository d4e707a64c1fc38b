"""Claim decision time: `claim_next_job` (worker/claim.py) on PostgreSQL with a long queue.

Issue point: "Claim decision time with 10,000 queued jobs of 50 teams on PostgreSQL: p99 <= 20 ms".
It measures the claim transaction itself, in process, the way a worker's `fill` calls it; not the
API, the broker or the training.

What it does (run from the repository root; it needs the local PostgreSQL at 127.0.0.1:5432, user
postgres, trust auth):

1. Set-up. Drops and re-creates its own database (`--database`, `tunepool_bench_claim` by default;
   dropped again at the end unless `--keep-db`), brings it to the head revision with the project's
   Alembic migrations (service/migrate.py's `upgrade`, what `tunepool migrate` runs), then inserts
   rows directly (SQLAlchemy core `insert`, batches of 5,000; the API's validation is not measured):
   - `--teams` teams, share_weight drawn from 1, 1, 1, 2, 2, 3, 4; max_running_jobs 100,000 (never
     in the way); every 10th team with `max_gpus` 16 or 32, so a few are skipped at their limit;
   - `--running` jobs running in pool `default` and a sixth as many in pool `large` (all pools
     count towards the teams' limits; only this pool's towards the fair share), spread at random
     over the teams within their max_gpus, each with a lease, a worker id and GPU-seconds not yet
     accounted (usage_accounted_at up to 30 s ago, as heartbeats leave it);
   - a `team_usage` row per team and pool (decayed GPU-seconds, up to two days' worth, as of up to
     an hour ago);
   - `--jobs` queued jobs in pool `default`, skewed over the teams (team i gets a share ~ 1/(i+1):
     a few teams queue most of the work, every team queues some), GPUs per job 1/2/4/8 with
     weights 75/12/8/5 % (Microsoft Philly traces: most jobs take one GPU, a few a whole node),
     priority 0 (90 %) or 1-5; their other columns as the API writes them (bench/api_load.py's
     `job_row`: method and hyperparameters JSON, files, model...), so rows have a real width;
   - optionally `--history` finished jobs first (succeeded/failed/cancelled, both pools), older;
   - a `pools` row per pool and `workers` rows (8 slots each, heartbeats now) so the pools look alive.
   Then `VACUUM ANALYZE`, as autovacuum leaves a steady table.
2. Claims. `--warmup` claims (not counted: the connection pool and SQLAlchemy's statement cache
   fill), then `--claims` measured ones: `claim_next_job(db, "default", worker, lease_s,
   free_slots=8, half_life_s=...)` with the production defaults of lease_s and the half-life,
   round-robin over the workers, each moving a job to `running` and committing its event, as a
   worker does. Timed with time.perf_counter around the call. Between claims (not timed) one
   running job of the pool, drawn at random, finishes: its GPU-seconds go to its team's usage
   (`account_usage`) and it becomes `succeeded`, so the running set and the team shares keep
   moving and stay about the same size. Every SQL statement of a measured claim is timed too
   (SQLAlchemy cursor events: the statement's round trip, rows fetched included), so the figures
   split into the snapshot's reads, the team lock, the row lock, the UPDATE, the event and the rest
   (Python: session, rank, ORM; and the commit). `--explain` adds EXPLAIN (ANALYZE, BUFFERS) of
   each SELECT of the last claim (run in a transaction rolled back).

Figures (nearest rank: the p-quantile is the ceil(p n)-th smallest): n, p50, p95, p99, max and
mean in ms, per claim and per statement kind; claims that retried (another candidate tried after
a limit or a race: more than one team lock in one call); the CPU time of a claim, on this side
(time.process_time: SQLAlchemy, psycopg, the ranking) and, when PostgreSQL runs on this host, of
its backends (/proc, clock ticks: a mean over the claims). On a busy machine the wall times grow
with every round trip waiting for a core, the CPU times much less. Goal: p99 <= 20 ms.

Output: one JSON line on stdout (host, config, seeding, figures, goals with `met`); progress and a
readable summary (with the line `goal p99 <= 20 ms: met|MISSED`) on stderr. The exit status is 0
whether or not the goal is met: it is a report. The machine is shared (2 cores here: this process
and the PostgreSQL backend share them with whatever else runs), so compare figures of one run;
the load averages at the start and end are in the output.

    .venv/bin/python -m bench.claim_time                        # 10,000 queued jobs, 50 teams, 400 claims
    .venv/bin/python -m bench.claim_time --smoke                # 200 jobs, 5 teams, 20 claims: seconds
    .venv/bin/python -m bench.claim_time --history 100000 --explain --keep-db
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.api_load import PG_ADMIN_DSN, PG_URL, job_row, rand_id
from bench.dispatch_latency import host_info

REPO = Path(__file__).resolve().parents[1]
GOAL_P99_MS = 20.0
POOL = "default"
OTHER_POOL = "large"
FREE_SLOTS = 8  # a whole 8-GPU node is free at each claim: every job fits
BATCH = 5000
# GPUs per job and their weights (Philly traces: mostly single-GPU jobs, a few whole nodes).
GPU_SIZES = (1, 2, 4, 8)
GPU_WEIGHTS = (0.75, 0.12, 0.08, 0.05)
SHARE_WEIGHTS = (1, 1, 1, 2, 2, 3, 4)
SMOKE = {"jobs": 200, "teams": 5, "claims": 20, "running": 30, "warmup": 3, "history": 0}
# Statement kinds of a claim, by what the SQL text contains (first match); anything else is
# named by its first words, so a changed worker/claim.py still gets a breakdown.
KINDS = (
    ("running jobs (snapshot)", re.compile(r"^SELECT jobs\.team_id, jobs\.pool, jobs\.gpus", re.S)),
    ("team_usage (snapshot)", re.compile(r"FROM team_usage", re.S)),
    ("teams (snapshot)", re.compile(r"^SELECT teams\.", re.S)),
    ("candidates (row_number)", re.compile(r"row_number\(\)", re.S)),
    ("team lock (UPDATE teams)", re.compile(r"^UPDATE teams", re.S)),
    ("team recount", re.compile(r"^SELECT count\(\*\)", re.S)),
    ("job row lock (SKIP LOCKED)", re.compile(r"SKIP LOCKED", re.S)),
    ("claim UPDATE jobs", re.compile(r"^UPDATE jobs", re.S)),
    ("job re-read", re.compile(r"^SELECT jobs\.pk, jobs\.id,", re.S)),
    ("event INSERT", re.compile(r"^INSERT INTO job_events", re.S)),
)


def log(message: str) -> None:
    print(f"[claim_time] {message}", file=sys.stderr, flush=True)


def kind_of(statement: str) -> str:
    for name, pattern in KINDS:
        if pattern.search(statement):
            return name
    return " ".join(statement.split()[:4])


def quantiles_ms(samples_s: list[float]) -> dict[str, float]:
    """n, p50, p95, p99, max, mean in ms (nearest rank)."""
    s = sorted(samples_s)
    if not s:
        return {"n": 0}

    def rank(q: float) -> float:
        return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]

    out = {"p50_ms": rank(0.50), "p95_ms": rank(0.95), "p99_ms": rank(0.99), "max_ms": s[-1],
           "mean_ms": statistics.fmean(s)}  # fmt: skip
    return {"n": len(s), **{k: round(v * 1000, 3) for k, v in out.items()}}


# ----------------------------------------------------------------------------- database


@contextlib.contextmanager
def fresh_database(name: str, keep: bool) -> Iterator[str]:
    """`name` dropped (if there) and created empty; dropped again at the end unless `keep`."""
    import psycopg

    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name) or name in ("test", "postgres", "root"):
        raise SystemExit(f"--database {name!r}: a lower-case identifier, not test/postgres/root")
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield PG_URL.format(name=name)
    finally:
        if keep:
            log(f"database {name} kept")
        else:
            with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# ----------------------------------------------------------------------------- set-up


@dataclass
class Seeded:
    team_ids: list[str]
    worker_ids: list[str]
    running: list[str]  # ids of the running jobs of POOL
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def team_rows(n: int, rng: random.Random, now: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        rows.append(
            {
                "id": rand_id(rng, "team-", 16),
                "name": f"bench-team-{i}",
                "max_running_jobs": 100_000,
                "max_queued_jobs": 10**9,
                "max_storage_bytes": 10**15,
                "share_weight": float(rng.choice(SHARE_WEIGHTS)),
                "max_gpus": rng.choice((16, 32)) if i % 10 == 9 else None,
                "created_at": now - 400 * 86400,
            }
        )
    return rows


def seed(db: Any, args: argparse.Namespace, rng: random.Random) -> Seeded:
    from sqlalchemy import insert, text

    from service.models import Job, Pool, Team, TeamUsage, Worker

    start = time.perf_counter()
    now = int(time.time())
    teams = team_rows(args.teams, rng, now)
    team_ids = [t["id"] for t in teams]
    files = {t: [rand_id(rng, "file-") for _ in range(5)] for t in team_ids}
    counts: dict[str, int] = {}
    index = 0  # creation order over every job row, oldest first
    total = args.history + args.running + args.running // 6 + args.jobs

    def row(team_id: str, status: str, pool: str, workers: list[str]) -> dict[str, Any]:
        """A jobs row of `status` ("finished": any of succeeded/failed/cancelled, as drawn)."""
        nonlocal index
        r = job_row(rng, total, min(index, total - 1), team_id, files[team_id], now)
        index += 1
        while status == "finished" and r["status"] in ("queued", "running"):
            r = job_row(rng, total, min(index - 1, total - 1), team_id, files[team_id], now)
        r["pool"] = pool
        r["gpus"] = rng.choices(GPU_SIZES, weights=GPU_WEIGHTS)[0]
        r["queued_at"] = float(r["created_at"])
        r["lease_expires_at"] = None
        r["usage_accounted_at"] = None
        if status == "queued" and r["status"] != "queued":
            r |= {"status": "queued", "attempt": 0, "worker_id": None, "started_at": None,
                  "finished_at": None, "steps_completed": 0, "total_steps": None, "trained_tokens": None,
                  "tokens_per_sec": None, "estimated_finish": None, "fine_tuned_model": None,
                  "result_files": [], "error": None, "cancel_requested": False}  # fmt: skip
        elif status == "running":
            started = r["started_at"] or r["created_at"] + 5
            r |= {"status": "running", "attempt": 1, "worker_id": rng.choice(workers), "started_at": started,
                  "finished_at": None, "fine_tuned_model": None, "result_files": [], "error": None,
                  "cancel_requested": False, "total_steps": r["total_steps"] or 1000,
                  "lease_expires_at": now + 60.0, "usage_accounted_at": now - rng.uniform(0.0, 30.0),
                  "attempt_started_at": float(started)}  # fmt: skip
        return r

    n_workers = max(2, math.ceil(args.running * 1.5 / FREE_SLOTS))
    worker_ids = [f"gpu-node-{i}" for i in range(n_workers)]
    other_workers = [f"large-node-{i}" for i in range(max(1, n_workers // 6))]
    # Running jobs: within each team's max_gpus (over all pools).
    gpus_of = dict.fromkeys(team_ids, 0)
    limit = {t["id"]: t["max_gpus"] for t in teams}

    def running_rows(n: int, pool: str, workers: list[str]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        while len(rows) < n:
            team_id = rng.choice(team_ids)
            r = row(team_id, "running", pool, workers)
            cap = limit[team_id]
            if cap is not None and gpus_of[team_id] + r["gpus"] > cap:
                continue
            gpus_of[team_id] += r["gpus"]
            rows.append(r)
        return rows

    # Queued jobs: team i gets a share ~ 1/(i+1) (in a shuffled order of the teams).
    order = team_ids[:]
    rng.shuffle(order)
    queue_weights = [1.0 / (i + 1) for i in range(len(order))]

    with db.engine.begin() as conn:
        conn.execute(insert(Team), teams)
        conn.execute(
            insert(Pool),
            [
                {"name": p, "declared_by": "admin", "created_at": now - 400 * 86400}
                for p in (POOL, OTHER_POOL)
            ],
        )
        conn.execute(
            insert(Worker),
            [
                {"id": w, "pool": p, "hostname": w, "gpu_name": "NVIDIA H100 80GB HBM3",
                 "gpu_memory_bytes": 80 * 1024**3, "slots": FREE_SLOTS, "free_slots": FREE_SLOTS,
                 "started_at": now - 86400.0, "last_heartbeat_at": float(now)}
                for ids, p in ((worker_ids, POOL), (other_workers, OTHER_POOL))
                for w in ids
            ],
        )  # fmt: skip
        conn.execute(
            insert(TeamUsage),
            [
                {"team_id": t, "pool": p, "gpu_seconds": rng.uniform(0, 2 * 86400 * 8),
                 "as_of": now - rng.uniform(0, 3600)}
                for t in team_ids
                for p in (POOL, OTHER_POOL)
            ],
        )  # fmt: skip
        counts["usage_rows"] = 2 * len(team_ids)

        def batches(make: Any, n: int, label: str) -> None:
            done = 0
            while done < n:
                rows = [make() for _ in range(min(BATCH, n - done))]
                conn.execute(insert(Job), rows)
                done += len(rows)
            counts[label] = n

        batches(
            lambda: row(rng.choice(team_ids), "finished", POOL if rng.random() < 0.8 else OTHER_POOL, []),
            args.history,
            "history",
        )
        running = running_rows(args.running, POOL, worker_ids)
        running_other = running_rows(args.running // 6, OTHER_POOL, other_workers)
        for rows in (running, running_other):
            conn.execute(insert(Job), rows)
        counts["running"] = len(running)
        counts[f"running_{OTHER_POOL}"] = len(running_other)
        batches(
            lambda: row(rng.choices(order, weights=queue_weights)[0], "queued", POOL, []), args.jobs, "queued"
        )
    counts["workers"] = len(worker_ids) + len(other_workers)
    with db.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))
    return Seeded(team_ids, worker_ids, [r["id"] for r in running], counts, time.perf_counter() - start)


# ----------------------------------------------------------------------------- measurement


class StatementTimer:
    """Times every statement the engine runs while `active` (cursor events, this thread only)."""

    def __init__(self, engine: Any) -> None:
        from sqlalchemy import event

        self.active = False
        self.current: list[tuple[str, float, str, Any]] = []  # (kind, seconds, sql, parameters)
        self._started: list[float] = []
        self.backend_pids: set[int] = set()  # PostgreSQL backends of the engine's connections

        @event.listens_for(engine, "checkout")
        def _checkout(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
            with contextlib.suppress(AttributeError):
                self.backend_pids.add(int(dbapi_conn.info.backend_pid))  # psycopg 3: no round trip

        @event.listens_for(engine, "before_cursor_execute")
        def _before(_conn: Any, _cursor: Any, statement: str, params: Any, _ctx: Any, _many: bool) -> None:
            if self.active:
                self._started.append(time.perf_counter())

        @event.listens_for(engine, "after_cursor_execute")
        def _after(_conn: Any, cursor: Any, statement: str, params: Any, _ctx: Any, _many: bool) -> None:
            if self.active and self._started:
                # SQLAlchemy fetches the rows after this event: psycopg already holds them all
                # (client-side cursor), so the round trip is in the figure, the row decoding not.
                self.current.append((kind_of(statement), time.perf_counter() - self._started.pop(),
                                     statement, params))  # fmt: skip

    def backend_cpu_s(self) -> float:
        """CPU seconds (user + system) the engine's PostgreSQL backends used so far (from /proc: only
        when the server runs on this host; 0 otherwise). Clock-tick resolution (10 ms): meaningful
        summed over many claims, not per claim."""
        ticks = 0
        for pid in self.backend_pids:
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / os.sysconf("SC_CLK_TCK")

    def start(self) -> None:
        self.current = []
        self._started = []
        self.active = True

    def stop(self) -> list[tuple[str, float, str, Any]]:
        self.active = False
        return self.current


def finish_one(db: Any, running: list[str], rng: random.Random, half_life_s: float) -> None:
    """A random running job of the pool ends: its GPU-seconds counted, status succeeded."""
    from sqlalchemy import select

    from service.models import Job
    from worker.claim import account_usage

    job_id = running.pop(rng.randrange(len(running)))
    with db.session() as session:
        job = session.scalars(select(Job).where(Job.id == job_id).with_for_update()).one()
        now = time.time()
        account_usage(session, job, now, half_life_s)
        job.status = "succeeded"
        job.finished_at = int(now)
        job.lease_expires_at = None
        session.commit()


def measure(db: Any, settings: Any, seeded: Seeded, args: argparse.Namespace, rng: random.Random) -> dict:
    from worker.claim import claim_next_job

    timer = StatementTimer(db.engine)
    running = seeded.running
    samples: list[float] = []
    warm: list[float] = []
    per_kind: dict[str, list[float]] = {}
    other: list[float] = []
    cpu: list[float] = []  # this process's CPU time per claim (client side: SQLAlchemy, psycopg, rank)
    server_cpu_s = 0.0
    retried = 0
    claimed_gpus = dict.fromkeys(GPU_SIZES, 0)
    last: list[tuple[str, float, str, Any]] = []
    for i in range(args.warmup + args.claims):
        worker_id = seeded.worker_ids[i % len(seeded.worker_ids)]
        server0 = timer.backend_cpu_s()
        timer.start()
        c0 = time.process_time()
        t0 = time.perf_counter()
        claim = claim_next_job(
            db, POOL, worker_id, settings.lease_s,
            free_slots=FREE_SLOTS, half_life_s=settings.fairshare_half_life_s,
        )  # fmt: skip
        elapsed = time.perf_counter() - t0
        cpu_s = time.process_time() - c0
        statements = timer.stop()
        server_s = timer.backend_cpu_s() - server0
        if claim is None:
            raise RuntimeError(f"claim {i + 1}: nothing claimed with {len(running)} jobs running")
        running.append(claim.job_id)
        if i < args.warmup:
            warm.append(elapsed)
        else:
            samples.append(elapsed)
            cpu.append(cpu_s)
            server_cpu_s += server_s
            claimed_gpus[claim.gpus] = claimed_gpus.get(claim.gpus, 0) + 1
            by_kind: dict[str, float] = {}
            for kind, seconds, _sql, _params in statements:
                by_kind[kind] = by_kind.get(kind, 0.0) + seconds
            for kind, seconds in by_kind.items():
                per_kind.setdefault(kind, []).append(seconds)
            other.append(elapsed - sum(by_kind.values()))
            if sum(1 for s in statements if s[0] == "team lock (UPDATE teams)") > 1:
                retried += 1
            last = statements
        if not args.no_finish:
            finish_one(db, running, rng, settings.fairshare_half_life_s)
    statements_out = {
        kind: quantiles_ms(v) for kind, v in sorted(per_kind.items(), key=lambda kv: -sum(kv[1]))
    }
    statements_out["other (python, session, commit)"] = quantiles_ms(other)
    return {
        "claims": quantiles_ms(samples),
        "warmup": quantiles_ms(warm),
        "client_cpu": quantiles_ms(cpu),
        "server_cpu_mean_ms": round(server_cpu_s / len(samples) * 1000, 2) if timer.backend_pids else None,
        "retried_claims": retried,
        "claimed_by_gpus": {str(k): v for k, v in claimed_gpus.items()},
        "statements": statements_out,
        "samples_ms": [round(s * 1000, 3) for s in samples],
        "_last_statements": last,
    }


def explain(db: Any, statements: list[tuple[str, float, str, Any]]) -> dict[str, list[str]]:
    """EXPLAIN (ANALYZE, BUFFERS) of each distinct SELECT of one claim, in a transaction rolled back."""
    plans: dict[str, list[str]] = {}
    with db.engine.connect() as conn:
        for kind, _seconds, sql, params in statements:
            if not sql.lstrip().upper().startswith("SELECT") or kind in plans:
                continue
            rows = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", params).all()
            plans[kind] = [str(r[0]) for r in rows]
        conn.rollback()
    return plans


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    p.add_argument("--jobs", type=int, default=10_000, help="queued jobs in the pool (default 10,000)")
    p.add_argument("--teams", type=int, default=50, help="teams (default 50)")
    p.add_argument("--claims", type=int, default=400, help="measured claims (default 400)")
    p.add_argument("--warmup", type=int, default=20, help="claims first, not counted (default 20)")
    p.add_argument("--running", type=int, default=300, help="running jobs in the pool (default 300)")
    p.add_argument("--history", type=int, default=0, help="finished jobs inserted first (default 0)")
    p.add_argument("--no-finish", action="store_true", help="no running job finishes between claims")
    p.add_argument("--smoke", action="store_true", help="a tiny run: 200 jobs, 5 teams, 20 claims")
    p.add_argument("--database", default="tunepool_bench_claim", help="PostgreSQL database, re-created")
    p.add_argument("--keep-db", action="store_true", help="leave the database for inspection")
    p.add_argument("--explain", action="store_true", help="EXPLAIN ANALYZE each SELECT of the last claim")
    p.add_argument("--seed", type=int, default=1234, help="random seed")
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    if min(args.jobs, args.teams, args.claims, args.running) < 1 or min(args.warmup, args.history) < 0:
        p.error("--jobs, --teams, --claims, --running: positive; --warmup, --history: 0 or more")
    if args.jobs < args.warmup + args.claims:
        p.error("--jobs must be at least --warmup + --claims (each claim takes a queued job)")
    return args


def code_version() -> dict[str, Any]:
    """The commit, and the files of the claim path changed from it (figures depend on them)."""
    import hashlib
    import subprocess

    files = ("worker/claim.py", "worker/scheduling.py", "service/models.py", "service/db.py")
    out: dict[str, Any] = {
        "sha256_12": {f: hashlib.sha256((REPO / f).read_bytes()).hexdigest()[:12] for f in files}
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(REPO)]
        out["commit"] = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        status = [*git, "status", "--porcelain", "--", *files, "migrations"]
        changed = subprocess.run(status, capture_output=True, text=True).stdout
        out["uncommitted"] = [line[3:] for line in changed.splitlines()]
    return out


def postgres_version() -> str:
    import psycopg

    with psycopg.connect(PG_ADMIN_DSN) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "?"


def summary(figures: dict[str, Any]) -> list[str]:
    c = figures["claims"]
    met = c["p99_ms"] <= GOAL_P99_MS
    lines = [
        f"claims n={c['n']}  p50 {c['p50_ms']:.2f} ms  p95 {c['p95_ms']:.2f} ms  p99 {c['p99_ms']:.2f} ms"
        f"  max {c['max_ms']:.2f} ms  (retried {figures['retried_claims']})",
        f"CPU per claim: this process p50 {figures['client_cpu']['p50_ms']:.2f} ms, "
        f"p99 {figures['client_cpu']['p99_ms']:.2f} ms; PostgreSQL backend mean "
        f"{figures['server_cpu_mean_ms']} ms",
        "per statement kind (sum per claim), p50 / p99 ms:",
    ]
    for kind, q in figures["statements"].items():
        lines.append(f"  {kind:34s} {q['p50_ms']:7.2f} / {q['p99_ms']:7.2f}")
    lines.append(f"goal p99 <= {GOAL_P99_MS:g} ms: {'met' if met else 'MISSED'}")
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    result: dict[str, Any] = {"benchmark": "claim_time", "smoke": args.smoke, "host": host_info()}
    result["versions"] = {"postgresql": postgres_version(), "code": code_version()}
    from service.db import Database
    from service.migrate import upgrade
    from service.settings import load_settings

    with (
        tempfile.TemporaryDirectory(prefix="tunepool-claim-") as home,
        fresh_database(args.database, args.keep_db) as url,
    ):
        settings = load_settings(home=Path(home), database_url=url, broker_url="redis://127.0.0.1:6379/15")
        result["config"] = {
            "database": args.database, "pool": POOL, "teams": args.teams, "queued_jobs": args.jobs,
            "running_jobs": args.running, "history_jobs": args.history, "claims": args.claims,
            "warmup_claims": args.warmup, "free_slots": FREE_SLOTS,
            "finish_between_claims": not args.no_finish,
            "gpu_sizes": dict(zip(map(str, GPU_SIZES), GPU_WEIGHTS, strict=True)),
            "lease_s": settings.lease_s, "fairshare_half_life_s": settings.fairshare_half_life_s,
        }  # fmt: skip
        log(f"migrating {args.database}")
        upgrade(settings)
        db = Database(settings)
        try:
            log(f"seeding {args.teams} teams, {args.jobs} queued, {args.running} running, "
                f"{args.history} finished jobs")  # fmt: skip
            seeded = seed(db, args, rng)
            result["seeding"] = {"seconds": round(seeded.seconds, 2), **seeded.counts}
            log(f"seeded in {seeded.seconds:.1f} s; {args.warmup} warm-up + {args.claims} measured claims")
            figures = measure(db, settings, seeded, args, rng)
            last = figures.pop("_last_statements")
            if args.explain:
                figures["explain"] = explain(db, last)
        finally:
            db.dispose()
    result["figures"] = figures
    p99 = figures["claims"]["p99_ms"]
    result["goals"] = {
        "claim_p99_ms": {"goal": f"<= {GOAL_P99_MS:g}", "value": p99, "met": p99 <= GOAL_P99_MS}
    }
    result["goals_met"] = p99 <= GOAL_P99_MS
    result["host"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    for kind, plan in figures.get("explain", {}).items():
        log(f"EXPLAIN ANALYZE: {kind}\n" + "\n".join(plan))
    for line in summary(figures):
        print(line, file=sys.stderr, flush=True)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
