"""The real `tunepool` command, as subprocesses, against the running stack's database (both backends)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.service.conftest import ROOT, Stack


def tunepool(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=ROOT,
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def ok(env: dict[str, str], *args: str) -> str:
    done = tunepool(env, *args)
    assert done.returncode == 0, f"{args}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def refused(env: dict[str, str], *args: str, code: int = 1) -> str:
    """The one-line error of a failed command (exit code `code`, no traceback, nothing on stdout)."""
    done = tunepool(env, *args)
    assert done.returncode == code, f"{args}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert done.stdout == ""
    return lines[0]


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def new_team(stack: Stack, *flags: str) -> tuple[str, str]:
    """create-team: the key is the last line of stdout."""
    name = unique("cli")
    key = ok(stack.env, "admin", "create-team", name, *flags).splitlines()[-1]
    assert key.startswith("tp-")
    return name, key


def team_listed(stack: Stack, name: str) -> dict[str, Any]:
    teams = json.loads(ok(stack.env, "admin", "list-teams", "--json"))
    return next(t for t in teams if t["name"] == name)


def test_create_team_prints_a_working_key(stack: Stack) -> None:
    _name, key = new_team(stack)
    client = stack.client(key)
    assert client.get("/v1/models").status_code == 200
    assert client.get("/v1/admin/teams").status_code == 403
    _name, admin_key = new_team(stack, "--admin")
    assert stack.client(admin_key).get("/v1/admin/teams").status_code == 200


def test_create_team_refuses_a_duplicate_and_a_bad_name(stack: Stack) -> None:
    name, _key = new_team(stack)
    assert name in refused(stack.env, "admin", "create-team", name)
    assert "name" in refused(stack.env, "admin", "create-team", "no spaces please")


def test_create_key(stack: Stack) -> None:
    name, _key = new_team(stack)
    key = ok(stack.env, "admin", "create-key", name).splitlines()[-1]
    assert stack.client(key).get("/v1/models").status_code == 200
    assert stack.client(key).get("/v1/admin/models").status_code == 403
    admin_key = ok(stack.env, "admin", "create-key", name, "--admin").splitlines()[-1]
    assert stack.client(admin_key).get("/v1/admin/models").status_code == 200
    assert "'no-such-team'" in refused(stack.env, "admin", "create-key", "no-such-team")


def test_revoke_key(stack: Stack) -> None:
    name, key = new_team(stack)
    spare = ok(stack.env, "admin", "create-key", name).splitlines()[-1]
    client = stack.client(key)
    assert client.get("/v1/models").status_code == 200
    prefix = key.split("-")[0] + "-" + key.split("-")[1]
    assert prefix in ok(stack.env, "admin", "revoke-key", prefix)
    assert client.get("/v1/models").status_code == 401
    assert stack.client(spare).get("/v1/models").status_code == 200
    keys = json.loads(ok(stack.env, "admin", "list-keys", name, "--json"))
    assert [k["revoked_at"] is not None for k in keys] == [True, False]
    assert "tp-zzzzzzzz" in refused(stack.env, "admin", "revoke-key", "tp-zzzzzzzz")
    assert spare not in refused(stack.env, "admin", "revoke-key", spare)  # a whole key is never echoed


def test_set_quota(stack: Stack) -> None:
    name, _key = new_team(stack)
    out = ok(stack.env, "admin", "set-quota", name, "--max-running-jobs", "3", "--max-queued-jobs", "7",
             "--max-storage-bytes", "10GB", "--share-weight", "2.5", "--max-gpus", "8")  # fmt: skip
    assert "max_running_jobs=3" in out and "max_gpus=8" in out
    admin = stack.team(admin=True)
    listed = next(t for t in admin.get("/v1/admin/teams").json()["data"] if t["name"] == name)
    assert listed["quota"] == {
        "max_running_jobs": 3,
        "max_queued_jobs": 7,
        "max_storage_bytes": 10 * 1000**3,
        "share_weight": 2.5,
        "max_gpus": 8,
        "guaranteed_gpus": {},
        "may_exempt_preemption": False,
    }
    ok(stack.env, "admin", "set-quota", name, "--max-storage-bytes", "2GiB")
    quota = team_listed(stack, name)["quota"]
    assert quota["max_storage_bytes"] == 2 * 1024**3
    assert quota["max_running_jobs"] == 3 and quota["max_gpus"] == 8  # only what was given changes
    assert "max_gpus=none" in ok(stack.env, "admin", "set-quota", name, "--max-gpus", "-1")
    assert team_listed(stack, name)["quota"]["max_gpus"] is None
    assert "max_gpus" in refused(stack.env, "admin", "set-quota", name, "--max-gpus", "-2")
    out = ok(stack.env, "admin", "set-quota", name, "--guaranteed-gpus", "4", "--pool", "a100",
             "--may-exempt-preemption")  # fmt: skip
    assert "guaranteed_gpus[a100]=4" in out and "may_exempt_preemption=true" in out
    ok(stack.env, "admin", "set-quota", name, "--guaranteed-gpus", "2")  # the default pool
    quota = team_listed(stack, name)["quota"]
    assert quota["guaranteed_gpus"] == {"a100": 4, "default": 2} and quota["may_exempt_preemption"] is True
    ok(stack.env, "admin", "set-quota", name, "--guaranteed-gpus", "0", "--pool", "a100")  # removed
    assert team_listed(stack, name)["quota"]["guaranteed_gpus"] == {"default": 2}
    assert "guaranteed_gpus" in refused(stack.env, "admin", "set-quota", name, "--guaranteed-gpus", "-1")

    assert "at least one" in refused(stack.env, "admin", "set-quota", name, code=2)
    bad_size = refused(stack.env, "admin", "set-quota", name, "--max-storage-bytes", "lots", code=2)
    assert "--max-storage-bytes" in bad_size
    assert "max_running_jobs" in refused(stack.env, "admin", "set-quota", name, "--max-running-jobs", "-1")


def test_list_teams_table(stack: Stack) -> None:
    name, _key = new_team(stack)
    out = ok(stack.env, "admin", "list-teams")
    assert name in out and "running" in out


def test_add_model(stack: Stack) -> None:
    name = unique("org/cli-model")
    user = stack.team()
    source = stack.model_dir("x")
    assert "gpu-b" in ok(stack.env, "admin", "add-model", name, source, "--pool", "gpu-b")
    assert name in [m["id"] for m in user.get("/v1/models").json()["data"]]
    models = {m["id"]: m for m in json.loads(ok(stack.env, "admin", "list-models", "--json"))}
    assert models[name]["source"] == source and models[name]["pool"] == "gpu-b"
    assert "not under a model root" in refused(stack.env, "admin", "add-model", unique("m"), "/etc/passwd")
    assert name in ok(stack.env, "admin", "list-models")
    assert "pool" in refused(stack.env, "admin", "add-model", unique("m"), source, "--pool", "Not A Pool")

    ok(stack.env, "admin", "remove-model", name)
    assert name not in [m["id"] for m in user.get("/v1/models").json()["data"]]
    assert name in refused(stack.env, "admin", "remove-model", name)


def test_migrate_is_idempotent(stack: Stack) -> None:
    assert "latest revision" in ok(stack.env, "migrate")
    assert "latest revision" in ok(stack.env, "migrate")
    new_team(stack)  # and the database still works


# -- without the stack: settings and databases that cannot work ------------------------------


@pytest.fixture
def bare_env(tmp_path: Path) -> dict[str, str]:
    """The environment minus every TUNEPOOL_ variable, with a fresh home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEPOOL_")}
    return {**env, "PYTHONPATH": str(ROOT), "TUNEPOOL_HOME": str(tmp_path / "home")}


@pytest.mark.parametrize("args", [["migrate"], ["admin", "create-team", "x"]])
def test_bad_settings_exit_2_naming_the_variable(bare_env: dict[str, str], args: list[str]) -> None:
    env = {**bare_env, "TUNEPOOL_DATABASE_URL": "mysql://x"}
    assert "TUNEPOOL_DATABASE_URL" in refused(env, *args, code=2)


def test_every_bad_variable_is_named(bare_env: dict[str, str]) -> None:
    env = {**bare_env, "TUNEPOOL_API_PORT": "0", "TUNEPOOL_MAX_LINE_BYTES": "1"}
    error = refused(env, "admin", "list-teams", code=2)
    assert "TUNEPOOL_API_PORT" in error and "TUNEPOOL_MAX_LINE_BYTES" in error


@pytest.mark.parametrize("args", [["migrate"], ["admin", "create-team", "x"]])
def test_unreachable_database_is_one_line(bare_env: dict[str, str], args: list[str]) -> None:
    env = {**bare_env, "TUNEPOOL_DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:1/nothing"}
    assert "database unavailable" in refused(env, *args)


def test_unmigrated_database_says_to_migrate(bare_env: dict[str, str]) -> None:
    assert "tunepool migrate" in refused(bare_env, "admin", "create-team", "early")
    ok(bare_env, "migrate")
    key = ok(bare_env, "admin", "create-team", "early").splitlines()[-1]
    assert key.startswith("tp-")


def test_console_script_and_shell_capture(bare_env: dict[str, str]) -> None:
    """What the README tells people to do: KEY=$(tunepool admin create-team x | tail -1)."""
    script = Path(sys.executable).parent / "tunepool"
    if not script.exists():
        pytest.skip("the tunepool console script is not installed")
    subprocess.run([str(script), "migrate"], env=bare_env, check=True, capture_output=True)
    shell = f'KEY=$("{script}" admin create-team shell-team | tail -1); printf %s "$KEY"'
    key = subprocess.run(["sh", "-c", shell], env=bare_env, check=True, capture_output=True, text=True).stdout
    assert key.startswith("tp-") and len(key) == len("tp-") + 8 + 1 + 40


def test_database_from_a_newer_version_is_one_line(bare_env: dict[str, str], tmp_path: Path) -> None:
    import sqlite3

    ok(bare_env, "migrate")
    conn = sqlite3.connect(tmp_path / "home" / "tunepool.db")
    conn.execute("UPDATE alembic_version SET version_num = 'f00d'")
    conn.commit()
    conn.close()
    assert "'f00d'" in refused(bare_env, "migrate")


def test_pools(stack: Stack) -> None:
    pool = unique("cli-pool")
    assert f"declared pool {pool}" in ok(stack.env, "admin", "add-pool", pool, "--description", "8x H200")
    pools = {p["id"]: p for p in json.loads(ok(stack.env, "admin", "list-pools", "--json"))}
    assert (pools[pool]["declared_by"], pools[pool]["description"]) == ("admin", "8x H200")
    assert pool in ok(stack.env, "admin", "list-pools")
    assert "name: 1 to 64" in refused(stack.env, "admin", "add-pool", "Not A Pool")
    ok(stack.env, "admin", "remove-pool", pool)
    assert f"no pool named {pool!r}" in refused(stack.env, "admin", "remove-pool", pool)


def test_list_workers_shows_slots_free_slots_and_gpu(stack: Stack) -> None:
    import time

    from service.models import Worker

    now = time.time()
    pool = f"nodes-{secrets.token_hex(3)}"
    with stack.db.session() as session:
        session.add(
            Worker(id=f"node-a:{pool}", pool=pool, hostname="node-a", gpu_name="NVIDIA H200", slots=8,
                   free_slots=3, current_job_id="ftjob-x", started_at=now, last_heartbeat_at=now - 2)
        )  # fmt: skip
        session.add(
            Worker(id=f"node-b:{pool}", pool=pool, hostname="node-b", gpu_name="cpu", slots=2,
                   free_slots=2, started_at=now, last_heartbeat_at=now - 3600)
        )  # fmt: skip
        session.commit()
    listed = {w["id"]: w for w in json.loads(ok(stack.env, "admin", "list-workers", "--json"))}
    a, b = listed[f"node-a:{pool}"], listed[f"node-b:{pool}"]
    assert (a["gpu_name"], a["slots"], a["free_slots"], a["a_running_job"], a["alive"]) == (
        "NVIDIA H200",
        8,
        3,
        "ftjob-x",
        True,
    )
    assert (b["slots"], b["free_slots"], b["alive"]) == (2, 2, False) and b["heartbeat_age_s"] >= 3600
    table = ok(stack.env, "admin", "list-workers")
    assert "3/8" in table and "(lost)" in table
