"""Artifact storage: one directory shared by the API and the workers.

Every path handed out is built here from ids the service generated, never from user input, and
checked to stay inside the artifact directory. Files are written to a temporary name and
renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


class StorageError(ValueError):
    """A path that would leave the artifact directory."""


class Storage:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(exist_ok=True)

    def path(self, relative: str) -> Path:
        """The absolute path of a stored artifact; refuses anything outside the root.

        Checked after resolving: `..`, an absolute path and a symlink that leads out are all refused."""
        if "\x00" in relative:
            raise StorageError("NUL in path")
        full = (self.root / relative).resolve()
        if full != self.root and self.root not in full.parents:
            raise StorageError(f"{relative!r} is outside the artifact directory")
        return full

    def _artifact_path(self, relative: str) -> Path:
        """`path`, refusing the root itself too: nothing writes over or deletes the whole directory
        (an empty or `.`-only storage path would otherwise mean exactly that)."""
        full = self.path(relative)
        if full == self.root:
            raise StorageError(f"{relative!r} names the artifact directory itself")
        return full

    def temp_path(self) -> Path:
        """A fresh file name in storage's tmp/ (same filesystem, so the final rename is atomic)."""
        return self.root / "tmp" / uuid.uuid4().hex

    def commit(self, temp: Path, relative: str) -> Path:
        """Move a finished temporary file to its final place, atomically."""
        final = self._artifact_path(relative)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, final)
        return final

    def delete(self, relative: str) -> None:
        target = self._artifact_path(relative)
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)

    def file_relpath(self, team_id: str, file_id: str) -> str:
        return f"files/{team_id}/{file_id}.jsonl"

    def job_relpath(self, job_id: str) -> str:
        return f"jobs/{job_id}"
