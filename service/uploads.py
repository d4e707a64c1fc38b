"""Receiving an upload: multipart parsed straight from the request stream, written, hashed and validated
in one pass, then stored under the team's storage quota.

Why not FastAPI's `UploadFile`: Starlette would parse and spool the whole body before the handler runs,
so a bad or oversized file would be read to the end (and to disk) before anyone looked at it. Here the
body is fed to python_multipart's streaming parser in ~1 MiB batches; the file part goes to a
temporary file in storage and, in the same pass, to the training-data validator of
worker/training/formats.py (the code that later reads the file for training) and to SHA-256. Memory
stays near one batch plus one JSONL line whatever the file's size. The blocking part (parsing,
validating, writing) runs in the threadpool so the event loop keeps serving other requests.

Whatever goes wrong (a 4xx, a dropped connection, a crash) the temporary file is deleted: a rejected
upload leaves no row and no bytes behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from python_multipart.exceptions import FormParserError, MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.requests import ClientDisconnect

from service.db import lock_team
from service.errors import APIError
from service.models import File, Team, new_id
from service.settings import Settings
from service.storage import Storage
from worker.training.formats import StreamingValidator, ValidationReport

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

UPLOAD_PURPOSE = "fine-tune"
BATCH_BYTES = 1024 * 1024  # body bytes handed to the parser per threadpool call
FRAMING_SLACK = 64 * 1024  # multipart boundaries, part headers and the purpose field, on top of the file
MAX_FIELD_BYTES = 1024  # a form field (purpose) is a word; more than this is not one
DEFAULT_FILENAME = "upload.jsonl"


def bad_request(param: str, code: str, message: str) -> APIError:
    return APIError(400, message, param=param, code=code)


def bad_multipart(reason: str) -> APIError:
    return bad_request(
        "file", "invalid_multipart", f"The request body is not valid multipart/form-data: {reason}"
    )


def file_too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"The file is larger than this server's upload limit of {limit:,} bytes (TUNEPOOL_MAX_UPLOAD_BYTES)",
        param="file",
        code="file_too_large",
    )


def quota_exceeded(left: int, quota: int, size: int | None = None) -> APIError:
    what = f"This {size:,}-byte file" if size is not None else "The file"
    return APIError(
        413,
        f"{what} exceeds the team's storage quota: {max(left, 0):,} of {quota:,} bytes are left. "
        "Delete files (DELETE /v1/files/{file_id}) or ask an admin to raise the quota",
        param="file",
        code="storage_quota_exceeded",
    )


def multipart_boundary(content_type: str | None) -> bytes:
    """The boundary of a multipart/form-data body; 415 for another content type, 400 without one."""
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        shown = kind.decode("latin-1") or "none"
        raise APIError(
            415,
            f"Send the file as multipart/form-data with fields 'file' and 'purpose' (got {shown})",
            param="file",
            code="unsupported_media_type",
        )
    boundary = options.get(b"boundary", b"")
    if not boundary or len(boundary) > 200 or b"\r" in boundary or b"\n" in boundary:
        raise bad_multipart("the Content-Type header has no valid boundary")
    return boundary


def display_filename(raw: bytes | None) -> str:
    """The client's file name, for display only (never a path): basename, no control characters, <= 255."""
    name = (raw or b"").decode("utf-8", "replace")
    name = re.split(r"[/\\]", name)[-1]
    name = "".join(ch for ch in name if not unicodedata.category(ch).startswith("C")).strip()[:255]
    return name if name.strip(".") else DEFAULT_FILENAME


@dataclass
class ReceivedUpload:
    """A fully received, valid file waiting in storage's tmp/ to be committed."""

    temp: Path
    filename: str
    bytes: int
    sha256: str
    report: ValidationReport


class MultipartUpload:
    """python_multipart callbacks for one request body: the `purpose` field and exactly one `file` part.

    `write` and `finish` block (disk, validation); call them from a worker thread. Rejections are
    raised from inside the callbacks as APIError, which stops the parse at once.
    """

    def __init__(self, boundary: bytes, temp: Path, settings: Settings, quota_left: int, quota: int) -> None:
        self.temp = temp
        self._settings = settings
        self._quota_left, self._quota = quota_left, quota
        self._limit = min(settings.max_upload_bytes, quota_left)
        callbacks: MultipartCallbacks = {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }
        try:
            self._parser = MultipartParser(boundary, callbacks)
        except FormParserError as exc:
            raise bad_multipart(str(exc)) from None
        self._validator = StreamingValidator(
            max_line_bytes=settings.max_line_bytes, max_errors=settings.max_reported_errors
        )
        self._sha = hashlib.sha256()
        self._out: IO[bytes] | None = None
        self._n_bytes = 0
        self._filename: str | None = None  # set once the file part has begun
        self._purpose: bytearray | None = None
        self._part: str | None = None  # "file", "purpose", or None for a part that is skipped
        self._headers: dict[bytes, bytes] = {}
        self._field, self._value = bytearray(), bytearray()
        self._ended = False

    def write(self, data: bytes) -> None:
        try:
            self._parser.write(data)
        except MultipartParseError as exc:
            raise bad_multipart(str(exc)) from None

    def finish(self) -> ReceivedUpload:
        """Check what the body held and validate the file's end; the APIError says what is wrong."""
        if not self._ended:
            raise bad_multipart("the body ended before the closing boundary")
        if self._purpose is None:
            raise bad_request("purpose", "missing_parameter", "Missing the 'purpose' field ('fine-tune')")
        if self._filename is None or self._out is None:
            raise bad_request("file", "missing_parameter", "Missing the 'file' part: the JSONL to upload")
        self._out.flush()
        os.fsync(self._out.fileno())  # the bytes are on disk before the row that points at them
        self._out.close()
        report = self._validator.finish()
        if not report.ok:
            summary = report.summary(limit=self._settings.max_reported_errors)
            raise bad_request("file", "invalid_file", summary)
        return ReceivedUpload(self.temp, self._filename, self._n_bytes, self._sha.hexdigest(), report)

    def discard(self) -> None:
        """Close and delete the temporary file (a no-op once it has been committed)."""
        if self._out is not None:
            self._out.close()
        self.temp.unlink(missing_ok=True)

    # -- callbacks ---------------------------------------------------------------------------------

    def _part_begin(self) -> None:
        self._headers.clear()
        self._part = None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._field).strip().lower()] = bytes(self._value).strip()
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        kind, options = parse_options_header(self._headers.get(b"content-disposition"))
        name = options.get(b"name") if kind == b"form-data" else None
        if name == b"file":
            if self._filename is not None:
                raise bad_request(
                    "file", "invalid_value", "More than one 'file' part: upload one file per request"
                )
            self._filename = display_filename(options.get(b"filename"))
            self._out = open(self.temp, "wb")  # noqa: SIM115 -- closed by finish() or discard()
            self._part = "file"
        elif name == b"purpose":
            self._purpose = bytearray()
            self._part = "purpose"
        # Any other field (the openai SDK may add some) is read past and ignored.

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part == "file":
            assert self._out is not None
            chunk = data[start:end]
            self._n_bytes += len(chunk)
            if self._n_bytes > self._limit:
                if self._limit == self._settings.max_upload_bytes:
                    raise file_too_large(self._settings.max_upload_bytes)
                raise quota_exceeded(self._quota_left, self._quota)
            self._sha.update(chunk)
            self._validator.feed(chunk)
            self._out.write(chunk)
        elif self._part == "purpose":
            assert self._purpose is not None
            self._purpose += data[start:end]
            if len(self._purpose) > MAX_FIELD_BYTES:
                raise self._bad_purpose()

    def _part_end(self) -> None:
        # A wrong purpose before the file is refused before the file is read; after it, at the end.
        if self._part == "purpose" and bytes(self._purpose or b"").strip() != UPLOAD_PURPOSE.encode():
            raise self._bad_purpose()
        self._part = None

    def _end(self) -> None:
        self._ended = True

    def _bad_purpose(self) -> APIError:
        shown = bytes(self._purpose or b"")[:40].decode("utf-8", "replace")
        return bad_request(
            "purpose", "invalid_value", f"purpose: uploads take purpose 'fine-tune' (got {shown!r})"
        )


def storage_used(session: Session, team_id: str) -> int:
    """Bytes of every stored file of the team (uploads and results): what its quota is charged."""
    return int(
        session.scalar(select(func.coalesce(func.sum(File.bytes), 0)).where(File.team_id == team_id)) or 0
    )


def store_upload(session: Session, storage: Storage, team_id: str, upload: ReceivedUpload) -> File:
    """Move the file into place and insert its row, unless that would take the team past its quota.

    Concurrent uploads of one team are serialised on the team's row: the no-op UPDATE takes its row
    lock on PostgreSQL and the database's write lock on SQLite (where a SELECT would not start a
    transaction), so the quota is re-read and checked with no other upload of the team in between.
    """
    lock_team(session, team_id)
    quota = int(session.scalar(select(Team.max_storage_bytes).where(Team.id == team_id)) or 0)
    left = quota - storage_used(session, team_id)
    if upload.bytes > left:
        session.rollback()
        raise quota_exceeded(left, quota, upload.bytes)
    file = File(
        id=new_id("file-"),
        team_id=team_id,
        filename=upload.filename,
        purpose=UPLOAD_PURPOSE,
        bytes=upload.bytes,
        sha256=upload.sha256,
        format=upload.report.format,
        n_examples=upload.report.n_examples,
    )
    file.storage_path = storage.file_relpath(team_id, file.id)
    session.add(file)
    session.flush()  # a failing insert fails here, before any bytes move
    storage.commit(upload.temp, file.storage_path)
    try:
        session.commit()
    except BaseException:
        storage.delete(file.storage_path)
        raise
    return file


# A sync session with its database slot, for one block: `async with sessions() as session:`.
SessionScope = Callable[[], AbstractAsyncContextManager[Session]]


async def receive_and_store(
    request: Request, sessions: SessionScope, team: Team, settings: Settings, storage: Storage
) -> File:
    """The whole upload: refuse early what can be refused from the headers, stream, validate, store.

    A database slot (and connection) is held only for the quota read before the body and for the
    commit after it: while the body streams in, for as long as the client takes, it holds none."""
    boundary = multipart_boundary(request.headers.get("content-type"))
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > settings.max_upload_bytes + FRAMING_SLACK:
        raise file_too_large(settings.max_upload_bytes)
    async with sessions() as session:
        quota_left = team.max_storage_bytes - await run_in_threadpool(storage_used, session, team.id)
    if declared.isdigit() and int(declared) > quota_left + FRAMING_SLACK:
        raise quota_exceeded(quota_left, team.max_storage_bytes)
    receiver = MultipartUpload(boundary, storage.temp_path(), settings, quota_left, team.max_storage_bytes)
    try:
        batch: list[bytes] = []
        batched = total = 0
        async for chunk in request.stream():
            batch.append(chunk)
            batched += len(chunk)
            total += len(chunk)
            if total > settings.max_upload_bytes + FRAMING_SLACK:  # however the bytes are framed
                raise file_too_large(settings.max_upload_bytes)
            if batched >= BATCH_BYTES:
                await run_in_threadpool(receiver.write, b"".join(batch))
                batch, batched = [], 0
        if batch:
            await run_in_threadpool(receiver.write, b"".join(batch))
        upload = await run_in_threadpool(receiver.finish)
        async with sessions() as session:
            return await run_in_threadpool(store_upload, session, storage, team.id, upload)
    except ClientDisconnect:
        raise APIError(400, "The client disconnected during the upload", code="upload_incomplete") from None
    finally:
        await run_in_threadpool(receiver.discard)
