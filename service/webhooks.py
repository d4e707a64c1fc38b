"""Webhooks: a team's endpoints are told when its jobs end, signed as OpenAI signs its own.

- The outbox: when a job reaches `succeeded`, `failed` or `cancelled`, `set_status` calls
  `enqueue_job_event`, which adds one `WebhookDelivery` row per matching endpoint in the same
  transaction as the status change. A job that ended has its deliveries, or it did not end.
- The delivery loop: `deliver_due` (run by every worker's maintenance thread, so `tunepool up`
  delivers too) claims due rows with one conditional UPDATE each (attempt count as the fencing
  token: several loops at once never send one attempt twice), POSTs them, and records the answer:
  2xx delivered; anything else retried after base * 2**(attempt - 1) seconds (capped) until
  `webhook_max_attempts`, then `failed`. A loop that dies mid-send leaves its claim to expire; the
  row is sent again (at-least-once, like every webhook system: receivers dedupe on `webhook-id`).
- The payload is OpenAI's (`{"id": "evt_...", "object": "event", "created_at", "type": "fine_tuning.
  job.succeeded", "data": {"id": job id}}`), signed by the Standard Webhooks scheme: headers
  `webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of
  "{id}.{timestamp}.{body}">` keyed with the base64-decoded part of the `whsec_...` secret. The
  `openai` package's `client.webhooks.unwrap(body, headers, secret=...)` verifies it unchanged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.db import Database, rows_updated
from service.models import Job, JobStatus, WebhookDelivery, WebhookEndpoint, new_id, now_s
from service.settings import Settings

log = logging.getLogger("tunepool.webhooks")

EVENT_TYPES = {
    JobStatus.SUCCEEDED: "fine_tuning.job.succeeded",
    JobStatus.FAILED: "fine_tuning.job.failed",
    JobStatus.CANCELLED: "fine_tuning.job.cancelled",
}
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
# Deliveries one `deliver_due` call claims; they are sent in parallel, so one call takes about one
# timeout at worst and the maintenance thread's heartbeats are never held up for long.
BATCH = 16
# A claimed row is due again this long after its send's timeout (the sender died mid-send).
CLAIM_GRACE_S = 30.0


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    """The `webhook-signature` header value (Standard Webhooks, as OpenAI sends it)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def enqueue_job_event(session: Session, job: Job, status: JobStatus) -> int:
    """One pending delivery per endpoint of the job's team that wants this event; the caller commits
    (it is the transaction that moved the job). Returns how many were added."""
    event_type = EVENT_TYPES[status]
    endpoints = session.execute(
        select(WebhookEndpoint.id, WebhookEndpoint.events).where(WebhookEndpoint.team_id == job.team_id)
    ).all()
    wanted = [pk for pk, events in endpoints if not events or event_type in events]
    if not wanted:
        return 0
    event_id, created = new_id("evt_"), now_s()
    payload = json.dumps(
        {
            "id": event_id,
            "object": "event",
            "created_at": created,
            "type": event_type,
            "data": {"id": job.id},
        },
        separators=(",", ":"),
    )
    for endpoint_id in wanted:
        session.add(
            WebhookDelivery(
                endpoint_id=endpoint_id, event_id=event_id, event_type=event_type, job_id=job.id,
                payload=payload, status=PENDING, attempts=0, next_attempt_at=time.time(), created_at=created,
            )
        )  # fmt: skip
    return len(wanted)


@dataclass
class _Claimed:
    id: str
    attempt: int  # this attempt's number (the fencing token of the result's write)
    event_id: str
    payload: str
    url: str
    secret: str


@dataclass
class _Result:
    ok: bool
    code: int | None
    error: str | None


def backoff_s(settings: Settings, attempt: int) -> float:
    """Seconds before the next try after failed attempt number `attempt` (1-based)."""
    return float(min(settings.webhook_backoff_base_s * 2 ** (attempt - 1), settings.webhook_backoff_max_s))


def _claim(db: Database, settings: Settings, now: float, limit: int) -> list[_Claimed]:
    D = WebhookDelivery
    claimed = []
    with db.session() as session:
        due = session.execute(
            select(D.id, D.attempts)
            .where(D.status == PENDING, D.next_attempt_at <= now)
            .order_by(D.next_attempt_at)
            .limit(limit)
        ).all()
        for delivery_id, attempts in due:
            # One row per transaction: no lock is held across rows, so concurrent loops never deadlock.
            won = rows_updated(
                session,
                update(D)
                .where(
                    D.id == delivery_id, D.status == PENDING, D.attempts == attempts, D.next_attempt_at <= now
                )
                .values(
                    attempts=attempts + 1, next_attempt_at=now + settings.webhook_timeout_s + CLAIM_GRACE_S
                ),
            )
            session.commit()
            if not won:
                continue  # another loop took it
            row = session.execute(
                select(D.event_id, D.payload, WebhookEndpoint.url, WebhookEndpoint.secret)
                .join(WebhookEndpoint, WebhookEndpoint.id == D.endpoint_id)
                .where(D.id == delivery_id)
            ).first()
            if row is not None:  # None: the endpoint was deleted in between (its rows with it)
                claimed.append(
                    _Claimed(delivery_id, attempts + 1, row.event_id, row.payload, row.url, row.secret)
                )
    return claimed


def _send(client: httpx.Client, item: _Claimed) -> _Result:
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "user-agent": "tunepool-webhooks/0.1",
        "webhook-id": item.event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(item.secret, item.event_id, timestamp, item.payload),
    }
    try:
        response = client.post(item.url, content=item.payload.encode(), headers=headers)
    except (httpx.HTTPError, httpx.InvalidURL) as err:  # InvalidURL is no HTTPError: it would end the batch
        return _Result(False, None, f"{type(err).__name__}: {err}"[:500])
    if 200 <= response.status_code < 300:
        return _Result(True, response.status_code, None)
    return _Result(False, response.status_code, f"HTTP {response.status_code}")


def _record(db: Database, settings: Settings, item: _Claimed, result: _Result) -> None:
    D = WebhookDelivery
    values: dict[str, object] = {"last_response_code": result.code, "last_error": result.error}
    if result.ok:
        values |= {"status": DELIVERED, "next_attempt_at": None, "delivered_at": now_s()}
    elif item.attempt >= settings.webhook_max_attempts:
        values |= {"status": FAILED, "next_attempt_at": None}
    else:
        values["next_attempt_at"] = time.time() + backoff_s(settings, item.attempt)
    with db.session() as session:
        # Fenced by the attempt: if our claim expired and another loop re-claimed, its result wins.
        rows_updated(
            session,
            update(D)
            .where(D.id == item.id, D.status == PENDING, D.attempts == item.attempt)
            .values(**values),
        )
        session.commit()


def deliver_due(db: Database, settings: Settings, *, limit: int = BATCH) -> int:
    """Send the deliveries that are due (at most `limit`, in parallel); returns how many were tried."""
    claimed = _claim(db, settings, time.time(), limit)
    if not claimed:
        return 0
    with (
        httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False) as client,
        ThreadPoolExecutor(max_workers=len(claimed), thread_name_prefix="tunepool-webhook") as pool,
    ):
        results = list(pool.map(lambda item: _send(client, item), claimed))
    for item, result in zip(claimed, results, strict=True):
        if not result.ok:
            log.info("webhook delivery %s attempt %d failed: %s", item.id, item.attempt, result.error)
        _record(db, settings, item, result)
    return len(claimed)
