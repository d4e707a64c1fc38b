"""Limits on the size of a request: its head (request line and headers), in uvicorn's protocol, and
its body, in an ASGI middleware (`RequestBodyLimit`).

The body: FastAPI reads a JSON body whole before validating it, so without a limit one request
could make the API hold gigabytes. Every body but an upload's (which streams to storage under its
own limit, service/uploads.py) is capped at TUNEPOOL_MAX_REQUEST_BODY_BYTES: a Content-Length over
it is refused before anything is read, and a chunked body as soon as it passes it (413).

The head:

uvicorn's httptools protocol (its default when httptools is installed) takes headers of any size: a
client that sends a 64 MiB header has it buffered in full, and a few such requests at once exhaust
the API's memory. Its h11 protocol limits the head to 16 KiB but parses in Python (slower). This
subclass keeps httptools and answers 431 (with an OpenAI-style body) and closes the connection when a
head is over MAX_HEAD_BYTES: measured when it is complete, and counted while it is still arriving,
so that what is buffered never grows beyond the limit plus one read from the socket.
"""

from __future__ import annotations

import asyncio
import json
import logging

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response

MAX_HEAD_BYTES = 32 * 1024  # request line + headers; a request of this API needs under 2 KiB
log = logging.getLogger("tunepool.api")

_BODY = json.dumps(
    {
        "error": {
            "message": f"The request line and headers are larger than {MAX_HEAD_BYTES:,} bytes",
            "type": "invalid_request_error",
            "param": None,
            "code": "request_header_fields_too_large",
        }
    }
).encode()
_RESPONSE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: application/json\r\n"
    b"content-length: " + str(len(_BODY)).encode() + b"\r\n"
    b"connection: close\r\n\r\n" + _BODY
)


def protocol_class() -> type[asyncio.Protocol] | str:
    """What `uvicorn.run(http=...)` should use: the bounded httptools protocol, or h11 (bounded itself)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools is not installed
        return "h11"

    class BoundedHeadersProtocol(HttpToolsProtocol):
        _in_head = True  # a new connection's first bytes are a request's head
        _head_bytes = 0  # bytes received while the current request's head is incomplete
        _refused = False  # answered 431; whatever else arrives on the connection is ignored

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            super().data_received(data)  # parses; may complete the head (or answer 400 and close)
            # A head that does not end in this read: count it, so that it is never buffered whole.
            if self._in_head and not self._refused and not self.transport.is_closing():
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD_BYTES:
                    self._refuse()

        def on_message_begin(self) -> None:
            if not self._refused:
                super().on_message_begin()
                self._in_head, self._head_bytes = True, 0

        def on_headers_complete(self) -> None:
            if self._refused:
                return
            self._in_head = False
            # A head that arrived within one read: measure what was parsed (": " and CRLF per header).
            if (
                len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
                > MAX_HEAD_BYTES
            ):
                self._refuse()
                return
            super().on_headers_complete()  # starts the ASGI request

        def on_body(self, body: bytes) -> None:
            if not self._refused:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if not self._refused:
                super().on_message_complete()

        def _refuse(self) -> None:
            self._refused = True
            log.warning("refused a request whose line and headers are over %d bytes (431)", MAX_HEAD_BYTES)
            self.transport.write(_RESPONSE)
            self.transport.close()

    return BoundedHeadersProtocol


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
