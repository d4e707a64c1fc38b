"""The delivery outbox's database side: claim due rows, record what a send got, prune settled rows.

Sending is service/webhook_sender.py. A claim is one conditional UPDATE per row (the attempt count
is the fencing token), so any number of delivery loops, in any number of workers, never send one
attempt twice; a result is written only if its attempt is still the row's latest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from service.db import Database, rows_updated
from service.models import WebhookDelivery, WebhookEndpoint, now_s
from service.secretbox import PLAINTEXT_PREFIX, SecretBox, SecretKeyMismatch, secret_box
from service.settings import Settings
from service.webhooks import DELIVERED, FAILED, PENDING, backoff_s

log = logging.getLogger("tunepool.webhooks")

# A claimed row is due again this long after its send's deadline (the sender died mid-send).
CLAIM_GRACE_S = 30.0
# Settled rows one pruning transaction deletes (short transactions: the API keeps writing).
PRUNE_BATCH = 500


@dataclass
class Claimed:
    id: str
    attempt: int  # this attempt's number (the fencing token of the result's write)
    team_id: str
    event_id: str
    payload: str
    url: str
    # The secrets that sign this attempt (decrypted): the current one, then the one a rotation
    # replaced while its grace period lasts.
    signing_secrets: list[str] = field(repr=False, default_factory=list)
    error: str | None = None  # why it cannot be sent at all (a secret this key cannot decrypt)


@dataclass
class Result:
    ok: bool
    code: int | None
    error: str | None


def _signing_secrets(session: Session, box: SecretBox, endpoint: WebhookEndpoint, now: float) -> list[str]:
    """Decrypt the endpoint's secrets; a plaintext one (stored before encryption) is encrypted now."""
    current = box.open(endpoint.secret)
    result = [current]
    if endpoint.secret.startswith(PLAINTEXT_PREFIX):
        session.execute(
            update(WebhookEndpoint)
            .where(WebhookEndpoint.id == endpoint.id, WebhookEndpoint.secret == endpoint.secret)
            .values(secret=box.seal(current))
        )
    expires = endpoint.previous_secret_expires_at
    if endpoint.previous_secret and expires is not None and expires > now:
        result.append(box.open(endpoint.previous_secret))
    return result


def claim_due(
    db: Database, settings: Settings, now: float, limit: int, in_flight: Collection[str] = ()
) -> list[Claimed]:
    """Claim up to `limit` due deliveries. `in_flight` holds the team of each send this loop has
    under way: no team gets more than webhook_team_concurrency of them, so the sends of a team whose
    receivers hang leave the other slots to the other teams."""
    D, E = WebhookDelivery, WebhookEndpoint
    cap = settings.webhook_team_concurrency
    running: dict[str, int] = {}
    for team in in_flight:
        running[team] = running.get(team, 0) + 1
    full = [team for team, n in running.items() if n >= cap]
    box = secret_box(settings)
    claimed: list[Claimed] = []
    with db.session() as session:
        # At most `cap` rows per team, oldest first: else the backlog of one team whose receiver
        # hangs (hundreds of due retries, older than anyone's) filled every round's rows, and another
        # team's delivery waited until that backlog ran out (seen: 4.9 s, bench/noisy_neighbour.py).
        per_team = func.row_number().over(partition_by=E.team_id, order_by=D.next_attempt_at)
        ranked = (
            select(D.id, D.attempts, E.team_id, D.next_attempt_at, per_team.label("rank"))
            .join(E, E.id == D.endpoint_id)
            .where(D.status == PENDING, D.next_attempt_at <= now)
        )
        if full:
            ranked = ranked.where(E.team_id.not_in(full))
        rows = ranked.subquery()
        due = session.execute(
            select(rows.c.id, rows.c.attempts, rows.c.team_id)
            .where(rows.c.rank <= cap)
            .order_by(rows.c.next_attempt_at)
            .limit(limit * 2)
        ).all()
        for delivery_id, attempts, team_id in due:
            if len(claimed) >= limit or running.get(team_id, 0) >= cap:
                continue
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
                select(D.event_id, D.payload, E).join(E, E.id == D.endpoint_id).where(D.id == delivery_id)
            ).first()
            if row is None:  # the endpoint was deleted in between (its rows with it)
                continue
            running[team_id] = running.get(team_id, 0) + 1
            item = Claimed(delivery_id, attempts + 1, team_id, row.event_id, row.payload, row[2].url)
            try:
                item.signing_secrets = _signing_secrets(session, box, row[2], now)
                session.commit()
            except SecretKeyMismatch as err:
                session.rollback()
                item.error = str(err)
            claimed.append(item)
    return claimed


def record(db: Database, settings: Settings, item: Claimed, result: Result) -> None:
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


def prune_settled(db: Database, settings: Settings, now: float, *, batches: int = 10) -> int:
    """Delete delivered and failed rows created more than webhook_retention_s ago, PRUNE_BATCH rows
    per transaction, at most `batches` of them; pending rows stay whatever their age."""
    D = WebhookDelivery
    cutoff = int(now - settings.webhook_retention_s)
    removed = 0
    with db.session() as session:
        for _ in range(batches):
            pks = session.scalars(
                select(D.pk)
                .where(D.created_at < cutoff, D.status.in_((DELIVERED, FAILED)))
                .order_by(D.created_at)
                .limit(PRUNE_BATCH)
            ).all()
            if not pks:
                break
            session.execute(delete(D).where(D.pk.in_(pks), D.status.in_((DELIVERED, FAILED))))
            session.commit()
            removed += len(pks)
    if removed:
        log.info("pruned %d settled webhook deliveries (TUNEPOOL_WEBHOOK_RETENTION_S)", removed)
    return removed
