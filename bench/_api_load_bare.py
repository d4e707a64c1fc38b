"""The bare reference of bench/api_load.py: FastAPI with no database, no auth, no middleware.

Served exactly as `tunepool api` serves tunepool (uvicorn, one process, the same loop and HTTP
implementation, access log off):

    python -m uvicorn bench._api_load_bare:app --host 127.0.0.1 --port 8001 --no-access-log

`GET /v1/fine_tuning/jobs/{id}` answers a fixed job-shaped JSON object (a succeeded DFT job with
the id echoed back, about the size of a real job object) from a plain `def` handler, which FastAPI
runs in its thread pool: the reference of the goal, the cost of serving a JSON object the way most
FastAPI services do (tunepool's read endpoints, the job poll among them, are `async def`).
`GET /async/v1/fine_tuning/jobs/{id}` is the same from an `async def` handler (no thread hop): the
framework's floor, reported for information.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

_HP: dict[str, Any] = {
    "n_epochs": 3,
    "batch_size": 8,
    "learning_rate_multiplier": 1.0,
    "learning_rate": 5e-05,
    "max_seq_length": 2048,
    "warmup_ratio": 0.03,
    "lora": {"r": 16, "alpha": 32.0, "dropout": 0.05, "target_modules": "all-linear", "merge": False},
}
JOB: dict[str, Any] = {
    "id": "",
    "object": "fine_tuning.job",
    "created_at": 1767225600,
    "error": None,
    "fine_tuned_model": "ft:SmolLM2-135M-Instruct:team-Ab12Cd34Ef56Gh78:support-bot:ftjob-Ab12Cd34",
    "finished_at": 1767229200,
    "hyperparameters": {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 1.0},
    "model": "SmolLM2-135M-Instruct",
    "organization_id": "team-Ab12Cd34Ef56Gh78",
    "result_files": ["file-Ab12Cd34Ef56Gh78Ij90Kl12"],
    "seed": 1234567,
    "status": "succeeded",
    "trained_tokens": 1843200,
    "training_file": "file-Ab12Cd34Ef56Gh78Ij90Kl12",
    "validation_file": None,
    "estimated_finish": None,
    "integrations": None,
    "metadata": {"project": "support-bot"},
    "method": {"type": "dft", "dft": {"hyperparameters": _HP}},
    "user_provided_suffix": "support-bot",
    "pool": "default",
    "priority": 0,
    "attempt": 1,
    "cancel_requested": False,
    "progress": {
        "steps_completed": 450,
        "total_steps": 450,
        "trained_tokens": 1843200,
        "tokens_per_sec": 5120.5,
    },
    "queue_position": None,
}

app = FastAPI(title="bare reference")


@app.get("/v1/fine_tuning/jobs/{job_id}")
def job(job_id: str) -> dict[str, Any]:
    return {**JOB, "id": job_id}


@app.get("/async/v1/fine_tuning/jobs/{job_id}")
async def job_async(job_id: str) -> dict[str, Any]:
    return {**JOB, "id": job_id}
