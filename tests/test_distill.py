"""`distillery distill` on the OpenAI-style backend: fakes for the API, the models and the judge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from click.testing import CliRunner, Result

from distillery.cli import cli
from distillery.store import open_store

from fake_finetuning import FakeFineTuning
from fake_models import FakeModels, answer
from helpers import ServerThread, record


@pytest.fixture
def provider(servers: ServerThread) -> tuple[str, FakeFineTuning, FakeModels]:
    """One server that fine-tunes (FakeFineTuning) and answers chat (FakeModels)."""
    tuning, models = FakeFineTuning(), FakeModels()
    app = web.Application()
    for route in list(tuning.app.router.routes()) + list(models.app.router.routes()):
        if route.method != "HEAD" and route.resource is not None:
            app.router.add_route(route.method, route.resource.canonical, route.handler)
    url, _ = servers.serve(app)
    return url + "/v1", tuning, models


@pytest.fixture
def db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'distill.db'}"
    questions = [f"question {i}: how many letters?" for i in range(1, 31)]
    store = open_store(url)
    store.insert(
        [
            record(i, q, answer(q), tags={"kind": "odd" if i % 2 else "even"})
            for i, q in enumerate(questions, 1)
        ]
    )
    store.close()
    return url


def distill(db: str, url: str, *extra: Any) -> Result:
    return CliRunner().invoke(
        cli,
        [
            "distill",
            "--name",
            "support",
            "--tag",
            "app=support",
            "--teacher",
            "teacher",
            "--student-base",
            "weak",
            "--backend",
            "openai",
            "--base-url",
            url,
            "--api-key-env",
            "HOME",
            "--grader",
            "exact",
            "--poll-interval",
            "0.01",
            "--database-url",
            db,
            *extra,
        ],
        catch_exceptions=False,
    )


def test_distill_closes_the_gap_and_is_idempotent(
    db: str, provider: tuple[str, FakeFineTuning, FakeModels]
) -> None:
    url, tuning, models = provider
    first = distill(db, url, "--fail-under", "0.9")
    assert first.exit_code == 0, first.output
    assert "Fine-tuned: ft:weak:acme:support:abc123" in first.output
    table = first.output
    assert (
        "teacher:teacher" in table
        and "base:weak" in table
        and "tuned:ft:weak:acme:support:abc123" in table
    )
    [request] = tuning.created
    assert request["model"] == "weak" and request["metadata"]["dataset"] == "support@1"
    calls = len(models.requests)
    again = distill(db, url)
    assert again.exit_code == 0 and "the last result stands" in again.output
    assert (
        len(tuning.created) == 1 and len(models.requests) == calls
    )  # nothing re-run, nothing re-called


def test_a_rerun_with_changed_settings_redoes_what_they_affect(
    db: str, provider: tuple[str, FakeFineTuning, FakeModels], tmp_path: Path
) -> None:
    """The last result stands only for the same settings: other training settings
    fine-tune again, another grader re-grades the same fine-tune, other filters build a
    new dataset version from scratch; each run says what changed."""
    url, tuning, _ = provider
    assert distill(db, url).exit_code == 0
    assert len(tuning.created) == 1

    retrained = distill(db, url, "--epochs", "2")
    assert retrained.exit_code == 0, retrained.output
    assert "Settings changed since the last run: train.hyperparameters" in retrained.output
    assert (
        len(tuning.created) == 2
        and tuning.created[1]["method"]["supervised"]["hyperparameters"]["n_epochs"] == 2
    )
    assert "the last result stands" not in retrained.output

    regraded = distill(db, url, "--epochs", "2", "--grader", "rouge_l")
    assert regraded.exit_code == 0, regraded.output
    assert "eval.graders" in regraded.output and len(tuning.created) == 2
    assert "rouge_l" in regraded.output

    same = distill(db, url, "--epochs", "2", "--grader", "rouge_l")
    assert "the last result stands" in same.output and len(tuning.created) == 2

    refiltered = distill(db, url, "--epochs", "2", "--grader", "rouge_l", "--model", "gpt-4o")
    assert refiltered.exit_code == 0, refiltered.output
    assert "data.filters" in refiltered.output
    assert len(tuning.created) == 3 and tuning.created[2]["metadata"]["dataset"] == "support@2"


def test_an_interrupted_distill_resumes_its_fine_tune(
    db: str, provider: tuple[str, FakeFineTuning, FakeModels], tmp_path: Path
) -> None:
    url, tuning, _ = provider
    assert distill(db, url).exit_code == 0
    state_path = tmp_path / "data" / "distill" / "support" / "state.json"
    state = json.loads(state_path.read_text())
    del state["final_run"]  # as if the process died after starting the fine-tune
    state_path.write_text(json.dumps(state))
    resumed = distill(db, url)
    assert resumed.exit_code == 0, resumed.output
    assert f"Resuming fine-tune {state['job']}" in resumed.output
    assert len(tuning.created) == 1
    assert "final_run" in json.loads(state_path.read_text())
    # The state is a typed record: a field it does not know fails at once, naming it,
    # and so does a field of the wrong kind; nothing is fine-tuned on a guess.
    for broken in ({**state, "dataset_versoin": 1}, {**state, "job": 7}):
        state_path.write_text(json.dumps(broken))
        refused = distill(db, url)
        assert refused.exit_code == 1 and str(state_path) in refused.output, refused.output
        assert (
            "dataset_versoin: a field this version" in refused.output
            or "job: Input should be a valid string" in refused.output
        )
    assert len(tuning.created) == 1


def test_fail_under_judges_the_fine_tuned_student(
    db: str, provider: tuple[str, FakeFineTuning, FakeModels]
) -> None:
    url, *_ = provider
    # The fake fine-tunes answer perfectly; a bar above 1 cannot be met.
    result = distill(db, url, "--fail-under", "1.5")
    assert result.exit_code == 1 and "Below --fail-under: tuned:" in result.output
    assert "it misses the bar of 1.5 by 0.500" in result.output


def test_distill_explains_its_scores_by_tag_and_in_one_line(
    db: str, provider: tuple[str, FakeFineTuning, FakeModels]
) -> None:
    """`--by tag:KEY` breaks each candidate's score down by the tag's values, and one
    line says what the fine-tuned student reached against the teacher and the bar."""
    url, *_ = provider
    result = distill(db, url, "--by", "tag:kind", "--fail-under", "exact=0.9")
    assert result.exit_code == 0, result.output
    breakdown = [line.split() for line in result.output.splitlines() if " odd " in line]
    assert {row[0] for row in breakdown} >= {"teacher:teacher", "base:weak"}
    assert any(" even " in line for line in result.output.splitlines())
    assert (
        "Verdict (exact): the fine-tuned student scores 1.000, 100% of the teacher's 1.000; "
        "it reaches the bar of 0.9 (+0.100)." in result.output
    )
    wrong = distill(db, url, "--by", "kind")
    assert wrong.exit_code == 2 and "--by takes tag:KEY" in wrong.output


def test_the_distill_report_shows_prompts_and_references(
    db: str, provider: tuple[str, FakeFineTuning, FakeModels], tmp_path: Path
) -> None:
    """`distill --html` used to pass no items: its prompt and reference columns were empty."""
    from helpers import HTMLTable as _Table

    url, _, _ = provider
    report = tmp_path / "distill.html"
    result = distill(db, url, "--html", str(report))
    assert result.exit_code == 0, result.output
    parser = _Table()
    parser.feed(report.read_text())
    header, *rows = parser.tables[-1]
    assert header[:2] == ["prompt", "reference"] and rows
    assert all(prompt.strip() and reference.strip() for prompt, reference, *_ in rows)
