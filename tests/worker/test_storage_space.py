"""Telling a full or read-only disk from other failures, on real filesystems (a tmpfs mounted here
as root): the errno (also inside a library's own exception), the mount point and its free bytes."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path

import pytest

from service.storage import Storage
from tests.e2e.disks import fill, tmpfs
from worker.artifacts import remove_stale_temp_files
from worker.storage_space import StorageProblem, filesystem, low_space, problem_of, storage_errno
from worker.tail import JsonlTail
from worker.training.outputs import JsonlLog


def test_a_write_to_a_full_tmpfs_is_named_with_its_errno_mount_and_free_space(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    with tmpfs(disk, "64k"):
        fill(disk)
        with pytest.raises(OSError) as caught:
            (disk / "more").write_bytes(b"x" * 8192)
        problem = problem_of(caught.value, disk)
        assert problem is not None and problem.code == "storage_full"
        assert problem.fs.mount_point == str(disk) and problem.fs.fs_type == "tmpfs"
        assert problem.fs.free_bytes == 0 and problem.fs.total_bytes == 64 * 1024
        text = problem.summary()
        assert text.startswith("Storage full (ENOSPC: No space left on device) on ") and str(disk) in text
        assert "0 B free of 64.0 KiB" in text, text
        assert low_space([disk / "not" / "there" / "yet"], 1) == problem.fs  # the nearest existing parent
        assert low_space([tmp_path], 1) is None  # the disk beside it has room


def test_a_read_only_mount_is_storage_read_only(tmp_path: Path) -> None:
    disk = tmp_path / "ro"
    with tmpfs(disk, "64k"):
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        assert filesystem(disk).read_only and low_space([disk], 0) is not None
        with pytest.raises(OSError) as caught:
            (disk / "x").write_text("x")
        problem = problem_of(caught.value, disk)
        assert problem is not None and problem.code == "storage_read_only"
        assert "EROFS" in problem.summary() and "read-only)" in problem.summary()


def test_storage_errors_are_found_inside_wrapping_exceptions() -> None:
    # What safetensors raises (a SafetensorError) on a full disk:
    wrapped = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert storage_errno(wrapped) == (errno.ENOSPC, None)
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded", "/data/x")
        except OSError as err:
            raise ValueError("saving failed") from err
    except ValueError as outer:
        assert storage_errno(outer) == (errno.EDQUOT, "/data/x")
    assert storage_errno(OSError(errno.ENOENT, "No such file")) is None
    assert storage_errno(RuntimeError("unexpected pos 576 vs 534")) is None  # torch.save: the disk must tell
    problem = StorageProblem.from_json({"errno": "ENOSPC", "path": "/nowhere/at/all"}, Path("/"))
    assert problem.code == "storage_full" and problem.fs.mount_point == "/"


def test_a_row_cut_short_is_dropped_when_the_log_is_opened_again(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    tail = JsonlTail(path)
    assert [r["step"] for r in tail.read_new()] == [1, 2]  # the runner waits for the rest of the line
    log = JsonlLog(path)  # what the trainer does when it starts again
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    log.append({"step": 3})
    assert [r["step"] for r in log.read()] == [1, 2, 3]  # not glued to the cut row, nothing lost
    assert [r["step"] for r in tail.read_new()] == [3]
    # A runner starting after the cut skips only the complete lines: it reads the next row whole.
    path.write_text('{"step": 1}\n{"step": 2, "lo')
    late = JsonlTail(path)
    late.skip_existing()
    JsonlLog(path).append({"step": 2})
    assert late.read_new() == [{"step": 2}]
    # A garbled line in the middle costs that line only.
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    assert [r["step"] for r in JsonlLog(path).read()] == [1, 3]


def test_stale_temporary_files_are_removed_by_age(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "artifacts")
    old, fresh = storage.temp_path(), storage.temp_path()
    old.write_bytes(b"left by a killed upload")
    fresh.write_bytes(b"being written")
    day_ago = time.time() - 86400 - 10
    os.utime(old, (day_ago, day_ago))
    assert remove_stale_temp_files(storage, 86400) == 1
    assert not old.exists() and fresh.exists()
