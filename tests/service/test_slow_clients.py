"""Slow and stalled clients cost other teams nothing, and are closed after their timeouts (issue 11,
findings 1 and 9). Raw sockets play the hostile clients (tests/service/raw_http.py), against real
API processes on both databases."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from sqlalchemy import func, select

from service.models import Job
from tests.service.conftest import Stack
from tests.service.helpers import ensure_model, new_file
from tests.service.multipart import sized_chat
from tests.service.raw_http import (
    Api,
    head,
    read_response,
    read_until_closed,
    second_api,
    slow_upload,
    stalled_download,
)

BIG = 8 * 1024 * 1024  # a download larger than every socket buffer between the API and the client


def big_file(api: Api, key: str) -> str:
    with api.client(key) as client:
        r = client.post(
            "/v1/files",
            files={"file": ("big.jsonl", sized_chat(BIG), "application/jsonl")},
            data={"purpose": "fine-tune"},
        )
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def p99(samples: list[float]) -> float:
    if not samples:  # no job was created to poll: every create timed out
        return float("inf")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


@pytest.fixture(scope="module")
def roomy_api(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """Default timeouts; caps above the 20 + 20 slow requests, so that every one of them is served."""
    home = tmp_path_factory.mktemp("roomy-api")
    with second_api(stack, home, team_max_uploads=32, team_max_downloads=32) as api:
        yield api


def test_slow_uploads_and_stalled_downloads_cost_other_teams_nothing(stack: Stack, roomy_api: Api) -> None:
    api = roomy_api
    a, b = stack.team(), stack.team()
    big = big_file(api, a.key)
    uploads = [slow_upload(api, a.key) for _ in range(20)]
    downloads = [stalled_download(api, a.key, f"/v1/files/{big}/content") for _ in range(20)]
    time.sleep(1.0)  # every one of them is in its handler, waiting on its client
    model, training_file = ensure_model(stack), new_file(b)
    latencies: dict[str, list[float]] = {"files": [], "models": [], "create": [], "poll": []}
    created: list[str] = []
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {b.key}"}, timeout=5) as client:

        def timed(name: str, call: Callable[[], httpx.Response]) -> httpx.Response | None:
            start = time.perf_counter()
            try:
                response = call()
            except httpx.TimeoutException:
                response = None
            latencies[name].append(time.perf_counter() - start)
            assert response is None or response.status_code == 200, response.text
            return response

        for _ in range(25):
            timed("files", lambda: client.get("/v1/files"))
            timed("models", lambda: client.get("/v1/models"))
            body = {"model": model, "training_file": training_file, "method": {"type": "dft"}}
            job = timed("create", lambda: client.post("/v1/fine_tuning/jobs", json=body))  # noqa: B023
            if job is not None:
                created.append(job.json()["id"])
                timed("poll", lambda: client.get(f"/v1/fine_tuning/jobs/{created[-1]}"))
    worst = {name: round(p99(samples), 3) for name, samples in latencies.items()}
    assert all(p < 1.0 for p in worst.values()), worst
    # Every create the client saw time out would be a job it does not know of: there must be none.
    with stack.db.session() as session:
        jobs = session.scalar(select(func.count()).select_from(Job).where(Job.team_id == b.team_id))
    assert jobs == len(created) == 25
    # The slow ones were never refused: still open, the API waiting on them.
    assert all(is_open(s) for s in uploads)
    for sock in uploads + downloads:
        sock.close()


def is_open(sock: socket.socket) -> bool:
    """Whether the server has not closed the connection (nothing to read yet, or unread bytes)."""
    timeout = sock.gettimeout()
    sock.settimeout(0.0)  # with a timeout set, Python would wait for data despite MSG_DONTWAIT
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except ConnectionError:
        return False
    finally:
        sock.settimeout(timeout)


@pytest.fixture(scope="module")
def strict_api(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """Timeouts small enough to watch."""
    home = tmp_path_factory.mktemp("strict-api")
    with second_api(
        stack,
        home,
        header_timeout_s=1,
        body_idle_timeout_s=1,
        keep_alive_timeout_s=2,
        send_stall_timeout_s=1.5,
        team_max_downloads=2,
    ) as api:
        yield api


def error_code(response: bytes) -> str:
    assert response.startswith(b"HTTP/1.1 408 "), response[:200]
    assert b"connection: close" in response.lower()
    return str(json.loads(response.partition(b"\r\n\r\n")[2])["error"]["code"])


def test_idle_sockets_and_slow_heads_are_closed(strict_api: Api) -> None:
    api = strict_api
    start = time.monotonic()
    idle, partial, drip = api.connect(), api.connect(), api.connect()
    partial.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    time.sleep(0.5)
    assert is_open(idle) and is_open(partial)
    # A head dripped a byte every 0.2 s: each byte is on time, the head as a whole is not.
    drip_closed_at = None
    for byte in (b"GET /v1/models HTTP/1.1\r\nX-Slow: " + b"x" * 40)[:20]:
        try:
            drip.sendall(bytes([byte]))
        except OSError:
            break
        if not is_open(drip):
            break
        time.sleep(0.2)
    drip_closed_at = time.monotonic() - start
    assert drip_closed_at < 2.5, drip_closed_at
    assert error_code(read_until_closed(drip, 2)[0]) == "request_timeout"
    assert error_code(read_until_closed(partial, 2)[0]) == "request_timeout"
    assert read_until_closed(idle, 2)[0] == b""  # sent nothing: closed without an answer
    assert time.monotonic() - start < 3.5


def test_a_body_that_stops_gets_408(stack: Stack, strict_api: Api) -> None:
    team = stack.team()
    # Bytes every 0.5 s keep a body alive (the limit is on silence, not on the whole body)...
    sock = slow_upload(strict_api, team.key)
    for _ in range(4):
        time.sleep(0.5)
        sock.sendall(b"[")
    assert is_open(sock)
    # ...then silence: 408 about a second later, and the connection closed.
    response, waited = read_until_closed(sock, 4)
    assert 0.7 < waited < 3, waited
    assert error_code(response) == "request_timeout"
    assert b"TUNEPOOL_BODY_IDLE_TIMEOUT_S" in response


def test_keep_alive_connections_close_and_next_heads_are_timed(strict_api: Api) -> None:
    sock = strict_api.connect()
    sock.sendall(head("GET", "/healthz", None))
    assert read_response(sock).startswith(b"HTTP/1.1 200")
    _, idle_for = read_until_closed(sock, 5)
    assert 1.5 < idle_for < 3.5, idle_for  # TUNEPOOL_KEEP_ALIVE_TIMEOUT_S=2
    # The next head on a kept-alive connection has the header timeout from its first byte.
    sock = strict_api.connect()
    sock.sendall(head("GET", "/healthz", None))
    assert read_response(sock).startswith(b"HTTP/1.1 200")
    sock.sendall(b"GET /healthz HTTP/1.1\r\n")
    response, waited = read_until_closed(sock, 4)
    assert waited < 1.8, waited  # the header timeout (1 s), before the keep-alive one (2 s)
    assert error_code(response) == "request_timeout"


def test_a_download_left_unread_is_dropped_and_frees_its_slot(stack: Stack, strict_api: Api) -> None:
    team = stack.team()
    big = big_file(strict_api, team.key)
    path = f"/v1/files/{big}/content"
    stalled = [stalled_download(strict_api, team.key, path) for _ in range(2)]
    with strict_api.client(team.key) as client:
        refused = client.get(path)
        assert refused.status_code == 429 and refused.headers["Retry-After"]  # the team's 2 downloads
        # TUNEPOOL_SEND_STALL_TIMEOUT_S=1.5: the server drops both and their slots come back.
        for sock in stalled:
            read_until_closed(sock, 10)
        deadline = time.monotonic() + 5
        while (r := client.get(path)).status_code == 429 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert r.status_code == 200 and len(r.content) == BIG


def test_idle_time_between_requests_counts_for_keep_alive_only(strict_api: Api) -> None:
    """Gaps of 1.5 s between requests on one connection: over the header timeout (1 s), under the
    keep-alive one (2 s). The head's clock starts at its first byte, so the connection is kept."""
    sock = strict_api.connect()
    for _ in range(3):
        sock.sendall(head("GET", "/healthz", None))
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        time.sleep(1.5)
        assert is_open(sock)
    sock.close()
