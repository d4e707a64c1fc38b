"""Per-team caps on the requests that last as long as the client takes: uploads, downloads (file and
checkpoint content) and event streams, counted per API process.

Each of these holds a connection (and, for a download or stream, a response task) for as long as
its client sends or reads: minutes for a large upload on a slow link, hours for an event stream.
Without a cap one team could fill the process's connection limit (TUNEPOOL_MAX_CONNECTIONS) and
every other team's requests would answer 503. Over its cap a team gets 429 with `Retry-After`; its
other requests and every other team's are unaffected.

A route takes a `Lease` for the request (`TeamLimits.acquire`) and either releases it when it ends
(`with lease:`) or hands it to its streaming response (`lease.stream(...)`), which releases it once
the last byte is sent or the client has gone.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterable, Iterable, Mapping
from types import TracebackType
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from service.errors import APIError
from service.settings import Settings

Kind = Literal["uploads", "downloads", "event_streams"]
RETRY_AFTER_S = 5  # long requests end at the client's pace: a short wait, then try again
_WHAT = {"uploads": "uploads", "downloads": "downloads", "event_streams": "event streams"}
_SETTING = {
    "uploads": "TUNEPOOL_TEAM_MAX_UPLOADS",
    "downloads": "TUNEPOOL_TEAM_MAX_DOWNLOADS",
    "event_streams": "TUNEPOOL_TEAM_MAX_EVENT_STREAMS",
}


class TeamLimits:
    """How many uploads, downloads and event streams each team has open in this process, against
    its caps. Thread-safe: sync routes take leases from the threadpool."""

    def __init__(self, caps: Mapping[Kind, int]) -> None:
        self.caps = dict(caps)
        self._open: dict[tuple[Kind, str], int] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> TeamLimits:
        return cls(
            {
                "uploads": settings.team_max_uploads,
                "downloads": settings.team_max_downloads,
                "event_streams": settings.team_max_event_streams,
            }
        )

    def acquire(self, kind: Kind, team_id: str) -> Lease:
        """A lease on one of the team's `kind` slots; 429 with Retry-After when all are taken."""
        key = (kind, team_id)
        cap = self.caps[kind]
        with self._lock:
            held = self._open.get(key, 0)
            if held >= cap:
                raise APIError(
                    429,
                    f"The team already has {held} {_WHAT[kind]} open on this server, its limit "
                    f"({_SETTING[kind]}); retry after {RETRY_AFTER_S} s or once one of them has ended",
                    code=f"too_many_{kind}",
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                )
            self._open[key] = held + 1
        return Lease(self, key)

    def open(self, kind: Kind, team_id: str) -> int:
        with self._lock:
            return self._open.get((kind, team_id), 0)

    def _release(self, key: tuple[Kind, str]) -> None:
        with self._lock:
            held = self._open.get(key, 0) - 1
            if held > 0:
                self._open[key] = held
            else:
                self._open.pop(key, None)  # no entry per team that once had a request


def team_limits(app: FastAPI) -> TeamLimits:
    """The app's TeamLimits, made on first use from its settings."""
    limits: TeamLimits | None = getattr(app.state, "team_limits", None)
    if limits is None:
        limits = app.state.team_limits = TeamLimits.from_settings(app.state.settings)
    return limits


def acquire(request: Request, kind: Kind, team_id: str) -> Lease:
    return team_limits(request.app).acquire(kind, team_id)


class Lease:
    """One open slot. As a context manager it is released when the block ends, unless `stream`
    handed it to a response in the meantime."""

    def __init__(self, limits: TeamLimits, key: tuple[Kind, str]) -> None:
        self._limits = limits
        self._key = key
        self._released = False
        self._handed_over = False

    def release(self) -> None:
        if not self._released:  # idempotent: a response and an error path may both release
            self._released = True
            self._limits._release(self._key)

    def stream(
        self,
        content: Iterable[bytes] | AsyncIterable[str | bytes],
        *,
        status_code: int = 200,
        media_type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> StreamingResponse:
        """A streaming response that releases this lease when it is done."""
        response = LeasedStreamingResponse(content, status_code, headers, media_type)
        response.lease = self
        self._handed_over = True
        return response

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._handed_over or exc_type is not None:
            self.release()


class LeasedStreamingResponse(StreamingResponse):
    """A StreamingResponse that releases its lease, and closes its body iterator (an event stream's
    subscription), once sent or abandoned: deterministically, not when the generator is collected."""

    lease: Lease | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            try:
                if aclose is not None:
                    await aclose()
            finally:
                if self.lease is not None:
                    self.lease.release()
