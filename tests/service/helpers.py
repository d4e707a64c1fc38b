"""Shared steps of the service tests: a registered model, an uploaded file, a job, fake worker output."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from service.models import Checkpoint, Job, JobMetric
from tests.service.conftest import Stack, TeamClient, chat_jsonl, upload

MODEL = "tiny-test-model"


def ensure_model(stack: Stack) -> str:
    stack.add_model(MODEL, stack.model_dir("tiny"))  # idempotent: re-registering updates the source
    return MODEL


def new_file(client: TeamClient, n: int = 4) -> str:
    response = upload(client, chat_jsonl(n))
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def new_job(stack: Stack, client: TeamClient, file_id: str | None = None, **fields: Any) -> dict[str, Any]:
    body = {
        "model": ensure_model(stack),
        "training_file": file_id or new_file(client),
        "method": {"type": "dft"},
        **fields,
    }
    response = client.post("/v1/fine_tuning/jobs", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def set_job(stack: Stack, job_id: str, **values: Any) -> None:
    """What a worker would write (issue #4): status, fine_tuned_model, progress..."""
    with stack.db.session() as session:
        job = session.query(Job).filter_by(id=job_id).one()
        for key, value in values.items():
            setattr(job, key, value)
        session.commit()


def add_checkpoint(stack: Stack, job_id: str, step: int, files: dict[str, bytes]) -> str:
    """A checkpoint directory in storage and its row, as a worker registers it."""
    relative = f"jobs/{job_id}/checkpoints/step-{step:06d}"
    directory = stack.settings.artifacts / relative
    for name, content in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        os.utime(path, (1_700_000_000, 1_700_000_000))
    with stack.db.session() as session:
        checkpoint = Checkpoint(
            job_id=job_id,
            step=step,
            storage_path=relative,
            metrics={"step": step, "train_loss": 0.5, "train_mean_token_accuracy": 0.9},
            fine_tuned_model_checkpoint=f"ft:{MODEL}:t:ckpt-step-{step}:{job_id}",
        )
        session.add(checkpoint)
        session.commit()
        return checkpoint.id


def add_metrics(stack: Stack, job_id: str, steps: int) -> None:
    with stack.db.session() as session:
        for step in range(1, steps + 1):
            session.add(
                JobMetric(
                    job_id=job_id,
                    step=step,
                    attempt=1,
                    data={"step": step, "loss": 1.0 / step, "nll": 2.0 / step},
                )
            )
        session.commit()


def checkpoint_dir(stack: Stack, job_id: str, step: int) -> Path:
    return stack.settings.artifacts / f"jobs/{job_id}/checkpoints/step-{step:06d}"
