"""Pause, resume and preemption through real processes (API, CPU-slot workers, tiny models):

- pause with the official `openai` SDK: a running job checkpoints the step it is at, becomes
  `paused` and frees its slot; `resume` puts it back and it finishes with the weights of a run
  never paused; pause of a finished job is a 409; a paused job can be cancelled;
- fair-share preemption: team A fills the pool, team B's job waits TUNEPOOL_PREEMPT_AFTER_S, one
  A job checkpoints and returns to `queued` with the event, B runs, and A's job then ends with
  exactly its steps, one metrics row per step and the weights of an uninterrupted run;
- a priority preempts only its own team's lower-priority jobs, never another team's;
- a victim whose worker is SIGKILLed while it stops resumes from its last good checkpoint.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest
import torch
from openai.types.fine_tuning import FineTuningJob
from safetensors.torch import load_file
from sqlalchemy import select

from service.models import Job, TeamUsage, Worker
from tests.e2e.conftest import System
from tests.e2e.test_cancel import all_events, checkpoints, training_children
from tests.service.conftest import TeamClient
from worker.child import STOP_FILE

# Steps of a few tens of ms on the tiny model: long enough to act on mid-run, short to finish.
LONG = {"n_epochs": 4, "batch_size": 1, "checkpoint_every": 1000}  # 4 x 48 = 192 steps on 48 examples
PREEMPT_NOW = {"TUNEPOOL_PREEMPT_AFTER_S": "1", "TUNEPOOL_PREEMPT_MIN_RUNTIME_S": "0"}


def used_an_hour(system: System, team: TeamClient) -> None:
    """The team has run one GPU for the last hour in the pool: on a one-slot pool, a swap between two
    teams goes against the one that used it more lately."""
    with system.stack.db.session() as session:
        session.add(TeamUsage(team_id=team.team_id, pool="default", gpu_seconds=3600.0, as_of=time.time()))
        session.commit()


def final_weights(system: System, job_id: str) -> dict[str, torch.Tensor]:
    root = system.stack.settings.artifacts / "jobs" / job_id / "output" / "checkpoints"
    found = sorted(root.glob("step-*"))
    return load_file(str(found[-1] / "model.safetensors"))


def assert_same_weights(system: System, job_id: str, reference_id: str) -> None:
    mine, theirs = final_weights(system, job_id), final_weights(system, reference_id)
    assert mine.keys() == theirs.keys() and mine
    for name, value in theirs.items():
        torch.testing.assert_close(mine[name], value, rtol=1e-5, atol=1e-6, msg=name)


def wait_for(predicate: Any, timeout: float = 120, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def frozen(job_id: str) -> Iterator[Path]:
    """The job's trainer stopped (SIGSTOP) until the block ends: a stop request then finds it
    mid-run however fast the machine steps (a fast CI machine finished 192 steps of the victim
    before the preemption reached it). Yields the run directory, where the STOP file appears."""
    procs = wait_for(lambda: training_children(job_id), what="the trainer")
    run_dir = Path(next(arg for arg in procs[0].cmdline() if job_id in arg))
    for proc in procs:
        proc.suspend()
    try:
        yield run_dir
    finally:
        for proc in procs:
            with contextlib.suppress(psutil.Error):  # gone: killed, or ended
                proc.resume()


def steps_done(client: TeamClient, job_id: str) -> int:
    return int(client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["progress"]["steps_completed"])


def metrics_steps(client: TeamClient, job_id: str) -> list[int]:
    rows = client.get(f"/v1/fine_tuning/jobs/{job_id}/metrics", params={"limit": 1000}).json()["data"]
    return [int(r["step"]) for r in rows]


@pytest.mark.parametrize("system", ["sqlite"], indirect=True)
def test_pause_and_resume_with_the_openai_sdk(system: System) -> None:
    team = system.team()
    sdk = openai.OpenAI(base_url=f"{system.stack.url}/v1", api_key=team.key, max_retries=0)
    file_id = system.new_file(team, n=48)
    system.start_worker()
    job = system.submit(team, file_id, hyperparameters=LONG, seed=11)
    wait_for(lambda: steps_done(team, job["id"]) >= 5, what="a few steps")

    with frozen(job["id"]) as run_dir:
        asked = sdk.fine_tuning.jobs.pause(job["id"])
        assert isinstance(asked, FineTuningJob) and asked.status == "running"
        assert asked.model_extra and asked.model_extra["pause_requested"] is True
        wait_for(lambda: (run_dir / STOP_FILE).exists(), what="the STOP file of the pause")
    paused = system.wait(team, job["id"], {"paused"})
    at = paused["progress"]["steps_completed"]
    assert 5 <= at < 192, paused
    # the checkpoint of the step it paused at (none was scheduled before step 1000), its slot free
    assert [c["step_number"] for c in checkpoints(team, job["id"])] == [at]

    def slot_free() -> bool:
        with system.stack.db.session() as session:
            return session.scalar(select(Worker.free_slots)) == 1

    wait_for(slot_free, what="the worker's slot to free")
    events = all_events(team, job["id"])
    assert f"Job paused at step {at}: its GPUs are free; it resumes from step {at} when resumed" in events
    assert sdk.fine_tuning.jobs.retrieve(job["id"]).status == "paused"

    resumed = sdk.fine_tuning.jobs.resume(job["id"])
    assert resumed.status == "queued"
    done = system.wait(team, job["id"])
    assert done["status"] == "succeeded", (all_events(team, job["id"]), system.worker_logs())
    assert metrics_steps(team, job["id"]) == list(range(1, 193))  # one row per step, none twice
    with pytest.raises(openai.ConflictError):
        sdk.fine_tuning.jobs.pause(job["id"])  # finished: 409
    with pytest.raises(openai.ConflictError):
        sdk.fine_tuning.jobs.resume(job["id"])

    reference = system.submit(team, file_id, hyperparameters=LONG, seed=11)
    assert system.wait(team, reference["id"])["status"] == "succeeded"
    assert_same_weights(system, job["id"], reference["id"])

    # A queued job is held at once; a paused job can be cancelled.
    held = system.submit(team, file_id, hyperparameters=LONG)
    blocker = system.submit(team, file_id, hyperparameters=LONG, priority=50)
    system.wait(team, blocker["id"], {"running"})
    assert sdk.fine_tuning.jobs.pause(held["id"]).status == "paused"
    assert sdk.fine_tuning.jobs.cancel(held["id"]).status == "cancelled"
    assert team.post(f"/v1/fine_tuning/jobs/{blocker['id']}/cancel").status_code == 200
    assert system.wait(team, blocker["id"])["status"] == "cancelled"


@pytest.mark.parametrize("system", ["sqlite"], indirect=True)  # PostgreSQL: the SIGKILL test below
def test_fair_share_preemption_checkpoints_the_victim_which_resumes_exactly(system: System) -> None:
    a, b = system.team(), system.team()
    used_an_hour(system, a)
    a_file = system.new_file(a, n=48)
    system.start_worker(env=PREEMPT_NOW)
    victim = system.submit(a, a_file, hyperparameters=LONG, seed=5)
    wait_for(lambda: steps_done(a, victim["id"]) >= 3, what="the victim's first steps")
    with frozen(victim["id"]) as run_dir:
        claimant = system.submit(b, system.new_file(b, n=8), hyperparameters={"max_steps": 2})
        wait_for(lambda: (run_dir / STOP_FILE).exists(), what="the STOP file of the preemption")

    requeued = system.wait(a, victim["id"], {"queued", "succeeded", "failed", "cancelled"})
    assert requeued["status"] == "queued", requeued
    at = requeued["progress"]["steps_completed"]
    assert [c["step_number"] for c in checkpoints(a, victim["id"])] == [at]
    events = all_events(a, victim["id"])
    preempted = [e for e in events if e.startswith(f"Preempted by {claimant['id']} for fair share")]
    assert len(preempted) == 2, events  # asked, then done
    assert preempted[-1].endswith(f"; resumes from step {at}"), preempted
    assert system.wait(b, claimant["id"])["status"] == "succeeded", system.worker_logs()

    done = system.wait(a, victim["id"])
    assert done["status"] == "succeeded", (all_events(a, victim["id"]), system.worker_logs())
    assert done["preemptions"] == 1 and done["progress"]["steps_completed"] == 192
    assert metrics_steps(a, victim["id"]) == list(range(1, 193))
    reference = system.submit(a, a_file, hyperparameters=LONG, seed=5)
    assert system.wait(a, reference["id"])["status"] == "succeeded"
    assert_same_weights(system, victim["id"], reference["id"])


@pytest.mark.parametrize("system", ["sqlite"], indirect=True)
def test_priority_preempts_only_its_own_teams_jobs(system: System) -> None:
    a, b = system.team(), system.team()
    a_file, b_file = system.new_file(a, n=48), system.new_file(b, n=8)
    system.start_worker(env={**PREEMPT_NOW, "TUNEPOOL_FAIRSHARE_PREEMPT": "false"})
    low = system.submit(a, a_file, hyperparameters={**LONG, "n_epochs": 40})
    system.wait(a, low["id"], {"running"})
    other = system.submit(b, b_file, hyperparameters={"max_steps": 2}, priority=100)
    reason = wait_for(
        lambda: a_or_none(b.get(f"/v1/fine_tuning/jobs/{other['id']}").json().get("queue_reason")),
        what="the waiting job's reason",
    )
    assert "waiting for 1 GPU on one node of pool default (most free on a node: 0)" in reason, reason
    time.sleep(3)  # several reconciler rounds: team B's priority does not preempt team A
    assert b.get(f"/v1/fine_tuning/jobs/{other['id']}").json()["status"] == "queued"
    assert a.get(f"/v1/fine_tuning/jobs/{low['id']}").json()["status"] == "running"

    with frozen(low["id"]) as run_dir:  # still mid-run when the preemption reaches it
        urgent = system.submit(a, a_file, hyperparameters={"max_steps": 2}, priority=100)
        wait_for(lambda: (run_dir / STOP_FILE).exists(), what="the STOP file of the preemption")
    assert system.wait(a, urgent["id"])["status"] == "succeeded", system.worker_logs()
    events = all_events(a, low["id"])
    assert any(e.startswith(f"Preempted by {urgent['id']} (priority 100) of the same team") for e in events)
    # the slot then goes by fair share: team B (nothing running) before team A's preempted job
    wait_for(
        lambda: b.get(f"/v1/fine_tuning/jobs/{other['id']}").json()["status"] in {"running", "succeeded"},
        what="team B's job to start",
    )
    assert a.get(f"/v1/fine_tuning/jobs/{low['id']}").json()["status"] == "queued"
    assert a.post(f"/v1/fine_tuning/jobs/{low['id']}/cancel").status_code == 200
    assert system.wait(a, low["id"])["status"] == "cancelled"
    assert system.wait(b, other["id"])["status"] == "succeeded"


def a_or_none(value: Any) -> Any:
    return value or None


@pytest.mark.parametrize("system", ["postgresql"], indirect=True)
def test_a_victim_killed_while_it_stops_resumes_from_its_last_good_checkpoint(system: System) -> None:
    a, b = system.team(), system.team()
    used_an_hour(system, a)
    a_file = system.new_file(a, n=48)
    first = system.start_worker(env=PREEMPT_NOW)
    hp = {**LONG, "checkpoint_every": 4}
    victim = system.submit(a, a_file, hyperparameters=hp, seed=3)
    wait_for(lambda: checkpoints(a, victim["id"]), what="a first checkpoint")

    def asked() -> bool:
        with system.stack.db.session() as session:
            return session.scalar(select(Job.stop_request).where(Job.id == victim["id"])) == "preempt"

    with frozen(victim["id"]):  # mid-run when the preemption is asked, however fast the steps
        claimant = system.submit(b, system.new_file(b, n=8), hyperparameters={"max_steps": 2})
        wait_for(asked, what="the preemption to be asked")
        system.kill_worker(first, signal.SIGKILL)  # the worker and its trainer, mid-stop
    last_good = max(c["step_number"] for c in checkpoints(a, victim["id"]))
    system.start_worker(env=PREEMPT_NOW)
    assert system.wait(b, claimant["id"])["status"] == "succeeded", system.worker_logs()
    done = system.wait(a, victim["id"])
    assert done["status"] == "succeeded", (all_events(a, victim["id"]), system.worker_logs())
    events = all_events(a, victim["id"])
    lost = [e for e in events if "while it stopped" in e]
    assert len(lost) == 1 and lost[0].startswith(f"Preempted by {claimant['id']}"), events
    # the last checkpoint registered when the worker died (the trainer may have finished one more)
    assert int(lost[0].rsplit("resumes from checkpoint step ", 1)[1]) >= last_good, lost
    assert metrics_steps(a, victim["id"]) == list(range(1, 193))
    reference = system.submit(a, a_file, hyperparameters=hp, seed=3)
    assert system.wait(a, reference["id"])["status"] == "succeeded"
    assert_same_weights(system, victim["id"], reference["id"])
