"""/v1/admin: teams, keys, quotas and the model registry (admin keys only)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/v1/admin", tags=["admin"])
