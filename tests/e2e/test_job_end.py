"""The end of a job is one step, taken once: a results file that cannot be written (the storage's
tmp/ is a full disk) leaves the job succeeded, with a warning event that names the disk and no
result file; any other error there fails it with `finish_failed`. It is never left running to be
claimed and trained again. Nothing stays in tmp/, and what killed writers left there long ago is
removed."""

from __future__ import annotations

import os
import time

from service.models import JobStatus
from tests.e2e.conftest import System
from tests.e2e.disks import fill, tmpfs
from worker.claim import claim_next_job
from worker.job_end import Outcome, record_end
from worker.runner import JobRun


def test_an_unwritable_results_file_ends_the_job_once_and_leaves_no_temporary_file(system: System) -> None:
    client = system.team()
    file_id = system.new_file(client, n=16)  # stored before tmp/ becomes a full disk
    tmp = system.stack.settings.artifacts / "tmp"
    with tmpfs(tmp, "64k"):
        stale = tmp / "left-by-a-killed-upload"
        stale.write_bytes(b"partial")
        two_days_ago = time.time() - 2 * 86400
        os.utime(stale, (two_days_ago, two_days_ago))
        system.start_worker()
        # The worker's reconciler removes what killed writers left long ago (older than
        # TUNEPOOL_TMP_MAX_AGE_S, a day by default).
        deadline = time.monotonic() + 60
        while stale.exists():
            assert time.monotonic() < deadline, system.worker_logs()
            time.sleep(0.2)
        filler = fill(tmp)
        job = system.submit(client, file_id, hyperparameters={"checkpoint_every": 2})
        done = system.wait(client, job["id"], timeout=120)
        events = system.events(client, job["id"])
        assert done["status"] == "succeeded", (done, events, system.worker_logs())
        # One attempt, trained once, with its model, its checkpoints and its metrics.
        assert done["attempt"] == 1 and done["error"] is None, (done, events)
        assert sum("started on worker" in e for e in events) == 1, events
        assert done["fine_tuned_model"] and done["progress"]["steps_completed"] == 4
        checkpoints = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
        assert sorted(c["step_number"] for c in checkpoints) == [2, 4], checkpoints
        metrics = client.get(f"/v1/fine_tuning/jobs/{job['id']}/metrics").json()["data"]
        assert [m["step"] for m in metrics] == [1, 2, 3, 4]
        # No result file, and a warning that says why, naming the errno and the disk.
        assert done["result_files"] == [], done
        [warning] = [e for e in events if "results file could not be written" in e]
        assert "ENOSPC" in warning and str(tmp) in warning and "tmpfs" in warning, warning
        assert f"/v1/fine_tuning/jobs/{job['id']}/metrics" in warning, warning
        assert events[-1] == f"Job succeeded: {done['fine_tuned_model']}", events

        # It stays that way: no second attempt claims it (the lease is 6 s, the reconciler runs each 1 s).
        time.sleep(8)
        again = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
        assert (again["status"], again["attempt"]) == ("succeeded", 1), again
        # Nothing half-written is left in tmp/, and the fresh filler was not taken for stale.
        assert sorted(p.name for p in tmp.iterdir()) == [filler.name], list(tmp.iterdir())


def test_an_error_while_recording_the_end_fails_the_job_with_finish_failed(system: System) -> None:
    """Any other error in the last step (here a summary.json whose step count is not a number) fails
    the job at once, naming it, instead of leaving it running for the reconciler to run again."""
    client = system.team()
    job = system.submit(client)  # no worker: this test is the worker
    db, settings = system.stack.db, system.stack.settings
    claim = claim_next_job(db, "default", "worker-test", lease_s=60)
    assert claim is not None and claim.job_id == job["id"]
    run = JobRun(db, settings, claim, "worker-test")
    run.prepare()
    record_end(run, Outcome(JobStatus.SUCCEEDED, summary={"status": "completed", "steps": "many"}))
    done = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert (done["status"], done["attempt"], done["result_files"]) == ("failed", 1, []), done
    error = done["error"]
    assert error["code"] == "finish_failed" and error["param"] is None, error
    assert error["message"].startswith("The run ended (succeeded) but recording its end failed: ValueError")
    assert done["fine_tuned_model"] is None, done  # the rolled-back success left nothing behind
    assert not list((settings.artifacts / "files").rglob("*.csv"))
