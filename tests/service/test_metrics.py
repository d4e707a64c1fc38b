"""GET /metrics: Prometheus text that agrees with the database, and the API's request latency."""

from __future__ import annotations

import math
import secrets
import time
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from service.models import Job, Team, TeamUsage, Worker
from tests.service.conftest import Stack
from tests.service.helpers import new_job, set_job


def scrape(stack: Stack) -> dict[str, list[Any]]:
    response = httpx.get(f"{stack.url}/metrics", timeout=30)  # no key: /metrics needs none
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def test_job_counts_match_the_database(stack: Stack) -> None:
    client = stack.team()
    now = int(time.time())
    ids = [new_job(stack, client)["id"] for _ in range(5)]
    set_job(stack, ids[0], status="running", started_at=now - 30, created_at=now - 40)
    set_job(
        stack, ids[1], status="succeeded", started_at=now - 100, created_at=now - 103, finished_at=now - 10
    )
    set_job(stack, ids[2], status="failed", started_at=now - 50, created_at=now - 52, finished_at=now - 45)
    set_job(stack, ids[3], status="cancelled", finished_at=now)  # cancelled while queued: never started
    with stack.db.session() as session:
        session.merge(
            Worker(id=f"w-{client.name}", pool="metrics-pool", hostname="h", gpu_name="cpu",
                   started_at=time.time(), last_heartbeat_at=time.time())
        )  # fmt: skip
        session.commit()
        expected = {
            (status, pool, team): count
            for team, pool, status, count in session.execute(
                select(Team.name, Job.pool, Job.status, func.count())
                .join(Team, Team.id == Job.team_id)
                .group_by(Team.name, Job.pool, Job.status)
            )
        }
        running = session.scalar(select(func.count()).where(Job.status == "running", Job.pool == "default"))
        started = session.scalar(
            select(func.count()).where(Job.started_at.is_not(None), Job.pool == "default")
        )

    samples = scrape(stack)
    found = {
        (s.labels["status"], s.labels["pool"], s.labels["team"]): s.value for s in samples["tunepool_jobs"]
    }
    assert found == expected
    assert {k: v for k, v in found.items() if k[2] == client.name} == {
        ("running", "default", client.name): 1,
        ("succeeded", "default", client.name): 1,
        ("failed", "default", client.name): 1,
        ("cancelled", "default", client.name): 1,
        ("queued", "default", client.name): 1,
    }
    running_gauge = {s.labels["pool"]: s.value for s in samples["tunepool_jobs_running"]}
    assert running_gauge["default"] == running
    alive = {s.labels["pool"]: s.value for s in samples["tunepool_workers_alive"]}
    assert alive["metrics-pool"] == 1

    # Queue wait: every started job of the pool is counted; buckets are cumulative and end at +Inf.
    waits = [s for s in samples["tunepool_job_queue_wait_seconds_bucket"] if s.labels["pool"] == "default"]
    assert waits[-1].labels["le"] == "+Inf" and waits[-1].value == started
    assert [s.value for s in waits] == sorted(s.value for s in waits)
    counts = {s.labels["pool"]: s.value for s in samples["tunepool_job_queue_wait_seconds_count"]}
    assert counts["default"] == started
    # Duration, by final status: our succeeded job took 90 s, our failed one 5 s.
    durations = samples["tunepool_job_duration_seconds_bucket"]
    succeeded = {s.labels["le"]: s.value for s in durations if s.labels["status"] == "succeeded"}
    failed = {s.labels["le"]: s.value for s in durations if s.labels["status"] == "failed"}
    assert succeeded["+Inf"] >= 1 and failed["+Inf"] >= 1
    assert failed["10.0"] >= 1
    assert not any(s.labels["status"] == "cancelled" for s in durations)  # never started: no duration


def test_pool_gpus_team_usage_and_preemptions(stack: Stack) -> None:
    pool = stack.declare_pool(f"metrics-{secrets.token_hex(4)}")
    client = stack.team()
    now = time.time()
    with stack.db.session() as session:
        for name, slots, free, beat in (("a", 4, 1, now), ("b", 2, 2, now), ("dead", 8, 8, now - 3600)):
            session.add(
                Worker(id=f"{pool}-{name}", pool=pool, hostname=name, gpu_name="H100", slots=slots,
                       free_slots=free, started_at=now - 600, last_heartbeat_at=beat)
            )  # fmt: skip
        # 7200 GPU-seconds a half-life (TUNEPOOL_FAIRSHARE_HALF_LIFE_S: a day) ago count 3600 now.
        session.add(TeamUsage(team_id=client.team_id, pool=pool, gpu_seconds=7200.0, as_of=now - 86400))
        session.commit()
    running, done, queued = (new_job(stack, client, pool=pool)["id"] for _ in range(3))
    set_job(stack, running, status="running", gpus=3, worker_id=f"{pool}-a", preemptions=1)
    set_job(stack, done, status="succeeded", gpus=2, preemptions=2, finished_at=int(now))
    set_job(stack, queued, preemptions=4)
    waiting = stack.team()
    new_job(stack, waiting, pool=pool)

    samples = scrape(stack)
    gpus = {s.labels["state"]: s.value for s in samples["tunepool_gpus"] if s.labels["pool"] == pool}
    assert gpus == {"total": 6, "busy": 3, "free": 3}  # the dead worker's 8 slots count nowhere
    team_gpus = {(s.labels["team"], s.labels["pool"]): s.value for s in samples["tunepool_team_gpus_running"]}
    assert team_gpus[client.name, pool] == 3  # the running job's GPUs; the finished one's are free
    assert team_gpus[waiting.name, pool] == 0  # jobs in the pool, none running: 0, not absent
    usage = {
        (s.labels["team"], s.labels["pool"]): s.value for s in samples["tunepool_team_gpu_seconds_total"]
    }
    assert math.isclose(usage[client.name, pool], 3600.0, abs_tol=5.0)
    preemptions = {s.labels["pool"]: s.value for s in samples["tunepool_preemptions_total"]}
    assert preemptions[pool] == 7


def _latency_count(samples: dict[str, list[Any]], route: str, status: str) -> float:
    return sum(
        s.value
        for s in samples.get("tunepool_http_request_duration_seconds_count", [])
        if s.labels["route"] == route and s.labels["status"] == status and s.labels["method"] == "GET"
    )


def test_request_latency_histogram_counts_requests(stack: Stack) -> None:
    client = stack.team()
    job_id = new_job(stack, client)["id"]
    route = "/v1/fine_tuning/jobs/{fine_tuning_job_id}"
    before = scrape(stack)
    for _ in range(3):
        assert client.get(f"/v1/fine_tuning/jobs/{job_id}").status_code == 200
    assert client.get("/v1/fine_tuning/jobs/ftjob-nosuchjob").status_code == 404
    assert httpx.get(f"{stack.url}/no/such/route", timeout=30).status_code == 404
    after = scrape(stack)
    assert _latency_count(after, route, "2xx") - _latency_count(before, route, "2xx") == 3
    assert _latency_count(after, route, "4xx") - _latency_count(before, route, "4xx") == 1
    assert _latency_count(after, "unmatched", "4xx") >= 1
    assert _latency_count(after, "/metrics", "2xx") >= 1  # the first scrape was observed by the second
    buckets = [
        s
        for s in after["tunepool_http_request_duration_seconds_bucket"]
        if s.labels["route"] == route and s.labels["status"] == "2xx"
    ]
    assert buckets[-1].labels["le"] == "+Inf"
    assert buckets[-1].value == _latency_count(after, route, "2xx")
