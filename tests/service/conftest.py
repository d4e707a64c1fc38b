"""A real running API for the service tests, once on SQLite and once on the local PostgreSQL.

`stack` starts `tunepool migrate` and then the API as a separate process (uvicorn, real HTTP),
against a fresh database (a temporary SQLite file, or a new PostgreSQL database dropped at the
end) and a temporary artifact directory. Every test that uses it runs on both backends. Tests
make their own teams, so they never see each other's data.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from service.db import Database
from service.settings import Settings, load_settings
from service.teams import add_model, create_team

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class TeamClient:
    """An HTTP client authenticated as one team."""

    http: httpx.Client
    key: str
    team_id: str
    name: str

    def __getattr__(self, name: str) -> Any:  # get/post/delete/... go to the httpx client
        return getattr(self.http, name)


@dataclass
class Stack:
    backend: str
    url: str
    settings: Settings
    env: dict[str, str]
    db: Database
    proc: subprocess.Popen[bytes]
    clients: list[httpx.Client] = field(default_factory=list)

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        http = httpx.Client(base_url=self.url, headers=headers, timeout=120)
        self.clients.append(http)
        return http

    def team(self, *, admin: bool = False, name: str | None = None) -> TeamClient:
        name = name or f"team-{secrets.token_hex(4)}"
        with self.db.session() as session:
            team, key = create_team(session, self.settings, name, admin=admin)
        return TeamClient(self.client(key), key, team.id, name)

    def model_dir(self, name: str) -> str:
        """A model directory under the stack's model root (<home>/models): enough to register a model
        that no test of the API ever loads."""
        path = self.settings.home / "models" / name
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text("{}")
        return str(path)

    def declare_pool(self, name: str) -> str:
        """A pool jobs may name (as `tunepool admin add-pool` declares it)."""
        from service.pools import declare_pool

        with self.db.session() as session:
            declare_pool(session, name, "admin")
            session.commit()
        return name

    def add_model(self, name: str, source: str, pool: str | None = None) -> None:
        with self.db.session() as session:
            add_model(session, self.settings, name, source, pool)

    def api_rss(self) -> int:
        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def storage_files(self) -> list[Path]:
        """Every regular file under the artifact directory."""
        return sorted(p for p in self.settings.artifacts.rglob("*") if p.is_file())


def start_api(env: dict[str, str], port: int, log_path: Path) -> subprocess.Popen[bytes]:
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "api", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the API exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the API did not start:\n{log_path.read_text()[-3000:]}")


@contextmanager
def running_stack(
    backend: str,
    home: Path,
    extra_env: dict[str, str] | None = None,
    redis_db: int = 15,
    pg_port: int = 5432,  # another PostgreSQL server (test_outages.py stops a private one)
) -> Iterator[Stack]:
    """Migrate a fresh database (a SQLite file, or a new PostgreSQL database dropped at the end) and
    serve the API on it as a separate process; `extra_env` adds TUNEPOOL_* settings."""
    pg_name = None
    if backend == "postgresql":
        import psycopg

        pg_name = f"tunepool_test_{secrets.token_hex(4)}"
        with psycopg.connect(PG_ADMIN_DSN.replace(":5432/", f":{pg_port}/"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {pg_name}")
        database_url = f"postgresql+psycopg://postgres@127.0.0.1:{pg_port}/{pg_name}"
        broker_url = f"redis://127.0.0.1:6379/{redis_db}"
    else:
        database_url = f"sqlite:///{home / 'tunepool.db'}"
        broker_url = f"sqla+sqlite:///{home / 'broker.db'}"
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TUNEPOOL_HOME": str(home),
        "TUNEPOOL_DATABASE_URL": database_url,
        "TUNEPOOL_BROKER_URL": broker_url,
        "TUNEPOOL_STORAGE_DIR": str(home / "artifacts"),
        "TUNEPOOL_MAX_UPLOAD_BYTES": str(300 * 1024 * 1024),
        # Revocations must show at once in these tests; test_api_basics covers the cache itself.
        "TUNEPOOL_AUTH_CACHE_SECONDS": "0",
        # Every test sends its bad keys from 127.0.0.1: counted, never limited (test_ratelimit.py
        # runs a stack with a low limit).
        "TUNEPOOL_AUTH_FAILURE_LIMIT": "1000000",
        **(extra_env or {}),
    }
    subprocess.run(
        [sys.executable, "-m", "service.cli", "migrate"], cwd=ROOT, env=env, check=True, capture_output=True
    )
    settings = load_settings(
        **{k.removeprefix("TUNEPOOL_").lower(): v for k, v in env.items() if k.startswith("TUNEPOOL_")}
    )
    proc = start_api(env, port, home / "api.log")
    db = Database(settings)
    stack = Stack(backend, f"http://127.0.0.1:{port}", settings, env, db, proc)
    try:
        yield stack
    finally:
        for client in stack.clients:
            client.close()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        db.dispose()
        if pg_name is not None:
            import psycopg

            with psycopg.connect(PG_ADMIN_DSN.replace(":5432/", f":{pg_port}/"), autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {pg_name} WITH (FORCE)")


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(request.param, tmp_path_factory.mktemp(f"stack-{request.param}")) as stack:
        yield stack


def chat_jsonl(n: int = 4) -> bytes:
    """A small valid chat training file."""
    import json

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} + {i}?"},
                {"role": "assistant", "content": f"{i} + {i} = {2 * i}."},
            ]
        }
        for i in range(n)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def upload(
    client: TeamClient | httpx.Client, content: bytes, filename: str = "train.jsonl"
) -> httpx.Response:
    return client.post(
        "/v1/files", files={"file": (filename, content, "application/jsonl")}, data={"purpose": "fine-tune"}
    )
