"""Limits on a request's size and on how slowly a client may send or read, in uvicorn's protocol; and
on the size of its body, in an ASGI middleware (`RequestBodyLimit`).

The body: FastAPI reads a JSON body whole before validating it, so without a limit one request
could make the API hold gigabytes. Every body but an upload's (which streams to storage under its
own limit, service/uploads.py) is capped at TUNEPOOL_MAX_REQUEST_BODY_BYTES: a Content-Length over
it is refused before anything is read, and a chunked body as soon as it passes it (413).

The head: uvicorn's httptools protocol (its default when httptools is installed) takes headers of
any size: a client that sends a 64 MiB header has it buffered in full. Its h11 protocol limits the
head to 16 KiB but parses in Python (slower). This subclass keeps httptools and answers 431 (with an
OpenAI-style body) and closes the connection when a head is over MAX_HEAD_BYTES: measured when it
is complete, and counted while it is still arriving, so that what is buffered never grows beyond
the limit plus one read from the socket.

Time: uvicorn closes an idle keep-alive connection (timeout_keep_alive) but waits for ever on a
socket that sent nothing, half a head or a body that stopped, and on a client that stopped reading
a response: 200 such sockets were still open after a minute, each holding a connection slot (and,
before, a database slot). Here, per connection and without a timer per request on the fast path:
- the head must be complete within TUNEPOOL_HEADER_TIMEOUT_S of the connection opening, or of the
  first byte after the previous response: past it, 408 (or a silent close if nothing came);
- a request body may go TUNEPOOL_BODY_IDLE_TIMEOUT_S without a byte (not counting time when the
  server itself stopped reading, or the client waits for its `100 Continue`): 408 and closed;
- a response the client leaves unread, its socket buffers full, for TUNEPOOL_SEND_STALL_TIMEOUT_S
  (the transport's pause_writing without a resume_writing): the connection is dropped, which ends
  the download or event stream like any disconnect.
"""

from __future__ import annotations

import asyncio
import json
import logging
from asyncio import TimerHandle
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response
from service.settings import Settings, load_settings

MAX_HEAD_BYTES = 32 * 1024  # request line + headers; a request of this API needs under 2 KiB
log = logging.getLogger("tunepool.api")


def _canned(status: str, code: str, message: str) -> bytes:
    """A complete `connection: close` response with an OpenAI-style error body, sent by the protocol."""
    body = json.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    ).encode()
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode() + body


_TOO_LARGE = _canned(
    "431 Request Header Fields Too Large",
    "request_header_fields_too_large",
    f"The request line and headers are larger than {MAX_HEAD_BYTES:,} bytes",
)


def protocol_class(settings: Settings | None = None) -> type[asyncio.Protocol] | str:
    """What `uvicorn.run(http=...)` should use: the bounded httptools protocol, or h11 (which bounds
    the head's size itself, but none of the timeouts but keep-alive)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools is not installed
        return "h11"
    settings = settings or load_settings()
    header_timeout_s = settings.header_timeout_s
    body_idle_s = settings.body_idle_timeout_s
    send_stall_s = settings.send_stall_timeout_s
    head_timed_out = _canned(
        "408 Request Timeout",
        "request_timeout",
        f"The request line and headers did not arrive within {header_timeout_s:g} s "
        "(TUNEPOOL_HEADER_TIMEOUT_S)",
    )
    body_timed_out = _canned(
        "408 Request Timeout",
        "request_timeout",
        f"No byte of the request body arrived for {body_idle_s:g} s (TUNEPOOL_BODY_IDLE_TIMEOUT_S)",
    )

    class LimitedProtocol(HttpToolsProtocol):
        _in_head = True  # a new connection's first bytes are a request's head
        _head_bytes = 0  # bytes received while the current request's head is incomplete
        _refused = False  # answered 431 or 408; whatever else arrives on the connection is ignored
        # Waiting for a head: since when (None: idle keep-alive, which uvicorn's own timer bounds),
        # and whether any of its bytes came.
        _awaiting_head = True
        _head_since: float | None = None
        _head_partial = False
        _body_deadline: float | None = None  # while a request body is incomplete: when it times out
        _timer: TimerHandle | None = None  # the head or body deadline, re-evaluated when it fires
        _stall_timer: TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._head_since = self.loop.time()
            self._arm(self._head_since + header_timeout_s)

        def connection_lost(self, exc: Exception | None) -> None:
            for timer in (self._timer, self._stall_timer):
                if timer is not None:
                    timer.cancel()
            self._timer = self._stall_timer = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if self._awaiting_head:
                self._head_partial = True
                if self._head_since is None:  # the first byte after a response
                    self._head_since = self.loop.time()
            super().data_received(data)  # parses; may complete the head (or answer 400 and close)
            if self._refused or self.transport.is_closing():
                return
            # A head that does not end in this read: count it, so that it is never buffered whole.
            if self._in_head:
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD_BYTES:
                    self._refuse(_TOO_LARGE, "a request line and headers over %d bytes (431)", MAX_HEAD_BYTES)
                    return
            if self._awaiting_head and self._head_since is not None:
                self._arm(self._head_since + header_timeout_s)
            elif self._body_deadline is not None:
                self._arm(self._body_deadline)

        def on_message_begin(self) -> None:
            if not self._refused:
                super().on_message_begin()
                self._in_head, self._head_bytes = True, 0
                if not self._awaiting_head:  # a pipelined request, begun while the last one runs
                    self._awaiting_head, self._head_since = True, self.loop.time()

        def on_headers_complete(self) -> None:
            if self._refused:
                return
            self._in_head = self._awaiting_head = self._head_partial = False
            self._head_since = None
            # A head that arrived within one read: measure what was parsed (": " and CRLF per header).
            if (
                len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
                > MAX_HEAD_BYTES
            ):
                self._refuse(_TOO_LARGE, "a request line and headers over %d bytes (431)", MAX_HEAD_BYTES)
                return
            # Until on_message_complete (in this same read, for a request without a body).
            self._body_deadline = self.loop.time() + body_idle_s
            super().on_headers_complete()  # starts the ASGI request

        def on_body(self, body: bytes) -> None:
            if not self._refused:
                self._body_deadline = self.loop.time() + body_idle_s
                super().on_body(body)

        def on_message_complete(self) -> None:
            if not self._refused:
                self._body_deadline = None
                super().on_message_complete()

        def on_response_complete(self) -> None:
            queued = bool(self.pipeline)  # a request whose head is already in: it starts now
            super().on_response_complete()
            if not queued and not self._awaiting_head:
                self._awaiting_head, self._head_since, self._head_partial = True, None, False

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._stall_timer is None:
                self._stall_timer = self.loop.call_later(send_stall_s, self._send_stalled)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._stall_timer is not None:
                self._stall_timer.cancel()
                self._stall_timer = None

        # -- deadlines ---------------------------------------------------------------------------

        def _arm(self, when: float) -> None:
            """Make sure the deadline timer fires by `when` (it re-checks the state when it does)."""
            if self._timer is not None:
                if self._timer.when() <= when:
                    return
                self._timer.cancel()
            self._timer = self.loop.call_at(when, self._deadline_passed)

        def _deadline_passed(self) -> None:
            self._timer = None
            if self._refused or self.transport.is_closing():
                return
            now = self.loop.time()
            if self._awaiting_head and self._head_since is not None:
                if now < self._head_since + header_timeout_s:
                    self._arm(self._head_since + header_timeout_s)
                elif self._head_partial:
                    self._refuse(
                        head_timed_out, "a request head not complete within %g s (408)", header_timeout_s
                    )
                else:  # a socket that never sent a byte: nothing to answer
                    self._refused = True
                    self.transport.close()
            elif self._body_deadline is not None:
                cycle = self.cycle
                if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
                    self._body_deadline = now + body_idle_s  # we are the ones not reading
                if now < self._body_deadline:
                    self._arm(self._body_deadline)
                    return
                started = cycle is not None and cycle.response_started
                if cycle is not None:  # the app reads a disconnect; what it answers is dropped
                    cycle.disconnected = True
                    cycle.message_event.set()
                self._refuse(
                    b"" if started else body_timed_out, "a request body idle for %g s (408)", body_idle_s
                )

        def _send_stalled(self) -> None:
            self._stall_timer = None
            if not self.transport.is_closing():
                log.info("dropped a client that read nothing of its response for %g s", send_stall_s)
                self.transport.abort()  # not close(): that would wait to flush what it does not read

        def _refuse(self, response: bytes, reason: str, limit: float) -> None:
            self._refused = True
            # The size limit is a client bug worth a warning; a timeout is a slow or gone client.
            log.log(
                logging.WARNING if response is _TOO_LARGE else logging.INFO,
                "closed a connection: " + reason,
                limit,
            )
            if response:
                self.transport.write(response)
            self.transport.close()

    return LimitedProtocol


class RequestBodyLimit:
    """Pure-ASGI middleware: 413 for a request body over `limit` bytes, except on `streamed` routes
    ((method, path) pairs that read their body as a stream and limit it themselves)."""

    def __init__(self, app: ASGIApp, limit: int, streamed: frozenset[tuple[str, str]]) -> None:
        self.app = app
        self.limit = limit
        self.streamed = streamed

    def _message(self) -> str:
        return f"The request body is larger than {self.limit:,} bytes (TUNEPOOL_MAX_REQUEST_BODY_BYTES)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in self.streamed:
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        if length is not None and length > self.limit:
            response = error_response(413, self._message(), code="request_too_large")
            await response(scope, receive, send)
            return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:  # a chunked body, or one longer than it said
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, counted_receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the protocol has already refused a malformed one
    return None
