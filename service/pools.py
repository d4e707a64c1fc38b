"""Pools: the names a job may give, and at most one pending dispatch message per pool.

A pool exists once it is declared: by an admin (`tunepool admin add-pool`, POST /v1/admin/pools), by
registering a model in it, or by a worker that serves it. A job naming any other pool is refused
(400 naming `pool`): nothing would ever take it, and it would wait for ever.

Dispatch messages say "a job may be waiting in this pool" (service/dispatch.py). A pool row records
when one was last sent and when a worker of the pool last took one; a message is *pending* while
it was sent after the last take. `request_dispatch` sends one only when none is pending, so a pool
with no worker (or only busy ones) holds one message in the broker, not one per job or per
reconciler round. A worker that takes a message wakes the next idle worker by requesting another
while queued jobs remain (worker/process.py `drain`), and the reconciler re-sends a message that
stayed pending while an idle worker of the pool was alive (the broker lost it).
"""

from __future__ import annotations

import re
import time

from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from service.db import rows_updated
from service.dispatch import send_dispatch
from service.models import Job, JobStatus, Pool, RegisteredModel, now_s
from service.schemas import POOL_PATTERN
from service.settings import Settings
from service.teams import AdminError

DECLARERS = ("admin", "model", "worker")
ACTIVE = (JobStatus.VALIDATING_FILES.value, JobStatus.QUEUED.value, JobStatus.RUNNING.value)


def check_pool_name(name: str, param: str = "name") -> str:
    """`name` if it is a pool name (the rule of a job's `pool`); AdminError naming `param` if not."""
    if not re.fullmatch(POOL_PATTERN, name):
        raise AdminError(f"{param}: 1 to 64 of a-z 0-9 _ -, starting with a letter or digit", param)
    return name


def declare_pool(session: Session, name: str, by: str, description: str | None = None) -> Pool:
    """The pool `name`, created if new (the caller commits). An admin's declaration also sets the
    description and marks the pool as the admin's; an implicit one (model, worker) changes nothing."""
    assert by in DECLARERS
    check_pool_name(name)
    # INSERT .. ON CONFLICT DO NOTHING: another process may declare the same pool at the same time.
    insert = postgresql_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    session.execute(
        insert(Pool)
        .values(name=name, declared_by=by, description=description, created_at=now_s())
        .on_conflict_do_nothing(index_elements=["name"])
    )
    pool = session.get(Pool, name, populate_existing=True)
    assert pool is not None
    if by == "admin":
        pool.declared_by = "admin"
        if description is not None:
            pool.description = description
    return pool


def pool_exists(session: Session, name: str) -> bool:
    return session.scalar(select(Pool.name).where(Pool.name == name)) is not None


def list_pools(session: Session) -> list[Pool]:
    return list(session.scalars(select(Pool).order_by(Pool.name)))


def remove_pool(session: Session, name: str) -> None:
    """Forget a pool, unless a registered model or an unfinished job still uses it (409)."""
    pool = session.get(Pool, name)
    if pool is None:
        raise AdminError(f"name: no pool named {name!r}", "name", 404)
    model = session.scalar(select(RegisteredModel.name).where(RegisteredModel.pool == name).limit(1))
    if model is not None:
        raise AdminError(
            f"name: model {model!r} is registered in pool {name!r}; move or remove it first",
            "name",
            409,
            "pool_in_use",
        )
    jobs = session.scalar(
        select(func.count()).select_from(Job).where(Job.pool == name, Job.status.in_(ACTIVE))
    )
    if jobs:
        raise AdminError(f"name: pool {name!r} has {jobs} unfinished jobs", "name", 409, "pool_in_use")
    session.delete(pool)
    session.commit()


def _not_pending() -> ColumnElement[bool]:
    return or_(
        Pool.dispatch_sent_at.is_(None),
        and_(Pool.dispatch_taken_at.is_not(None), Pool.dispatch_taken_at >= Pool.dispatch_sent_at),
    )


def request_dispatch(session: Session, settings: Settings, pool: str, *, force: bool = False) -> float | None:
    """Make sure a dispatch message for `pool` waits in the broker; the time it was sent (now, or
    earlier for one already pending), or None when the broker could not be reached.

    `force` sends even though one is pending (the reconciler, for a message the broker lost). Commits.
    """
    now = time.time()
    condition = [Pool.name == pool] if force else [Pool.name == pool, _not_pending()]
    won = rows_updated(session, update(Pool).where(*condition).values(dispatch_sent_at=now))
    session.commit()
    if not won:  # one is pending already (or the pool is unknown: no message is sent for it)
        return session.scalar(select(Pool.dispatch_sent_at).where(Pool.name == pool))
    if send_dispatch(settings, pool):
        return now
    # Not sent: undo the mark, so that the next request (or the reconciler) sends.
    rows_updated(
        session,
        update(Pool).where(Pool.name == pool, Pool.dispatch_sent_at == now).values(dispatch_sent_at=None),
    )
    session.commit()
    return None


def mark_dispatch_taken(session: Session, pool: str) -> None:
    """A worker of `pool` took its dispatch message (before it claims): the next request sends anew."""
    rows_updated(session, update(Pool).where(Pool.name == pool).values(dispatch_taken_at=time.time()))
    session.commit()


def dispatch_pending_since(session: Session, pool: str) -> float | None:
    """When the pool's pending message was sent, or None if none is pending."""
    row = session.execute(select(Pool.dispatch_sent_at).where(Pool.name == pool, ~_not_pending())).first()
    return None if row is None else row[0]


def wake_another_worker(session: Session, settings: Settings, pool: str) -> None:
    """Called by a worker that just claimed a job: if more jobs wait in the pool, a message for the
    next idle worker (sent only when none is pending already)."""
    waiting = session.scalar(
        select(Job.id).where(Job.pool == pool, Job.status == JobStatus.QUEUED.value).limit(1)
    )
    if waiting is not None:
        request_dispatch(session, settings, pool)
