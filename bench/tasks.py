"""Three synthetic tasks unlike the ticket example, each with a seeded generator of
inputs and a deterministic teacher that answers them perfectly.

- ``extract``: shipping requests in free word order to a JSON object.
- ``dates``: dates written seven ways (day first where it is ambiguous) to ISO 8601.
- ``route``: support messages to a queue and a priority (``billing/high``).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str
    system: str
    make: Callable[[random.Random], str]  # one input an app would send
    answer: Callable[[str], str]  # the teacher


# extract ------------------------------------------------------------------------------
ITEMS = ["blue widgets", "steel bolts", "paper cups", "oak planks", "led bulbs", "gear oil"]
ITEMS += ["rubber seals", "copper wire", "glass jars", "cotton bags", "solar cells", "ink pads"]
CITIES = ["lisbon", "oslo", "lyon", "porto", "turin", "ghent", "cork", "bergen", "graz", "split"]
SHIP = [
    "please ship {qty} {item} to {city} by {date}",
    "{city} needs {qty} x {item}, deliver before {date}",
    "order for {item} (qty {qty}), destination {city}, due {date}",
    "can you send {item} to {city}? we need {qty} by {date}",
    "due {date}: {qty} {item} for the {city} warehouse",
]
_SHIP = [
    re.compile(
        "^"
        + re.escape(t)
        .replace(r"\{qty\}", r"(?P<qty>\d+)")
        .replace(r"\{item\}", r"(?P<item>[a-z ]+?)")
        .replace(r"\{city\}", r"(?P<city>[a-z]+)")
        .replace(r"\{date\}", r"(?P<date>[\d-]+)")
        + "$"
    )
    for t in SHIP
]


def make_shipment(rng: random.Random) -> str:
    date = f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    return rng.choice(SHIP).format(
        qty=rng.randint(1, 999), item=rng.choice(ITEMS), city=rng.choice(CITIES), date=date
    )


def extract(text: str) -> str:
    for pattern in _SHIP:
        match = pattern.match(text)
        if match:
            return json.dumps(
                {
                    "item": match["item"],
                    "quantity": int(match["qty"]),
                    "city": match["city"],
                    "due": match["date"],
                }
            )
    return "{}"


# dates --------------------------------------------------------------------------------
MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august"]
MONTHS += ["september", "october", "november", "december"]
DATE_FORMATS = [
    "{month} {day}, {year}",
    "{day} {month} {year}",
    "{dd}/{mm}/{year}",
    "{year}.{mm}.{dd}",
    "{mon} {day}th {year}",
    "{day}-{mon}-{yy}",
    "the {day}th of {month} {year}",
]


def make_date(rng: random.Random) -> str:
    year, month, day = rng.randint(1990, 2029), rng.randint(1, 12), rng.randint(1, 28)
    return rng.choice(DATE_FORMATS).format(
        month=MONTHS[month - 1],
        mon=MONTHS[month - 1][:3],
        day=day,
        dd=f"{day:02d}",
        mm=f"{month:02d}",
        year=year,
        yy=f"{year % 100:02d}",
    )


def normalise(text: str) -> str:
    words = re.findall(r"[a-z]+|\d+", text)
    numbers = [w for w in words if w.isdigit()]
    names = [w for w in words if w[:3] in {m[:3] for m in MONTHS} and w not in ("th", "of")]
    if names:
        month = [m[:3] for m in MONTHS].index(names[0][:3]) + 1
        day, year = numbers  # every written-month form has the day before the year
    elif "/" in text:
        day, month, year = int(numbers[0]), int(numbers[1]), numbers[2]
    else:
        year, month, day = numbers[0], int(numbers[1]), int(numbers[2])
    year = int(year)
    if year < 100:
        year += 1900 if year >= 90 else 2000
    return f"{year:04d}-{int(month):02d}-{int(day):02d}"


# route --------------------------------------------------------------------------------
QUEUES = {
    "billing": ["i was charged twice", "my invoice is wrong", "refund the fee on my card"],
    "shipping": ["my parcel has not arrived", "the tracking number is stuck", "wrong address"],
    "technical": ["the app crashes on start", "i cannot sync my files", "login page errors"],
    "account": ["change my email", "delete my account", "reset my two factor device"],
    "returns": ["i want to return the shoes", "the box arrived broken", "exchange for a size up"],
    "sales": ["do you offer volume pricing", "i want a quote for 40 seats", "is there a demo"],
}
URGENT = ["asap", "today please", "this is urgent", "it is blocking my team"]
FILLER = ["hello,", "hi team,", "good morning.", "thanks in advance.", "regards, sam", "cheers"]


def make_message(rng: random.Random) -> str:
    queue = rng.choice(sorted(QUEUES))
    parts = [rng.choice(QUEUES[queue])]
    if rng.random() < 0.4:
        parts.append(rng.choice(URGENT))
    parts.insert(0, rng.choice(FILLER))
    if rng.random() < 0.5:
        parts.append(rng.choice(FILLER))
    return " ".join(parts)


def route(text: str) -> str:
    queue = next(q for q, phrases in QUEUES.items() if any(p in text for p in phrases))
    return f"{queue}/{'high' if any(u in text for u in URGENT) else 'normal'}"


TASKS = {
    "extract": Task(
        "extract", "Extract item, quantity, city and due date as JSON.", make_shipment, extract
    ),
    "dates": Task(
        "dates",
        "Rewrite the date as YYYY-MM-DD. Numeric dates are day first.",
        make_date,
        normalise,
    ),
    "route": Task(
        "route", "Route the message: answer queue/priority (high or normal).", make_message, route
    ),
}


def inputs(task: Task, count: int, seed: int, exclude: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
    """``count`` distinct inputs, none of them in ``exclude`` (held-out prompts are never
    seen in training)."""
    rng, seen, out = random.Random(seed), set(exclude), []
    for _ in range(count * 100):
        if len(out) == count:
            break
        text = task.make(rng)
        if text not in seen:
            seen.add(text)
            out.append(text)
    if len(out) < count:
        raise SystemExit(f"{task.name}: fewer than {count} distinct inputs")
    return out
