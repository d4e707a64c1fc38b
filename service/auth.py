"""API keys: random, high-entropy, shown once, stored as a SHA-256 hash, checked in constant time.

A key looks like `tp-<8-char prefix>-<40 random chars>` (~238 bits of entropy in the secret
part). The prefix is stored in clear to name the key in listings and `revoke-key`; the
database holds only the SHA-256 of the whole key. A plain hash (not a slow KDF) is right for
random keys of this length: nothing is guessable, and every request can afford one lookup.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db import Database
from service.models import ApiKey, Team, now_s

_ALPHABET = string.ascii_letters + string.digits
KEY_PREFIX = "tp-"
# Text shaped like a key (its visible prefix, then at least 8 secret characters): masked in every
# error message, since a client may paste its key where an id or a cursor goes and errors quote those.
_KEY_LIKE = re.compile(r"(tp-[A-Za-z0-9]{8})-[A-Za-z0-9]{8,}")


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


def redact_keys(text: str) -> str:
    """`text` with anything shaped like an API key cut down to its (non-secret) prefix."""
    return _KEY_LIKE.sub(r"\1-<redacted>", text) if KEY_PREFIX in text else text


def _prefix(key: str) -> str | None:
    if not key.startswith(KEY_PREFIX) or len(key) > 128:
        return None
    return key[: len(KEY_PREFIX) + 8]


class AuthCache:
    """Recently verified keys, so a poll does not pay for a key lookup every time.

    Entries live `ttl` seconds: a key revoked in another process (the CLI, another API replica)
    stops working within that time; in this process, revoking through the admin API drops it at
    once. Keyed by the key's hash, never by the key itself.
    """

    def __init__(self, ttl: float, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, Team, ApiKey]] = {}

    def get(self, key_hash: str) -> tuple[Team, ApiKey] | None:
        entry = self._entries.get(key_hash)
        if entry is None or entry[0] < time.monotonic():
            self._entries.pop(key_hash, None)
            return None
        return entry[1], entry[2]

    def put(self, key_hash: str, team: Team, record: ApiKey) -> None:
        if self.ttl <= 0:
            return
        if len(self._entries) >= self.max_entries:
            self._entries.clear()  # rare; simpler than LRU and still bounded
        self._entries[key_hash] = (time.monotonic() + self.ttl, team, record)

    def drop_team(self, team_id: str) -> None:
        """Forget every key of a team, so its changed quotas are read anew on its next request."""
        for key_hash in [h for h, (_, t, _) in self._entries.items() if t.id == team_id]:
            del self._entries[key_hash]

    def drop_prefix(self, prefix: str) -> None:
        for key_hash in [h for h, (_, _, r) in self._entries.items() if r.prefix == prefix]:
            del self._entries[key_hash]


async def authenticate(db: Database, key: str, cache: AuthCache | None = None) -> tuple[Team, ApiKey] | None:
    """The team and key record of a presented key, or None (unknown, malformed or revoked).

    A cached key costs no database round trip; otherwise one query (key and team joined)."""
    prefix = _prefix(key)
    if prefix is None:
        return None
    digest = hash_key(key)
    if cache is not None and (hit := cache.get(digest)) is not None:
        return hit
    async with db.async_session() as session:
        query = select(ApiKey, Team).join(Team, Team.id == ApiKey.team_id).where(ApiKey.prefix == prefix)
        row = (await session.execute(query)).first()
        # Compare digests in constant time: the prefix lookup reveals nothing secret.
        if row is None or not hmac.compare_digest(row[0].key_hash, digest) or row[0].revoked_at:
            return None
        record, team = row
        if record.last_used_at is None or now_s() - record.last_used_at >= 60:
            record.last_used_at = now_s()  # at most one write a minute per key
            await session.commit()
    if cache is not None:
        cache.put(digest, team, record)
    return team, record
