"""API keys: random, high-entropy, shown once, stored as a SHA-256 hash, checked in constant time.

A key looks like `tp-<8-char prefix>-<40 random chars>` (~238 bits of entropy in the secret
part). The prefix is stored in clear to name the key in listings and `revoke-key`; the
database holds only the SHA-256 of the whole key. A plain hash (not a slow KDF) is right for
random keys of this length: nothing is guessable, and every request can afford one lookup.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.models import ApiKey, Team, now_s

_ALPHABET = string.ascii_letters + string.digits
KEY_PREFIX = "tp-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_key() -> tuple[str, str]:
    """A new key and its visible prefix."""
    prefix = KEY_PREFIX + "".join(secrets.choice(_ALPHABET) for _ in range(8))
    secret = "".join(secrets.choice(_ALPHABET) for _ in range(40))
    return f"{prefix}-{secret}", prefix


def create_key(session: Session, team: Team, *, is_admin: bool = False) -> str:
    """Store a new key for `team` and return it (the only time it is ever visible)."""
    key, prefix = generate_key()
    session.add(ApiKey(team_id=team.id, prefix=prefix, key_hash=hash_key(key), is_admin=is_admin))
    return key


def authenticate(session: Session, key: str) -> tuple[Team, ApiKey] | None:
    """The team and key record of a presented key, or None (unknown, malformed or revoked)."""
    if not key.startswith(KEY_PREFIX) or len(key) > 128:
        return None
    prefix = key[: len(KEY_PREFIX) + 8]
    record = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    # Compare digests in constant time: the prefix lookup reveals nothing secret.
    if record is None or not hmac.compare_digest(record.key_hash, hash_key(key)) or record.revoked_at:
        return None
    team = session.get(Team, record.team_id)
    if team is None:
        return None
    if record.last_used_at is None or now_s() - record.last_used_at >= 60:
        record.last_used_at = now_s()  # at most one write a minute per key
        session.commit()
    return team, record
