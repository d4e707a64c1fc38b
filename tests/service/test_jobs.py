"""Jobs over HTTP on SQLite and PostgreSQL: create, validate, idempotency, list, cancel, events,
checkpoints, metrics, models."""

from __future__ import annotations

import io
import json
import tarfile
import threading
from typing import Any

import httpx
import pytest

from service.models import Team
from tests.service.conftest import Stack, free_port, start_api
from tests.service.helpers import (
    MODEL,
    add_checkpoint,
    add_metrics,
    ensure_model,
    new_file,
    new_job,
    set_job,
)


def error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return dict(body["error"])


def test_create_in_both_loss_modes_resolves_hyperparameters(stack: Stack) -> None:
    client = stack.team()
    file_id = new_file(client)
    dft = new_job(
        stack,
        client,
        file_id,
        method={
            "type": "dft",
            "dft": {
                "hyperparameters": {
                    "n_epochs": 2,
                    "learning_rate_multiplier": 2.0,
                    "max_seq_length": 512,
                    "lora": {"r": 8},
                }
            },
        },
        suffix="math",
        metadata={"exp": "a"},
        seed=7,
    )
    assert dft["object"] == "fine_tuning.job" and dft["status"] == "queued" and dft["seed"] == 7
    hp = dft["method"]["dft"]["hyperparameters"]
    assert hp["n_epochs"] == 2 and hp["batch_size"] == 8 and hp["learning_rate"] == pytest.approx(1e-4)
    assert hp["max_seq_length"] == 512 and hp["lora"]["r"] == 8 and hp["lora"]["alpha"] == 32
    assert dft["hyperparameters"] == {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 2.0}
    assert dft["user_provided_suffix"] == "math" and dft["metadata"] == {"exp": "a"}
    assert dft["organization_id"] == client.team_id and dft["model"] == MODEL and dft["queue_position"] >= 1
    sft = new_job(stack, client, file_id, method={"type": "supervised"})
    assert (
        sft["method"]["type"] == "supervised"
        and sft["method"]["supervised"]["hyperparameters"]["n_epochs"] == 3
    )
    legacy = new_job(stack, client, file_id, method=None, hyperparameters={"batch_size": 4})
    assert legacy["method"]["type"] == "supervised" and legacy["hyperparameters"]["batch_size"] == 4
    events = client.get(f"/v1/fine_tuning/jobs/{dft['id']}/events").json()["data"]
    assert any("DFT" in e["message"] for e in events) and any(e["message"].endswith("queued") for e in events)


# Bad values, another team's or a deleted file, malformed bodies: tests/service/test_bad_requests.py.


def test_idempotency_key(stack: Stack) -> None:
    client = stack.team()
    body = {"model": ensure_model(stack), "training_file": new_file(client), "method": {"type": "dft"}}
    first = client.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "retry-1"})
    again = client.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "retry-1"})
    assert first.status_code == again.status_code == 200 and first.json()["id"] == again.json()["id"]
    other = client.post(
        "/v1/fine_tuning/jobs", json={**body, "seed": 3}, headers={"Idempotency-Key": "retry-1"}
    )
    assert other.status_code == 409 and error(other)["code"] == "idempotency_key_reused"
    # another team may use the same key for its own job
    team_b = stack.team()
    body_b = {**body, "training_file": new_file(team_b)}
    assert (
        team_b.post("/v1/fine_tuning/jobs", json=body_b, headers={"Idempotency-Key": "retry-1"}).status_code
        == 200
    )
    assert len(client.get("/v1/fine_tuning/jobs").json()["data"]) == 1


def test_queued_jobs_quota_is_429(stack: Stack) -> None:
    client = stack.team()
    with stack.db.session() as session:
        session.get(Team, client.team_id).max_queued_jobs = 2  # type: ignore[union-attr]
        session.commit()
    file_id = new_file(client)
    new_job(stack, client, file_id)
    new_job(stack, client, file_id)
    response = client.post("/v1/fine_tuning/jobs", json={"model": MODEL, "training_file": file_id})
    assert response.status_code == 429 and error(response)["code"] == "quota_exceeded"
    assert len(client.get("/v1/fine_tuning/jobs").json()["data"]) == 2


def test_pagination_250_jobs_each_once_in_order(stack: Stack) -> None:
    client = stack.team()
    with stack.db.session() as session:
        session.get(Team, client.team_id).max_queued_jobs = 1000  # type: ignore[union-attr]
        session.commit()
    file_id = new_file(client)
    created = [
        new_job(stack, client, file_id, metadata={"i": str(i), "even": str(i % 2 == 0)})["id"]
        for i in range(250)
    ]
    seen: list[str] = []
    after = None
    pages = []
    while True:
        params: dict[str, Any] = {"limit": 100, **({"after": after} if after else {})}
        page = client.get("/v1/fine_tuning/jobs", params=params).json()
        seen += [j["id"] for j in page["data"]]
        pages.append((len(page["data"]), page["has_more"]))
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert pages == [(100, True), (100, True), (50, False)]
    assert seen == list(reversed(created))  # newest first, each exactly once
    evens = client.get("/v1/fine_tuning/jobs", params={"limit": 100, "metadata[even]": "True"}).json()
    assert len(evens["data"]) == 100 and evens["has_more"] is True
    assert all(j["metadata"]["even"] == "True" for j in evens["data"])
    set_job(stack, created[0], status="cancelled")
    cancelled = client.get("/v1/fine_tuning/jobs", params={"status": "cancelled"}).json()["data"]
    assert [j["id"] for j in cancelled] == [created[0]]
    bad = client.get("/v1/fine_tuning/jobs", params={"after": "ftjob-unknown"})
    assert bad.status_code == 400 and error(bad)["param"] == "after"
    assert client.get("/v1/fine_tuning/jobs", params={"limit": 101}).status_code == 400


def test_cancel_queued_running_and_finished(stack: Stack) -> None:
    client = stack.team()
    queued = new_job(stack, client)
    response = client.post(f"/v1/fine_tuning/jobs/{queued['id']}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    again = client.post(f"/v1/fine_tuning/jobs/{queued['id']}/cancel")
    assert again.status_code == 409 and error(again)["code"] == "job_finished"
    running = new_job(stack, client)
    set_job(stack, running["id"], status="running", attempt=1)
    response = client.post(f"/v1/fine_tuning/jobs/{running['id']}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "running" and response.json()["cancel_requested"] is True
    messages = [
        e["message"] for e in client.get(f"/v1/fine_tuning/jobs/{running['id']}/events").json()["data"]
    ]
    assert any("Cancellation requested" in m for m in messages)


def test_queue_position_follows_priority_then_age(stack: Stack) -> None:
    client = stack.team()
    pool = stack.declare_pool(f"p{free_port()}")
    stack.declare_pool(f"{pool}-b")
    file_id = new_file(client)
    first = new_job(stack, client, file_id, pool=pool)
    second = new_job(stack, client, file_id, pool=pool)
    urgent = new_job(stack, client, file_id, pool=pool, priority=10)
    positions = {
        j["id"]: client.get(f"/v1/fine_tuning/jobs/{j['id']}").json()["queue_position"]
        for j in (first, second, urgent)
    }
    assert positions == {urgent["id"]: 1, first["id"]: 2, second["id"]: 3}
    # A list ranks its queued jobs per pool in one query: the same positions, pool by pool.
    elsewhere = new_job(stack, client, file_id, pool=f"{pool}-b")
    started = new_job(stack, client, file_id, pool=pool)
    set_job(stack, started["id"], status="running")
    listed = {j["id"]: j["queue_position"] for j in client.get("/v1/fine_tuning/jobs").json()["data"]}
    assert listed == {**positions, elsewhere["id"]: 1, started["id"]: None}


def test_every_read_path_gives_the_same_job_object(stack: Stack) -> None:
    """Create (ORM), list (Core rows) and retrieve (compiled once, run on the driver) build the job
    object three ways: JSON columns, booleans, nulls and the queue position must come out alike."""
    client = stack.team()
    queued = new_job(stack, client, metadata={"k": "v"}, suffix="same")
    assert client.get(f"/v1/fine_tuning/jobs/{queued['id']}").json() == queued
    listed = client.get("/v1/fine_tuning/jobs").json()["data"]
    assert [j for j in listed if j["id"] == queued["id"]] == [queued]

    failed = new_job(stack, client)
    error = {"code": "invalid_training_file", "message": "Line 3: bad role", "param": "training_file"}
    done = {"status": "failed", "error": error, "result_files": ["file-x"], "cancel_requested": True}
    set_job(stack, failed["id"], **done, steps_completed=7, total_steps=9, tokens_per_sec=12.5)
    retrieved = client.get(f"/v1/fine_tuning/jobs/{failed['id']}").json()
    assert retrieved["error"] == error and retrieved["result_files"] == ["file-x"]
    assert retrieved["cancel_requested"] is True and retrieved["queue_position"] is None
    progress = {"steps_completed": 7, "total_steps": 9, "trained_tokens": None, "tokens_per_sec": 12.5}
    assert retrieved["progress"] == progress
    assert retrieved["method"] == failed["method"] and retrieved["metadata"] is None
    listed = client.get("/v1/fine_tuning/jobs").json()["data"]
    assert [j for j in listed if j["id"] == failed["id"]] == [retrieved]


def test_events_pagination_and_live_stream(stack: Stack) -> None:
    client = stack.team()
    job = new_job(stack, client)
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 1}).json()
    assert len(events["data"]) == 1 and events["has_more"] is True
    rest = client.get(
        f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 100, "after": events["data"][0]["id"]}
    ).json()
    assert rest["has_more"] is False and len(rest["data"]) >= 1

    received: list[str] = []

    def follow() -> None:
        with client.stream("GET", f"/v1/fine_tuning/jobs/{job['id']}/events", params={"stream": "true"}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            received.extend(r.iter_lines())

    reader = threading.Thread(target=follow)
    reader.start()
    threading.Event().wait(1.0)
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 200
    reader.join(30)
    assert not reader.is_alive(), "the stream did not end when the job ended"
    data = [json.loads(line[6:]) for line in received if line.startswith("data: ")]
    messages = [d.get("message") for d in data]
    assert messages[0].startswith("Created fine-tuning job") and "Job cancelled" in messages
    assert "event: end" in received


def test_checkpoints_and_their_content_as_tar(stack: Stack) -> None:
    client = stack.team()
    job = new_job(stack, client)
    files = {
        "config.json": b'{"a": 1}',
        "model.safetensors": bytes(range(256)) * 5000,
        "sub/tokenizer.json": b"{}",
    }
    ckpt_1 = add_checkpoint(stack, job["id"], 10, {**files, "trainer_state.pt": b"optimizer"})
    ckpt_2 = add_checkpoint(stack, job["id"], 20, files)
    listed = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()
    assert [c["id"] for c in listed["data"]] == [ckpt_2, ckpt_1] and listed["has_more"] is False
    first = listed["data"][1]
    assert first["object"] == "fine_tuning.job.checkpoint" and first["step_number"] == 10
    assert first["fine_tuning_job_id"] == job["id"] and first["metrics"]["train_loss"] == 0.5
    response = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints/{ckpt_1}/content")
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-tar"
    assert int(response.headers["content-length"]) == len(response.content)
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        names = {m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    assert names == files  # without trainer_state.pt: the optimizer state stays on the server
    missing = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints/ftckpt-nope/content")
    assert missing.status_code == 404 and error(missing)["param"] == "checkpoint_id"


def test_metrics_time_series(stack: Stack) -> None:
    client = stack.team()
    job = new_job(stack, client)
    add_metrics(stack, job["id"], 25)
    page = client.get(f"/v1/fine_tuning/jobs/{job['id']}/metrics", params={"limit": 10}).json()
    assert [r["step"] for r in page["data"]] == list(range(1, 11)) and page["has_more"] is True
    rest = client.get(f"/v1/fine_tuning/jobs/{job['id']}/metrics", params={"after_step": 10}).json()
    assert [r["step"] for r in rest["data"]] == list(range(11, 26)) and rest["data"][0]["data"][
        "loss"
    ] == 1 / 11


def test_models_list_base_and_own_fine_tuned(stack: Stack) -> None:
    a, b = stack.team(), stack.team()
    job = new_job(stack, a)
    name = f"ft:{MODEL}:{a.name}:math:{job['id']}"
    add_checkpoint(stack, job["id"], 5, {"config.json": b"{}"})
    set_job(stack, job["id"], status="succeeded", fine_tuned_model=name, finished_at=1)
    ids_a = [m["id"] for m in a.get("/v1/models").json()["data"]]
    ids_b = [m["id"] for m in b.get("/v1/models").json()["data"]]
    assert MODEL in ids_a and name in ids_a and MODEL in ids_b and name not in ids_b
    assert a.get(f"/v1/models/{name}").json()["owned_by"] == a.team_id
    assert b.get(f"/v1/models/{name}").status_code == 404
    follow_up = a.post("/v1/fine_tuning/jobs", json={"model": name, "training_file": new_file(a)})
    assert follow_up.status_code == 200, follow_up.text
    refused = b.post("/v1/fine_tuning/jobs", json={"model": name, "training_file": new_file(b)})
    assert refused.status_code == 400 and error(refused)["param"] == "model"


def test_broker_down_keeps_the_job_queued_and_readyz_says_so(stack: Stack, tmp_path: Any) -> None:
    """A second API process on the same database whose broker is unreachable."""
    import os
    import signal

    env = {**stack.env, "TUNEPOOL_BROKER_URL": "redis://127.0.0.1:1/0", "TUNEPOOL_BROKER_TIMEOUT_S": "0.5"}
    port = free_port()
    proc = start_api(env, port, tmp_path / "api.log")
    try:
        client = stack.team()
        down = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {client.key}"}
        )
        # A pool of its own: with a dispatch message already pending for a pool, a new job of that
        # pool needs none, and the broker is not asked (service/pools.py).
        pool = stack.declare_pool(f"down-{port}")
        job = down.post(
            "/v1/fine_tuning/jobs",
            json={"model": ensure_model(stack), "training_file": new_file(client), "pool": pool},
        )
        assert job.status_code == 200 and job.json()["status"] == "queued"
        events = down.get(f"/v1/fine_tuning/jobs/{job.json()['id']}/events").json()["data"]
        assert any("unreachable" in e["message"] and e["level"] == "warn" for e in events)
        ready = down.get("/readyz")
        assert ready.status_code == 503 and "broker" in error(ready)["message"]
        assert httpx.get(f"{stack.url}/readyz").status_code == 200
        down.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def test_gpus_is_shown_and_bounded_by_the_pools_largest_worker(stack: Stack) -> None:
    """`gpus` (extension): the GPUs of one node a job trains on; never more than a worker of its
    pool owns, once one has registered."""
    import time

    from service.models import Worker

    client = stack.team()
    file_id = new_file(client)
    pool = stack.declare_pool(f"gpus-{time.monotonic_ns()}")
    assert new_job(stack, client, file_id, pool=pool)["gpus"] == 1
    assert new_job(stack, client, file_id, pool=pool, gpus=16)["gpus"] == 16  # no worker yet: it waits
    now = time.time()
    with stack.db.session() as session:
        for n, slots in enumerate((2, 4)):
            session.add(
                Worker(id=f"node{n}:{pool}", pool=pool, hostname=f"node{n}", gpu_name="cpu", slots=slots,
                       started_at=now, last_heartbeat_at=now)
            )  # fmt: skip
        session.commit()
    job = new_job(stack, client, file_id, pool=pool, gpus=4)
    assert job["gpus"] == 4
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["gpus"] == 4
    body = {"model": ensure_model(stack), "training_file": file_id, "pool": pool}
    too_many = error(client.post("/v1/fine_tuning/jobs", json={**body, "gpus": 5}))
    assert too_many["param"] == "gpus" and "largest worker" in too_many["message"], too_many
    for bad in (0, -1, 65, True, 1.5, "two"):
        refused = client.post("/v1/fine_tuning/jobs", json={**body, "gpus": bad})
        assert refused.status_code == 400 and error(refused)["param"] == "gpus", (bad, refused.text)
