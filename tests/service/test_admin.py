"""/v1/admin over real HTTP on SQLite and PostgreSQL: teams, keys, quotas, the model registry."""

from __future__ import annotations

import secrets
from typing import Any

import httpx
import pytest

from service.models import File, Job
from tests.service.conftest import Stack, TeamClient


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def team_named(admin: TeamClient, name: str) -> dict[str, Any]:
    teams = admin.get("/v1/admin/teams").json()["data"]
    return next(t for t in teams if t["name"] == name)


ROUTES = [
    ("GET", "/v1/admin/teams", None),
    ("POST", "/v1/admin/teams", {"name": "never-made"}),
    ("GET", "/v1/admin/teams/x", None),
    ("PATCH", "/v1/admin/teams/x/quota", {"max_running_jobs": 1}),
    ("GET", "/v1/admin/teams/x/keys", None),
    ("POST", "/v1/admin/teams/x/keys", None),
    ("POST", "/v1/admin/keys/tp-aaaaaaaa/revoke", None),
    ("GET", "/v1/admin/models", None),
    ("POST", "/v1/admin/models", {"name": "m", "source": "/m"}),
    ("DELETE", "/v1/admin/models/org/m", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_admin_routes_need_an_admin_key(stack: Stack, method: str, path: str, body: Any) -> None:
    anonymous = stack.client().request(method, path, json=body)
    assert error_of(anonymous, 401)["code"] == "missing_api_key"
    wrong = stack.client("tp-aaaaaaaa-" + "b" * 40).request(method, path, json=body)
    assert error_of(wrong, 401)["code"] == "invalid_api_key"
    plain = stack.team().request(method, path, json=body)
    assert error_of(plain, 403)["type"] == "permission_error"


def test_create_team_returns_a_working_key_once(stack: Stack) -> None:
    admin = stack.team(admin=True)
    name = unique("made")
    created = admin.post("/v1/admin/teams", json={"name": name})
    assert created.status_code == 200, created.text
    body = created.json()
    assert body["object"] == "team" and body["name"] == name and body["id"].startswith("team-")
    assert body["quota"] == {
        "max_running_jobs": stack.settings.default_max_running_jobs,
        "max_queued_jobs": stack.settings.default_max_queued_jobs,
        "max_storage_bytes": stack.settings.default_max_storage_bytes,
        "share_weight": 1.0,
        "max_gpus": None,
        "guaranteed_gpus": {},
        "may_exempt_preemption": False,
    }
    assert body["usage"] == {"running_jobs": 0, "queued_jobs": 0, "stored_bytes": 0}
    key = body["api_key"]["key"]
    assert key.startswith(body["api_key"]["prefix"] + "-") and body["api_key"]["is_admin"] is False
    new_team = stack.client(key)
    assert new_team.get("/v1/models").status_code == 200
    assert new_team.get("/v1/admin/teams").status_code == 403

    listed = admin.get(f"/v1/admin/teams/{name}/keys").json()["data"]
    assert [k["prefix"] for k in listed] == [body["api_key"]["prefix"]]
    assert all("key" not in k for k in listed)
    assert team_named(admin, name)["id"] == body["id"]
    assert key not in (stack.settings.home / "api.log").read_text()  # keys are never logged


def test_create_admin_team(stack: Stack) -> None:
    admin = stack.team(admin=True)
    body = admin.post("/v1/admin/teams", json={"name": unique("ops"), "admin": True}).json()
    assert body["api_key"]["is_admin"] is True
    assert stack.client(body["api_key"]["key"]).get("/v1/admin/teams").status_code == 200


def test_duplicate_team_name_is_409(stack: Stack) -> None:
    admin = stack.team(admin=True)
    name = unique("dup")
    assert admin.post("/v1/admin/teams", json={"name": name}).status_code == 200
    error = error_of(admin.post("/v1/admin/teams", json={"name": name}), 409)
    assert error["param"] == "name" and name in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "name"),
        ({"name": ""}, "name"),
        ({"name": "has space"}, "name"),
        ({"name": "a/b"}, "name"),
        ({"name": "x" * 65}, "name"),
        ({"name": 5}, "name"),
        ({"name": "ok-name", "admin": "maybe"}, "admin"),
        ({"name": "ok-name", "quota": 3}, "quota"),
    ],
)
def test_create_team_validation_names_the_param(stack: Stack, body: dict[str, Any], param: str) -> None:
    error = error_of(stack.team(admin=True).post("/v1/admin/teams", json=body), 400)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_list_teams_shows_usage(stack: Stack) -> None:
    admin, worker_team = stack.team(admin=True), stack.team()
    with stack.db.session() as session:
        session.add(File(team_id=worker_team.team_id, filename="a.jsonl", purpose="fine-tune", bytes=1234,
                         sha256="0" * 64, storage_path="x/a"))  # fmt: skip
        for status in ("running", "queued", "queued", "validating_files", "succeeded"):
            session.add(Job(team_id=worker_team.team_id, status=status, model="m", model_source="/m",
                            training_file="file-x", method={"type": "dft"}, loss="dft", hyperparameters={},
                            seed=0, pool="default"))  # fmt: skip
        session.commit()
    listing = admin.get("/v1/admin/teams")
    assert listing.status_code == 200 and listing.json()["object"] == "list"
    team = team_named(admin, worker_team.name)
    assert team["usage"] == {"running_jobs": 1, "queued_jobs": 3, "stored_bytes": 1234}
    assert admin.get(f"/v1/admin/teams/{worker_team.name}").json() == team
    assert error_of(admin.get("/v1/admin/teams/no-such-team"), 404)["param"] == "team"


def test_new_key_and_revoke(stack: Stack) -> None:
    admin, team = stack.team(admin=True), stack.team()
    made = admin.post(f"/v1/admin/teams/{team.name}/keys")
    assert made.status_code == 200, made.text
    key, prefix = made.json()["key"], made.json()["prefix"]
    assert made.json()["team_id"] == team.team_id and made.json()["is_admin"] is False
    client = stack.client(key)
    assert client.get("/v1/models").status_code == 200

    elevated = admin.post(f"/v1/admin/teams/{team.name}/keys", json={"admin": True}).json()
    assert stack.client(elevated["key"]).get("/v1/admin/models").status_code == 200

    revoked = admin.post(f"/v1/admin/keys/{prefix}/revoke")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert "key" not in revoked.json()
    assert error_of(client.get("/v1/models"), 401)["code"] == "invalid_api_key"
    assert team.get("/v1/models").status_code == 200  # the team's other key still works
    again = admin.post(f"/v1/admin/keys/{prefix}/revoke")  # idempotent
    assert again.status_code == 200 and again.json()["revoked_at"] == revoked.json()["revoked_at"]

    assert error_of(admin.post("/v1/admin/teams/no-such-team/keys"), 404)["param"] == "team"
    assert error_of(admin.post("/v1/admin/keys/tp-zzzzzzzz/revoke"), 404)["param"] == "prefix"
    whole = admin.post(f"/v1/admin/keys/{team.key}/revoke")  # a whole key where a prefix belongs
    assert team.key not in error_of(whole, 400)["message"]
    assert team.get("/v1/models").status_code == 200


def test_set_quota(stack: Stack) -> None:
    admin, team = stack.team(admin=True), stack.team()
    url = f"/v1/admin/teams/{team.name}/quota"
    changed = admin.patch(url, json={"max_running_jobs": 5, "max_storage_bytes": 10**12})
    assert changed.status_code == 200, changed.text
    quota = changed.json()["quota"]
    assert quota["max_running_jobs"] == 5 and quota["max_storage_bytes"] == 10**12
    assert quota["max_queued_jobs"] == stack.settings.default_max_queued_jobs  # untouched
    admin.patch(url, json={"max_queued_jobs": 0, "share_weight": 2.5, "max_gpus": 16})
    assert team_named(admin, team.name)["quota"] == {
        "max_running_jobs": 5,
        "max_queued_jobs": 0,
        "max_storage_bytes": 10**12,
        "share_weight": 2.5,
        "max_gpus": 16,
        "guaranteed_gpus": {},
        "may_exempt_preemption": False,
    }
    assert admin.patch(url, json={"max_gpus": -1}).json()["quota"]["max_gpus"] is None  # no limit
    quota = admin.patch(url, json={"guaranteed_gpus": 3, "pool": "a100", "may_exempt_preemption": True})
    assert quota.json()["quota"]["guaranteed_gpus"] == {"a100": 3}
    assert quota.json()["quota"]["may_exempt_preemption"] is True
    assert error_of(admin.patch("/v1/admin/teams/no-such-team/quota", json={"max_running_jobs": 1}), 404)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_running_jobs": -1}, "max_running_jobs"),
        ({"max_running_jobs": 10**7}, "max_running_jobs"),
        ({"max_queued_jobs": "ten"}, "max_queued_jobs"),
        ({"max_queued_jobs": 1.5}, "max_queued_jobs"),
        ({"max_storage_bytes": 2**64}, "max_storage_bytes"),
        ({"share_weight": 0}, "share_weight"),
        ({"guaranteed_gpus": -1}, "guaranteed_gpus"),
        ({"may_exempt_preemption": "yes"}, "may_exempt_preemption"),
        ({"share_weight": -2}, "share_weight"),
        ({"max_gpus": -2}, "max_gpus"),
        ({"max_gpus": 2.5}, "max_gpus"),
        ({"max_runing_jobs": 1}, "max_runing_jobs"),
        ({}, None),
    ],
)
def test_quota_validation_names_the_param(stack: Stack, body: dict[str, Any], param: str | None) -> None:
    admin, team = stack.team(admin=True), stack.team()
    error = error_of(admin.patch(f"/v1/admin/teams/{team.name}/quota", json=body), 400)
    assert error["param"] == param, error
    quota = team_named(admin, team.name)["quota"]
    assert quota["max_running_jobs"] == stack.settings.default_max_running_jobs  # nothing changed


def test_model_registry(stack: Stack) -> None:
    admin, user = stack.team(admin=True), stack.team()
    name = unique("org/base")  # hub-style names have a slash
    base, base_v2 = stack.model_dir(unique("base")), stack.model_dir(unique("base-v2"))
    added = admin.post("/v1/admin/models", json={"name": name, "source": base, "pool": "gpu-a"})
    assert added.status_code == 200, added.text
    assert added.json() | {"created": 0} == {
        "id": name, "object": "model", "created": 0, "owned_by": "tunepool", "source": base,
        "pool": "gpu-a",
    }  # fmt: skip
    assert name in [m["id"] for m in user.get("/v1/models").json()["data"]]
    registry = {m["id"]: m for m in admin.get("/v1/admin/models").json()["data"]}
    assert registry[name]["source"] == base
    # Registering a model in a pool declares the pool.
    assert "gpu-a" in [p["id"] for p in admin.get("/v1/admin/pools").json()["data"]]

    updated = admin.post("/v1/admin/models", json={"name": name, "source": base_v2}).json()
    assert updated["source"] == base_v2 and updated["pool"] == "gpu-a"

    deleted = admin.delete(f"/v1/admin/models/{name}")
    assert deleted.status_code == 200 and deleted.json() == {"id": name, "object": "model", "deleted": True}
    assert name not in [m["id"] for m in user.get("/v1/models").json()["data"]]
    assert error_of(admin.delete(f"/v1/admin/models/{name}"), 404)["param"] == "model"


def test_model_default_pool(stack: Stack) -> None:
    body = {"name": unique("m"), "source": stack.model_dir("m")}
    added = stack.team(admin=True).post("/v1/admin/models", json=body).json()
    assert added["pool"] == stack.settings.default_pool


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"source": "/m"}, "name"),
        ({"name": "ft:base:team:x", "source": "/m"}, "name"),
        ({"name": "two words", "source": "/m"}, "name"),
        ({"name": "ok-model", "source": "  "}, "source"),
        ({"name": "ok-model", "source": "/m", "pool": "Bad Pool!"}, "pool"),
        ({"name": "ok-model", "source": "/m", "extra": 1}, "extra"),
    ],
)
def test_model_validation_names_the_param(stack: Stack, body: dict[str, Any], param: str) -> None:
    assert error_of(stack.team(admin=True).post("/v1/admin/models", json=body), 400)["param"] == param
