"""Following a JSON-lines file another process appends to (the trainer's metrics and events)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class JsonlTail:
    """New complete lines since the last read. A file replaced or cut shorter (the trainer rewrites
    metrics.jsonl when it resumes) is read again from its start."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.inode: int | None = None

    def skip_existing(self) -> None:
        """Start after the complete lines the file holds now (a last line cut short by a kill or a
        full disk is dropped by the trainer when it opens the file again: not counted here)."""
        try:
            with self.path.open("rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            return
        self.inode, self.offset = st.st_ino, data.rfind(b"\n") + 1

    def read_new(self) -> list[dict[str, Any]]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return []
        if st.st_ino != self.inode or st.st_size < self.offset:
            self.inode, self.offset = st.st_ino, 0
        if st.st_size == self.offset:
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next read
        self.offset += end
        rows = []
        for line in data[:end].splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
        return rows
