"""Schemas of /v1/admin (and of `tunepool admin ... --json`): requests, responses, converters.

Requests only check types here (unknown fields are refused); ranges and names are checked by
service/teams.py, the one place the CLI and the API share.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from service.models import ApiKey, Pool, RegisteredModel, Team
from service.teams import MAX_JOBS, MAX_SHARE_WEIGHT, MAX_STORAGE_BYTES, TeamUsage

StrictInt = Annotated[int, Field(strict=True)]

# -- requests ---------------------------------------------------------------------------------


class TeamCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"name": "nlp", "admin": False}]}
    )

    name: str = Field(description="1-64 of A-Z a-z 0-9 . _ -")
    admin: bool = Field(False, description="give the team's first key admin rights")


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    admin: bool = Field(False, description="an admin key")


class QuotaUpdate(BaseModel):
    """Only the fields given change."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"max_running_jobs": 4, "share_weight": 2.0}]}
    )

    max_running_jobs: StrictInt | None = Field(None, description=f"0 to {MAX_JOBS}")
    max_queued_jobs: StrictInt | None = Field(None, description=f"0 to {MAX_JOBS}")
    max_storage_bytes: StrictInt | None = Field(None, description=f"0 to {MAX_STORAGE_BYTES}")
    share_weight: float | None = Field(
        None, allow_inf_nan=False, description=f"above 0, at most {MAX_SHARE_WEIGHT:g}"
    )
    max_gpus: StrictInt | None = Field(
        None,
        description=f"GPUs the team's running jobs may hold over all pools, 0 to {MAX_JOBS}; -1: no limit",
    )
    guaranteed_gpus: StrictInt | None = Field(
        None,
        description="GPUs guaranteed to the team in `pool` (0 removes the guarantee): below it its jobs go "
        "first there and reclaim GPUs from teams above their own guarantee by preemption",
    )
    pool: str = Field("default", description="the pool `guaranteed_gpus` is for")
    may_exempt_preemption: StrictBool | None = Field(
        None, description="whether the team's jobs may ask `preemptible: false`"
    )


class ModelCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"name": "smollm2-135m", "source": "/models/SmolLM2-135M-Instruct"}]},
    )

    name: str = Field(description="what a job's `model` names (not starting with 'ft:')")
    source: str = Field(
        description="absolute path of a model directory (with config.json) or a .gguf file, under one "
        "of the server's model roots (TUNEPOOL_MODEL_ROOTS)"
    )
    pool: str | None = Field(None, description="the pool its jobs go to (default: TUNEPOOL_DEFAULT_POOL)")


class PoolCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"name": "a100", "description": "8x A100 nodes"}]}
    )

    name: str = Field(description="1-64 of a-z 0-9 _ -, starting with a letter or digit")
    description: str | None = Field(None, max_length=512, description="what the pool's nodes are")


# -- responses --------------------------------------------------------------------------------


class Quota(BaseModel):
    max_running_jobs: int
    max_queued_jobs: int
    max_storage_bytes: int
    share_weight: float
    max_gpus: int | None = Field(description="GPUs running at once over all pools; null: no limit")
    guaranteed_gpus: dict[str, int] = Field(default_factory=dict, description="pool -> GPUs guaranteed there")
    may_exempt_preemption: bool = False


class Usage(BaseModel):
    running_jobs: int
    queued_jobs: int = Field(description="queued or validating_files")
    stored_bytes: int = Field(description="bytes of the team's files")


class TeamObject(BaseModel):
    id: str
    object: Literal["team"] = "team"
    name: str
    created_at: int
    quota: Quota
    usage: Usage


class TeamList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TeamObject]
    has_more: bool = False


class ApiKeyObject(BaseModel):
    """A key as listings show it: its prefix, never the key."""

    object: Literal["api_key"] = "api_key"
    prefix: str
    team_id: str
    is_admin: bool
    created_at: int
    last_used_at: int | None
    revoked_at: int | None


class ApiKeyCreated(ApiKeyObject):
    key: str = Field(description="the key itself: shown this once, stored only as a hash")


class ApiKeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ApiKeyObject]
    has_more: bool = False


class TeamCreated(TeamObject):
    api_key: ApiKeyCreated


class RegisteredModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tunepool"
    source: str
    pool: str


class RegisteredModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[RegisteredModelObject]
    has_more: bool = False


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


class PoolObject(BaseModel):
    id: str
    object: Literal["pool"] = "pool"
    created_at: int
    declared_by: Literal["admin", "model", "worker"]
    description: str | None


class PoolList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PoolObject]
    has_more: bool = False


class PoolDeleted(BaseModel):
    id: str
    object: Literal["pool"] = "pool"
    deleted: bool = True


# -- converters -------------------------------------------------------------------------------


def team_object(usage: TeamUsage) -> TeamObject:
    team = usage.team
    return TeamObject(
        id=team.id,
        name=team.name,
        created_at=team.created_at,
        quota=quota_of(team, usage.guaranteed_gpus),
        usage=Usage(
            running_jobs=usage.running_jobs, queued_jobs=usage.queued_jobs, stored_bytes=usage.stored_bytes
        ),
    )


def quota_of(team: Team, guaranteed_gpus: dict[str, int] | None = None) -> Quota:
    return Quota(
        max_running_jobs=team.max_running_jobs,
        max_queued_jobs=team.max_queued_jobs,
        max_storage_bytes=team.max_storage_bytes,
        share_weight=team.share_weight,
        max_gpus=team.max_gpus,
        guaranteed_gpus=dict(guaranteed_gpus or {}),
        may_exempt_preemption=team.may_exempt_preemption,
    )


def key_object(record: ApiKey) -> ApiKeyObject:
    return ApiKeyObject(
        prefix=record.prefix,
        team_id=record.team_id,
        is_admin=record.is_admin,
        created_at=record.created_at,
        last_used_at=record.last_used_at,
        revoked_at=record.revoked_at,
    )


def model_object(model: RegisteredModel) -> RegisteredModelObject:
    return RegisteredModelObject(
        id=model.name, created=model.created_at, source=model.source, pool=model.pool
    )


def pool_object(pool: Pool) -> PoolObject:
    return PoolObject(
        id=pool.name,
        created_at=pool.created_at,
        declared_by=pool.declared_by,
        description=pool.description,
    )
