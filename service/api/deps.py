"""Request dependencies: `SessionDep`, `CurrentTeam`, `AdminTeam`, `SettingsDep`, `StorageDep`; and
`authenticate_request`, the key check (with the bad-key rate limit) that the dashboard uses too.

The ones that do no blocking I/O are `async def`: each sync dependency costs a thread-pool hop.
Authentication runs on the async engine, so it never holds a thread or a sync connection."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from service.auth import authenticate
from service.db import Database
from service.errors import APIError
from service.models import ApiKey, Team
from service.ratelimit import FailureLimiter, client_address, retry_after_header
from service.settings import Settings
from service.storage import Storage


def get_database(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


async def get_database_dep(request: Request) -> Database:
    return get_database(request)


@asynccontextmanager
async def sync_session(db: Database) -> AsyncIterator[Session]:
    """A sync session, once one of the database's slots is free (see Database); the slot and the
    connection go back when the block ends. For work between client waits (an upload's quota read,
    then its commit) that must not hold a slot while the client sends or reads."""
    async with db.slots:
        session = db.sessions()
        try:
            yield session
        finally:
            await run_in_threadpool(session.close)


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A sync session for the endpoint function only (SessionDep is function-scoped): its slot and
    connection go back as soon as the endpoint returns, before the response is sent, so a client
    that reads slowly (a download, an event stream) or not at all never holds one."""
    async with sync_session(get_database(request)) as session:
        yield session


async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_storage(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


# scope="function": FastAPI runs the exit code when the endpoint returns, not after the response.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
StorageDep = Annotated[Storage, Depends(get_storage)]
DatabaseDep = Annotated[Database, Depends(get_database_dep)]  # for `async with db.read()`

_UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}


def count_failed_key(request: Request) -> None:
    """Count a bad key against the client's address; a 429 once it has sent too many lately."""
    limiter: FailureLimiter = request.app.state.auth_failures
    wait_s = limiter.record_failure(client_address(request.client.host if request.client else ""))
    if wait_s is not None:
        raise APIError(
            429,
            f"Too many requests with an invalid API key from this address; retry after "
            f"{retry_after_header(wait_s)} s (valid keys are not limited)",
            code="rate_limited",
            headers={"Retry-After": retry_after_header(wait_s)},
        )


async def authenticate_request(request: Request, key: str) -> tuple[Team, ApiKey] | None:
    """The team and key record of a key presented with a request, or None for a bad key, which is
    counted against the client (429 past the limit). A valid key costs no more than `authenticate`:
    the limiter is only consulted on failure."""
    found = await authenticate(get_database(request), key, request.app.state.auth_cache)
    if found is None:
        count_failed_key(request)
    return found


async def get_auth(request: Request) -> tuple[Team, ApiKey]:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if not header:
        raise APIError(
            401,
            "You didn't provide an API key: send 'Authorization: Bearer <key>'",
            code="missing_api_key",
            headers=_UNAUTHORIZED,
        )
    # Another scheme is a bad key too (counted like one); a valid key's path is unchanged.
    found = await authenticate_request(request, key.strip() if scheme.lower() == "bearer" else "")
    if found is None:
        # Never echo the presented key back: it may be a real key of something else.
        raise APIError(401, "Incorrect API key provided", code="invalid_api_key", headers=_UNAUTHORIZED)
    return found


# Called directly rather than through a `Depends(get_auth)` level: each level costs a dependency
# resolution on every request, and the job poll is the hottest path there is.
async def get_current_team(request: Request) -> Team:
    return (await get_auth(request))[0]


async def get_admin_team(request: Request) -> Team:
    team, key = await get_auth(request)
    if not key.is_admin:
        raise APIError(403, "This endpoint needs an admin API key", code="not_admin")
    return team


CurrentTeam = Annotated[Team, Depends(get_current_team)]
AdminTeam = Annotated[Team, Depends(get_admin_team)]
