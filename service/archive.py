"""A directory as a tar stream: built on the fly, never held in memory, with a known length.

Headers come from `tarfile` (PAX format, so long names work); contents are streamed in 1 MiB
chunks. Member order and metadata are fixed, so the same directory gives the same bytes: the
length is known before the first byte (Content-Length) and a byte range can be served.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240: the archive ends on a record boundary, like GNU tar
CHUNK = 1 << 20


@dataclass(frozen=True)
class Member:
    path: Path
    header: bytes
    size: int

    @property
    def length(self) -> int:
        return len(self.header) + -(-self.size // BLOCK) * BLOCK


def _members(root: Path, prefix: str, exclude: frozenset[str]) -> list[Member]:
    members = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        if path.relative_to(root).as_posix() in exclude:
            continue
        info = tarfile.TarInfo(f"{prefix}/{path.relative_to(root).as_posix()}")
        stat = path.stat()
        info.size, info.mtime, info.mode = stat.st_size, int(stat.st_mtime), 0o644
        members.append(Member(path, info.tobuf(format=tarfile.PAX_FORMAT), stat.st_size))
    return members


class DirectoryArchive:
    def __init__(self, root: Path, prefix: str, exclude: frozenset[str] = frozenset()) -> None:
        """`root`'s files (but the relative paths in `exclude`) under the directory `prefix`."""
        self.members = _members(root, prefix, exclude)
        body = sum(m.length for m in self.members) + 2 * BLOCK
        self.length = -(-body // RECORD) * RECORD

    def stream(self, start: int = 0) -> Iterator[bytes]:
        """The archive's bytes from offset `start` on, in chunks of at most 1 MiB."""
        offset = 0
        for member in self.members:
            if offset + member.length <= start:
                offset += member.length
                continue
            yield from _skip(member.header, start - offset)
            offset += len(member.header)
            with member.path.open("rb") as f:
                if start > offset:
                    f.seek(min(start - offset, member.size))
                position = f.tell()
                while chunk := f.read(CHUNK):
                    yield chunk
                    position += len(chunk)
                pad = -(-member.size // BLOCK) * BLOCK - member.size
                yield from _skip(b"\0" * pad, max(0, start - offset - member.size))
            offset += member.length - len(member.header)
        yield from _skip(b"\0" * (self.length - offset), start - offset)


def _skip(data: bytes, n: int) -> Iterator[bytes]:
    if n < len(data):
        yield data[max(n, 0) :]
