"""One worker process: `tunepool worker --pool NAME [--gpu INDEX]`.

A Celery worker with concurrency 1 (the solo pool: the task runs in this process, the training in
a child of it) bound to one GPU through CUDA_VISIBLE_DEVICES. Beside Celery, a maintenance thread
keeps this worker's row in the `workers` registry fresh and runs the reconciler, and a delivery
thread sends webhooks (apart, so that no receiver can delay a heartbeat). On shutdown
(SIGTERM, Ctrl-C) a running job is stopped and handed back to the queue at once; it resumes from
its last checkpoint wherever it is claimed next.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import threading
import time

from sqlalchemy import select

from service.db import Database
from service.dispatch import queue_name
from service.models import Worker
from service.pools import declare_pool, mark_dispatch_taken, request_dispatch, wake_another_worker
from service.settings import Settings
from service.webhook_sender import DeliveryLoop
from worker.claim import claim_next_job
from worker.reconciler import reconcile
from worker.runner import JobRun

log = logging.getLogger("tunepool.worker")
_current: WorkerProcess | None = None


def current_worker() -> WorkerProcess:
    if _current is None:
        raise RuntimeError("no tunepool worker in this process (start one with `tunepool worker`)")
    return _current


def gpu_info(index: int | None) -> tuple[str, int | None]:
    """(GPU name, memory in bytes) from nvidia-smi, without initialising CUDA here; ("cpu", None)."""
    if index is None or shutil.which("nvidia-smi") is None:
        return "cpu", None
    try:
        query = ["--query-gpu=name,memory.total", "--format=csv,noheader,nounits"]
        out = subprocess.run(
            ["nvidia-smi", "-i", str(index), *query], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        name, mib = (x.strip() for x in out.split(",", 1))
        return name, int(float(mib)) * 1024 * 1024
    except (subprocess.SubprocessError, ValueError, OSError):
        return "cpu", None


class WorkerProcess:
    def __init__(self, settings: Settings, pool: str, gpu: int | None) -> None:
        self.settings = settings
        self.pool = pool
        self.gpu = gpu
        self.db = Database(settings)
        self.id = f"{socket.gethostname()}:{pool}:{'cpu' if gpu is None else f'gpu{gpu}'}:{os.getpid()}"
        self.current_job: str | None = None
        self.stopping = threading.Event()
        self._last_reconcile = 0.0

    def register(self) -> None:
        name, memory = gpu_info(self.gpu)
        now = time.time()
        with self.db.session() as session:
            session.merge(
                Worker(
                    id=self.id, pool=self.pool, hostname=socket.gethostname(), gpu_name=name,
                    gpu_memory_bytes=memory, current_job_id=None, started_at=now, last_heartbeat_at=now,
                )
            )  # fmt: skip
            declare_pool(session, self.pool, "worker")  # jobs may name a pool a worker serves
            session.commit()
        log.info("worker %s registered (pool %s, %s)", self.id, self.pool, name)

    def unregister(self) -> None:
        with self.db.session() as session:
            worker = session.get(Worker, self.id)
            if worker is not None:
                session.delete(worker)
                session.commit()

    def beat(self) -> None:
        with self.db.session() as session:
            worker = session.scalars(select(Worker).where(Worker.id == self.id)).first()
            if worker is None:
                self.register()
                return
            worker.last_heartbeat_at = time.time()
            worker.current_job_id = self.current_job
            session.commit()

    def maintain(self) -> None:
        """Heartbeat the registry and run the reconciler until the process stops."""
        while not self.stopping.is_set():
            try:
                self.beat()
                if time.monotonic() - self._last_reconcile >= self.settings.reconcile_every_s:
                    self._last_reconcile = time.monotonic()
                    reconcile(self.db, self.settings)
            except Exception:  # the database may be restarting: try again next round
                log.exception("worker maintenance failed; retrying")
            self.stopping.wait(min(self.settings.heartbeat_s, self.settings.reconcile_every_s))

    def drain(self, pool: str) -> int:
        """Claim and run jobs of `pool` until none is left for us (or we are stopping)."""
        ran = 0
        with self.db.session() as session:
            mark_dispatch_taken(session, pool)  # from now on a new job sends a new message
        while not self.stopping.is_set():
            from worker.artifacts import storage_too_full

            if (full := storage_too_full(self.settings)) is not None:  # a job started now would fail
                log.warning("not claiming jobs of pool %s: %s", pool, full)  # the reconciler re-sends
                break
            claim = claim_next_job(
                self.db, pool, self.id, self.settings.lease_s, half_life_s=self.settings.fairshare_half_life_s
            )
            if claim is None:
                break
            self.current_job = claim.job_id
            with self.db.session() as session:
                wake_another_worker(session, self.settings, pool)  # for the jobs still queued there
            try:
                JobRun(self.db, self.settings, claim, self.id, abort=self.stopping.is_set, gpu=self.gpu).run()
            finally:
                self.current_job = None
            ran += 1
        if self.stopping.is_set():
            with self.db.session() as session:  # another worker takes over what was handed back
                request_dispatch(session, self.settings, pool)
        return ran

    def run_celery(self) -> None:
        from celery.signals import worker_shutting_down

        from worker.celery_app import make_celery

        app = make_celery(self.settings)
        worker_shutting_down.connect(lambda **_: self.stopping.set(), weak=False)
        name = f"{self.id.replace(':', '-')}@{socket.gethostname()}"
        app.worker_main(
            ["worker", "-Q", queue_name(self.pool), "-c", "1", "-P", "solo", "-n", name, "-l", "INFO",
             "--without-gossip", "--without-mingle", "--without-heartbeat"]
        )  # fmt: skip


def run_worker(settings: Settings, pool: str, gpu: int | None) -> None:
    global _current
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)  # inherited by the training child
    worker = _current = WorkerProcess(settings, pool, gpu)
    if gpu is not None and settings.job_memory_limit_bytes:
        log.warning(
            "TUNEPOOL_JOB_MEMORY_LIMIT_BYTES is set but ignored on this GPU worker: RLIMIT_AS caps "
            "address space, which CUDA reserves far beyond what it uses; it applies to CPU workers only"
        )
    worker.register()
    threads = [
        threading.Thread(target=worker.maintain, name="tunepool-maintenance", daemon=True),
        # Webhooks on a thread of their own: no receiver delays a heartbeat (service/webhook_sender.py).
        threading.Thread(
            target=DeliveryLoop(settings).run, args=(worker.stopping,), name="tunepool-webhooks", daemon=True
        ),
    ]
    for thread in threads:
        thread.start()
    try:
        worker.run_celery()
    finally:
        worker.stopping.set()
        for thread in threads:
            thread.join(5)
        worker.unregister()
