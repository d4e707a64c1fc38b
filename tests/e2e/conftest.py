"""The whole system as separate OS processes: the API (`tunepool api`), workers (`tunepool worker`),
real PostgreSQL + Redis or the embedded SQLite database + SQLite broker, and tiny real models.

Leases, heartbeats and the reconciler run on a test clock a few times faster than production's
(TUNEPOOL_LEASE_S etc. below), so crashes are detected in seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.service.conftest import ROOT, Stack, TeamClient, running_stack, upload
from tests.worker.training.conftest import build_model_dir, chat_rows

FAST = {
    "TUNEPOOL_LEASE_S": "6",
    "TUNEPOOL_HEARTBEAT_S": "1",
    "TUNEPOOL_POLL_S": "0.2",
    "TUNEPOOL_RECONCILE_EVERY_S": "1",
    "TUNEPOOL_REDISPATCH_AFTER_S": "3",
    "TUNEPOOL_CANCEL_GRACE_S": "20",
    "TUNEPOOL_WEBHOOK_BACKOFF_BASE_S": "0.2",
    "TUNEPOOL_WEBHOOK_BACKOFF_MAX_S": "1",
    "TUNEPOOL_WEBHOOK_MAX_ATTEMPTS": "4",
    "TUNEPOOL_WEBHOOK_TIMEOUT_S": "3",
    # The tests' receivers listen on loopback, which webhooks may not reach by default.
    "TUNEPOOL_WEBHOOK_ALLOW_CIDRS": "127.0.0.0/8",
    # Workers claim nothing on a disk with less free (1 GiB by default): a small CI disk still runs.
    "TUNEPOOL_MIN_FREE_BYTES": str(64 * 1024**2),
}
TERMINAL = {"succeeded", "failed", "cancelled"}
E2E_REDIS_DB = 13


@dataclass
class System:
    stack: Stack
    home: Path
    model: str  # registered base model name
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_worker(
        self, pool: str = "default", env: dict[str, str] | None = None, slots: int = 1
    ) -> subprocess.Popen[bytes]:
        """A CPU node's worker owning `slots` slots (a job on K GPUs takes K of them)."""
        n = len(self.workers)
        log = (self.home / f"worker-{n}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker", "--pool", pool, "--slots", str(slots)],
            cwd=ROOT,
            env={**self.stack.env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: SIGKILL of the group takes the trainer too
        )
        self.workers.append(proc)
        return proc

    def kill_worker(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        """Signal the worker's whole process tree (the Celery process and its training child)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait(60)

    def worker_logs(self) -> str:
        return "\n".join(
            p.read_text(errors="replace")[-4000:] for p in sorted(self.home.glob("worker-*.log"))
        )

    def team(self, **kwargs: Any) -> TeamClient:
        return self.stack.team(**kwargs)

    def new_file(self, client: TeamClient, n: int = 16, content: bytes | None = None) -> str:
        body = (
            content if content is not None else "".join(json.dumps(r) + "\n" for r in chat_rows(n)).encode()
        )
        response = upload(client, body)
        assert response.status_code == 200, response.text
        return str(response.json()["id"])

    def submit(self, client: TeamClient, file_id: str | None = None, **body: Any) -> dict[str, Any]:
        hp = {"n_epochs": 1, "batch_size": 4, "learning_rate": 1e-3, "max_seq_length": 128}
        hp |= body.pop("hyperparameters", {})
        request = {
            "model": self.model,
            "training_file": file_id or self.new_file(client),
            "method": {"type": "dft", "dft": {"hyperparameters": hp}},
            **body,
        }
        response = client.post("/v1/fine_tuning/jobs", json=request)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def wait(
        self, client: TeamClient, job_id: str, statuses: set[str] = TERMINAL, timeout: float = 240
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
            if job["status"] in statuses:
                return job
            if self.workers and all(p.poll() is not None for p in self.workers):
                raise AssertionError(
                    f"every worker exited; job {job_id} is {job['status']}\n{self.worker_logs()}"
                )
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} still {job.get('status')} after {timeout}s\n{self.worker_logs()}")

    def events(self, client: TeamClient, job_id: str) -> list[str]:
        data = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
        return [e["message"] for e in reversed(data)]


def flush_redis(db: int) -> None:
    import redis

    redis.Redis(host="127.0.0.1", port=6379, db=db).flushdb()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("e2e-model"))


@pytest.fixture(params=["sqlite", "postgresql"])
def system(request: pytest.FixtureRequest, tmp_path: Path, tiny_base: Path) -> Iterator[System]:
    """A fresh stack (API process, empty database) per test; workers are started by the test."""
    backend: str = request.param
    if backend == "postgresql":
        flush_redis(E2E_REDIS_DB)
    # Models may be registered from the shared tiny model and from the test's own directory.
    env = {**FAST, "TUNEPOOL_MODEL_ROOTS": f"{tiny_base},{tmp_path}"}
    with running_stack(backend, tmp_path, env, redis_db=E2E_REDIS_DB) as stack:
        stack.add_model("tiny", str(tiny_base))
        system = System(stack, tmp_path, "tiny")
        try:
            yield system
        finally:
            for proc in system.workers:
                if proc.poll() is None:
                    system.kill_worker(proc, signal.SIGTERM)
