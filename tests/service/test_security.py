"""No request reaches outside the artifact directory, whatever its ids, names, upload file names or
suffixes hold (`..`, `/`, NUL, %-encoding once or twice); and Storage itself refuses any path that
resolves outside its root. A sentinel planted next to the artifact directory is never served,
changed or deleted. (Key secrecy: test_secrets.py; the isolation matrix: test_isolation.py.)"""

from __future__ import annotations

import http.client
import json
import os
import secrets
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
from sqlalchemy import select

from service.api.ui import COOKIE, csrf_token
from service.models import File
from service.storage import Storage, StorageError
from tests.service.conftest import Stack
from tests.service.helpers import add_checkpoint, ensure_model, new_file, new_job
from tests.service.multipart import FORM_TYPE, form, part
from tests.service.test_isolation import route_table

SENTINEL_NAMES = ("sentinel", "sentinel.jsonl", "sentinel.csv")


def plant_sentinels(home: Path) -> tuple[str, dict[Path, tuple[bytes, int]]]:
    """Files beside the artifact directory that a traversal would reach: their text and (bytes, mtime)."""
    text = f"tunepool-sentinel-{secrets.token_hex(8)}"
    for name in SENTINEL_NAMES:
        (home / name).write_text(text + "\n")
    return text, {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (home / n for n in SENTINEL_NAMES)}


def outside_files(home: Path, artifacts: Path) -> set[Path]:
    """Files under the stack's home but outside its artifact directory (the databases, logs...)."""
    return {p for p in home.rglob("*") if p.is_file() and artifacts not in p.parents}


def hostile_segments(home: Path) -> list[str]:
    """Path-segment text as sent on the wire: traversal, absolute paths, NUL, %-encoded once and twice."""
    values = ["..", ".", "%2e%2e", "%2E%2E", ".%2e", "%2e.", "%00", "x%00", "sentinel%00.jsonl", "%2e%2e%00"]
    values += ["%c0%ae%c0%ae%c0%afsentinel", "..%5c..%5csentinel", "..\\..\\sentinel", "..;sentinel", "%2f"]
    values += [quote(str(home / "sentinel"), safe=""), quote(quote(str(home / "sentinel"), safe=""), safe="")]
    for depth in (1, 3, 5):
        up = "../" * depth + "sentinel"
        once = up.replace(".", "%2e").replace("/", "%2f")
        values += [up, quote(up, safe=""), once, once.replace("%", "%25"), once.replace("%", "%2525")]
    return values


def raw_request(
    stack: Stack, method: str, path: str, key: str, body: bytes = b"", ctype: str = ""
) -> tuple[int, bytes]:
    """Send `path` byte for byte (httpx would normalise `..` and re-encode)."""
    url = urlsplit(stack.url)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=30)
    headers = {
        "Authorization": f"Bearer {key}",
        "Cookie": f"{COOKIE}={key}",
        "Content-Length": str(len(body)),
    }
    if ctype:
        headers["Content-Type"] = ctype
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    result = (response.status, response.read())
    conn.close()
    return result


def test_no_path_parameter_reaches_outside(stack: Stack) -> None:
    """Every path parameter of every route (and the static-files mount), each hostile value in turn,
    the other parameters set to the caller's own real ids so that the hostile one decides."""
    home, artifacts = stack.settings.home, stack.settings.artifacts
    text, sentinels = plant_sentinels(home)
    admin = stack.team(admin=True)
    job = new_job(stack, admin)["id"]
    real = {
        "fine_tuning_job_id": job,
        "job_id": job,
        "checkpoint_id": add_checkpoint(stack, job, 2, {"config.json": b"{}"}),
        "file_id": new_file(admin),
        "webhook_id": admin.post("/v1/webhooks", json={"url": "https://example.invalid/h"}).json()["id"],
        "model_id": "tiny-test-model",
        "name": admin.name,
        "prefix": admin.key[:11],
        "path": "app.css",
    }
    assert raw_request(stack, "GET", "/ui/static/app.css", admin.key)[0] == 200  # the mount does serve
    before_outside, before_stored = outside_files(home, artifacts), stack.storage_files()
    answers: dict[int, int] = {}
    reached = 0
    for method, template, params, _ in route_table():
        for param in params:
            for value in hostile_segments(home):
                ids = {**real, param: value}
                path = (
                    f"{template}/{value}" if method == "*" else template.replace(":path}", "}").format(**ids)
                )
                body, ctype = b"", ""
                if template.startswith("/ui/") and method == "POST":
                    body, ctype = (
                        f"csrf={csrf_token(admin.key)}".encode(),
                        "application/x-www-form-urlencoded",
                    )
                elif method in ("PATCH", "POST") and template.startswith("/v1/admin"):
                    body, ctype = b'{"max_running_jobs": 3}', "application/json"
                verb = "GET" if method == "*" else method  # a mount: the static files
                status, content = raw_request(stack, verb, path, admin.key, body, ctype)
                answers[status] = answers.get(status, 0) + 1
                reached += status == 404 and b"Unknown request URL" not in content  # a handler's 404
                assert 400 <= status < 500 or status in (303, 307), (method, path, status, content[:300])
                assert text.encode() not in content, (method, path)
    assert set(answers) <= {303, 307, 400, 403, 404, 405}, answers
    assert reached > 100  # the values did reach the handlers (not just the router's or a parser's error)
    for sentinel, (data, mtime) in sentinels.items():
        assert sentinel.read_bytes() == data and sentinel.stat().st_mtime_ns == mtime, sentinel
    assert outside_files(home, artifacts) == before_outside
    assert stack.storage_files() == before_stored


HOSTILE_FILENAMES = [
    b"../../sentinel.jsonl", b"..\\..\\sentinel.jsonl", b"/etc/passwd", b"..%2F..%2Fsentinel.jsonl",
    b"%2e%2e%2f%2e%2e%2fsentinel.jsonl", b"%252e%252e%252fsentinel.jsonl", b"sentinel.jsonl\x00.txt",
    b"..", b".", b"", b"C:\\..\\..\\sentinel.jsonl", b"\xe2\x80\xa5/sentinel.jsonl",
    b"\xef\xbc\x8e\xef\xbc\x8e\xef\xbc\x8fsentinel.jsonl", b"a\r\nContent-Type: text/html",
]  # fmt: skip


def test_upload_file_names_never_become_paths(stack: Stack) -> None:
    home, artifacts = stack.settings.home, stack.settings.artifacts
    text, sentinels = plant_sentinels(home)
    client = stack.team()
    content = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}\n'
    before = outside_files(home, artifacts)
    for filename in HOSTILE_FILENAMES:
        stored_before = set(stack.storage_files())
        # The shared multipart builder writes the name into the part header exactly as given.
        body = form(part("purpose", b"fine-tune"), part("file", content, filename.decode()))
        status, answer = raw_request(stack, "POST", "/v1/files", client.key, body, FORM_TYPE["Content-Type"])
        if status == 400:  # a header the multipart parser refuses is fine; nothing may be kept
            assert set(stack.storage_files()) == stored_before
            continue
        assert status == 200, (filename, answer)
        file_id = json.loads(answer)["id"]
        with stack.db.session() as session:
            row = session.scalar(select(File).where(File.id == file_id))
            assert row is not None
            name, storage_path = row.filename, row.storage_path
        # Stored where the service's own ids say, never where the client's name points.
        assert storage_path == f"files/{client.team_id}/{file_id}.jsonl"
        assert set(stack.storage_files()) - stored_before == {artifacts / storage_path}
        assert "/" not in name and "\\" not in name and name.strip(".") and "\x00" not in name, name
        download = client.get(f"/v1/files/{file_id}/content")
        assert download.content == content and text not in download.text
        disposition = download.headers["content-disposition"]
        assert "\r" not in disposition and "\n" not in disposition and "/" not in disposition
    for sentinel, (data, mtime) in sentinels.items():
        assert sentinel.read_bytes() == data and sentinel.stat().st_mtime_ns == mtime
    assert outside_files(home, artifacts) == before


@pytest.mark.parametrize(
    "suffix",
    ["../../sentinel", "a/../../sentinel", "..", "%2e%2e%2fsentinel", "a\x00b", "a\nb", "a\\b", "x" * 65],
)
def test_job_suffixes_and_names_cannot_carry_a_path(stack: Stack, suffix: str) -> None:
    client = stack.team()
    file_id = new_file(client)
    body = {"model": "tiny-test-model", "training_file": file_id, "method": {"type": "dft"}, "suffix": suffix}
    ensure_model(stack)  # registered, so only the suffix is at fault below
    response = client.post("/v1/fine_tuning/jobs", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "suffix", response.text
    for field in ("model", "training_file"):
        response = client.post("/v1/fine_tuning/jobs", json={**body, "suffix": None, field: suffix})
        error = response.json()["error"]
        # PostgreSQL refuses a NUL before any lookup (the generic 400); anything else names the field.
        assert response.status_code == 400 and (error["param"] == field or error["code"] == "invalid_value")


# -- Storage, directly ------------------------------------------------------------------------------


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    (tmp_path / "secret").write_text("outside")
    (tmp_path / "artifacts-evil").mkdir()  # a sibling whose name starts like the root's
    (tmp_path / "artifacts-evil" / "f").write_text("outside")
    return Storage(tmp_path / "artifacts")


@pytest.mark.parametrize(
    "relative",
    ["..", "../secret", "a/../../secret", "files/x/../../../secret", "/etc/passwd", "../artifacts-evil/f",
     "secret\x00", "files/\x00/../x", "./../secret", "files/" + "../" * 20 + "etc/passwd"],
)  # fmt: skip
def test_storage_refuses_paths_outside_its_root(storage: Storage, relative: str) -> None:
    with pytest.raises(StorageError):
        storage.path(relative)
    with pytest.raises(StorageError):
        storage.delete(relative)
    temp = storage.temp_path()
    temp.write_text("new")
    with pytest.raises(StorageError):
        storage.commit(temp, relative)
    assert (storage.root.parent / "secret").read_text() == "outside"
    assert (storage.root.parent / "artifacts-evil" / "f").read_text() == "outside"


def test_storage_follows_no_symlink_out_and_never_deletes_its_root(storage: Storage, tmp_path: Path) -> None:
    (storage.root / "files").mkdir()
    os.symlink(tmp_path, storage.root / "files" / "link")  # planted inside, pointing outside
    for relative in ("files/link", "files/link/secret"):
        with pytest.raises(StorageError):
            storage.path(relative)
        with pytest.raises(StorageError):
            storage.delete(relative)
    assert (tmp_path / "secret").read_text() == "outside"
    for relative in ("", ".", "files/.."):  # the root itself: path() may name it, nothing deletes it
        assert storage.path(relative) == storage.root
        with pytest.raises(StorageError):
            storage.delete(relative)
        with pytest.raises(StorageError):
            storage.commit(storage.temp_path(), relative)
    assert storage.root.is_dir() and (storage.root / "tmp").is_dir()
    # %-encoding is not decoded: such a name is an ordinary file inside the root.
    assert storage.path("files/%2e%2e%2fsecret") == storage.root / "files" / "%2e%2e%2fsecret"
    assert storage.path("files/../jobs/x") == storage.root / "jobs" / "x"  # inside after resolving: fine
    temp = storage.temp_path()
    temp.write_text("data")
    assert storage.commit(temp, "files/t/f.jsonl").read_text() == "data"
    storage.delete("files/t/f.jsonl")
    assert not (storage.root / "files" / "t" / "f.jsonl").exists()
