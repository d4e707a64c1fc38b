"""Live event streams (`?stream=true`) share one database poller per job (service/event_hub.py).

Against a real API process on both databases: 200 streams of one job cost one poller, every
subscriber (early, late, or next to one whose client reads nothing) receives every event in order
and the `end`, and the poller stops when its last subscriber leaves."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import select

from service.jobs import add_event
from service.models import Job, JobEvent
from tests.service.conftest import Stack
from tests.service.helpers import new_job
from tests.service.raw_http import Api, head, second_api

STREAMS = 200


@pytest.fixture(scope="module")
def api(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    # A cap above the 200 streams of one team this module opens (the cap: test_team_limits.py).
    with second_api(
        stack, tmp_path_factory.mktemp("streams-api"), team_max_event_streams=STREAMS + 50
    ) as api:
        yield api


def add_events(stack: Stack, job_id: str, messages: list[str]) -> None:
    """What a worker writes as the job runs."""
    with stack.db.session() as session:
        job = session.scalars(select(Job).where(Job.id == job_id)).one()
        for message in messages:
            add_event(session, job, message)
        session.commit()


def event_ids(stack: Stack, job_id: str) -> list[str]:
    with stack.db.session() as session:
        return list(
            session.scalars(select(JobEvent.id).where(JobEvent.job_id == job_id).order_by(JobEvent.pk))
        )


def wait_for(predicate: object, what: str, limit_s: float = 20.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def follow(client: httpx.AsyncClient, job_id: str, started: list[int]) -> tuple[list[str], bool]:
    """The event ids one subscriber receives, in order, and whether it got `event: end`."""
    ids: list[str] = []
    async with client.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"stream": "true"}) as r:
        assert r.status_code == 200, await r.aread()
        started.append(1)
        async for line in r.aiter_lines():
            if line.startswith("id: "):
                ids.append(line[4:])
            elif line == "event: end":
                return ids, True
    return ids, False


def test_many_streams_of_one_job_share_one_poller(stack: Stack, api: Api) -> None:
    team = stack.team()
    job = new_job(stack, team)
    job_id = job["id"]
    add_events(stack, job_id, [f"before anyone listens {i}" for i in range(5)])
    results: list[tuple[list[str], bool]] = []
    late_results: list[tuple[list[str], bool]] = []

    async def scenario() -> None:
        limits = httpx.Limits(max_connections=STREAMS + 20, max_keepalive_connections=0)
        async with httpx.AsyncClient(
            base_url=api.url, headers={"Authorization": f"Bearer {team.key}"}, timeout=60, limits=limits
        ) as client:
            started: list[int] = []
            early = [asyncio.create_task(follow(client, job_id, started)) for _ in range(STREAMS)]
            while len(started) < STREAMS:
                await asyncio.sleep(0.05)
            # Every stream is open: one poller behind them all.
            subscribers, pollers = await asyncio.to_thread(
                lambda: (
                    api.gauge("tunepool_event_stream_subscribers"),
                    api.gauge("tunepool_event_stream_pollers"),
                )
            )
            assert (subscribers, pollers) == (STREAMS, 1)
            await asyncio.to_thread(add_events, stack, job_id, [f"live {i}" for i in range(10)])
            await asyncio.sleep(1.5)  # the live events have been read and sent
            late_started: list[int] = []
            late = [asyncio.create_task(follow(client, job_id, late_started)) for _ in range(10)]
            while len(late_started) < 10:
                await asyncio.sleep(0.05)
            assert await asyncio.to_thread(api.gauge, "tunepool_event_stream_pollers") == 1
            await asyncio.to_thread(add_events, stack, job_id, [f"more {i}" for i in range(5)])
            cancel = await client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
            assert cancel.status_code == 200, cancel.text
            results.extend(await asyncio.wait_for(asyncio.gather(*early), 30))
            late_results.extend(await asyncio.wait_for(asyncio.gather(*late), 30))

    asyncio.run(scenario())
    expected = event_ids(stack, job_id)
    assert len(expected) >= 21  # created + 5 + 10 + 5 + cancelled
    for ids, ended in results + late_results:
        assert ended and ids == expected  # every event, in order, once; then the end
    wait_for(lambda: api.gauge("tunepool_event_stream_pollers") == 0, "the poller to stop")
    assert api.gauge("tunepool_event_stream_subscribers") == 0


def test_a_subscriber_that_reads_nothing_stalls_no_other(stack: Stack, api: Api) -> None:
    team = stack.team()
    job_id = new_job(stack, team)["id"]
    # A client that asks for the stream and never reads it: with ~4 MB of events its socket buffers
    # fill and the server's writes to it block (until the send-stall timeout drops it).
    stuck = api.connect(rcvbuf=4096)
    stuck.sendall(head("GET", f"/v1/fine_tuning/jobs/{job_id}/events?stream=true", team.key))
    wait_for(lambda: api.gauge("tunepool_event_stream_subscribers") >= 1, "the stuck stream")
    big = "x" * 200_000
    add_events(stack, job_id, [f"{i} {big}" for i in range(20)])
    received: list[tuple[list[str], bool]] = []

    async def readers() -> None:
        async with httpx.AsyncClient(
            base_url=api.url, headers={"Authorization": f"Bearer {team.key}"}, timeout=60
        ) as client:
            started: list[int] = []
            tasks = [asyncio.create_task(follow(client, job_id, started)) for _ in range(3)]
            while len(started) < 3:
                await asyncio.sleep(0.05)
            await asyncio.to_thread(add_events, stack, job_id, ["after the big ones"])
            assert (await client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")).status_code == 200
            received.extend(await asyncio.wait_for(asyncio.gather(*tasks), 30))

    asyncio.run(readers())
    expected = event_ids(stack, job_id)
    assert all(ended and ids == expected for ids, ended in received)
    stuck.close()
    wait_for(lambda: api.gauge("tunepool_event_stream_subscribers") == 0, "the stuck stream to go")
    wait_for(lambda: api.gauge("tunepool_event_stream_pollers") == 0, "the poller to stop")


def test_the_poller_stops_when_its_last_subscriber_leaves(stack: Stack, api: Api) -> None:
    team = stack.team()
    job_id = new_job(stack, team)["id"]  # queued: it never ends during this test
    socks = [api.connect() for _ in range(3)]
    for sock in socks:
        sock.sendall(head("GET", f"/v1/fine_tuning/jobs/{job_id}/events?stream=true", team.key))
    wait_for(lambda: api.gauge("tunepool_event_stream_subscribers") == 3, "three subscribers")
    assert api.gauge("tunepool_event_stream_pollers") == 1
    socks.pop().close()
    time.sleep(0.5)
    assert api.gauge("tunepool_event_stream_pollers") == 1  # two still follow it
    for sock in socks:
        sock.close()
    wait_for(lambda: api.gauge("tunepool_event_stream_subscribers") == 0, "the subscribers to go")
    wait_for(lambda: api.gauge("tunepool_event_stream_pollers") == 0, "the poller to stop")
    # A new subscriber starts a new poller and still gets the job's first event.
    path = f"/v1/fine_tuning/jobs/{job_id}/events"
    with api.client(team.key) as client, client.stream("GET", path, params={"stream": "true"}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                assert json.loads(line[6:])["message"].startswith("Created fine-tuning job")
                break
