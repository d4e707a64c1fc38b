"""Database and storage failures as API errors: 503 (or 507) with a code and Retry-After, not a 500.

One mapping for every endpoint, installed as exception handlers (`install_outage_handlers`):

- the database cannot be reached (connection refused or dropped, server shutting down, SQLite file
  unopenable): 503 `database_unavailable`, Retry-After 5;
- the database is there but busy (SQLite's write lock held past db_timeout_s, a PostgreSQL lock or
  statement timeout, no pooled connection free within db_acquire_timeout_s): 503 `database_busy`,
  Retry-After 1;
- artifact storage is full (ENOSPC, EDQUOT, EFBIG): 507 `storage_full`; it is read-only or failing
  (EROFS, EIO, EACCES, ...): 503 `storage_unavailable`, Retry-After 30. The message names the
  condition and its errno, never a server path (the log has the path).

Exceptions that match none of these (an OSError of a socket, an IntegrityError that escaped) are
answered like any unexpected error: a logged 500. The request's transaction is rolled back when its
session closes, and an upload removes its temporary file, so nothing is left half-stored.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc

from service.db import DatabaseBusy
from service.errors import APIError, error_response, unexpected_error

log = logging.getLogger("tunepool.api")

RETRY_BUSY_S = 1  # a lock or a connection frees within moments
RETRY_UNAVAILABLE_S = 5  # a database restart or failover takes seconds
RETRY_STORAGE_S = 30  # a disk an operator has to look at

# Driver errors raised outside SQLAlchemy (FastRead runs on the driver's own connection).
DRIVER_ERRORS: list[type[Exception]] = [sqlite3.OperationalError]
try:
    import psycopg

    DRIVER_ERRORS += [psycopg.OperationalError, psycopg.InterfaceError]
except ImportError:  # pragma: no cover - psycopg is a dependency, but only PostgreSQL needs it
    psycopg = None  # type: ignore[assignment]

# lock_not_available, query_canceled, serialization_failure, deadlock_detected, too_many_connections
BUSY_SQLSTATES = {"55P03", "57014", "40001", "40P01", "53300"}
STORAGE_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
STORAGE_FAILING = {
    errno.EROFS,
    errno.EIO,
    errno.EACCES,
    errno.EPERM,
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.ESTALE,
    errno.ENXIO,
    errno.ENODEV,
    errno.EMFILE,
    errno.ENFILE,
}


def _busy(detail: str) -> APIError:
    return APIError(
        503,
        f"The database is busy ({detail}); retry after {RETRY_BUSY_S} s",
        code="database_busy",
        headers={"Retry-After": str(RETRY_BUSY_S)},
    )


def _unavailable() -> APIError:
    # The driver's text names the server's host and port: the log has it, the client does not.
    return APIError(
        503,
        f"The database cannot be reached right now; retry after {RETRY_UNAVAILABLE_S} s",
        code="database_unavailable",
        headers={"Retry-After": str(RETRY_UNAVAILABLE_S)},
    )


def _driver_error_kind(orig: BaseException) -> str | None:
    """ "busy", "unavailable", or None for a driver error that is not an outage (a bug, bad SQL)."""
    if isinstance(orig, sqlite3.OperationalError):
        text = str(orig).lower()
        return "busy" if "locked" in text or "busy" in text else "unavailable"
    if psycopg is not None and isinstance(orig, psycopg.InterfaceError):
        return "unavailable"  # a connection that is closed or unusable
    if psycopg is not None and isinstance(orig, psycopg.OperationalError):
        # Busy: a lock or statement timeout, a deadlock or serialization failure, too many
        # connections. Anything else is the server gone or unusable: refused, dropped (no SQLSTATE),
        # shutting down (57P01), the database missing (3D000), out of disk (53100).
        return "busy" if getattr(orig, "sqlstate", None) in BUSY_SQLSTATES else "unavailable"
    return None


def database_error(exc: BaseException) -> APIError | None:
    """The API error for a database outage or overload, or None if `exc` is neither."""
    if isinstance(exc, DatabaseBusy):
        return _busy(str(exc))
    if isinstance(exc, sa_exc.TimeoutError):  # the pool's own wait (code outside the request slots)
        return _busy("no pooled connection became free")
    orig: BaseException = exc
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return _unavailable()
        orig = exc.orig or exc
    kind = _driver_error_kind(orig)
    if kind == "busy":
        reason = (
            "another writer holds the database's lock" if isinstance(orig, sqlite3.Error) else "timed out"
        )
        return _busy(reason)
    return _unavailable() if kind == "unavailable" else None


def storage_error(exc: OSError) -> APIError | None:
    """The API error for a full, read-only or failing artifact storage, or None for another OSError."""
    number = exc.errno
    if number not in STORAGE_FULL and number not in STORAGE_FAILING:
        return None
    condition = f"{errno.errorcode.get(number, number)}: {exc.strerror or 'error'}"
    if number in STORAGE_FULL:
        return APIError(
            507, f"The artifact storage is full ({condition}); nothing was stored", code="storage_full"
        )
    return APIError(
        503,
        f"The artifact storage is unavailable ({condition}); retry after {RETRY_STORAGE_S} s",
        code="storage_unavailable",
        headers={"Retry-After": str(RETRY_STORAGE_S)},
    )


def _answer(request: Request, exc: Exception, error: APIError | None) -> JSONResponse:
    if error is None:
        return unexpected_error(request, exc)
    # One line per failed request, without a trace: the cause is outside the code.
    log.warning("%s %s: %s (%s: %s)", request.method, request.url.path, error.code, type(exc).__name__, exc)
    return error_response(
        error.status, error.message, type=error.type, code=error.code, headers=error.headers
    )


def install_outage_handlers(app: FastAPI) -> None:
    async def _database(request: Request, exc: Exception) -> JSONResponse:
        return _answer(request, exc, database_error(exc))

    async def _storage(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, OSError)
        return _answer(request, exc, storage_error(exc))

    database_errors: list[type[Any]] = [
        DatabaseBusy,
        sa_exc.TimeoutError,
        sa_exc.OperationalError,
        sa_exc.InterfaceError,
        sa_exc.DBAPIError,  # any other wrapped error that turned out to be a disconnect
        *DRIVER_ERRORS,
    ]
    for kind in database_errors:
        app.add_exception_handler(kind, _database)
    app.add_exception_handler(OSError, _storage)
