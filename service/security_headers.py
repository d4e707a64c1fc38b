"""Security headers on every response (pure ASGI: a few header tuples per response, no body copy).

- Everywhere: `X-Content-Type-Options: nosniff` (a JSONL download or an error is never run as a
  script or page) and `Referrer-Policy: same-origin` (URLs carry ids, and the dashboard's query
  strings carry filters: no other site gets them; not no-referrer, under which browsers send
  `Origin: null` on the dashboard's own form posts, and the sign-in's Origin check needs it).
- `Cache-Control: no-store` on everything but the dashboard's static files: every answer is private
  to a team, and many carry something secret: a new API key (admin create-team, create-key), a
  webhook's signing secret, the form token of a dashboard page. A response that sets its own
  Cache-Control keeps it.
- On the dashboard (/ui): a Content-Security-Policy that allows the page's own origin only. The
  templates hold no inline script, style or event handler (service/ui/static/app.js attaches them),
  uPlot styles its elements through the CSSOM, which CSP does not govern, so no 'unsafe-inline'.
  `frame-ancestors 'none'` and `X-Frame-Options: DENY` (for browsers without CSP level 2) keep the
  pages out of other sites' frames (clickjacking the cancel button).

And `require_same_origin`, the dashboard's check that a form post came from its own pages.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import APIError

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",  # the job page's polls and its event stream
        "form-action 'self'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    ]
)

_EVERYWHERE = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"same-origin")]
_NO_STORE = [(b"cache-control", b"no-store")]
_PAGE = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),
]
_API = _EVERYWHERE + _NO_STORE
_UI = _EVERYWHERE + _NO_STORE + _PAGE
_UI_STATIC = _EVERYWHERE + _PAGE  # cacheable (StaticFiles answers with ETag and Last-Modified)


def headers_for(path: str) -> list[tuple[bytes, bytes]]:
    """The headers a response to `path` gets (unless it set them itself)."""
    if path == "/ui" or path.startswith("/ui/"):
        return _UI_STATIC if path.startswith("/ui/static/") else _UI
    return _API


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = headers_for(scope["path"])

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {name.lower() for name, _ in headers}
                headers.extend(h for h in extra if h[0] not in present)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


_DEFAULT_PORTS = {"http": 80, "https": 443}
_CROSS_SITE = "Cross-site form posts are refused; sign in from this site's own page"


def _authority(scheme: str, netloc: str) -> tuple[str, int | None]:
    """(host, port) of a URL's authority part, the scheme's default port filled in."""
    parts = urlsplit(f"//{netloc}")
    return (parts.hostname or "", parts.port or _DEFAULT_PORTS.get(scheme))


async def require_same_origin(request: Request) -> None:
    """Refuse (403) a form post that another site's page made the browser send: a cross-site login
    would sign the victim in as the attacker's team (login CSRF), and its pages see what they enter.

    As Go's net/http CrossOriginProtection does: a browser's `Sec-Fetch-Site` (which no page script
    can set) decides when present: same-origin, or none for a request the user started. Without it
    (older browsers), `Origin`'s host and port must be this server's as the browser addressed it
    (the Host header, which a reverse proxy passes on; the scheme is not compared, since TLS may end
    at the proxy). A request with neither header (curl, a script) is no browser's and passes."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None:
        if fetch_site not in ("same-origin", "none"):
            raise APIError(403, _CROSS_SITE, code="cross_site_request")
        return
    origin = request.headers.get("origin")
    if origin is None:
        return
    scheme, _, netloc = origin.partition("://")
    try:
        host = request.headers.get("host", "")
        same = bool(netloc) and _authority(scheme, netloc) == _authority(scheme, host)
    except ValueError:  # a port that is not a number
        same = False
    if not same:
        raise APIError(403, _CROSS_SITE, code="cross_site_request")
