"""Creating a job: check every value, resolve "auto", honour Idempotency-Key, commit, dispatch.

Each rejection is an APIError whose `param` names the request field at fault. The job is
committed before the dispatch message is sent: a job that exists only in the broker cannot
happen, and one whose message is lost waits in the database until it is re-sent.
"""

from __future__ import annotations

import hashlib
import json
import secrets

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db import lock_team
from service.errors import APIError
from service.hyperparameters import check_pool_capabilities, resolve_hyperparameters
from service.jobs import add_event, set_status
from service.models import Checkpoint, File, Job, JobStatus, RegisteredModel, Team, Worker
from service.pools import pool_exists, request_dispatch
from service.schemas import Hyperparameters, JobCreate
from service.settings import Settings
from service.storage import Storage


def _request_hash(body: JobCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json", exclude_unset=True), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _resolve_model(session: Session, storage: Storage, team: Team, name: str) -> tuple[str, str | None]:
    """(source the worker loads, the model's pool) for a registered base model or the team's ft: model."""
    if name.startswith("ft:"):
        job = session.scalar(
            select(Job).where(Job.team_id == team.id, Job.fine_tuned_model == name, Job.status == "succeeded")
        )
        checkpoint = None
        if job is not None:
            checkpoint = session.scalar(
                select(Checkpoint)
                .where(Checkpoint.job_id == job.id)
                .order_by(Checkpoint.step.desc())
                .limit(1)
            )
        if job is None or checkpoint is None:
            raise APIError(400, f"model: no fine-tuned model {name!r}", param="model", code="model_not_found")
        return str(storage.path(checkpoint.storage_path)), job.pool
    model = session.scalar(select(RegisteredModel).where(RegisteredModel.name == name))
    if model is None:
        raise APIError(
            400,
            f"model: {name!r} is not a registered base model (GET /v1/models lists them)",
            param="model",
            code="model_not_found",
        )
    return model.source, model.pool


def _own_file(session: Session, team: Team, file_id: str, param: str) -> File:
    # FOR SHARE: a concurrent DELETE of the file waits for this job to commit, then sees it (409).
    query = select(File).where(File.id == file_id, File.team_id == team.id).with_for_update(read=True)
    file = session.scalar(query)
    if file is None:
        raise APIError(400, f"{param}: no such file {file_id!r}", param=param, code="file_not_found")
    if file.purpose != "fine-tune":
        raise APIError(
            400,
            f"{param}: file {file_id!r} has purpose {file.purpose!r}, not 'fine-tune'",
            param=param,
            code="invalid_file",
        )
    return file


def _method_and_hyperparameters(body: JobCreate) -> tuple[str, Hyperparameters, str]:
    """(loss, hyperparameters, param path of the hyperparameters) from method or the legacy field."""
    kind = body.method.type if body.method else "supervised"
    block = getattr(body.method, kind) if body.method else None
    nested = block.hyperparameters if block else None
    if nested is not None and body.hyperparameters is not None:
        raise APIError(
            400,
            "hyperparameters: give them in method, not both there and at the top level",
            param="hyperparameters",
        )
    if nested is not None:
        return ("dft" if kind == "dft" else "sft"), nested, f"method.{kind}.hyperparameters"
    return ("dft" if kind == "dft" else "sft"), body.hyperparameters or Hyperparameters(), "hyperparameters"


def _idempotent_replay(session: Session, team: Team, key: str, request_hash: str) -> Job | None:
    """The job an earlier request with this Idempotency-Key made (same body), None if there is none;
    409 if the key was used with another body."""
    existing = session.scalar(select(Job).where(Job.team_id == team.id, Job.idempotency_key == key))
    if existing is not None and existing.request_hash != request_hash:
        raise APIError(
            409,
            "Idempotency-Key was already used with a different request",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    return existing


def _check_pool(session: Session, pool: str, named: bool) -> None:
    if not pool_exists(session, pool):
        param = "pool" if named else "model"
        raise APIError(
            400,
            f"{param}: pool {pool!r} does not exist: no admin declared it and no worker serves it "
            "(`tunepool admin add-pool`, or start a worker with --pool)",
            param=param,
            code="pool_not_found",
        )


def _check_gpus(session: Session, pool: str, gpus: int) -> None:
    """A job's GPUs are all on one node: `gpus` may not exceed the slots of the pool's largest
    worker in the registry (with no worker registered yet, any `gpus` waits for one)."""
    if gpus == 1:
        return
    largest = session.scalar(select(func.max(Worker.slots)).where(Worker.pool == pool))
    if largest is not None and gpus > largest:
        raise APIError(
            400,
            f"gpus: {gpus} GPUs on one node, but the largest worker of pool {pool!r} has {largest} "
            f"(a job's GPUs are all on one node)",
            param="gpus",
        )


def create_job(
    session: Session,
    settings: Settings,
    storage: Storage,
    team: Team,
    body: JobCreate,
    idempotency_key: str | None,
) -> Job:
    request_hash = _request_hash(body)
    if idempotency_key is not None:
        if not 1 <= len(idempotency_key) <= 255:
            raise APIError(400, "Idempotency-Key: 1 to 255 characters", param="Idempotency-Key")
        if (existing := _idempotent_replay(session, team, idempotency_key, request_hash)) is not None:
            return existing  # a retry: no lock, no write

    lock_team(session, team.id)  # one job creation per team at a time: quota and files checks hold
    # Looked up again under the lock: a request with the same key that raced past the first look
    # has committed by now (it held the lock), and its job is the answer.
    if idempotency_key is not None and (
        existing := _idempotent_replay(session, team, idempotency_key, request_hash)
    ):
        session.rollback()
        return existing
    source, model_pool = _resolve_model(session, storage, team, body.model)
    pool = body.pool or model_pool or settings.default_pool
    _check_pool(session, pool, named=body.pool is not None)
    _own_file(session, team, body.training_file, "training_file")
    if body.validation_file is not None:
        _own_file(session, team, body.validation_file, "validation_file")
    loss, hp, hp_param = _method_and_hyperparameters(body)
    resolved = resolve_hyperparameters(hp, has_validation=body.validation_file is not None, param=hp_param)
    check_pool_capabilities(session, pool, resolved, hp_param)
    _check_gpus(session, pool, body.gpus)
    exempt_allowed = session.scalar(select(Team.may_exempt_preemption).where(Team.id == team.id))
    if not body.preemptible and not exempt_allowed:
        raise APIError(
            400,
            "preemptible: your team may not exempt jobs from preemption (an admin allows it with "
            "`tunepool admin set-quota TEAM --may-exempt-preemption`)",
            param="preemptible",
        )
    method_type = "dft" if loss == "dft" else "supervised"
    waiting = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.team_id == team.id, Job.status.in_(("queued", "validating_files")))
    )
    # The quota as it is now (under the lock), not as the key's cache remembers the team.
    max_queued = session.scalar(select(Team.max_queued_jobs).where(Team.id == team.id))
    if int(waiting or 0) >= int(max_queued if max_queued is not None else team.max_queued_jobs):
        raise APIError(
            429,
            f"Your team has {waiting} queued jobs, its limit (max_queued_jobs); "
            "wait for some to start or cancel some",
            code="quota_exceeded",
        )

    job = Job(
        team_id=team.id,
        status=JobStatus.VALIDATING_FILES.value,
        model=body.model,
        model_source=source,
        training_file=body.training_file,
        validation_file=body.validation_file,
        method={"type": method_type, method_type: {"hyperparameters": resolved}},
        loss=loss,
        hyperparameters=resolved,
        seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
        suffix=body.suffix,
        user_metadata=body.metadata,
        pool=pool,
        priority=body.priority,
        gpus=body.gpus,
        preemptible=body.preemptible,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        result_files=[],
    )
    try:
        session.add(job)
        session.flush()
        add_event(session, job, f"Created fine-tuning job: {loss.upper()} of {body.model}")
        set_status(session, job, JobStatus.QUEUED, "Files validated; job queued")
        session.commit()
    except IntegrityError:
        # Only the (team, Idempotency-Key) constraint can fail here, and the team lock makes even
        # that a request that bypassed it (another version of the API): answer as a replay would.
        session.rollback()
        if idempotency_key is None:
            raise
        existing = _idempotent_replay(session, team, idempotency_key, request_hash)
        if existing is None:
            raise
        return existing

    sent_at = request_dispatch(session, settings, job.pool)  # commits; one pending message per pool
    if sent_at is not None:
        job.dispatched_at = sent_at
    else:
        add_event(
            session,
            job,
            "The job queue is unreachable; the job waits and is dispatched when it is back",
            level="warn",
        )
    session.commit()
    return job
