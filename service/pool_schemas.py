"""Schemas of GET /v1/pool (extension): the pool as one team (or an admin) may see it.

A team key sees its own jobs by id and every other team's only as occupied GPUs ("another team"):
no other team's job id, name or metadata appears anywhere in these objects. An admin key sees every
job's id and team, and a row per team (`teams`). Built by service/pool_view.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class PoolGpus(BaseModel):
    """GPU slots of the pool's live nodes (heartbeat within TUNEPOOL_LEASE_S)."""

    total: int
    busy: int = Field(description="slots minus free slots, as the nodes last reported them")
    free: int


class PoolQueue(BaseModel):
    """The pool's queue, every team's jobs together (counts only)."""

    jobs: int = Field(description="queued jobs")
    gpus: int = Field(description="GPUs they ask for (the sum of their `gpus`)")


class PoolNodeJob(BaseModel):
    """A running job holding slots of a node."""

    id: str | None = Field(description="the job's id when it is the caller's team's (an admin: every job)")
    team: str | None = Field(description="its team's name, under the same rule; null: another team's")
    own: bool = Field(description="the caller's team's job")
    gpus: int = Field(description="slots of this node it holds")


class PoolNode(BaseModel):
    """A live worker (one per node) and what runs on it."""

    id: str
    hostname: str
    gpu_name: str = Field(description="the GPU model, or `cpu`")
    slots: int
    free_slots: int
    last_heartbeat_at: float
    jobs: list[PoolNodeJob] = Field(description="running jobs whose worker is this node, oldest first")


class PoolQueuedJob(BaseModel):
    """A queued job: the caller's team's (an admin: every team's)."""

    id: str
    team: str
    gpus: int
    priority: int
    created_at: int
    queue_position: int = Field(description="1-based place in the pool's queue (priority, then age)")
    queue_reason: str | None = Field(description="why it waits, as the scheduler last saw it; null: not yet")


class PoolTeamShare(BaseModel):
    """One team in one pool: what it runs, has used, is owed and waits for."""

    name: str
    gpus_running: int = Field(description="GPUs of its running jobs in the pool")
    usage_gpu_seconds: float = Field(
        description="its GPU-seconds in the pool, decayed to now (half life TUNEPOOL_FAIRSHARE_HALF_LIFE_S), "
        "running jobs included: what the scheduler orders teams by"
    )
    share_weight: float
    guaranteed_gpus: int = Field(description="GPUs guaranteed to it in the pool (0: none)")
    share: float = Field(description="its fraction of the GPUs that running jobs hold in the pool (0 to 1)")
    fair_share: float = Field(
        description="its weight over the weights of the teams with running or queued jobs in the pool, "
        "itself included (0 to 1)"
    )
    fair_share_gpus: float = Field(description="fair_share times the pool's total GPUs")
    queued_jobs: int
    queued_gpus: int


class PoolView(BaseModel):
    """One pool: its nodes, GPUs and queue, and the caller's team's place in it."""

    object: Literal["pool.view"] = "pool.view"
    name: str
    description: str | None
    gpus: PoolGpus
    queue: PoolQueue
    nodes: list[PoolNode]
    team: PoolTeamShare = Field(description="the caller's team in this pool")
    queued_jobs: list[PoolQueuedJob] = Field(
        description="the caller's team's queued jobs (an admin: every team's) in queue order, at most "
        "the first 500"
    )
    teams: list[PoolTeamShare] | None = Field(
        None,
        description="admin keys only: every team with running or queued jobs, usage or a guarantee "
        "in the pool (null for a team key)",
    )


class PoolViewList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PoolView]
    has_more: bool = False
