"""Files API against a real API process, on SQLite and on PostgreSQL: upload (streamed, validated,
nothing kept on rejection), list, retrieve, content, delete, isolation. Size and quota limits:
test_upload_limits.py; the catalogue of bad files: test_bad_data.py."""

from __future__ import annotations

import hashlib

import pytest

from service.models import File, Job
from tests.service.conftest import Stack, chat_jsonl, upload
from tests.service.multipart import (
    FORM_TYPE,
    assert_nothing_kept,
    error,
    file_row,
    form,
    part,
    pc_jsonl,
)


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
