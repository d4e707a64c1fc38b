"""GET /v1/models: the registered base models plus the team's own fine-tuned models."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select

from service.api.deps import CurrentTeam, SessionDep
from service.errors import AUTH_ERRORS, error_responses, not_found
from service.models import Job, RegisteredModel
from service.schemas import ModelList, ModelObject

router = APIRouter(prefix="/v1/models", tags=["models"], responses=error_responses(*AUTH_ERRORS))


def _models(session: SessionDep, team: CurrentTeam) -> list[ModelObject]:
    base = [
        ModelObject(id=m.name, created=m.created_at, owned_by="tunepool")
        for m in session.scalars(select(RegisteredModel).order_by(RegisteredModel.pk))
    ]
    tuned = session.execute(
        select(Job.fine_tuned_model, Job.finished_at, Job.created_at)
        .where(Job.team_id == team.id, Job.status == "succeeded", Job.fine_tuned_model.is_not(None))
        .order_by(Job.pk)
    )
    return base + [
        ModelObject(id=name, created=finished or created, owned_by=team.id)
        for name, finished, created in tuned
    ]


@router.get("", response_model=ModelList, summary="List models a job may start from")
def list_models(session: SessionDep, team: CurrentTeam) -> ModelList:
    return ModelList(data=_models(session, team))


@router.get(
    "/{model_id:path}", response_model=ModelObject, summary="Retrieve a model", responses=error_responses(404)
)
def get_model(model_id: str, session: SessionDep, team: CurrentTeam) -> ModelObject:
    for model in _models(session, team):
        if model.id == model_id:
            return model
    raise not_found("model", model_id, "model")
