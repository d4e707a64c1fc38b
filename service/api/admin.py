"""/v1/admin: teams, keys, quotas and the model registry (admin keys only).

Every route is a thin wrapper over service/teams.py, which `tunepool admin ...` uses too; an
AdminError from there answers with its status and names its param. Keys appear in exactly two
responses (a new team, a new key) and nowhere else: not in errors, not in logs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import APIRouter, Request

from service import pools, teams
from service.admin_schemas import (
    ApiKeyCreated,
    ApiKeyList,
    ApiKeyObject,
    KeyCreate,
    ModelCreate,
    ModelDeleted,
    PoolCreate,
    PoolDeleted,
    PoolList,
    PoolObject,
    QuotaUpdate,
    RegisteredModelList,
    RegisteredModelObject,
    TeamCreate,
    TeamCreated,
    TeamList,
    TeamObject,
    key_object,
    model_object,
    pool_object,
    team_object,
)
from service.api.deps import AdminTeam, SessionDep, SettingsDep
from service.errors import AUTH_ERRORS, APIError, error_responses

router = APIRouter(
    prefix="/v1/admin",
    tags=["admin"],
    responses=error_responses(*AUTH_ERRORS, 403),  # 403: a key, but not an admin key
)
_NO_SUCH = error_responses(404)  # no team, key prefix or model of that name
_CODES = {404: "not_found", 409: "already_exists"}


@contextmanager
def admin_errors() -> Iterator[None]:
    """AdminError -> the OpenAI-style error of its status (and code), naming its param."""
    try:
        yield
    except teams.AdminError as err:
        code = err.code or _CODES.get(err.status, "invalid_value")
        raise APIError(err.status, str(err), param=err.param, code=code) from None


def _created_key(session: SessionDep, key: str) -> ApiKeyCreated:
    record = teams.key_by_prefix(session, teams.prefix_of(key))
    return ApiKeyCreated(**key_object(record).model_dump(), key=key)


def _team(session: SessionDep, name: str) -> TeamObject:
    return team_object(teams.list_teams(session, name)[0])


@router.post(
    "/teams",
    response_model=TeamCreated,
    summary="Create a team and its first API key",
    responses=error_responses(409),  # the name is taken
)
def create_team(
    body: TeamCreate, session: SessionDep, settings: SettingsDep, _admin: AdminTeam
) -> TeamCreated:
    with admin_errors():
        team, key = teams.create_team(session, settings, body.name, admin=body.admin)
        return TeamCreated(**_team(session, team.name).model_dump(), api_key=_created_key(session, key))


@router.get("/teams", response_model=TeamList, summary="List teams with their quotas and usage")
def list_teams(session: SessionDep, _admin: AdminTeam) -> TeamList:
    return TeamList(data=[team_object(usage) for usage in teams.list_teams(session)])


@router.get("/teams/{name}", response_model=TeamObject, summary="Retrieve a team", responses=_NO_SUCH)
def get_team(name: str, session: SessionDep, _admin: AdminTeam) -> TeamObject:
    with admin_errors():
        return _team(session, name)


@router.patch(
    "/teams/{name}/quota", response_model=TeamObject, summary="Change a team's quotas", responses=_NO_SUCH
)
def set_quota(
    name: str, body: QuotaUpdate, request: Request, session: SessionDep, _admin: AdminTeam
) -> TeamObject:
    with admin_errors():
        team = teams.set_quota(session, name, **body.model_dump(exclude_none=True))
    # This process forgets the team's cached quotas at once; other API processes within
    # TUNEPOOL_AUTH_CACHE_SECONDS (job creation re-reads them under the team lock anyway).
    request.app.state.auth_cache.drop_team(team.id)
    with admin_errors():
        return _team(session, team.name)


@router.get(
    "/teams/{name}/keys",
    response_model=ApiKeyList,
    summary="List a team's keys (prefixes)",
    responses=_NO_SUCH,
)
def list_keys(name: str, session: SessionDep, _admin: AdminTeam) -> ApiKeyList:
    with admin_errors():
        return ApiKeyList(data=[key_object(k) for k in teams.list_keys(session, name)])


@router.post(
    "/teams/{name}/keys",
    response_model=ApiKeyCreated,
    summary="Create another key for a team",
    responses=_NO_SUCH,
)
def create_key(
    name: str, session: SessionDep, _admin: AdminTeam, body: KeyCreate | None = None
) -> ApiKeyCreated:
    with admin_errors():
        key = teams.new_key(session, name, admin=body.admin if body else False)
        return _created_key(session, key)


@router.post(
    "/keys/{prefix}/revoke",
    response_model=ApiKeyObject,
    summary="Revoke a key (by its prefix)",
    responses=_NO_SUCH,
)
def revoke_key(prefix: str, request: Request, session: SessionDep, _admin: AdminTeam) -> ApiKeyObject:
    with admin_errors():
        record = teams.revoke_key(session, prefix)
    request.app.state.auth_cache.drop_prefix(prefix)  # this process forgets it at once
    return key_object(record)


@router.get("/models", response_model=RegisteredModelList, summary="List registered base models")
def list_models(session: SessionDep, _admin: AdminTeam) -> RegisteredModelList:
    return RegisteredModelList(data=[model_object(m) for m in teams.list_models(session)])


@router.post("/models", response_model=RegisteredModelObject, summary="Register (or update) a base model")
def add_model(
    body: ModelCreate, session: SessionDep, settings: SettingsDep, _admin: AdminTeam
) -> RegisteredModelObject:
    with admin_errors():
        return model_object(teams.add_model(session, settings, body.name, body.source, body.pool))


@router.delete(
    "/models/{name:path}", response_model=ModelDeleted, summary="Unregister a base model", responses=_NO_SUCH
)
def remove_model(name: str, session: SessionDep, _admin: AdminTeam) -> ModelDeleted:
    with admin_errors():
        teams.remove_model(session, name)
        return ModelDeleted(id=name)


@router.get("/pools", response_model=PoolList, summary="List the pools jobs may name")
def list_pools(session: SessionDep, _admin: AdminTeam) -> PoolList:
    return PoolList(data=[pool_object(p) for p in pools.list_pools(session)])


@router.post(
    "/pools",
    response_model=PoolObject,
    summary="Declare a pool (or update its description); jobs may name only declared pools",
)
def add_pool(body: PoolCreate, session: SessionDep, _admin: AdminTeam) -> PoolObject:
    with admin_errors():
        pool = pools.declare_pool(session, body.name.strip(), "admin", body.description)
        session.commit()
        return pool_object(pool)


@router.delete(
    "/pools/{name}",
    response_model=PoolDeleted,
    summary="Forget a pool that no model and no unfinished job uses",
    responses=error_responses(404, 409),
)
def remove_pool(name: str, session: SessionDep, _admin: AdminTeam) -> PoolDeleted:
    with admin_errors():
        pools.remove_pool(session, name)
        return PoolDeleted(id=name)
