"""Webhook secrets at rest: encrypted with the server key (Fernet: AES-128-CBC + HMAC-SHA256).

The key is `TUNEPOOL_SECRET_KEY` (comma-separated Fernet keys: the first encrypts, every one
decrypts, so a key is rotated by putting the new one first). It must be the same on the API, which
encrypts a secret when it is created or rotated, and on every worker, which decrypts it to sign.
Unset, it is `<home>/secret.key`, created once (mode 0600, atomically: the API and a worker that
start together on one machine end up with the same key); that serves a single machine only.

A stored value that starts with `whsec_` is a secret written before encryption existed: it is read
as it is, and re-encrypted by the next delivery (service/webhook_delivery.py).
"""

from __future__ import annotations

import os
import secrets
import threading
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from service.settings import Settings

PLAINTEXT_PREFIX = "whsec_"
KEY_FILE = "secret.key"


class SecretKeyMismatch(Exception):
    """A stored secret the server key cannot decrypt (the API and this process have other keys)."""


def parse_keys(text: str) -> list[bytes]:
    """TUNEPOOL_SECRET_KEY's keys; a ValueError naming the variable (never its value) if one is bad."""
    keys = [k.strip().encode() for k in text.split(",") if k.strip()]
    for n, key in enumerate(keys, 1):
        try:
            Fernet(key)
        except ValueError:
            raise ValueError(
                f"TUNEPOOL_SECRET_KEY: key {n} is not a Fernet key (32 url-safe base64-encoded bytes; make "
                "one with: python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key()"
                ".decode())')"
            ) from None
    return keys


def key_file_key(home: Path) -> bytes:
    """The key in `<home>/secret.key`, created if absent. Created under a temporary name and
    hard-linked into place, so two processes racing to create it both read the winner's key."""
    path = home / KEY_FILE
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        tmp = home / f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, Fernet.generate_key() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
        finally:
            tmp.unlink()
    key = path.read_bytes().strip()
    parse_keys(key.decode(errors="replace"))
    return key


class SecretBox:
    def __init__(self, keys: list[bytes]) -> None:
        self._fernet = MultiFernet([Fernet(k) for k in keys])

    def seal(self, secret: str) -> str:
        return self._fernet.encrypt(secret.encode()).decode()

    def open(self, stored: str) -> str:
        if stored.startswith(PLAINTEXT_PREFIX):
            return stored  # written before secrets were encrypted
        try:
            return self._fernet.decrypt(stored.encode()).decode()
        except InvalidToken:
            raise SecretKeyMismatch(
                "this process's server key cannot decrypt the endpoint's secret: set the same "
                "TUNEPOOL_SECRET_KEY on the API and on every worker"
            ) from None


_boxes: dict[tuple[str, str], SecretBox] = {}
_lock = threading.Lock()


def secret_box(settings: Settings) -> SecretBox:
    """The server's box (one per key setting and home, made once per process)."""
    cache_key = (settings.secret_key, str(settings.home))
    with _lock:
        box = _boxes.get(cache_key)
        if box is None:
            keys = parse_keys(settings.secret_key) or [key_file_key(settings.home)]
            box = _boxes[cache_key] = SecretBox(keys)
    return box
