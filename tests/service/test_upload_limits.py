"""Upload limits against a real API process, on SQLite and PostgreSQL: the size limit (declared
and streamed), the team's storage quota (also under concurrent uploads), a client that disconnects
mid-upload, and a 200 MB upload in bounded memory. Nothing of a refused upload is kept."""

from __future__ import annotations

import hashlib
import http.client
import json
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from service.uploads import BATCH_BYTES
from tests.service.conftest import Stack, chat_jsonl, free_port, start_api, upload
from tests.service.multipart import (
    FORM_TYPE,
    SMALL_LIMIT,
    assert_nothing_kept,
    error,
    file_row,
    form,
    part,
    set_quota,
    sized_chat,
    streamed_form,
)


def test_content_length_above_the_limit_is_refused_before_the_body(stack: Stack) -> None:
    host = urlsplit(stack.url)
    conn = http.client.HTTPConnection(host.hostname or "", host.port, timeout=30)
    conn.putrequest("POST", "/v1/files")
    conn.putheader("Authorization", f"Bearer {stack.team().key}")
    conn.putheader("Content-Type", FORM_TYPE["Content-Type"])
    conn.putheader("Content-Length", str(stack.settings.max_upload_bytes + 1024**2))
    conn.endheaders()  # and no body at all: the answer must not wait for it
    response = conn.getresponse()
    assert response.status == 413
    assert json.loads(response.read())["error"]["code"] == "file_too_large"
    conn.close()


@pytest.fixture(scope="module")
def small_api(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second API process on the same database and storage with a 64 KiB upload limit."""
    env = {**stack.env, "TUNEPOOL_MAX_UPLOAD_BYTES": str(SMALL_LIMIT), "TUNEPOOL_MAX_LINE_BYTES": "16384"}
    port = free_port()
    proc = start_api(env, port, tmp_path_factory.mktemp("small-api") / "api.log")
    yield f"http://127.0.0.1:{port}"
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)


def test_streamed_upload_above_the_limit_is_413_and_kept_nowhere(stack: Stack, small_api: str) -> None:
    team = stack.team()
    client = httpx.Client(base_url=small_api, headers={"Authorization": f"Bearer {team.key}"}, timeout=60)
    before = stack.storage_files()
    exact = sized_chat(SMALL_LIMIT)
    r = client.post("/v1/files", content=streamed_form([exact[:1000], exact[1000:]]), headers=FORM_TYPE)
    assert r.status_code == 200 and r.json()["bytes"] == SMALL_LIMIT, r.text  # the limit itself is allowed
    assert client.delete(f"/v1/files/{r.json()['id']}").status_code == 200
    over = sized_chat(SMALL_LIMIT + 1)
    r = client.post("/v1/files", content=streamed_form([over[:1000], over[1000:]]), headers=FORM_TYPE)
    error(r, 413, "file", "file_too_large")
    error(upload(client, sized_chat(SMALL_LIMIT * 3)), 413, "file", "file_too_large")  # from Content-Length
    long_line = b'{"prompt": "%s", "completion": "x"}\n' % (b"p" * 20_000)
    message = error(upload(client, chat_jsonl(1) + long_line), 400, "file", "invalid_file")
    assert "line 2: line is too long" in message
    assert_nothing_kept(stack, team, before)
    client.close()


def test_storage_quota(stack: Stack) -> None:
    client = stack.team()
    before = stack.storage_files()
    set_quota(stack, client.team_id, 10_000)
    first = upload(client, sized_chat(6000))
    assert first.status_code == 200, first.text
    kept = stack.storage_files()
    error(upload(client, sized_chat(6000)), 413, "file", "storage_quota_exceeded")  # found while streaming
    streamed = streamed_form([sized_chat(6000)])
    error(
        client.post("/v1/files", content=streamed, headers=FORM_TYPE), 413, "file", "storage_quota_exceeded"
    )
    error(upload(client, sized_chat(200_000)), 413, "file", "storage_quota_exceeded")  # from Content-Length
    assert stack.storage_files() == kept
    assert upload(client, sized_chat(4000)).status_code == 200  # exactly the rest of the quota
    assert client.delete(f"/v1/files/{first.json()['id']}").status_code == 200
    second = upload(client, sized_chat(6000))  # the deleted file's bytes are free again
    assert second.status_code == 200, second.text
    for f in client.get("/v1/files").json()["data"]:
        client.delete(f"/v1/files/{f['id']}")
    assert_nothing_kept(stack, client, before)


def test_concurrent_uploads_never_exceed_the_quota(stack: Stack) -> None:
    """Eight uploads of which three fit, each held open until the server is writing all of them: each
    has passed the early quota check (which saw an empty quota) before any is stored, so the check at
    commit time, under the team's lock, is what keeps the sum within the quota (a real race)."""
    client = stack.team()
    before = stack.storage_files()
    size, n = BATCH_BYTES + 64 * 1024, 8
    quota = 3 * size + size // 2
    set_quota(stack, client.team_id, quota)
    body = form(part("purpose", b"fine-tune"), part("file", sized_chat(size), "t.jsonl"))
    # The server hands the body to the parser in BATCH_BYTES batches: after the first one it has
    # opened its temporary file, the sign that it is past the early check and streaming. All but the
    # closing boundary goes first, so that the uploads then end, and reach the commit, together.
    cut = len(body) - 64
    tmp = stack.settings.artifacts / "tmp"
    temps_before = set(tmp.iterdir())
    host = urlsplit(stack.url)
    conns = []
    for _ in range(n):
        conn = http.client.HTTPConnection(host.hostname or "", host.port, timeout=60)
        conn.putrequest("POST", "/v1/files")
        conn.putheader("Authorization", f"Bearer {client.key}")
        conn.putheader("Content-Type", FORM_TYPE["Content-Type"])
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        conn.send(body[:cut])
        conns.append(conn)
    deadline = time.monotonic() + 30
    while len(set(tmp.iterdir()) - temps_before) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(set(tmp.iterdir()) - temps_before) == n, "not every upload got as far as streaming"
    barrier = threading.Barrier(n)
    results: list[tuple[int, dict[str, Any]]] = []

    def finish(conn: http.client.HTTPConnection) -> None:
        barrier.wait()
        conn.send(body[cut:])
        response = conn.getresponse()
        results.append((response.status, json.loads(response.read())))
        conn.close()

    threads = [threading.Thread(target=finish, args=(conn,)) for conn in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [answer for status, answer in results if status == 200]
    assert len(ok) == 3 and len(results) == n, results
    for status, answer in results:
        if status != 200:  # refused at commit time (the message names the size), not by the early check
            assert status == 413 and answer["error"]["code"] == "storage_quota_exceeded", answer
            assert answer["error"]["message"].startswith(f"This {size:,}-byte file"), answer
    listed = client.get("/v1/files").json()["data"]
    assert sorted(f["id"] for f in listed) == sorted(a["id"] for a in ok)
    assert sum(f["bytes"] for f in listed) <= quota
    assert len(stack.storage_files()) == len(before) + 3  # rejected uploads left no bytes
    for f in listed:
        client.delete(f"/v1/files/{f['id']}")
    assert_nothing_kept(stack, client, before)


def test_client_disconnect_mid_upload_keeps_nothing(stack: Stack) -> None:
    client = stack.team()
    before = stack.storage_files()
    host = urlsplit(stack.url)
    conn = http.client.HTTPConnection(host.hostname or "", host.port, timeout=30)
    conn.putrequest("POST", "/v1/files")
    conn.putheader("Authorization", f"Bearer {client.key}")
    conn.putheader("Content-Type", FORM_TYPE["Content-Type"])
    conn.putheader("Content-Length", str(10 * 1024**2))
    conn.endheaders()
    conn.send(part("purpose", b"fine-tune") + part("file", b"", "t.jsonl")[:-2] + sized_chat(3 * 1024**2))
    time.sleep(0.5)  # the server has written some of it to tmp/
    conn.close()
    assert_nothing_kept(stack, client, before, wait_s=10)


def big_chat_file(total: int, record: dict[str, Any]) -> Iterator[bytes]:
    """~`total` bytes of valid chat JSONL in ~1 MiB chunks; counts lines and hashes as it goes."""
    sha, n, sent = hashlib.sha256(), 0, 0
    pad = "x" * 2000
    while sent < total:
        chunk = "".join(
            f'{{"messages":[{{"role":"user","content":"question {n + i} {pad}"}},'
            f'{{"role":"assistant","content":"answer {n + i}"}}]}}\n'
            for i in range(500)
        ).encode()
        n, sent = n + 500, sent + len(chunk)
        sha.update(chunk)
        yield chunk
    record.update(n=n, bytes=sent, sha256=sha.hexdigest())


def test_a_200_mb_upload_streams_in_bounded_memory(stack: Stack) -> None:
    client = stack.team()
    assert upload(client, chat_jsonl()).status_code == 200  # warm the upload path before the baseline
    time.sleep(0.5)
    baseline, peak, done = stack.api_rss(), 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, stack.api_rss())
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    record: dict[str, Any] = {}
    started = time.monotonic()
    try:
        body = streamed_form(big_chat_file(200 * 10**6, record))
        r = client.post("/v1/files", content=body, headers=FORM_TYPE)
    finally:
        done.set()
        sampler.join()
    elapsed = time.monotonic() - started
    growth = (peak - baseline) / 2**20
    print(f"\n[{stack.backend}] 200 MB upload: {elapsed:.1f} s, API RSS growth {growth:.1f} MiB")
    assert r.status_code == 200, r.text
    created = r.json()
    assert (created["n_examples"], created["bytes"], created["format"]) == (
        record["n"],
        record["bytes"],
        "chat",
    )
    assert file_row(stack, created["id"]).sha256 == record["sha256"]
    assert growth < 50, f"API RSS grew {growth:.1f} MiB"
    assert client.delete(f"/v1/files/{created['id']}").status_code == 200
