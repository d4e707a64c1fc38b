"""/ui: the web dashboard. Server-rendered pages (Jinja2) plus one small charting library (uPlot,
vendored under service/ui/static, so nothing is fetched at run time and there is no build step).

Sign-in: the API key goes in a session cookie (no expiry: it ends with the browser session),
HttpOnly so page scripts never see it, SameSite=Strict and scoped to /ui so no other site's page
can make the browser send it, and no /v1 request carries it. The server keeps no session state:
every request checks the key exactly as the REST API does. The one form that changes something
(cancel) also carries a token derived from the key, so it cannot be forged even by a same-site page,
and every form post (sign-in above all, which needs no cookie) is refused when another site sent it.
Pages carry a strict Content-Security-Policy (service/security_headers.py): no inline scripts.

Everything a page shows comes from the same queries the REST API answers with (`to_schema`,
the metrics rows, the event stream, the checkpoint archive, and for the Pool page `pool_view`, GET
/v1/pool's object), so the dashboard and the API agree.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import time
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import orjson
from fastapi import APIRouter, Depends, Form, Header, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.api import checkpoints as checkpoints_api
from service.api import jobs as jobs_api
from service.api.deps import DatabaseDep, SessionDep, StorageDep, authenticate_request
from service.errors import APIError
from service.jobs import (
    IllegalTransition,
    job_list_view,
    queue_position,
    queue_positions_queries,
    request_cancel,
    request_pause,
    request_resume,
    to_schema,
)
from service.models import Checkpoint, Job, JobMetric, JobStatus, Team
from service.pool_schemas import PoolNode
from service.pool_view import pool_view
from service.pools import request_dispatch
from service.security_headers import require_same_origin
from service.settings import Settings

UI_DIR = Path(__file__).resolve().parents[1] / "ui"
COOKIE = "tunepool_key"
PAGE_SIZE = 50
# The series the job page charts (x = step), in the order they are drawn.
CHARTED = ("loss", "nll", "token_accuracy", "valid_loss")
STATUS_FILTERS = [s.value for s in JobStatus]
METHOD_LABELS = {"dft": "DFT", "supervised": "SFT"}

router = APIRouter(prefix="/ui", include_in_schema=False)
templates = Jinja2Templates(directory=UI_DIR / "templates")


def method_label(method: dict[str, Any]) -> str:
    """DFT or SFT, from a job's method object."""
    return METHOD_LABELS.get(str(method.get("type")), "?")


templates.env.filters["method_label"] = lambda job: method_label(job.method)


class SignInRequired(Exception):
    """Raised by page dependencies without a valid key; answered with a redirect to /ui/login."""

    def __init__(self, next_url: str) -> None:
        self.next_url = next_url


async def ui_team(request: Request) -> Team:
    key = request.cookies.get(COOKIE, "")
    found = await authenticate_request(request, key) if key else None
    if found is None:
        raise SignInRequired(str(request.url.path))
    request.state.csrf = csrf_token(key)
    request.state.is_admin = found[1].is_admin  # the Pool page shows an admin every team
    return found[0]


def csrf_token(key: str) -> str:
    return hashlib.sha256(b"tunepool-ui-csrf:" + key.encode()).hexdigest()[:32]


SameOrigin = Depends(require_same_origin)


def _safe_next(next_url: str | None) -> str:
    """Only our own pages: a `next` of `//evil.example` or `https://...` goes to /ui instead."""
    if next_url and next_url.startswith("/ui") and not next_url.startswith("//"):
        return next_url
    return "/ui"


def _page(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    return templates.TemplateResponse(request, name, context, status_code=status_code)


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str | None = None) -> HTMLResponse:
    return _page(request, "login.html", {"next": _safe_next(next), "error": None})


@router.post("/login", response_class=HTMLResponse, dependencies=[SameOrigin])
async def login(
    request: Request, api_key: Annotated[str, Form()] = "", next: Annotated[str, Form()] = "/ui"
) -> Response:
    key = api_key.strip()
    found = await authenticate_request(request, key) if key else None
    if found is None:
        error = "That API key is not valid (or has been revoked)." if key else "Enter an API key."
        return _page(request, "login.html", {"next": _safe_next(next), "error": error}, 401)
    response = RedirectResponse(_safe_next(next), status_code=303)
    secure = request.url.scheme == "https"
    response.set_cookie(COOKIE, key, httponly=True, samesite="strict", path="/ui", secure=secure)
    return response


@router.post("/logout", dependencies=[SameOrigin])
def logout() -> RedirectResponse:
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/ui")
    return response


def _filtered_jobs(
    session: Session, team: Team, status: str | None, method: str | None, model: str | None, q: str | None
) -> list[Any]:
    query = job_list_view().where(Job.team_id == team.id)
    if status in STATUS_FILTERS:
        query = query.where(Job.status == status)
    if method in METHOD_LABELS:
        query = query.where(Job.method["type"].as_string() == method)
    if model:
        query = query.where(Job.model == model)
    if q:
        like = f"%{q.strip()}%"
        query = query.where(Job.id.like(like) | Job.suffix.like(like) | Job.training_file.like(like))
    return list(session.execute(query.order_by(Job.pk.desc()).limit(PAGE_SIZE)))


@router.get("", response_class=HTMLResponse)
def jobs_page(
    request: Request,
    session: SessionDep,
    team: Annotated[Team, Depends(ui_team)],
    status: str | None = None,
    method: str | None = None,
    model: str | None = None,
    q: str | None = None,
    partial: bool = False,
) -> HTMLResponse:
    rows = _filtered_jobs(session, team, status, method, model, q)
    positions = {i: p for query in queue_positions_queries(rows) for i, p in session.execute(query).tuples()}
    models = session.scalars(select(Job.model).where(Job.team_id == team.id).distinct().order_by(Job.model))
    context = {
        "team": team,
        "jobs": [to_schema(r, position=positions.get(r.id)) for r in rows],
        "filters": {"status": status or "", "method": method or "", "model": model or "", "q": q or ""},
        "statuses": STATUS_FILTERS,
        "methods": METHOD_LABELS,
        "models": list(models),
        "page_size": PAGE_SIZE,
    }
    return _page(request, "_job_rows.html" if partial else "jobs.html", context)


UiTeam = Annotated[Team, Depends(ui_team)]


def _comparable(session: Session, team: Team, job: Job) -> list[dict[str, Any]]:
    """The team's other jobs that have metrics, the ones on the same training file first (SFT vs DFT
    on the same data is what the overlay is for)."""
    others = session.execute(
        select(Job.id, Job.method, Job.model, Job.status, Job.suffix, Job.training_file)
        .where(Job.team_id == team.id, Job.id != job.id, Job.steps_completed > 0)
        .order_by(Job.pk.desc())
        .limit(100)
    )
    found = [
        {
            "id": o.id,
            "label": f"{method_label(o.method)} · {o.model}" + (f" · {o.suffix}" if o.suffix else ""),
            "status": o.status,
            "same_file": o.training_file == job.training_file,
        }
        for o in others
    ]
    return sorted(found, key=lambda o: not o["same_file"])


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: str, session: SessionDep, team: UiTeam) -> HTMLResponse:
    try:
        job = jobs_api.own_job(session, team, job_id)
    except APIError:  # the REST API's 404, as a page
        message = f"No fine-tuning job {job_id!r} in team {team.name}."
        return _page(request, "error.html", {"team": team, "title": "Job not found", "message": message}, 404)
    context = {
        "team": team,
        "job": to_schema(job, position=queue_position(session, job)),
        "hyperparameters": job.hyperparameters,
        "comparable": _comparable(session, team, job),
        "charted": CHARTED,
        "csrf": request.state.csrf,
    }
    return _page(request, "job.html", context)


def slot_boxes(node: PoolNode) -> list[dict[str, str | None]]:
    """A node's slots as the Pool page draws them, one box each: its running jobs' GPUs first (the
    team's own linked to their page), then slots busy with no job the view knows of (the node's last
    heartbeat predates a job's end), then the free ones."""
    boxes: list[dict[str, str | None]] = []
    for job in node.jobs:
        if job.own:
            box = {"kind": "own", "job": job.id, "title": f"your job {job.id} ({job.gpus} GPUs)"}
        elif job.id is not None:  # an admin's view: another team's job, by name
            box = {"kind": "other", "job": None, "title": f"{job.team}: {job.id} ({job.gpus} GPUs)"}
        else:
            box = {"kind": "other", "job": None, "title": f"another team ({job.gpus} GPUs)"}
        boxes += [box] * job.gpus
    boxes = boxes[: node.slots]
    free = min(node.free_slots, node.slots - len(boxes))
    boxes += [{"kind": "busy", "job": None, "title": "busy"}] * (node.slots - len(boxes) - free)
    return boxes + [{"kind": "free", "job": None, "title": "free"}] * free


templates.env.globals["slot_boxes"] = slot_boxes


@router.get("/pool", response_class=HTMLResponse)
def pool_page(request: Request, session: SessionDep, team: UiTeam, partial: bool = False) -> HTMLResponse:
    """GET /v1/pool's object drawn: each pool's nodes slot by slot, the share bars, the queue."""
    settings: Settings = request.app.state.settings
    admin: bool = request.state.is_admin
    view = pool_view(
        session,
        team,
        admin=admin,
        now=time.time(),
        lease_s=settings.lease_s,
        half_life_s=settings.fairshare_half_life_s,
    )
    context = {"team": team, "pools": view.data, "admin": admin}
    return _page(request, "_pool_body.html" if partial else "pool.html", context)


@router.get("/jobs/{job_id}/data")
def job_data(
    job_id: str, session: SessionDep, team: UiTeam, after_step: Annotated[int, Query(ge=0)] = 0
) -> Response:
    """What the job page polls: the job object, its metric rows after `after_step` (only the charted
    series) and its checkpoints."""
    job = jobs_api.own_job(session, team, job_id)
    rows = session.scalars(
        select(JobMetric)
        .where(JobMetric.job_id == job.id, JobMetric.step > after_step)
        .order_by(JobMetric.step)
    )
    metrics = [{"step": r.step, **{k: r.data.get(k) for k in CHARTED}} for r in rows]
    checkpoints = session.scalars(
        select(Checkpoint).where(Checkpoint.job_id == job.id).order_by(Checkpoint.step)
    )
    body = {
        "job": to_schema(job, position=queue_position(session, job)).model_dump(),
        "label": f"{method_label(job.method)} · {job.id}",
        "metrics": metrics,
        "checkpoints": [
            {"id": c.id, "step": c.step, "created_at": c.created_at, "metrics": c.metrics}
            for c in checkpoints
        ],
    }
    return Response(orjson.dumps(body), media_type="application/json")


@router.get("/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request, db: DatabaseDep, team: UiTeam) -> StreamingResponse:
    """The job's events, live, as server-sent events (EventSource sends the cookie, unlike a header)."""
    async with db.read() as conn:
        await jobs_api.own_job_id(conn, team, job_id)
    return jobs_api.event_stream_response(request, job_id, team.id)


@router.get("/jobs/{job_id}/checkpoints/{checkpoint_id}/content")
def checkpoint_download(
    request: Request,
    job_id: str,
    checkpoint_id: str,
    session: SessionDep,
    team: UiTeam,
    storage: StorageDep,
    range_header: Annotated[str | None, Header(alias="Range")] = None,
) -> StreamingResponse:
    return checkpoints_api.checkpoint_content(
        request, job_id, checkpoint_id, session, team, storage, range_header
    )


def _move(request: Request, job_id: str, session: Session, team: Team, csrf: str, action: str) -> Response:
    """A job page's button (cancel, pause, resume): checked like every form, then the API's move."""
    if not hmac.compare_digest(csrf, request.state.csrf):
        raise APIError(403, f"The {action} form is stale or forged; reload the page", code="csrf_failed")
    job = jobs_api.own_job(session, team, job_id, lock=action != "cancel")
    with contextlib.suppress(IllegalTransition):  # moved on meanwhile: the page shows where it is
        {"cancel": request_cancel, "pause": request_pause, "resume": request_resume}[action](session, job)
    if action == "resume" and job.status == "queued":
        request_dispatch(session, request.app.state.settings, job.pool)
    return RedirectResponse(f"/ui/jobs/{job.id}", status_code=303)


@router.post("/jobs/{job_id}/cancel", dependencies=[SameOrigin])
def cancel(
    request: Request, job_id: str, session: SessionDep, team: UiTeam, csrf: Annotated[str, Form()] = ""
) -> Response:
    return _move(request, job_id, session, team, csrf, "cancel")


@router.post("/jobs/{job_id}/pause", dependencies=[SameOrigin])
def pause(
    request: Request, job_id: str, session: SessionDep, team: UiTeam, csrf: Annotated[str, Form()] = ""
) -> Response:
    return _move(request, job_id, session, team, csrf, "pause")


@router.post("/jobs/{job_id}/resume", dependencies=[SameOrigin])
def resume(
    request: Request, job_id: str, session: SessionDep, team: UiTeam, csrf: Annotated[str, Form()] = ""
) -> Response:
    return _move(request, job_id, session, team, csrf, "resume")


def install(app: Any) -> None:
    """The router, its static files and the sign-in redirect."""
    from fastapi.staticfiles import StaticFiles

    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=UI_DIR / "static"), name="ui-static")

    @app.exception_handler(SignInRequired)
    async def _sign_in(_request: Request, exc: SignInRequired) -> Response:
        return RedirectResponse(f"/ui/login?next={quote(exc.next_url)}", status_code=303)
