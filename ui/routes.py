"""The routes page (admins only): each route's mode and why, its evidence with the 95%
interval against the bar, the newest pairs (the teacher's answer beside the student's,
with the grades), and buttons to promote, demote or switch it off.

The buttons do what ``distillery routes promote|demote`` do (the same evidence rule:
a promotion the evidence does not support is refused with the reason); "Off" goes
straight to off from any mode.  Every proxy on the database follows within seconds.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from distillery.core.errors import DistilleryError
from distillery.curation import online
from distillery.store import Store, query
from distillery.store import routes as route_store
from distillery.ui.base import SESSION, SETTINGS, admin_only, in_thread, render, url

PAIRS = 20  # the newest pairs shown per route
ACTIONS = {"promote": online.promote, "demote": online.demote, "off": online.switch_off}


def add_routes(app: web.Application) -> None:
    app.router.add_get("/routes", routes_page, name="routes")
    app.router.add_post("/routes/{name}/{action:promote|demote|off}", move, name="route_move")


def _admin(request: web.Request) -> None:
    admin_only(request, "Routes answer every key's traffic")


async def routes_page(request: web.Request) -> web.Response:
    _admin(request)
    settings = request.app[SETTINGS]

    def work(store: Store) -> list[dict[str, Any]]:
        states = route_store.states(store)
        found = []
        for row in online.status(settings, store):
            pairs = route_store.recent(store, row["route"], PAIRS)
            teachers = {
                r["id"]: r
                for r in query.find(
                    store, query.Filters(ids=tuple(p["id"] for p in pairs)), limit=None
                )
            }
            found.append(
                {
                    "status": row,
                    "config": settings.routes[row["route"]],
                    "match": settings.routes[row["route"]].match.model_dump(exclude_defaults=True),
                    "state": states.get(row["route"]),
                    "pairs": [(p, teachers.get(p["id"])) for p in pairs],
                }
            )
        return found

    rows = await in_thread(request, work) if settings.routes else []
    return render(
        request,
        "routes.html",
        routes=rows,
        notice=request.query.get("notice"),
        failed=request.query.get("failed"),
    )


async def move(request: web.Request) -> web.StreamResponse:
    """Promote, demote or switch off one route (a form post with the session's CSRF)."""
    _admin(request)
    name, action = request.match_info["name"], request.match_info["action"]
    settings = request.app[SETTINGS]
    reason = f"from the dashboard by {request[SESSION].tenant}"
    try:
        was, now = await in_thread(
            request, lambda store: ACTIONS[action](settings, store, name, reason)
        )
    except DistilleryError as exc:
        failed = urlencode({"failed": str(exc)})
        raise web.HTTPSeeOther(url(request, "routes") + "?" + failed) from None
    notice = f"Route {name}: {was} -> {now}."
    raise web.HTTPSeeOther(url(request, "routes") + "?" + urlencode({"notice": notice}))
