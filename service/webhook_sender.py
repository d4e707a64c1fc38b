"""Sending webhook deliveries: one asyncio loop per worker, on its own thread, many sends at once.

- Each send has one deadline for everything (`TUNEPOOL_WEBHOOK_TIMEOUT_S`: DNS, connect, TLS,
  request, status line and headers; the body is never read). httpx's own timeouts are per read, so
  a receiver that drips a header line every second would otherwise hold a send for ever.
- The target is checked after resolution (service/netguard.py) and the connection goes to the
  checked address: the IP replaces the host in the URL, the `Host` header and, for https, the TLS
  server name (SNI, and so certificate verification) keep the name. No proxy from the environment,
  no redirects, no pooled connections (a connection opened for one name is never reused for another).
- The loop claims due rows whenever a slot is free (`webhook_concurrency`, at most
  `webhook_team_concurrency` for one team): one slow receiver holds its own slots, never a batch.
  It runs off the worker's maintenance thread, with its own database connections, so heartbeats
  and the reconciler never wait for a receiver. It also prunes settled rows past their retention.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

import httpx

from service.db import Database
from service.netguard import Resolver, TargetPolicy, TargetRefused, TargetUnresolved, literal_address
from service.netguard import system_resolver as default_resolver
from service.settings import Settings
from service.webhook_delivery import Claimed, Result, claim_due, prune_settled, record
from service.webhooks import signature_header

log = logging.getLogger("tunepool.webhooks")

# Deliveries one `deliver_due` call claims (tests, and anything that delivers outside a worker).
BATCH = 16
# How often the loop looks for due rows when no send has finished meanwhile.
POLL_S = 1.0
PRUNE_EVERY_S = 60.0
# Seconds in-flight sends get to finish when the worker stops (the rest are sent again later).
STOP_GRACE_S = 2.0
# Database work of the loop at once (claims, results, pruning), and connections of its own pool.
DB_CONCURRENCY = 4
P = ParamSpec("P")
T = TypeVar("T")
REFUSED_HINT = "non-public addresses need the operator's TUNEPOOL_WEBHOOK_ALLOW_CIDRS"


def make_client(settings: Settings) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=settings.webhook_timeout_s,
        follow_redirects=False,
        trust_env=False,  # an HTTP(S)_PROXY would connect to the name itself, unchecked
        limits=httpx.Limits(max_connections=settings.webhook_concurrency, max_keepalive_connections=0),
    )


async def _post(client: httpx.AsyncClient, item: Claimed, policy: TargetPolicy, resolver: Resolver) -> Result:
    try:
        url = httpx.URL(item.url)
        host = url.raw_host.decode("ascii")
        netloc = url.netloc.decode("ascii")
    except (httpx.InvalidURL, UnicodeError, ValueError) as err:
        return Result(False, None, f"{type(err).__name__}: {err}"[:500])
    try:
        addresses = await asyncio.to_thread(policy.check, host, resolver)
    except TargetRefused as err:
        return Result(False, None, f"refused: {err}; {REFUSED_HINT}")
    except TargetUnresolved as err:
        return Result(False, None, f"DNS: {err}")
    timestamp = int(time.time())
    headers = {
        "host": netloc,
        "content-type": "application/json",
        "user-agent": "tunepool-webhooks/0.1",
        "webhook-id": item.event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature_header(item.signing_secrets, item.event_id, timestamp, item.payload),
    }
    extensions = {"sni_hostname": host} if url.scheme == "https" and literal_address(host) is None else {}
    error = ""
    for address in addresses:  # the next checked address only if this one cannot be connected to
        try:
            async with client.stream(
                "POST", url.copy_with(host=str(address)), content=item.payload.encode(), headers=headers,
                extensions=extensions,
            ) as response:  # fmt: skip
                code = response.status_code
        except httpx.ConnectError as err:
            error = f"ConnectError: {err}"[:500]
            continue
        except (httpx.HTTPError, httpx.InvalidURL) as err:  # InvalidURL is no HTTPError
            return Result(False, None, f"{type(err).__name__}: {err}"[:500])
        if 200 <= code < 300:
            return Result(True, code, None)
        return Result(False, code, f"HTTP {code}")
    return Result(False, None, error)


async def send_one(
    client: httpx.AsyncClient, item: Claimed, settings: Settings, policy: TargetPolicy, resolver: Resolver
) -> Result:
    """One attempt, within webhook_timeout_s in all."""
    if item.error is not None:
        return Result(False, None, item.error)
    try:
        async with asyncio.timeout(settings.webhook_timeout_s):
            return await _post(client, item, policy, resolver)
    except TimeoutError:
        return Result(False, None, f"timeout: no answer within {settings.webhook_timeout_s:g} s")


def deliver_due(
    db: Database, settings: Settings, *, limit: int = BATCH, resolver: Resolver = default_resolver
) -> int:
    """Claim the due deliveries (at most `limit`), send them at once, record the answers; returns
    how many were tried. The worker's loop is `DeliveryLoop`; this is one round of it."""
    policy = TargetPolicy.from_text(settings.webhook_allow_cidrs)
    claimed = claim_due(db, settings, time.time(), limit)
    if not claimed:
        return 0

    async def send_all() -> list[Result]:
        async with make_client(settings) as client:
            sends = (send_one(client, item, settings, policy, resolver) for item in claimed)
            return list(await asyncio.gather(*sends))

    for item, result in zip(claimed, asyncio.run(send_all()), strict=True):
        if not result.ok:
            log.info("webhook delivery %s attempt %d failed: %s", item.id, item.attempt, result.error)
        record(db, settings, item, result)
    return len(claimed)


class DeliveryLoop:
    """The worker's delivery thread: `run(stopping)` until the event is set."""

    def __init__(self, settings: Settings, *, resolver: Resolver = default_resolver) -> None:
        self.settings = settings
        self.resolver = resolver
        self.policy = TargetPolicy.from_text(settings.webhook_allow_cidrs)
        # Its own connections: a burst of results never takes the heartbeat's.
        self.db = Database(settings.model_copy(update={"db_pool_size": DB_CONCURRENCY}))

    def run(self, stopping: threading.Event) -> None:
        try:
            asyncio.run(self._run(stopping))
        finally:
            self.db.dispose()

    async def _db(self, gate: asyncio.Semaphore, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        async with gate:
            return await asyncio.to_thread(fn, *args, **kwargs)

    async def _deliver(self, client: httpx.AsyncClient, gate: asyncio.Semaphore, item: Claimed) -> None:
        result = await send_one(client, item, self.settings, self.policy, self.resolver)
        if not result.ok:
            log.info("webhook delivery %s attempt %d failed: %s", item.id, item.attempt, result.error)
        try:
            await self._db(gate, record, self.db, self.settings, item, result)
        except Exception:  # the claim expires and the row is sent again
            log.exception("could not record webhook delivery %s", item.id)

    async def _run(self, stopping: threading.Event) -> None:
        settings = self.settings
        # Threads for DNS lookups and database calls: enough that slow lookups of one team's hosts
        # (at most its share of the slots) never queue another team's.
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(
                settings.webhook_concurrency + DB_CONCURRENCY, thread_name_prefix="tunepool-hook"
            )
        )
        gate = asyncio.Semaphore(DB_CONCURRENCY)
        in_flight: dict[asyncio.Task[None], str] = {}  # send -> its team
        wake = asyncio.Event()
        last_prune = float("-inf")

        def finished(task: asyncio.Task[None]) -> None:
            in_flight.pop(task, None)
            wake.set()

        async with make_client(settings) as client:
            while not stopping.is_set():
                wake.clear()  # before claiming: a send that ends meanwhile wakes the next round
                free = settings.webhook_concurrency - len(in_flight)
                if free > 0:
                    try:
                        claimed = await self._db(
                            gate, claim_due, self.db, settings, time.time(), free, list(in_flight.values())
                        )
                    except Exception:  # the database may be restarting: try again next round
                        log.exception("claiming webhook deliveries failed; retrying")
                        claimed = []
                    for item in claimed:
                        task = asyncio.create_task(self._deliver(client, gate, item))
                        in_flight[task] = item.team_id
                        task.add_done_callback(finished)
                if time.monotonic() - last_prune >= PRUNE_EVERY_S:
                    last_prune = time.monotonic()
                    try:
                        await self._db(gate, prune_settled, self.db, settings, time.time())
                    except Exception:
                        log.exception("pruning webhook deliveries failed; retrying later")
                with contextlib.suppress(TimeoutError):  # a finished send, or POLL_S
                    await asyncio.wait_for(wake.wait(), POLL_S)
            if in_flight:
                _, late = await asyncio.wait(list(in_flight), timeout=STOP_GRACE_S)
                for task in late:
                    task.cancel()
