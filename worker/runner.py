"""Running one claimed job: the training child, its lease, and moving its outputs into the database.

    JobRun(db, settings, claim, worker_id).run()
      prepare   config.json from the job row (same file every attempt, so a retry resumes)
      spawn     `python -m worker.child RUN_DIR` in its own process group
      loop      every poll_s: tail metrics/events, register new checkpoints; every heartbeat_s:
                extend the lease (fenced), publish progress, read cancel_requested
      finish    succeeded (final checkpoint, fine_tuned_model, results CSV) | cancelled | failed, or
                queued again when the disk filled (worker/job_end.py: one step, whatever fails in it)

The run directory is `STORAGE_DIR/jobs/<job id>/` on the artifact storage that API and workers
share: another worker that takes the job over after a crash finds the checkpoints there and the
trainer resumes from the last one. All database writes go through `Fence` (worker/claim.py):
once the job has moved on, they raise `LeaseLost` and the child's process group is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import OperationalError

from service.db import Database
from service.jobs import add_event, set_status
from service.models import Checkpoint, File, Job, JobMetric, JobStatus, Team
from service.settings import Settings
from service.storage import Storage
from worker.artifacts import checkpoint_metrics, fine_tuned_model_name, run_dir, training_config
from worker.child import (
    CONFIG_FILE,
    ERROR_FILE,
    EXIT_FAILED,
    EXIT_STORAGE,
    STOP_CHECKPOINT,
    STOP_FILE,
    read_error,
)
from worker.claim import Claim, Fence, LeaseLost
from worker.job_end import exit_outcome, record_end, storage_outcome
from worker.storage_space import problem_of
from worker.tail import JsonlTail

# Imported with this module (when the worker starts), not at a run's first sync: it imports torch,
# which takes seconds, and inside a run that would hold up the heartbeat past a short lease.
from worker.training.checkpoint import list_checkpoints
from worker.training.memory import planned_micro_batch

log = logging.getLogger("tunepool.runner")
S = JobStatus


class Released(Exception):
    """This worker is shutting down: the job goes back to the queue."""


class JobRun:
    """One attempt of one job on this worker."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        claim: Claim,
        worker_id: str,
        abort: Callable[[], bool] = lambda: False,
        devices: list[int] | None = None,
    ) -> None:
        self.db = db
        self.devices = devices  # this job's GPUs of the node (CUDA_VISIBLE_DEVICES); None on a CPU worker
        self.abort = abort  # true when this worker is shutting down: hand the job back
        self.settings = settings
        self.storage = Storage(settings.artifacts)
        self.claim = claim
        self.fence = Fence(db, claim, settings.fairshare_half_life_s)
        self.worker_id = worker_id
        self.dir = run_dir(self.storage, claim.job_id)
        self.output = self.dir / "output"
        self.log_path = self.dir / f"attempt-{claim.attempt}.log"
        self.metrics = JsonlTail(self.output / "metrics.jsonl")
        self.events = JsonlTail(self.output / "events.jsonl")
        self.registered: dict[int, str] = {}  # checkpoint step -> storage path
        self.proc: subprocess.Popen[bytes] | None = None
        self.stop_sent_at: float | None = None
        self.stop_kind: str | None = None  # what the STOP file asked: "cancel", "pause", "preempt"
        self.model_name = ""  # the fine-tuned model's name, set by prepare()
        self.resume_step = 0  # rows up to this step are in the database from an earlier attempt
        self.last_beat = time.monotonic()  # the last renewal of the lease (the claim made it)
        self.stored_results: str | None = None  # a results CSV stored for the end's transaction
        self.nproc = 1  # training processes (the job's gpus), set by prepare()

    # ------------------------------------------------------------------ set-up

    def prepare(self) -> None:
        """Write config.json (first attempt) and clear what a previous attempt left."""
        with self.fence.write() as (session, job):
            files = {f.id: f for f in session.scalars(select(File).where(File.id.in_(self._file_ids(job))))}
            team = session.get(Team, job.team_id)
            self.model_name = fine_tuned_model_name(job, team.name if team else job.team_id)
            self.nproc = max(1, int(job.gpus or 1))
            config = training_config(job, self.settings, self.storage, files)
            self.dir.mkdir(parents=True, exist_ok=True)
            path = self.dir / CONFIG_FILE
            if not path.exists():
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(config, indent=2))
                os.replace(tmp, path)
            for name in (STOP_FILE, ERROR_FILE):
                (self.dir / name).unlink(missing_ok=True)
            self.registered = {
                c.step: c.storage_path
                for c in session.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id))
            }
            last = self.resume_step = max(self.registered, default=0)
            # Metrics a dead attempt logged after its last checkpoint are trained again: drop them.
            session.execute(delete(JobMetric).where(JobMetric.job_id == job.id, JobMetric.step > last))
            if self.claim.attempt > 1:
                where = f"from checkpoint step {last}" if last else "from the start (no checkpoint yet)"
                add_event(session, job, f"Restarted {where} on worker {self.worker_id}", level="warn")
        # What earlier attempts left was synced by them; the trainer rewrites metrics.jsonl when it
        # starts (cut after the checkpoint), so its rows are read again from there.
        self.metrics.skip_existing()
        self.events.skip_existing()

    @staticmethod
    def _file_ids(job: Job) -> list[str]:
        return [f for f in (job.training_file, job.validation_file) if f]

    def spawn(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # less fragmentation
        # RLIMIT_AS caps address space, which CUDA reserves far beyond what it uses: CPU workers only.
        limit = self.settings.job_memory_limit_bytes if self.devices is None else 0
        if self.devices is not None:  # the job's own GPUs; a node runs several jobs side by side
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in self.devices)

        def in_child() -> None:  # runs in the child between fork and exec: system calls only
            # Die with this worker: a trainer orphaned by a crashed worker would go on writing the
            # run directory that another worker resumes from.
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
            if limit:
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

        launcher = [sys.executable]
        if self.nproc > 1:  # one job on K devices: torchrun on a free local port, one child per rank
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={self.nproc}"]
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [*launcher, "-m", "worker.child", str(self.dir)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: kill() takes every descendant
                preexec_fn=in_child,  # prctl and setrlimit only: safe between fork and exec
            )

    # ------------------------------------------------------------------ while it runs

    def sync(self) -> None:
        """Move new metric rows, events and checkpoints into the database (fenced)."""
        rows = [r for r in self.metrics.read_new() if int(r["step"]) > self.resume_step]
        events = self.events.read_new()
        done = self._completed_checkpoints()
        new = {step: rel for step, rel in done.items() if step not in self.registered}
        gone = [step for step in self.registered if step not in done]
        if not (rows or events or new or gone):
            return
        with self.fence.write() as (session, job):
            for row in rows:
                step = int(row["step"])
                session.execute(delete(JobMetric).where(JobMetric.job_id == job.id, JobMetric.step == step))
                session.add(JobMetric(job_id=job.id, step=step, attempt=self.claim.attempt, data=row))
            if rows:
                last = rows[-1]
                job.steps_completed = int(last["step"])
                job.total_steps = int(last["total_steps"])
                job.trained_tokens = int(last["trained_tokens"])
                job.tokens_per_sec = float(last["tokens_per_sec"])
                remaining = (
                    (job.total_steps - job.steps_completed) * last["elapsed_s"] / max(job.steps_completed, 1)
                )
                job.estimated_finish = int(time.time() + remaining)
            for e in events:
                data = {k: v for k, v in e.items() if k not in ("time", "level", "message")}
                level = "warn" if e.get("level") == "warning" else str(e.get("level", "info"))
                add_event(session, job, str(e.get("message", "")), level=level, data=data or None)
            metrics_by_step = {int(r["step"]): r for r in rows}
            for step, rel in sorted(new.items()):
                metrics = metrics_by_step.get(step) or self._metric_row(session, job.id, step)
                session.add(
                    Checkpoint(
                        job_id=job.id,
                        step=step,
                        storage_path=rel,
                        metrics=checkpoint_metrics(metrics),
                        fine_tuned_model_checkpoint=f"{self.model_name}:ckpt-step-{step}",
                    )
                )
            if gone:
                session.execute(
                    delete(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.step.in_(gone))
                )
        self.registered.update(new)
        for step in gone:
            del self.registered[step]

    @staticmethod
    def _metric_row(session: Any, job_id: str, step: int) -> dict[str, Any]:
        row = session.scalar(select(JobMetric.data).where(JobMetric.job_id == job_id, JobMetric.step == step))
        return dict(row or {"step": step})

    def _completed_checkpoints(self) -> dict[int, str]:
        base = self.storage.path("")
        return {step: str(path.relative_to(base)) for step, path in list_checkpoints(self.output)}

    def heartbeat(self) -> None:
        stop = self.fence.heartbeat(self.settings.lease_s)
        self.last_beat = time.monotonic()
        if stop and self.stop_sent_at is None:
            self.stop_sent_at = time.monotonic()
            self.stop_kind = stop
            # A pause or a preemption keeps the job: the trainer checkpoints its step before it stops.
            text = "cancel requested\n" if stop == "cancel" else f"{stop} requested: {STOP_CHECKPOINT}\n"
            try:
                (self.dir / STOP_FILE).write_text(text)
            except OSError as err:  # a full disk: no STOP file, so no clean stop; stop all the same
                log.warning("cannot write %s (%s): killing job %s", STOP_FILE, err, self.claim.job_id)
                self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def watch(self) -> int:
        """Until the child exits: sync, heartbeat, enforce cancel's grace period. Its exit status."""
        assert self.proc is not None
        next_beat = 0.0
        while True:
            code = self.proc.poll()
            now = time.monotonic()
            try:
                if now >= next_beat:
                    self.heartbeat()
                    next_beat = now + self.settings.heartbeat_s
                self.sync()
            except OperationalError as err:
                # The database is restarting or unreachable: training goes on, and so do we, as
                # long as the lease may still be ours. After that, another worker may have it.
                if now - self.last_beat > self.settings.lease_s:
                    raise LeaseLost(f"database unreachable for longer than the lease: {err}") from err
                log.warning("database error, retrying: %s", err)
                next_beat = now + 1.0
                time.sleep(self.settings.poll_s)
                continue  # (if the child has exited, its last outputs still have to go in)
            if code is not None:
                return code
            if self.abort():
                raise Released
            grace = self.settings.cancel_grace_s if self.stop_kind == "cancel" else self.settings.stop_grace_s
            if self.stop_sent_at is not None and now - self.stop_sent_at > grace:
                job = self.claim.job_id
                log.warning("job %s did not stop within %ss of %s: killing it", job, grace, self.stop_kind)
                self.kill()
                return self.proc.wait()
            time.sleep(self.settings.poll_s)

    def train_to_end(self) -> int:
        """The child's exit status once it has ended for good. A multi-process (FSDP) child that ran
        out of memory leaves a smaller micro-batch in memory_plan.json and exits: it is started
        again at once, from its last checkpoint (torchrun's own status is 1 whatever a rank did:
        rank 0's error.json says which failure it was)."""
        while True:
            before = planned_micro_batch(self.output, 1 << 30)
            code = self.watch()
            if code == 0 or self.nproc == 1:
                return code
            after = planned_micro_batch(self.output, 1 << 30)
            if after < before and self.stop_sent_at is None:
                self.sync()
                with self.fence.write() as (session, job):
                    add_event(
                        session, job, f"Out of memory on {self.nproc} processes: restarting with "
                        f"micro-batch {after} from the last checkpoint", level="warn",
                    )  # fmt: skip
                (self.dir / ERROR_FILE).unlink(missing_ok=True)
                self.metrics.skip_existing()
                self.events.skip_existing()
                self.spawn()
                continue
            error = read_error(self.dir)
            if error is None:
                return code
            return EXIT_STORAGE if "storage" in error else EXIT_FAILED

    # ------------------------------------------------------------------ the end (worker/job_end.py)

    def log_tail(self, lines: int = 30) -> list[str]:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return text.splitlines()[-lines:]

    # ------------------------------------------------------------------ all of it

    def run(self) -> JobStatus | None:
        """Run the attempt to its end; the job's status after it, or None if the lease was lost."""
        try:
            try:
                self.prepare()
                self.spawn()
                outcome = exit_outcome(self, self.train_to_end())
            except OSError as err:  # our own write to the run directory (config.json, log, ...)
                problem = problem_of(err, self.dir)
                if problem is None:
                    raise
                self.kill()
                outcome = storage_outcome(self, problem)
            record_end(self, outcome)
            return outcome.status
        except LeaseLost as err:
            log.warning("%s: stopping the run", err)  # the child is killed below
            return None
        except Released:
            self.kill()
            self.sync()
            with self.fence.write() as (session, job):
                last = max(self.registered, default=0)
                where = f"checkpoint step {last}" if last else "the start (no checkpoint yet)"
                message = f"Worker {self.worker_id} shut down: job re-queued, it resumes from {where}"
                set_status(session, job, S.QUEUED, message, level="warn")
                job.worker_id = job.lease_expires_at = job.dispatched_at = None
            return S.QUEUED
        finally:
            self.kill()
