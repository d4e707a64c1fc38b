"""Prometheus metrics: `GET /metrics`, text format.

Access: with TUNEPOOL_METRICS_TOKEN set, a scrape must send `Authorization: Bearer <token>` (401
otherwise, before anything is read); unset, /metrics is open to whoever reaches the port, and its
series name every team (`tunepool_jobs{team=...}`). Prometheus sends the token with
`authorization: {credentials: ...}` (or `bearer_token`) in the scrape config.

Two kinds of series:
- Computed from the database when scraped (`DatabaseCollector`), so every API replica answers the
  same numbers whichever process or worker changed them: jobs by status, pool and team; running
  jobs and live workers (heartbeat within `lease_s`) by pool; the live workers' GPU slots by pool
  and state (total, busy, free); GPUs running and decayed GPU-seconds used (the fair-share usage of
  service/pool_view.py) by team and pool; preemptions by pool; webhook deliveries by status; and two
  histograms over jobs, queue wait (created_at -> started_at, every job that started) and duration
  (started_at -> finished_at, every job that finished, by final status). The buckets are counted
  in SQL over all jobs (one `SUM(CASE WHEN x <= le ...)` aggregate per histogram, grouped by pool):
  each scrape is a handful of GROUP BY scans that send back a few rows, not jobs. All jobs rather
  than the most recent N, because Prometheus histograms must be cumulative counters (`rate()`
  over a sliding window of jobs would go backwards as old jobs leave it).
- Observed in this process: API request latency, by method, route template and status class, from
  `RequestLatency`, a pure-ASGI middleware (one perf_counter pair and a cached histogram child per
  request; no BaseHTTPMiddleware, which would cost the hot job poll a task and a copy of the body).
  With several API processes each answers its own; Prometheus sums them across targets.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterable, Iterator
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.db import Database
from service.errors import APIError, error_responses
from service.event_hub import EventStreamGauges
from service.models import Job, Team, WebhookDelivery, Worker
from service.pool_view import alive, usage_now
from service.settings import Settings

# Seconds. Queue waits run from instant to hours; jobs from a minute to days.
QUEUE_WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
DURATION_BUCKETS = (10, 30, 60, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400, 259200)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

router = APIRouter(tags=["health"])


def _histogram_rows(
    session: Session,
    value: ColumnElement[Any],
    where: ColumnElement[bool],
    groups: list[Any],
    buckets: Iterable[int],
) -> list[Any]:
    """Per group: count, sum and the cumulative count at or under each bucket bound, in one scan."""
    per_bucket = [func.sum(case((value <= bound, 1), else_=0)) for bound in buckets]
    return list(
        session.execute(
            select(*groups, func.count(), func.coalesce(func.sum(value), 0), *per_bucket)
            .where(where)
            .group_by(*groups)
        ).all()
    )


def _histogram(name: str, doc: str, labels: list[str], rows: list[Any], buckets: tuple[int, ...]) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=labels)
    n = len(labels)
    for row in rows:
        count, total, cumulative = int(row[n]), float(row[n + 1]), row[n + 2 :]
        points = [(str(float(b)), int(c or 0)) for b, c in zip(buckets, cumulative, strict=True)]
        family.add_metric([str(v) for v in row[:n]], [*points, ("+Inf", count)], total)
    return family


class DatabaseCollector(Collector):
    """The database's view of the system, computed at scrape time with GROUP BY queries."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings

    def describe(self) -> Iterable[Metric]:
        return []  # registering must not query the database

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        with self.db.session() as session:
            # One scan for the counts, the GPUs of running jobs and the preemptions.
            jobs = session.execute(
                select(
                    Team.name,
                    Job.pool,
                    Job.status,
                    func.count(),
                    func.coalesce(func.sum(Job.gpus), 0),
                    func.coalesce(func.sum(Job.preemptions), 0),
                )
                .join(Team, Team.id == Job.team_id)
                .group_by(Team.name, Job.pool, Job.status)
            ).all()
            live = alive(now, self.settings.lease_s)
            workers = session.execute(
                select(
                    Worker.pool,
                    func.sum(case((live, 1), else_=0)),
                    func.sum(case((live, Worker.slots), else_=0)),
                    func.sum(case((live, Worker.free_slots), else_=0)),
                ).group_by(Worker.pool)
            ).all()
            usage = usage_now(session, now, self.settings.fairshare_half_life_s)
            named = select(Team.id, Team.name).where(Team.id.in_({t for t, _ in usage}))
            team_names = dict(session.execute(named).tuples().all())
            deliveries = session.execute(
                select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)
            ).all()
            waits = _histogram_rows(
                session,
                Job.started_at - Job.created_at,
                Job.started_at.is_not(None),
                [Job.pool],
                QUEUE_WAIT_BUCKETS,
            )
            durations = _histogram_rows(
                session,
                Job.finished_at - Job.started_at,
                Job.finished_at.is_not(None) & Job.started_at.is_not(None),
                [Job.pool, Job.status],
                DURATION_BUCKETS,
            )

        by_status = GaugeMetricFamily(
            "tunepool_jobs", "Jobs by status, pool and team", labels=["status", "pool", "team"]
        )
        pools = {row[1] for row in jobs} | {row[0] for row in workers}
        running: dict[str, int] = dict.fromkeys(pools, 0)
        preemptions: dict[str, int] = {row[1]: 0 for row in jobs}
        team_gpus: dict[tuple[str, str], int] = {(row[0], row[1]): 0 for row in jobs}
        for team, pool, status, count, gpus, preempted in jobs:
            by_status.add_metric([status, pool, team], int(count))
            preemptions[pool] += int(preempted)
            if status == "running":
                running[pool] += int(count)
                team_gpus[team, pool] += int(gpus)
        yield by_status
        gauge = GaugeMetricFamily("tunepool_jobs_running", "Running jobs by pool", labels=["pool"])
        for pool, count in sorted(running.items()):
            gauge.add_metric([pool], count)
        yield gauge
        gauge = GaugeMetricFamily(
            "tunepool_workers_alive", "Workers that heartbeat within lease_s, by pool", labels=["pool"]
        )
        for pool, count, _, _ in workers:
            gauge.add_metric([pool], int(count or 0))
        yield gauge
        gauge = GaugeMetricFamily(
            "tunepool_gpus",
            "GPU slots of the live workers by pool: total, busy (taken by jobs) and free",
            labels=["pool", "state"],
        )
        for pool, _, slots, free in workers:
            total, free = int(slots or 0), int(free or 0)
            for state, value in (("total", total), ("busy", total - free), ("free", free)):
                gauge.add_metric([pool, state], value)
        yield gauge
        gauge = GaugeMetricFamily(
            "tunepool_team_gpus_running", "GPUs of running jobs by team and pool", labels=["team", "pool"]
        )
        for (team, pool), gpus in sorted(team_gpus.items()):
            gauge.add_metric([team, pool], gpus)
        yield gauge
        gauge = GaugeMetricFamily(
            "tunepool_team_gpu_seconds_total",
            "GPU-seconds used by team and pool, decayed to now (half life TUNEPOOL_FAIRSHARE_HALF_LIFE_S): "
            "the fair-share usage",
            labels=["team", "pool"],
        )
        for (team_id, pool), gpu_seconds in sorted(usage.items()):
            if team_id in team_names:
                gauge.add_metric([team_names[team_id], pool], gpu_seconds)
        yield gauge
        gauge = GaugeMetricFamily(
            "tunepool_preemptions_total",
            "Preemptions of the pool's jobs (the sum of their counts)",
            labels=["pool"],
        )
        for pool, count in sorted(preemptions.items()):
            gauge.add_metric([pool], count)
        yield gauge
        gauge = GaugeMetricFamily(
            "tunepool_webhook_deliveries", "Webhook deliveries by status", labels=["status"]
        )
        for status, count in deliveries:
            gauge.add_metric([status], int(count))
        yield gauge
        yield _histogram(
            "tunepool_job_queue_wait_seconds",
            "Seconds from creation to first start, of every job that started",
            ["pool"],
            waits,
            QUEUE_WAIT_BUCKETS,
        )
        yield _histogram(
            "tunepool_job_duration_seconds",
            "Seconds from start to finish, of every finished job that ran",
            ["pool", "status"],
            durations,
            DURATION_BUCKETS,
        )


class RequestLatency:
    """Pure-ASGI middleware: observes each HTTP request's latency, labelled by method, route template
    (the path of the route that matched, `unmatched` otherwise) and status class (2xx, 4xx, ...)."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram
        self._children: dict[tuple[str, str, str], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            key = (scope["method"], route, f"{status // 100}xx")
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self.histogram.labels(*key)
            child.observe(time.perf_counter() - start)


async def require_scrape_token(request: Request) -> None:
    """401 unless the request carries the configured scrape token (none configured: open)."""
    settings: Settings = request.app.state.settings
    if not settings.metrics_token:
        return
    expected = f"Bearer {settings.metrics_token}".encode()
    # Constant time: how much of a guess matched must not show in how long the answer takes.
    if not hmac.compare_digest(request.headers.get("authorization", "").encode(), expected):
        raise APIError(
            401,
            "GET /metrics needs 'Authorization: Bearer <TUNEPOOL_METRICS_TOKEN>'",
            code="invalid_metrics_token",
            headers={"WWW-Authenticate": "Bearer"},
        )


@router.get(
    "/metrics",
    summary="Prometheus metrics (text format); a bearer token when TUNEPOOL_METRICS_TOKEN is set",
    response_class=Response,
    dependencies=[Depends(require_scrape_token)],
    responses=error_responses(401),
)
def metrics(request: Request) -> Response:
    registry: CollectorRegistry = request.app.state.metrics_registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def install(app: FastAPI, db: Database, settings: Settings) -> None:
    """`GET /metrics` and the latency middleware, on a registry of this app's own."""
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(db, settings))
    registry.register(EventStreamGauges(app))  # this process's event streams and their pollers
    latency = Histogram(
        "tunepool_http_request_duration_seconds",
        "API request latency, by method, route template and status class",
        ["method", "route", "status"],
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    app.state.metrics_registry = registry
    app.add_middleware(RequestLatency, histogram=latency)
    app.include_router(router)
