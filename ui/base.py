"""What every dashboard page stands on: security, sessions, CSRF, rendering.

Every response carries a strict Content-Security-Policy (scripts and styles from
``ui/static`` only: no inline script, no eval), ``X-Frame-Options: DENY`` and no
referrer to other sites.  Every page but sign-in needs a session; every
state-changing request comes from the dashboard's own origin and carries the
session's CSRF token (a form field, or htmx's ``X-CSRF-Token`` header).
Templates autoescape, so captured text -- prompts, tags, model names -- always
renders as text.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import jinja2
import sqlalchemy as sa
import structlog
import yarl
from aiohttp import web

from distillery.core.config import Settings
from distillery.store import Store, dashboard
from distillery.store.db import migrate
from distillery.ui import sessions
from distillery.ui.sessions import Session

log = structlog.get_logger()

HERE = Path(__file__).parent
SESSION = web.RequestKey("ui_session", Session)
STORE = web.AppKey("ui_store", Store)
SETTINGS = web.AppKey("ui_settings", Settings)
TEMPLATES = web.AppKey("ui_templates", jinja2.Environment)
PREFIX = web.AppKey("ui_prefix", str)

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # Not "no-referrer": under it a browser sends "Origin: null" on the dashboard's own
    # form posts, and the origin check below could not tell them from another site's.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}
PUBLIC = {"sign_in", "sign_in_post", "static"}  # what needs no session
SIGN_IN_CSRF = "distillery_sign_in"  # double-submit token for the sign-in form itself

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")
UNAVAILABLE = (
    "The dashboard is unavailable until its database answers. The proxy is still "
    "forwarding and capturing calls (they wait in its spool). Reload in a moment."
)


class Unavailable(Exception):
    """The dashboard's database does not answer (down, locked, not yet migrated)."""


class Secret:
    """The session-signing secret, read from the database when a page first needs it.

    Not at start: the proxy must start, and capture, while its database is down; the
    dashboard alone waits for it (and brings its schema up to date when it answers).
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.value: bytes | None = None

    async def get(self) -> bytes:
        if self.value is None:
            self.value = await asyncio.to_thread(self._read)
        return self.value

    def _read(self) -> bytes:
        try:
            if not self.store.migrated:
                migrate(self.store.engine)
                self.store.migrated = True
            return dashboard.secret(self.store, sessions.SECRET).encode()
        except sa.exc.SQLAlchemyError as exc:
            raise Unavailable(str(exc).splitlines()[0]) from None


SECRET = web.AppKey("ui_secret", Secret)


@web.middleware
async def security(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Security headers on every answer; errors as plain text, never the proxy's JSON."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:  # a redirect
            _secure(request, exc.headers)
            raise
        response = _error(request, exc.status, exc.text or exc.reason)
    except (Unavailable, sa.exc.OperationalError) as exc:
        log.warning("dashboard database unavailable", path=request.path, error=str(exc)[:200])
        response = _error(request, 503, UNAVAILABLE)
        response.headers["Retry-After"] = "5"
    except Exception:
        log.exception("dashboard error", path=request.path)
        response = _error(request, 500, "The dashboard failed; see the proxy's log.")
    _secure(request, response.headers)
    return response


def _error(request: web.Request, status: int, message: str) -> web.Response:
    """The dashboard's own page for an error; the bare message for htmx, which swaps it
    into the page it was asked from."""
    if request.headers.get("HX-Request"):
        return web.Response(status=status, text=message)
    title = {401: "Sign in first", 403: "Not allowed", 404: "Not found", 503: "Unavailable"}
    try:
        return render(
            request,
            "error.html",
            status=status,
            code=status,
            title=title.get(status, "Something went wrong"),
            message=message.removeprefix(f"{status}: "),
        )
    except Exception:  # the page itself failed to render: the message, plainly
        log.exception("dashboard error page failed", path=request.path)
        return web.Response(status=status, text=message)


def _secure(request: web.Request, headers: Any) -> None:
    for name, value in SECURITY_HEADERS.items():
        if name == "Cache-Control" and request.match_info.route.name == "static":
            continue
        headers.setdefault(name, value)


@web.middleware
async def signed_in(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A session for every route but sign-in and static files; CSRF on every write."""
    if request.match_info.route.name in PUBLIC:
        return await handler(request)
    settings = request.app[SETTINGS]
    secret = await request.app[SECRET].get()
    session = sessions.decode(request.cookies.get(sessions.COOKIE), secret)
    if session is not None and not await _still_on(request, session):
        session = None
    if session is None and settings.ui.open:
        session = Session("local", True, sessions.open_mode_token(secret), float("inf"))
    if session is None:
        if request.method in UNSAFE or request.headers.get("HX-Request"):
            raise web.HTTPUnauthorized(text="Sign in first.")
        raise web.HTTPSeeOther(url(request, "sign-in"))
    if request.method in UNSAFE:
        _same_origin(request)
        form = await request.post() if request.content_type.endswith("form-urlencoded") else {}
        token = request.headers.get("X-CSRF-Token") or form.get("csrf")
        if not isinstance(token, str) or not sessions.same(token, session.csrf):
            raise web.HTTPForbidden(text="Missing or wrong CSRF token: reload the page.")
    request[SESSION] = session
    return await handler(request)


async def _still_on(request: web.Request, session: Session) -> bool:
    """A signed cookie is not enough: its key must still be accepted, and its session
    still on in the database (not signed out, ended, or idle too long)."""
    settings = request.app[SETTINGS]
    if not session.id or not settings.still_signs_in(session.tenant, session.admin):
        return False
    idle = settings.ui.idle_minutes * 60
    return await in_thread(request, lambda store: dashboard.session_alive(store, session.id, idle))


def _same_origin(request: web.Request) -> None:
    """A write must come from a page of this dashboard: a browser says where a request
    comes from in ``Origin`` (or, failing that, ``Referer``); another site is refused even
    before its token is checked."""
    source = request.headers.get("Origin") or request.headers.get("Referer")
    if source is None:
        return  # not a browser's cross-site request (browsers send Origin on every POST)
    if yarl.URL(source).authority != request.url.authority:
        raise web.HTTPForbidden(text="A write from another site is refused.")


def admin_only(request: web.Request, why: str) -> None:
    """Refuse a session that is not an admin's, saying why the page is an admin's."""
    if not request[SESSION].admin:
        raise web.HTTPForbidden(text=f"{why}: sign in with an admin key ([auth] admin_keys).")


def url(request: web.Request, path: str = "") -> str:
    return f"{request.app[PREFIX]}/{path}"


def render(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    session = request.get(SESSION)
    page = (
        request.app[TEMPLATES]
        .get_template(template)
        .render(
            prefix=request.app[PREFIX],
            session=session,
            csrf=session.csrf if session else "",
            path=request.path,
            **context,
        )
    )
    return web.Response(text=page, status=status, content_type="text/html")


async def in_thread(request: web.Request, work: Callable[[Store], T]) -> T:
    """Store work off the event loop: the proxy's requests never wait on a page."""
    return await asyncio.to_thread(work, request.app[STORE])
