"""Per-team caps on concurrent uploads, downloads and event streams (service/team_limits.py): the
team over its cap gets 429 with Retry-After, every other team is served, and the slots come back
when the team's requests end. Real API process, both databases; raw sockets hold the requests."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.service.conftest import Stack, chat_jsonl
from tests.service.helpers import new_job
from tests.service.multipart import sized_chat
from tests.service.raw_http import Api, head, second_api, slow_upload, stalled_download

CAPS = {"uploads": 2, "downloads": 2, "event_streams": 3}


@pytest.fixture(scope="module")
def api(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    caps = {f"team_max_{kind}": n for kind, n in CAPS.items()}
    with second_api(stack, tmp_path_factory.mktemp("capped-api"), **caps) as api:
        yield api


def assert_capped(response: httpx.Response, kind: str) -> None:
    assert response.status_code == 429, response.text
    assert int(response.headers["Retry-After"]) >= 1
    error = response.json()["error"]
    assert error["code"] == f"too_many_{kind}" and error["type"] == "rate_limit_error"
    assert f"TUNEPOOL_TEAM_MAX_{kind.upper()}" in error["message"]


def eventually_not_429(call: Callable[[], httpx.Response], limit_s: float = 5.0) -> httpx.Response:
    """The slots of closed requests come back once the API has seen them go (a moment later)."""
    deadline = time.monotonic() + limit_s
    while (response := call()).status_code == 429 and time.monotonic() < deadline:
        time.sleep(0.1)
    return response


def upload_small(client: httpx.Client) -> httpx.Response:
    files = {"file": ("t.jsonl", chat_jsonl(), "application/jsonl")}
    return client.post("/v1/files", files=files, data={"purpose": "fine-tune"})


def test_uploads_downloads_and_streams_are_capped_per_team(stack: Stack, api: Api) -> None:
    a, b = stack.team(), stack.team()
    a_http, b_http = api.client(a.key), api.client(b.key)
    big = upload_small_big(a_http)
    b_file = upload_small(b_http).json()["id"]
    a_job, b_job = new_job(stack, a)["id"], new_job(stack, b)["id"]
    streams = f"/v1/fine_tuning/jobs/{a_job}/events?stream=true"

    held: list[socket.socket] = [slow_upload(api, a.key) for _ in range(CAPS["uploads"])]
    held += [stalled_download(api, a.key, f"/v1/files/{big}/content") for _ in range(CAPS["downloads"])]
    for _ in range(CAPS["event_streams"]):
        sock = api.connect()
        sock.sendall(head("GET", streams, a.key))
        held.append(sock)
    time.sleep(0.5)  # every held request is in its handler

    assert_capped(upload_small(a_http), "uploads")
    assert_capped(a_http.get(f"/v1/files/{big}/content"), "downloads")
    assert_capped(a_http.get(streams), "event_streams")
    # Team B is not A: its upload, download and stream are served meanwhile.
    assert upload_small(b_http).status_code == 200
    assert b_http.get(f"/v1/files/{b_file}/content").status_code == 200
    with b_http.stream("GET", f"/v1/fine_tuning/jobs/{b_job}/events", params={"stream": "true"}) as r:
        assert r.status_code == 200
    # A's other requests are not capped either.
    assert a_http.get("/v1/files").status_code == 200

    for sock in held:
        sock.close()
    assert eventually_not_429(lambda: upload_small(a_http)).status_code == 200
    download = eventually_not_429(lambda: a_http.get(f"/v1/files/{big}/content"))
    assert download.status_code == 200 and len(download.content) == 8 * 1024 * 1024

    def open_stream() -> httpx.Response:
        with a_http.stream("GET", streams) as r:
            return r

    assert eventually_not_429(open_stream).status_code == 200
    a_http.close()
    b_http.close()


def upload_small_big(client: httpx.Client) -> str:
    """An 8 MiB file: its download outlasts the socket buffers of a client that stops reading."""
    files = {"file": ("big.jsonl", sized_chat(8 * 1024 * 1024), "application/jsonl")}
    r = client.post("/v1/files", files=files, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return str(r.json()["id"])
