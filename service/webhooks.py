"""Webhooks: a team's endpoints are told when its jobs end, signed as OpenAI signs its own.

- The outbox: when a job reaches `succeeded`, `failed` or `cancelled`, `set_status` calls
  `enqueue_job_event`, which adds one `WebhookDelivery` row per matching endpoint in the same
  transaction as the status change. A job that ended has its deliveries, or it did not end.
- The delivery loop (service/webhook_delivery.py, on every worker's delivery thread, so `tunepool
  up` delivers too) claims due rows with one conditional UPDATE each (attempt count as the fencing
  token: several loops at once never send one attempt twice), POSTs them, and records the answer:
  2xx delivered; anything else retried after base * 2**(attempt - 1) seconds (capped) until
  `webhook_max_attempts`, then `failed`. A loop that dies mid-send leaves its claim to expire; the
  row is sent again (at-least-once, like every webhook system: receivers dedupe on `webhook-id`).
- The payload is OpenAI's (`{"id": "evt_...", "object": "event", "created_at", "type": "fine_tuning.
  job.succeeded", "data": {"id": job id}}`), signed by the Standard Webhooks scheme: headers
  `webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of
  "{id}.{timestamp}.{body}">` keyed with the base64-decoded part of the `whsec_...` secret. The
  `openai` package's `client.webhooks.unwrap(body, headers, secret=...)` verifies it unchanged.
- Secrets are stored encrypted (service/secretbox.py). After a rotation the replaced secret signs
  too until its grace period ends: `webhook-signature` then holds two space-separated `v1,<sig>`
  entries (the new secret's first), and a receiver holding either secret accepts the delivery.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.models import Job, JobStatus, WebhookDelivery, WebhookEndpoint, new_id, now_s
from service.settings import Settings

EVENT_TYPES = {
    JobStatus.SUCCEEDED: "fine_tuning.job.succeeded",
    JobStatus.FAILED: "fine_tuning.job.failed",
    JobStatus.CANCELLED: "fine_tuning.job.cancelled",
}
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    """One `v1,<signature>` entry of the `webhook-signature` header (Standard Webhooks)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_header(signing_secrets: list[str], msg_id: str, timestamp: int, body: str) -> str:
    """The `webhook-signature` header: one entry per secret that still signs, space-separated."""
    return " ".join(sign(secret, msg_id, timestamp, body) for secret in signing_secrets)


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


def backoff_s(settings: Settings, attempt: int) -> float:
    """Seconds before the next try after failed attempt number `attempt` (1-based)."""
    return float(min(settings.webhook_backoff_base_s * 2 ** (attempt - 1), settings.webhook_backoff_max_s))
