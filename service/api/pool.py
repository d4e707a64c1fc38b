"""GET /v1/pool (extension): the pool's nodes, GPUs and queue, and the caller's team's share of it.

Any key: a team key sees its own jobs by id and other teams' only as occupied GPUs; an admin key sees
every job and a row per team. The view itself is service/pool_view.py (the dashboard's Pool page
draws the same object).
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends

from service.api.deps import SessionDep, SettingsDep, get_auth
from service.errors import AUTH_ERRORS, error_responses
from service.models import ApiKey, Team
from service.pool_schemas import PoolViewList
from service.pool_view import pool_view

router = APIRouter(prefix="/v1/pool", tags=["pool"], responses=error_responses(*AUTH_ERRORS))

Auth = Annotated[tuple[Team, ApiKey], Depends(get_auth)]


@router.get(
    "",
    response_model=PoolViewList,
    summary="Each pool's nodes and slots, GPUs total/busy/free, queue, and the team's share (extension)",
)
def get_pool(session: SessionDep, settings: SettingsDep, auth: Auth) -> PoolViewList:
    team, key = auth
    return pool_view(
        session,
        team,
        admin=key.is_admin,
        now=time.time(),
        lease_s=settings.lease_s,
        half_life_s=settings.fairshare_half_life_s,
    )
