"""Hostile and slow HTTP clients on raw sockets, and a second API process with its own limits.

httpx cannot be told to stop halfway through a head, drip a body or leave a response unread; a raw
socket can. Each helper returns the open socket: the test decides when it goes."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.service.conftest import Stack, free_port, start_api

BOUNDARY = "slowclientboundary"


@dataclass
class Api:
    """A second API process on the stack's database and storage, with other TUNEPOOL_* settings."""

    url: str
    host: str
    port: int
    log: Path

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)

    def connect(self, rcvbuf: int | None = None) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect: the TCP window is agreed on at the handshake
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect((self.host, self.port))
        return sock

    def gauge(self, name: str) -> float:
        """A value of this process's /metrics (a series without labels)."""
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} is not on /metrics")


@contextmanager
def second_api(stack: Stack, home: Path, **settings: str | int | float) -> Iterator[Api]:
    env = {**stack.env, **{f"TUNEPOOL_{k.upper()}": str(v) for k, v in settings.items()}}
    port = free_port()
    proc = start_api(env, port, home / "api.log")
    try:
        yield Api(f"http://127.0.0.1:{port}", "127.0.0.1", port, home / "api.log")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except Exception:
            proc.kill()


def head(method: str, path: str, key: str | None, extra: str = "") -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}{extra}\r\n".encode()


def slow_upload(api: Api, key: str, declared: int = 10 * 1024 * 1024) -> socket.socket:
    """An upload that sends its head and the first bytes of its body, then nothing."""
    sock = api.connect()
    extra = f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {declared}\r\n"
    preamble = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\r\n\r\n'
    ).encode()
    sock.sendall(head("POST", "/v1/files", key, extra) + preamble + b'{"messages": [')
    return sock


def stalled_download(api: Api, key: str, path: str) -> socket.socket:
    """A download that reads its status line, then stops reading (a small receive buffer, so the
    server's writes back up quickly). Fails unless the status is 200."""
    sock = api.connect(rcvbuf=16 * 1024)
    sock.sendall(head("GET", path, key))
    sock.settimeout(10)
    first = sock.recv(64)
    assert first.startswith(b"HTTP/1.1 200"), first
    return sock


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and the seconds that took (an
    AssertionError if it is still open after limit_s)."""
    start = time.monotonic()
    sock.settimeout(0.2)
    received = b""
    while time.monotonic() - start < limit_s:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return received, time.monotonic() - start
        if not chunk:
            return received, time.monotonic() - start
        received += chunk
    raise AssertionError(f"still open after {limit_s} s; received {received[:200]!r}")


def read_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length (the head and its body)."""
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a whole head: {data!r}"
        data += chunk
    head_part, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head_part.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed before the whole body"
        body += chunk
    return head_part + b"\r\n\r\n" + body
