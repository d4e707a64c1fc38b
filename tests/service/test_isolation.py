"""Teams are walled off: for every endpoint that takes an id (in its path, as a list cursor, in a job's
body, on the dashboard), another team's id gets exactly the answer that an id which does not exist
gets (same status, same body once the id is swapped), while the owner does reach the resource.

The matrix is checked against the app's route table: a new route with a path parameter or an
`after` cursor fails `test_every_id_taking_route_is_in_the_matrix` until it has a probe here.

Views of what teams share (the pool: its nodes, GPUs and queue) take no id but show every team's
work: SHARED_VIEWS lists them, and another team's ids, name and metadata must appear nowhere in
what they answer, while the owner does see its own there.
"""

from __future__ import annotations

import json
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import iter_route_contexts

from service.api.ui import COOKIE, csrf_token
from service.main import create_app
from service.models import WebhookDelivery, Worker
from service.pools import declare_pool
from service.settings import load_settings
from tests.service.conftest import Stack
from tests.service.helpers import MODEL, add_checkpoint, add_metrics, new_file, new_job, set_job

# Mounted apps that take a path, and the test that proves they stay inside their directory.
KNOWN_MOUNTS = {"/ui/static": "tests/service/test_security.py::test_no_path_parameter_reaches_outside"}


def route_table() -> list[tuple[str, str, list[str], list[str]]]:
    """(method, path template, path parameters, query parameters) of every route of the real app."""
    with tempfile.TemporaryDirectory() as home:
        app = create_app(load_settings(home=Path(home)))
        table = []
        for route in iter_route_contexts(app.routes):
            params = list(getattr(route, "param_convertors", {}) or {})
            dependant = getattr(route, "dependant", None)
            query = [q.name for q in dependant.query_params] if dependant is not None else []
            for method in sorted(route.methods or {"*"}):
                table.append((method, str(route.path), params, query))
        app.state.db.dispose()
    return table


def id_taking_routes() -> set[str]:
    """The "METHOD /path" of every route that takes an id: a path parameter or an `after` cursor."""
    return {f"{m} {p}" for m, p, params, query in route_table() if params or "after" in query} - {
        f"* {mount}" for mount in KNOWN_MOUNTS
    }


@dataclass(frozen=True)
class Probe:
    route: str  # "METHOD /path/template" exactly as in the route table
    url: str  # the request; {placeholders} are ids of the World below
    body: dict[str, Any] | None = None  # JSON body; its strings may hold placeholders too
    via: str = "key"  # "key": Bearer header; "ui": the dashboard's cookie (and its CSRF form field)
    denied: int = 404  # what the other team gets, for the owner's id and for a missing one alike


J, F, W, A, U = "/v1/fine_tuning/jobs", "/v1/files", "/v1/webhooks", "/v1/admin", "/ui/jobs"
JOB_BODY = {"model": MODEL, "method": {"type": "dft"}}
MATRIX = [
    Probe(f"GET {F}/{{file_id}}", f"{F}/{{file}}"),
    Probe(f"GET {F}/{{file_id}}/content", f"{F}/{{file}}/content"),
    Probe(f"DELETE {F}/{{file_id}}", f"{F}/{{file}}"),
    Probe(f"GET {F}", f"{F}?after={{file}}", denied=400),
    Probe(f"GET {J}/{{fine_tuning_job_id}}", f"{J}/{{job}}"),
    Probe(f"GET {J}", f"{J}?after={{job}}", denied=400),
    Probe(f"POST {J}/{{fine_tuning_job_id}}/cancel", f"{J}/{{job}}/cancel"),
    Probe(f"POST {J}/{{fine_tuning_job_id}}/pause", f"{J}/{{job}}/pause"),
    Probe(f"POST {J}/{{fine_tuning_job_id}}/resume", f"{J}/{{job}}/resume"),
    Probe(f"GET {J}/{{fine_tuning_job_id}}/events", f"{J}/{{job}}/events"),
    Probe(f"GET {J}/{{fine_tuning_job_id}}/events", f"{J}/{{job}}/events?stream=true"),
    Probe(f"GET {J}/{{fine_tuning_job_id}}/events", f"{J}/{{own_job}}/events?after={{event}}", denied=400),
    Probe(f"GET {J}/{{fine_tuning_job_id}}/checkpoints", f"{J}/{{job}}/checkpoints"),
    Probe(
        f"GET {J}/{{fine_tuning_job_id}}/checkpoints",
        f"{J}/{{own_job}}/checkpoints?after={{ckpt}}",
        denied=400,
    ),
    Probe(
        f"GET {J}/{{fine_tuning_job_id}}/checkpoints/{{checkpoint_id}}/content",
        f"{J}/{{job}}/checkpoints/{{ckpt}}/content",
    ),
    Probe(
        f"GET {J}/{{fine_tuning_job_id}}/checkpoints/{{checkpoint_id}}/content",
        f"{J}/{{own_job}}/checkpoints/{{ckpt}}/content",
    ),
    Probe(f"GET {J}/{{fine_tuning_job_id}}/metrics", f"{J}/{{job}}/metrics"),
    Probe(f"POST {J}", J, {**JOB_BODY, "training_file": "{file}"}, denied=400),
    Probe(
        f"POST {J}", J, {**JOB_BODY, "training_file": "{own_file}", "validation_file": "{file}"}, denied=400
    ),
    Probe(f"POST {J}", J, {**JOB_BODY, "model": "{model}", "training_file": "{own_file}"}, denied=400),
    Probe("GET /v1/models/{model_id:path}", "/v1/models/{model}"),
    Probe(f"DELETE {W}/{{webhook_id}}", f"{W}/{{webhook}}"),
    Probe(f"GET {W}/{{webhook_id}}/deliveries", f"{W}/{{webhook}}/deliveries"),
    Probe(f"POST {W}/{{webhook_id}}/rotate_secret", f"{W}/{{webhook}}/rotate_secret"),
    Probe(f"GET {W}/{{webhook_id}}/deliveries", f"{W}/{{own_webhook}}/deliveries?after={{delivery}}"),
    # Admin routes take names, not ids, and manage every team: a team's own key gets the same 403
    # for a team, key or model that exists as for one that does not (no existence oracle).
    Probe(f"GET {A}/teams/{{name}}", f"{A}/teams/{{team}}", denied=403),
    Probe(
        f"PATCH {A}/teams/{{name}}/quota", f"{A}/teams/{{team}}/quota", {"max_running_jobs": 3}, denied=403
    ),
    Probe(f"GET {A}/teams/{{name}}/keys", f"{A}/teams/{{team}}/keys", denied=403),
    Probe(f"POST {A}/teams/{{name}}/keys", f"{A}/teams/{{team}}/keys", denied=403),
    Probe(f"POST {A}/keys/{{prefix}}/revoke", f"{A}/keys/{{prefix}}/revoke", denied=403),
    Probe(f"DELETE {A}/models/{{name:path}}", f"{A}/models/{{base}}", denied=403),
    Probe(f"DELETE {A}/pools/{{name}}", f"{A}/pools/{{pool}}", denied=403),
    # The dashboard signs in with a cookie; its pages and its JSON answer the same way.
    Probe(f"GET {U}/{{job_id}}", f"{U}/{{job}}", via="ui"),
    Probe(f"GET {U}/{{job_id}}/data", f"{U}/{{job}}/data", via="ui"),
    Probe(f"GET {U}/{{job_id}}/events", f"{U}/{{job}}/events", via="ui"),
    Probe(
        f"GET {U}/{{job_id}}/checkpoints/{{checkpoint_id}}/content",
        f"{U}/{{job}}/checkpoints/{{ckpt}}/content",
        via="ui",
    ),
    Probe(
        f"GET {U}/{{job_id}}/checkpoints/{{checkpoint_id}}/content",
        f"{U}/{{own_job}}/checkpoints/{{ckpt}}/content",
        via="ui",
    ),
    Probe(f"POST {U}/{{job_id}}/cancel", f"{U}/{{job}}/cancel", via="ui"),
    Probe(f"POST {U}/{{job_id}}/pause", f"{U}/{{job}}/pause", via="ui"),
    Probe(f"POST {U}/{{job_id}}/resume", f"{U}/{{job}}/resume", via="ui"),
]
FAKE = {
    "file": "file-XXXXXXXXXXXXXXXXXXXXXXXX",
    "job": "ftjob-XXXXXXXXXXXXXXXXXXXXXXXX",
    "ckpt": "ftckpt-XXXXXXXXXXXXXXXXXXXXXXXX",
    "event": "ftevent-XXXXXXXXXXXXXXXXXXXXXXXX",
    "model": f"ft:{MODEL}:nobody:x:ftjob-X",
    "webhook": "wh_XXXXXXXXXXXXXXXXXXXXXXXX",
    "delivery": "whdel_XXXXXXXXXXXXXXXXXXXXXXXX",
    "team": "team-nobody",
    "prefix": "tp-XXXXXXXX",
    "base": "no-such-model",
    "pool": "no-such-pool",
}
# Swapped in this order: the model name contains the job id and the team name.
SWAP_ORDER = (
    "model", "ckpt", "event", "delivery", "file", "job", "webhook", "team", "prefix", "base", "pool"
)  # fmt: skip


def test_every_id_taking_route_is_in_the_matrix() -> None:
    table = route_table()
    probed = {p.route for p in MATRIX}
    missing = id_taking_routes() - probed
    assert not missing, f"routes that take an id but have no isolation probe in MATRIX: {sorted(missing)}"
    assert probed <= {f"{m} {p}" for m, p, _, _ in table}, "MATRIX probes a route the app no longer has"
    mounts = {p for m, p, params, _ in table if m == "*" and params}
    assert mounts == set(KNOWN_MOUNTS), f"mounted apps taking a path: {mounts}; prove them safe"


def fill(template: Any, ids: dict[str, str]) -> Any:
    if isinstance(template, str):
        return template.format(**ids)
    if isinstance(template, dict):
        return {k: fill(v, ids) for k, v in template.items()}
    return template


def world(stack: Stack) -> tuple[dict[str, str], dict[str, Any]]:
    """Team a's resources of every kind, and team b with a job, a file and a webhook of its own."""
    a, b = stack.team(), stack.team()
    file_id = new_file(a)
    job = new_job(stack, a, file_id)
    ckpt = add_checkpoint(stack, job["id"], 3, {"config.json": b"{}"})
    add_metrics(stack, job["id"], 3)
    model = f"ft:{MODEL}:{a.name}:x:{job['id']}"
    set_job(stack, job["id"], status="succeeded", fine_tuned_model=model, finished_at=1)
    event = a.get(f"{J}/{job['id']}/events").json()["data"][0]["id"]
    webhook = a.post(W, json={"url": "https://example.invalid/hook"}).json()["id"]
    with stack.db.session() as session:
        delivery = WebhookDelivery(
            endpoint_id=webhook, event_id="evt_1", event_type="fine_tuning.job.succeeded",
            job_id=job["id"], payload="{}", status="delivered",
        )  # fmt: skip
        session.add(delivery)
        session.commit()
        delivery_id = delivery.id
    base, pool = f"iso-{secrets.token_hex(4)}", f"iso-{secrets.token_hex(4)}"
    stack.add_model(base, stack.model_dir("tiny"))
    with stack.db.session() as session:
        declare_pool(session, pool, "admin")  # no model, no job: an admin may remove it
        session.commit()
    own_file = new_file(b)
    ids = {
        "file": file_id, "job": job["id"], "ckpt": ckpt, "event": event, "model": model,
        "webhook": webhook, "delivery": delivery_id, "team": a.name, "prefix": a.key[:11], "base": base,
        "pool": pool,
        "own_job": new_job(stack, b, own_file)["id"], "own_file": own_file,
        "own_webhook": b.post(W, json={"url": "https://example.invalid/b"}).json()["id"],
    }  # fmt: skip
    return ids, {"a": a, "b": b}


def send(stack: Stack, key: str, probe: Probe, ids: dict[str, str]) -> httpx.Response:
    method = probe.route.split(" ", 1)[0]
    if probe.via == "ui":
        client = stack.client()
        client.cookies.set(COOKIE, key)
        data = {"csrf": csrf_token(key)} if method == "POST" else None
        return client.request(method, fill(probe.url, ids), data=data)
    return stack.client(key).request(method, fill(probe.url, ids), json=fill(probe.body, ids))


@pytest.mark.parametrize("probe", MATRIX, ids=lambda p: f"{p.route} {p.url} {p.via}")
def test_another_teams_id_is_indistinguishable_from_a_missing_one(stack: Stack, probe: Probe) -> None:
    real, teams = world(stack)
    a, b = teams["a"], teams["b"]
    theirs = send(stack, b.key, probe, real)
    missing = send(stack, b.key, probe, {**real, **FAKE})
    assert theirs.status_code == missing.status_code == probe.denied, (theirs.text, missing.text)
    text_theirs = theirs.text
    for name in SWAP_ORDER:
        text_theirs = text_theirs.replace(real[name], FAKE[name])  # swap the ids, compare the rest
    if "json" in theirs.headers["content-type"]:
        assert json.loads(text_theirs) == missing.json()
    else:  # a dashboard page
        assert text_theirs == missing.text

    # Nothing changed for the owner, who does reach the resource (so the answer was about ownership):
    # team a through its key or cookie, or an admin key for the admin routes.
    assert a.get(f"{F}/{real['file']}").status_code == 200
    assert a.get(f"{J}/{real['job']}").json()["status"] == "succeeded"
    owner_key = stack.team(admin=True).key if probe.denied == 403 else a.key
    own = {**real, "own_job": real["job"], "own_webhook": real["webhook"], "own_file": real["file"]}
    owner = send(stack, owner_key, probe, own)
    # a finished job cannot be cancelled, paused or resumed: 409
    moves = probe.route.endswith(("/cancel", "/pause", "/resume")) and probe.via == "key"
    assert owner.status_code == 409 if moves else owner.status_code < 400, owner.text


# Routes that show what every team shares, each team's part of it filtered: (route as in the route
# table, request, via). A team's own jobs there by id; another team's only as the GPUs they hold.
SHARED_VIEWS = [
    Probe("GET /v1/pool", "/v1/pool"),
    Probe("GET /ui/pool", "/ui/pool", via="ui"),
    Probe("GET /ui/pool", "/ui/pool?partial=1", via="ui"),
]


def test_every_shared_view_is_a_route() -> None:
    routes = {f"{m} {p}" for m, p, _, _ in route_table()}
    assert {v.route for v in SHARED_VIEWS} <= routes, "SHARED_VIEWS names a route the app no longer has"


def pool_world(stack: Stack) -> tuple[dict[str, str], dict[str, Any]]:
    """`world`, plus a pool both teams use: team a runs a job on its live node and queues another
    (with metadata and a reason), team b queues one there too."""
    ids, teams = world(stack)
    a, b = teams["a"], teams["b"]
    pool = stack.declare_pool(f"iso-shared-{secrets.token_hex(4)}")
    now = time.time()
    with stack.db.session() as session:
        node = Worker(id=f"iso-node-{secrets.token_hex(4)}", pool=pool, hostname="iso-node", gpu_name="H100",
                      slots=4, free_slots=2, started_at=now, last_heartbeat_at=now)  # fmt: skip
        session.add(node)
        session.commit()
        node_id = node.id
    running = new_job(stack, a, pool=pool, suffix="a-suffix", metadata={"owner": "a-metadata"})["id"]
    queued = new_job(stack, a, pool=pool, metadata={"owner": "a-metadata"})["id"]
    set_job(stack, running, status="running", worker_id=node_id, gpus=2, started_at=int(now))
    set_job(stack, queued, queue_reason="a-reason: waiting for 2 free GPUs")
    new_job(stack, b, pool=pool)
    extra = {"running": running, "queued": queued, "team_id": a.team_id, "shared_pool": pool}
    return {**ids, **extra}, teams


@pytest.mark.parametrize("view", SHARED_VIEWS, ids=lambda v: f"{v.url} {v.via}")
def test_a_shared_view_shows_no_other_teams_ids_names_or_metadata(stack: Stack, view: Probe) -> None:
    real, teams = pool_world(stack)
    a, b = teams["a"], teams["b"]
    theirs = send(stack, b.key, view, real)
    assert theirs.status_code == 200, theirs.text
    secrets_of_a = [real[k] for k in ("file", "job", "ckpt", "event", "model", "webhook", "delivery", "team",
                                      "prefix", "running", "queued", "team_id")]  # fmt: skip
    for secret in [*secrets_of_a, "a-suffix", "a-metadata", "a-reason"]:
        assert secret not in theirs.text, (secret, view)
    # ...and yet a's running job is there, as two GPUs of another team (so the view was not empty).
    assert real["shared_pool"] in theirs.text
    if view.via == "ui":  # the pool's section of the page (other tests' pools have nodes too)
        section = theirs.text.split(f'data-pool="{real["shared_pool"]}"', 1)[1].split("</section>", 1)[0]
        assert section.count('title="another team (2 GPUs)"') == 2
    else:
        pool = next(p for p in theirs.json()["data"] if p["name"] == real["shared_pool"])
        assert pool["nodes"][0]["jobs"] == [{"id": None, "team": None, "own": False, "gpus": 2}]
        assert pool["queue"] == {"jobs": 2, "gpus": 2}
    # The owner sees its own jobs there by id, and the queued one's reason.
    owner = send(stack, a.key, view, real)
    assert owner.status_code == 200
    for own in (real["running"], real["queued"], "a-reason", a.name):
        assert own in owner.text, own
