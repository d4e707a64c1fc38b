"""Dispatch latency and job overhead: how long a submitted job waits for an idle worker, and what the
service adds to a training run, on Redis + PostgreSQL and on the embedded transport.

What it does, per backend (`--backends`, run from the repository root; `redis` needs the local
PostgreSQL at 127.0.0.1:5432, user postgres, trust auth, and Redis at 127.0.0.1:6379):

    redis     a throwaway PostgreSQL database `tunepool_bench_<hex>` (dropped at the end) and the
              Redis broker redis://127.0.0.1:6379/12 (that database is flushed before and after:
              stale messages of an interrupted run would make the worker busy)
    embedded  a temporary directory with a SQLite database and the SQLite-backed Celery transport
              (`sqla+sqlite:///.../broker.db`), as `tunepool up` runs on one machine

1. Set-up. `tunepool migrate` (`python -m service.cli migrate`), one team
   (`service.teams.create_team`), a tiny base model registered as `tiny` (`service.teams.add_model`:
   a 2-layer Llama, hidden size 32, with a 320-token byte-level BPE tokenizer and a ChatML template,
   built from a config and saved as a Hugging Face directory, as tests/worker/training/conftest.py
   builds it), then the API (`python -m service.cli api`, one uvicorn process) and ONE worker
   (`python -m service.cli worker --pool default`: Celery, solo pool, concurrency 1), each in its own
   process group. The worker runs with the production defaults of every TUNEPOOL_* worker setting
   (lease, heartbeat, poll_s...) unless `--poll-s` is given. Every training process (the worker's
   children and the standalone runs) gets OMP_NUM_THREADS=`--torch-threads` (1 by default): with
   torch's default of one thread per core, the tiny model's 30 steps took 0.2 s on an idle 2-core
   machine and up to 8.6 s while other processes ran (OpenMP threads waiting for each other on a
   busy core), which buried the seconds this benchmark compares; with 1 thread they took 0.2 s
   either way. It changes the training loop only, the same in both runs of a pair. A chat JSONL
   training file of 64 examples is uploaded through POST /v1/files. The benchmark waits for the
   worker's Celery "ready." line, then runs `--warmup-jobs` jobs (not counted: the first job after
   start pays for cold caches).
2. Dispatch latency. `--jobs` jobs, one at a time, each DFT with max_steps 1 (batch 4, sequences
   up to 128 tokens), submitted with POST /v1/fine_tuning/jobs (httpx, keep-alive). Measured: from
   the moment the POST's response has arrived to the moment the job's row is no longer `queued` in
   the database, i.e. when the worker's claim (worker/claim.py: one UPDATE queued -> running,
   committed together with its "Job started on worker" event) is visible to every reader. The
   benchmark reads `SELECT status FROM jobs WHERE id = ?` on its own autocommit connection every
   `--poll-ms` ms (2 by default) and takes the start time of the first read that sees the claim;
   as each read sees the database as of its start, the commit happened between the previous read's
   start and this one's, so the figure is an upper bound, at most one poll interval (plus a read,
   well under 1 ms) late. `jobs.started_at` and event times are whole seconds, hence not used;
   polling GET /v1/fine_tuning/jobs/{id} would add the API's own latency to each sample. A POST
   answers after the job is committed and its dispatch message sent (service/job_create.py), so a
   worker may claim before the response arrives: such a sample is the first read's delay, about
   0, and the negative delivery time below shows it. Also reported: from the POST's request to
   the claim, the POST's own duration, and the split of
   the latency at the moment the worker logged Celery's "Task tunepool.dispatch[...] received"
   (millisecond log timestamps of the worker, same host clock): broker delivery, then the claim
   (database reads, team lock, UPDATE, event, commit). Each job is waited for until it has
   finished (`succeeded`), then the benchmark sleeps 0.3 s + uniform(0, 1) s, so that the worker
   has returned to its broker (idle) at each submit and submits are not in phase with a polling
   broker's interval. Figures: median, p95 (nearest rank: the ceil(0.95 n)-th smallest), min, max.
3. Job overhead. `--overhead-repeats` pairs of runs of `--overhead-steps` steps each (batch 4):
   a job through the service (wall time from just before the POST until the client's GET, sent
   every 50 ms, first answers `succeeded`) and the same training run standalone,
   `python -m worker.training CONFIG` with the `config.json` the worker wrote for the first of these
   jobs (worker/runner.py's `training_config`, under STORAGE_DIR/jobs/<id>/), `output_dir` pointed
   at a fresh directory, same environment, timed from the process's start to its exit. Both load
   the same model and data, train the same steps with the same seed and save the final checkpoint;
   the service also dispatches, claims, spawns the training child (`python -m worker.child`), tails
   its outputs into the database every poll_s and writes the results file. The order within a
   pair alternates (service first, then standalone first, ...), 1 s apart. Figures: the median
   wall time of each, the difference of the medians (the goal's figure) and the median of the
   pairs' differences; each split into the training loop (the trainer's own `elapsed_s`, from
   summary.json) and everything around it (interpreter start, imports, model and data loading,
   checkpoint save, and for the service dispatch, polling and database writes); and the service
   job's POST -> `running` and `running` -> `succeeded` as the client's GETs saw them.

Goals (issue: dispatch latency): median dispatch latency <= 1 s on Redis + PostgreSQL and <= 2 s on
the embedded transport; a job's wall time through the service at most 5 s over the standalone run.

Output: one JSON line on stdout (progress on stderr): host, versions, config, per-backend figures
(samples included) and goals with `met` booleans. The machine is shared (2 cores here): the
worker, the training child, the API, the database and this process share them, so compare figures
of one run. Every process and database is removed at the end, also on Ctrl-C, SIGTERM or an
error: API and worker get SIGTERM (then SIGKILL after 20 s) to their process groups, a running
training child is stopped by its worker (and dies with it: PR_SET_PDEATHSIG, worker/runner.py).

    .venv/bin/python -m bench.dispatch_latency                          # 20 jobs, both backends
    .venv/bin/python -m bench.dispatch_latency --jobs 5 --backends embedded --overhead-repeats 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.api_load import PG_ADMIN_DSN, free_port, throwaway_database

REPO = Path(__file__).resolve().parents[1]
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
REDIS_DB = 12
REDIS_BROKER_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
BACKENDS = ("redis", "embedded")
GOAL_DISPATCH_MEDIAN_S = {"redis": 1.0, "embedded": 2.0}
GOAL_OVERHEAD_S = 5.0
MODEL_NAME = "tiny"
EXAMPLES = 64
BATCH_SIZE = 4
JOBS_PATH = "/v1/fine_tuning/jobs"
STARTED = ("running", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")
RECEIVED = "Task tunepool.dispatch["
CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def log(message: str) -> None:
    print(f"[dispatch_latency] {message}", file=sys.stderr, flush=True)


def build_tiny_model(path: Path, hidden_size: int = 32, layers: int = 2) -> Path:
    """A 2-layer Llama with a byte-level BPE tokenizer and ChatML (tests/worker/training/conftest.py);
    bench/chaos.py asks for a wider, deeper one, so that a job's steps take some time."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [
        "the cat sat on the mat. 1 + 2 = 3. The answer is 42.",
        "Mia has 14 stickers. She gives away 5. How many stickers does she have now?",
        "You are a helpful assistant. Answer briefly, step by step.",
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHATML
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def chat_jsonl(n: int, seed: int) -> bytes:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        words = " ".join(rng.choice(["the", "cat", "sat", "on", "mat"]) for _ in range(rng.randint(0, 12)))
        messages = [
            {"role": "user", "content": f"What is {a} + {b}? {words}".strip()},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}. The answer is {a + b}."},
        ]
        lines.append(json.dumps({"messages": messages}))
    return ("\n".join(lines) + "\n").encode()


def job_request(file_id: str, steps: int) -> dict[str, Any]:
    epochs = min(50, math.ceil(steps * BATCH_SIZE / EXAMPLES))
    hp = {"n_epochs": epochs, "batch_size": BATCH_SIZE, "learning_rate": 1e-3, "max_seq_length": 128,
          "max_steps": steps}  # fmt: skip
    return {
        "model": MODEL_NAME,
        "training_file": file_id,
        "method": {"type": "dft", "dft": {"hyperparameters": hp}},
    }


# ----------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path


def start_proc(name: str, argv: list[str], env: dict[str, str], logs: Path) -> Proc:
    log_path = logs / f"{name}.log"
    with log_path.open("wb") as out:
        popen = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Proc(name, popen, log_path)


def stop_proc(proc: Proc) -> None:
    """SIGTERM to the process group, SIGKILL after 20 s. A worker stops its training child (which
    has its own process group, and dies with the worker in any case: PR_SET_PDEATHSIG)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.popen.pid, signal.SIGTERM)
    try:
        proc.popen.wait(20)
    except subprocess.TimeoutExpired:
        log(f"{proc.name} did not stop in 20 s: killing its process group")
    with contextlib.suppress(ProcessLookupError):  # also what is left of the group (a training child)
        os.killpg(proc.popen.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.popen.wait(5)


def tail(path: Path, n: int = 3000) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-n:]
    return ""


def wait_for(proc: Proc, ready: Any, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{tail(proc.log_path)}")
        if ready():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name}: no {what} after {timeout:g} s:\n{tail(proc.log_path)}")


# ----------------------------------------------------------------------------- one backend's stack


@dataclass
class Stack:
    backend: str
    env: dict[str, str]
    settings: Any  # service.settings.Settings
    engine: Any  # sqlalchemy Engine of the service's database (autocommit reads)
    http: Any  # httpx.Client with the team's key
    file_id: str
    api: Proc
    worker: Proc
    home: Path


def flush_redis() -> None:
    import redis

    redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()


@contextlib.contextmanager
def running_stack(backend: str, home: Path, model_dir: Path, args: argparse.Namespace) -> Iterator[Stack]:
    import httpx
    from sqlalchemy import text

    from service.db import Database
    from service.settings import load_settings
    from service.teams import add_model, create_team

    home.mkdir(parents=True)
    with contextlib.ExitStack() as stack:
        if backend == "redis":
            name = stack.enter_context(throwaway_database())
            database_url, broker_url = PG_URL.format(name=name), REDIS_BROKER_URL
            flush_redis()
            stack.callback(flush_redis)
            log(f"redis: database {name}, broker {broker_url}")
        else:
            database_url, broker_url = (
                f"sqlite:///{home / 'tunepool.db'}",
                f"sqla+sqlite:///{home / 'broker.db'}",
            )
            log(f"embedded: {database_url}, broker {broker_url}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEPOOL_")}
        env |= {
            "PYTHONPATH": str(REPO),
            "TUNEPOOL_HOME": str(home),
            "TUNEPOOL_DATABASE_URL": database_url,
            "TUNEPOOL_BROKER_URL": broker_url,
            "TUNEPOOL_STORAGE_DIR": str(home / "artifacts"),
        }
        if args.poll_s is not None:
            env["TUNEPOOL_POLL_S"] = str(args.poll_s)
        if args.torch_threads:  # inherited by the worker's training children and the standalone runs
            env["OMP_NUM_THREADS"] = str(args.torch_threads)
        subprocess.run(
            [sys.executable, "-m", "service.cli", "migrate"],
            cwd=REPO,
            env=env,
            check=True,
            capture_output=True,
        )
        settings = load_settings(
            **{k.removeprefix("TUNEPOOL_").lower(): v for k, v in env.items() if k.startswith("TUNEPOOL_")}
        )
        db = Database(settings)
        stack.callback(db.dispose)
        with db.session() as session:
            _team, key = create_team(session, settings, "bench")
        with db.session() as session:
            roots = settings.model_copy(update={"model_roots": str(model_dir)})  # a root of its own
            add_model(session, roots, MODEL_NAME, str(model_dir))

        port = free_port()
        argv = [sys.executable, "-m", "service.cli", "api", "--host", "127.0.0.1", "--port", str(port)]
        api = start_proc("api", argv, env, home)
        stack.callback(stop_proc, api)
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"},
                            timeout=60)  # fmt: skip
        stack.callback(http.close)

        def healthy() -> bool:
            try:
                return bool(http.get("/healthz", timeout=1).status_code == 200)
            except httpx.HTTPError:
                return False

        wait_for(api, healthy, "answer on /healthz")
        files = {"file": ("train.jsonl", chat_jsonl(EXAMPLES, args.seed), "application/jsonl")}
        response = http.post("/v1/files", files=files, data={"purpose": "fine-tune"})
        response.raise_for_status()
        file_id = str(response.json()["id"])

        worker = start_proc(
            "worker", [sys.executable, "-m", "service.cli", "worker", "--pool", "default"], env, home
        )
        stack.callback(stop_proc, worker)
        wait_for(worker, lambda: " ready." in tail(worker.log_path, 100_000), "Celery 'ready.' line")
        engine = db.engine.execution_options(isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:  # the worker registered itself before starting Celery
            workers = conn.execute(text("SELECT count(*) FROM workers")).scalar_one()
        log(f"{backend}: API on port {port}, {workers} worker ready")
        yield Stack(backend, env, settings, engine, http, file_id, api, worker, home)


# ----------------------------------------------------------------------------- measurements


def submit(stack: Stack, steps: int) -> tuple[str, float, float]:
    """(job id, time.time() before the POST, time.time() when its response arrived)."""
    body = job_request(stack.file_id, steps)
    sent = time.time()
    response = stack.http.post(JOBS_PATH, json=body)
    answered = time.time()
    if response.status_code != 200:
        raise RuntimeError(f"POST {JOBS_PATH} answered {response.status_code}: {response.text[:500]}")
    return str(response.json()["id"]), sent, answered


def wait_claimed(stack: Stack, job_id: str, poll_s: float, timeout: float = 120.0) -> tuple[float, str]:
    """(start time of the first database read that sees the job claimed, its status then)."""
    from sqlalchemy import text

    query = text("SELECT status FROM jobs WHERE id = :id")
    deadline = time.monotonic() + timeout
    with stack.engine.connect() as conn:
        while time.monotonic() < deadline:
            started = time.time()
            status = conn.execute(query, {"id": job_id}).scalar_one()
            if status in STARTED:
                return started, str(status)
            if stack.worker.popen.poll() is not None:
                raise RuntimeError(f"the worker exited:\n{tail(stack.worker.log_path)}")
            time.sleep(max(0.0, poll_s - (time.time() - started)))
    raise RuntimeError(f"job {job_id} not claimed after {timeout:g} s:\n{tail(stack.worker.log_path)}")


def wait_finished(
    stack: Stack, job_id: str, poll_s: float, timeout: float = 600.0
) -> tuple[float, str, float | None]:
    """(time.time() when the client's GET first answered a terminal status, that status, and when
    it first answered `running`: None if never seen)."""
    deadline = time.monotonic() + timeout
    running = None
    while time.monotonic() < deadline:
        job = stack.http.get(f"{JOBS_PATH}/{job_id}").json()
        seen = time.time()
        if job["status"] == "running" and running is None:
            running = seen
        if job["status"] in TERMINAL:
            return seen, str(job["status"]), running
        if stack.worker.popen.poll() is not None:
            raise RuntimeError(f"the worker exited:\n{tail(stack.worker.log_path)}")
        time.sleep(poll_s)
    raise RuntimeError(f"job {job_id} not finished after {timeout:g} s:\n{tail(stack.worker.log_path)}")


def job_failure(stack: Stack, job_id: str) -> str:
    events = stack.http.get(f"{JOBS_PATH}/{job_id}/events", params={"limit": 20}).json()["data"]
    return "\n".join(e["message"] for e in reversed(events)) + "\n" + tail(stack.worker.log_path)


def received_at(log_path: Path, offset: int) -> float | None:
    """Time of the first Celery "Task tunepool.dispatch[...] received" line after `offset` bytes."""
    with log_path.open("rb") as f:
        f.seek(offset)
        for raw in f:
            line = raw.decode(errors="replace")
            if RECEIVED in line and line.rstrip().endswith("received"):
                with contextlib.suppress(ValueError):
                    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def quantiles(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    p95 = s[max(0, math.ceil(0.95 * len(s)) - 1)]
    return {"median_s": round(statistics.median(s), 4), "p95_s": round(p95, 4), "min_s": round(s[0], 4),
            "max_s": round(s[-1], 4), "mean_s": round(statistics.fmean(s), 4)}  # fmt: skip


def measure_dispatch(stack: Stack, n: int, warmup: int, poll_s: float, rng: random.Random) -> dict[str, Any]:
    latency, from_request, post_s, delivery, claim, warm = [], [], [], [], [], []
    for i in range(warmup + n):
        time.sleep(0.3 + rng.random())  # the worker is back on its broker, at a random phase of its poll
        offset = stack.worker.log_path.stat().st_size
        job_id, sent, answered = submit(stack, steps=1)
        claimed, _ = wait_claimed(stack, job_id, poll_s)
        _, status, _ = wait_finished(stack, job_id, 0.2)
        if status != "succeeded":
            raise RuntimeError(f"job {job_id} {status}:\n{job_failure(stack, job_id)}")
        if i < warmup:
            warm.append(round(claimed - answered, 4))
            log(f"  warm-up job: {claimed - answered:.3f} s (not counted)")
            continue
        latency.append(claimed - answered)
        from_request.append(claimed - sent)
        post_s.append(answered - sent)
        received = received_at(stack.worker.log_path, offset)
        if received is not None:
            delivery.append(received - answered)
            claim.append(claimed - received)
        log(
            f"  job {i - warmup + 1}/{n}: {claimed - answered:.3f} s after the POST's response"
            + (f" (worker received the message at +{received - answered:.3f} s)" if received else "")
        )
    out: dict[str, Any] = {"jobs": n, **quantiles(latency)}
    out["from_post_request"] = quantiles(from_request)
    out["post_duration"] = quantiles(post_s)
    if delivery:
        out["response_to_worker_received"] = quantiles(delivery)
        out["worker_received_to_claim_visible"] = quantiles(claim)
        out["received_lines_found"] = len(delivery)
    out["samples_s"] = [round(x, 4) for x in latency]
    out["warmup_samples_s"] = warm
    return out


def run_through_service(stack: Stack, steps: int) -> dict[str, Any]:
    """One job through the service: wall time from before the POST to the client seeing `succeeded`."""
    from service.storage import Storage
    from worker.artifacts import run_dir

    job_id, sent, _ = submit(stack, steps)
    finished, status, running = wait_finished(stack, job_id, 0.05)
    if status != "succeeded":
        raise RuntimeError(f"job {job_id} {status}:\n{job_failure(stack, job_id)}")
    job = stack.http.get(f"{JOBS_PATH}/{job_id}").json()
    if job["progress"]["steps_completed"] != steps:
        raise RuntimeError(f"job {job_id} trained {job['progress']['steps_completed']} steps, not {steps}")
    directory = run_dir(Storage(stack.settings.artifacts), job_id)
    trainer_s = json.loads((directory / "output" / "summary.json").read_text())["elapsed_s"]
    out = {"job_id": job_id, "dir": directory, "wall_s": finished - sent, "trainer_s": trainer_s}
    if running is not None:  # a GET every 50 ms: the split is good to that
        out |= {"post_to_running_s": running - sent, "running_to_succeeded_s": finished - running}
    return out


def run_standalone(stack: Stack, config: dict[str, Any], name: str) -> dict[str, Any]:
    """`python -m worker.training CONFIG`: wall time from the process's start to its exit."""
    config = {**config, "output_dir": str(stack.home / name)}
    config_path = stack.home / f"{name}.json"
    config_path.write_text(json.dumps(config, indent=2))
    log_path = stack.home / f"{name}.log"
    with log_path.open("wb") as out:
        t0 = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "worker.training", str(config_path)],
            cwd=REPO, env=stack.env, stdout=out, stderr=subprocess.STDOUT, check=False,
        )  # fmt: skip
        wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"standalone run failed ({done.returncode}):\n{tail(log_path)}")
    summary = json.loads((Path(config["output_dir"]) / "summary.json").read_text())
    return {"wall_s": wall, "trainer_s": summary["elapsed_s"], "steps": summary["steps"]}


def measure_overhead(stack: Stack, steps: int, repeats: int) -> dict[str, Any]:
    from worker.child import CONFIG_FILE

    # The first pair's service job gives the config (the worker wrote it); later pairs alternate
    # which of the two runs first, so neither always finds the machine just warmed by the other.
    time.sleep(1.0)
    first = run_through_service(stack, steps)
    config = json.loads((first["dir"] / CONFIG_FILE).read_text())
    service: list[dict[str, Any]] = []
    standalone: list[dict[str, Any]] = []
    for r in range(repeats):
        for which in ("standalone", "service") if r % 2 else ("service", "standalone"):
            if which == "service":
                if r == 0:
                    service.append(first)
                    continue
                time.sleep(1.0)  # an idle worker, as in the dispatch runs
                service.append(run_through_service(stack, steps))
            else:
                time.sleep(1.0)
                standalone.append(run_standalone(stack, config, f"standalone-{r}"))
        a, b = service[-1], standalone[-1]
        log(f"  pair {r + 1}/{repeats}: service {a['wall_s']:.2f} s (trainer {a['trainer_s']:.2f} s), "
            f"standalone {b['wall_s']:.2f} s (trainer {b['trainer_s']:.2f} s), "
            f"extra {a['wall_s'] - b['wall_s']:+.2f} s")  # fmt: skip

    def med(rows: list[dict[str, Any]], key: str) -> float:
        return round(statistics.median(row[key] for row in rows), 3)

    service_med, alone_med = med(service, "wall_s"), med(standalone, "wall_s")
    out: dict[str, Any] = {
        "steps": steps,
        "repeats": repeats,
        "service_median_s": service_med,
        "standalone_median_s": alone_med,
        "extra_s": round(service_med - alone_med, 3),
        "extra_median_of_pairs_s": round(
            statistics.median(a["wall_s"] - b["wall_s"] for a, b in zip(service, standalone, strict=True)), 3
        ),
        # The training loop itself (trainer's elapsed_s) vs everything around it (start, load, save).
        "service_trainer_median_s": med(service, "trainer_s"),
        "standalone_trainer_median_s": med(standalone, "trainer_s"),
        "service_outside_trainer_median_s": round(
            statistics.median(row["wall_s"] - row["trainer_s"] for row in service), 3
        ),
        "standalone_outside_trainer_median_s": round(
            statistics.median(row["wall_s"] - row["trainer_s"] for row in standalone), 3
        ),
    }
    if all("post_to_running_s" in row for row in service):
        out["service_post_to_running_median_s"] = med(service, "post_to_running_s")
        out["service_running_to_succeeded_median_s"] = med(service, "running_to_succeeded_s")
    keep = ("wall_s", "trainer_s", "post_to_running_s", "running_to_succeeded_s")
    out["pairs"] = [
        {"service": {k: round(v, 3) for k, v in a.items() if k in keep},
         "standalone": {k: round(v, 3) for k, v in b.items() if k in ("wall_s", "trainer_s")}}
        for a, b in zip(service, standalone, strict=True)
    ]  # fmt: skip
    return out


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
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def versions(backends: list[str]) -> dict[str, str]:
    import sqlite3
    from importlib.metadata import version

    out = {name: version(name) for name in ("celery", "kombu", "sqlalchemy", "torch", "transformers")}
    out["sqlite"] = sqlite3.sqlite_version
    if "redis" in backends:
        import psycopg
        import redis

        out["redis_server"] = str(redis.Redis(host="127.0.0.1", port=6379).info("server")["redis_version"])
        with psycopg.connect(PG_ADMIN_DSN) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            out["postgresql"] = str(row[0]) if row else "?"
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    p.add_argument("--jobs", type=int, default=20, help="measured jobs per backend (default 20)")
    p.add_argument("--warmup-jobs", type=int, default=1, help="jobs run first and not counted (default 1)")
    p.add_argument("--backends", default="redis,embedded", help="comma-separated, of: redis, embedded")
    p.add_argument("--overhead-steps", type=int, default=30, help="steps of the overhead run (0: skip it)")
    p.add_argument("--overhead-repeats", type=int, default=3, help="service/standalone pairs (default 3)")
    p.add_argument("--poll-ms", type=float, default=2.0, help="database read interval while waiting (ms)")
    p.add_argument(
        "--poll-s", type=float, default=None, help="TUNEPOOL_POLL_S of the worker (default: its own)"
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS of every training process (default 1; 0: torch's default, one per core)",
    )
    p.add_argument("--seed", type=int, default=1234, help="random seed of the data and the gaps")
    p.add_argument("--keep-logs", action="store_true", help="keep the logs and run directories")
    args = p.parse_args(argv)
    args.backends = [b.strip() for b in str(args.backends).split(",") if b.strip()]
    if not args.backends or any(b not in BACKENDS for b in args.backends):
        p.error(f"--backends: choose from {', '.join(BACKENDS)}")
    if args.jobs < 1 or args.overhead_steps < 0 or args.overhead_repeats < 1:
        p.error("--jobs and --overhead-repeats: positive; --overhead-steps: 0 or more")
    return args


def goals_of(backends: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    goals: dict[str, dict[str, Any]] = {}
    for name, figures in backends.items():
        median = figures["dispatch"]["median_s"]
        goal = GOAL_DISPATCH_MEDIAN_S[name]
        goals[f"dispatch_median_s@{name}"] = {"goal": f"<= {goal}", "value": median, "met": median <= goal}
        if "overhead" in figures:
            extra = figures["overhead"]["extra_s"]
            goals[f"overhead_extra_s@{name}"] = {"goal": f"<= {GOAL_OVERHEAD_S}", "value": extra,
                                                 "met": extra <= GOAL_OVERHEAD_S}  # fmt: skip
    return goals


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)

    def on_sigterm(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt  # run every `finally`: processes stopped, databases dropped

    signal.signal(signal.SIGTERM, on_sigterm)
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="tunepool-dispatch-"))
    result: dict[str, Any] = {"benchmark": "dispatch_latency", "host": host_info()}
    try:
        result["versions"] = versions(args.backends)
        from service.settings import load_settings

        defaults = load_settings(home=tmp / "defaults")
        names = ("lease_s", "heartbeat_s", "poll_s", "reconcile_every_s", "redispatch_after_s")
        worker_settings = {k: getattr(defaults, k) for k in names}
        if args.poll_s is not None:
            worker_settings["poll_s"] = args.poll_s
        result["config"] = {
            "jobs": args.jobs,
            "warmup_jobs": args.warmup_jobs,
            "backends": args.backends,
            "dispatch_job": job_request("file-...", 1),
            "overhead_steps": args.overhead_steps,
            "overhead_repeats": args.overhead_repeats,
            "db_poll_ms": args.poll_ms,
            "model": "tiny Llama: 2 layers, hidden 32, vocab 323 (BPE), tied embeddings, fp32, CPU",
            "training_examples": EXAMPLES,
            "worker_settings": worker_settings,
            "torch_threads": args.torch_threads or "default (one per core)",
            "workers": 1,
        }
        log("building the tiny model")
        model_dir = build_tiny_model(tmp / "tiny-model")
        figures: dict[str, dict[str, Any]] = {}
        result["backends"] = figures
        for backend in args.backends:
            with running_stack(backend, tmp / backend, model_dir, args) as stack:
                log(f"{backend}: dispatch latency, {args.jobs} jobs (+{args.warmup_jobs} warm-up)")
                d = measure_dispatch(stack, args.jobs, args.warmup_jobs, args.poll_ms / 1000, rng)
                figures[backend] = {
                    "database": "postgresql" if backend == "redis" else "sqlite",
                    "broker": stack.settings.broker_url.split("://")[0],
                    "dispatch": d,
                }
                log(
                    f"{backend}: median {d['median_s']:.3f} s, p95 {d['p95_s']:.3f} s, max {d['max_s']:.3f} s"
                )
                if args.overhead_steps:
                    log(f"{backend}: job overhead, {args.overhead_steps} steps x {args.overhead_repeats}")
                    o = measure_overhead(stack, args.overhead_steps, args.overhead_repeats)
                    figures[backend]["overhead"] = o
                    log(f"{backend}: service {o['service_median_s']:.2f} s vs standalone "
                        f"{o['standalone_median_s']:.2f} s: {o['extra_s']:+.2f} s")  # fmt: skip
        result["goals"] = goals_of(figures)
        result["goals_met"] = all(g["met"] for g in result["goals"].values())
    finally:
        if args.keep_logs:
            log(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    result["host"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
