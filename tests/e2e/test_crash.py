"""A worker killed mid-job loses nothing: the lease expires, the job resumes from its checkpoint on
another worker and ends with exactly its steps; a stale attempt can no longer write anything."""

from __future__ import annotations

import time

import psutil
import pytest
from sqlalchemy import select

from service.models import Job, JobMetric
from tests.e2e.conftest import System
from worker.claim import Fence, LeaseLost, claim_next_job
from worker.reconciler import requeue_expired


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once, as a node or OOM kill would."""
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    for proc in procs:
        proc.kill()
    psutil.wait_procs(procs, timeout=30)


def test_sigkilled_worker_job_resumes_from_its_checkpoint(system: System) -> None:
    first = system.start_worker()
    client = system.team()
    file_id = system.new_file(client, n=64)
    # 64 steps (4 epochs of 16), a checkpoint every 2: long enough that the kill lands mid-run even
    # when the machine is idle and the tiny model trains fast.
    hp = {"batch_size": 4, "n_epochs": 4, "checkpoint_every": 2}
    job = system.submit(client, file_id, hyperparameters=hp)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        checkpoints = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
        if checkpoints:
            break
        time.sleep(0.1)
    assert checkpoints, system.worker_logs()
    current = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert current["status"] == "running" and current["progress"]["steps_completed"] < 64
    kill_tree(first.pid)
    killed_at_step = max(c["step_number"] for c in checkpoints)

    system.start_worker()  # a new worker; the old lease (6 s) expires and the reconciler re-queues
    done = system.wait(client, job["id"])
    assert done["status"] == "succeeded", system.events(client, job["id"])
    events = system.events(client, job["id"])
    assert done["attempt"] == 2 and done["progress"]["steps_completed"] == 64, events
    restarted = [e for e in events if "restarted from checkpoint step" in e]
    assert restarted, events
    resumed_step = int(restarted[0].split("restarted from checkpoint step ")[1].split()[0])
    assert resumed_step >= killed_at_step
    metrics = client.get(f"/v1/fine_tuning/jobs/{job['id']}/metrics").json()["data"]
    assert [m["step"] for m in metrics] == list(range(1, 65))  # one row per step, none twice
    assert {m["attempt"] for m in metrics} == {1, 2}  # steps after the checkpoint were trained again
    assert all(m["attempt"] == 2 for m in metrics if m["step"] > resumed_step)


@pytest.mark.parametrize("lease_s", [0.5])
def test_a_stale_attempt_cannot_write(system: System, lease_s: float) -> None:
    """Fencing: attempt 1's lease expires and attempt 2 claims the job; attempt 1's writes fail."""
    client = system.team()
    job = system.submit(client)  # no worker: it stays queued
    db, settings = system.stack.db, system.stack.settings
    stale = claim_next_job(db, "default", "worker-old", lease_s)
    assert stale is not None and stale.job_id == job["id"] and stale.attempt == 1
    time.sleep(lease_s + 0.2)
    assert requeue_expired(db, settings) == [job["id"]]
    fresh = claim_next_job(db, "default", "worker-new", lease_s=60)
    assert fresh is not None and fresh.job_id == job["id"] and fresh.attempt == 2

    with pytest.raises(LeaseLost):
        Fence(db, stale).heartbeat(60, steps_completed=99)
    with pytest.raises(LeaseLost), Fence(db, stale).write() as (session, _job):
        session.add(JobMetric(job_id=job["id"], step=1, attempt=1, data={"step": 1}))
    Fence(db, fresh).heartbeat(60, steps_completed=3)
    with db.session() as session:
        row = session.scalars(select(Job).where(Job.id == job["id"])).one()
        assert row.worker_id == "worker-new" and row.attempt == 2 and row.steps_completed == 3
        assert session.scalars(select(JobMetric).where(JobMetric.job_id == job["id"])).all() == []


def test_reconciler_forgets_workers_that_died_without_unregistering(system: System) -> None:
    from service.models import Worker
    from worker.reconciler import reconcile

    db, settings = system.stack.db, system.stack.settings
    now = time.time()
    with db.session() as session:
        for name, beat in (("dead", now - 11 * settings.lease_s), ("alive", now)):
            session.add(
                Worker(
                    id=name,
                    pool="default",
                    hostname="h",
                    gpu_name="cpu",
                    started_at=beat,
                    last_heartbeat_at=beat,
                )
            )
        session.commit()
    reconcile(db, settings)
    with db.session() as session:
        assert set(session.scalars(select(Worker.id))) == {"alive"}
