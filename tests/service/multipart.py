"""Multipart bodies and checks shared by the Files API tests (test_files.py, test_upload_limits.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import httpx
from sqlalchemy import select

from service.models import File, Team
from tests.service.conftest import Stack, TeamClient

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
