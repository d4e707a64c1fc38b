"""/v1/fine_tuning/jobs: create, list, retrieve, cancel, pause, resume, events (and their live stream),
metrics. Checkpoints and their content: service/api/checkpoints.py."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from sqlalchemy import Select, bindparam, select
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.orm import Session

from service import team_limits
from service.api.deps import CurrentTeam, DatabaseDep, SessionDep, SettingsDep, StorageDep
from service.db import FastRead
from service.errors import AUTH_ERRORS, APIError, error_responses, not_found
from service.event_hub import event_hub, event_schema
from service.job_create import create_job
from service.jobs import (
    IllegalTransition,
    job_list_view,
    job_view,
    queue_position,
    queue_positions_queries,
    request_cancel,
    request_pause,
    request_resume,
    to_schema,
)
from service.models import Job, JobEvent, JobMetric, JobStatus, Team
from service.pools import request_dispatch
from service.schemas import Job as JobSchema
from service.schemas import (
    JobCreate,
    JobEventList,
    JobList,
    MetricRow,
    MetricsList,
)

router = APIRouter(
    prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], responses=error_responses(*AUTH_ERRORS)
)
Limit = Annotated[int, Query(ge=1, le=100, description="page size, 1-100")]
# One server-sent event of `?stream=true` (event_stream_response): a JobEvent as JSON, then `event: end`.
_STREAM_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "id": {"type": "string", "description": "the job event's id"},
        "event": {"enum": ["message", "end"], "description": "`end`: the job has ended, no more follow"},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
    "if": {"required": ["event"], "properties": {"event": {"const": "end"}}},
    "then": {"properties": {"data": {"contentSchema": {"type": "object", "required": ["id"]}}}},
    "else": {"properties": {"data": {"contentSchema": {"$ref": "#/components/schemas/JobEvent"}}}},
}


def json_response(model: BaseModel) -> Response:
    """Serialise once; returning the model would make FastAPI validate it all over again."""
    return Response(model.model_dump_json(), media_type="application/json")


def _own_job_query(team: Team, job_id: str) -> Select[Job]:
    return select(Job).where(Job.id == job_id, Job.team_id == team.id)


def own_job(session: Session, team: Team, job_id: str, *, lock: bool = False) -> Job:
    """The team's job (`lock`: its row locked for an update), or the same 404 as an id that does not
    exist."""
    query = _own_job_query(team, job_id)
    job = session.scalar(query.with_for_update() if lock else query)
    if job is None:
        raise not_found("fine-tuning job", job_id, "fine_tuning_job_id")
    return job


async def own_job_id(conn: AsyncConnection, team: Team, job_id: str) -> str:
    """`job_id` if it is the team's job, else the same 404 as an id that does not exist."""
    if await conn.scalar(select(Job.id).where(Job.id == job_id, Job.team_id == team.id)) is None:
        raise not_found("fine-tuning job", job_id, "fine_tuning_job_id")
    return job_id


async def cursor_pk(
    conn: AsyncConnection, model: Any, cursor_id: str | None, param: str, **scope: Any
) -> int | None:
    """The pk of a list cursor (an object id within the same scope); a 400 naming `param` if unknown."""
    if cursor_id is None:
        return None
    conditions = [getattr(model, k) == v for k, v in scope.items()]
    pk = await conn.scalar(select(model.pk).where(model.id == cursor_id, *conditions))
    if pk is None:
        raise APIError(400, f"{param}: unknown cursor {cursor_id!r}", param=param, code="invalid_cursor")
    return int(pk)


@router.post(
    "",
    response_model=JobSchema,
    summary="Create a fine-tuning job (SFT or DFT)",
    responses=error_responses(409, 429),  # Idempotency-Key reused for another body; the team's job quota
)
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
async def list_jobs(
    request: Request,
    db: DatabaseDep,
    team: CurrentTeam,
    after: str | None = None,
    limit: Limit = 20,
    status: JobStatus | None = None,
) -> Response:
    query = job_list_view().where(Job.team_id == team.id)
    if status is not None:
        query = query.where(Job.status == status.value)
    for key, value in request.query_params.items():  # metadata[k]=v filters
        if key.startswith("metadata[") and key.endswith("]"):
            query = query.where(Job.user_metadata[key[9:-1]].as_string() == value)
    async with db.read() as conn:
        start = await cursor_pk(conn, Job, after, "after", team_id=team.id)
        if start is not None:
            query = query.where(Job.pk < start)
        jobs = list(await conn.execute(query.order_by(Job.pk.desc()).limit(limit + 1)))
        positions: dict[str, int] = {}
        for positions_query in queue_positions_queries(jobs[:limit]):
            positions.update((await conn.execute(positions_query)).tuples().all())
    data = [to_schema(j, position=positions.get(j.id)) for j in jobs[:limit]]
    return json_response(JobList(data=data, has_more=len(jobs) > limit))


# Built and compiled once: per request, building a statement costs more than running it.
_RETRIEVE = FastRead(job_view().where(Job.id == bindparam("job_id"), Job.team_id == bindparam("team_id")))


@router.get(
    "/{fine_tuning_job_id}",
    response_model=JobSchema,
    summary="Retrieve a job",
    responses=error_responses(404),
)
async def retrieve(fine_tuning_job_id: str, db: DatabaseDep, team: CurrentTeam) -> Response:
    async with db.read() as conn:
        job = await _RETRIEVE.first(conn, {"job_id": fine_tuning_job_id, "team_id": team.id})
    if job is None:
        raise not_found("fine-tuning job", fine_tuning_job_id, "fine_tuning_job_id")
    return json_response(to_schema(job))


@router.post(
    "/{fine_tuning_job_id}/cancel",
    response_model=JobSchema,
    summary="Cancel a job",
    responses=error_responses(404, 409),
)
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


@router.post(
    "/{fine_tuning_job_id}/pause",
    response_model=JobSchema,
    summary="Pause a job: a running one checkpoints its current step and frees its GPUs",
    responses=error_responses(404, 409),
)
def pause(fine_tuning_job_id: str, session: SessionDep, team: CurrentTeam) -> JobSchema:
    job = own_job(session, team, fine_tuning_job_id, lock=True)
    try:
        request_pause(session, job)
    except IllegalTransition:
        why = "being cancelled" if job.cancel_requested and job.status == "running" else job.status
        raise APIError(
            409,
            f"Job {job.id} is {why}; only a queued or running job can be paused",
            param="fine_tuning_job_id",
            code="job_not_pausable",
        ) from None
    return to_schema(job, position=queue_position(session, job))


@router.post(
    "/{fine_tuning_job_id}/resume",
    response_model=JobSchema,
    summary="Resume a paused job: back in the queue, it continues from its checkpoint",
    responses=error_responses(404, 409),
)
def resume(
    fine_tuning_job_id: str, session: SessionDep, settings: SettingsDep, team: CurrentTeam
) -> JobSchema:
    job = own_job(session, team, fine_tuning_job_id, lock=True)
    try:
        request_resume(session, job)
    except IllegalTransition:
        raise APIError(
            409,
            f"Job {job.id} is {job.status}, not paused; only a paused job can be resumed",
            param="fine_tuning_job_id",
            code="job_not_paused",
        ) from None
    if job.status == "queued":
        sent_at = request_dispatch(session, settings, job.pool)  # commits; None: the reconciler sends
        if sent_at is not None:
            job.dispatched_at = sent_at
            session.commit()
    return to_schema(job, position=queue_position(session, job))


@router.get(
    "/{fine_tuning_job_id}/events",
    response_model=JobEventList,
    summary="List a job's events, newest first; ?stream=true follows them live (server-sent events)",
    responses={
        200: {"content": {"text/event-stream": {"schema": _STREAM_EVENT}}},  # with ?stream=true
        **error_responses(404),
    },
)
async def list_events(
    fine_tuning_job_id: str,
    request: Request,
    db: DatabaseDep,
    team: CurrentTeam,
    after: str | None = None,
    limit: Limit = 20,
    stream: bool = False,
) -> Response:
    async with db.read() as conn:
        job_id = await own_job_id(conn, team, fine_tuning_job_id)
        if stream:  # the connection goes back as this returns: the stream holds none
            return event_stream_response(request, job_id, team.id)
        query = select(JobEvent).where(JobEvent.job_id == job_id)
        start = await cursor_pk(conn, JobEvent, after, "after", job_id=job_id)
        if start is not None:
            query = query.where(JobEvent.pk < start)
        events = list(await conn.execute(query.order_by(JobEvent.pk.desc()).limit(limit + 1)))
    return json_response(
        JobEventList(data=[event_schema(e) for e in events[:limit]], has_more=len(events) > limit)
    )


def event_stream_response(request: Request, job_id: str, team_id: str) -> StreamingResponse:
    """A job's events as server-sent events, unbuffered by proxies: every event in order as
    `data: <json>`, then `event: end` once the job has ended. Followed through the process's shared
    poller (service/event_hub.py); one of the team's event-stream slots while open (429 past it)."""
    return team_limits.acquire(request, "event_streams", team_id).stream(
        event_hub(request.app).follow(job_id),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get(
    "/{fine_tuning_job_id}/metrics",
    response_model=MetricsList,
    summary="A job's per-step metrics",
    responses=error_responses(404),
)
async def metrics(
    fine_tuning_job_id: str,
    db: DatabaseDep,
    team: CurrentTeam,
    # At most the step column's range (32-bit): a larger int made SQLite raise OverflowError (a 500).
    after_step: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> Response:
    async with db.read() as conn:
        job_id = await own_job_id(conn, team, fine_tuning_job_id)
        query = select(JobMetric).where(JobMetric.job_id == job_id, JobMetric.step > after_step)
        rows = list(await conn.execute(query.order_by(JobMetric.step).limit(limit + 1)))
    data = [MetricRow(step=r.step, attempt=r.attempt, data=r.data) for r in rows[:limit]]
    return json_response(MetricsList(data=data, has_more=len(rows) > limit))
