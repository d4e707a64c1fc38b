"""Files: upload (streamed and validated), list, retrieve, content, delete.

Upload parsing, validation and the quota live in service/uploads.py; this router is the HTTP surface.
A file belongs to one team: another team's file id answers the same 404 as an id that never existed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from service import team_limits
from service.api.deps import CurrentTeam, DatabaseDep, SessionDep, SettingsDep, StorageDep, sync_session
from service.errors import AUTH_ERRORS, APIError, error_responses, not_found
from service.models import File, Job, JobStatus, Team
from service.schemas import FileDeleted, FileList, FileObject
from service.uploads import receive_and_store

log = logging.getLogger("tunepool.api")
router = APIRouter(prefix="/v1/files", tags=["files"], responses=error_responses(*AUTH_ERRORS))

# Jobs that will still read their files: deleting one of those files is refused.
ACTIVE_STATUSES = (JobStatus.VALIDATING_FILES.value, JobStatus.QUEUED.value, JobStatus.RUNNING.value)
READ_CHUNK = 1024 * 1024
# The body is parsed by hand (see service/uploads.py), so its schema is declared for the docs here.
_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "JSONL training data"},
                        "purpose": {"type": "string", "enum": ["fine-tune"]},
                    },
                }
            }
        },
    }
}


def to_schema(file: File) -> FileObject:
    return FileObject(
        id=file.id,
        bytes=file.bytes,
        created_at=file.created_at,
        filename=file.filename,
        purpose=file.purpose,
        format=file.format,
        n_examples=file.n_examples,
    )


def own_file(session: Session, team: Team, file_id: str) -> File:
    """The team's file, or the same 404 as an id that does not exist."""
    file = session.scalar(select(File).where(File.id == file_id, File.team_id == team.id))
    if file is None:
        raise not_found("file", file_id, "file_id")
    return file


@router.post(
    "",
    response_model=FileObject,
    summary="Upload a JSONL training file (multipart: file, purpose=fine-tune); validated as it streams in",
    openapi_extra=_UPLOAD_BODY,
    responses=error_responses(400, 413, 415),  # a bad file or form; over the size or storage quota
)
async def upload_file(
    request: Request, db: DatabaseDep, team: CurrentTeam, settings: SettingsDep, storage: StorageDep
) -> FileObject:
    # One of the team's upload slots while the body streams in (429 past the cap); a database slot
    # only for the quota read and the final commit, never while waiting on the client.
    with team_limits.acquire(request, "uploads", team.id):
        return to_schema(await receive_and_store(request, partial(sync_session, db), team, settings, storage))


@router.get("", response_model=FileList, summary="List the team's files, newest first (order=asc: oldest)")
def list_files(
    session: SessionDep,
    team: CurrentTeam,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000, description="page size, 1-10000")] = 10_000,
    order: Literal["asc", "desc"] = "desc",
    purpose: str | None = None,
) -> FileList:
    query = select(File).where(File.team_id == team.id)
    if after is not None:
        start = session.scalar(select(File.pk).where(File.id == after, File.team_id == team.id))
        if start is None:
            raise APIError(400, f"after: unknown cursor {after!r}", param="after", code="invalid_cursor")
        query = query.where(File.pk > start if order == "asc" else File.pk < start)
    if purpose is not None:
        query = query.where(File.purpose == purpose)
    query = query.order_by(File.pk.asc() if order == "asc" else File.pk.desc()).limit(limit + 1)
    found = list(session.scalars(query))
    data = [to_schema(f) for f in found[:limit]]
    return FileList(
        data=data,
        has_more=len(found) > limit,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


@router.get(
    "/{file_id}",
    response_model=FileObject,
    summary="Retrieve a file's metadata",
    responses=error_responses(404),
)
def retrieve_file(file_id: str, session: SessionDep, team: CurrentTeam) -> FileObject:
    return to_schema(own_file(session, team, file_id))


def _disposition(filename: str) -> str:
    # An ASCII fallback for old clients, then the exact name (RFC 6266); the name is already sanitised.
    fallback = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def _read_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(READ_CHUNK):
            yield chunk


@router.get(
    "/{file_id}/content",
    summary="Download a file's bytes, streamed",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/jsonl": {}, "application/octet-stream": {}}},
        **error_responses(404, 410),
    },
)
def file_content(
    request: Request, file_id: str, session: SessionDep, team: CurrentTeam, storage: StorageDep
) -> StreamingResponse:
    # One of the team's download slots until the last byte is sent (429 past the cap); the session's
    # slot goes back before the first byte (SessionDep is function-scoped).
    with team_limits.acquire(request, "downloads", team.id) as lease:
        file = own_file(session, team, file_id)
        path = storage.path(file.storage_path)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise APIError(
                410, f"File {file_id} is no longer stored", param="file_id", code="file_gone"
            ) from None
        jsonl = file.storage_path.endswith(".jsonl")
        media_type = "application/jsonl" if jsonl else "application/octet-stream"
        return lease.stream(
            _read_chunks(path),
            media_type=media_type,
            headers={"Content-Length": str(size), "Content-Disposition": _disposition(file.filename)},
        )


@router.delete(
    "/{file_id}", response_model=FileDeleted, summary="Delete a file", responses=error_responses(404, 409)
)
def delete_file(file_id: str, session: SessionDep, team: CurrentTeam, storage: StorageDep) -> FileDeleted:
    file = own_file(session, team, file_id)
    # Delete the row first, then look for jobs using the file: the DELETE holds the row lock
    # (PostgreSQL) or the write lock (SQLite) while the check runs; rolled back if the file is in use.
    session.delete(file)
    session.flush()
    user = session.scalar(
        select(Job)
        .where(
            Job.team_id == team.id,
            Job.status.in_(ACTIVE_STATUSES),
            or_(Job.training_file == file.id, Job.validation_file == file.id),
        )
        .limit(1)
    )
    if user is not None:
        job_id, status = user.id, user.status
        session.rollback()
        raise APIError(
            409,
            f"File {file_id} is used by job {job_id} ({status}); cancel the job or wait for it to end first",
            param="file_id",
            code="file_in_use",
        )
    session.commit()
    try:
        storage.delete(file.storage_path)
    except OSError:  # the row is gone and the quota freed; stray bytes are only disk
        log.exception("could not delete the bytes of file %s at %s", file.id, file.storage_path)
    return FileDeleted(id=file.id)
