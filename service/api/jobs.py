"""/v1/fine_tuning/jobs: create, list, retrieve, cancel, events (and their live stream),
checkpoints (and their content as a tar stream), metrics."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.api.deps import CurrentTeam, SessionDep, SettingsDep, StorageDep, get_database
from service.archive import DirectoryArchive
from service.errors import APIError, not_found
from service.job_create import create_job
from service.jobs import IllegalTransition, queue_position, request_cancel, to_schema
from service.models import Checkpoint, Job, JobEvent, JobMetric, JobStatus, Team
from service.schemas import (
    CheckpointList,
    CheckpointObject,
    JobCreate,
    JobEventList,
    JobList,
    MetricRow,
    MetricsList,
)
from service.schemas import Job as JobSchema
from service.schemas import JobEvent as JobEventSchema

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])
Limit = Annotated[int, Query(ge=1, le=100, description="page size, 1-100")]


def own_job(session: Session, team: Team, job_id: str) -> Job:
    """The team's job, or the same 404 as an id that does not exist."""
    job = session.scalar(select(Job).where(Job.id == job_id, Job.team_id == team.id))
    if job is None:
        raise not_found("fine-tuning job", job_id, "fine_tuning_job_id")
    return job


def _cursor_pk(session: Session, model: Any, cursor_id: str | None, param: str, **scope: Any) -> int | None:
    if cursor_id is None:
        return None
    pk = session.scalar(
        select(model.pk).where(model.id == cursor_id, *(getattr(model, k) == v for k, v in scope.items()))
    )
    if pk is None:
        raise APIError(400, f"{param}: unknown cursor {cursor_id!r}", param=param, code="invalid_cursor")
    return int(pk)


@router.post("", response_model=JobSchema, summary="Create a fine-tuning job (SFT or DFT)")
def create(
    body: JobCreate,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    team: CurrentTeam,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JobSchema:
    job = create_job(session, settings, storage, team, body, idempotency_key)
    return to_schema(job, position=queue_position(session, job))


@router.get("", response_model=JobList, summary="List the team's jobs, newest first")
def list_jobs(
    request: Request,
    session: SessionDep,
    team: CurrentTeam,
    after: str | None = None,
    limit: Limit = 20,
    status: JobStatus | None = None,
) -> JobList:
    query = select(Job).where(Job.team_id == team.id)
    start = _cursor_pk(session, Job, after, "after", team_id=team.id)
    if start is not None:
        query = query.where(Job.pk < start)
    if status is not None:
        query = query.where(Job.status == status.value)
    for key, value in request.query_params.items():  # metadata[k]=v filters
        if key.startswith("metadata[") and key.endswith("]"):
            query = query.where(Job.user_metadata[key[9:-1]].as_string() == value)
    jobs = list(session.scalars(query.order_by(Job.pk.desc()).limit(limit + 1)))
    return JobList(data=[to_schema(j) for j in jobs[:limit]], has_more=len(jobs) > limit)


@router.get("/{fine_tuning_job_id}", response_model=JobSchema, summary="Retrieve a job")
def retrieve(fine_tuning_job_id: str, session: SessionDep, team: CurrentTeam) -> JobSchema:
    job = own_job(session, team, fine_tuning_job_id)
    return to_schema(job, position=queue_position(session, job))


@router.post("/{fine_tuning_job_id}/cancel", response_model=JobSchema, summary="Cancel a job")
def cancel(fine_tuning_job_id: str, session: SessionDep, team: CurrentTeam) -> JobSchema:
    job = own_job(session, team, fine_tuning_job_id)
    try:
        request_cancel(session, job)
    except IllegalTransition:
        raise APIError(
            409,
            f"Job {job.id} is already {job.status}; it cannot be cancelled",
            param="fine_tuning_job_id",
            code="job_finished",
        ) from None
    return to_schema(job)


def _event_schema(e: JobEvent) -> JobEventSchema:
    return JobEventSchema(
        id=e.id, created_at=e.created_at, level=e.level, message=e.message, type=e.type, data=e.data
    )


@router.get(
    "/{fine_tuning_job_id}/events",
    response_model=JobEventList,
    summary="List a job's events, newest first; ?stream=true follows them live (server-sent events)",
)
def list_events(
    fine_tuning_job_id: str,
    request: Request,
    session: SessionDep,
    team: CurrentTeam,
    after: str | None = None,
    limit: Limit = 20,
    stream: bool = False,
) -> Any:
    job = own_job(session, team, fine_tuning_job_id)
    if stream:
        return StreamingResponse(
            _event_stream(request, job.id),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    query = select(JobEvent).where(JobEvent.job_id == job.id)
    start = _cursor_pk(session, JobEvent, after, "after", job_id=job.id)
    if start is not None:
        query = query.where(JobEvent.pk < start)
    events = list(session.scalars(query.order_by(JobEvent.pk.desc()).limit(limit + 1)))
    return JobEventList(data=[_event_schema(e) for e in events[:limit]], has_more=len(events) > limit)


async def _event_stream(request: Request, job_id: str, poll_s: float = 0.5) -> AsyncIterator[str]:
    """Every event in order as `data: <json>`, then `event: end` once the job has ended."""
    db = get_database(request)
    last_pk = 0

    def fetch() -> tuple[list[JobEvent], bool]:
        with db.session() as session:
            status = session.scalar(select(Job.status).where(Job.id == job_id))
            events = list(
                session.scalars(
                    select(JobEvent)
                    .where(JobEvent.job_id == job_id, JobEvent.pk > last_pk)
                    .order_by(JobEvent.pk)
                    .limit(500)
                )
            )
            return events, status is None or JobStatus(status).is_terminal

    while True:
        events, finished = await run_in_threadpool(fetch)
        for event in events:
            last_pk = event.pk
            yield f"id: {event.id}\ndata: {_event_schema(event).model_dump_json()}\n\n"
        if finished and not events:
            yield f"event: end\ndata: {json.dumps({'id': job_id})}\n\n"
            return
        if not events:
            if await request.is_disconnected():
                return
            await asyncio.sleep(poll_s)


def _checkpoint_schema(c: Checkpoint) -> CheckpointObject:
    return CheckpointObject(
        id=c.id,
        created_at=c.created_at,
        fine_tuned_model_checkpoint=c.fine_tuned_model_checkpoint,
        fine_tuning_job_id=c.job_id,
        metrics=c.metrics,
        step_number=c.step,
    )


@router.get("/{fine_tuning_job_id}/checkpoints", response_model=CheckpointList, summary="List checkpoints")
def list_checkpoints(
    fine_tuning_job_id: str,
    session: SessionDep,
    team: CurrentTeam,
    after: str | None = None,
    limit: Limit = 10,
) -> CheckpointList:
    job = own_job(session, team, fine_tuning_job_id)
    query = select(Checkpoint).where(Checkpoint.job_id == job.id)
    start = _cursor_pk(session, Checkpoint, after, "after", job_id=job.id)
    if start is not None:
        query = query.where(Checkpoint.pk < start)
    found = list(session.scalars(query.order_by(Checkpoint.pk.desc()).limit(limit + 1)))
    data = [_checkpoint_schema(c) for c in found[:limit]]
    return CheckpointList(
        data=data,
        has_more=len(found) > limit,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


@router.get(
    "/{fine_tuning_job_id}/checkpoints/{checkpoint_id}/content",
    summary="Download a checkpoint: its Hugging Face directory as a tar stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-tar": {}}}},
)
def checkpoint_content(
    fine_tuning_job_id: str, checkpoint_id: str, session: SessionDep, team: CurrentTeam, storage: StorageDep
) -> StreamingResponse:
    job = own_job(session, team, fine_tuning_job_id)
    checkpoint = session.scalar(
        select(Checkpoint).where(Checkpoint.id == checkpoint_id, Checkpoint.job_id == job.id)
    )
    if checkpoint is None:
        raise not_found("checkpoint", checkpoint_id, "checkpoint_id")
    directory = storage.path(checkpoint.storage_path)
    if not directory.is_dir():
        raise APIError(410, f"Checkpoint {checkpoint_id} is no longer stored", code="checkpoint_gone")
    archive = DirectoryArchive(directory, f"{job.id}-step-{checkpoint.step}")
    name = f"{job.id}-step-{checkpoint.step}.tar"
    return StreamingResponse(
        archive.stream(),
        media_type="application/x-tar",
        headers={
            "Content-Length": str(archive.length),
            "Content-Disposition": f'attachment; filename="{name}"',
        },
    )


@router.get("/{fine_tuning_job_id}/metrics", response_model=MetricsList, summary="A job's per-step metrics")
def metrics(
    fine_tuning_job_id: str,
    session: SessionDep,
    team: CurrentTeam,
    after_step: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> MetricsList:
    job = own_job(session, team, fine_tuning_job_id)
    rows = list(
        session.scalars(
            select(JobMetric)
            .where(JobMetric.job_id == job.id, JobMetric.step > after_step)
            .order_by(JobMetric.step)
            .limit(limit + 1)
        )
    )
    data = [MetricRow(step=r.step, attempt=r.attempt, data=r.data) for r in rows[:limit]]
    return MetricsList(data=data, has_more=len(rows) > limit)
