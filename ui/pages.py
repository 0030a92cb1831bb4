"""The dashboard's pages: sign-in, the completions list with its filters, one call.

Filters are the CLI's (``store.query.parse_filters``) and live in the URL, so a
view can be shared and bookmarked.  Pages are cursor-paginated by record id,
which is time order: the next page is ``after=<last id>``, one indexed query.
"""

from __future__ import annotations

import csv
import functools
import io
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from distillery.core.errors import DistilleryError
from distillery.core.prices import AS_OF as PRICES_AS_OF
from distillery.core.serialize import csv_cell, dumps
from distillery.core.shapes import check_metadata
from distillery.store import Store, dashboard, overview, query
from distillery.store.records import StoredCompletion
from distillery.store.stats import group_stats
from distillery.ui import charts, sessions
from distillery.ui.base import (
    SECRET,
    SESSION,
    SETTINGS,
    SIGN_IN_CSRF,
    in_thread,
    render,
    url,
)

PAGE = 50
FILTER_FIELDS = ("tag", "model", "since", "until", "status", "finish_reason", "stream", "q")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/sign-in", sign_in_page, name="sign_in")
    app.router.add_post("/sign-in", sign_in, name="sign_in_post")
    app.router.add_post("/sign-out", sign_out, name="sign_out")
    app.router.add_get("/", home, name="home")
    app.router.add_get("/by-tag", by_tag, name="by_tag")
    app.router.add_get("/completions", completions, name="completions")
    app.router.add_get("/completions/export.{format:jsonl|csv}", export, name="export")
    app.router.add_get("/completions/{id}", completion, name="completion")
    app.router.add_post("/completions/{id}/tags", edit_tags, name="edit_tags")
    app.router.add_post("/completions/bulk", bulk, name="bulk")


# -- signing in ---------------------------------------------------------------------


async def sign_in_page(request: web.Request, error: str | None = None) -> web.Response:
    token = secrets.token_urlsafe(16)
    response = render(
        request, "sign_in.html", status=401 if error else 200, error=error, token=token
    )
    response.set_cookie(
        SIGN_IN_CSRF, token, httponly=True, samesite="Strict", path=url(request), max_age=3600
    )
    return response


async def sign_in(request: web.Request) -> web.Response:
    """A key in, a session cookie out: only the key's fingerprint is kept."""
    form = await request.post()
    token, expected = form.get("csrf"), request.cookies.get(SIGN_IN_CSRF)
    if not (isinstance(token, str) and expected and sessions.same(token, expected)):
        raise web.HTTPForbidden(text="Missing or wrong CSRF token: reload the sign-in page.")
    key = form.get("key")
    settings = request.app[SETTINGS]
    identity = settings.identify(key.strip()) if isinstance(key, str) else None
    if identity is None:
        return await sign_in_page(request, "That key is not accepted here.")
    tenant, admin = identity
    hours = settings.ui.session_hours
    expires_at = datetime.now(UTC) + timedelta(hours=hours)
    session_id = await in_thread(
        request, lambda store: dashboard.start_session(store, tenant, admin, expires_at)
    )
    session = sessions.Session.start(tenant, admin, hours, session_id)
    response = web.HTTPSeeOther(url(request, "completions"))
    response.set_cookie(
        sessions.COOKIE,
        sessions.encode(session, await request.app[SECRET].get()),
        httponly=True,
        samesite="Strict",
        secure=request.secure,
        path=url(request),
        max_age=int(settings.ui.session_hours * 3600),
    )
    response.del_cookie(SIGN_IN_CSRF, path=url(request))
    raise response


async def sign_out(request: web.Request) -> web.Response:
    """Ends the session where it is kept: its cookie, replayed, is no session anywhere."""
    session_id = request[SESSION].id
    if session_id:
        await in_thread(request, lambda store: dashboard.end_sessions(store, session_id))
    response = web.HTTPSeeOther(url(request, "sign-in"))
    response.del_cookie(sessions.COOKIE, path=url(request))
    raise response


RANGES = ("24h", "3d", "7d", "30d", "90d")  # the overview's presets
HOURLY_UP_TO = timedelta(days=3)  # a window this short is drawn by the hour, exactly


async def home(request: web.Request) -> web.Response:
    """The overview over a window: calls, errors, cost, tokens and p50/p95 latency as a
    series (by the hour for a window of up to three days, counted from the calls: exact;
    else by the day from the daily aggregates), by model, by app, and the prompt
    templates that cost the most.  Every bucket is drawn, the empty ones too."""

    since_text = request.query.get("since") or "7d"
    until_text = request.query.get("until") or ""
    now = datetime.now(UTC)  # one "now" for the whole range: "3d" is exactly three days
    try:
        since = query.parse_when(since_text, now)
        until = query.parse_when(until_text, now) if until_text else None
    except DistilleryError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    end = min(until or now, now)
    if since >= end:
        raise web.HTTPBadRequest(text="The range is empty: 'since' must come before 'until'.")
    tenants = request[SESSION].tenants
    prices = request.app[SETTINGS].prices
    hourly = end - since <= HOURLY_UP_TO

    def work(store: Store) -> dict[str, Any]:
        if hourly:
            found = overview.window(store, tenants=tenants, start=since, end=end, prices=prices)
            series, models, apps = found["hour"], found["model"], found["app"]
            tasks, total = found["fingerprint"], found["total"][0]
        else:
            start, last = overview.day_of(since), overview.next_midnight(end)

            def of(by: overview.By) -> list[overview.Group]:
                return overview.groups(
                    store, by, tenants=tenants, since=start, until=last, prices=prices
                )

            series = overview.filled(of("day"), start, end, overview.DAY)
            models, apps, tasks = of("model"), of("app"), of("fingerprint")
            total = overview.Group("all")
            for group in models:
                total.add(group)
            if total.calls <= overview.EXACT_LIMIT:
                total.known = overview.quantiles(store, tenants=tenants, start=start, end=last)
        tasks = [g for g in tasks if g.name][:10]
        systems = overview.system_prompts(store, [g.name for g in tasks], tenants)
        return {
            "series": series,
            "models": models,
            "apps": apps,
            "tasks": tasks,
            "systems": systems,
            "total": total,
        }

    found = await in_thread(request, work)
    return render(
        request,
        "overview.html",
        tag_key=request.query.get("tag_key", ""),
        since=since_text,
        until=until_text,
        ranges=RANGES,
        hourly=hourly,
        start=since if hourly else overview.day_of(since),
        end=end,
        charts=_charts(found["series"], hourly),
        prices_as_of=PRICES_AS_OF,
        exact_limit=overview.EXACT_LIMIT,
        base_url=_base_url(request),
        **found,
    )


def _charts(series: list[Any], hourly: bool) -> dict[str, str]:
    """The series as four charts, one column (or point) per bucket, empty ones too."""

    labels = [g.name.strftime("%d %Hh" if hourly else "%m-%d") for g in series]
    costs = [g.cost_usd for g in series]
    return {
        "calls": charts.columns(
            [(label, g.calls, g.errors) for label, g in zip(labels, series, strict=True)],
            "calls",
        ),
        "cost": charts.columns(
            [(label, c or 0.0, 0.0) for label, c in zip(labels, costs, strict=True)],
            "USD",
            money=True,
        )
        if any(c for c in costs)
        else "",
        "tokens": charts.columns(
            [
                (label, g.prompt_tokens + g.completion_tokens, g.completion_tokens)
                for label, g in zip(labels, series, strict=True)
            ],
            "tokens",
            part_name="output tokens",
        ),
        "latency": charts.lines(
            {
                "p50": [(float(i), g.p50_ms) for i, g in enumerate(series)],
                "p95": [(float(i), g.p95_ms) for i, g in enumerate(series)],
            },
            width=900,
            height=180,
            labels=labels,
        ),
    }


async def by_tag(request: web.Request) -> web.Response:
    """Calls per value of any tag over the window: exact, from the calls themselves (the
    aggregates know only the app tag), so the overview loads it apart, on demand."""

    key = request.query.get("tag_key", "").strip()
    if not key:
        raise web.HTTPBadRequest(text="Name a tag key, e.g. env.")
    try:
        filters = query.parse_filters(
            since=request.query.get("since") or "7d", tenants=request[SESSION].tenants
        )
    except DistilleryError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    rows = await in_thread(request, lambda store: group_stats(store, filters, f"tag:{key}"))
    return render(request, "_by_tag.html", key=key, rows=rows)


# -- completions ----------------------------------------------------------------------


@dataclass
class Listing:
    rows: list[StoredCompletion]
    next_cursor: str | None


def page_filters(request: web.Request) -> query.Filters:
    """The page's filters from its URL, scoped to what the session may see."""
    q = request.query
    stream = {"yes": True, "no": False}.get(q.get("stream", ""))
    return query.parse_filters(
        tags=[t for t in q.getall("tag", []) if t.strip()],
        model=q.get("model"),
        since=q.get("since"),
        until=q.get("until"),
        status=q.get("status") or None,
        finish_reason=q.get("finish_reason"),
        stream=stream,
        text=q.get("q"),
        tenants=request[SESSION].tenants,
    )


async def completions(request: web.Request) -> web.Response:
    error = None
    listing = Listing([], None)
    try:
        filters = page_filters(request)
    except DistilleryError as exc:
        error = str(exc)
    else:
        after = request.query.get("after") or None

        def work(store: Store) -> Listing:
            rows = query.find(store, filters, after=after, limit=PAGE + 1)
            more = len(rows) > PAGE
            return Listing(rows[:PAGE], rows[PAGE - 1]["id"] if more else None)

        listing = await in_thread(request, work)
    tenants = request[SESSION].tenants

    def pickers(store: Store) -> dict[str, list[str]]:

        return {**overview.stored_values(store, tenants), "tags": query.recent_tags(store, tenants)}

    picks = (
        {"model": [], "app": [], "tags": []}
        if request.headers.get("HX-Request")
        else await in_thread(request, pickers)
    )
    model = request.query.get("model")
    if model and not listing.rows and not error and model not in picks["model"]:
        error = f"No stored call was answered by a model named {model!r}: pick one from the list."
    kept = [(k, v) for k, v in request.query.items() if k in FILTER_FIELDS and v]
    next_url = (
        "?" + urlencode([*kept, ("after", listing.next_cursor)]) if listing.next_cursor else None
    )
    template = "_rows.html" if request.headers.get("HX-Request") else "completions.html"
    return render(
        request,
        template,
        rows=listing.rows,
        next_url=next_url,
        error=error,
        form=_form(request),
        query=urlencode(kept),
        picks=picks,
        done=request.query.get("done"),
        base_url=_base_url(request),
    )


EXPORT_BATCH = 1000


async def export(request: web.Request) -> web.StreamResponse:
    """Every call the page's filter matches, oldest first, as a download: JSON lines of
    whole records (what ``completions export`` writes) or CSV of the list's columns."""

    try:
        filters = page_filters(request)
    except DistilleryError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    kind = request.match_info["format"]
    response = web.StreamResponse(
        headers={
            "Content-Type": "application/x-ndjson" if kind == "jsonl" else "text/csv",
            "Content-Disposition": f'attachment; filename="completions.{kind}"',
        }
    )
    await response.prepare(request)
    if kind == "csv":
        await response.write((",".join(query.LIST_COLUMNS) + "\r\n").encode())
    after: str | None = None
    while True:
        batch = functools.partial(
            query.find, filters=filters, order="asc", after=after, limit=EXPORT_BATCH
        )
        rows = await in_thread(request, batch)
        if not rows:
            break
        if kind == "jsonl":
            chunk = "".join(dumps(dict(row)) + "\n" for row in rows)
        else:
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            for row in rows:
                line = query.summary(row)
                writer.writerow([csv_cell(line.get(c)) for c in query.LIST_COLUMNS])
            chunk = buffer.getvalue()
        await response.write(chunk.encode())
        after = rows[-1]["id"]
    await response.write_eof()
    return response


def _base_url(request: web.Request) -> str:
    """This proxy's OpenAI base URL, for the first call's two lines (when none yet)."""
    return f"{request.scheme}://{request.host}/v1"


def _form(request: web.Request) -> dict[str, Any]:
    q = request.query
    return {
        "tags": [t for t in q.getall("tag", []) if t],
        **{name: q.get(name, "") for name in FILTER_FIELDS if name != "tag"},
    }


async def _one(request: web.Request) -> StoredCompletion:
    ref = request.match_info["id"]
    tenants = request[SESSION].tenants
    record = await in_thread(request, lambda store: query.get(store, ref, tenants))
    if record is None:
        # Another tenant's call is "not found", exactly like one that does not exist.
        raise web.HTTPNotFound(text=f"No call {ref!r} here.")
    return record


async def completion(request: web.Request, error: str | None = None) -> web.Response:
    record = await _one(request)
    return render(
        request, "completion.html", status=400 if error else 200, record=record, error=error
    )


async def edit_tags(request: web.Request) -> web.Response:
    """Replace a call's tags with the form's ``key=value`` lines."""
    record = await _one(request)
    form = await request.post()
    text = form.get("tags")
    lines = [line.strip() for line in (text if isinstance(text, str) else "").splitlines()]
    try:
        tags = dict(query.parse_tag(line) for line in lines if line)
    except DistilleryError as exc:
        return await completion(request, str(exc))
    problem = check_metadata(tags)
    if problem:
        return await completion(request, f"Tags not saved: {problem}.")
    await in_thread(
        request,
        lambda store: query.relabel(store, [record["id"]], set_tags=tags, replace_all=True),
    )
    raise web.HTTPSeeOther(url(request, f"completions/{record['id']}"))


# -- bulk actions ---------------------------------------------------------------------

ACTIONS = {"tag": "Tag", "untag": "Untag", "delete": "Delete"}


async def bulk(request: web.Request) -> web.StreamResponse:
    """Tag, untag or delete the selected calls, or every call the filter matches.

    The first POST answers with a confirmation that says how many calls it touches;
    only the second (``confirm=yes``) changes anything.  Selected ids are narrowed to
    the calls this session may see, like every other query.
    """
    form = await request.post()
    action = str(form.get("action") or "")
    if action not in ACTIONS:
        raise web.HTTPBadRequest(text="Choose tag, untag or delete.")
    tenants = request[SESSION].tenants
    selected = [str(v) for v in form.getall("id", [])]
    scope = "selected" if form.get("scope") != "filter" else "filter"
    try:
        filters = (
            query.Filters(ids=tuple(selected), tenants=tenants)
            if scope == "selected"
            else page_filters(request)
        )
        tags = dict(query.parse_tag(t) for t in str(form.get("tags") or "").split() if t)
        keys = [k for k in str(form.get("keys") or "").split() if k]
    except DistilleryError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    if scope == "selected" and not selected:
        raise web.HTTPBadRequest(text="Select some calls first, or act on the whole filter.")
    if action == "tag" and not tags:
        raise web.HTTPBadRequest(text="Give the tags to set, as key=value.")
    if action == "untag" and not keys:
        raise web.HTTPBadRequest(text="Give the tag keys to remove.")
    ids = await in_thread(request, lambda store: query.matching_ids(store, filters))
    if form.get("confirm") != "yes":
        return render(
            request,
            "confirm.html",
            action=action,
            label=ACTIONS[action],
            count=len(ids),
            fields=[(k, str(v)) for k, v in form.items() if k not in ("csrf", "confirm")],
            query=request.query_string,
            tags=tags,
            keys=keys,
        )

    def work(store: Store) -> int:
        if action == "delete":
            return query.delete(store, ids)
        if action == "tag":
            return query.relabel(store, ids, set_tags=tags)
        return query.relabel(store, ids, remove=keys)

    try:
        changed = await in_thread(request, work)
    except DistilleryError as exc:
        raise web.HTTPBadRequest(text=f"Nothing changed: {exc}") from None
    done = "deleted" if action == "delete" else ("tagged" if action == "tag" else "untagged")
    kept = [(k, v) for k, v in request.query.items() if k in FILTER_FIELDS and v]
    notice = f"{changed} calls {done}."
    raise web.HTTPSeeOther(url(request, "completions") + "?" + urlencode([*kept, ("done", notice)]))
