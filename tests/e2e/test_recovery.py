"""What a lost message, a restarted broker or a dead API leave behind is put right: the database is
the source of truth, and the reconciler re-sends dispatch messages for jobs left waiting. Also the
worker registry: a worker is listed while it runs and unlisted when it stops cleanly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import redis
from sqlalchemy import select

from service.dispatch import queue_name
from service.models import Job, Worker
from tests.e2e.conftest import E2E_REDIS_DB, System
from tests.service.conftest import TeamClient, free_port, start_api

ONE_STEP = {"max_steps": 1}
QUEUE = queue_name("default")
REDIS_SERVER = [
    "redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379",
    "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis", "--logfile", "/var/log/redis/ci.log",
]  # fmt: skip


def redis_up() -> bool:
    try:
        return bool(redis.Redis(host="127.0.0.1", port=6379, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def wait_for(condition: object, timeout: float, what: str) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@contextmanager
def redis_restarted_empty() -> Iterator[None]:
    """Shut Redis down without saving and start it again (it keeps nothing on disk): every queued
    message is gone. Redis runs again afterwards, whatever happens: other tests need it."""
    try:
        subprocess.run(["redis-cli", "shutdown", "nosave"], capture_output=True, timeout=10)
        wait_for(lambda: not redis_up(), 10, "Redis to stop")
        subprocess.run(REDIS_SERVER, check=True, capture_output=True, timeout=10)
        wait_for(redis_up, 10, "Redis to start")
        yield
    finally:
        if not redis_up():
            subprocess.run(REDIS_SERVER, capture_output=True, timeout=10)
            wait_for(redis_up, 10, "Redis to start")


def pending_messages(system: System) -> int:
    """Dispatch messages waiting in the pool's queue of this stack's broker."""
    if system.stack.backend == "postgresql":
        return int(redis.Redis(host="127.0.0.1", port=6379, db=E2E_REDIS_DB).llen(QUEUE))
    path = system.home / "broker.db"
    if not path.exists():  # nothing was ever sent
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as conn:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'kombu_message'").fetchone() is None:
            return 0
        row = conn.execute(
            "SELECT count(*) FROM kombu_message m JOIN kombu_queue q ON m.queue_id = q.id"
            " WHERE q.name = ? AND m.visible = 1",
            (QUEUE,),
        ).fetchone()
    return int(row[0])


def drop_sqlite_messages(system: System) -> None:
    """The embedded broker loses every message (its database file survives: the API has it open)."""
    with contextlib.closing(sqlite3.connect(system.home / "broker.db", timeout=30)) as conn:
        conn.execute("DELETE FROM kombu_message")
        conn.commit()


def dispatched_at(system: System, job_ids: list[str]) -> dict[str, float | None]:
    with system.stack.db.session() as session:
        rows = session.execute(select(Job.id, Job.dispatched_at).where(Job.id.in_(job_ids))).all()
    return {job_id: at for job_id, at in rows}


def test_no_job_is_lost_when_the_broker_loses_its_messages(system: System) -> None:
    client = system.team()
    file_id = system.new_file(client, n=4)
    jobs = [system.submit(client, file_id, hyperparameters=ONE_STEP)["id"] for _ in range(2)]
    first_sent = dispatched_at(system, jobs)
    assert all(first_sent.values()), f"the API dispatched each job: {first_sent}"

    if system.stack.backend == "postgresql":
        with redis_restarted_empty():
            assert pending_messages(system) == 0
            # The API's connection died with the old server: its next job still gets dispatched.
            jobs.append(system.submit(client, file_id, hyperparameters=ONE_STEP)["id"])
            assert dispatched_at(system, jobs[-1:])[jobs[-1]], system.events(client, jobs[-1])
            redis.Redis(host="127.0.0.1", port=6379, db=E2E_REDIS_DB).flushdb()  # and lose that one too
    else:
        drop_sqlite_messages(system)
    assert pending_messages(system) == 0, "the broker kept messages: nothing was lost"

    system.start_worker()
    for job_id in jobs:
        done = system.wait(client, job_id, timeout=180)
        assert done["status"] == "succeeded", (done, system.events(client, job_id), system.worker_logs())
    log = (system.home / "worker-0.log").read_text(errors="replace")
    assert "dispatch messages sent" in log, "the reconciler re-sent the lost messages"
    resent = dispatched_at(system, jobs)
    assert all((resent[j] or 0) > (first_sent.get(j) or 0) for j in jobs[:2]), (first_sent, resent)
    assert redis_up()


def test_a_job_committed_by_an_api_that_died_before_dispatching_still_runs(system: System) -> None:
    client = system.team()
    file_id = system.new_file(client, n=4)
    # A second API whose broker cannot be reached: the job commits, the dispatch message never leaves.
    port = free_port()
    env = {**system.stack.env, "TUNEPOOL_BROKER_URL": "redis://127.0.0.1:1/0"}
    api = start_api(env, port, system.home / "api-no-broker.log")
    try:
        http = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {client.key}"}, timeout=60
        )
        with http:
            orphan = TeamClient(http, client.key, client.team_id, client.name)
            job = system.submit(orphan, file_id, hyperparameters=ONE_STEP)
    finally:
        os.killpg(api.pid, signal.SIGKILL)  # and then that API dies
        api.wait(10)
    assert job["status"] == "queued"
    assert dispatched_at(system, [job["id"]]) == {job["id"]: None}
    assert any("queue is unreachable" in e for e in system.events(client, job["id"]))

    system.start_worker()
    done = system.wait(client, job["id"], timeout=180)
    assert done["status"] == "succeeded", (done, system.events(client, job["id"]), system.worker_logs())
    assert dispatched_at(system, [job["id"]])[job["id"]] is not None


def test_a_worker_is_registered_while_it_runs_and_unregistered_after_sigterm(system: System) -> None:
    proc = system.start_worker()

    def row() -> Worker | None:
        with system.stack.db.session() as session:
            return session.scalars(select(Worker).where(Worker.id.endswith(f":{proc.pid}"))).first()

    wait_for(lambda: row() is not None, 60, "the worker to register")
    first = row()
    assert first is not None
    assert first.id == f"{socket.gethostname()}:default:cpu:{proc.pid}"
    assert (first.pool, first.hostname, first.gpu_name) == ("default", socket.gethostname(), "cpu")
    assert first.gpu_memory_bytes is None and first.current_job_id is None
    assert abs(time.time() - first.last_heartbeat_at) < 5
    # The heartbeat goes on (every heartbeat_s, 1 s here).
    wait_for(lambda: (r := row()) is not None and r.last_heartbeat_at > first.last_heartbeat_at, 10, "a beat")

    # Celery installs its SIGTERM handler after the worker registers: wait until it consumes.
    log = system.home / "worker-0.log"
    wait_for(lambda: " ready." in log.read_text(errors="replace"), 60, "Celery to be ready")
    os.kill(proc.pid, signal.SIGTERM)  # what a supervisor sends: to the worker process only
    assert proc.wait(60) == 0, system.worker_logs()
    assert row() is None, "the worker left its row in the registry"
    with system.stack.db.session() as session:
        assert session.scalars(select(Worker)).all() == []
