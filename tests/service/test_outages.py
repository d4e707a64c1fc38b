"""The database goes away or stays locked: requests answer 503 with Retry-After on the same connection,
and everything answers again when it is back, without restarting the API (service/outages.py, db.py).

The PostgreSQL outage stops a private cluster (initdb in a temporary directory, its own port), never the
machine's shared server."""

from __future__ import annotations

import glob
import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import update

from service.models import File
from tests.service.conftest import Stack, free_port, running_stack
from tests.service.helpers import ensure_model, new_file
from tests.service.keepalive import Answer, KeepAlive

PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))


class PrivatePostgres:
    """A PostgreSQL cluster of this test alone: initdb'd by the postgres user, on a free port."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self.bin = Path(PG_BIN[-1])

    def _pg_ctl(self, *args: str) -> None:
        command = [str(self.bin / "pg_ctl"), "-D", str(self.directory / "data"), "-w", *args]
        subprocess.run(["runuser", "-u", "postgres", "--", *command], check=True, capture_output=True)

    def init(self) -> None:
        initdb = [
            str(self.bin / "initdb"),
            "-D",
            str(self.directory / "data"),
            "-A",
            "trust",
            "-U",
            "postgres",
        ]
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *initdb, "--no-sync", "-E", "UTF8"],
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._pg_ctl("-l", str(self.directory / "server.log"), "-o", options, "start")

    def stop(self) -> None:
        self._pg_ctl("-m", "fast", "stop")


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    if not PG_BIN or os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs root, runuser and a PostgreSQL server installation to run a private cluster")
    directory = Path(tempfile.mkdtemp(prefix="tunepool-pg-"))  # not under pytest's root-only tmp
    shutil.chown(directory, "postgres")
    cluster = PrivatePostgres(directory, free_port())
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        subprocess.run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                str(cluster.bin / "pg_ctl"),
                "-D",
                str(directory / "data"),
                "-m",
                "immediate",
                "stop",
            ],
            capture_output=True,
        )
        shutil.rmtree(directory, ignore_errors=True)


def assert_unavailable(answer: Answer, code: str = "database_unavailable") -> None:
    assert answer.status == 503, answer.body
    assert answer.code == code, answer.body
    assert int(answer.headers["retry-after"]) >= 1
    assert answer.headers["content-type"] == "application/json"


def no_dropped_connections(stack: Stack) -> None:
    log = (stack.settings.home / "api.log").read_text()
    assert "Exception in ASGI application" not in log
    assert "unhandled error" not in log


def json_request(path: str, body: object) -> tuple[str, str, bytes, dict[str, str]]:
    """`KeepAlive.request` arguments for a JSON POST."""
    return "POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"}


KINDS = ["poll (async FastRead)", "list (sync session)", "create (sync write)", "authentication", "readiness"]


def test_postgres_outage_answers_503_on_the_same_connection_then_recovers(tmp_path: Path) -> None:
    with (
        private_postgres() as pg,
        running_stack(
            "postgresql",
            tmp_path,
            # A key checked once is remembered, so that requests with it reach the route's own reads and
            # writes during the outage; a second key, never used before, needs the database to authenticate.
            extra_env={"TUNEPOOL_AUTH_CACHE_SECONDS": "300", "TUNEPOOL_DB_TIMEOUT_S": "2"},
            pg_port=pg.port,
        ) as stack,
    ):
        team = stack.team()
        fresh_key = stack.team().key
        job_body = {"model": ensure_model(stack), "training_file": new_file(team), "method": {"type": "dft"}}
        job_id = team.post("/v1/fine_tuning/jobs", json=job_body).json()["id"]
        conn = KeepAlive(stack.url, team.key)
        create = json_request("/v1/fine_tuning/jobs", job_body)

        def each_kind() -> dict[str, Answer]:
            return {
                "poll (async FastRead)": conn.request("GET", f"/v1/fine_tuning/jobs/{job_id}"),
                "list (sync session)": conn.request("GET", "/v1/files"),
                "create (sync write)": conn.request(*create),
                "authentication": conn.request("GET", "/v1/models", key=fresh_key),
                "readiness": conn.request("GET", "/readyz"),
            }

        assert {k: a.status for k, a in each_kind().items()} == dict.fromkeys(KINDS, 200)
        fresh_key = stack.team().key  # the last one is cached now

        pg.stop()
        stopped_at = time.monotonic()
        rounds = 0
        while time.monotonic() - stopped_at < 20:
            started = time.monotonic()
            for kind, answer in each_kind().items():
                if kind == "readiness":
                    assert answer.status == 503 and "database" in answer.json()["error"]["message"], (
                        answer.body
                    )
                else:
                    assert_unavailable(answer)
            assert time.monotonic() - started < 5  # refused at once, not after a timeout per request
            rounds += 1
            time.sleep(1)
        pg.start()

        # The same connection, the same API process: every kind answers again at the first try.
        assert {k: a.status for k, a in each_kind().items()} == dict.fromkeys(KINDS, 200)
        assert stack.proc.poll() is None
        assert rounds >= 10 and conn.requests == 5 * (rounds + 2)
        assert len(team.get("/v1/fine_tuning/jobs").json()["data"]) == 3  # before and after, none during
        no_dropped_connections(stack)


def test_sqlite_writer_lock_answers_busy_within_the_bounded_wait(tmp_path: Path) -> None:
    env = {
        "TUNEPOOL_DB_TIMEOUT_S": "1",  # SQLite's busy wait
        "TUNEPOOL_DB_POOL_SIZE": "1",
        "TUNEPOOL_DB_ACQUIRE_TIMEOUT_S": "0.5",  # the wait for the one pooled connection
    }
    with running_stack("sqlite", tmp_path, extra_env=env) as stack:
        team = stack.team()
        body = {"model": ensure_model(stack), "training_file": new_file(team), "method": {"type": "dft"}}
        create = json_request("/v1/fine_tuning/jobs", body)
        conn = KeepAlive(stack.url, team.key)
        assert conn.request("GET", "/v1/files").status == 200  # the key's last use is written now

        writer = sqlite3.connect(stack.settings.database_url.removeprefix("sqlite:///"), isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")  # holds the write lock until it ends
        try:
            started = time.monotonic()
            answer = conn.request(*create)
            waited = time.monotonic() - started
            assert_unavailable(answer, "database_busy")
            assert answer.headers["retry-after"] == "1"
            assert 0.9 < waited < 3, waited  # the bounded busy wait (1 s), not 30 s
            assert conn.request("GET", "/v1/files").status == 200  # readers are not blocked (WAL)

            # The one pooled connection is taken by a create waiting on the lock: another request
            # waits for it 0.5 s, then answers 503 too, rather than queueing behind the lock.
            answers: list[Answer] = []
            first = threading.Thread(
                target=lambda: answers.append(KeepAlive(stack.url, team.key).request(*create))
            )
            first.start()
            time.sleep(0.2)
            started = time.monotonic()
            queued = KeepAlive(stack.url, team.key).request("GET", "/v1/files")
            assert time.monotonic() - started < 0.9
            assert_unavailable(queued, "database_busy")
            assert "connection" in queued.json()["error"]["message"]
            first.join()
            assert_unavailable(answers[0], "database_busy")
        finally:
            writer.execute("ROLLBACK")
            writer.close()

        assert conn.request(*create).status == 200
        assert len(team.get("/v1/fine_tuning/jobs").json()["data"]) == 1  # the refused creates made nothing
        no_dropped_connections(stack)


def test_an_unexpected_error_is_a_logged_500_that_keeps_the_connection(stack: Stack) -> None:
    """Starlette re-raises what its 500 answered, and uvicorn then closed the connection: now only the
    log sees the exception. The error here: a file row pointing outside the artifact directory."""
    team = stack.team()
    file_id = new_file(team)
    with stack.db.session() as session:
        session.execute(update(File).where(File.id == file_id).values(storage_path="../../../etc/passwd"))
        session.commit()
    log = stack.settings.home / "api.log"
    logged_before = log.stat().st_size
    conn = KeepAlive(stack.url, team.key)
    answer = conn.request("GET", f"/v1/files/{file_id}/content")
    assert answer.status == 500 and answer.code == "internal_error"
    assert b"passwd" not in answer.body and b"Traceback" not in answer.body
    assert answer.headers["x-content-type-options"] == "nosniff"  # the 500 has the headers too
    assert conn.request("GET", f"/v1/files/{file_id}").status == 200  # the same connection
    with log.open("rb") as f:
        f.seek(logged_before)
        logged = f.read().decode()
    assert "unhandled error in GET /v1/files/" in logged and "StorageError" in logged
    assert "Exception in ASGI application" not in logged
