"""One worker process per node: `tunepool worker --pool NAME [--gpus 0,1,2,3 | --slots N]`.

The worker owns its node's slots: GPUs (`--gpus`, `--gpu N` being `--gpus N`) or, on a CPU node,
`--slots N` (default 1). It claims every job that fits its free slots and runs each in a thread of
its own (`JobRun`: a training child, torchrun for a job on K > 1 slots) on its own subset of the
GPUs (CUDA_VISIBLE_DEVICES), so a node runs several jobs side by side and a K-GPU job gets all K
slots on this one node at once or none.

Celery carries dispatch only (worker/celery_app.py): its one task claims what fits and returns,
except when every slot is taken: then it waits for a slot to free and claims again, so that a full
worker does not take the dispatch messages an idle worker of the pool should get. A job that ends
while no task runs claims the next job itself. Beside Celery, a maintenance thread keeps this
worker's row in the `workers` registry fresh (slots, free slots) and runs the reconciler, and a
delivery thread sends webhooks (apart, so that no receiver can delay a heartbeat). On shutdown
(SIGTERM, Ctrl-C) running jobs are stopped and handed back to the queue at once; each resumes from
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
from worker.celery_app import make_celery
from worker.claim import Claim, claim_next_job
from worker.reconciler import reconcile
from worker.runner import JobRun

log = logging.getLogger("tunepool.worker")


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
    def __init__(
        self, settings: Settings, pool: str, devices: list[int] | None = None, slots: int = 1
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.devices = devices  # GPU indices of the node; None: a CPU node of `slots` slots
        self.slots = len(devices) if devices is not None else slots
        self.db = Database(settings)
        where = "cpu" if devices is None else "gpu" + "-".join(str(d) for d in devices)
        self.id = f"{socket.gethostname()}:{pool}:{where}:{os.getpid()}"
        self.free: list[int] = list(devices) if devices is not None else list(range(slots))
        self.running: dict[str, threading.Thread] = {}  # job id -> the thread running it
        self.changed = threading.Condition()  # guards free and running; notified when a job ends
        self.stopping = threading.Event()
        self._last_reconcile = 0.0

    @property
    def current_job(self) -> str | None:
        """One of the jobs running here (the registry's current_job_id), or None when idle."""
        with self.changed:
            return next(iter(self.running), None)

    def register(self) -> None:
        name, memory = gpu_info(None if self.devices is None else self.devices[0])
        now = time.time()
        with self.db.session() as session:
            session.merge(
                Worker(
                    id=self.id, pool=self.pool, hostname=socket.gethostname(), gpu_name=name,
                    gpu_memory_bytes=memory, slots=self.slots, free_slots=len(self.free),
                    current_job_id=self.current_job, started_at=now, last_heartbeat_at=now,
                )
            )  # fmt: skip
            declare_pool(session, self.pool, "worker")  # jobs may name a pool a worker serves
            session.commit()
        log.info("worker %s registered (pool %s, %s, %d slots)", self.id, self.pool, name, self.slots)

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
            with self.changed:  # one consistent view of the slots (the lock is re-entrant)
                worker.current_job_id = self.current_job
                worker.free_slots = len(self.free)
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
        """The dispatch task: claim and start the jobs of `pool` that fit the free slots; while every
        slot is taken, wait for one to free and claim again. Returns how many it started."""
        started = 0
        with self.db.session() as session:
            mark_dispatch_taken(session, pool)  # from now on a new job sends a new message
        passed_on = False
        while not self.stopping.is_set():
            started += self.fill(pool)
            with self.changed:
                if self.free or self.stopping.is_set():
                    break  # nothing more fits now: a job that ends claims again (fill)
            if not started and not passed_on:  # full when the message came: it is another's
                passed_on = self.pass_on(pool)
            with self.changed:
                if not self.free:
                    self.changed.wait(1.0)
        if self.stopping.is_set():
            self.join_jobs()
        return started

    def pass_on(self, pool: str) -> bool:
        """This worker is full: if another live worker of the pool has a free slot, send the pool a
        dispatch message again so that it gets one (this task keeps the message it took). Whether
        one was sent."""
        alive = time.time() - self.settings.lease_s
        with self.db.session() as session:
            other = session.scalar(
                select(Worker.id)
                .where(
                    Worker.pool == pool, Worker.id != self.id, Worker.free_slots > 0,
                    Worker.last_heartbeat_at > alive,
                )
                .limit(1)
            )  # fmt: skip
            if other is None:
                return False
            wake_another_worker(session, self.settings, pool)
        return True

    def fill(self, pool: str) -> int:
        """Claim jobs of `pool` into the free slots until none fits; start each; how many."""
        started = 0
        while not self.stopping.is_set():
            from worker.artifacts import storage_too_full

            if (full := storage_too_full(self.settings)) is not None:  # a job started now would fail
                log.warning("not claiming jobs of pool %s: %s", pool, full)  # the reconciler re-sends
                break
            with self.changed:  # one claim at a time in this process: slots are handed out here
                if not self.free:
                    break
                claim = claim_next_job(
                    self.db, pool, self.id, self.settings.lease_s,
                    free_slots=len(self.free), half_life_s=self.settings.fairshare_half_life_s,
                )  # fmt: skip
                if claim is None:
                    break
                slots, self.free = self.free[: claim.gpus], self.free[claim.gpus :]
                thread = threading.Thread(
                    target=self._run, args=(claim, slots), name=f"tunepool-{claim.job_id}", daemon=True
                )
                self.running[claim.job_id] = thread
            thread.start()
            started += 1
            with self.db.session() as session:
                wake_another_worker(session, self.settings, pool)  # for the jobs still queued there
        return started

    def _run(self, claim: Claim, slots: list[int]) -> None:
        devices = slots if self.devices is not None else None
        try:
            JobRun(self.db, self.settings, claim, self.id, abort=self.stopping.is_set, devices=devices).run()
        except Exception:
            log.exception("job %s: the run failed in the worker", claim.job_id)
        finally:
            with self.changed:
                self.running.pop(claim.job_id, None)
                self.free = sorted(self.free + slots)
                self.changed.notify_all()
        if self.stopping.is_set():
            with self.db.session() as session:  # another worker takes over what was handed back
                request_dispatch(session, self.settings, claim.pool)
            return
        try:
            self.fill(claim.pool)  # the freed slots take the next jobs, whether or not a task runs
        except Exception:  # the database may be restarting: the reconciler re-sends dispatch
            log.exception("claiming after job %s failed", claim.job_id)

    def join_jobs(self) -> None:
        """Wait for every running job to end (on shutdown: each hands its job back)."""
        while True:
            with self.changed:
                threads = list(self.running.values())
            if not threads:
                return
            for thread in threads:
                thread.join()

    def run_celery(self) -> None:
        from celery.signals import worker_shutting_down

        app = make_celery(self.settings, self.drain)
        worker_shutting_down.connect(lambda **_: self.stopping.set(), weak=False)
        name = f"{self.id.replace(':', '-')}@{socket.gethostname()}"
        app.worker_main(
            ["worker", "-Q", queue_name(self.pool), "-c", "1", "-P", "solo", "-n", name, "-l", "INFO",
             "--without-gossip", "--without-mingle", "--without-heartbeat"]
        )  # fmt: skip


def run_worker(settings: Settings, pool: str, devices: list[int] | None = None, slots: int = 1) -> None:
    worker = WorkerProcess(settings, pool, devices, slots)
    if devices is not None and settings.job_memory_limit_bytes:
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
        worker.join_jobs()  # each running job is handed back to the queue first
        for thread in threads:
            thread.join(5)
        worker.unregister()
