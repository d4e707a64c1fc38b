"""Live job events for `?stream=true` (and the dashboard): one database poller per streamed job, in
this API process, fanning its events out to every subscriber.

Before, each subscriber ran its own query loop every 0.5 s, so 1,000 streams of one job were 2,000
queries a second and a full core. Now a job's `JobFeed` polls once per tick whatever the number of
subscribers, and keeps the events it has read (a job writes tens of events, not one per step) so
that a subscriber joining late is sent every event from the first, in order, then follows live.

A subscriber only reads the shared list from where it is: nothing is queued per subscriber and the
poller never waits on anyone, so a subscriber whose client reads slowly (or not at all, until the
protocol's send-stall timeout closes it) falls behind alone. The poller stops when its last
subscriber leaves, or once the job has ended and every event has been read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import FastAPI
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Row, select

from service.db import Database
from service.models import Job, JobEvent, JobStatus
from service.schemas import JobEvent as JobEventSchema

log = logging.getLogger("tunepool.api")
POLL_S = 0.5  # how often a streamed job's new events are looked for
BATCH = 500  # events read per query; a full batch is followed at once by the next
ERROR_BACKOFF_S = 5.0  # between polls while the database fails


def event_schema(e: JobEvent | Row[Any]) -> JobEventSchema:
    return JobEventSchema(
        id=e.id, created_at=e.created_at, level=e.level, message=e.message, type=e.type, data=e.data
    )


def sse_event(e: JobEvent | Row[Any]) -> str:
    return f"id: {e.id}\ndata: {event_schema(e).model_dump_json()}\n\n"


def sse_end(job_id: str) -> str:
    return f"event: end\ndata: {json.dumps({'id': job_id})}\n\n"


class JobFeed:
    """One job's events as read so far (server-sent-event text, in order) and whether it has ended."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.events: list[str] = []
        self.ended = False
        self.subscribers = 0
        # Set and replaced each time events arrive (or the feed ends): every waiter wakes once.
        self.changed = asyncio.Event()
        self.stop = asyncio.Event()  # the last subscriber left
        self.poller: asyncio.Task[None] | None = None

    def publish(self, events: list[str], ended: bool) -> None:
        self.events.extend(events)
        self.ended = ended
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


class EventHub:
    """The feeds of this process, by job id."""

    def __init__(self, db: Database, poll_s: float = POLL_S) -> None:
        self.db = db
        self.poll_s = poll_s
        self.feeds: dict[str, JobFeed] = {}
        self._pollers: set[asyncio.Task[None]] = set()
        # The pollers share a quarter of the read connections at most: feeds opened together poll
        # in step, and ten of them at once took every connection from the requests in between
        # (a poll's p99 doubled under 500 streams of 10 jobs, bench/noisy_neighbour.py).
        self._db_share = asyncio.Semaphore(max(1, db.settings.db_pool_size // 4))

    @property
    def subscribers(self) -> int:
        # Read from the /metrics thread too: list() copies without iterating the live dict in Python.
        return sum(feed.subscribers for feed in list(self.feeds.values()))

    @property
    def pollers(self) -> int:
        """Poller tasks still running (one that was told to stop counts until it has)."""
        return sum(1 for task in list(self._pollers) if not task.done())

    async def follow(self, job_id: str) -> AsyncIterator[str]:
        """Every event of the job in order as `id:`/`data:` lines, then `event: end` once it has ended."""
        feed = self.feeds.get(job_id)
        if feed is None:
            feed = self.feeds[job_id] = JobFeed(job_id)
            feed.poller = asyncio.get_running_loop().create_task(self._poll(feed))
            self._pollers.add(feed.poller)
            feed.poller.add_done_callback(self._pollers.discard)
        feed.subscribers += 1
        try:
            sent = 0
            while True:
                changed = feed.changed  # taken before reading: a publish after this wakes the wait
                if sent < len(feed.events):
                    chunk = "".join(feed.events[sent:])  # one send for everything this one missed
                    sent = len(feed.events)
                    yield chunk
                    continue
                if feed.ended:
                    yield sse_end(job_id)
                    return
                await changed.wait()
        finally:
            feed.subscribers -= 1
            if feed.subscribers == 0:
                if self.feeds.get(job_id) is feed:
                    del self.feeds[job_id]  # a later subscriber starts afresh
                feed.stop.set()

    async def _poll(self, feed: JobFeed) -> None:
        last_pk = 0
        while not feed.stop.is_set():
            try:
                async with self._db_share, self.db.read() as conn:
                    # Status first: events written up to the final transition are read after it.
                    status = await conn.scalar(select(Job.status).where(Job.id == feed.job_id))
                    query = select(JobEvent).where(JobEvent.job_id == feed.job_id, JobEvent.pk > last_pk)
                    rows = list(await conn.execute(query.order_by(JobEvent.pk).limit(BATCH)))
            except Exception:
                log.exception("polling the events of job %s failed; retrying", feed.job_id)
                await self._sleep(feed, ERROR_BACKOFF_S)
                continue
            finished = status is None or JobStatus(status).is_terminal
            if rows:
                last_pk = rows[-1].pk
            ended = finished and not rows  # after a terminal status, one more read finds nothing new
            if rows or ended:
                feed.publish([sse_event(r) for r in rows], ended)
            if ended:
                return
            if len(rows) < BATCH:
                await self._sleep(feed, self.poll_s)

    @staticmethod
    async def _sleep(feed: JobFeed, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await feed.stop.wait()


def event_hub(app: FastAPI) -> EventHub:
    """The app's EventHub, made on first use (inside the event loop that serves the streams)."""
    hub: EventHub | None = getattr(app.state, "event_hub", None)
    if hub is None:
        hub = app.state.event_hub = EventHub(app.state.db)
    return hub


class EventStreamGauges(Collector):
    """`tunepool_event_stream_subscribers` and `tunepool_event_stream_pollers` of this process."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        hub: EventHub | None = getattr(self.app.state, "event_hub", None)
        yield GaugeMetricFamily(
            "tunepool_event_stream_subscribers",
            "Open job event streams (?stream=true and the dashboard's) in this API process",
            value=hub.subscribers if hub else 0,
        )
        yield GaugeMetricFamily(
            "tunepool_event_stream_pollers",
            "Database pollers behind them: one per streamed job, however many streams follow it",
            value=hub.pollers if hub else 0,
        )
