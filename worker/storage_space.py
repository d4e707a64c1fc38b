"""Telling a full, read-only or failing artifact disk from any other failure, and saying which one.

A training run writes checkpoints, metrics, events and its log to the artifact storage; when that
filesystem fills up the log itself may stay empty, so the error the job shows is built here from
what can still be read: the errno of the failed write (or its text, for libraries that wrap it),
and the filesystem of the path (mount point from /proc/mounts, free bytes from statvfs).

Stdlib only: the training child (worker/child.py) imports it too.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# errno -> the job error code it ends in (after max_attempts; before that the job is re-queued).
STORAGE_ERRNOS = {
    errno.ENOSPC: "storage_full",
    errno.EDQUOT: "storage_full",
    errno.EROFS: "storage_read_only",
    errno.EIO: "storage_io_error",
}
# Libraries that wrap the OSError in their own exception keep its text: safetensors says "No space
# left on device (os error 28)". (torch.save says only "unexpected pos ...": the runner then looks
# at the filesystem itself, see JobRun's outcome.)
_MESSAGES = (
    (re.compile(r"No space left on device|os error 28\b|StorageFull"), errno.ENOSPC),
    (re.compile(r"Disk quota exceeded|os error 122\b"), errno.EDQUOT),
    (re.compile(r"Read-only file system|os error 30\b"), errno.EROFS),
)


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Filesystem:
    """The filesystem a path lives on, as statvfs and /proc/mounts see it now."""

    mount_point: str
    fs_type: str
    free_bytes: int  # available to unprivileged writers (f_bavail)
    total_bytes: int
    read_only: bool

    def __str__(self) -> str:
        ro = ", read-only" if self.read_only else ""
        return (
            f"{self.mount_point} ({self.fs_type}, {human_bytes(self.free_bytes)} free of "
            f"{human_bytes(self.total_bytes)}{ro})"
        )


def _existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _mount_of(path: str) -> tuple[str, str]:
    """(mount point, filesystem type) of a resolved path: the longest /proc/mounts entry above it
    (the last one listed, when several are mounted on the same point)."""
    best, fs_type = "", "unknown"
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])  # \040 is a space
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fs_type = point, fields[2]
    if best:
        return best, fs_type
    mount = Path(path)  # no /proc (not Linux): walk up to the device boundary
    while not os.path.ismount(mount):
        mount = mount.parent
    return str(mount), "unknown"


def filesystem(path: Path) -> Filesystem:
    """The filesystem of `path` (or of its nearest existing parent)."""
    real = os.path.realpath(_existing(path))
    st = os.statvfs(real)
    mount, fs_type = _mount_of(real)
    return Filesystem(
        mount_point=mount,
        fs_type=fs_type,
        free_bytes=st.f_bavail * st.f_frsize,
        total_bytes=st.f_blocks * st.f_frsize,
        read_only=bool(st.f_flag & os.ST_RDONLY),
    )


def low_space(paths: list[Path], min_free_bytes: int) -> Filesystem | None:
    """The first of `paths`' filesystems that is read-only or has under `min_free_bytes` free."""
    for path in paths:
        try:
            fs = filesystem(path)
        except OSError:
            continue
        if fs.read_only or fs.free_bytes < min_free_bytes:
            return fs
    return None


def storage_errno(err: BaseException) -> tuple[int, str | None] | None:
    """(errno, path) of the storage failure in `err` or in what caused it; None for anything else."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in STORAGE_ERRNOS:
            return current.errno, current.filename and str(current.filename)
        for pattern, number in _MESSAGES:
            if pattern.search(str(current)):
                return number, None
        current = current.__cause__ or current.__context__
    return None


@dataclass(frozen=True)
class StorageProblem:
    """A write that failed because of the disk: what failed, where, and how that disk looks now."""

    errno: int
    path: str | None  # the file being written, when known
    fs: Filesystem
    nearly_full: bool = False  # no errno seen: the disk was found under the free-space minimum

    @property
    def code(self) -> str:
        return STORAGE_ERRNOS[self.errno]

    def summary(self) -> str:
        """'Storage full (ENOSPC: No space left on device) on /mnt (tmpfs, 0 B free of 1.0 MiB)...'"""
        what = {"storage_full": "Storage full", "storage_read_only": "Storage read-only"}.get(
            self.code, "Storage I/O error"
        )
        cause = f"{what} ({errno.errorcode[self.errno]}: {os.strerror(self.errno)}"
        # No errno reached us (the writer wrapped it): the disk, looked at after the failure, says it.
        cause += ", found on the disk after the training process failed)" if self.nearly_full else ")"
        writing = f" while writing {self.path}" if self.path else ""
        return f"{cause} on {self.fs}{writing}"

    def to_json(self) -> dict[str, Any]:
        return {"errno": errno.errorcode[self.errno], "path": self.path}

    @classmethod
    def from_json(cls, data: dict[str, Any], fallback_path: Path) -> StorageProblem:
        number = getattr(errno, str(data.get("errno")), errno.EIO)
        path = data.get("path") or None
        return cls(number, path, filesystem(Path(path) if path else fallback_path))


def problem_of(err: BaseException, where: Path) -> StorageProblem | None:
    """The StorageProblem of `err` (a failed write under `where`), or None if the disk is not why."""
    found = storage_errno(err)
    if found is None:
        return None
    number, path = found
    try:
        fs = filesystem(Path(path) if path else where)
    except OSError:
        fs = Filesystem(str(where), "unknown", 0, 0, False)
    return StorageProblem(number, path, fs)
