"""/v1/webhooks: a team's webhook endpoints and their delivery attempts (service/webhook_sender.py sends).

The secret that signs an endpoint's deliveries is shown once, when it is created or rotated, and
stored encrypted (service/secretbox.py). A URL whose host is, or resolves only to, an address
webhooks may not reach (service/netguard.py) is refused; a team has at most
TUNEPOOL_WEBHOOK_MAX_ENDPOINTS endpoints. Another team's endpoint id answers the same 404 as an id
that never existed.
"""

from __future__ import annotations

import math
import time
from typing import Annotated, Literal
from urllib.parse import urlsplit

import httpx
from fastapi import APIRouter, Query
from pydantic import BaseModel, Field, field_validator
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from service.api.deps import CurrentTeam, SessionDep, SettingsDep
from service.db import lock_team
from service.errors import AUTH_ERRORS, APIError, error_responses, not_found
from service.models import Team, WebhookDelivery, WebhookEndpoint
from service.netguard import TargetPolicy, TargetRefused, check_registration, system_resolver
from service.secretbox import PLAINTEXT_PREFIX, secret_box
from service.settings import Settings
from service.webhooks import EVENT_TYPES, new_secret

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], responses=error_responses(*AUTH_ERRORS))

EventType = Literal["fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled"]
assert set(EventType.__args__) == set(EVENT_TYPES.values())  # type: ignore[attr-defined]


class WebhookCreate(BaseModel):
    url: str = Field(
        max_length=2048,
        description="http(s) URL that receives a POST per event",
        # What _http_url checks, declared for the document (its message stays the one below).
        json_schema_extra={"pattern": "^https?://", "minLength": 10},
    )
    events: list[EventType] | None = Field(None, description="event types to send; omitted or empty: all")

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        # Deliveries are sent to the URL as it is: one httpx cannot parse (a NUL, a bad host name)
        # could never be delivered, nor one malformed for the standard library (`https://[x`).
        try:
            host = httpx.URL(url).host
            urlsplit(url)
        except (httpx.InvalidURL, ValueError):
            host = ""
        if not url.startswith(("http://", "https://")) or len(url) < 10 or not host:
            raise ValueError("must be an http:// or https:// URL")
        return url


class WebhookEndpointObject(BaseModel):
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    id: str
    url: str
    events: list[str] | None
    created_at: int
    secret: str | None = Field(
        None, description="whsec_...: shown only in the response that created or rotated it"
    )
    previous_secret_expires_at: int | None = Field(
        None, description="unix seconds until which the secret a rotation replaced still signs deliveries"
    )


class WebhookSecretRotation(BaseModel):
    grace_period_seconds: int | None = Field(
        None,
        ge=0,
        description="how long the replaced secret keeps signing deliveries beside the new one; at most, "
        "and by default, the server's TUNEPOOL_WEBHOOK_SECRET_GRACE_S (24 h); 0 revokes it at once",
    )


class WebhookEndpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookEndpointObject]
    has_more: bool = False


class WebhookEndpointDeleted(BaseModel):
    object: Literal["webhook_endpoint.deleted"] = "webhook_endpoint.deleted"
    id: str
    deleted: bool = True


class WebhookDeliveryObject(BaseModel):
    object: Literal["webhook.delivery"] = "webhook.delivery"
    id: str
    endpoint_id: str
    event_id: str
    event_type: str
    job_id: str
    status: str = Field(description="pending | delivered | failed")
    attempts: int
    last_response_code: int | None
    last_error: str | None
    next_attempt_at: int | None = Field(description="unix seconds of the next try; null once settled")
    created_at: int
    delivered_at: int | None


class WebhookDeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookDeliveryObject]
    has_more: bool


def endpoint_object(endpoint: WebhookEndpoint, *, secret: str | None = None) -> WebhookEndpointObject:
    expires = endpoint.previous_secret_expires_at
    if expires is not None and expires <= time.time():
        expires = None  # past: the replaced secret signs nothing any more
    return WebhookEndpointObject(
        id=endpoint.id,
        url=endpoint.url,
        events=endpoint.events,
        created_at=endpoint.created_at,
        secret=secret,
        previous_secret_expires_at=math.ceil(expires) if expires is not None else None,
    )


def check_target(settings: Settings, url: str) -> None:
    """400 naming `url` when its host is, or resolves only to, addresses webhooks may not reach."""
    try:
        check_registration(httpx.URL(url).raw_host.decode("ascii"), policy(settings), system_resolver)
    except TargetRefused as err:
        raise APIError(
            400,
            f"url: {err} (loopback, private, link-local and other non-public addresses are refused "
            "unless the operator allows them with TUNEPOOL_WEBHOOK_ALLOW_CIDRS)",
            param="url",
            code="url_not_allowed",
        ) from None


def policy(settings: Settings) -> TargetPolicy:
    return TargetPolicy.from_text(settings.webhook_allow_cidrs)


def own_endpoint(session: Session, team: Team, endpoint_id: str) -> WebhookEndpoint:
    endpoint = session.scalar(
        select(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.team_id == team.id)
    )
    if endpoint is None:
        raise not_found("webhook endpoint", endpoint_id, "webhook_id")
    return endpoint


@router.post(
    "",
    response_model=WebhookEndpointObject,
    summary="Register a webhook endpoint (secret shown once)",
    responses=error_responses(400, 409),  # 409: the team has TUNEPOOL_WEBHOOK_MAX_ENDPOINTS already
)
def create_webhook(
    body: WebhookCreate, session: SessionDep, team: CurrentTeam, settings: SettingsDep
) -> WebhookEndpointObject:
    check_target(settings, body.url)
    lock_team(session, team.id)  # concurrent creates count one after the other
    count = session.scalar(
        select(func.count()).select_from(WebhookEndpoint).where(WebhookEndpoint.team_id == team.id)
    )
    limit = settings.webhook_max_endpoints
    if int(count or 0) >= limit:
        raise APIError(
            409,
            f"Your team has {count} webhook endpoints, its limit of {limit} "
            "(TUNEPOOL_WEBHOOK_MAX_ENDPOINTS); delete one before adding another",
            code="webhook_endpoint_limit",
        )
    events = sorted(set(body.events)) if body.events else None
    secret = new_secret()
    endpoint = WebhookEndpoint(
        team_id=team.id, url=body.url, events=events, secret=secret_box(settings).seal(secret)
    )
    session.add(endpoint)
    session.commit()
    return endpoint_object(endpoint, secret=secret)


@router.post(
    "/{webhook_id}/rotate_secret",
    response_model=WebhookEndpointObject,
    summary="Replace the signing secret (new one shown once; the old one signs too for a grace period)",
    responses=error_responses(400, 404),
)
def rotate_webhook_secret(
    webhook_id: str,
    session: SessionDep,
    team: CurrentTeam,
    settings: SettingsDep,
    body: WebhookSecretRotation | None = None,
) -> WebhookEndpointObject:
    endpoint = own_endpoint(session, team, webhook_id)
    grace = settings.webhook_secret_grace_s
    if body is not None and body.grace_period_seconds is not None:
        if body.grace_period_seconds > grace:
            raise APIError(
                400,
                f"grace_period_seconds may be at most {grace:g} (TUNEPOOL_WEBHOOK_SECRET_GRACE_S)",
                param="grace_period_seconds",
                code="invalid_value",
            )
        grace = body.grace_period_seconds
    box = secret_box(settings)
    old = endpoint.secret
    if old.startswith(PLAINTEXT_PREFIX):  # stored before secrets were encrypted
        old = box.seal(old)
    # A secret still in an earlier rotation's grace period stops signing now: two at most.
    endpoint.previous_secret = old if grace > 0 else None
    endpoint.previous_secret_expires_at = time.time() + grace if grace > 0 else None
    secret = new_secret()
    endpoint.secret = box.seal(secret)
    session.commit()
    return endpoint_object(endpoint, secret=secret)


@router.get("", response_model=WebhookEndpointList, summary="List the team's webhook endpoints")
def list_webhooks(session: SessionDep, team: CurrentTeam) -> WebhookEndpointList:
    endpoints = session.scalars(
        select(WebhookEndpoint).where(WebhookEndpoint.team_id == team.id).order_by(WebhookEndpoint.pk.desc())
    ).all()
    return WebhookEndpointList(data=[endpoint_object(e) for e in endpoints])


@router.delete(
    "/{webhook_id}",
    response_model=WebhookEndpointDeleted,
    summary="Delete an endpoint",
    responses=error_responses(404),
)
def delete_webhook(webhook_id: str, session: SessionDep, team: CurrentTeam) -> WebhookEndpointDeleted:
    endpoint = own_endpoint(session, team, webhook_id)
    # Its pending deliveries go with it (explicitly: not every SQLite connection enforces CASCADE).
    session.execute(delete(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint.id))
    session.delete(endpoint)
    session.commit()
    return WebhookEndpointDeleted(id=webhook_id)


@router.get(
    "/{webhook_id}/deliveries",
    response_model=WebhookDeliveryList,
    summary="Delivery attempts of an endpoint, newest first",
    responses=error_responses(404),  # no such endpoint, or `after` is not one of its deliveries
)
def list_deliveries(
    webhook_id: str,
    session: SessionDep,
    team: CurrentTeam,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(description="a delivery id: list the ones older than it")] = None,
) -> WebhookDeliveryList:
    endpoint = own_endpoint(session, team, webhook_id)
    D = WebhookDelivery
    query = select(D).where(D.endpoint_id == endpoint.id)
    if after is not None:
        cursor = session.scalar(select(D.pk).where(D.id == after, D.endpoint_id == endpoint.id))
        if cursor is None:
            raise not_found("webhook delivery", after, "after")
        query = query.where(D.pk < cursor)
    rows = session.scalars(query.order_by(D.pk.desc()).limit(limit + 1)).all()
    data = [
        WebhookDeliveryObject(
            id=d.id,
            endpoint_id=d.endpoint_id,
            event_id=d.event_id,
            event_type=d.event_type,
            job_id=d.job_id,
            status=d.status,
            attempts=d.attempts,
            last_response_code=d.last_response_code,
            last_error=d.last_error,
            next_attempt_at=math.ceil(d.next_attempt_at) if d.next_attempt_at is not None else None,
            created_at=d.created_at,
            delivered_at=d.delivered_at,
        )
        for d in rows[:limit]
    ]
    return WebhookDeliveryList(data=data, has_more=len(rows) > limit)
