"""One HTTP/1.1 connection on a raw socket, reused for every request: the outage tests use it to show
that an error answer leaves the connection open (an HTTP client library would quietly reconnect)."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


class ConnectionClosed(AssertionError):
    """The server closed the connection (or said it would)."""


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def code(self) -> str | None:
        """The error code of an OpenAI-style error body."""
        code = self.json().get("error", {}).get("code")
        return None if code is None else str(code)


class KeepAlive:
    def __init__(self, url: str, key: str | None = None, timeout_s: float = 30) -> None:
        parts = urlsplit(url)
        assert parts.hostname and parts.port
        self.host = f"{parts.hostname}:{parts.port}"
        self.key = key
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout_s)
        self._buffer = b""
        self.requests = 0

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        key: str | None = None,
    ) -> Answer:
        """Send one request on this connection and read its answer; ConnectionClosed if the server
        closed the connection before answering, or answered with `Connection: close`."""
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}", f"Content-Length: {len(body)}"]
        if key or self.key:
            lines.append(f"Authorization: Bearer {key or self.key}")
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        try:
            self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        except OSError as err:
            raise ConnectionClosed(f"request {self.requests + 1}: could not send: {err}") from None
        self.requests += 1
        head = self._read_until(b"\r\n\r\n").decode("latin-1")
        status_line, *header_lines = head.split("\r\n")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            content = self._read_exactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            content = self._read_chunked()
        else:
            content = b""
        answer = Answer(int(status_line.split()[1]), headers, content)
        if headers.get("connection", "").lower() == "close":
            raise ConnectionClosed(
                f"request {self.requests} ({method} {path}): answered {answer.status} with Connection: close"
            )
        return answer

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionClosed(f"request {self.requests}: the server closed the connection")
        self._buffer += data

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self._buffer:
            self._fill()
        found, _, self._buffer = self._buffer.partition(marker)
        return found

    def _read_exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            self._fill()
        found, self._buffer = self._buffer[:n], self._buffer[n:]
        return found

    def _read_chunked(self) -> bytes:
        content = b""
        while True:
            size = int(self._read_until(b"\r\n").split(b";")[0], 16)
            if size == 0:
                self._read_until(b"\r\n")  # no trailers from our API
                return content
            content += self._read_exactly(size)
            self._read_until(b"\r\n")
