"""Engines and sessions for SQLite (one machine, WAL mode) and PostgreSQL (psycopg 3), sync and async."""

from __future__ import annotations

import asyncio
import contextlib
import math
import sqlite3
import time
from collections import namedtuple
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, cast

import orjson
from sqlalchemy import CursorResult, Engine, Select, create_engine, event, update
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker

from service.settings import Settings


def _sqlite_path(url: str) -> str:
    return url.split("///", 1)[1] if "///" in url else ""


# The drivers' own errors: FastRead raises them unwrapped.
DRIVER_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error,)
with contextlib.suppress(ImportError):
    import psycopg

    DRIVER_ERRORS += (psycopg.Error,)


class DatabaseBusy(Exception):
    """No pooled connection became free within db_acquire_timeout_s (answered 503 database_busy)."""


class Slots(asyncio.Semaphore):
    """A FIFO semaphore whose `async with` waits at most `timeout_s`, then raises DatabaseBusy: a
    request never queues longer for a connection than a client would wait for its answer."""

    def __init__(self, value: int, timeout_s: float) -> None:
        super().__init__(value)
        self.timeout_s = timeout_s

    async def __aenter__(self) -> None:
        if not self.locked():  # a free permit and nobody queued: no timer to arm (the job poll's path)
            await self.acquire()
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.acquire()  # cancellation-safe: a permit granted as the timeout fires goes back
        except TimeoutError:
            raise DatabaseBusy(
                f"no database connection became free within {self.timeout_s:g} s "
                "(TUNEPOOL_DB_ACQUIRE_TIMEOUT_S)"
            ) from None


def _add_sqlite_pragmas(engine: Engine, busy_timeout_s: float) -> None:
    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
        cur.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; safe with WAL
        cur.execute("PRAGMA foreign_keys=ON")
        # How long a statement waits for another writer's lock before "database is locked" (a 503
        # database_busy): bounded well below what a client waits for an answer.
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cur.close()


def _engine_options(settings: Settings) -> dict[str, Any]:
    # A fixed set of connections: no overflow, since an overflow connection is closed when it is
    # returned and the next burst opens (forks, on PostgreSQL) a new one: under steady load that
    # churn cost more CPU than the queries. Requests wait for a connection instead (see `slots`).
    # No pre-ping (a round trip per checkout): after a disconnect every older pooled connection is
    # replaced at its next checkout instead (`Database._track_staleness`), so a database restart costs
    # at most the request that found it, which answers 503 with Retry-After.
    options: dict[str, Any] = {
        "pool_size": settings.db_pool_size,
        "max_overflow": 0,
        "pool_recycle": 1800,
        # Code outside the request slots (the metrics collector, background work) can still find the
        # pool empty: its wait is bounded too (sqlalchemy.exc.TimeoutError, a 503 database_busy).
        "pool_timeout": settings.db_acquire_timeout_s,
        # JSON columns (method, hyperparameters, metadata, error) decode in every job read:
        # orjson is several times faster than the standard library there.
        "json_deserializer": orjson.loads,
        # A failed statement's error message (logged) leaves out its bound values: those carry what
        # clients sent (an API key pasted into an id, say) and the webhook secrets written.
        "hide_parameters": True,
    }
    if settings.is_sqlite:
        options["connect_args"] = {"check_same_thread": False, "timeout": settings.db_timeout_s}
    else:
        # libpq waits for an unreachable server for ever by default; whole seconds, at least 2.
        options["connect_args"] = {"connect_timeout": max(2, math.ceil(settings.db_timeout_s))}
    return options


def make_engine(settings: Settings) -> Engine:
    url = settings.database_url
    if settings.is_sqlite:
        path = _sqlite_path(url)
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, **_engine_options(settings))
    if settings.is_sqlite:
        _add_sqlite_pragmas(engine, settings.db_timeout_s)
    return engine


def make_async_engine(settings: Settings) -> AsyncEngine:
    """The same database through an asyncio driver (psycopg async, aiosqlite), for the hot reads.

    Autocommit: a read is one statement and one round trip, with no BEGIN before it and no
    ROLLBACK when the connection goes back to the pool. Nothing here needs a transaction: the
    writes that do (uploads, job creation, cancel) use the sync engine.
    """
    url = settings.database_url
    if settings.is_sqlite:
        url = "sqlite+aiosqlite:" + url.removeprefix("sqlite:")
    engine = create_async_engine(
        url, isolation_level="AUTOCOMMIT", pool_reset_on_return=None, **_engine_options(settings)
    )
    if settings.is_sqlite:
        _add_sqlite_pragmas(engine.sync_engine, settings.db_timeout_s)
    return engine


class Database:
    """A sync engine (writes, CLI, workers) and an async one (authentication and the read endpoints).

    Both pools have a fixed size, and requests queue for them on two FIFO semaphores rather than
    inside the pools. `slots` (sync sessions): a request waits on the event loop, not in a worker
    thread, so threads never all block on an exhausted pool while the connections' holders wait
    for a thread (a deadlock seen at 128 concurrent clients). `read_slots` (async connections):
    the async pool's own queue lets a newcomer take a connection that a waiter was woken for, and
    under load a few requests starved for a second while the rest went by (p99 150 ms, max 1 s).
    Both waits are bounded (db_acquire_timeout_s, then DatabaseBusy).

    A disconnect seen on either engine (the server restarted or went away) marks every connection
    then pooled, in both pools, as stale: each is replaced at its next checkout, so the requests
    after an outage find fresh connections instead of failing one by one on the dead ones.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = make_engine(settings)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._async_engine: AsyncEngine | None = None
        self._async_sessions: async_sessionmaker[AsyncSession] | None = None
        self.slots = Slots(settings.db_pool_size, settings.db_acquire_timeout_s)
        self.read_slots = Slots(settings.db_pool_size, settings.db_acquire_timeout_s)
        self._stale_before = 0.0  # time.monotonic(): pooled connections opened before it are replaced
        self._track_staleness(self.engine)

    def mark_stale(self) -> None:
        """Every connection pooled now is dead or suspect: replace each at its next checkout."""
        self._stale_before = time.monotonic()

    def _track_staleness(self, engine: Engine) -> None:
        @event.listens_for(engine, "connect")
        def _opened(_dbapi_conn: Any, record: Any) -> None:
            record.info["opened_at"] = time.monotonic()

        @event.listens_for(engine, "checkout")
        def _replace_stale(_dbapi_conn: Any, record: Any, _proxy: Any) -> None:
            if record.info.get("opened_at", 0.0) < self._stale_before:
                raise DisconnectionError("opened before the database was last seen disconnected")

        @event.listens_for(engine, "handle_error")
        def _disconnected(context: ExceptionContext) -> None:
            if context.is_disconnect:
                self.mark_stale()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessions() as session:
            yield session

    def _async(self) -> tuple[AsyncEngine, async_sessionmaker[AsyncSession]]:
        # Created on first use, inside the event loop that will use it.
        if self._async_engine is None or self._async_sessions is None:
            self._async_engine = make_async_engine(self.settings)
            self._track_staleness(self._async_engine.sync_engine)
            self._async_sessions = async_sessionmaker(self._async_engine, expire_on_commit=False)
        return self._async_engine, self._async_sessions

    @asynccontextmanager
    async def async_session(self) -> AsyncIterator[AsyncSession]:
        """An ORM session on the async engine (autocommit: each statement commits by itself)."""
        async with self.read_slots, self._async()[1]() as session:
            yield session

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A Core connection of the async engine, for reads: rows, not ORM objects, and no session
        to build and tear down (the job poll's hot path)."""
        async with self.read_slots, self._async()[0].connect() as conn:
            try:
                yield conn
            except DRIVER_ERRORS:
                # FastRead runs on the driver's connection, where SQLAlchemy's disconnect handling
                # never sees its errors: a connection the server dropped would go back to the pool
                # and fail every request that drew it. Drop it, and the pool's other old ones.
                if await _driver_broken(conn):
                    self.mark_stale()
                    await conn.invalidate()
                raise

    def dispose(self) -> None:
        self.engine.dispose()

    async def dispose_async(self) -> None:
        if self._async_engine is not None:
            await self._async_engine.dispose()


async def _driver_broken(conn: AsyncConnection) -> bool:
    """Whether the driver connection under `conn` is closed or broken (psycopg knows it locally)."""
    if conn.closed or conn.invalidated:
        return False  # nothing of ours left to drop
    driver: Any = (await conn.get_raw_connection()).driver_connection
    return bool(getattr(driver, "broken", False) or getattr(driver, "closed", False))


class FastRead:
    """One SELECT, compiled once per dialect and run on the driver's own connection.

    For the job poll, the one read that every client repeats every few seconds: there,
    SQLAlchemy's per-execution work (cache key, result metadata, the greenlet bridge) costs more
    CPU than the driver's. Rows come back as named tuples with the same values SQLAlchemy would
    give (each column type's result processor applied: JSON decoded on SQLite, booleans as
    bool). Parameters must be plain values that need no bind processing (ids, numbers).
    """

    def __init__(self, statement: Select[Any]) -> None:
        self.statement = statement
        self.row = namedtuple("row", [c.name for c in statement.selected_columns])  # type: ignore[misc]
        self._compiled: dict[str, Any] = {}  # dialect name -> SQLCompiler
        self._processors: dict[str, list[Any]] = {}  # dialect name -> result processor per column

    async def first(self, conn: AsyncConnection, params: dict[str, Any]) -> Any:
        """The first row (a named tuple), or None."""
        dialect = conn.dialect
        compiled = self._compiled.get(dialect.name)
        if compiled is None:
            compiled = self._compiled[dialect.name] = self.statement.compile(dialect=dialect)
        values = compiled.construct_params(params)
        driver: Any = (await conn.get_raw_connection()).driver_connection
        if dialect.name == "postgresql":  # psycopg: named parameters, prepared per connection
            cursor = await driver.execute(compiled.string, values, prepare=True)
        else:  # aiosqlite: positional parameters
            cursor = await driver.execute(compiled.string, [values[k] for k in compiled.positiontup or ()])
        row = await cursor.fetchone()
        processors = self._processors.get(dialect.name)
        if processors is None:  # some processors depend on the driver's type codes
            columns = zip(self.statement.selected_columns, cursor.description, strict=True)
            processors = self._processors[dialect.name] = [
                c.type.dialect_impl(dialect).result_processor(dialect, d[1]) for c, d in columns
            ]
        await cursor.close()
        if row is None:
            return None
        return self.row(*(p(v) if p else v for p, v in zip(processors, row, strict=True)))


def lock_team(session: Session, team_id: str) -> None:
    """Serialise this transaction with the team's other writers (uploads, job creation).

    A no-op UPDATE of the team's row: it takes the row lock on PostgreSQL and the database's write
    lock on SQLite (where a SELECT would not even start a transaction), so quota checks and the
    rows they count cannot change underneath the caller until it commits or rolls back.
    """
    from service.models import Team

    session.execute(
        update(Team)
        .where(Team.id == team_id)
        .values(max_storage_bytes=Team.max_storage_bytes)
        .execution_options(synchronize_session=False)
    )


def rows_updated(session: Session, statement: Any) -> int:
    """Execute an UPDATE/DELETE and return how many rows it matched (the conditional-update idiom)."""
    result = session.execute(statement.execution_options(synchronize_session=False))
    return int(cast(CursorResult[Any], result).rowcount)
