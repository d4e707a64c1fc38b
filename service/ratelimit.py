"""Rate limiting of failed authentications, per client address (in-process, bounded memory).

Only failures are counted: a request whose key is valid never reaches this module, so a client
that is being limited (someone behind its address is trying keys) keeps working with its good
keys, and the hot path (a poll with a valid key) pays nothing for it. What keeps keys from being
guessed is their 238 random bits, not this (a limited address's valid keys are still accepted, as
they must be); what this does is tell a scanner, or a client looping on a wrong or revoked key, to
back off (429 with Retry-After) instead of answering it 401 as fast as it can ask.

A sliding-window log: each address keeps the times of its last `limit` failures. A failure when
`limit` of them are younger than `window_s` is refused, and Retry-After says when the oldest one
ages out. Each API process counts on its own (N replicas allow N x limit).
"""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from collections import deque
from collections.abc import Callable

# Client addresses remembered at most: beyond it, addresses with no recent failure are forgotten,
# then the longest-tracked ones (so a flood from many addresses cannot grow memory without bound).
MAX_CLIENTS = 10_000


class FailureLimiter:
    """`limit` failures per `window_s` seconds per client; `limit` 0 turns it off."""

    def __init__(
        self,
        limit: int,
        window_s: float,
        max_clients: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_clients = max_clients
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}  # address -> failure times, oldest first
        self._lock = threading.Lock()  # the event loop calls this, but nothing forbids a thread

    def record_failure(self, client: str) -> float | None:
        """Count one failed authentication of `client`: None if it is within the limit, else the
        seconds until it may fail again (the request is refused and not counted)."""
        if self.limit <= 0:
            return None
        now = self._clock()
        with self._lock:
            times = self._failures.get(client)
            if times is None:
                self._make_room(now)
                times = self._failures[client] = deque(maxlen=self.limit)
            while times and times[0] <= now - self.window_s:
                times.popleft()
            if len(times) >= self.limit:
                return max(times[0] + self.window_s - now, 0.0)
            times.append(now)
            return None

    def tracked_clients(self) -> int:
        return len(self._failures)

    def _make_room(self, now: float) -> None:
        if len(self._failures) < self.max_clients:
            return
        expired = [c for c, t in self._failures.items() if not t or t[-1] <= now - self.window_s]
        for client in expired:
            del self._failures[client]
        while len(self._failures) >= self.max_clients:  # all recent: drop the longest-tracked
            del self._failures[next(iter(self._failures))]


def client_address(host: str) -> str:
    """What failures are counted per: the IPv4 address, or the /64 of an IPv6 one (a single host
    usually holds a whole /64, and could otherwise take a fresh address for every few guesses)."""
    if ":" not in host:
        return host
    try:
        return str(ipaddress.IPv6Network(f"{host}/64", strict=False))
    except ValueError:
        return host


def retry_after_header(seconds: float) -> str:
    """Retry-After in whole seconds, at least 1 (0 would invite an immediate retry)."""
    return str(max(math.ceil(seconds), 1))
