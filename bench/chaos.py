"""Chaos: short jobs from several teams on two workers while workers are SIGKILLed and restarted,
Redis is restarted and the API is restarted; every job must still succeed, exactly once at a time.

What it does (run from the repository root; needs the local PostgreSQL at 127.0.0.1:5432, user
postgres, trust auth, and the `redis-server` binary, which it runs itself on a free port so that
restarting it disturbs nothing else):

1. Set-up, per scenario. A throwaway PostgreSQL database, a private redis-server (no persistence:
   a restart loses every queued dispatch message, as a crashed Redis would), `tunepool migrate`,
   `--teams` teams, a small Llama built from a config (2 layers, hidden 64: a few milliseconds a
   step on one thread) registered as `tiny`, the API and `--workers` workers (`tunepool worker`),
   each in its own process group, with the e2e tests' fast clock (lease 6 s, heartbeat 1 s,
   reconciler every 1 s, re-dispatch after 3 s) and TUNEPOOL_MAX_ATTEMPTS=`--max-attempts` (a
   kill every 10-20 s would otherwise fail an unlucky job with `worker_lost` after 3 lost leases,
   which is what that setting is for). Every team uploads a training file through the API, then
   `--jobs` DFT jobs are submitted round-robin over the teams (`--steps` steps, a checkpoint every
   `--checkpoint-every`).
2. The undisturbed run (`baseline`): wait until every job has ended. Its makespan (first submit
   to last job finished) is the reference.
3. The chaos run, the same jobs on a fresh stack: every uniform(`--kill-min`, `--kill-max`)
   seconds a random worker is SIGKILLed and restarted at once (alternately the Celery process
   alone, whose training child must then die by PR_SET_PDEATHSIG, and the worker's whole process
   group, as on node loss); once, a third of the way through the baseline's makespan, Redis is
   stopped and started again (empty); once, at two thirds, the API is stopped (SIGTERM) and
   started again on the same port. The client polls jobs through the API and retries while it is
   down.

Checks (each a boolean in `checks`; `ok` is all of them):
- every job ends `succeeded`;
- never two training processes of one job at once: a monitor thread lists every
  `python -m worker.child <run dir>` process every 50 ms (psutil) and records the most seen alive
  for one job at one time (must be 1);
- the database agrees: each job has exactly one metrics row per step (1..steps), its attempts
  started in order, and no attempt started before the previous one was re-queued;
- every restart is explained: for each job, its attempts 1..n-1 each have the reconciler's
  "worker W stopped renewing the lease of attempt k: restarted from checkpoint step N" event, and
  each later attempt's worker says "Restarted from checkpoint step N" (unless it was itself killed
  between its claim and its first write);
- the API answers again after its restart and the jobs' events survive it.

Output: one JSON line on stdout (progress on stderr): config, per scenario the makespan, kills,
restarts, re-queued attempts and steps trained again, the checks, and `overhead`: the chaos
makespan over the baseline's (and the difference in seconds).

    .venv/bin/python -m bench.chaos                       # 20 jobs, 3 teams, 2 workers
    .venv/bin/python -m bench.chaos --jobs 6 --steps 200  # a quicker look
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.api_load import PG_URL, throwaway_database
from bench.chaos_stack import ChaosStack, ChildMonitor, build_model, chat_jsonl
from bench.dispatch_latency import stop_proc

TERMINAL = ("succeeded", "failed", "cancelled")
EXAMPLES = 512  # per training file: 64 steps an epoch at batch 8, so --steps needs few epochs
LEASE_LOST = re.compile(r"stopped renewing the lease of attempt (\d+): restarted from")
RESTARTED = re.compile(r"^Restarted from ")
STARTED = re.compile(r"^Job started on worker .* \(attempt (\d+)\)$")


def log(message: str) -> None:
    print(f"[chaos] {message}", file=sys.stderr, flush=True)


@dataclass
class Disruptions:
    kills: list[dict[str, Any]] = field(default_factory=list)
    redis_restart_s: float | None = None
    api_restart_s: float | None = None


def submit_all(stack: ChaosStack, args: argparse.Namespace) -> list[str]:
    ids = []
    for i in range(args.jobs):
        client = stack.clients[i % len(stack.clients)]
        epochs = -(-args.steps * 8 // EXAMPLES)
        hp = {"n_epochs": epochs, "max_steps": args.steps, "batch_size": 8, "learning_rate": 1e-3,
              "max_seq_length": 128, "checkpoint_every": args.checkpoint_every}  # fmt: skip
        method = {"type": "dft", "dft": {"hyperparameters": hp}}
        body = {"model": "tiny", "training_file": stack.files[client], "seed": i, "method": method,
                "suffix": f"chaos-{i}"}  # fmt: skip
        response = client.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": f"chaos-{i}"})
        response.raise_for_status()
        ids.append(str(response.json()["id"]))
    return ids


def poll_until_done(stack: ChaosStack, ids: list[str], timeout: float) -> dict[str, str]:
    """Statuses through the API (retrying while it restarts) until every job has ended."""
    deadline = time.monotonic() + timeout
    owner = {job_id: stack.clients[i % len(stack.clients)] for i, job_id in enumerate(ids)}
    status: dict[str, str] = {}
    while time.monotonic() < deadline:
        for job_id in ids:
            if status.get(job_id) in TERMINAL:
                continue
            with contextlib.suppress(httpx.HTTPError):
                response = owner[job_id].get(f"/v1/fine_tuning/jobs/{job_id}", timeout=5)
                if response.status_code == 200:
                    status[job_id] = response.json()["status"]
        if all(status.get(j) in TERMINAL for j in ids):
            return status
        time.sleep(0.5)
    raise RuntimeError(f"not done after {timeout:g} s: {status}")


def chaos_loop(
    stack: ChaosStack, rng: random.Random, args: argparse.Namespace, plan_s: float, stop: threading.Event
) -> Disruptions:
    """Kill a random worker every kill-min..kill-max seconds; restart Redis and the API once each."""
    done = Disruptions()
    t0 = time.monotonic()
    redis_at, api_at = plan_s / 3, 2 * plan_s / 3
    next_kill = t0 + rng.uniform(args.kill_min, args.kill_max)
    while not stop.wait(0.2):
        now = time.monotonic()
        if done.redis_restart_s is None and now - t0 >= redis_at:
            log("restarting Redis (its queued messages are lost)")
            stack.restart_redis()
            done.redis_restart_s = round(now - t0, 1)
        if done.api_restart_s is None and now - t0 >= api_at:
            log("restarting the API")
            stack.restart_api()
            done.api_restart_s = round(now - t0, 1)
        if now >= next_kill:
            index = rng.randrange(len(stack.workers))
            whole_group = len(done.kills) % 2 == 1
            running = stack.job_of_worker(index)
            log(f"SIGKILL worker {index} ({'process group' if whole_group else 'Celery process only'}), "
                f"running {running or 'nothing'}")  # fmt: skip
            stack.kill_worker(index, whole_group)
            stack.start_worker(index)
            done.kills.append({"at_s": round(now - t0, 1), "worker": index, "process_group": whole_group,
                               "job": running})  # fmt: skip
            next_kill = now + rng.uniform(args.kill_min, args.kill_max)
    return done


def check_database(stack: ChaosStack, ids: list[str], steps: int) -> dict[str, Any]:
    """Per job: one metrics row per step, attempts in order, and every restart explained by events."""
    from sqlalchemy import text

    problems: list[str] = []
    requeued = 0
    resumed_from: list[int] = []  # the checkpoint step each restart resumed from (0: the start)
    with stack.engine.connect() as conn:
        for job_id in ids:
            attempt, total = conn.execute(
                text("SELECT attempt, total_steps FROM jobs WHERE id = :j"), {"j": job_id}
            ).one()
            rows = conn.execute(
                text("SELECT step FROM job_metrics WHERE job_id = :j ORDER BY step"), {"j": job_id}
            ).scalars()
            if total != steps or list(rows) != list(range(1, steps + 1)):
                problems.append(f"{job_id}: {total} steps, metrics rows are not exactly steps 1..{steps}")
            messages = conn.execute(
                text("SELECT message FROM job_events WHERE job_id = :j ORDER BY pk"), {"j": job_id}
            ).scalars()
            # Attempt starts and lost leases in event order: attempt n+1 may start only after the
            # reconciler's event explaining why attempt n was re-queued, and each lost one has one.
            seq: list[tuple[str, int]] = []
            restarted = []
            for message in messages:
                if started := STARTED.match(message):
                    seq.append(("start", int(started.group(1))))
                elif lost := LEASE_LOST.search(message):
                    seq.append(("lost", int(lost.group(1))))
                elif RESTARTED.match(message):
                    restarted.append(message)
            expected = [x for n in range(1, attempt + 1) for x in (("start", n), ("lost", n))][:-1]
            if seq != expected:
                problems.append(f"{job_id}: attempt {attempt}, but starts and lost leases were {seq}")
            # A successor says where it resumed from, unless it too was killed before its first write.
            if len(restarted) > attempt - 1:
                problems.append(f"{job_id}: attempt {attempt} but restarted {len(restarted)} times")
            requeued += attempt - 1
            for message in restarted:
                found = re.search(r"checkpoint step (\d+)", message)
                resumed_from.append(int(found.group(1)) if found else 0)
    return {"problems": problems, "requeued_attempts": requeued, "resumed_from_steps": resumed_from}


def run_scenario(
    name: str, args: argparse.Namespace, model_dir: Path, tmp: Path, plan_s: float
) -> dict[str, Any]:
    rng = random.Random(args.seed)
    chaos = name == "chaos"
    with throwaway_database() as db_name, ChaosStack(tmp / name, PG_URL.format(name=db_name), args) as stack:
        stack.setup(model_dir, chat_jsonl(EXAMPLES, args.seed), args.teams)
        for index in range(args.workers):
            stack.start_worker(index)
        stack.wait_workers_ready()
        monitor = ChildMonitor(stack.storage_dir)
        monitor.start()
        stop = threading.Event()
        disruptions = Disruptions()
        chaos_thread: threading.Thread | None = None
        t0 = time.monotonic()
        ids = submit_all(stack, args)
        log(f"{name}: {len(ids)} jobs submitted")
        if chaos:

            def run() -> None:
                nonlocal disruptions
                disruptions = chaos_loop(stack, rng, args, plan_s, stop)

            chaos_thread = threading.Thread(target=run, daemon=True)
            chaos_thread.start()
        try:
            statuses = poll_until_done(stack, ids, args.timeout)
        finally:
            stop.set()
            if chaos_thread is not None:
                chaos_thread.join(60)
            monitor.stop()
        makespan = time.monotonic() - t0
        log(f"{name}: all jobs ended in {makespan:.1f} s: {sorted(set(statuses.values()))}")
        db = check_database(stack, ids, args.steps)
        events_after_api_restart = all(stack.events_readable(job_id) for job_id in ids)
        for index in range(len(stack.workers)):
            stop_proc(stack.workers[index])
    checks = {
        "all_succeeded": all(s == "succeeded" for s in statuses.values()),
        "never_two_attempts_at_once": monitor.max_alive_per_job <= 1,
        "one_metrics_row_per_step_and_attempts_in_order": not db["problems"],
        "api_answers_after_restart": events_after_api_restart,
    }
    return {
        "makespan_s": round(makespan, 1),
        "statuses": {s: list(statuses.values()).count(s) for s in set(statuses.values())},
        "kills": disruptions.kills,
        "kills_that_hit_a_job": sum(1 for k in disruptions.kills if k["job"]),
        "redis_restart_at_s": disruptions.redis_restart_s,
        "api_restart_at_s": disruptions.api_restart_s,
        "requeued_attempts": db["requeued_attempts"],
        "resumed_from_checkpoint_steps": db["resumed_from_steps"],
        "max_training_processes_per_job": monitor.max_alive_per_job,
        "problems": db["problems"][:20],
        "checks": checks,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    p.add_argument("--jobs", type=int, default=20)
    p.add_argument("--teams", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps per job")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--kill-min", type=float, default=10.0)
    p.add_argument("--kill-max", type=float, default=20.0)
    p.add_argument("--max-attempts", type=int, default=10)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds a scenario may take")
    p.add_argument("--seed", type=int, default=7)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="tunepool-chaos-"))
    model_dir = build_model(tmp / "model")
    result: dict[str, Any] = {"benchmark": "chaos", "config": vars(args)}
    baseline = run_scenario("baseline", args, model_dir, tmp, 0.0)
    result["baseline"] = baseline
    chaos = run_scenario("chaos", args, model_dir, tmp, baseline["makespan_s"])
    result["chaos"] = chaos
    result["overhead"] = {
        "ratio": round(chaos["makespan_s"] / baseline["makespan_s"], 3),
        "extra_s": round(chaos["makespan_s"] - baseline["makespan_s"], 1),
    }
    result["ok"] = all(baseline["checks"].values()) and all(chaos["checks"].values())
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
