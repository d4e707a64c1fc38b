"""GET /v1/pool: nodes and their slots, GPU totals, the queue, and a team's share, as a team key and
as an admin key sees them. Workers and running jobs are what workers would write, inserted directly;
each test has a pool of its own, so the shared stack's other tests do not change its figures."""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

from service.models import Team, TeamQuota, TeamUsage, Worker
from tests.service.conftest import Stack, TeamClient
from tests.service.helpers import new_job, set_job

HALF_LIFE_S = 86400.0  # the default TUNEPOOL_FAIRSHARE_HALF_LIFE_S


@dataclass
class PoolWorld:
    pool: str
    a: TeamClient
    b: TeamClient
    ids: dict[str, str]  # name -> job id


def add_worker(stack: Stack, pool: str, host: str, slots: int, free: int, age_s: float = 0.0) -> str:
    """A worker row as a node's heartbeat writes it (`age_s`: seconds since its last heartbeat)."""
    worker_id = f"{host}-{secrets.token_hex(4)}"
    now = time.time()
    with stack.db.session() as session:
        session.add(
            Worker(id=worker_id, pool=pool, hostname=host, gpu_name="H100", slots=slots, free_slots=free,
                   started_at=now - 600, last_heartbeat_at=now - age_s)
        )  # fmt: skip
        session.commit()
    return worker_id


def pool_world(stack: Stack) -> PoolWorld:
    """Pool P with two live nodes (4 slots, 1 free; 2 slots, 2 free) and a dead one (8 slots). Team a
    runs a 2-GPU job on the first node and queues two jobs; team b (weight 3) runs a 1-GPU job there
    and queues one between a's two. Team a has 2 hours of GPU time a half-life ago and 3 GPUs
    guaranteed in P."""
    pool = stack.declare_pool(f"pv-{secrets.token_hex(4)}")
    a, b = stack.team(), stack.team()
    node = add_worker(stack, pool, "node-a", slots=4, free=1)
    add_worker(stack, pool, "node-b", slots=2, free=2)
    add_worker(stack, pool, "node-dead", slots=8, free=8, age_s=3600)
    ids = {
        "a_run": new_job(stack, a, pool=pool, suffix="a-run")["id"],
        "b_run": new_job(stack, b, pool=pool, suffix="b-secret", metadata={"project": "b-metadata"})["id"],
        "a_q1": new_job(stack, a, pool=pool)["id"],
        "b_q": new_job(stack, b, pool=pool, metadata={"project": "b-metadata"})["id"],
        "a_q2": new_job(stack, a, pool=pool)["id"],
    }
    now = int(time.time())
    set_job(stack, ids["a_run"], status="running", worker_id=node, gpus=2, started_at=now)
    set_job(stack, ids["b_run"], status="running", worker_id=node, gpus=1, started_at=now)
    set_job(stack, ids["a_q1"], queue_reason="waiting for 1 free GPU (node-a has 1, reserved)")
    set_job(stack, ids["a_q2"], gpus=2)
    set_job(stack, ids["b_q"], queue_reason="b's private reason")
    with stack.db.session() as session:
        team_b = session.get(Team, b.team_id)
        assert team_b is not None
        team_b.share_weight = 3.0
        session.add(
            TeamUsage(team_id=a.team_id, pool=pool, gpu_seconds=7200.0, as_of=time.time() - HALF_LIFE_S)
        )
        session.add(TeamQuota(team_id=a.team_id, pool=pool, guaranteed_gpus=3))
        session.commit()
    return PoolWorld(pool, a, b, ids)


def view_of(client: Any, pool: str) -> dict[str, Any]:
    response = client.get("/v1/pool")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list"
    found = [p for p in body["data"] if p["name"] == pool]
    assert len(found) == 1, [p["name"] for p in body["data"]]
    return dict(found[0])


def test_totals_and_the_teams_own_view(stack: Stack) -> None:
    world = pool_world(stack)
    a, ids = world.a, world.ids
    view = view_of(a, world.pool)

    # Live nodes only: the dead one's 8 slots count nowhere.
    assert view["gpus"] == {"total": 6, "busy": 3, "free": 3}
    assert view["queue"] == {"jobs": 3, "gpus": 4}
    assert [(n["hostname"], n["slots"], n["free_slots"]) for n in view["nodes"]] == [
        ("node-a", 4, 1),
        ("node-b", 2, 2),
    ]
    # Its own job by id; team b's only as an occupied GPU of another team.
    assert view["nodes"][0]["jobs"] == [
        {"id": ids["a_run"], "team": a.name, "own": True, "gpus": 2},
        {"id": None, "team": None, "own": False, "gpus": 1},
    ]
    assert view["nodes"][1]["jobs"] == []

    team = view["team"]
    assert team["name"] == a.name
    assert team["gpus_running"] == 2
    assert math.isclose(team["usage_gpu_seconds"], 3600.0, abs_tol=5.0)  # 7200 halved once
    assert team["share_weight"] == 1.0 and team["guaranteed_gpus"] == 3
    assert math.isclose(team["share"], 2 / 3)  # 2 of the 3 GPUs running
    assert math.isclose(team["fair_share"], 0.25)  # weight 1 of 1 + 3
    assert math.isclose(team["fair_share_gpus"], 1.5)  # a quarter of 6 GPUs
    assert (team["queued_jobs"], team["queued_gpus"]) == (2, 3)
    # Its queued jobs in queue order, with their place in the whole pool's queue and their reason.
    assert [(j["id"], j["queue_position"], j["queue_reason"], j["gpus"]) for j in view["queued_jobs"]] == [
        (ids["a_q1"], 1, "waiting for 1 free GPU (node-a has 1, reserved)", 1),
        (ids["a_q2"], 3, None, 2),
    ]
    assert a.get(f"/v1/fine_tuning/jobs/{ids['a_q2']}").json()["queue_position"] == 3  # the job API agrees
    assert view["teams"] is None  # per-team rows are for admin keys

    # Team b sees the same pool from its side: a's jobs are GPUs of another team.
    b_view = view_of(world.b, world.pool)
    assert b_view["gpus"] == view["gpus"] and b_view["queue"] == view["queue"]
    assert b_view["nodes"][0]["jobs"] == [
        {"id": None, "team": None, "own": False, "gpus": 2},
        {"id": ids["b_run"], "team": world.b.name, "own": True, "gpus": 1},
    ]
    assert math.isclose(b_view["team"]["share"], 1 / 3) and math.isclose(b_view["team"]["fair_share"], 0.75)
    assert [(j["id"], j["queue_position"]) for j in b_view["queued_jobs"]] == [(ids["b_q"], 2)]
    assert b_view["team"]["usage_gpu_seconds"] == 0.0 and b_view["team"]["guaranteed_gpus"] == 0

    # A team with nothing in the pool: zeros, and the fair share it would get by submitting.
    c_view = view_of(stack.team(), world.pool)
    assert c_view["queued_jobs"] == [] and c_view["team"]["gpus_running"] == 0
    assert math.isclose(c_view["team"]["fair_share"], 1 / 5)  # 1 of 1 (a) + 3 (b) + 1 (itself)
    assert stack.client().get("/v1/pool").status_code == 401


def test_a_team_never_sees_another_teams_ids_names_or_metadata(stack: Stack) -> None:
    world = pool_world(stack)
    text = world.a.get("/v1/pool").text
    for secret in (world.ids["b_run"], world.ids["b_q"], world.b.name, world.b.team_id, "b-secret",
                   "b-metadata", "b's private reason"):  # fmt: skip
        assert secret not in text, secret
    assert world.ids["a_run"] in text and world.a.name in text  # its own are there


def test_an_admin_sees_every_job_and_team(stack: Stack) -> None:
    world = pool_world(stack)
    a, b, ids = world.a, world.b, world.ids
    admin = stack.team(admin=True)
    view = view_of(admin, world.pool)
    assert view["gpus"] == {"total": 6, "busy": 3, "free": 3}
    assert view["nodes"][0]["jobs"] == [
        {"id": ids["a_run"], "team": a.name, "own": False, "gpus": 2},
        {"id": ids["b_run"], "team": b.name, "own": False, "gpus": 1},
    ]
    assert [(j["id"], j["team"], j["queue_position"], j["queue_reason"]) for j in view["queued_jobs"]] == [
        (ids["a_q1"], a.name, 1, "waiting for 1 free GPU (node-a has 1, reserved)"),
        (ids["b_q"], b.name, 2, "b's private reason"),
        (ids["a_q2"], a.name, 3, None),
    ]
    rows = {t["name"]: t for t in view["teams"]}
    assert set(rows) == {a.name, b.name}  # the teams with jobs, usage or a guarantee here
    assert (rows[a.name]["gpus_running"], rows[a.name]["guaranteed_gpus"], rows[a.name]["queued_jobs"]) == (
        2,
        3,
        2,
    )
    assert math.isclose(rows[a.name]["usage_gpu_seconds"], 3600.0, abs_tol=5.0)
    assert (rows[b.name]["gpus_running"], rows[b.name]["share_weight"], rows[b.name]["queued_jobs"]) == (
        1,
        3.0,
        1,
    )
    assert math.isclose(rows[a.name]["fair_share"] + rows[b.name]["fair_share"], 1.0)
    assert math.isclose(rows[a.name]["share"] + rows[b.name]["share"], 1.0)
    # The admin's own team has nothing here.
    assert view["team"]["gpus_running"] == 0 and view["team"]["queued_jobs"] == 0
