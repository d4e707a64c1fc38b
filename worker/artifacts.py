"""What a job's run reads and leaves besides checkpoints: the trainer's config built from the job
row, the run directory, the fine-tuned model's name, checkpoint metrics in OpenAI's names, and the
metrics CSV attached to a finished job as its result file. Also the storage upkeep of workers: no
claim while the storage is nearly full, and temporary files of killed writers removed by age."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import logging
import os
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select

from service.models import File, Job, JobMetric, new_id
from service.settings import Settings
from service.storage import Storage
from worker.storage_space import human_bytes, low_space

log = logging.getLogger("tunepool.artifacts")

# Trainer settings that a job's resolved hyperparameters carry under the same name (a job carries
# only those its request gave, besides the resolved "auto" ones; the trainer's defaults fill the rest).
_TRAINER_FIELDS = (
    "n_epochs", "batch_size", "learning_rate", "max_seq_length", "max_steps", "warmup_ratio", "lr_scheduler",
    "weight_decay", "max_grad_norm", "gradient_accumulation_steps", "overlength", "checkpoint_every",
    "eval_every", "lora", "precision", "gradient_checkpointing", "micro_batch_size", "loss_chunk_size",
    "attn_implementation", "packing", "chat_template", "distributed",
)  # fmt: skip


def training_config(job: Job, settings: Settings, storage: Storage, files: dict[str, File]) -> dict[str, Any]:
    """The trainer's config for `job` (worker/training/config.py), as JSON."""
    hp = job.hyperparameters
    config: dict[str, Any] = {k: hp[k] for k in _TRAINER_FIELDS if k in hp}
    config.setdefault("checkpoint_every", settings.default_checkpoint_every)
    config |= {
        "model": job.model_source,
        "loss": job.loss,
        "train_file": str(storage.path(files[job.training_file].storage_path)),
        "output_dir": str(run_dir(storage, job.id) / "output"),
        "seed": job.seed % 2**32,
        "keep_last_n": settings.keep_checkpoints,
    }
    if job.validation_file:
        config["validation_file"] = str(storage.path(files[job.validation_file].storage_path))
    return config


def run_dir(storage: Storage, job_id: str) -> Path:
    return storage.path(storage.job_relpath(job_id))


def fine_tuned_model_name(job: Job, team_name: str) -> str:
    """OpenAI's shape: ft:<base>:<org>:<suffix>:<id> (the suffix may be empty)."""
    base = job.model.split(":")[1] if job.model.startswith("ft:") else job.model
    return f"ft:{base}:{team_name}:{job.suffix or ''}:{job.id}"


def results_file(session: Any, storage: Storage, job: Job) -> File:
    """The per-step metrics as CSV, stored and added to the session as a `fine-tune-results` file as
    OpenAI does. An OSError (a full or read-only disk) leaves nothing behind in storage's tmp/; the
    caller deletes the stored file (`file.storage_path`) if its transaction does not commit."""
    rows = [
        m.data
        for m in session.scalars(select(JobMetric).where(JobMetric.job_id == job.id).order_by(JobMetric.step))
    ]
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    content = buffer.getvalue().encode()
    file = File(
        id=new_id("file-"),
        team_id=job.team_id,
        filename=f"{job.id}-results.csv",
        purpose="fine-tune-results",
        bytes=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
        format="csv",
        n_examples=len(rows),
        storage_path="",
    )
    file.storage_path = storage.file_relpath(job.team_id, file.id).removesuffix(".jsonl") + ".csv"
    temp = storage.temp_path()
    try:
        try:
            temp.write_bytes(content)
        except OSError as err:  # a failed write() does not say which file: name it for the job's event
            raise OSError(err.errno, err.strerror, str(temp)) from err
        storage.commit(temp, file.storage_path)
    finally:
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)  # committed: already gone; failed: half a CSV
    session.add(file)
    return file


def storage_too_full(settings: Settings) -> str | None:
    """Why this worker must not claim a job now (its storage is read-only or has less than
    `min_free_bytes` free, checked where runs and results are written), or None."""
    root = settings.artifacts
    fs = low_space([root / "jobs", root], settings.min_free_bytes)
    if fs is None:
        return None
    if fs.read_only:
        return f"storage {fs} is read-only"
    return f"storage {fs} has less than TUNEPOOL_MIN_FREE_BYTES ({human_bytes(settings.min_free_bytes)}) free"


def remove_stale_temp_files(storage: Storage, max_age_s: float, now: float | None = None) -> int:
    """Delete files in storage's tmp/ untouched for `max_age_s` (left by writers that were killed:
    uploads and results write there, then rename into place). The number removed."""
    cutoff = (time.time() if now is None else now) - max_age_s
    removed = 0
    try:
        entries = os.scandir(storage.root / "tmp")
    except FileNotFoundError:
        return 0
    with entries:
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                st = entry.stat(follow_symlinks=False)
                if entry.is_file(follow_symlinks=False) and st.st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
    if removed:
        log.info("removed %d stale temporary files from %s", removed, storage.root / "tmp")
    return removed


def checkpoint_metrics(row: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's checkpoint metrics names, from a trainer metrics row."""
    out: dict[str, Any] = {"step": row.get("step")}
    names = {
        "loss": "train_loss",
        "token_accuracy": "train_mean_token_accuracy",
        "valid_loss": "valid_loss",
        "valid_token_accuracy": "valid_mean_token_accuracy",
        "nll": "train_nll",
        "valid_nll": "valid_nll",
    }
    for ours, theirs in names.items():
        if ours in row:
            out[theirs] = row[ours]
    return out
