"""Teams, keys, quotas and the model registry: what admins manage (CLI and /v1/admin alike)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.auth import create_key
from service.models import ApiKey, RegisteredModel, Team, now_s
from service.settings import Settings


class AdminError(ValueError):
    """A request an admin made that cannot be carried out; `param` names the field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


def create_team(session: Session, settings: Settings, name: str, *, admin: bool = False) -> tuple[Team, str]:
    """A new team with the default quotas and its first key (returned in clear, once)."""
    name = name.strip()
    if not name or len(name) > 64:
        raise AdminError("name: 1 to 64 characters", "name")
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
    session.flush()
    key = create_key(session, team, is_admin=admin)
    session.commit()
    return team, key


def team_by_name(session: Session, name: str) -> Team:
    team = session.scalar(select(Team).where(Team.name == name))
    if team is None:
        raise AdminError(f"team: no team named {name!r}", "team", 404)
    return team


def new_key(session: Session, team_name: str, *, admin: bool = False) -> str:
    key = create_key(session, team_by_name(session, team_name), is_admin=admin)
    session.commit()
    return key


def revoke_key(session: Session, prefix: str) -> ApiKey:
    record = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if record is None:
        raise AdminError(f"prefix: no key with prefix {prefix!r}", "prefix", 404)
    if record.revoked_at is None:
        record.revoked_at = now_s()
        session.commit()
    return record


def set_quota(
    session: Session,
    team_name: str,
    *,
    max_running_jobs: int | None = None,
    max_queued_jobs: int | None = None,
    max_storage_bytes: int | None = None,
    share_weight: float | None = None,
) -> Team:
    team = team_by_name(session, team_name)
    for field, value in (
        ("max_running_jobs", max_running_jobs),
        ("max_queued_jobs", max_queued_jobs),
        ("max_storage_bytes", max_storage_bytes),
        ("share_weight", share_weight),
    ):
        if value is None:
            continue
        if value < 0 or (field == "share_weight" and value == 0):
            raise AdminError(f"{field}: must be positive", field)
        setattr(team, field, value)
    session.commit()
    return team


def add_model(
    session: Session, settings: Settings, name: str, source: str, pool: str | None = None
) -> RegisteredModel:
    name, source = name.strip(), source.strip()
    if not name or len(name) > 128 or name.startswith("ft:") or "\x00" in name:
        raise AdminError("name: 1 to 128 characters, not starting with 'ft:'", "name")
    if not source:
        raise AdminError("source: a model directory, a hub id or a .gguf path", "source")
    existing = session.scalar(select(RegisteredModel).where(RegisteredModel.name == name))
    if existing is not None:
        existing.source, existing.pool = source, pool or existing.pool
        session.commit()
        return existing
    model = RegisteredModel(name=name, source=source, pool=pool or settings.default_pool)
    session.add(model)
    session.commit()
    return model
