"""Jobs on K GPUs of one node, through the whole system (CPU slots stand in for GPUs here):

- a 2-GPU job on a 2-slot worker trains as 2 torchrun processes (gloo), rank 0's metrics, events
  and checkpoints reach the API, and it ends with the weights of the same job on 1 GPU;
- a worker runs jobs side by side in its slots; a job gets all its K slots on one node at once or
  none: with one slot busy a 2-GPU job waits while a 1-GPU job starts, and two 1-slot workers
  never share one 2-GPU job.
"""

from __future__ import annotations

import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.e2e.conftest import System
from tests.service.conftest import TeamClient

HP = {"checkpoint_every": 2, "max_steps": 4, "batch_size": 4}


def final_weights(system: System, job_id: str) -> dict[str, torch.Tensor]:
    checkpoints = system.stack.settings.artifacts / "jobs" / job_id / "output" / "checkpoints"
    last = sorted(checkpoints.glob("step-*"))[-1]
    return load_file(str(last / "model.safetensors"))


def status(client: TeamClient, job_id: str) -> str:
    return str(client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"])


@pytest.mark.parametrize("system", ["sqlite"], indirect=True)
def test_a_two_gpu_job_trains_as_two_processes_to_the_weights_of_one(system: System) -> None:
    client = system.team(name="acme")
    file_id = system.new_file(client, n=16)
    system.start_worker(slots=2)
    pair = system.submit(client, file_id, hyperparameters=HP, seed=7, gpus=2)
    assert pair["gpus"] == 2
    done = system.wait(client, pair["id"])
    events = system.events(client, pair["id"])
    assert done["status"] == "succeeded", (done, events, system.worker_logs())
    assert any("training on 2 cpu processes (fsdp)" in e for e in events), events
    assert sum("saved checkpoint step-000002" in e for e in events) == 1  # one writer
    metrics = client.get(f"/v1/fine_tuning/jobs/{pair['id']}/metrics").json()["data"]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    checkpoints = client.get(f"/v1/fine_tuning/jobs/{pair['id']}/checkpoints").json()["data"]
    assert [c["step_number"] for c in checkpoints] == [4, 2]
    log = (system.stack.settings.artifacts / "jobs" / pair["id"] / "attempt-1.log").read_text()
    assert log.count("run completed: 4/4 steps") == 2, log[-3000:]  # each of the two ranks finished

    single = system.submit(client, file_id, hyperparameters=HP, seed=7)
    assert system.wait(client, single["id"])["status"] == "succeeded"
    two, one = final_weights(system, pair["id"]), final_weights(system, single["id"])
    assert two.keys() == one.keys() and one
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("system", ["postgresql"], indirect=True)  # SQLite claims: test_scheduling
def test_a_job_gets_all_its_slots_on_one_node_or_waits(system: System) -> None:
    a, b, c = system.team(), system.team(), system.team()
    long_hp = {"n_epochs": 50, "batch_size": 1, "checkpoint_every": 1000}  # 3,200 steps: cancelled
    # Two 1-slot workers: a 2-GPU job (submitted before they register) never starts on the two.
    spanning = system.submit(b, system.new_file(b, n=4), gpus=2)
    first, second = system.start_worker(), system.start_worker()
    runner = system.submit(a, system.new_file(a, n=64), hyperparameters=long_hp)
    system.wait(a, runner["id"], {"running"})
    small = system.submit(c, system.new_file(c, n=4))
    assert system.wait(c, small["id"])["status"] == "succeeded"  # on the other worker's one slot
    assert status(b, spanning["id"]) == "queued"
    assert b.post(f"/v1/fine_tuning/jobs/{spanning['id']}/cancel").status_code == 200
    for proc in (first, second):
        system.kill_worker(proc, signal.SIGTERM)
        proc.wait(60)

    # One 2-slot worker with one slot busy: a 2-GPU job waits while a 1-GPU job starts beside the
    # running one; once both end, the 2-GPU job gets the two slots.
    system.start_worker(slots=2)
    system.wait(a, runner["id"], {"running"})  # handed back at the shutdown, running again here
    gang = system.submit(b, system.new_file(b, n=4), gpus=2)
    later = system.submit(c, system.new_file(c, n=64), hyperparameters=long_hp)
    system.wait(c, later["id"], {"running"})  # side by side with the runner
    assert status(a, runner["id"]) == "running"
    time.sleep(3)  # a few claim rounds (heartbeat 1 s, redispatch 3 s)
    assert status(b, gang["id"]) == "queued"
    for team, job in ((a, runner), (c, later)):
        assert team.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 200
    assert system.wait(b, gang["id"])["status"] == "succeeded", system.worker_logs()
    events = system.events(b, gang["id"])
    assert any("training on 2 cpu processes" in e for e in events), events
