"""A full disk during training, for real: the storage's jobs/ directory is a small tmpfs that holds
one checkpoint of the tiny model and not two (TUNEPOOL_KEEP_CHECKPOINTS=1: a save needs room for
the new one beside the old). The save of step 4 fills it.

- The job's event names ENOSPC and the disk (mount point, free bytes); the job goes back to
  `queued`, and no worker claims it while the disk has less than TUNEPOOL_MIN_FREE_BYTES free.
- Once there is room (the tmpfs remounted bigger), it resumes from its last good checkpoint (step 2,
  not the half-written step 4) and succeeds with one metrics row per step, the metrics file
  repaired (a row cut short on the full disk is dropped, not parsed nor glued to the next).
- A job that fills the disk on every attempt still ends: failed, `storage_full`, after max_attempts.
"""

from __future__ import annotations

import json
import time
from typing import Any

from tests.e2e.conftest import System
from tests.e2e.disks import grow, tmpfs

# A checkpoint of the tiny model takes ~410 KiB (weights, optimizer state, tokenizer); with the run's
# config, log and metrics the first one leaves ~200 KiB of this disk free, too little for a second.
DISK = "640k"
# Above what a failed save leaves free (~200 KiB, once its partial checkpoint is removed), below what
# a fresh job finds (~630 KiB).
MIN_FREE = 320 * 1024
HP = {"n_epochs": 2, "checkpoint_every": 2}  # 16 examples, batch 4: 8 steps


def worker_env(**extra: str) -> dict[str, str]:
    return {"TUNEPOOL_KEEP_CHECKPOINTS": "1", "TUNEPOOL_MIN_FREE_BYTES": str(MIN_FREE), **extra}


def wait_for_event(system: System, client: Any, job_id: str, text: str, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in system.events(client, job_id) if text in e]
        if found:
            return found[0]
        time.sleep(0.3)
    raise AssertionError(f"no event with {text!r}: {system.events(client, job_id)}\n{system.worker_logs()}")


def test_a_full_disk_requeues_the_job_and_it_resumes_from_its_last_checkpoint(system: System) -> None:
    client = system.team()
    file_id = system.new_file(client, n=16)
    jobs = system.stack.settings.artifacts / "jobs"
    with tmpfs(jobs, DISK):
        system.start_worker(env=worker_env())
        job = system.submit(client, file_id, hyperparameters=HP)
        requeued = wait_for_event(system, client, job["id"], "re-queued")
        assert requeued.startswith("Storage full (ENOSPC"), requeued
        assert f"on {jobs} (tmpfs, " in requeued and " free of 640.0 KiB" in requeued, requeued
        assert "it resumes from checkpoint step 2 once space is free" in requeued, requeued

        # Queued, and left there: the worker sees too little free space to claim it.
        log = system.home / "worker-0.log"
        deadline = time.monotonic() + 30
        while "not claiming jobs of pool default: storage" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, system.worker_logs()
            time.sleep(0.2)
        current = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
        assert (current["status"], current["attempt"], current["error"]) == ("queued", 1, None), current
        output = jobs / job["id"] / "output"
        kept = sorted(p.name for p in (output / "checkpoints").iterdir())
        assert kept == ["step-000002"], kept  # the half-written step 4 is gone, step 2 is whole
        # A row cut short by the full disk, as a write stopped halfway leaves it.
        with (output / "metrics.jsonl").open("a") as f:
            f.write('{"step": 5, "loss": 0.')

        grow(jobs, "32m")  # space is back: the next dispatch message finds room
        done = system.wait(client, job["id"], timeout=120)
        events = system.events(client, job["id"])
        assert done["status"] == "succeeded", (done, events, system.worker_logs())
        assert done["attempt"] == 2 and done["progress"]["steps_completed"] == 8, (done, events)
        assert any("Restarted from checkpoint step 2" in e for e in events), events
        metrics = client.get(f"/v1/fine_tuning/jobs/{job['id']}/metrics").json()["data"]
        assert [m["step"] for m in metrics] == list(range(1, 9)), metrics  # one row per step
        assert all(m["attempt"] == (1 if m["step"] <= 2 else 2) for m in metrics), metrics
        on_disk = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in on_disk] == list(range(1, 9)), on_disk


def test_a_job_that_fills_the_disk_on_every_attempt_fails_with_storage_full(system: System) -> None:
    client = system.team()
    file_id = system.new_file(client, n=16)
    jobs = system.stack.settings.artifacts / "jobs"
    with tmpfs(jobs, DISK):
        # A low minimum: the worker claims the job again at once, and the same save fills the disk.
        system.start_worker(env=worker_env(TUNEPOOL_MIN_FREE_BYTES="65536", TUNEPOOL_MAX_ATTEMPTS="2"))
        job = system.submit(client, file_id, hyperparameters=HP)
        done = system.wait(client, job["id"], timeout=120)
        events = system.events(client, job["id"])
        assert done["status"] == "failed", (done, events, system.worker_logs())
        error = done["error"]
        assert error["code"] == "storage_full" and error["param"] is None, error
        assert error["message"].startswith("Storage full (ENOSPC"), error
        assert f"on {jobs} (tmpfs, " in error["message"], error
        assert "(attempt 2 of 2); its checkpoint of step 2 is kept" in error["message"], error
        assert done["attempt"] == 2 and sum("re-queued" in e for e in events) == 1, events
        assert not any("worker_lost" in e or "stopped renewing" in e for e in events), events
        assert [p.name for p in (jobs / job["id"] / "output" / "checkpoints").iterdir()] == ["step-000002"]
