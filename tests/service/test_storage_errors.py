"""Uploads to a full or read-only artifact storage: 507 storage_full, 503 storage_unavailable with
Retry-After, on the same connection, and nothing half-stored (no row, no bytes). The storage directory
is a tiny tmpfs of the test's own (service/outages.py maps the OSError, whichever endpoint raised it)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import func, select

from service.models import File
from tests.service.conftest import Stack, running_stack
from tests.service.keepalive import KeepAlive
from tests.service.multipart import BOUNDARY, form, part


@contextmanager
def tiny_tmpfs(size: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    mount_point = Path(tempfile.mkdtemp(prefix="tunepool-disk-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
        mount_point.rmdir()


def remount(mount_point: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mount_point)], check=True)


def upload_body(n_rows: int) -> bytes:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"question {i} " + "x" * 200},
                {"role": "assistant", "content": "a"},
            ]
        }
        for i in range(n_rows)
    ]
    content = "".join(json.dumps(r) + "\n" for r in rows).encode()
    return form(part("purpose", b"fine-tune"), part("file", content, "train.jsonl"))


def stored(stack: Stack, mount_point: Path) -> tuple[int, list[Path]]:
    """(file rows, files on the storage disk)."""
    with stack.db.session() as session:
        rows = int(session.scalar(select(func.count()).select_from(File)) or 0)
    return rows, sorted(p for p in mount_point.rglob("*") if p.is_file())


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_full_and_read_only_storage(tmp_path: Path, backend: str) -> None:
    with (
        tiny_tmpfs("1m") as disk,
        running_stack(backend, tmp_path, {"TUNEPOOL_STORAGE_DIR": str(disk)}) as stack,
    ):
        team = stack.team()
        conn = KeepAlive(stack.url, team.key)
        headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
        small, big = upload_body(3), upload_body(8000)  # ~2 KB fits the 1 MiB disk, ~2 MB does not
        assert len(big) > 2 * 1024 * 1024

        assert conn.request("POST", "/v1/files", small, headers).status == 200
        before = stored(stack, disk)
        assert before[0] == 1 and len(before[1]) == 1

        full = conn.request("POST", "/v1/files", big, headers)
        assert full.status == 507, full.body
        assert full.code == "storage_full"
        message = full.json()["error"]["message"]
        assert "ENOSPC" in message and str(disk) not in message and "/" not in message
        assert stored(stack, disk) == before  # no row, no bytes (the temporary file is gone too)

        remount(disk, "ro")
        try:
            read_only = conn.request("POST", "/v1/files", small, headers)
            assert read_only.status == 503, read_only.body
            assert read_only.code == "storage_unavailable"
            assert int(read_only.headers["retry-after"]) > 0
            assert "EROFS" in read_only.json()["error"]["message"]
            assert stored(stack, disk) == before
            # Reading what was stored still works on a read-only disk.
            file_id = conn.request("GET", "/v1/files").json()["data"][0]["id"]
            assert conn.request("GET", f"/v1/files/{file_id}/content").status == 200
        finally:
            remount(disk, "rw")

        # Space and writes are back: the next upload is stored, on the same connection.
        assert conn.request("POST", "/v1/files", small, headers).status == 200
        assert stored(stack, disk)[0] == 2
        log = (tmp_path / "api.log").read_text()
        assert "Exception in ASGI application" not in log and "unhandled error" not in log
