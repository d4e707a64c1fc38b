"""Pools (issue 11, finding 14): a job may name only a pool that exists, and a pool with no worker
holds one dispatch message in the broker, however many jobs wait and however often the reconciler
runs. Real API processes on SQLite (embedded broker) and PostgreSQL (Redis)."""

from __future__ import annotations

import contextlib
import secrets
import sqlite3
from typing import Any

import redis

from service.dispatch import queue_name
from service.models import Pool
from tests.service.conftest import Stack
from tests.service.helpers import ensure_model, new_file, new_job
from tests.service.test_admin import error_of
from worker.reconciler import redispatch_waiting


def unique_pool() -> str:
    return f"pool-{secrets.token_hex(4)}"


def pending_messages(stack: Stack, pool: str) -> int:
    """Dispatch messages waiting in the pool's queue of the stack's broker."""
    if stack.backend == "postgresql":
        db = int(stack.settings.broker_url.rsplit("/", 1)[1])
        return int(redis.Redis(host="127.0.0.1", port=6379, db=db).llen(queue_name(pool)))
    path = stack.settings.home / "broker.db"
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as conn:
        row = conn.execute(
            "SELECT count(*) FROM kombu_message m JOIN kombu_queue q ON m.queue_id = q.id"
            " WHERE q.name = ? AND m.visible = 1",
            (queue_name(pool),),
        ).fetchone()
    return int(row[0])


def test_a_job_may_name_only_a_pool_that_exists(stack: Stack) -> None:
    client = stack.team()
    file_id = new_file(client)
    pool = unique_pool()
    error = error_of(
        client.post(
            "/v1/fine_tuning/jobs",
            json={"model": ensure_model(stack), "training_file": file_id, "pool": pool},
        ),
        400,
    )
    assert (error["param"], error["code"]) == ("pool", "pool_not_found"), error
    assert pool in error["message"] and "add-pool" in error["message"]
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []  # nothing was made

    admin = stack.team(admin=True)
    declared = admin.post("/v1/admin/pools", json={"name": pool, "description": "8x H200"})
    assert declared.status_code == 200, declared.text
    assert declared.json() | {"created_at": 0} == {
        "id": pool, "object": "pool", "created_at": 0, "declared_by": "admin", "description": "8x H200"
    }  # fmt: skip
    job = new_job(stack, client, file_id, pool=pool)
    assert (job["status"], job["pool"]) == ("queued", pool)

    # A pool in use cannot be forgotten; an unknown one is a 404; bad names are refused by field.
    assert error_of(admin.delete(f"/v1/admin/pools/{pool}"), 409)["param"] == "name"
    assert error_of(admin.delete(f"/v1/admin/pools/{unique_pool()}"), 404)["param"] == "name"
    assert error_of(admin.post("/v1/admin/pools", json={"name": "Not A Pool"}), 400)["param"] == "name"
    assert pool in [p["id"] for p in admin.get("/v1/admin/pools").json()["data"]]
    # A user key cannot declare pools.
    assert client.post("/v1/admin/pools", json={"name": unique_pool()}).status_code == 403


def test_a_worker_declares_the_pool_it_serves(stack: Stack) -> None:
    from service.pools import declare_pool

    pool = unique_pool()
    with stack.db.session() as session:
        declare_pool(session, pool, "worker")  # what WorkerProcess.register does
        declare_pool(session, pool, "worker")  # twice (a restart): still one pool
        session.commit()
        assert session.get(Pool, pool).declared_by == "worker"  # type: ignore[union-attr]
    client = stack.team()
    assert new_job(stack, client, pool=pool)["pool"] == pool


def test_one_pending_dispatch_message_per_pool_with_no_worker(stack: Stack) -> None:
    """The finding: a job in a pool with no worker made the reconciler pile up a message a round."""
    pool = unique_pool()
    admin, client = stack.team(admin=True), stack.team()
    assert admin.post("/v1/admin/pools", json={"name": pool}).status_code == 200
    file_id = new_file(client)
    jobs: list[dict[str, Any]] = [new_job(stack, client, file_id, pool=pool) for _ in range(5)]
    assert pending_messages(stack, pool) == 1, "five jobs, one message"
    assert all(j["status"] == "queued" for j in jobs)

    # Reconciler rounds long after the message was sent: no worker could have taken it, so it is
    # still pending and nothing more is sent.
    later = stack.settings.model_copy(update={"redispatch_after_s": 0.01})
    for _ in range(20):  # (other tests' pools of this shared stack may get theirs)
        assert pool not in redispatch_waiting(stack.db, later)
    assert pending_messages(stack, pool) == 1

    # Once a worker took it (and left the jobs queued: say it was busy), a round sends one again.
    from service.pools import mark_dispatch_taken

    with stack.db.session() as session:
        mark_dispatch_taken(session, pool)
    assert redispatch_waiting(stack.db, later).get(pool) == 1
    assert pool not in redispatch_waiting(stack.db, later)
    assert pending_messages(stack, pool) == 2  # the one "taken" above was never really consumed
