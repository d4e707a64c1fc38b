"""The noisy team of bench/noisy_neighbour.py: hostile or merely unlucky clients, on raw asyncio sockets.

Each kind keeps its connections open for as long as the server lets it and opens a new one when the
server closes it (a timeout did its work), so the pressure lasts the whole phase:
- slow uploads: a multipart upload's headers and first bytes, then one body byte a second;
- stalled downloads: a download of a large file whose client reads the headers, then stops reading;
- event streams: `?stream=true` on the team's queued jobs, read as they come;
- a dripping webhook receiver: accepts, then sends one header line every `drip_s`, never an answer.
Counts of what happened (connections opened, closed by the server, answered 429...) are kept in
`Noise.stats` for the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

BOUNDARY = "noisyneighbourboundary"


@dataclass
class NoisePlan:
    port: int  # the API's
    key: str  # team A's
    download_file: str  # a large file of team A
    stream_jobs: list[str]  # queued jobs of team A to stream the events of
    uploads: int = 50
    downloads: int = 50
    streams: int = 500
    drip_s: float = 1.0
    hold_s: float = 90.0  # how long a stalled download keeps its socket before it opens another


@dataclass
class Noise:
    plan: NoisePlan
    stats: Counter[str] = field(default_factory=Counter)
    receiver_port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _stop: asyncio.Event | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def start_receiver(self) -> int:
        """Start the loop thread and the dripping receiver; its port (for team A's webhook)."""
        self._thread = threading.Thread(target=self._run, name="noisy-neighbour", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        return self.receiver_port

    def start_clients(self) -> None:
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._clients(), self._loop)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(15)

    # -- the loop thread --------------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._drip, "127.0.0.1", 0)
        self.receiver_port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()
            server.close()
            tasks = asyncio.all_tasks() - {asyncio.current_task()}
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _drip(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats["webhook_connections"] += 1
        with contextlib.suppress(OSError, asyncio.CancelledError):
            writer.write(b"HTTP/1.1 200 OK\r\n")
            while True:
                await asyncio.sleep(self.plan.drip_s)
                writer.write(b"X-Drip: 1\r\n")
                await writer.drain()
        self.stats["webhook_closed_by_sender"] += 1
        writer.close()

    async def _clients(self) -> None:
        plan = self.plan
        kinds = (
            [self._slow_upload] * plan.uploads
            + [self._stalled_download] * plan.downloads
            + [self._stream] * plan.streams
        )
        for i, kind in enumerate(kinds):
            # Kept referenced: the loop holds tasks only weakly, and a collected one just stops.
            self._tasks.add(asyncio.get_running_loop().create_task(self._forever(kind, i)))
            if i % 50 == 49:
                await asyncio.sleep(0.05)  # open them over a moment, as real clients would

    async def _forever(self, kind: object, i: int) -> None:
        assert callable(kind)
        while True:
            try:
                await kind(i)
            except (OSError, asyncio.IncompleteReadError):
                self.stats["connection_errors"] += 1
            await asyncio.sleep(0.5)

    async def _open(self, head: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.plan.port)
        writer.write(head.encode())
        await writer.drain()
        return reader, writer

    def _head(self, method: str, path: str, extra: str = "") -> str:
        return (
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {self.plan.key}\r\n"
            f"{extra}\r\n"
        )

    async def _answered(self, reader: asyncio.StreamReader, kind: str) -> bool:
        """Read the status line: count it, and False unless it is a 200."""
        line = await reader.readline()
        if not line:
            self.stats[f"{kind}_closed_by_server"] += 1
            return False
        status = line.split(b" ")[1].decode() if b" " in line else "?"
        self.stats[f"{kind}_{status}"] += 1
        return status == "200"

    async def _slow_upload(self, i: int) -> None:
        self.stats["upload_opened"] += 1
        body_start = (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="slow.jsonl"\r\n'
            "Content-Type: application/jsonl\r\n\r\n"
        )
        extra = f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: 10000000\r\n"
        reader, writer = await self._open(self._head("POST", "/v1/files", extra) + body_start)
        try:
            line = b'{"prompt": "slow", "completion": "client"}\n'
            n = 0
            while True:  # one byte a second: under the body idle timeout, so only a cap or the end stops it
                writer.write(line[n % len(line) : n % len(line) + 1])
                await writer.drain()
                n += 1
                with contextlib.suppress(TimeoutError):
                    answer = await asyncio.wait_for(reader.readline(), 1.0)
                    status = answer.split(b" ")[1].decode() if b" " in answer else "closed_by_server"
                    self.stats[f"upload_{status}"] += 1
                    return
        finally:
            writer.close()

    async def _stalled_download(self, i: int) -> None:
        self.stats["download_opened"] += 1
        reader, writer = await self._open(self._head("GET", f"/v1/files/{self.plan.download_file}/content"))
        try:
            if await self._answered(reader, "download"):
                await reader.read(1024)  # the first bytes, then no other read: the buffers fill up
                # Held past the server's send-stall timeout: whether the server let go of it shows in
                # its own counters, not here (its close waits behind the unread bytes).
                await asyncio.sleep(self.plan.hold_s)
        finally:
            writer.close()

    async def _stream(self, i: int) -> None:
        self.stats["stream_opened"] += 1
        job = self.plan.stream_jobs[i % len(self.plan.stream_jobs)]
        reader, writer = await self._open(self._head("GET", f"/v1/fine_tuning/jobs/{job}/events?stream=true"))
        try:
            if await self._answered(reader, "stream"):
                while chunk := await reader.read(65536):
                    self.stats["stream_bytes"] += len(chunk)
                self.stats["stream_ended"] += 1
        finally:
            writer.close()


def noise_process(plan: NoisePlan, conn: Any) -> None:
    """The noisy team in a process of its own (multiprocessing target), so that its client work does
    not share a GIL with the measured team's client: sends the receiver's port, waits for the plan's
    last fields ("start"), makes noise until "stop", then sends its counts."""
    noise = Noise(plan)
    conn.send(noise.start_receiver())
    command, download_file, stream_jobs = conn.recv()
    assert command == "start"
    noise.plan.download_file, noise.plan.stream_jobs = download_file, stream_jobs
    noise.start_clients()
    conn.recv()  # "stop"
    noise.stop()
    conn.send(dict(noise.stats))
