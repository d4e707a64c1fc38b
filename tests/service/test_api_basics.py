"""Errors in OpenAI's shape, health, docs, and an API process without torch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.service.conftest import ROOT, Stack, free_port, start_api


def test_importing_the_api_does_not_import_torch() -> None:
    code = "import sys, service.main, service.cli; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_auth_errors_are_401_with_openai_body(stack: Stack) -> None:
    anonymous = stack.client()
    for headers in ({}, {"Authorization": "Bearer tp-wrong-key"}, {"Authorization": "Basic abc"}):
        response = anonymous.get("/v1/fine_tuning/jobs", headers=headers)
        assert response.status_code == 401
        body = response.json()["error"]
        assert body["type"] == "invalid_request_error" and body["code"] in (
            "missing_api_key",
            "invalid_api_key",
        )
        assert "tp-wrong-key" not in response.text  # a presented key is never echoed


def test_request_errors_have_the_openai_shape(stack: Stack) -> None:
    client = stack.team()
    cases = [
        (
            client.post(
                "/v1/fine_tuning/jobs", content=b"{not json", headers={"content-type": "application/json"}
            ),
            400,
        ),
        (
            client.post("/v1/fine_tuning/jobs", content=b"model=x", headers={"content-type": "text/plain"}),
            415,
        ),
        (client.post("/v1/fine_tuning/jobs", json=[1, 2]), 400),
        (client.post("/v1/fine_tuning/jobs", json={}), 400),
        (client.delete("/v1/fine_tuning/jobs"), 405),
        (client.get("/v1/no-such-thing"), 404),
        (client.get("/v1/fine_tuning/jobs", params={"limit": "ten"}), 400),
    ]
    for response, status in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    missing = cases[3][0].json()["error"]
    assert missing["param"] in ("model", "training_file") and "Field required" in missing["message"]
    assert cases[6][0].json()["error"]["param"] == "limit"


def test_a_missing_database_answers_503_without_details(stack: Stack, tmp_path: Path) -> None:
    """An API whose database is gone answers 503 database_unavailable with a generic body: no trace,
    no server address; the cause stays in its log. (A 500's body: tests/service/test_outages.py.)"""
    if stack.backend == "sqlite":
        (tmp_path / "a-directory").mkdir()
        url = f"sqlite:///{tmp_path / 'a-directory'}"  # opening a directory as a database fails per request
    else:
        url = "postgresql+psycopg://postgres@127.0.0.1:5432/tunepool_no_such_database"
    env = {**stack.env, "TUNEPOOL_DATABASE_URL": url}
    port = free_port()
    proc = start_api(env, port, tmp_path / "api.log")
    try:
        client = stack.team()
        response = httpx.get(
            f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {client.key}"}
        )
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        assert response.json() == {
            "error": {
                "message": "The database cannot be reached right now; retry after 5 s",
                "type": "server_error",
                "param": None,
                "code": "database_unavailable",
            }
        }
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz")
        assert ready.status_code == 503 and "database" in ready.json()["error"]["message"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    assert "GET /v1/models: database_unavailable (OperationalError" in (tmp_path / "api.log").read_text()


def test_health_and_docs(stack: Stack) -> None:
    anonymous = stack.client()
    assert anonymous.get("/healthz").json() == {"status": "ok"}
    assert anonymous.get("/readyz").status_code == 200
    assert anonymous.get("/docs").status_code == 200
    spec = anonymous.get("/openapi.json").json()
    paths = spec["paths"]
    for path in (
        "/v1/files",
        "/v1/files/{file_id}",
        "/v1/files/{file_id}/content",
        "/v1/fine_tuning/jobs",
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}",
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel",
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events",
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints",
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints/{checkpoint_id}/content",
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/metrics",
        "/v1/models",
        "/v1/pool",
        "/healthz",
        "/readyz",
    ):
        assert path in paths, path
    examples = spec["components"]["schemas"]["JobCreate"]["examples"]
    assert {e["method"]["type"] for e in examples} == {"dft", "supervised"}


def test_auth_cache_expires_out_of_process_revocations(stack: Stack, tmp_path: Path) -> None:
    """With a cache, a key revoked elsewhere (the CLI, another replica) stops working within the TTL;
    one revoked through this process's admin API stops at once."""
    import time

    from service.teams import prefix_of, revoke_key

    env = {**stack.env, "TUNEPOOL_AUTH_CACHE_SECONDS": "2"}
    port = free_port()
    proc = start_api(env, port, tmp_path / "api.log")
    try:
        admin = stack.team(admin=True)
        elsewhere, here = stack.team(), stack.team()

        def status(key: str) -> int:
            headers = {"Authorization": f"Bearer {key}"}
            return httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=headers).status_code

        assert status(elsewhere.key) == 200 and status(here.key) == 200  # both now cached
        with stack.db.session() as session:
            revoke_key(session, prefix_of(elsewhere.key))
        assert status(elsewhere.key) == 200  # still cached: the database was not asked
        time.sleep(2.5)
        assert status(elsewhere.key) == 401  # the TTL passed: looked up again, found revoked

        revoked = httpx.post(
            f"http://127.0.0.1:{port}/v1/admin/keys/{prefix_of(here.key)}/revoke",
            headers={"Authorization": f"Bearer {admin.key}"},
        )
        assert revoked.status_code == 200
        assert status(here.key) == 401  # dropped from the cache at once
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
