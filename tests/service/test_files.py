"""Files API against a real API process, on SQLite and on PostgreSQL: upload (streamed, validated,
size- and quota-limited, nothing kept on rejection), list, retrieve, content, delete, isolation."""

from __future__ import annotations

import hashlib
import http.client
import json
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import select

from service.models import File, Job, Team
from service.uploads import BATCH_BYTES
from tests.service.conftest import Stack, TeamClient, chat_jsonl, free_port, start_api, upload

BOUNDARY = "tunepool-test-boundary-7f3a"
FORM_TYPE = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
SMALL_LIMIT = 64 * 1024  # TUNEPOOL_MAX_UPLOAD_BYTES of the second, small-limit API


def part(name: str, content: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    ctype = "Content-Type: application/jsonl\r\n" if filename is not None else ""
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n{ctype}\r\n".encode() + content + b"\r\n"


def form(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def streamed_form(chunks: Iterable[bytes], filename: str = "big.jsonl") -> Iterator[bytes]:
    """A multipart body around a generator: sent chunked, never held whole by the test."""
    yield part("purpose", b"fine-tune") + part("file", b"", filename)[:-2]
    yield from chunks
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def pc_jsonl(n: int = 3) -> bytes:
    return "".join(
        json.dumps({"prompt": f"{i} + {i} =", "completion": f" {2 * i}"}) + "\n" for i in range(n)
    ).encode()


_LINE = '{"messages":[{"role":"user","content":"q%s"},{"role":"assistant","content":"a"}]}\n'
_EMPTY_LINE = len(_LINE % "")


def sized_chat(size: int) -> bytes:
    """A valid chat file of exactly `size` bytes (>= one short line), in lines of at most ~8 KB."""
    lengths = []
    while size > 8000 + _EMPTY_LINE:
        lengths.append(8000)
        size -= 8000
    lengths.append(size)  # > _EMPTY_LINE: the loop left more than that
    return "".join(_LINE % ("x" * (n - _EMPTY_LINE)) for n in lengths).encode()


def file_row(stack: Stack, file_id: str) -> File:
    with stack.db.session() as session:
        row = session.scalar(select(File).where(File.id == file_id))
        assert row is not None
        return row


def error(r: httpx.Response, status: int, param: str | None, code: str | None = None) -> str:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["param"] == param and set(body) == {"message", "type", "param", "code"}, body
    if code is not None:
        assert body["code"] == code, body
    return str(body["message"])


def assert_nothing_kept(stack: Stack, client: TeamClient, before: list[Path], wait_s: float = 0.0) -> None:
    deadline = time.monotonic() + wait_s
    while stack.storage_files() != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stack.storage_files() == before  # neither the file nor a temporary left in tmp/
    assert client.get("/v1/files").json()["data"] == []


def set_quota(stack: Stack, team_id: str, quota: int) -> None:
    with stack.db.session() as session:
        team = session.get(Team, team_id)
        assert team is not None
        team.max_storage_bytes = quota
        session.commit()


def test_upload_list_retrieve_content_delete(stack: Stack) -> None:
    client = stack.team()
    chat, pc = chat_jsonl(5), pc_jsonl(3)
    a = upload(client, chat, "chat.jsonl")
    b = upload(client, pc, "pc.jsonl")
    assert a.status_code == 200 and b.status_code == 200, (a.text, b.text)
    fa, fb = a.json(), b.json()
    assert fa["id"].startswith("file-") and fa["object"] == "file" and fa["status"] == "processed"
    assert (fa["bytes"], fa["filename"], fa["purpose"], fa["format"], fa["n_examples"]) == (
        len(chat),
        "chat.jsonl",
        "fine-tune",
        "chat",
        5,
    )
    assert (fb["format"], fb["n_examples"], fb["bytes"]) == ("prompt_completion", 3, len(pc))
    assert "sha256" not in fa and "storage_path" not in fa
    row = file_row(stack, fa["id"])
    assert row.sha256 == hashlib.sha256(chat).hexdigest()
    stored = stack.settings.artifacts / row.storage_path
    listed = client.get("/v1/files").json()
    assert [f["id"] for f in listed["data"]] == [fb["id"], fa["id"]]  # newest first
    assert listed["first_id"] == fb["id"] and listed["last_id"] == fa["id"] and not listed["has_more"]
    assert client.get(f"/v1/files/{fa['id']}").json() == fa
    content = client.get(f"/v1/files/{fa['id']}/content")
    assert content.status_code == 200 and content.content == chat and stored.read_bytes() == chat
    assert (
        content.headers["content-length"] == str(len(chat))
        and 'filename="chat.jsonl"' in content.headers["content-disposition"]
    )
    assert client.get(f"/v1/files/{fb['id']}/content").content == pc
    deleted = client.delete(f"/v1/files/{fa['id']}")
    assert deleted.status_code == 200 and deleted.json() == {
        "id": fa["id"],
        "object": "file",
        "deleted": True,
    }
    assert not stored.exists()
    for r in (client.get(f"/v1/files/{fa['id']}"), client.get(f"/v1/files/{fa['id']}/content"),
              client.delete(f"/v1/files/{fa['id']}")):  # fmt: skip
        error(r, 404, "file_id", "not_found")
    assert [f["id"] for f in client.get("/v1/files").json()["data"]] == [fb["id"]]


def test_list_pagination_order_purpose_and_results_files(stack: Stack) -> None:
    client = stack.team()
    ids = [upload(client, chat_jsonl(i + 1)).json()["id"] for i in range(3)]
    relpath = f"jobs/ftjob-x/{client.team_id}-results.csv"
    (stack.settings.artifacts / relpath).parent.mkdir(parents=True, exist_ok=True)
    (stack.settings.artifacts / relpath).write_bytes(b"step,loss\n1,0.5\n")
    with stack.db.session() as session:  # as a worker writes a job's results
        results = File(team_id=client.team_id, filename="step_metrics.csv", purpose="fine-tune-results",
                       bytes=16, sha256="0" * 64, storage_path=relpath)  # fmt: skip
        session.add(results)
        session.commit()
    page = client.get("/v1/files", params={"limit": 2}).json()
    assert [f["id"] for f in page["data"]] == [results.id, ids[2]] and page["has_more"]
    rest = client.get("/v1/files", params={"limit": 2, "after": page["last_id"]}).json()
    assert [f["id"] for f in rest["data"]] == [ids[1], ids[0]] and not rest["has_more"]
    asc = client.get("/v1/files", params={"order": "asc", "after": ids[0]}).json()
    assert [f["id"] for f in asc["data"]] == [ids[1], ids[2], results.id]
    only = client.get("/v1/files", params={"purpose": "fine-tune-results"}).json()
    assert [f["id"] for f in only["data"]] == [results.id]
    download = client.get(f"/v1/files/{results.id}/content")
    assert download.content == b"step,loss\n1,0.5\n"
    assert download.headers["content-type"] == "application/octet-stream"
    error(client.get("/v1/files", params={"after": "file-nope"}), 400, "after", "invalid_cursor")
    error(client.get("/v1/files", params={"limit": 0}), 400, "limit")


def test_filename_is_sanitised_for_display_only(stack: Stack) -> None:
    client = stack.team()
    body = form(part("purpose", b"fine-tune"), part("file", chat_jsonl(), "..\\../etc/p\x07a\u202ess.jsonl"))
    r = client.post("/v1/files", content=body, headers=FORM_TYPE)
    assert r.status_code == 200, r.text
    assert r.json()["filename"] == "pass.jsonl"
    assert file_row(stack, r.json()["id"]).storage_path == f"files/{client.team_id}/{r.json()['id']}.jsonl"


def test_bad_file_lists_each_bad_line_and_keeps_nothing(stack: Stack) -> None:
    client = stack.team()
    before = stack.storage_files()
    good = chat_jsonl(1)
    data = (
        good + b'{"prompt": "x", "completion": "y"}\n' + good + b"not json\n" + b'{"messages": []}\n' + good
    )
    message = error(upload(client, data), 400, "file", "invalid_file")
    lines = message.splitlines()
    assert lines[0] == "3 bad lines in training data:"
    assert lines[1].startswith("line 2: prompt/completion example in a chat file")
    assert lines[2].startswith("line 4: not valid JSON")
    assert lines[3].startswith("line 5: messages: empty list")
    assert_nothing_kept(stack, client, before)
    many = b"".join(b'{"oops": %d}\n' % i for i in range(stack.settings.max_reported_errors + 7))
    message = error(upload(client, many), 400, "file", "invalid_file")
    assert message.count("\nline ") == stack.settings.max_reported_errors and message.endswith(
        "... and 7 more"
    )
    assert_nothing_kept(stack, client, before)  # an empty file and the rest: test_bad_data.py


_FILE = part("file", chat_jsonl(), "t.jsonl")
_PURPOSE = part("purpose", b"fine-tune")
MALFORMED = {
    "no-purpose": (form(_FILE), None, 400, "purpose"),
    "wrong-purpose-first": (form(part("purpose", b"assistants"), _FILE), None, 400, "purpose"),
    "wrong-purpose-last": (form(_FILE, part("purpose", b"batch")), None, 400, "purpose"),
    "no-file": (form(_PURPOSE), None, 400, "file"),
    "two-files": (form(_PURPOSE, _FILE, part("file", pc_jsonl(), "b.jsonl")), None, 400, "file"),
    "not-multipart": (chat_jsonl(), "application/jsonl", 415, "file"),
    "no-boundary": (form(_PURPOSE, _FILE), "multipart/form-data", 400, "file"),
    "wrong-boundary": (form(_PURPOSE, _FILE), "multipart/form-data; boundary=other", 400, "file"),
    "truncated": (form(_PURPOSE, _FILE)[:-30], None, 400, "file"),
}


@pytest.mark.parametrize(
    ("body", "content_type", "status", "param"), MALFORMED.values(), ids=MALFORMED.keys()
)
def test_malformed_requests(
    stack: Stack, body: bytes, content_type: str | None, status: int, param: str
) -> None:
    client = stack.team()
    before = stack.storage_files()
    headers = {"Content-Type": content_type} if content_type else FORM_TYPE
    error(client.post("/v1/files", content=body, headers=headers), status, param)
    assert_nothing_kept(stack, client, before)


def test_purpose_after_the_file_is_accepted(stack: Stack) -> None:
    client = stack.team()
    body = form(part("file", pc_jsonl(2), "t.jsonl"), part("purpose", b"fine-tune"))
    r = client.post("/v1/files", content=body, headers=FORM_TYPE)
    assert r.status_code == 200 and r.json()["n_examples"] == 2, r.text


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


def test_another_teams_file_is_indistinguishable_from_a_missing_one(stack: Stack) -> None:
    owner, other = stack.team(), stack.team()
    file_id = upload(owner, chat_jsonl()).json()["id"]
    for method, suffix in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
        theirs = other.request(method, f"/v1/files/{file_id}{suffix}")
        missing = other.request(method, f"/v1/files/file-doesnotexist000000000{suffix}")
        assert theirs.status_code == missing.status_code == 404
        a, b = theirs.json()["error"], missing.json()["error"]
        assert (
            (a["type"], a["code"], a["param"])
            == (b["type"], b["code"], b["param"])
            == ("invalid_request_error", "not_found", "file_id")
        )
        assert a["message"].replace(file_id, "ID") == b["message"].replace("file-doesnotexist000000000", "ID")
    assert other.get("/v1/files").json()["data"] == []
    assert owner.get(f"/v1/files/{file_id}/content").content == chat_jsonl()


def test_delete_is_refused_while_an_active_job_uses_the_file(stack: Stack) -> None:
    client = stack.team()
    train, valid = (upload(client, chat_jsonl(n)).json()["id"] for n in (3, 2))
    with stack.db.session() as session:
        job = Job(team_id=client.team_id, model="tiny", model_source="/nonexistent", training_file=train,
                  validation_file=valid, method={"type": "dft"}, loss="dft", hyperparameters={}, seed=1,
                  pool="default", status="queued")  # fmt: skip
        session.add(job)
        session.commit()
    for status in ("queued", "running", "validating_files"):
        with stack.db.session() as session:
            session.get(Job, job.pk).status = status  # type: ignore[union-attr]
            session.commit()
        for file_id in (train, valid):
            message = error(client.delete(f"/v1/files/{file_id}"), 409, "file_id", "file_in_use")
            assert job.id in message and status in message
    assert client.get(f"/v1/files/{train}/content").content == chat_jsonl(3)
    with stack.db.session() as session:
        session.get(Job, job.pk).status = "cancelled"  # type: ignore[union-attr]
        session.commit()
    assert client.delete(f"/v1/files/{train}").status_code == 200
    assert client.delete(f"/v1/files/{valid}").status_code == 200


def test_unauthenticated_requests_get_401(stack: Stack) -> None:
    anonymous, wrong = stack.client(), stack.client("tp-AAAAAAAA-" + "b" * 40)
    for client in (anonymous, wrong):
        for r in (client.get("/v1/files"), client.get("/v1/files/file-x"), client.delete("/v1/files/file-x"),
                  client.get("/v1/files/file-x/content"), upload(client, chat_jsonl())):  # fmt: skip
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}


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


def test_the_openai_sdk_uploads_lists_downloads_and_deletes(stack: Stack) -> None:
    openai = pytest.importorskip("openai")
    client = stack.team()
    sdk = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=client.key, max_retries=0)
    created = sdk.files.create(file=("sdk.jsonl", chat_jsonl(2)), purpose="fine-tune")
    assert (created.filename, created.bytes, created.status) == ("sdk.jsonl", len(chat_jsonl(2)), "processed")
    assert [f.id for f in sdk.files.list()] == [created.id]
    assert sdk.files.retrieve(created.id).id == created.id
    assert sdk.files.content(created.id).read() == chat_jsonl(2)
    assert sdk.files.delete(created.id).deleted
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(created.id)
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.files.create(file=("bad.jsonl", b"{}\n"), purpose="fine-tune")
    assert bad.value.code == "invalid_file" and "line 1" in bad.value.message
