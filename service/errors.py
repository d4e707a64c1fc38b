"""OpenAI-style errors: every failure answers `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.auth import redact_keys
from service.schemas import ErrorBody

log = logging.getLogger("tunepool.api")

# A value the database cannot take: SQLAlchemy's wrapper, and psycopg's own (FastRead, the job poll,
# runs on the driver directly).
DATA_ERRORS: list[type[Exception]] = [DataError]
with contextlib.suppress(ImportError):
    from psycopg import DataError as PsycopgDataError

    DATA_ERRORS.append(PsycopgDataError)

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
}

# What each error status means in this API, for the OpenAPI document's `responses`.
_MEANINGS = {
    400: "Invalid request: a parameter, the body, or an object it names",
    401: "Missing or invalid API key",
    403: "The key may not do this (admin endpoints need an admin key)",
    404: "No such object (another team's id answers the same)",
    409: "Conflicts with the object's state or an existing one",
    410: "The object's stored bytes are gone",
    413: "Too large: the request body, an upload, or the team's storage quota",
    415: "The body's Content-Type is not the one this operation takes",
    416: "The Range starts at or past the end",
    429: "Too many requests: a team quota, or too many bad keys from this address",
    503: "Not ready, or the database or artifact storage is unavailable or busy (see Retry-After)",
    507: "The artifact storage is full",
}
# Every route that takes a key can answer these: a missing or bad key, and (service/ratelimit.py)
# a 429 once one address has sent too many bad keys.
AUTH_ERRORS = (401, 429)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route or router: each status answers `{"error": {...}}` (ErrorBody)."""
    return {status: {"model": ErrorBody, "description": _MEANINGS[status]} for status in statuses}


class APIError(Exception):
    """Raise anywhere in a request to answer with this status and an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers


def not_found(kind: str, id: str, param: str | None = None) -> APIError:
    """The one 404 for a missing id and for another team's id: they must be indistinguishable."""
    return APIError(404, f"No such {kind}: {id!r}", param=param, code="not_found")


def error_response(
    status: int,
    message: str,
    *,
    type: str | None = None,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {
        "error": {
            "message": redact_keys(message),  # a key pasted into an id or cursor is never echoed
            "type": type or _TYPES.get(status, "server_error"),
            "param": param,
            "code": code,
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


# Names pydantic puts in an error's location for the branch of a union that failed; not fields.
_UNION_TAGS = {"int", "float", "str", "bool", "list", "dict", "none", "json-or-python"}


def _param(loc: tuple[Any, ...]) -> str | None:
    parts = [
        str(p)
        for p in loc
        if p not in ("body", "query", "path", "header") and str(p) not in _UNION_TAGS and "[" not in str(p)
    ]
    return ".".join(parts) or None


def _is_json(content_type: str | None) -> bool:
    """Whether FastAPI parses a body of this Content-Type as JSON: application/json or */*+json."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def _json_type(value: Any) -> str:
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "boolean"
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), "value")


def _whole_body_error(request: Request, errors: list[Any]) -> JSONResponse | None:
    """The answer when the body as a whole is wrong (no JSON at all, or not an object), else None.

    No field is at fault, so `param` is null, as in OpenAI's answers. Without this, pydantic's
    "Input should be a valid dictionary" would answer a form-encoded or text/plain body too.
    """
    whole = next((e for e in errors if tuple(e.get("loc", ())) == ("body",)), None)
    if whole is None:
        return None
    if whole.get("type") == "missing":
        return error_response(400, "the request body is empty; send a JSON object", code="invalid_value")
    content_type = request.headers.get("content-type")
    if not _is_json(content_type):
        shown = (content_type or "no Content-Type")[:100]
        return error_response(
            415,
            f"send the request body as JSON, with Content-Type: application/json (got {shown})",
            code="unsupported_media_type",
        )
    kind = _json_type(whole.get("input"))
    return error_response(
        400, f"the request body must be a JSON object, not a JSON {kind}", code="invalid_value"
    )


def _document_validation_errors(app: FastAPI) -> None:
    """FastAPI documents a 422 (its own error shape) on every route with parameters or a body; this
    API answers those validation errors 400 with an ErrorBody (`_validation` below), a JSON body sent
    as another Content-Type 415 (`_whole_body_error`), and one over max_request_body_bytes 413
    (service/http_protocol.py): the document says so."""
    generate = app.openapi
    ref = "#/components/schemas/{model}"

    def entry(status: int) -> dict[str, Any]:
        schema = {"$ref": ref.format(model="ErrorBody")}
        return {"description": _MEANINGS[status], "content": {"application/json": {"schema": schema}}}

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = generate()
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        error_schema = ErrorBody.model_json_schema(ref_template=ref)
        for name, schema in error_schema.pop("$defs", {}).items():
            schemas.setdefault(name, schema)
        schemas.setdefault("ErrorBody", error_schema)
        for path_item in document.get("paths", {}).values():
            for operation in path_item.values():
                responses = operation.get("responses", {})
                if responses.pop("422", None) is None:
                    continue
                responses.setdefault("400", entry(400))
                if "application/json" in operation.get("requestBody", {}).get("content", {}):
                    responses.setdefault("413", entry(413))
                    responses.setdefault("415", entry(415))
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def install_error_handlers(app: FastAPI) -> None:
    _document_validation_errors(app)

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return error_response(
            exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        whole_body = _whole_body_error(request, errors)
        if whole_body is not None:
            return whole_body
        first: dict[str, Any] = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        param = _param(tuple(first.get("loc", ())))
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        if first.get("type") == "json_invalid":  # loc is ("body", offset of the error)
            reason = (first.get("ctx") or {}).get("error", "")
            where = first["loc"][-1] if len(first.get("loc", ())) == 2 else None
            message = "the request body is not valid JSON" + (f": {reason}" if reason else "")
            message += f": character {where}" if isinstance(where, int) else ""
            param = None
        elif param:
            message = f"{param}: {message}"
        others = {_param(tuple(e.get("loc", ()))) for e in errors[1:]} - {param}
        if others:
            message += f" (also: {', '.join(sorted(map(str, others)))})"
        return error_response(400, message, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        if exc.status_code == 404:
            message = "Unknown request URL; see /docs for the API"
        # FastAPI answers "There was an error parsing the body" when json.loads fails other than by a
        # JSONDecodeError; its cause says why.
        elif isinstance(exc.__cause__, RecursionError):
            message, code = "the request body is not valid JSON: nested too deeply", "invalid_value"
        elif isinstance(exc.__cause__, UnicodeDecodeError):
            message, code = "the request body is not valid JSON: it is not UTF-8 text", "invalid_value"
        return error_response(
            exc.status_code,
            message,
            code=code,
            headers=getattr(exc, "headers", None),
        )

    async def _unstorable(_request: Request, exc: Exception) -> JSONResponse:
        # The database refused a value the request carried (PostgreSQL stores no NUL character in
        # text: an id of "%00" got here); the client's fault, and nothing to log with its parameters.
        log.info("a request value was refused by the database (%s)", type(getattr(exc, "orig", exc)).__name__)
        return error_response(
            400,
            "A value in the request cannot be used (it holds a NUL character or is out of range)",
            code="invalid_value",
        )

    for data_error in DATA_ERRORS:
        app.add_exception_handler(data_error, _unstorable)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return unexpected_error(request, exc)


def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    """The 500 for an exception no handler expected: logged with its trace, never shown to the client."""
    log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "The server had an error processing the request", code="internal_error")


class KeepConnection:
    """The outermost ASGI layer (TunepoolAPI.build_middleware_stack): an error answered in full never
    costs the client its connection.

    Starlette's ServerErrorMiddleware answers an exception no handler took with the `Exception`
    handler's 500 (`unexpected_error`, which logs it), then raises it again "so that servers can log
    it"; uvicorn then logs "Exception in ASGI application" and closes the connection, although a
    complete answer went out, and the client's next keep-alive request fails too. Here an exception
    that arrives after a complete response is dropped. One that cut a response short (a streamed
    download whose disk failed) is raised on: closing is then the only way to tell the client.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        complete = False

        async def send_and_note(message: Message) -> None:
            nonlocal complete
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception:
            if not complete:
                raise
