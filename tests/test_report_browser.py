"""The HTML eval report in a real headless browser: nothing drawn outside its chart.

Skipped with the reason where Debian's chromium is not installed (.ci/run installs it).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from distillery.curation.evals.report import render
from distillery.store.records import CandidateSummary, EvalRunRecord, GraderStats

# Real processes (proxy workers, trainers): seconds each, so out of the fast loop.
pytestmark = pytest.mark.slow


CHROMIUM = shutil.which("chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Run in the page: every SVG text must lie inside its SVG (transforms included).
PROBE = """<script>
const clipped = [];
for (const svg of document.querySelectorAll("svg")) {
  const box = svg.getBoundingClientRect();
  for (const text of svg.querySelectorAll("text")) {
    const r = text.getBoundingClientRect();
    if (r.left < box.left - 0.5 || r.right > box.right + 0.5 ||
        r.top < box.top - 0.5 || r.bottom > box.bottom + 0.5) clipped.push(text.textContent);
  }
}
document.body.setAttribute("data-clipped", JSON.stringify(clipped));
</script></body>"""


def candidate(mean: float | None, cost: float, errors: int = 0) -> CandidateSummary:
    stats: GraderStats = {
        "mean": mean,
        "ci_low": None if mean is None else max(0.0, mean - 1.5),
        "ci_high": None if mean is None else min(10.0, mean + 1.5),
        "pass_rate": None if mean is None else 0.5,
        "n": 6 - errors,
        "errors": errors,
        "scale": [0, 10],
    }
    return {
        "model": "m",
        "errors": errors,
        "failed_items": errors,
        "first_error": None,
        "latency_p50_ms": 120.0,
        "latency_p95_ms": 300.0,
        "prompt_tokens": 60,
        "completion_tokens": 30,
        "cost_usd": cost,
        "graders": {"judge": stats},
    }


def browser(*args: str, user_data: Path) -> str:
    done = subprocess.run(
        [str(CHROMIUM), *FLAGS, f"--user-data-dir={user_data}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return str(done.stdout)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium: apt-get install chromium")
def test_the_report_draws_nothing_outside_its_charts(tmp_path: Path) -> None:
    """Long candidate names, intervals at the top of the scale, a candidate without a score
    and points at the right edge: every label stays inside its chart."""
    run: EvalRunRecord = {
        "id": "eval_browser",
        "config": {"source": "support@3 (distill)", "reference_models": {"gpt-4o": 6}},
        "summary": {
            "items": 6,
            "candidates": {
                "tuned:ft:gpt-4.1-mini:acme:support:abc123-with-a-very-long-suffix": candidate(
                    9.4, 0.001
                ),
                "teacher:gpt-4o-2024-08-06": candidate(9.9, 0.01),
                "base:weak": candidate(None, 0.0005, errors=6),
            },
        },
    }
    page = render(run, [], []).replace("</body>", PROBE)
    path = tmp_path / "report.html"
    path.write_text(page)
    dom = browser("--dump-dom", path.as_uri(), user_data=tmp_path / "profile")
    found = re.search(r'data-clipped="([^"]*)"', dom)
    assert found, dom[-500:]
    assert json.loads(found.group(1).replace("&quot;", '"')) == []
    shot = tmp_path / "report.png"
    browser(
        f"--screenshot={shot}", "--window-size=1000,900", path.as_uri(), user_data=tmp_path / "p2"
    )
    assert shot.stat().st_size > 10_000  # a page was drawn (looked at by hand: README)
