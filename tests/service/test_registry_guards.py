"""Admin changes that must hold at once and registrations that must stay inside their roots (issue 11,
findings 11 and 15), over real HTTP on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import httpx
import pytest

from service.teams import set_quota
from tests.service.conftest import Stack, free_port, start_api
from tests.service.helpers import ensure_model, new_file
from tests.service.test_admin import error_of, unique


@pytest.fixture
def gguf(stack: Stack) -> Path:
    path = stack.settings.home / "models" / "tiny.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + bytes(60))
    return path


def test_models_register_only_from_inside_the_model_roots(stack: Stack, gguf: Path, tmp_path: Path) -> None:
    admin = stack.team(admin=True)
    root = stack.settings.home / "models"
    keys = root / "keys.json"  # inside the root, but neither a model directory nor a .gguf file
    keys.write_text(json.dumps({"admin": "tp-secret"}))
    outside = tmp_path / "outside-model"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    (root / "escape").unlink(missing_ok=True)
    (root / "escape").symlink_to(outside)  # a link inside the root to a model outside it
    refused = {
        "/etc/shadow": "not under a model root",
        "/root": "not under a model root",
        str(outside): "not under a model root",
        str(root / "escape"): "resolves to",
        f"{root}/{os.path.relpath(outside, root)}": "not under a model root",  # out through ..
        str(keys): "neither a .gguf file nor a directory with a config.json",
        str(root / "missing"): "does not exist",
        "models/tiny": "absolute path",
        "HuggingFaceTB/SmolLM2-135M-Instruct": "absolute path",
    }
    for source, reason in refused.items():
        body = {"name": unique("guarded"), "source": source}
        error = error_of(admin.post("/v1/admin/models", json=body), 400)
        assert error["param"] == "source" and reason in error["message"], (source, error)
        assert "tp-secret" not in error["message"]
    names = [m["id"] for m in admin.get("/v1/admin/models").json()["data"]]
    assert not [n for n in names if n.startswith("guarded-")], "a refused model was registered"

    for source in (str(gguf), stack.model_dir("good"), f"{root}/./good/"):
        added = admin.post("/v1/admin/models", json={"name": unique("m"), "source": source})
        assert added.status_code == 200, added.text
        assert added.json()["source"] == str(Path(source).resolve())  # what workers open, resolved


def test_quota_changes_apply_at_once(stack: Stack, tmp_path: Path) -> None:
    """With keys cached for a minute, a quota lowered through this API process applies to the very
    next request, and one lowered elsewhere (the CLI, another replica) to the next job creation."""
    env = {**stack.env, "TUNEPOOL_AUTH_CACHE_SECONDS": "60"}
    port = free_port()
    proc = start_api(env, port, tmp_path / "api.log")
    try:
        admin, team = stack.team(admin=True), stack.team()
        ensure_model(stack)
        file_id = new_file(team)
        http = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {team.key}"}, timeout=60
        )
        body = {"model": ensure_model(stack), "training_file": file_id}
        assert http.post("/v1/fine_tuning/jobs", json=body).status_code == 200  # the team is cached now

        changed = httpx.patch(
            f"http://127.0.0.1:{port}/v1/admin/teams/{team.name}/quota",
            json={"max_queued_jobs": 1, "max_storage_bytes": 10},
            headers={"Authorization": f"Bearer {admin.key}"},
        )
        assert changed.status_code == 200, changed.text
        refused = http.post("/v1/fine_tuning/jobs", json=body)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "quota_exceeded"
        upload = http.post(
            "/v1/files", files={"file": ("a.jsonl", b'{"prompt": "a", "completion": "b"}\n')},
            data={"purpose": "fine-tune"},
        )  # fmt: skip
        assert upload.status_code == 413, upload.text

        # Elsewhere: raised, then lowered again straight in the database; creation re-reads it.
        with stack.db.session() as session:
            set_quota(session, team.name, max_queued_jobs=5)
        assert http.post("/v1/fine_tuning/jobs", json=body).status_code == 200
        with stack.db.session() as session:
            set_quota(session, team.name, max_queued_jobs=1)
        assert http.post("/v1/fine_tuning/jobs", json=body).status_code == 429
        http.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
