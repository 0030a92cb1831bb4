"""Screenshots of the dashboard for the README, from a seeded demo store.

    python scripts/screenshots.py [OUT_DIR]        (default: docs/)

Starts the proxy with the dashboard against a fake upstream (the tests' fakes),
sends demo traffic through it with the openai SDK, builds a dataset, runs a
fine-tune on the in-memory backend, stores a demo eval run, then drives Debian's
chromium (headless, through chromium-driver) over each page.  Everything runs in
a temporary directory; only the PNG files are written to OUT_DIR.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fake_openai import FakeOpenAI  # noqa: E402
from helpers import ServerThread  # noqa: E402

PAGES = (
    ("overview", "/ui/"),
    ("completions", "/ui/completions?tag=app%3Dsupport"),
    ("call", None),  # the first support call, found on the list
    ("distill", "/ui/distill?tag=app%3Dsupport"),
    ("datasets", "/ui/datasets/support/1"),
    ("job", None),
    ("eval", "/ui/evals/eval_demo?show=all"),
    ("routes", "/ui/routes"),
)
SYSTEM = "You are ACME's support assistant."
QUESTIONS = [
    "Where is my order 1042? It was due on Monday.",
    "How do I change the billing address on my invoices?",
    "Can I get a refund for the annual plan I bought yesterday?",
    "The app logs me out every few minutes on Android.",
    "Do you ship to Norway, and how long does it take?",
    "I was charged twice for order 877.",
    "How do I add a second user to my account?",
    "My discount code SPRING10 says it expired.",
]


def seed(url: str, data_dir: Path) -> dict[str, str]:
    import openai
    from click.testing import CliRunner

    from distillery.cli import cli
    from distillery.core.config import load_settings
    from distillery.curation.training.backends import JobSpec, new_job_id
    from distillery.curation.training.jobs import refresh, start_job
    from distillery.curation.training.memory import InMemoryBackend
    from distillery.store import datasets, evals, open_store

    client = openai.OpenAI(base_url=url + "/v1", api_key="sk-admin-demo")
    for round_ in range(3):
        for n, question in enumerate(QUESTIONS):
            app = "support" if n % 4 else "sales"
            client.chat.completions.create(
                model="fake-model",
                messages=[
                    {"role": "system", "content": "You are ACME's support assistant."},
                    {"role": "user", "content": f"{question} (ticket {round_ * 10 + n})"},
                ],
                metadata={"app": app, "env": "prod"},
            )
    settings = load_settings(overrides={"storage.data_dir": str(data_dir)})
    database = settings.storage.resolved_database_url()
    store = open_store(database)
    import time

    for _ in range(200):  # the capture writer stores in the background
        if store.count() >= 3 * len(QUESTIONS):
            break
        time.sleep(0.05)
    args = ["support", "--tag", "app=support", "--val-fraction", "0.2", "--no-near-dedupe"]
    built = CliRunner().invoke(cli, ["dataset", "build", *args, "--database-url", database])
    assert built.exit_code == 0, built.output
    version = datasets.latest(store, "support")
    assert version is not None
    backend = InMemoryBackend()
    job = start_job(store, backend, JobSpec(new_job_id(), version, "gpt-4.1-mini"))
    for _ in range(3):
        job = refresh(store, job, backend)
    samples, items = _demo_items()
    source = {"source": "support@1 (distill)"}
    evals.save_run(store, "eval_demo", source, _demo_summary(), samples, items)
    _history(store)
    _pairs(store)
    store.close()
    return {"job": job["id"]}


def _history(store: Any) -> None:
    """A week of earlier traffic (stored directly): the overview's series has a shape."""
    import random
    import time

    from distillery.core.config import key_fingerprint

    from helpers import capture_record

    rng, now = random.Random(4), time.time()
    records = []
    for n in range(1400):
        age = rng.uniform(3600, 7 * 86400) * (0.4 if n % 3 == 0 else 1.0)
        model = "fake-model" if n % 5 else "gpt-4o-mini"
        records.append(
            capture_record(
                f"cap_{n:028d}",
                created_at=now - age,
                tenant=key_fingerprint("sk-admin-demo"),
                status=500 if n % 37 == 0 else 200,
                latency_ms=rng.lognormvariate(6.3, 0.5),
                model_requested=model,
                prompt_tokens=rng.randint(300, 900),
                completion_tokens=rng.randint(40, 200),
                prompt_fingerprint="fp_support" if n % 4 else "fp_sales",
                request={
                    "messages": [{"role": "system", "content": "You are ACME's support assistant."}]
                },
                metadata={"app": "support" if n % 4 else "sales"},
            )
        )
    store.insert(records)


def _pairs(store: Any) -> None:
    """Graded pairs for the demo route: the student beside the teacher on live calls."""
    from datetime import UTC, datetime

    from distillery.store import query
    from distillery.store import routes as route_store

    calls = query.find(store, query.parse_filters(tags=["app=support"]), limit=12)
    for n, call in enumerate(calls):
        teacher = (call.get("response") or {}).get("choices", [{}])[0].get("message", {})
        good = n % 6 != 5
        text = teacher.get("content") if good else "Please contact support."
        score = 1.0 if good else 0.0
        route_store.add_sample(
            store,
            {
                "id": call["id"],
                "route": "support",
                "tenant": call["tenant"],
                "created_at": datetime.now(UTC),
                "student_model": "ft:gpt-4.1-mini:acme:support",
                "student": "ft:gpt-4.1-mini:acme:support@student",
                "status": "ok",
                "error": None,
                "response": {
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]
                },
                "latency_ms": 80.0 + n,
                "prompt_tokens": 40,
                "completion_tokens": 12,
                "teacher_model": "gpt-4o",
                "teacher_latency_ms": 900.0 + 10 * n,
                "teacher_prompt_tokens": 40,
                "teacher_completion_tokens": 12,
                "scores": {"exact": score},
                "score": score,
                "teacher_score": 1.0,
            },
        )


def _demo_items() -> tuple[Any, Any]:
    """Four items of the demo run, each candidate's answer and the verdicts."""
    answers = {
        "teacher:gpt-4o": ["refund", "billing", "android", "shipping"],
        "base:gpt-4.1-mini": ["refund", "account", "android", "returns"],
        "tuned:ft:gpt-4.1-mini:acme:support": ["refund", "billing", "android", "returns"],
    }
    reference = ["refund", "billing", "android", "shipping"]
    questions = [QUESTIONS[2], QUESTIONS[1], QUESTIONS[3], QUESTIONS[4]]
    items = [
        {
            "item": i,
            "item_key": f"demo{i}",
            "messages": [
                {"role": "system", "content": "Classify the ticket: one word."},
                {"role": "user", "content": question},
            ],
            "reference": {"role": "assistant", "content": reference[i]},
        }
        for i, question in enumerate(questions)
    ]
    samples = [
        {
            "item": i,
            "candidate": label,
            "item_key": f"demo{i}",
            "output": {"role": "assistant", "content": said[i]},
            "error": None,
            "grades": {
                "exact": {
                    "score": float(said[i] == reference[i]),
                    "passed": said[i] == reference[i],
                    "detail": "",
                }
            },
            "latency_ms": 80.0,
            "prompt_tokens": 40,
            "completion_tokens": 2,
        }
        for label, said in answers.items()
        for i in range(len(questions))
    ]
    return samples, items


def _demo_summary() -> Any:
    def entry(mean: float, low: float, high: float, role: str, cost: float) -> dict[str, Any]:
        stats = {
            "mean": mean,
            "ci_low": low,
            "ci_high": high,
            "pass_rate": mean,
            "n": 200,
            "errors": 0,
            "scale": [0.0, 1.0],
        }
        return {
            "model": "demo",
            "role": role,
            "errors": 0,
            "failed_items": 0,
            "first_error": None,
            "latency_p50_ms": 900.0 if role == "teacher" else 80.0,
            "latency_p95_ms": 1800.0 if role == "teacher" else 140.0,
            "prompt_tokens": 40_000,
            "completion_tokens": 9_000,
            "cost_usd": cost,
            "graders": {"exact": stats},
        }

    return {
        "items": 200,
        "candidates": {
            "teacher:gpt-4o": entry(0.97, 0.945, 0.99, "teacher", 0.19),
            "base:gpt-4.1-mini": entry(0.61, 0.545, 0.675, "base", 0.02),
            "tuned:ft:gpt-4.1-mini:acme:support": entry(0.95, 0.92, 0.975, "tuned", 0.02),
        },
    }


def main(out: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from distillery.core.config import Settings, key_fingerprint
    from distillery.proxy.app import make_app
    from distillery.proxy.http import ProxyRunner
    from distillery.proxy.server import open_capture_store
    from distillery.ui.app import mount

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        sys.exit("Needs Debian's chromium and chromium-driver: apt-get install chromium-driver")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        os.environ["DISTILLERY_DATA_DIR"] = tmp  # every part, the CLI's build included
        servers = ServerThread()
        try:
            upstream = FakeOpenAI()
            upstream.url, _ = servers.serve(upstream.app)  # type: ignore[attr-defined]
            settings = Settings.model_validate(
                {
                    "upstream": {"url": upstream.url + "/v1"},  # type: ignore[attr-defined]
                    "storage": {"data_dir": tmp},
                    "auth": {"admin_keys": [key_fingerprint("sk-admin-demo")]},
                    # The fake upstream's model, priced like gpt-4o for the demo's costs.
                    "prices": {"fake-model": {"input": 2.5, "output": 10.0}},
                    # A route whose pairs the demo stores (no judge runs: nothing is asked).
                    "endpoints": {"student": {"base_url": upstream.url + "/v1"}},  # type: ignore[attr-defined]
                    "routes": {
                        "support": {
                            "match": {"app": "support"},
                            "student": "ft:gpt-4.1-mini:acme:support@student",
                            "graders": ["exact"],
                            "bar": 0.8,
                            "min_samples": 10,
                        }
                    },
                }
            )
            store = open_capture_store(settings)
            url, _ = servers.serve(make_app(settings, store, [mount]), ProxyRunner)
            ids = seed(url, data_dir)
            options = webdriver.ChromeOptions()
            options.binary_location = chromium
            for flag in ("--headless=new", "--no-sandbox", "--window-size=1400,900"):
                options.add_argument(flag)
            options.add_argument(f"--user-data-dir={data_dir / 'chrome'}")
            driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
            wait = WebDriverWait(driver, 30)
            try:
                driver.get(url + "/ui/sign-in")
                driver.find_element(By.ID, "key").send_keys("sk-admin-demo")
                driver.find_element(By.ID, "sign-in").click()
                # A page asked for before the sign-in's answer is in would be the sign-in.
                wait.until(lambda d: "/ui/sign-in" not in d.current_url, "signed in")
                for name, path in PAGES:
                    if name == "call":
                        listing = url + "/ui/completions?tag=app%3Dsupport"
                        driver.get(listing)
                        driver.find_element(By.CSS_SELECTOR, "#rows tr.call a").click()
                        wait.until(lambda d, at=listing: d.current_url != at, "the call's page")
                    elif name == "job":
                        driver.get(url + f"/ui/jobs/{ids['job']}")
                    else:
                        assert path is not None
                        driver.get(url + path)
                    # The overview's four charts need a tall page; the others fit in one.
                    driver.set_window_size(1400, 1700 if name == "overview" else 900)
                    driver.save_screenshot(str(out / f"dashboard-{name}.png"))
                    print(f"wrote {out / f'dashboard-{name}.png'}")
            finally:
                driver.quit()
            store.close()
        finally:
            servers.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs")
