"""Request dependencies: `SessionDep`, `CurrentTeam`, `AdminTeam`, `SettingsDep`, `StorageDep`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from service.auth import authenticate
from service.db import Database
from service.errors import APIError
from service.models import ApiKey, Team
from service.settings import Settings
from service.storage import Storage


def get_database(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


def get_session(request: Request) -> Iterator[Session]:
    with get_database(request).session() as session:
        yield session


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_storage(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
StorageDep = Annotated[Storage, Depends(get_storage)]

_UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}


def get_auth(request: Request, session: SessionDep) -> tuple[Team, ApiKey]:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if not header:
        raise APIError(
            401,
            "You didn't provide an API key: send 'Authorization: Bearer <key>'",
            code="missing_api_key",
            headers=_UNAUTHORIZED,
        )
    found = authenticate(session, key.strip()) if scheme.lower() == "bearer" else None
    if found is None:
        # Never echo the presented key back: it may be a real key of something else.
        raise APIError(401, "Incorrect API key provided", code="invalid_api_key", headers=_UNAUTHORIZED)
    return found


def get_current_team(auth: Annotated[tuple[Team, ApiKey], Depends(get_auth)]) -> Team:
    return auth[0]


def get_admin_team(auth: Annotated[tuple[Team, ApiKey], Depends(get_auth)]) -> Team:
    if not auth[1].is_admin:
        raise APIError(403, "This endpoint needs an admin API key", code="not_admin")
    return auth[0]


CurrentTeam = Annotated[Team, Depends(get_current_team)]
AdminTeam = Annotated[Team, Depends(get_admin_team)]
