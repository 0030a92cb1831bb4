"""What the dashboard's tests share: the keys, a stored call as the proxy writes one, an
eval run's summary, and a proxy with one route to a fake student."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from distillery.core.config import key_fingerprint
from distillery.curation.judge import install_in_thread
from distillery.store.records import CaptureRecord

from fake_student import FakeStudent, served
from helpers import RunningProxy, ServerThread, capture_record

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
        "endpoints": {"student": {"base_url": student.url + "/v1"}},
        "routes": {
            "support": {
                "match": {"app": "support"},
                "student": "tiny@student",
                "graders": ["exact"],
                "bar": 0.9,
                "min_samples": min_samples,
            }
        },
    }
    return start_proxy(config, dashboard=True, extensions=[install_in_thread])
