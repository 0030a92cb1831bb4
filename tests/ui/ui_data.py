"""What the dashboard's tests share: the keys, a stored call as the proxy writes one, an
eval run's summary, a proxy with one route to a fake student, and a signed-in client and
the forms it posts."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import httpx
from click.testing import CliRunner

from distillery.cli import cli
from distillery.core.config import key_fingerprint
from distillery.curation.judge import install_in_thread
from distillery.store.records import CaptureRecord

from fake_student import FakeStudent, route_config, served
from helpers import RunningProxy, ServerThread, capture_record, wait_for

ALICE, BOB, ADMIN = "sk-alice", "sk-bob", "sk-admin"
XSS = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 1">'


def call(
    n: int,
    key: str,
    text: str,
    tags: dict[str, str],
    model: str = "gpt-4o",
    created_at: float | None = None,
    **fields: Any,
) -> CaptureRecord:
    return capture_record(
        f"cap_{n:028d}",
        created_at=1_764_300_000.0 + n if created_at is None else created_at,
        tenant=key_fingerprint(key),
        model_requested=model,
        request={"model": model, "messages": [{"role": "user", "content": text}]},
        response={
            "id": f"chatcmpl-{n}",
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": f"answer {n}"},
                    "finish_reason": "stop",
                }
            ],
        },
        finish_reason="stop",
        metadata=tags,
        **fields,
    )


def _entry(mean: float | None, role: str) -> dict[str, Any]:
    stats = {
        "mean": mean,
        "ci_low": None if mean is None else mean - 0.05,
        "ci_high": None if mean is None else mean + 0.05,
        "pass_rate": None if mean is None else mean,
        "n": 0 if mean is None else 20,
        "errors": 20 if mean is None else 0,
        "scale": [0.0, 1.0],
    }
    return {
        "model": "m",
        "role": role,
        "errors": stats["errors"],
        "failed_items": stats["errors"],
        "first_error": None,
        "latency_p50_ms": 12.0,
        "latency_p95_ms": 20.0,
        "prompt_tokens": 100,
        "completion_tokens": 50,
        "cost_usd": None,
        "graders": {"exact": stats},
    }


def eval_summary() -> Any:
    """A run's summary: teacher, a base student without a score, a tuned one named badly."""
    return {
        "items": 20,
        "candidates": {
            "teacher:gpt-4o": _entry(0.95, "teacher"),
            "base student": _entry(None, "base"),
            f"tuned:{XSS}": _entry(0.9, "tuned"),
        },
    }


def routed_dashboard(
    start_proxy: Callable[..., RunningProxy], servers: ServerThread, min_samples: int = 3
) -> RunningProxy:
    """A proxy with the dashboard and one route, support, to a good fake student."""
    student = served(FakeStudent(), servers)
    config = {
        "auth": {"admin_keys": [key_fingerprint(ADMIN)]},
        **route_config(student, min_samples=min_samples),
    }
    return start_proxy(config, dashboard=True, extensions=[install_in_thread])


OPEN: list[httpx.Client] = []


def browser(proxy: RunningProxy) -> httpx.Client:
    """A cookie-keeping client (closed when the test ends)."""
    client = httpx.Client(base_url=proxy.url, follow_redirects=False, timeout=10)
    OPEN.append(client)
    return client


def sign_in(proxy: RunningProxy, key: str) -> httpx.Client:
    client = browser(proxy)
    page = client.get("/ui/sign-in")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert token is not None
    done = client.post("/ui/sign-in", data={"csrf": token.group(1), "key": key})
    assert done.status_code == 303 and done.headers["location"] == "/ui/completions"
    return client


def ids_on(page: str) -> list[str]:
    return re.findall(r'<tr class="call" data-id="([^"]+)"', page)


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found is not None
    return found.group(1)


# -- datasets, fine-tunes, evals ------------------------------------------------------


def build_dataset(proxy: RunningProxy) -> None:
    """`dataset build support` over the proxy's store, as a user runs it."""
    url = proxy.settings.storage.resolved_database_url()
    args = ["support", "--tag", "app=support", "--val-fraction", "0.2", "--incremental"]
    done = CliRunner().invoke(
        cli, ["dataset", "build", *args, "--database-url", url], catch_exceptions=False
    )
    assert done.exit_code == 0, done.output


def distill_form(client: httpx.Client, query: str, **fields: str) -> httpx.Response:
    page = client.get(f"/ui/distill?{query}")
    assert page.status_code == 200, page.text
    form = {"csrf": csrf_of(page.text), "val_fraction": "0.2", "backend": "openai"} | fields
    return client.post(f"/ui/distill?{query}", data=form)


def task_result(client: httpx.Client, task: str, what: str) -> str:
    """Follow a background task's page until it sends the client on; returns where to.
    A task that failed fails the test with its page."""
    done = ""

    def finished() -> bool:
        nonlocal done
        answer = client.get(task)
        assert "task-error" not in answer.text, answer.text
        done = answer.headers.get("location", "")
        return answer.status_code == 303

    wait_for(finished, 60, what)
    return done
