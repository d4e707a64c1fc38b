"""/v1/fine_tuning/jobs/{id}/checkpoints: list a job's checkpoints, and download one as a tar stream
(Range: bytes=N- resumes an interrupted download: 206, or 416 past the end)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import Response, StreamingResponse
from sqlalchemy import Row, select

from service import team_limits
from service.api.deps import CurrentTeam, DatabaseDep, SessionDep, StorageDep
from service.api.jobs import Limit, cursor_pk, json_response, own_job, own_job_id
from service.archive import DirectoryArchive
from service.errors import AUTH_ERRORS, APIError, error_responses, not_found
from service.models import Checkpoint
from service.schemas import CheckpointList, CheckpointObject

router = APIRouter(
    prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], responses=error_responses(*AUTH_ERRORS)
)
# Files of a checkpoint directory that only the trainer's resume reads (worker/training/checkpoint.py).
RESUME_ONLY_FILES = frozenset({"trainer_state.pt"})


def _checkpoint_schema(c: Checkpoint | Row[Any]) -> CheckpointObject:
    return CheckpointObject(
        id=c.id,
        created_at=c.created_at,
        fine_tuned_model_checkpoint=c.fine_tuned_model_checkpoint,
        fine_tuning_job_id=c.job_id,
        metrics=c.metrics,
        step_number=c.step,
    )


@router.get(
    "/{fine_tuning_job_id}/checkpoints",
    response_model=CheckpointList,
    summary="List checkpoints",
    responses=error_responses(404),
)
async def list_checkpoints(
    fine_tuning_job_id: str,
    db: DatabaseDep,
    team: CurrentTeam,
    after: str | None = None,
    limit: Limit = 10,
) -> Response:
    async with db.read() as conn:
        job_id = await own_job_id(conn, team, fine_tuning_job_id)
        query = select(Checkpoint).where(Checkpoint.job_id == job_id)
        start = await cursor_pk(conn, Checkpoint, after, "after", job_id=job_id)
        if start is not None:
            query = query.where(Checkpoint.pk < start)
        found = list(await conn.execute(query.order_by(Checkpoint.pk.desc()).limit(limit + 1)))
    data = [_checkpoint_schema(c) for c in found[:limit]]
    return json_response(
        CheckpointList(
            data=data,
            has_more=len(found) > limit,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
        )
    )


@router.get(
    "/{fine_tuning_job_id}/checkpoints/{checkpoint_id}/content",
    summary="Download a checkpoint: its Hugging Face directory as a tar stream (Range: bytes=N- resumes)",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/x-tar": {}}},
        206: {
            "description": "the bytes a `Range: bytes=N-` header asked for (resuming a download)",
            "content": {"application/x-tar": {}},
        },
        **error_responses(404, 410, 416),
    },
)
def checkpoint_content(
    request: Request,
    fine_tuning_job_id: str,
    checkpoint_id: str,
    session: SessionDep,
    team: CurrentTeam,
    storage: StorageDep,
    range_header: Annotated[str | None, Header(alias="Range")] = None,
) -> StreamingResponse:
    # One of the team's download slots from here until the last byte is sent (429 past the cap);
    # the session's slot goes back before the first byte (SessionDep is function-scoped).
    with team_limits.acquire(request, "downloads", team.id) as lease:
        job = own_job(session, team, fine_tuning_job_id)
        checkpoint = session.scalar(
            select(Checkpoint).where(Checkpoint.id == checkpoint_id, Checkpoint.job_id == job.id)
        )
        if checkpoint is None:
            raise not_found("checkpoint", checkpoint_id, "checkpoint_id")
        directory = storage.path(checkpoint.storage_path)
        if not directory.is_dir():
            raise APIError(410, f"Checkpoint {checkpoint_id} is no longer stored", code="checkpoint_gone")
        # The model, without the optimizer state kept for resuming (twice the model's size).
        archive = DirectoryArchive(directory, f"{job.id}-step-{checkpoint.step}", RESUME_ONLY_FILES)
        name = f"{job.id}-step-{checkpoint.step}.tar"
        headers = {"Accept-Ranges": "bytes", "Content-Disposition": f'attachment; filename="{name}"'}
        span = byte_range(range_header, archive.length)
        if span is None:
            headers["Content-Length"] = str(archive.length)
            return lease.stream(archive.stream(), media_type="application/x-tar", headers=headers)
        start, end = span
        headers["Content-Length"] = str(end - start + 1)
        headers["Content-Range"] = f"bytes {start}-{end}/{archive.length}"
        return lease.stream(
            _limited(archive.stream(start), end - start + 1),
            status_code=206,
            media_type="application/x-tar",
            headers=headers,
        )


_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def byte_range(header: str | None, length: int) -> tuple[int, int] | None:
    """The first and last byte (inclusive) a `Range: bytes=N-`, `bytes=N-M` or `bytes=-K` header asks
    for; None for no header or one this does not parse (served whole, as RFC 9110 allows); a 416 when
    the range starts at or past the end."""
    match = _RANGE.fullmatch(header.strip()) if header else None
    if match is None or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first:
        start, end = int(first), min(int(last), length - 1) if last else length - 1
        if last and int(last) < start:
            return None  # syntactically invalid: ignored
    else:  # the last K bytes
        start, end = max(length - int(last), 0), length - 1
        if int(last) == 0:
            start = length
    if start >= length:
        raise APIError(
            416,
            f"Range {header!r} starts at or past the end of the {length}-byte archive",
            param="Range",
            code="range_not_satisfiable",
            headers={"Content-Range": f"bytes */{length}"},
        )
    return start, end


def _limited(chunks: Iterator[bytes], n: int) -> Iterator[bytes]:
    """The first `n` bytes of `chunks`."""
    for chunk in chunks:
        if n <= 0:
            return
        yield chunk[:n]
        n -= len(chunk)
