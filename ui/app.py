"""The dashboard's aiohttp application: its middlewares (``base.py``) and the pages it
wires (``pages``, ``work``, ``routes``, ``distill``, ``tasks``), mounted at /ui/.

The pages import ``base``, never this module, so nothing here is imported from inside a
function to break a cycle.
"""

from __future__ import annotations

import jinja2
from aiohttp import web

from distillery.core.config import Settings
from distillery.store import Store
from distillery.ui import distill, filters, pages, routes, tasks, work
from distillery.ui.base import (
    HERE,
    PREFIX,
    SECRET,
    SETTINGS,
    STORE,
    TEMPLATES,
    Secret,
    security,
    signed_in,
)


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,  # captured text is whatever users typed: always escaped
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(filters.FILTERS)
    return env


def make_app(settings: Settings, store: Store, prefix: str = "/ui") -> web.Application:
    """The dashboard as an app to mount at ``prefix`` (or to serve alone with prefix "")."""
    app = web.Application(middlewares=[security, signed_in])
    app[SETTINGS] = settings
    app[STORE] = store
    app[SECRET] = Secret(store)
    app[TEMPLATES] = environment()
    app[PREFIX] = prefix
    pages.add_routes(app)
    work.add_routes(app)
    routes.add_routes(app)
    tasks.setup(app)
    distill.setup(app)
    app.router.add_static("/static/", HERE / "static", name="static")
    return app


def mount(parent: web.Application, settings: Settings, store: Store | None) -> None:
    """Add the dashboard to the proxy at /ui/ (when enabled and there is a store).

    The proxy's entry point passes this in (``proxy.app.make_app(extensions=...)``):
    the proxy package itself never imports the dashboard.
    """
    if store is None or not settings.ui.enabled:
        return
    parent.add_subapp("/ui", make_app(settings, store))
