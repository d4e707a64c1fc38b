"""Teams, keys, quotas and the model registry: what admins manage (CLI and /v1/admin alike).

Every check lives here, so `tunepool admin ...` and `/v1/admin/...` accept and refuse the same
things with the same messages. Errors are AdminError: `param` names the field at fault, `status`
is the HTTP status the API answers with.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.auth import KEY_PREFIX, create_key
from service.models import ApiKey, File, Job, JobStatus, RegisteredModel, Team, TeamQuota, now_s
from service.settings import Settings

# Team names appear in URLs (/v1/admin/teams/{name}) and shell commands: keep them plain.
TEAM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_JOBS = 1_000_000  # max_running_jobs / max_queued_jobs (an INTEGER column)
MAX_STORAGE_BYTES = 2**63 - 1  # a BIGINT column
MAX_SHARE_WEIGHT = 1e6
_PREFIX_LENGTH = len(KEY_PREFIX) + 8
# Jobs that count against max_queued_jobs (as in service/job_create.py).
WAITING = (JobStatus.QUEUED.value, JobStatus.VALIDATING_FILES.value)


class AdminError(ValueError):
    """A request an admin made that cannot be carried out; `param` names the field, `code` (if
    given) is the API error's code."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str = "") -> None:
        super().__init__(message)
        self.param = param
        self.status = status
        self.code = code


@dataclass(frozen=True)
class TeamUsage:
    """A team with what it uses now: jobs running, jobs waiting, bytes of stored files."""

    team: Team
    running_jobs: int
    queued_jobs: int
    stored_bytes: int
    guaranteed_gpus: dict[str, int] = dataclass_field(default_factory=dict)  # pool -> GPUs guaranteed there


def create_team(session: Session, settings: Settings, name: str, *, admin: bool = False) -> tuple[Team, str]:
    """A new team with the default quotas and its first key (returned in clear, once)."""
    name = name.strip()
    if not TEAM_NAME.match(name):
        raise AdminError("name: 1 to 64 of A-Z a-z 0-9 . _ -, starting with a letter or digit", "name")
    if session.scalar(select(Team).where(Team.name == name)) is not None:
        raise AdminError(f"name: a team named {name!r} already exists", "name", 409)
    team = Team(
        name=name,
        max_running_jobs=settings.default_max_running_jobs,
        max_queued_jobs=settings.default_max_queued_jobs,
        max_storage_bytes=settings.default_max_storage_bytes,
        share_weight=1.0,
    )
    session.add(team)
    try:
        session.flush()
        key = create_key(session, team, is_admin=admin)
        session.commit()
    except IntegrityError:  # created at the same moment by another request
        session.rollback()
        raise AdminError(f"name: a team named {name!r} already exists", "name", 409) from None
    return team, key


def team_by_name(session: Session, name: str) -> Team:
    team = session.scalar(select(Team).where(Team.name == name))
    if team is None:
        raise AdminError(f"team: no team named {name!r}", "team", 404)
    return team


def list_teams(session: Session, name: str | None = None) -> list[TeamUsage]:
    """Every team (or the one named), oldest first, with its current usage."""
    query = select(Team).order_by(Team.created_at, Team.name)
    teams = [team_by_name(session, name)] if name is not None else list(session.scalars(query))
    ids = [t.id for t in teams]
    jobs: dict[tuple[str, str], int] = {}
    for team_id, status, count in session.execute(
        select(Job.team_id, Job.status, func.count())
        .where(Job.team_id.in_(ids), Job.status.in_((JobStatus.RUNNING.value, *WAITING)))
        .group_by(Job.team_id, Job.status)
    ):
        jobs[team_id, status] = int(count)
    stored = dict(
        session.execute(
            select(File.team_id, func.sum(File.bytes)).where(File.team_id.in_(ids)).group_by(File.team_id)
        )
        .tuples()
        .all()
    )
    guaranteed: dict[str, dict[str, int]] = {}
    for team_id, pool, gpus in session.execute(
        select(TeamQuota.team_id, TeamQuota.pool, TeamQuota.guaranteed_gpus).where(TeamQuota.team_id.in_(ids))
    ):
        guaranteed.setdefault(team_id, {})[pool] = gpus
    return [
        TeamUsage(
            team=t,
            running_jobs=jobs.get((t.id, JobStatus.RUNNING.value), 0),
            queued_jobs=sum(jobs.get((t.id, s), 0) for s in WAITING),
            stored_bytes=int(stored.get(t.id) or 0),
            guaranteed_gpus=guaranteed.get(t.id, {}),
        )
        for t in teams
    ]


def new_key(session: Session, team_name: str, *, admin: bool = False) -> str:
    key = create_key(session, team_by_name(session, team_name), is_admin=admin)
    session.commit()
    return key


def prefix_of(key: str) -> str:
    """The visible prefix of a key (what listings show and revoke-key takes)."""
    return key[:_PREFIX_LENGTH]


def key_by_prefix(session: Session, prefix: str) -> ApiKey:
    """A key record by its visible prefix (`tp-` and 8 characters)."""
    prefix = prefix.strip()
    if len(prefix) > _PREFIX_LENGTH:
        # Never echo it: this may be a whole key, pasted where only its prefix belongs.
        raise AdminError(
            f"prefix: a key's prefix is {KEY_PREFIX} and 8 characters, not the whole key", "prefix"
        )
    record = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if record is None:
        raise AdminError(f"prefix: no key with prefix {prefix!r}", "prefix", 404)
    return record


def list_keys(session: Session, team_name: str) -> list[ApiKey]:
    """A team's keys, revoked ones included (prefixes only: the keys themselves are not stored)."""
    team = team_by_name(session, team_name)
    return list(session.scalars(select(ApiKey).where(ApiKey.team_id == team.id).order_by(ApiKey.pk)))


def revoke_key(session: Session, prefix: str) -> ApiKey:
    record = key_by_prefix(session, prefix)
    if record.revoked_at is None:
        record.revoked_at = now_s()
        session.commit()
    return record


def parse_size(text: str, param: str = "max_storage_bytes") -> int:
    """Bytes from a plain integer, `10GB` (powers of 1000), or `10GiB` / `10G` (powers of 1024)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?)(b?)", text.strip(), re.IGNORECASE)
    if match is None or (match[3] and not match[2]):
        raise AdminError(f"{param}: expected bytes, like 500000, 10GB, 10GiB or 10G; got {text!r}", param)
    number, unit, binary, b = match.groups()
    power = "kmgtp".index(unit.lower()) + 1 if unit else 0
    base = 1024 if binary or (unit and not b) else 1000
    return int(float(number) * base**power)


def set_quota(
    session: Session,
    team_name: str,
    *,
    max_running_jobs: int | None = None,
    max_queued_jobs: int | None = None,
    max_storage_bytes: int | None = None,
    share_weight: float | None = None,
    max_gpus: int | None = None,
    guaranteed_gpus: int | None = None,
    pool: str = "default",
    may_exempt_preemption: bool | None = None,
) -> Team:
    """Change the limits given (None: unchanged). `max_gpus` counts GPUs running over all pools;
    -1 removes that limit. `guaranteed_gpus` is the team's guarantee in `pool` (0 removes it): below
    it the team's jobs go first there and reclaim GPUs by preemption. `may_exempt_preemption` lets
    the team's jobs ask `preemptible: false`."""
    team = team_by_name(session, team_name)
    changes = {
        "max_running_jobs": max_running_jobs,
        "max_queued_jobs": max_queued_jobs,
        "max_storage_bytes": max_storage_bytes,
        "share_weight": share_weight,
        "max_gpus": max_gpus,
        "guaranteed_gpus": guaranteed_gpus,
        "may_exempt_preemption": may_exempt_preemption,
    }
    if all(value is None for value in changes.values()):
        raise AdminError(f"give at least one of {', '.join(changes)}")
    for field, value in changes.items():
        if value is None:
            continue
        if field == "may_exempt_preemption":
            if not isinstance(value, bool):
                raise AdminError(f"{field}: must be true or false", field)
        elif field == "share_weight":
            if not (math.isfinite(value) and 0 < value <= MAX_SHARE_WEIGHT):
                raise AdminError(f"{field}: must be a number above 0 and at most {MAX_SHARE_WEIGHT:g}", field)
        elif isinstance(value, bool) or not isinstance(value, int):
            raise AdminError(f"{field}: must be an integer", field)
        elif field == "guaranteed_gpus":
            if not 0 <= value <= MAX_JOBS:
                raise AdminError(f"{field}: must be from 0 to {MAX_JOBS}", field)
        elif field == "max_gpus":
            if not -1 <= value <= MAX_JOBS:
                raise AdminError(f"{field}: must be from 0 to {MAX_JOBS}, or -1 for no limit", field)
        elif not 0 <= value <= (MAX_STORAGE_BYTES if field == "max_storage_bytes" else MAX_JOBS):
            top = MAX_STORAGE_BYTES if field == "max_storage_bytes" else MAX_JOBS
            raise AdminError(f"{field}: must be from 0 to {top}", field)
    for field, value in changes.items():
        if value is None:
            continue
        if field == "guaranteed_gpus":
            quota = session.get(TeamQuota, (team.id, pool))
            if value == 0 and quota is not None:
                session.delete(quota)
            elif value and quota is None:
                session.add(TeamQuota(team_id=team.id, pool=pool, guaranteed_gpus=int(value)))
            elif value and quota is not None:
                quota.guaranteed_gpus = int(value)
        else:
            setattr(team, field, None if field == "max_gpus" and value == -1 else value)
    session.commit()
    return team





def list_models(session: Session) -> list[RegisteredModel]:
    return list(session.scalars(select(RegisteredModel).order_by(RegisteredModel.pk)))


def check_model_source(settings: Settings, source: str) -> str:
    """`source` resolved (symlinks and `..` followed) if it is a model directory (one with a
    config.json) or a .gguf file inside one of the model roots (TUNEPOOL_MODEL_ROOTS); AdminError
    naming `source` otherwise. Registration is the only check between an admin's string and what
    workers open, so nothing outside the roots (/etc/shadow, /root, a file of keys) gets in."""
    roots = settings.model_root_paths
    shown = ", ".join(str(r) for r in roots)
    path = Path(source).expanduser()
    if not path.is_absolute():
        raise AdminError(
            f"source: give the absolute path of a model directory or .gguf file under the model roots "
            f"({shown}; TUNEPOOL_MODEL_ROOTS), got {source!r}",
            "source",
        )
    resolved = path.resolve()
    inside = [r for r in roots if resolved.is_relative_to(r.resolve())]
    if not inside:
        raise AdminError(
            f"source: {source!r} is not under a model root ({shown}; TUNEPOOL_MODEL_ROOTS)"
            + (f"; it resolves to {str(resolved)!r}" if resolved != path else ""),
            "source",
        )
    if resolved.is_file() and resolved.suffix.lower() == ".gguf":
        return str(resolved)
    if resolved.is_dir() and (resolved / "config.json").is_file():
        return str(resolved)
    what = "does not exist"
    if resolved.exists():
        what = "is neither a .gguf file nor a directory with a config.json"
    raise AdminError(f"source: {source!r} {what}", "source")


def add_model(
    session: Session, settings: Settings, name: str, source: str, pool: str | None = None
) -> RegisteredModel:
    """Register a base model, or update the source (and pool, if given) of a registered one.

    Registering a model in a pool declares the pool (service/pools.py)."""
    name, source = name.strip(), source.strip()
    if not name or len(name) > 128 or name.startswith("ft:") or any(c.isspace() or c == "\x00" for c in name):
        raise AdminError("name: 1 to 128 characters, no spaces, not starting with 'ft:'", "name")
    if not source or len(source) > 1024 or "\x00" in source:
        raise AdminError("source: a model directory or a .gguf path (up to 1024 characters)", "source")
    from service.pools import check_pool_name, declare_pool  # pools imports this module's AdminError

    if pool is not None:
        check_pool_name(pool, "pool")
    source = check_model_source(settings, source)
    existing = session.scalar(select(RegisteredModel).where(RegisteredModel.name == name))
    if existing is not None:
        existing.source, existing.pool = source, pool or existing.pool
        declare_pool(session, existing.pool, "model")
        session.commit()
        return existing
    model = RegisteredModel(name=name, source=source, pool=pool or settings.default_pool)
    session.add(model)
    declare_pool(session, model.pool, "model")
    session.commit()
    return model


def remove_model(session: Session, name: str) -> None:
    """Unregister a base model; jobs that already started from it keep their resolved source."""
    model = session.scalar(select(RegisteredModel).where(RegisteredModel.name == name))
    if model is None:
        raise AdminError(f"model: no registered model named {name!r}", "model", 404)
    session.delete(model)
    session.commit()
