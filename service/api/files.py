"""Files: upload (streamed and validated), list, retrieve, content, delete."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/v1/files", tags=["files"])
