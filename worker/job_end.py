"""The end of one attempt, as one deterministic step: what the child's exit means (`exit_outcome`),
and writing it into the database once (`record_end`).

    exit 0 + summary.json           succeeded (final checkpoint, fine_tuned_model, results CSV)
                                    or cancelled (stopped on request), or stopped after a checkpoint
                                    of its step (a pause: paused; a preemption: queued, an event
                                    names the job it made way for)
    exit 4, or a failure with the   storage: queued again while attempts are left (it resumes from its
    disk nearly full                last checkpoint once a worker sees enough free space: claims wait
                                    for TUNEPOOL_MIN_FREE_BYTES), then failed with storage_full,
                                    storage_read_only or storage_io_error
    exit 3 + error.json             failed with the child's error (invalid_training_file, ...)
    SIGKILL                         failed, out_of_memory
    anything else                   failed, internal_error (with the log's last lines)

Whatever goes wrong while recording it, the job ends with this attempt: a results CSV that cannot
be written leaves a succeeded job with a warning event and no result file; any other error fails
the job with `finish_failed`. Only a database that stays unreachable longer than the lease (or a
lost lease) leaves it to the reconciler. Nothing is left in storage's tmp/ or files/ by a failure.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import OperationalError

from service.jobs import add_event, set_status
from service.models import Job, JobStatus
from worker.artifacts import results_file
from worker.child import ERROR_FILE, EXIT_FAILED, EXIT_STORAGE
from worker.claim import LeaseLost
from worker.storage_space import StorageProblem, filesystem, low_space, problem_of
from worker.training.checkpoint import remove_partial_checkpoints

if TYPE_CHECKING:
    from worker.runner import JobRun

log = logging.getLogger("tunepool.runner")
S = JobStatus


@dataclass
class Outcome:
    status: JobStatus
    error: dict[str, Any] | None = None
    log_tail: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)  # summary.json of a finished run
    storage: StorageProblem | None = None  # why a storage outcome stopped the run


def exit_outcome(run: JobRun, code: int) -> Outcome:
    """What the child's exit status (and the files it left) means for the job."""
    summary = _read_json(run.output / "summary.json") if code == 0 else None
    if summary is not None:
        if summary.get("status") == "completed":
            return Outcome(S.SUCCEEDED, summary=summary)
        return Outcome(S.PAUSED if summary.get("status") == "stopped" else S.CANCELLED)
    if run.stop_sent_at is not None:  # killed while it stopped: a pause or preemption keeps the job
        return Outcome(S.CANCELLED if run.stop_kind == "cancel" else S.PAUSED)
    problem = _storage_problem_after_exit(run, code)
    if problem is not None:
        return storage_outcome(run, problem)
    tail = run.log_tail()
    error = _read_json(run.dir / ERROR_FILE) if code == EXIT_FAILED else None
    if error is not None:
        return Outcome(S.FAILED, error, tail)
    if code == -signal.SIGKILL:
        message = "The training process was killed (SIGKILL), most likely by the out-of-memory killer"
        return Outcome(S.FAILED, {"code": "out_of_memory", "message": message, "param": None}, tail)
    message = f"The training process failed (exit status {code}); the job's events show its last output"
    if code == 0:
        message = "The training process ended without a readable summary.json; the job's events show why"
    return Outcome(S.FAILED, {"code": "internal_error", "message": message, "param": None}, tail)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _storage_problem_after_exit(run: JobRun, code: int) -> StorageProblem | None:
    """The child said the disk failed it (exit 4), or it crashed while the disk is nearly full or
    read-only: many writers (torch.save: "unexpected pos ...") do not say ENOSPC, and on a full disk
    the log that would show the error is empty."""
    if code == EXIT_STORAGE:
        reported = (_read_json(run.dir / ERROR_FILE) or {}).get("storage")
        if isinstance(reported, dict):
            return StorageProblem.from_json(reported, run.dir)
        fs = filesystem(run.dir)  # it could not even write error.json: the disk is full
        return StorageProblem(errno.EROFS if fs.read_only else errno.ENOSPC, None, fs)
    if code in (EXIT_FAILED, -signal.SIGKILL):
        return None  # a failure the child understood, or the out-of-memory killer
    low = low_space([run.dir], run.settings.min_free_bytes)
    if low is None:
        return None
    return StorageProblem(errno.EROFS if low.read_only else errno.ENOSPC, None, low, nearly_full=True)


def storage_outcome(run: JobRun, problem: StorageProblem) -> Outcome:
    """Re-queued while attempts are left (resumed from the last good checkpoint), then failed."""
    # The child is gone: a checkpoint it was saving is incomplete (never resumed from: it has no
    # marker and was never renamed into place). Removing it gives the space back now.
    with contextlib.suppress(OSError):  # (a disk failing reads too: the next start retries)
        remove_partial_checkpoints(run.output)
    attempt, most = run.claim.attempt, run.settings.max_attempts
    last = max(run.registered, default=0)
    if attempt < most:
        return Outcome(S.QUEUED, storage=problem)
    kept = f"; its checkpoint of step {last} is kept" if last else ""
    message = f"{problem.summary()} (attempt {attempt} of {most}){kept}"
    return Outcome(S.FAILED, {"code": problem.code, "message": message, "param": None}, storage=problem)


def record_end(run: JobRun, outcome: Outcome) -> None:
    """Write the attempt's end (one fenced transaction), whatever fails on the way."""
    deadline = run.last_beat + run.settings.lease_s
    while True:
        run.stored_results = None
        try:
            with run.fence.write() as (session, job):
                _record(run, session, job, outcome)
            return
        except LeaseLost:
            _discard_results(run)
            raise
        except OperationalError as err:  # the database is restarting: ours until the lease expires
            _discard_results(run)
            if time.monotonic() > deadline:
                raise LeaseLost(f"database unreachable for longer than the lease: {err}") from err
            log.warning("database error recording the end of job %s, retrying: %s", run.claim.job_id, err)
            time.sleep(run.settings.poll_s)
        except Exception as err:
            _discard_results(run)
            log.exception("recording the end of job %s failed", run.claim.job_id)
            _fail_recording(run, outcome, err)
            return


def _record(run: JobRun, session: Any, job: Job, outcome: Outcome) -> None:
    if outcome.status == S.SUCCEEDED:
        _succeed(run, session, job, outcome.summary)
    elif outcome.status == S.CANCELLED:
        last = max(run.registered, default=0)
        kept = f"; checkpoint of step {last} kept" if last else ""
        set_status(session, job, S.CANCELLED, f"Job cancelled at step {job.steps_completed}{kept}")
    elif outcome.status == S.PAUSED:
        _stopped(run, session, job)
    elif outcome.status == S.QUEUED and job.cancel_requested:  # a claim would forget the request
        assert outcome.storage is not None
        message = f"Job cancelled at step {job.steps_completed}; it stopped on: {outcome.storage.summary()}"
        set_status(session, job, S.CANCELLED, message)
    elif outcome.status == S.QUEUED:
        assert outcome.storage is not None
        last = max(run.registered, default=0)
        where = f"checkpoint step {last}" if last else "the start (no checkpoint yet)"
        message = (
            f"{outcome.storage.summary()}: re-queued (attempt {job.attempt} of {run.settings.max_attempts}), "
            f"it resumes from {where} once space is free"
        )
        set_status(session, job, S.QUEUED, message, level="warn")
        job.worker_id = job.lease_expires_at = job.dispatched_at = None
    else:
        assert outcome.error is not None
        if outcome.log_tail and outcome.error["code"] == "internal_error":
            lines = "\n".join(outcome.log_tail)
            add_event(session, job, f"Last lines of the training log:\n{lines}", level="error")
        message = f"Job failed: {outcome.error['message']}"
        set_status(session, job, S.FAILED, message, level="error", error=outcome.error)


def _stopped(run: JobRun, session: Any, job: Job) -> None:
    """The run stopped on request after a checkpoint of its step: paused, re-queued (preempted, or a
    pause withdrawn after the trainer was told), or cancelled when that came since."""
    last = max(run.registered, default=0)
    where = f"resumes from step {last}" if last else "starts again from the beginning (no checkpoint)"
    request, reason = job.stop_request, job.stop_reason
    job.stop_request = job.stop_reason = None
    if job.cancel_requested:
        kept = f"; checkpoint of step {last} kept" if last else ""
        set_status(session, job, S.CANCELLED, f"Job cancelled at step {job.steps_completed}{kept}")
        return
    job.worker_id = job.lease_expires_at = job.dispatched_at = None
    job.estimated_finish = None
    if request == "pause":
        message = f"Job paused at step {last}: its GPUs are free; it {where} when resumed"
        set_status(session, job, S.PAUSED, message)
    elif request == "preempt":
        job.preemptions += 1
        set_status(session, job, S.QUEUED, f"{reason or 'Preempted'}; {where}", level="warn")
    else:
        message = f"Job stopped for a pause that was withdrawn: re-queued, it {where}"
        set_status(session, job, S.QUEUED, message)


def _succeed(run: JobRun, session: Any, job: Job, summary: dict[str, Any]) -> None:
    job.fine_tuned_model = run.model_name
    job.trained_tokens = int(summary.get("trained_tokens", job.trained_tokens or 0))
    job.steps_completed = int(summary.get("steps", job.steps_completed))
    job.estimated_finish = None
    try:
        results = results_file(session, run.storage, job)
    except OSError as err:
        # The model is trained and its checkpoints are in place: the job succeeded. Only the CSV
        # of its metrics is missing; the same rows stay readable from the metrics endpoint.
        problem = problem_of(err, run.storage.root)
        why = problem.summary() if problem else f"{type(err).__name__}: {err}"
        add_event(
            session,
            job,
            f"The results file could not be written ({why}): the job has no result file; its metrics are "
            f"at GET /v1/fine_tuning/jobs/{job.id}/metrics",
            level="warn",
            data={"code": problem.code if problem else "results_file_failed"},
        )
        job.result_files = []
    else:
        run.stored_results = results.storage_path
        job.result_files = [results.id]
    set_status(session, job, S.SUCCEEDED, f"Job succeeded: {job.fine_tuned_model}")


def _discard_results(run: JobRun) -> None:
    """A results CSV stored for a transaction that did not commit: no file row points at it."""
    if run.stored_results:
        try:
            run.storage.delete(run.stored_results)
        except OSError as err:
            log.warning("could not delete %s: %s", run.stored_results, err)
        run.stored_results = None


def _fail_recording(run: JobRun, outcome: Outcome, err: Exception) -> None:
    """Recording the outcome failed for a reason other than the database or the lease: fail the job
    with that reason, in a fresh transaction, rather than leave it running to be run again."""
    message = (
        f"The run ended ({outcome.status.value}) but recording its end failed: {type(err).__name__}: {err}"
    )
    error = {"code": "finish_failed", "message": message, "param": None}
    try:
        with run.fence.write() as (session, job):
            set_status(session, job, S.FAILED, f"Job failed: {message}", level="error", error=error)
    except LeaseLost:
        raise
    except Exception:  # the database refuses this too: the lease expires and the reconciler acts
        log.exception("could not fail job %s either", run.claim.job_id)
