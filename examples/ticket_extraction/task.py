"""A small structured task for the end-to-end proof: support tickets to JSON.

The teacher is a local OpenAI-compatible server that extracts the fields
perfectly; `tickets()` makes the traffic an app would send.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from typing import Any

from aiohttp import web

SYSTEM = "Extract the customer's name, the product and the order number as JSON."
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]
PRODUCTS = ["blender", "kettle", "toaster", "lamp", "router", "phone", "heater", "mixer"]
TEMPLATES = [
    "hi, {name} here. my {product} from order {order} broke.",
    "{name} writing: the {product} in order {order} arrived damaged.",
    "order {order}: {name} says the {product} does not work.",
]
_TICKET = re.compile(
    r"(?:hi, (\w+) here\. my (\w+) from order (\d+)|(\w+) writing: the (\w+) in order (\d+)|order (\d+): (\w+) says the (\w+))"
)


def tickets(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        rng.choice(TEMPLATES).format(
            name=rng.choice(NAMES), product=rng.choice(PRODUCTS), order=rng.randrange(100, 1000)
        )
        for _ in range(count)
    ]


def extract(ticket: str) -> str:
    match = _TICKET.search(ticket)
    if match is None:
        return "{}"
    groups = match.groups()
    if groups[0]:
        name, product, order = groups[0:3]
    elif groups[3]:
        name, product, order = groups[3:6]
    else:
        order, name, product = groups[6:9]
    return json.dumps({"name": name, "product": product, "order": int(order)})


def teacher_app(answer_for: Callable[[str], str] = extract) -> web.Application:
    """An OpenAI-compatible teacher that answers the last user message with ``answer_for``
    (bench/distill_tasks.py serves its own tasks with it)."""

    async def chat(request: web.Request) -> web.Response:
        body: dict[str, Any] = await request.json()
        return web.json_response(
            _completion(body["model"], answer_for(body["messages"][-1]["content"]))
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


def _completion(model: str, answer: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-teacher",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 30, "completion_tokens": 15, "total_tokens": 45},
    }
