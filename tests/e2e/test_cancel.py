"""Cancelling jobs through real processes: a queued job is cancelled at once and never starts; a
running job stops after its current step, keeps its checkpoints and leaves no training process
behind; a finished job cannot be cancelled (409)."""

from __future__ import annotations

import io
import tarfile
import time
from typing import Any

import psutil

from tests.e2e.conftest import FAST, System
from tests.service.conftest import TeamClient

GRACE_S = float(FAST["TUNEPOOL_CANCEL_GRACE_S"])


def training_children(job_id: str) -> list[psutil.Process]:
    """The live `python -m worker.child <run dir>` processes of this job."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if "worker.child" in cmdline and any(job_id in arg for arg in cmdline):
            found.append(proc)
    return found


def cancel(client: TeamClient, job_id: str) -> Any:
    return client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")


def all_events(client: TeamClient, job_id: str) -> list[str]:
    """Every event's message, oldest first (a checkpoint every 2 steps makes more than one page)."""
    messages: list[str] = []
    params: dict[str, Any] = {"limit": 100}
    while True:
        page = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params).json()
        messages += [e["message"] for e in page["data"]]
        if not page["has_more"]:
            return messages[::-1]
        params["after"] = page["data"][-1]["id"]


def checkpoints(client: TeamClient, job_id: str) -> list[dict[str, Any]]:
    return list(client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"])


def test_cancel_queued_running_and_finished_jobs(system: System) -> None:
    client = system.team()
    file_id = system.new_file(client, n=128)

    # -- queued: cancelled at once, before any worker exists
    queued = system.submit(client, file_id, hyperparameters={"max_steps": 1})
    assert queued["status"] in ("validating_files", "queued")
    response = cancel(client, queued["id"])
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    assert client.get(f"/v1/fine_tuning/jobs/{queued['id']}").json()["status"] == "cancelled"

    # -- running: 1600 steps (50 epochs of 32 steps), a checkpoint every 2; cancelled after one
    worker = system.start_worker()
    running = system.submit(client, file_id, hyperparameters={"n_epochs": 50, "checkpoint_every": 2})
    deadline = time.monotonic() + 120
    saved: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not saved:
        saved = checkpoints(client, running["id"])
        time.sleep(0.1)
    assert saved, (system.events(client, running["id"]), system.worker_logs())
    assert len(training_children(running["id"])) == 1  # the trainer is found while it runs
    response = cancel(client, running["id"])
    cancelled_at = time.monotonic()
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "running" and response.json()["cancel_requested"] is True
    done = system.wait(client, running["id"], timeout=GRACE_S + 60)
    took = time.monotonic() - cancelled_at
    events = all_events(client, running["id"])
    assert done["status"] == "cancelled", (done, events, system.worker_logs())
    # It stopped by itself after its current step, well before the grace period would have killed it.
    assert took < GRACE_S * 0.75, (took, events)
    assert any("stopped at step" in e and "on request" in e for e in events), events
    assert any("started on worker" in e for e in events), events
    assert "Cancellation requested; the job stops after its current step" in events
    assert any(e.startswith("Job cancelled at step") and "checkpoint of step" in e for e in events), events
    assert done["fine_tuned_model"] is None and done["error"] is None
    progress = done["progress"]
    assert 2 <= progress["steps_completed"] < progress["total_steps"] == 1600, progress
    assert training_children(running["id"]) == []
    assert worker.poll() is None

    # Its checkpoints are kept, the last one at most a step behind where it stopped, and download.
    kept = checkpoints(client, running["id"])
    assert kept and max(c["step_number"] for c in kept) >= max(c["step_number"] for c in saved)
    assert max(c["step_number"] for c in kept) >= progress["steps_completed"] - 1, (kept, progress)
    for checkpoint in kept:
        url = f"/v1/fine_tuning/jobs/{running['id']}/checkpoints/{checkpoint['id']}/content"
        archive = client.get(url)
        assert archive.status_code == 200, archive.text
        with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
            names = {name.rsplit("/", 1)[-1] for name in tar.getnames()}
        assert {"config.json", "model.safetensors"} <= names, names

    # -- the worker goes on: the next job runs and succeeds; the queued one never started
    after = system.submit(client, file_id, hyperparameters={"max_steps": 2})
    finished = system.wait(client, after["id"])
    assert finished["status"] == "succeeded", (system.events(client, after["id"]), system.worker_logs())
    never = client.get(f"/v1/fine_tuning/jobs/{queued['id']}").json()
    assert never["status"] == "cancelled" and never["attempt"] == 0, never
    assert not any("started on worker" in e for e in system.events(client, queued["id"]))

    # -- finished (succeeded or cancelled): 409 with the OpenAI error body, nothing changes
    for job_id, status in ((after["id"], "succeeded"), (queued["id"], "cancelled")):
        response = cancel(client, job_id)
        assert response.status_code == 409, response.text
        assert response.json() == {
            "error": {
                "message": f"Job {job_id} is already {status}; it cannot be cancelled",
                "type": "invalid_request_error",
                "param": "fine_tuning_job_id",
                "code": "job_finished",
            }
        }
        assert client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == status
