"""Noisy neighbour: does one team's hostile traffic slow the API down for another team?

`python -m bench.noisy_neighbour [--backend postgresql|sqlite] [--seconds 20]`

One run, two phases against the same `tunepool api` process and one `tunepool worker` (whose
maintenance and delivery threads send webhooks; it serves a pool no job is in, so it trains
nothing):
1. undisturbed: team B polls a job, lists its jobs and creates jobs in a closed loop (one request
   at a time, 10 ms apart), and cancels one of its jobs every 2 s; its webhook receiver (a plain
   local HTTP server) records when each delivery arrives.
2. noisy: the same, while team A holds `--uploads` slow uploads (one body byte a second), `--downloads`
   stalled downloads of an 8 MiB file (read 1 KiB, then never again), `--streams` event streams of
   its queued jobs, and a webhook receiver that drips one header line a second and never answers;
   team A cancels one of its jobs a second, so deliveries to that receiver keep coming
   (bench/_noisy_clients.py, in a process of its own: its client work shares no GIL with B's).
Team A's per-team caps are raised to its load by default (`--caps raised`), so the server carries
every connection instead of refusing most with 429 (`--caps default` measures that instead).

Reported per phase: team B's p50/p99 latency per request kind and its errors (non-2xx, timeouts),
its webhook delivery delays (job cancelled -> request received), and the worker's heartbeat
staleness (now - last_heartbeat_at, sampled every 0.25 s). Goals: every B p99 noisy <= 2x
undisturbed, no B error, heartbeat staleness under two heartbeats. One JSON line on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from bench._noisy_clients import NoisePlan, noise_process
from bench.api_load import PG_URL, free_port, start_server, stop_server, throwaway_database
from bench.dispatch_latency import start_proc, stop_proc, wait_for

REPO = Path(__file__).resolve().parents[1]
POOL = "bench-idle"  # the jobs' pool: no worker serves it, so they stay queued
HEARTBEAT_S = 1.0


def quantiles(samples: list[float]) -> dict[str, float]:
    """p50, p99 and max of `samples` (nearest rank)."""
    s = sorted(samples) or [float("nan")]
    rank = lambda q: s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]  # noqa: E731
    return {"p50": rank(0.50), "p99": rank(0.99), "max": s[-1]}


def log(message: str) -> None:
    print(f"[noisy_neighbour] {message}", file=sys.stderr, flush=True)


class Arrivals(ThreadingHTTPServer):
    """Team B's webhook receiver: job id -> when its delivery arrived."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                outer.arrived.setdefault(body["data"]["id"], time.time())
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


@contextlib.contextmanager
def database(backend: str, home: Path) -> Iterator[dict[str, str]]:
    if backend == "sqlite":
        yield {
            "TUNEPOOL_DATABASE_URL": f"sqlite:///{home / 'tunepool.db'}",
            "TUNEPOOL_BROKER_URL": f"sqla+sqlite:///{home / 'broker.db'}",
        }
        return
    import redis

    redis.Redis(db=13).flushdb()
    with throwaway_database() as name:
        yield {
            "TUNEPOOL_DATABASE_URL": PG_URL.format(name=name),
            "TUNEPOOL_BROKER_URL": "redis://127.0.0.1:6379/13",
        }
    redis.Redis(db=13).flushdb()


def chat_lines(total_bytes: int) -> bytes:
    line = json.dumps(
        {"messages": [{"role": "user", "content": "x" * 400}, {"role": "assistant", "content": "y"}]}
    )
    return ((line + "\n") * (total_bytes // (len(line) + 1) + 1)).encode()


def upload(http: httpx.Client, content: bytes) -> str:
    answer = http.post("/v1/files", files={"file": ("data.jsonl", content)}, data={"purpose": "fine-tune"})
    answer.raise_for_status()
    return str(answer.json()["id"])


def create(http: httpx.Client, file_id: str) -> httpx.Response:
    return http.post(
        "/v1/fine_tuning/jobs", json={"model": "bench-model", "training_file": file_id, "pool": POOL}
    )


def team_b_phase(http: httpx.Client, file_id: str, seconds: float, receiver: Arrivals) -> dict[str, Any]:
    """Team B's loop for `seconds`: latencies per kind, errors, webhook delays."""
    job_id = create(http, file_id).json()["id"]
    latency: dict[str, list[float]] = {"poll": [], "list": [], "create": []}
    errors: list[str] = []
    cancelled: dict[str, float] = {}
    made: list[str] = []
    end = time.monotonic() + seconds
    next_cancel = time.monotonic() + 2.0
    while time.monotonic() < end:
        for kind in ("poll", "list", "create"):
            start = time.perf_counter()
            try:
                if kind == "poll":
                    answer = http.get(f"/v1/fine_tuning/jobs/{job_id}")
                elif kind == "list":
                    answer = http.get("/v1/fine_tuning/jobs?limit=20")
                else:
                    answer = create(http, file_id)
                    if answer.status_code == 200:
                        made.append(answer.json()["id"])
                latency[kind].append(time.perf_counter() - start)
                if answer.status_code != 200:
                    errors.append(f"{kind}: HTTP {answer.status_code} {answer.text[:200]}")
            except httpx.HTTPError as err:
                latency[kind].append(time.perf_counter() - start)
                errors.append(f"{kind}: {type(err).__name__}: {err}")
            time.sleep(0.01)
        if time.monotonic() >= next_cancel and made:
            victim = made.pop(0)
            cancelled[victim] = time.time()
            http.post(f"/v1/fine_tuning/jobs/{victim}/cancel")
            next_cancel += 2.0
    time.sleep(2 * HEARTBEAT_S + 1)  # let the last deliveries arrive
    delays = [receiver.arrived[j] - t for j, t in cancelled.items() if j in receiver.arrived]
    return {
        "requests": {k: {"n": len(v), **{q: round(x * 1000, 2) for q, x in quantiles(v).items()}}
                     for k, v in latency.items()},
        "errors": len(errors),
        "error_examples": errors[:5],
        "webhook_delay_s": {"n": len(delays), "missing": len(cancelled) - len(delays),
                            **({q: round(x, 3) for q, x in quantiles(delays).items()} if delays else {})},
    }  # fmt: skip


class HeartbeatWatch(threading.Thread):
    """Samples the worker's heartbeat staleness every 0.25 s."""

    def __init__(self, http_db: Any) -> None:
        super().__init__(daemon=True)
        self.db, self.worst, self.running = http_db, 0.0, True

    def sample(self) -> float | None:
        """now - the worker's last heartbeat, or None before it registered."""
        from sqlalchemy import func, select

        from service.models import Worker

        with self.db.session() as session:
            last = session.scalar(select(func.max(Worker.last_heartbeat_at)))
        return None if last is None else time.time() - float(last)

    def run(self) -> None:
        while self.running:
            staleness = self.sample()
            if staleness is not None:
                self.worst = max(self.worst, staleness)
            time.sleep(0.25)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--uploads", type=int, default=50)
    parser.add_argument("--downloads", type=int, default=50)
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--caps", choices=["raised", "default"], default="raised")
    parser.add_argument("--logs", type=Path, help="copy the API's and the worker's logs here")
    args = parser.parse_args(argv)

    from service.db import Database
    from service.settings import load_settings
    from service.teams import add_model, create_team, set_quota

    with (
        tempfile.TemporaryDirectory(prefix="noisy-") as tmp_dir,
        database(args.backend, Path(tmp_dir)) as urls,
    ):
        home = Path(tmp_dir)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEPOOL_")}
        env |= urls | {
            "PYTHONPATH": str(REPO), "TUNEPOOL_HOME": str(home),
            "TUNEPOOL_STORAGE_DIR": str(home / "artifacts"),
            "TUNEPOOL_HEARTBEAT_S": str(HEARTBEAT_S), "TUNEPOOL_WEBHOOK_ALLOW_CIDRS": "127.0.0.0/8",
            "TUNEPOOL_WEBHOOK_TIMEOUT_S": "5", "TUNEPOOL_MIN_FREE_BYTES": "0",
        }  # fmt: skip
        if args.caps == "raised":
            env |= {"TUNEPOOL_TEAM_MAX_UPLOADS": str(args.uploads + 4),
                    "TUNEPOOL_TEAM_MAX_DOWNLOADS": str(args.downloads + 4),
                    "TUNEPOOL_TEAM_MAX_EVENT_STREAMS": str(args.streams + 4)}  # fmt: skip
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
        model = settings.home / "models" / "bench-model"
        model.mkdir(parents=True)
        (model / "config.json").write_text("{}")
        with db.session() as session:
            keys = {name: create_team(session, settings, name)[1] for name in ("team-a", "team-b")}
            add_model(session, settings, "bench-model", str(model), POOL)
            for name in keys:
                set_quota(session, name, max_queued_jobs=100_000)
        port = free_port()
        api = start_server(
            "api",
            [sys.executable, "-m", "service.cli", "api", "--port", str(port)],
            env,
            port,
            "/readyz",
            home,
        )
        worker = start_proc(
            "worker", [sys.executable, "-m", "service.cli", "worker", "--pool", "default"], env, home
        )
        watch = HeartbeatWatch(db)
        wait_for(worker, lambda: watch.sample() is not None, "worker heartbeat")
        plan = NoisePlan(port, keys["team-a"], "", [], args.uploads, args.downloads, args.streams)
        noise_conn, child_conn = multiprocessing.Pipe()
        noise = multiprocessing.get_context("spawn").Process(target=noise_process, args=(plan, child_conn))
        noise.start()
        try:
            url = f"http://127.0.0.1:{port}"
            a = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {keys['team-a']}"}, timeout=30)
            b = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {keys['team-b']}"}, timeout=10)
            receiver = Arrivals()
            drip_port = noise_conn.recv()
            b.post(
                "/v1/webhooks", json={"url": f"http://127.0.0.1:{receiver.server_address[1]}/hook"}
            ).raise_for_status()
            a.post("/v1/webhooks", json={"url": f"http://127.0.0.1:{drip_port}/hook"}).raise_for_status()
            a_small, b_small = upload(a, chat_lines(4096)), upload(b, chat_lines(4096))
            download_file = upload(a, chat_lines(8 * 1024 * 1024))
            stream_jobs = [create(a, a_small).json()["id"] for _ in range(10)]
            a_victims = [create(a, a_small).json()["id"] for _ in range(int(args.seconds) + 10)]
            watch.start()
            log(f"undisturbed phase ({args.seconds:g} s)")
            quiet = team_b_phase(b, b_small, args.seconds, receiver)
            quiet["heartbeat_staleness_max_s"] = round(watch.worst, 3)
            log(
                f"noisy phase: {args.uploads} slow uploads, {args.downloads} stalled downloads, "
                f"{args.streams} streams, a dripping receiver"
            )
            watch.worst = 0.0
            noise_conn.send(("start", download_file, stream_jobs))
            stop_cancels = threading.Event()

            def cancel_a() -> None:
                for job_id in a_victims:
                    if stop_cancels.wait(1.0):
                        return
                    a.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")

            threading.Thread(target=cancel_a, daemon=True).start()
            time.sleep(3.0)  # every noisy connection opened
            noisy = team_b_phase(b, b_small, args.seconds, receiver)
            noisy["heartbeat_staleness_max_s"] = round(watch.worst, 3)
            stop_cancels.set()
            noise_conn.send("stop")
            noisy["noise"] = noise_conn.recv()
        finally:
            watch.running = False
            noise.join(20)
            if noise.is_alive():
                noise.kill()
            stop_proc(worker)
            stop_server(api)
            if args.logs:
                args.logs.mkdir(parents=True, exist_ok=True)
                for log_file in home.glob("*.log"):
                    shutil.copy(log_file, args.logs / log_file.name)
            db.dispose()
    ratios = {
        k: round(noisy["requests"][k]["p99"] / max(quiet["requests"][k]["p99"], 1e-9), 2)
        for k in quiet["requests"]
    }
    goals = {
        "p99_within_2x": {"met": all(r <= 2.0 for r in ratios.values()), "ratios": ratios},
        "no_team_b_errors": {"met": quiet["errors"] == 0 and noisy["errors"] == 0},
        "heartbeat_under_two_beats": {"met": noisy["heartbeat_staleness_max_s"] < 2 * HEARTBEAT_S + 0.5},
        "webhook_delay_within_one_beat_of_undisturbed": {
            "met": noisy["webhook_delay_s"].get("max", 1e9)
            <= quiet["webhook_delay_s"].get("max", 0) + HEARTBEAT_S + 0.5
        },
    }  # fmt: skip
    result = {"bench": "noisy_neighbour", "backend": args.backend, "config": vars(args),
              "undisturbed": quiet, "noisy": noisy, "goals": goals}  # fmt: skip
    print(json.dumps(result, default=str))
    return result


if __name__ == "__main__":
    main()
