"""API load: `tunepool api` on PostgreSQL with many jobs vs a bare FastAPI endpoint, under wrk.

What it does, in one run (run from the repository root; it needs the local PostgreSQL at
127.0.0.1:5432, user postgres, trust auth; Redis at 127.0.0.1:6379 is only named as the broker):

1. Set-up. Creates a throwaway database `tunepool_bench_<hex>`, runs `tunepool migrate`
   (`python -m service.cli migrate`), creates `--teams` teams with one key each
   (`service.teams.create_team`), a few training/validation `files` rows per team, and bulk-inserts
   `--jobs` jobs (SQLAlchemy core `insert(Job)`, executemany in batches of 5,000), spread at random
   over the teams, oldest first, with the columns the API writes (service/job_create.py: `method`
   and resolved `hyperparameters` JSON, seed, pool, priority; progress, errors, fine-tuned model
   names as the worker leaves them). Status mix: 72% succeeded, 20% failed, 5% cancelled,
   2% queued, 1% running; pool "default" (80%) or "large"; priority 0 (90%) or 1-5. Then
   `VACUUM ANALYZE` (the steady state autovacuum keeps). The seeding time is reported.
2. Serve. Two subprocesses, started the same way and left running side by side: `tunepool api`
   (`python -m service.cli api`: uvicorn with the `create_app` factory, ONE process, as in
   production's single worker; uvloop and httptools, access log off) with TUNEPOOL_DATABASE_URL
   on that database and TUNEPOOL_BROKER_URL=redis://127.0.0.1:6379/14; and the bare reference
   `python -m uvicorn bench._api_load_bare:app` (same uvicorn settings: one process, same loop and
   HTTP implementation, access log off), a FastAPI app whose one GET endpoint answers a fixed
   job-shaped JSON object of about the size of a real one, with no database and no auth.
3. Load. wrk (compiled, epoll; installed with apt-get when missing) with `--clients` keep-alive
   connections on `--wrk-threads` threads (1: one core of a 2-core machine is enough for it, and
   the rest goes to the servers), a Lua script that sends each request with the
   `Authorization: Bearer` header of the team that owns the job, picking requests at random from
   the workload's request list, and counts non-2xx answers. Per target and client count: a
   `--warmup` second run (discarded), then a `--seconds` second run measured: requests/s,
   p50/p90/p99 latency (wrk's per-request latency histogram, send to last byte), errors (non-2xx
   answers + socket errors + timeouts over 10 s), bytes per response, and where the host's CPU
   went (CPU seconds / wall seconds, so 2.0 is both cores): the server process, all PostgreSQL
   processes, wrk, and "other" (the rest of the host's busy time, from /proc/stat: other users'
   work, i.e. how noisy the run was); server and PostgreSQL CPU are also given per request.

Targets and workloads (`--workload`, comma-separated; each runs against tunepool):
    poll         GET /v1/fine_tuning/jobs/{id}, a job drawn uniformly from all seeded jobs, with
                 its team's key (so mostly finished jobs; queued ones also count their queue place)
    poll_active  the same over the queued and running jobs only (what polling clients mostly do)
    list         GET /v1/fine_tuning/jobs?limit=20 for a random team (75%), or with
                 &after=<a random job of that team> (25%)
    create       POST /v1/fine_tuning/jobs: a DFT job on one of the team's files, a new job each
                 time (committed under the team's lock, with a dispatch message to Redis; no worker
                 runs, so they stay queued: the teams' max_queued_jobs is raised for the run)
    upload       POST /v1/files: a 16-conversation chat JSONL (~2.5 KB) as multipart, streamed,
                 validated line by line, stored and committed under the team's storage quota
    mix          70% poll, 15% list, 10% create, 5% upload, shuffled (one figure for the whole mix)
    bare         (always run) the poll request list against the bare app's `def` endpoint
    bare_async   (always run) the same against its `async def` endpoint (the framework's floor)
More workloads plug in as functions in WORKLOADS that return Requests (with bodies);
`--clients 32,128` repeats everything per client count. Redis database 14 (the dispatch messages
of created jobs) is flushed before and after.

Goals (issue: API load): at each client count, poll requests/s >= 50% of bare's (the `def`
endpoint: FastAPI's common way to serve an object), poll p99 <= 50 ms (and no request
timed out), and no poll errors; create, upload and mix: no errors (every answer a 2xx).
The load is closed-loop (each connection sends its next request
when the answer arrives), so mean latency is about clients / throughput: at 32 clients a p99 of
50 ms needs several hundred requests/s with a short tail, whatever the handler does.

Output: one JSON line on stdout (progress on stderr): host, config, seeding, one entry per
(clients, target) run, ratios and goals with `met` booleans. The machine is shared and has
2 cores: server, PostgreSQL and wrk share them, so compare figures of one run only.

    .venv/bin/python -m bench.api_load                               # 100,000 jobs, 32 clients, 20 s
    .venv/bin/python -m bench.api_load --jobs 2000 --seconds 5       # smoke test
    .venv/bin/python -m bench.api_load --clients 32,128 --workload poll,poll_active,list
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import resource
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
BROKER_URL = "redis://127.0.0.1:6379/14"
GOAL_RPS_RATIO = 0.5  # poll / bare requests per second, at least
GOAL_P99_MS = 50.0  # poll p99 latency, at most
BATCH = 5000
ALPHABET = string.ascii_letters + string.digits
STATUS_MIX = {"succeeded": 0.72, "failed": 0.20, "cancelled": 0.05, "queued": 0.02, "running": 0.01}
MODELS = ("SmolLM2-135M-Instruct", "SmolLM2-360M-Instruct", "Qwen2.5-0.5B-Instruct")
ERRORS = (
    {
        "code": "invalid_training_file",
        "message": "Line 17: 'messages' must be a list",
        "param": "training_file",
    },
    {"code": "out_of_memory", "message": "CUDA out of memory at step 12 (batch_size 32)", "param": None},
    {"code": "worker_lost", "message": "The job's worker stopped heartbeating 3 times", "param": None},
)


def log(message: str) -> None:
    print(f"[api_load] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------- set-up


@dataclass
class SeededJob:
    id: str
    team: int  # index into Seeded.keys
    status: str


@dataclass
class Seeded:
    keys: list[str]  # API key of team i
    team_ids: list[str]
    jobs: list[SeededJob]
    files: int
    seconds: float
    by_status: dict[str, int] = field(default_factory=dict)
    team_files: list[list[str]] = field(default_factory=list)  # file ids of team i


def rand_id(rng: random.Random, prefix: str, length: int = 24) -> str:
    return prefix + "".join(rng.choices(ALPHABET, k=length))


def job_row(
    rng: random.Random, n: int, index: int, team_id: str, files: list[str], now: int
) -> dict[str, Any]:
    """One jobs row as the API and a worker leave it (see service/job_create.py, service/jobs.py)."""
    status = rng.choices(list(STATUS_MIX), weights=list(STATUS_MIX.values()))[0]
    job_id = rand_id(rng, "ftjob-")
    model = rng.choice(MODELS)
    loss = "dft" if rng.random() < 0.6 else "sft"
    method_type = "dft" if loss == "dft" else "supervised"
    batch_size = rng.choice((4, 8, 8, 16, 32))
    multiplier = rng.choice((1.0, 1.0, 0.5, 2.0))
    hp: dict[str, Any] = {
        "n_epochs": rng.choice((1, 2, 3, 3, 5)),
        "batch_size": batch_size,
        "learning_rate_multiplier": multiplier,
        "learning_rate": 5e-5 * multiplier,
    }
    if rng.random() < 0.5:
        hp["max_seq_length"] = rng.choice((1024, 2048, 4096))
        hp["warmup_ratio"] = 0.03
    if rng.random() < 0.4:
        hp["lora"] = {"r": 16, "alpha": 32.0, "dropout": 0.05, "target_modules": "all-linear", "merge": False}
    suffix = rng.choice((None, None, "support-bot", "sql-gen", f"exp-{index % 97}"))
    created = now - 180 * 86400 + (180 * 86400 * index) // max(n, 1)
    total = rng.randint(50, 3000)
    started = created + rng.randint(1, 600) if status != "queued" else None
    steps = {"succeeded": total, "running": rng.randint(0, total - 1), "queued": 0}.get(
        status, rng.randint(0, total - 1)
    )
    tokens = steps * batch_size * rng.randint(200, 900) if steps else None
    finished = None
    if status in ("succeeded", "failed", "cancelled"):
        finished = (started or created) + steps * rng.randint(1, 3) + rng.randint(5, 120)
    cancelled_early = status == "cancelled" and rng.random() < 0.5
    if cancelled_early:
        started, steps, tokens, total_steps = None, 0, None, None
    else:
        total_steps = None if status == "queued" else total
    return {
        "id": job_id,
        "team_id": team_id,
        "status": status,
        "model": model,
        "model_source": f"/models/{model}",
        "training_file": rng.choice(files),
        "validation_file": rng.choice(files) if rng.random() < 0.3 else None,
        "method": {"type": method_type, method_type: {"hyperparameters": hp}},
        "loss": loss,
        "hyperparameters": hp,
        "seed": rng.randrange(2**31),
        "suffix": suffix,
        "user_metadata": {"project": suffix} if suffix and rng.random() < 0.5 else None,
        "pool": "default" if rng.random() < 0.8 else "large",
        "priority": 0 if rng.random() < 0.9 else rng.randint(1, 5),
        "idempotency_key": None,
        "request_hash": None,
        "attempt": 0 if started is None else (1 if rng.random() < 0.95 else 2),
        "worker_id": None if started is None else f"gpu-node-{rng.randint(1, 8)}/{rng.randint(0, 3)}",
        "lease_expires_at": now + 60.0 if status == "running" else None,
        "cancel_requested": status == "cancelled",
        "dispatched_at": created + 0.05,
        "steps_completed": steps,
        "total_steps": total_steps,
        "trained_tokens": tokens,
        "tokens_per_sec": rng.uniform(1500, 9000) if status in ("running", "succeeded") else None,
        "estimated_finish": now + rng.randint(60, 7200) if status == "running" else None,
        "fine_tuned_model": f"ft:{model}:{team_id}:{suffix or ''}:{job_id[6:14]}"
        if status == "succeeded"
        else None,
        "result_files": [rand_id(rng, "file-")] if status == "succeeded" else [],
        "error": rng.choice(ERRORS) if status == "failed" else None,
        "created_at": created,
        "started_at": started,
        "finished_at": finished,
    }


def seed(database_url: str, n_jobs: int, n_teams: int, rng: random.Random) -> Seeded:
    from sqlalchemy import insert, text, update

    from service.db import Database
    from service.models import File, Job, Team
    from service.settings import load_settings
    from service.teams import add_model, create_team

    start = time.perf_counter()
    settings = load_settings(database_url=database_url, broker_url=BROKER_URL)
    db = Database(settings)
    try:
        keys, team_ids, team_files = [], [], []
        now = int(time.time())
        file_rows = []
        with db.session() as session:
            for i in range(n_teams):
                team, key = create_team(session, settings, f"bench-team-{i}")
                keys.append(key)
                team_ids.append(team.id)
                ids = [rand_id(rng, "file-") for _ in range(10)]
                team_files.append(ids)
                for file_id in ids:
                    size = rng.randint(10_000, 50_000_000)
                    file_rows.append(
                        {
                            "id": file_id,
                            "team_id": team.id,
                            "filename": f"train-{file_id[5:11]}.jsonl",
                            "purpose": "fine-tune",
                            "bytes": size,
                            "sha256": secrets.token_hex(32),
                            "format": "chat",
                            "n_examples": size // 800,
                            "storage_path": f"files/{team.id}/{file_id}",
                            "created_at": now - 200 * 86400,
                        }
                    )
            session.execute(insert(File), file_rows)
            # The create and mix workloads submit real jobs: the model they name must be registered,
            # and no team may hit its queued-jobs or storage quota during a run (a 429 is an error).
            unloaded = settings.home / "models" / "not-loaded-by-this-benchmark"  # under the default root
            unloaded.mkdir(parents=True, exist_ok=True)
            (unloaded / "config.json").write_text("{}")
            add_model(session, settings, CREATE_MODEL, str(unloaded))
            session.execute(update(Team).values(max_queued_jobs=10**9, max_storage_bytes=10**15))
            session.commit()
        jobs: list[SeededJob] = []
        by_status: dict[str, int] = {}
        with db.engine.begin() as conn:
            for lo in range(0, n_jobs, BATCH):
                rows = []
                for index in range(lo, min(lo + BATCH, n_jobs)):
                    owner = rng.randrange(n_teams)
                    row = job_row(rng, n_jobs, index, team_ids[owner], team_files[owner], now)
                    rows.append(row)
                    jobs.append(SeededJob(row["id"], owner, row["status"]))
                    by_status[row["status"]] = by_status.get(row["status"], 0) + 1
                conn.execute(insert(Job), rows)
        with db.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))
    finally:
        db.dispose()
    return Seeded(keys, team_ids, jobs, len(file_rows), time.perf_counter() - start, by_status, team_files)


@contextlib.contextmanager
def throwaway_database() -> Iterator[str]:
    import psycopg

    name = f"tunepool_bench_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        log(f"dropped database {name}")


# ----------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Request:
    """One request of a workload's list; wrk picks from the list at random."""

    method: str
    path: str
    key: str  # API key, or "" for none
    body: bytes = b""
    content_type: str = ""


JOBS_PATH = "/v1/fine_tuning/jobs"
CREATE_MODEL = MODELS[0]
UPLOAD_BOUNDARY = "tunepoolbenchboundary"


def poll_requests(seeded: Seeded, rng: random.Random) -> list[Request]:
    return [Request("GET", f"{JOBS_PATH}/{j.id}", seeded.keys[j.team]) for j in seeded.jobs]


def poll_active_requests(seeded: Seeded, rng: random.Random) -> list[Request]:
    active = [j for j in seeded.jobs if j.status in ("queued", "running")]
    return [Request("GET", f"{JOBS_PATH}/{j.id}", seeded.keys[j.team]) for j in active]


def create_requests(seeded: Seeded, rng: random.Random) -> list[Request]:
    """POST /v1/fine_tuning/jobs: a DFT job on one of the team's files (each request a new job: no
    Idempotency-Key). Each is committed and its dispatch message sent to Redis; no worker runs."""
    out = []
    for team, key in enumerate(seeded.keys):
        for file_id in seeded.team_files[team][:3]:
            body = {
                "model": CREATE_MODEL,
                "training_file": file_id,
                "method": {"type": "dft", "dft": {"hyperparameters": {"n_epochs": 1, "batch_size": 8}}},
                "suffix": "load",
            }
            out.append(Request("POST", JOBS_PATH, key, json.dumps(body).encode(), "application/json"))
    return out


def upload_requests(seeded: Seeded, rng: random.Random) -> list[Request]:
    """POST /v1/files: a 16-conversation chat JSONL (about 2.5 KB) as multipart, validated and stored."""
    out = []
    for key in seeded.keys:
        lines = []
        for _ in range(16):
            a, b = rng.randint(1, 999), rng.randint(1, 999)
            messages = [
                {"role": "user", "content": f"What is {a} + {b}?"},
                {"role": "assistant", "content": f"{a} + {b} = {a + b}."},
            ]
            lines.append(json.dumps({"messages": messages}))
        content = ("\n".join(lines) + "\n").encode()
        part = f"--{UPLOAD_BOUNDARY}\r\nContent-Disposition: form-data; name="
        head = (
            f'{part}"purpose"\r\n\r\nfine-tune\r\n'
            f'{part}"file"; filename="load.jsonl"\r\nContent-Type: application/jsonl\r\n\r\n'
        )
        body = head.encode() + content + f"\r\n--{UPLOAD_BOUNDARY}--\r\n".encode()
        content_type = f"multipart/form-data; boundary={UPLOAD_BOUNDARY}"
        out.append(Request("POST", "/v1/files", key, body, content_type))
    return out


# The mix: what a pool's clients do in a day, by request count (polls dominate: `jobs follow`,
# dashboards and scripts poll while few jobs are created or files uploaded).
MIX = {"poll": 0.70, "list": 0.15, "create": 0.10, "upload": 0.05}
MIX_SIZE = 20_000


def mix_requests(seeded: Seeded, rng: random.Random) -> list[Request]:
    out: list[Request] = []
    for name, share in MIX.items():
        pool = WORKLOADS[name](seeded, rng)
        out += [rng.choice(pool) for _ in range(round(MIX_SIZE * share))]
    rng.shuffle(out)
    return out


def list_requests(seeded: Seeded, rng: random.Random, n: int = 20_000) -> list[Request]:
    per_team: list[list[str]] = [[] for _ in seeded.keys]
    for j in seeded.jobs:
        per_team[j.team].append(j.id)
    out: list[Request] = []
    for _ in range(n):
        team = rng.randrange(len(seeded.keys))
        if rng.random() < 0.25 and per_team[team]:
            path = f"{JOBS_PATH}?limit=20&after={rng.choice(per_team[team])}"
        else:
            path = f"{JOBS_PATH}?limit=20"
        out.append(Request("GET", path, seeded.keys[team]))
    return out


WORKLOADS: dict[str, Callable[[Seeded, random.Random], list[Request]]] = {
    "poll": poll_requests,
    "poll_active": poll_active_requests,
    "list": list_requests,
    "create": create_requests,
    "upload": upload_requests,
    "mix": mix_requests,
}


def write_requests(path: Path, requests: list[Request]) -> Path:
    """One line per request: method, path, key, body file ("" for none), content type. Bodies are
    written once each, next to the list, and read once by wrk's Lua script."""
    bodies: dict[bytes, Path] = {}
    body_dir = path.with_suffix(".bodies")
    with path.open("w") as f:
        for r in requests:
            body_path = ""
            if r.body:
                if r.body not in bodies:
                    body_dir.mkdir(exist_ok=True)
                    bodies[r.body] = body_dir / f"{len(bodies)}.body"
                    bodies[r.body].write_bytes(r.body)
                body_path = str(bodies[r.body])
            f.write(f"{r.method}\t{r.path}\t{r.key}\t{body_path}\t{r.content_type}\n")
    return path


# ----------------------------------------------------------------------------- servers


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path


def start_server(
    name: str, argv: list[str], env: dict[str, str], port: int, ready_path: str, logs: Path
) -> Server:
    log_path = logs / f"{name}.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + ready_path, timeout=1) as resp:
                if resp.status == 200:
                    return Server(name, proc, url, log_path)
        except OSError:
            time.sleep(0.2)
    stop_server(Server(name, proc, url, log_path))
    raise RuntimeError(f"{name} did not start:\n{log_path.read_text()[-3000:]}")


def stop_server(server: Server) -> None:
    if server.proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.proc.pid, signal.SIGTERM)
    try:
        server.proc.wait(15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(5)


def fetch_json(url: str, key: str) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, resp.read()


# ----------------------------------------------------------------------------- load (wrk)

LUA = r"""
-- bench/api_load.py: random requests from a list (method \t path \t key \t body file \t content
-- type), non-2xx counted.
-- args: <requests file> <seed> <path prefix>
local reqs, n = {}, 0
local threads, count = {}, 0
non2xx = 0  -- a global: done() reads each thread's with thread:get

function setup(thread)
  count = count + 1
  thread:set("thread_no", count)
  table.insert(threads, thread)
end

function init(args)
  local prefix = args[3] or ""
  local bodies = {}
  for line in io.lines(args[1]) do
    local method, path, key, body_file, ctype = line:match("^(%S+)\t(%S+)\t(%S*)\t([^\t]*)\t(.*)$")
    local headers, body = {}, nil
    if key ~= "" then headers["Authorization"] = "Bearer " .. key end
    if body_file ~= "" then
      if bodies[body_file] == nil then
        local f = assert(io.open(body_file, "rb"))
        bodies[body_file] = f:read("*a")
        f:close()
      end
      body = bodies[body_file]
      headers["Content-Type"] = ctype
    end
    n = n + 1
    reqs[n] = wrk.format(method, prefix .. path, headers, body)
  end
  math.randomseed(tonumber(args[2]) + thread_no * 7919)
end

function request()
  return reqs[math.random(n)]
end

function response(status, headers, body)
  if status < 200 or status > 299 then non2xx = non2xx + 1 end
end

function done(summary, latency, requests)
  local bad = 0
  for _, t in ipairs(threads) do bad = bad + t:get("non2xx") end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, "non2xx": %d, "connect": %d, ' ..
    '"read": %d, "write": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"p999_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes, bad, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
"""


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    log("wrk is missing: installing it with `apt-get install -y wrk` (Debian package)")
    apt = shutil.which("apt-get")
    if apt is None:
        raise SystemExit("wrk is missing and there is no apt-get: install wrk (https://github.com/wg/wrk)")
    prefix = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run([*prefix, apt, "install", "-y", "wrk"], check=True, stdout=sys.stderr)
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("apt-get install wrk did not provide a `wrk` command")
    return found


def cpu_s(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def postgres_cpu() -> dict[int, float]:
    """CPU seconds of each running PostgreSQL process (ours and any other user's), by pid."""
    import psutil

    out: dict[int, float] = {}
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] == "postgres":
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                out[proc.pid] = t.user + t.system
    return out


def postgres_cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU PostgreSQL used between two snapshots (processes that ended in between are not counted)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def host_busy_s() -> float:
    """CPU seconds the whole host has been busy (all cores), from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run_wrk(
    wrk: str,
    script: Path,
    url: str,
    requests_file: Path,
    *,
    clients: int,
    threads: int,
    seconds: float,
    seed: int,
    prefix: str = "",
    server_pid: int | None = None,
) -> dict[str, Any]:
    """One wrk run; with `server_pid`, also where the host's CPU went (server, PostgreSQL, wrk, other)."""
    argv = [
        wrk, f"-t{min(threads, clients)}", f"-c{clients}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
        "--latency", "-s", str(script), url, "--", str(requests_file), str(seed), prefix,
    ]  # fmt: skip
    measure = server_pid is not None
    server0, pg0, host0 = (cpu_s(server_pid), postgres_cpu(), host_busy_s()) if server_pid else (0.0, {}, 0.0)
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    server1, pg1, host1 = (cpu_s(server_pid), postgres_cpu(), host_busy_s()) if server_pid else (0.0, {}, 0.0)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    w = json.loads(line.removeprefix("WRKJSON "))
    n = max(int(w["requests"]), 1)
    duration = w["duration_us"] / 1e6
    wrk_cpu = (kids1.ru_utime + kids1.ru_stime) - (kids0.ru_utime + kids0.ru_stime)
    server_cpu, pg_cpu, host_cpu = server1 - server0, postgres_cpu_delta(pg0, pg1), host1 - host0
    cpu: dict[str, Any] = {}
    if measure:
        cpu = {
            "server_cpu_util": round(server_cpu / wall, 3),
            "server_cpu_us_per_req": round(server_cpu / n * 1e6),
            "postgres_cpu_util": round(pg_cpu / wall, 3),
            "postgres_cpu_us_per_req": round(pg_cpu / n * 1e6),
            "wrk_cpu_util": round(wrk_cpu / wall, 3),
            "host_cpu_util": round(host_cpu / wall, 3),
            "other_cpu_util": round(max(0.0, host_cpu - server_cpu - pg_cpu - wrk_cpu) / wall, 3),
        }
    socket_errors = w["connect"] + w["read"] + w["write"] + w["timeout"]
    return {
        "rps": round(w["requests"] / duration, 1),
        "p50_ms": round(w["p50_us"] / 1000, 2),
        "p90_ms": round(w["p90_us"] / 1000, 2),
        "p99_ms": round(w["p99_us"] / 1000, 2),
        "p999_ms": round(w["p999_us"] / 1000, 2),
        "max_ms": round(w["max_us"] / 1000, 2),
        "mean_ms": round(w["mean_us"] / 1000, 2),
        "errors": w["non2xx"] + socket_errors,
        "non2xx": w["non2xx"],
        "socket_errors": {k: w[k] for k in ("connect", "read", "write", "timeout")},
        "requests": w["requests"],
        "seconds": round(duration, 2),
        "bytes_per_response": round(w["bytes"] / n),
        **cpu,
    }


# ----------------------------------------------------------------------------- main


def host_info() -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "hostname": platform.node(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def versions(wrk: str) -> dict[str, str]:
    import fastapi
    import psycopg
    import uvicorn

    out = {"fastapi": fastapi.__version__, "uvicorn": uvicorn.__version__}
    with contextlib.suppress(Exception):
        import uvloop

        out["uvloop"] = uvloop.__version__
    with contextlib.suppress(Exception):
        import httptools

        out["httptools"] = httptools.__version__
    first = subprocess.run([wrk, "--version"], capture_output=True, text=True).stdout.splitlines()
    out["wrk"] = first[0].split(" [")[0] if first else "?"
    with psycopg.connect(PG_ADMIN_DSN) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        out["postgresql"] = str(row[0]) if row else "?"
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    p.add_argument("--jobs", type=int, default=100_000, help="jobs to seed (default 100000)")
    p.add_argument("--teams", type=int, default=8, help="teams (each with one key) the jobs are spread over")
    p.add_argument("--clients", default="32", help="concurrent connections, comma-separated (e.g. 32,128)")
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=3.0, help="discarded seconds before each measured run")
    p.add_argument(
        "--workload",
        default="poll,list",
        help=f"comma-separated, of: {', '.join(WORKLOADS)} (default poll,list)",
    )
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument("--seed", type=int, default=1234, help="random seed of the data and the request order")
    p.add_argument("--keep-logs", action="store_true", help="keep the server logs (path printed on stderr)")
    args = p.parse_args(argv)
    args.clients = [int(c) for c in str(args.clients).split(",") if c.strip()]
    args.workload = [w.strip() for w in str(args.workload).split(",") if w.strip()]
    unknown = [w for w in args.workload if w not in WORKLOADS]
    if unknown or not args.workload:
        p.error(f"--workload: unknown {unknown}; choose from {', '.join(WORKLOADS)}")
    if any(c < 1 for c in args.clients) or not args.clients:
        p.error("--clients: positive integers")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    wrk = ensure_wrk()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="tunepool-api-load-"))
    result: dict[str, Any] = {"benchmark": "api_load", "host": host_info()}
    result["host"]["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    servers: list[Server] = []
    flush_broker()
    try:
        with throwaway_database() as db_name:
            database_url = PG_URL.format(name=db_name)
            env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEPOOL_")}
            env |= {
                "PYTHONPATH": str(REPO),
                "TUNEPOOL_HOME": str(tmp / "home"),
                "TUNEPOOL_DATABASE_URL": database_url,
                "TUNEPOOL_BROKER_URL": BROKER_URL,
                "TUNEPOOL_STORAGE_DIR": str(tmp / "artifacts"),
            }
            log(f"database {db_name}: migrating")
            subprocess.run(
                [sys.executable, "-m", "service.cli", "migrate"],
                cwd=REPO,
                env=env,
                check=True,
                capture_output=True,
            )
            log(f"seeding {args.jobs} jobs over {args.teams} teams")
            seeded = seed(database_url, args.jobs, args.teams, rng)
            log(f"seeded in {seeded.seconds:.1f} s: {seeded.by_status}")
            result["versions"] = versions(wrk)
            result["config"] = {
                "jobs": args.jobs,
                "teams": args.teams,
                "files": seeded.files,
                "clients": args.clients,
                "seconds": args.seconds,
                "warmup_s": args.warmup,
                "workloads": args.workload,
                "load_generator": f"wrk, {args.wrk_threads} thread(s), keep-alive, closed loop",
                "server": "uvicorn, 1 process (production's single worker), loop/http auto, access log off",
            }
            result["seeding"] = {"seconds": round(seeded.seconds, 2), "jobs_by_status": seeded.by_status}

            api_port, bare_port = free_port(), free_port()
            api = start_server(
                "api",
                [sys.executable, "-m", "service.cli", "api", "--host", "127.0.0.1", "--port", str(api_port)],
                env, api_port, "/healthz", tmp,
            )  # fmt: skip
            servers.append(api)
            bare = start_server(
                "bare",
                [sys.executable, "-m", "uvicorn", "bench._api_load_bare:app", "--host", "127.0.0.1",
                 "--port", str(bare_port), "--log-level", "info", "--no-access-log"],
                env, bare_port, f"{JOBS_PATH}/ftjob-ready", tmp,
            )  # fmt: skip
            servers.append(bare)

            script = tmp / "api_load.lua"
            script.write_text(LUA)
            files = {
                name: write_requests(tmp / f"{name}.tsv", WORKLOADS[name](seeded, rng))
                for name in args.workload
            }
            files.setdefault("poll", write_requests(tmp / "poll.tsv", poll_requests(seeded, rng)))
            sample = seeded.jobs[len(seeded.jobs) // 2]
            status, body = fetch_json(f"{api.url}{JOBS_PATH}/{sample.id}", seeded.keys[sample.team])
            _, bare_body = fetch_json(f"{bare.url}{JOBS_PATH}/{sample.id}", "")
            result["config"]["job_object_bytes"] = {"api": len(body), "bare": len(bare_body)}
            if status != 200:
                raise RuntimeError(f"GET job answered {status}: {body[:300]!r}")

            # (target name, server, request file, path prefix); bare first, then tunepool's.
            plan: list[tuple[str, Server, Path, str]] = [
                ("bare", bare, files["poll"], ""),
                ("bare_async", bare, files["poll"], "/async"),
            ]
            plan += [(name, api, files[name], "") for name in args.workload]
            runs = []
            for clients in args.clients:
                for target, server, requests_file, prefix in plan:
                    log(f"{target} @ {clients} clients: warm-up {args.warmup:g} s, then {args.seconds:g} s")
                    for seconds, pid in ((args.warmup, None), (args.seconds, server.proc.pid)):
                        figures = run_wrk(
                            wrk, script, server.url, requests_file, clients=clients, threads=args.wrk_threads,
                            seconds=seconds, seed=args.seed, prefix=prefix, server_pid=pid,
                        )  # fmt: skip
                    log(
                        f"  {figures['rps']:.0f} req/s, p50 {figures['p50_ms']} ms, "
                        f"p99 {figures['p99_ms']} ms, errors {figures['errors']}, "
                        f"CPU: server {figures['server_cpu_util']}, postgres {figures['postgres_cpu_util']}, "
                        f"other {figures['other_cpu_util']}"
                    )
                    if not figures["requests"]:
                        log(f"  {target} answered nothing in {args.seconds:g} s: the server stalled")
                    runs.append({"clients": clients, "target": target, **figures})
            result["runs"] = runs
            result["ratios"], result["goals"] = ratios_and_goals(runs, args.clients, args.workload)
            result["goals_met"] = all(g["met"] for g in result["goals"].values())
    finally:
        for server in servers:
            stop_server(server)
        flush_broker()
        if args.keep_logs:
            log(f"server logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    result["host"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result), flush=True)
    return result


def ratios_and_goals(
    runs: list[dict[str, Any]], clients_list: list[int], workloads: list[str]
) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    by = {(r["clients"], r["target"]): r for r in runs}
    ratios: dict[str, float] = {}
    goals: dict[str, dict[str, Any]] = {}
    for clients in clients_list:
        bare = by[(clients, "bare")]
        for name in ["bare_async", *workloads]:
            run = by[(clients, name)]
            ratios[f"{name}_vs_bare@{clients}"] = round(run["rps"] / bare["rps"], 3) if bare["rps"] else 0.0
        if "poll" in workloads:
            poll = by[(clients, "poll")]
            ratio = ratios[f"poll_vs_bare@{clients}"]
            goals[f"poll_rps_vs_bare@{clients}"] = {"goal": f">= {GOAL_RPS_RATIO}", "value": ratio,
                                                    "met": ratio >= GOAL_RPS_RATIO}  # fmt: skip
            # Requests that time out (10 s) are not in wrk's latency histogram: none may.
            p99_met = (
                poll["requests"] > 0
                and poll["socket_errors"]["timeout"] == 0
                and poll["p99_ms"] <= GOAL_P99_MS
            )
            goals[f"poll_p99_ms@{clients}"] = {
                "goal": f"<= {GOAL_P99_MS}",
                "value": poll["p99_ms"],
                "met": p99_met,
            }
            # A server that answers nothing (stalled) has no errors to count: that fails this goal too.
            goals[f"poll_errors@{clients}"] = {
                "goal": "== 0, and some answers",
                "value": poll["errors"],
                "met": poll["errors"] == 0 and poll["requests"] > 0,
            }
        for name in ("create", "upload", "mix"):
            if name in workloads:
                run = by[(clients, name)]
                goals[f"{name}_errors@{clients}"] = {
                    "goal": "== 0, and some answers",
                    "value": run["errors"],
                    "met": run["errors"] == 0 and run["requests"] > 0,
                }
    return ratios, goals


def flush_broker() -> None:
    """Drop the dispatch messages of the jobs the create and mix workloads made."""
    import redis

    host_port, db = BROKER_URL.removeprefix("redis://").rsplit("/", 1)
    host, port = host_port.split(":")
    redis.Redis(host=host, port=int(port), db=int(db)).flushdb()


if __name__ == "__main__":
    main()
