"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from service.api.deps import SessionDep, SettingsDep
from service.dispatch import transport_options
from service.errors import error_response, error_responses

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def broker_reachable(broker_url: str, timeout_s: float) -> bool:
    from kombu import Connection

    try:
        options = transport_options(broker_url, timeout_s)
        with Connection(broker_url, connect_timeout=timeout_s, transport_options=options) as conn:
            conn.ensure_connection(max_retries=0, timeout=timeout_s)
        return True
    except Exception:
        return False


@router.get("/readyz", summary="Database and broker are reachable", responses=error_responses(503))
def readyz(session: SessionDep, settings: SettingsDep) -> JSONResponse:
    down = []
    try:
        session.execute(text("SELECT 1"))
    except Exception:
        down.append("database")
    if not broker_reachable(settings.broker_url, settings.broker_timeout_s):
        down.append("broker")
    if down:
        return error_response(503, f"not ready: {' and '.join(down)} unreachable", code="not_ready")
    return JSONResponse({"status": "ready", "database": "ok", "broker": "ok"})
