"""The processes bench/chaos.py starts, kills and restarts: a private redis-server, the API, workers;
and the monitor that watches training processes from outside."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import psutil

from bench.api_load import free_port
from bench.dispatch_latency import Proc, build_tiny_model, chat_jsonl, start_proc, stop_proc, tail
from tests.e2e.conftest import FAST  # the e2e tests' clock: a lost worker is noticed within seconds

REPO = Path(__file__).resolve().parents[1]
__all__ = ["ChaosStack", "ChildMonitor", "build_model", "chat_jsonl"]


def build_model(path: Path) -> Path:
    """2 layers, hidden 64: a few milliseconds a step on one thread, so kills land mid-training."""
    return build_tiny_model(path, hidden_size=64, layers=2)


class ChildMonitor(threading.Thread):
    """Lists the training processes (`python -m worker.child STORAGE/jobs/<job>/`) every 50 ms and
    keeps the most ever alive at once for a single job."""

    def __init__(self, storage_dir: Path) -> None:
        super().__init__(daemon=True)
        self.jobs_dir = str(storage_dir / "jobs") + os.sep
        self.max_alive_per_job = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(0.05):
            alive: dict[str, int] = {}
            for proc in psutil.process_iter(["cmdline", "status"]):
                cmd = proc.info["cmdline"] or []
                if proc.info["status"] == psutil.STATUS_ZOMBIE or "worker.child" not in cmd:
                    continue
                run_dir = cmd[-1]
                if run_dir.startswith(self.jobs_dir):
                    job = run_dir[len(self.jobs_dir) :].split(os.sep)[0]
                    alive[job] = alive.get(job, 0) + 1
            self.samples += 1
            self.max_alive_per_job = max([self.max_alive_per_job, *alive.values()])

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)


class ChaosStack:
    """One scenario's stack. Workers are indexed; a restarted worker keeps its index."""

    def __init__(self, home: Path, database_url: str, args: argparse.Namespace) -> None:
        self.home = home
        self.storage_dir = home / "artifacts"
        self.redis_port, self.api_port = free_port(), free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEPOOL_")}
        self.env |= {
            "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1",  # two trainers on two cores: no OpenMP threads fighting
            "TUNEPOOL_HOME": str(home),
            "TUNEPOOL_DATABASE_URL": database_url,
            "TUNEPOOL_BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "TUNEPOOL_STORAGE_DIR": str(self.storage_dir),
            "TUNEPOOL_MAX_ATTEMPTS": str(args.max_attempts),
            "TUNEPOOL_DEFAULT_MAX_RUNNING_JOBS": str(args.workers),
            **FAST,
        }
        self.redis: subprocess.Popen[bytes] | None = None
        self.api: Proc | None = None
        self.workers: dict[int, Proc] = {}
        self.clients: list[httpx.Client] = []
        self.files: dict[httpx.Client, str] = {}
        self.engine: Any = None
        self._db: Any = None
        self._worker_starts = 0

    def __enter__(self) -> ChaosStack:
        self.home.mkdir(parents=True)
        self.start_redis()
        subprocess.run([sys.executable, "-m", "service.cli", "migrate"], cwd=REPO, env=self.env,
                       check=True, capture_output=True)  # fmt: skip
        from service.db import Database
        from service.settings import load_settings

        prefixed = {
            k.removeprefix("TUNEPOOL_").lower(): v for k, v in self.env.items() if k.startswith("TUNEPOOL_")
        }
        self.settings = load_settings(**prefixed)
        self._db = Database(self.settings)
        self.engine = self._db.engine.execution_options(isolation_level="AUTOCOMMIT")
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        for client in self.clients:
            client.close()
        for proc in [*self.workers.values(), *([self.api] if self.api else [])]:
            stop_proc(proc)
        self.stop_redis()
        if self._db is not None:
            self._db.dispose()

    # -------------------------------------------------------------- set-up
    def setup(self, model_dir: Path, training_data: bytes, teams: int) -> None:
        from service.teams import add_model, create_team

        keys = []
        with self._db.session() as session:
            for i in range(teams):
                keys.append(create_team(session, self.settings, f"team-{i}")[1])
            roots = self.settings.model_copy(update={"model_roots": str(model_dir)})  # a root of its own
            add_model(session, roots, "tiny", str(model_dir))
        self.start_api()
        for key in keys:
            client = httpx.Client(base_url=f"http://127.0.0.1:{self.api_port}", timeout=30,
                                  headers={"Authorization": f"Bearer {key}"})  # fmt: skip
            files = {"file": ("train.jsonl", training_data, "application/jsonl")}
            response = client.post("/v1/files", files=files, data={"purpose": "fine-tune"})
            response.raise_for_status()
            self.clients.append(client)
            self.files[client] = str(response.json()["id"])

    # -------------------------------------------------------------- Redis
    def start_redis(self) -> None:
        argv = ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.home)]  # fmt: skip
        log = (self.home / "redis.log").open("ab")
        self.redis = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.redis_port), 0.5):
                return
            time.sleep(0.1)
        raise RuntimeError(f"redis-server did not start:\n{tail(self.home / 'redis.log')}")

    def stop_redis(self) -> None:
        if self.redis is not None and self.redis.poll() is None:
            self.redis.terminate()
            self.redis.wait(20)

    def restart_redis(self) -> None:
        self.stop_redis()
        time.sleep(1.0)  # a second with no broker at all
        self.start_redis()

    # -------------------------------------------------------------- API
    def start_api(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "service.cli",
            "api",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.api_port),
        ]
        self.api = start_proc(f"api-{int(time.time())}", argv, self.env, self.home)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{self.api_port}/healthz", timeout=1).status_code == 200:
                    return
            if self.api.popen.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"the API did not start:\n{tail(self.api.log_path)}")

    def restart_api(self) -> None:
        assert self.api is not None
        stop_proc(self.api)
        self.start_api()

    def events_readable(self, job_id: str) -> bool:
        for client in self.clients:
            response = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100})
            if response.status_code == 200:
                return bool(response.json()["data"])
        return False

    # -------------------------------------------------------------- workers
    def start_worker(self, index: int) -> None:
        self._worker_starts += 1
        argv = [sys.executable, "-m", "service.cli", "worker", "--pool", "default"]
        self.workers[index] = start_proc(f"worker-{index}-{self._worker_starts}", argv, self.env, self.home)

    def wait_workers_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        for proc in self.workers.values():
            while " ready." not in tail(proc.log_path, 100_000):
                if proc.popen.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{proc.name} did not get ready:\n{tail(proc.log_path)}")
                time.sleep(0.2)

    def kill_worker(self, index: int, whole_group: bool) -> None:
        """SIGKILL the Celery process (its training child dies by PR_SET_PDEATHSIG) or its whole
        process group (the training child has its own group, so it dies the same way)."""
        proc = self.workers[index].popen
        with contextlib.suppress(ProcessLookupError):
            if whole_group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)

    def job_of_worker(self, index: int) -> str | None:
        from sqlalchemy import text

        pid = self.workers[index].popen.pid
        with self.engine.connect() as conn:
            query = text("SELECT id FROM jobs WHERE status = 'running' AND worker_id LIKE :w")
            found = conn.execute(query, {"w": f"%:{pid}"}).scalar()
        return str(found) if found else None
