"""OpenAI's stored-completions API, served from the local store.

``client.chat.completions.list/retrieve/update/delete`` and ``.messages.list``
work against the proxy as against OpenAI, over what the proxy captured.  A
caller sees only the calls made with its own key (its tenant), as OpenAI scopes
stored completions to a project; an admin key sees all.  Another tenant's
completion answers 404, exactly like one that does not exist.

What is served is what was stored: redacted text, and only calls that
succeeded.  Captures reach the database within ``capture.flush_interval``, so
a completion is listed a moment after it was created (OpenAI, too, is
eventually consistent here).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
import sqlalchemy as sa
from aiohttp import web

from distillery.core.api_errors import APIError, json_object
from distillery.core.shapes import check_metadata, message_text
from distillery.proxy.state import ANONYMOUS, PROXY, Caller, log_fields
from distillery.store import Store, query
from distillery.store.records import StoredCompletion

T = TypeVar("T")
MAX_LIMIT = 100
# Request parameters OpenAI echoes on a stored completion.
ECHOED = (
    "temperature",
    "top_p",
    "seed",
    "tools",
    "tool_choice",
    "response_format",
    "presence_penalty",
    "frequency_penalty",
    "service_tier",
)
_METADATA_PARAM = re.compile(r"^metadata\[(.+)\]$")


def _caller(request: web.Request) -> Caller:
    caller = request.app[PROXY].caller(request)
    log_fields(request)["tenant"] = caller.tenant
    if caller.tenant == ANONYMOUS:
        # Keyless callers have no identity to scope by: one of them must not
        # read every other keyless caller's traffic.
        raise APIError(
            401,
            "The stored completions API needs an API key: it lists only the calls "
            "made with the key you present.",
            code="invalid_api_key",
        )
    return caller


async def _run(request: web.Request, work: Callable[[Store], T]) -> T:
    """Run a store query off the event loop."""
    store = request.app[PROXY].store
    assert store is not None
    try:
        return await asyncio.to_thread(work, store)
    except sa.exc.OperationalError:
        raise APIError(
            503, "The proxy's local store is unavailable; try again shortly.", type="server_error"
        ) from None


def _json(body: Any) -> web.Response:
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def _not_found(ref: str) -> APIError:
    return APIError(404, f"Chat completion with id '{ref}' not found.", code="not_found")


def _limit(request: web.Request) -> int:
    """The spec's ``limit``: any integer from 0 (an empty page; ``has_more`` still says if
    there are calls) up; pages hold at most ``MAX_LIMIT``."""
    raw = request.query.get("limit", "20")
    try:
        limit = int(raw)
    except ValueError:
        limit = -1
    if limit < 0:
        raise APIError(
            400,
            f"Invalid 'limit': expected a non-negative integer, got {raw!r}.",
            param="limit",
            code="invalid_value",
        )
    return min(limit, MAX_LIMIT)


def _order(request: web.Request) -> query.Order:
    order = request.query.get("order", "asc")
    if order not in ("asc", "desc"):
        raise APIError(
            400,
            f"Invalid 'order': expected 'asc' or 'desc', got {order!r}.",
            param="order",
            code="invalid_value",
        )
    return order  # type: ignore[return-value]


def as_chat_completion(record: StoredCompletion) -> dict[str, Any]:
    """A stored record in the shape of OpenAI's stored chat.completion."""
    response = record.get("response") or {}
    created = response.get("created") or int(record["created_at"].timestamp())
    item: dict[str, Any] = {
        "object": "chat.completion",
        "id": record.get("completion_id") or record["id"],
        "model": response.get("model")
        or record.get("model_served")
        or record.get("model_requested"),
        "created": created,
        "request_id": record.get("upstream_request_id"),
        "metadata": record.get("metadata") or {},
        "choices": response.get("choices") or [],
        "usage": response.get("usage"),
        "system_fingerprint": response.get("system_fingerprint"),
        "service_tier": response.get("service_tier"),
    }
    request = record.get("request") or {}
    for key in ECHOED:
        if key in request and item.get(key) is None:
            item[key] = request[key]
    return item


def _page(items: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }


def _completion(store: Store, ref: str, caller: Caller) -> StoredCompletion:
    record = query.get(store, ref, caller.tenants)
    if record is None or record.get("response") is None or record.get("error") is not None:
        raise _not_found(ref)
    return record


async def list_completions(request: web.Request) -> web.Response:
    limit, order = _limit(request), _order(request)
    tags = []
    for name, value in request.query.items():
        match = _METADATA_PARAM.match(name)
        if match:
            tags.append((match.group(1), value))
        elif name not in ("model", "after", "limit", "order"):
            raise APIError(
                400, f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter"
            )
    after = request.query.get("after")
    caller = _caller(request)

    def work(store: Store) -> list[StoredCompletion]:
        cursor = None
        if after:
            record = query.get(store, after, caller.tenants)
            if record is None:
                raise APIError(
                    400,
                    f"Invalid 'after': no chat completion '{after}'.",
                    param="after",
                    code="invalid_value",
                )
            cursor = record["id"]
        filters = query.Filters(
            tags=tuple(tags),
            model=request.query.get("model") or None,
            tenants=caller.tenants,
            completions_only=True,
        )
        return query.find(store, filters, order=order, after=cursor, limit=limit + 1)

    records = await _run(request, work)
    return _json(_page([as_chat_completion(r) for r in records], limit))


async def retrieve_completion(request: web.Request) -> web.Response:
    ref = request.match_info["completion_id"]
    caller = _caller(request)
    record = await _run(request, lambda store: _completion(store, ref, caller))
    return _json(as_chat_completion(record))


async def update_completion(request: web.Request) -> web.Response:
    ref = request.match_info["completion_id"]
    body = json_object(await request.read())
    if set(body) - {"metadata"} or "metadata" not in body:
        raise APIError(
            400, "Only 'metadata' can be updated: send {\"metadata\": {...}}.", param="metadata"
        )
    metadata = body["metadata"] or {}
    problem = check_metadata(metadata)
    if problem:
        raise APIError(
            400, f"Invalid 'metadata': {problem}.", param="metadata", code="invalid_value"
        )
    caller = _caller(request)

    def work(store: Store) -> StoredCompletion:
        record = _completion(store, ref, caller)
        query.relabel(store, [record["id"]], set_tags=metadata, replace_all=True)
        return {**record, "metadata": metadata}

    record = await _run(request, work)
    return _json(as_chat_completion(record))


async def delete_completion(request: web.Request) -> web.Response:
    ref = request.match_info["completion_id"]
    caller = _caller(request)

    def work(store: Store) -> StoredCompletion:
        record = _completion(store, ref, caller)
        query.delete(store, [record["id"]])
        return record

    await _run(request, work)
    return _json({"object": "chat.completion.deleted", "id": ref, "deleted": True})


async def list_messages(request: web.Request) -> web.Response:
    ref = request.match_info["completion_id"]
    limit, order = _limit(request), _order(request)
    after = request.query.get("after")
    caller = _caller(request)
    record = await _run(request, lambda store: _completion(store, ref, caller))
    base = record.get("completion_id") or record["id"]
    messages = (record.get("request") or {}).get("messages") or []
    items = [_message(f"{base}-{i}", m) for i, m in enumerate(messages) if isinstance(m, dict)]
    if order == "desc":
        items.reverse()
    if after:
        position = next((i for i, item in enumerate(items) if item["id"] == after), None)
        if position is None:
            raise APIError(
                400,
                f"Invalid 'after': no message '{after}' in this chat completion.",
                param="after",
                code="invalid_value",
            )
        items = items[position + 1 :]
    return _json(_page(items, limit))


def _message(message_id: str, message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    parts = content if isinstance(content, list) else None
    item: dict[str, Any] = {
        "id": message_id,
        "role": message.get("role"),
        "content": message_text(message) if parts is not None else content,
        "name": message.get("name"),
        "content_parts": parts,
    }
    for key in ("tool_calls", "tool_call_id", "refusal"):
        if key in message:
            item[key] = message[key]
    return item


def add_routes(app: web.Application, prefix: str, suffix: str) -> None:
    """Register the stored-completions routes (before the pass-through catch-all)."""
    base = prefix + "/v1/chat/completions"
    one = base + "/{completion_id}"
    app.router.add_get(base, list_completions, name="stored_list" + suffix)
    app.router.add_get(one, retrieve_completion, name="stored_get" + suffix)
    app.router.add_post(one, update_completion, name="stored_update" + suffix)
    app.router.add_delete(one, delete_completion, name="stored_delete" + suffix)
    app.router.add_get(one + "/messages", list_messages, name="stored_messages" + suffix)
