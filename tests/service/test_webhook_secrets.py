"""Webhook secrets at rest and their rotation, the endpoint cap, and the pruning of settled delivery
rows: through the real API on SQLite and PostgreSQL, with deliveries sent in this process to a real
receiver (service/webhook_sender.py) and checked with the openai package's own verifier."""

from __future__ import annotations

import time
from pathlib import Path

import openai
import pytest
from sqlalchemy import select, update

from service.models import WebhookDelivery, WebhookEndpoint
from service.secretbox import SecretBox, key_file_key, secret_box
from service.settings import Settings, load_settings
from service.webhook_delivery import prune_settled
from tests.service.conftest import Stack, TeamClient
from tests.service.webhook_helpers import (
    deliver_until_tried,
    delivery_row,
    listening,
    pending_delivery,
    stored_endpoint,
)

VERIFIER = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9").webhooks


def loopback_allowed(stack: Stack) -> Settings:
    return stack.settings.model_copy(update={"webhook_allow_cidrs": "127.0.0.0/8"})


def stored_secret(stack: Stack, endpoint_id: str) -> tuple[str, str | None]:
    with stack.db.session() as session:
        row = session.execute(
            select(WebhookEndpoint.secret, WebhookEndpoint.previous_secret).where(
                WebhookEndpoint.id == endpoint_id
            )
        ).one()
        return row.secret, row.previous_secret


def deliver_one(stack: Stack, endpoint_id: str) -> tuple[dict[str, str], bytes]:
    """Send one delivery of `endpoint_id` (whose URL is the listener's); what the receiver got."""
    with listening() as hook:
        with stack.db.session() as session:
            session.execute(
                update(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id).values(url=hook.url())
            )
            session.commit()
        row = deliver_until_tried(stack, loopback_allowed(stack), pending_delivery(stack, endpoint_id))
        assert row.status == "delivered", row.last_error
        [received] = hook.received
        return received


def accepts(headers: dict[str, str], body: bytes, secret: str) -> bool:
    try:
        VERIFIER.verify_signature(body, headers, secret=secret)
        return True
    except openai.InvalidWebhookSignatureError:
        return False


def create(team: TeamClient) -> dict[str, str]:
    response = team.post("/v1/webhooks", json={"url": "https://hooks.example.invalid/x"})
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_secrets_are_stored_encrypted_and_never_shown_again(stack: Stack) -> None:
    team = stack.team()
    endpoint = create(team)
    stored, previous = stored_secret(stack, endpoint["id"])
    assert "whsec_" not in stored and endpoint["secret"][6:] not in stored and previous is None
    assert secret_box(stack.settings).open(stored) == endpoint["secret"]
    assert all(e["secret"] is None for e in team.get("/v1/webhooks").json()["data"])
    headers, body = deliver_one(stack, endpoint["id"])
    assert headers["webhook-signature"].count("v1,") == 1 and accepts(headers, body, endpoint["secret"])
    log = (stack.settings.home / "api.log").read_text(errors="replace")
    assert endpoint["secret"] not in log and endpoint["secret"][6:] not in log


def test_a_plaintext_secret_from_before_encryption_still_signs(stack: Stack) -> None:
    team = stack.team()
    endpoint_id, secret = stored_endpoint(stack, team, "http://127.0.0.1:9/", plaintext=True)
    assert stored_secret(stack, endpoint_id)[0] == secret
    headers, body = deliver_one(stack, endpoint_id)
    assert accepts(headers, body, secret)
    stored = stored_secret(stack, endpoint_id)[0]
    assert (
        not stored.startswith("whsec_") and secret_box(stack.settings).open(stored) == secret
    )  # re-encrypted
    # Rotating a legacy row keeps the old secret signing, encrypted too.
    rotated = team.post(f"/v1/webhooks/{endpoint_id}/rotate_secret").json()
    headers, body = deliver_one(stack, endpoint_id)
    assert accepts(headers, body, secret) and accepts(headers, body, rotated["secret"])
    assert "whsec_" not in "".join(s or "" for s in stored_secret(stack, endpoint_id))


def test_rotation_keeps_the_old_secret_for_its_grace_period_only(stack: Stack) -> None:
    team = stack.team()
    endpoint = create(team)
    old = endpoint["secret"]
    before = time.time()
    rotated = team.post(f"/v1/webhooks/{endpoint['id']}/rotate_secret")
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["secret"]
    assert new.startswith("whsec_") and new != old
    expires = rotated.json()["previous_secret_expires_at"]
    assert before + stack.settings.webhook_secret_grace_s <= expires <= time.time() + 86400 + 1
    [listed] = team.get("/v1/webhooks").json()["data"]
    assert listed["secret"] is None and listed["previous_secret_expires_at"] == expires

    headers, body = deliver_one(stack, endpoint["id"])  # during the grace period: either verifies
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert accepts(headers, body, new) and accepts(headers, body, old)
    assert not accepts(headers, body, "whsec_" + "B" * 44)

    with stack.db.session() as session:  # the grace period ends
        session.execute(
            update(WebhookEndpoint)
            .where(WebhookEndpoint.id == endpoint["id"])
            .values(previous_secret_expires_at=time.time() - 1)
        )
        session.commit()
    headers, body = deliver_one(stack, endpoint["id"])
    assert headers["webhook-signature"].count("v1,") == 1
    assert accepts(headers, body, new) and not accepts(headers, body, old)
    assert team.get("/v1/webhooks").json()["data"][0]["previous_secret_expires_at"] is None

    # A grace period of 0 revokes the old secret at once; one above the server's is refused.
    newest = team.post(
        f"/v1/webhooks/{endpoint['id']}/rotate_secret", json={"grace_period_seconds": 0}
    ).json()
    assert newest["previous_secret_expires_at"] is None and stored_secret(stack, endpoint["id"])[1] is None
    headers, body = deliver_one(stack, endpoint["id"])
    assert accepts(headers, body, newest["secret"]) and not accepts(headers, body, new)
    too_long = team.post(f"/v1/webhooks/{endpoint['id']}/rotate_secret", json={"grace_period_seconds": 10**9})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "grace_period_seconds"
    assert secret_box(stack.settings).open(stored_secret(stack, endpoint["id"])[0]) == newest["secret"]


def test_the_endpoint_cap(stack: Stack) -> None:
    team, other = stack.team(), stack.team()
    cap = stack.settings.webhook_max_endpoints
    for _ in range(cap):
        create(team)
    refused = team.post("/v1/webhooks", json={"url": "https://hooks.example.invalid/one-more"})
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert error["code"] == "webhook_endpoint_limit" and str(cap) in error["message"]
    assert len(team.get("/v1/webhooks").json()["data"]) == cap
    create(other)  # per team
    first = team.get("/v1/webhooks").json()["data"][0]["id"]
    assert team.delete(f"/v1/webhooks/{first}").status_code == 200
    create(team)  # room again


def test_settled_rows_are_pruned_after_their_retention(stack: Stack) -> None:
    team = stack.team()
    endpoint_id, _ = stored_endpoint(stack, team, "https://hooks.example.invalid/x")
    old = int(time.time() - stack.settings.webhook_retention_s - 60)
    rows = {}
    for name, status, created in [
        ("old_delivered", "delivered", old), ("old_failed", "failed", old), ("old_pending", "pending", old),
        ("new_delivered", "delivered", int(time.time())), ("new_failed", "failed", int(time.time()) - 60),
    ]:  # fmt: skip
        rows[name] = delivery_id = pending_delivery(stack, endpoint_id)
        with stack.db.session() as session:
            session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == delivery_id)
                .values(status=status, created_at=created, next_attempt_at=time.time() + 3600)
            )
            session.commit()
    assert prune_settled(stack.db, stack.settings, time.time()) >= 2
    with stack.db.session() as session:
        left = set(
            session.scalars(select(WebhookDelivery.id).where(WebhookDelivery.endpoint_id == endpoint_id))
        )
    assert left == {rows["old_pending"], rows["new_delivered"], rows["new_failed"]}
    assert delivery_row(stack, rows["old_pending"]).status == "pending"


def test_the_key_file_is_made_once_and_shared(tmp_path: Path) -> None:
    first = key_file_key(tmp_path)
    assert key_file_key(tmp_path) == first
    assert (tmp_path / "secret.key").stat().st_mode & 0o777 == 0o600
    assert list(tmp_path.iterdir()) == [tmp_path / "secret.key"]  # no temporary file left
    sealed = SecretBox([first]).seal("whsec_x")
    assert secret_box(load_settings(home=tmp_path)).open(sealed) == "whsec_x"
    with pytest.raises(ValueError, match="TUNEPOOL_SECRET_KEY: key 1 is not a Fernet key"):
        load_settings(home=tmp_path, secret_key="not-a-key")


def test_a_teams_backlog_never_hides_another_teams_delivery(stack: Stack) -> None:
    """Team A's hanging receiver left 60 due retries, older than team B's one delivery, and 7 of its
    sends are under way (one below its cap): the next claim takes B's delivery too. Before, the claim
    read the 50 oldest due rows, all A's, and B waited until A's backlog ran out."""
    from service.webhook_delivery import claim_due

    a, b = stack.team(), stack.team()
    a_endpoint, _ = stored_endpoint(stack, a, "https://a.example/hook")
    b_endpoint, _ = stored_endpoint(stack, b, "https://b.example/hook")
    a_rows = [pending_delivery(stack, a_endpoint) for _ in range(60)]
    time.sleep(0.01)
    b_row = pending_delivery(stack, b_endpoint)
    settings = stack.settings.model_copy(update={"webhook_concurrency": 32, "webhook_team_concurrency": 8})
    claimed = claim_due(stack.db, settings, time.time(), 25, [a.team_id] * 7)
    by_team = [c.team_id for c in claimed]
    assert b_row in [c.id for c in claimed], by_team
    assert by_team.count(a.team_id) == 1  # A only up to its cap
    assert {c.id for c in claimed if c.team_id == a.team_id} <= set(a_rows)
