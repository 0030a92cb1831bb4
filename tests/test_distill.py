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
    # What it will do, said before it does it.
    assert "Built support@1 in " in first.output
    assert "validation examples; fine-tuning the student on it." in first.output
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
        "No new calls since support@1; fine-tuning again: the training settings changed."
        in retrained.output
    )
    assert "Built" not in retrained.output
    assert (
        len(tuning.created) == 2
        and tuning.created[1]["method"]["supervised"]["hyperparameters"]["n_epochs"] == 2
    )
    assert "the last result stands" not in retrained.output

    regraded = distill(db, url, "--epochs", "2", "--grader", "rouge_l")
    assert regraded.exit_code == 0, regraded.output
    assert "eval.graders" in regraded.output and len(tuning.created) == 2
    assert "grading the same fine-tune again: the eval settings changed." in regraded.output
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
    assert "No new calls since support@1; picking up the fine-tune and grading it." in (
        resumed.output
    )
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
        "Verdict (exact, n=2): the fine-tuned student scores 1.000, 100% of the teacher's 1.000; "
        "it reaches the bar of 0.9 (+0.100)." in result.output
    )
    # Two graded examples: a verdict not to trust, said with its (Wilson) interval.
    assert "Warning: exact graded 2 examples (95% interval 0.342-1.000): too few" in result.output
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


def test_distill_says_what_it_will_do_with_a_version_it_did_not_build(
    db: str, provider: tuple[str, FakeFineTuning, FakeModels], tmp_path: Path
) -> None:
    """A version `dataset build` made (no new calls since): distill trains on it and says so,
    rather than "nothing to do" followed by a fine-tune; with no calls at all it refuses."""
    url, tuning, _ = provider
    built = CliRunner().invoke(
        cli, ["dataset", "build", "support", "--tag", "app=support", "--database-url", db]
    )
    assert built.exit_code == 0, built.output
    result = distill(db, url)
    assert result.exit_code == 0, result.output
    assert "No new calls since support@1; fine-tuning the student on it (" in result.output
    assert "no distill run has used it yet." in result.output
    assert "nothing to do" not in result.output and len(tuning.created) == 1


def test_distill_with_no_calls_fine_tunes_nothing(
    provider: tuple[str, FakeFineTuning, FakeModels], tmp_path: Path
) -> None:
    url, tuning, _ = provider
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    open_store(empty).close()
    refused = distill(empty, url)
    assert refused.exit_code == 1 and not tuning.created
    assert "No calls match the filters: no version of support written." in refused.output
    assert "Nothing to distil yet." in refused.output


@pytest.mark.parametrize(
    ("mean", "n", "scale", "expected"),
    [
        # Published Wilson intervals (Newcombe 1998, table I: 81/263 and 15/148; 0/20; 2/2).
        (81 / 263, 263, [0.0, 1.0], (0.2553, 0.3662)),
        (15 / 148, 148, [0.0, 1.0], (0.0624, 0.1605)),
        (0.0, 20, [0.0, 1.0], (0.0, 0.1611)),
        (1.0, 2, [0.0, 1.0], (0.3424, 1.0)),
        # A judge's 1-10 scale: the same interval, stretched over the scale.
        (10.0, 2, [1.0, 10.0], (1 + 0.342380 * 9, 10.0)),
    ],
)
def test_the_small_sample_warning_interval_is_wilsons(
    mean: float, n: int, scale: list[float], expected: tuple[float, float]
) -> None:
    from distillery.curation.evals.evaluate import wilson

    low, high = wilson(mean, n, scale)
    assert low == pytest.approx(expected[0], abs=1e-4)
    assert high == pytest.approx(expected[1], abs=1e-4)


def test_distill_refuses_to_grade_on_training_examples(
    db: str, provider: tuple[str, FakeFineTuning, FakeModels]
) -> None:
    """No validation split: refused before anything trains, naming the fixes;
    --allow-train-eval grades on training examples and says how few."""
    url, tuning, _ = provider
    built = CliRunner().invoke(
        cli,
        [
            *("dataset", "build", "support", "--tag", "app=support"),
            *("--val-fraction", "0", "--database-url", db),
        ],
    )
    assert built.exit_code == 0, built.output
    refused = distill(db, url)
    assert refused.exit_code == 1 and not tuning.created
    assert "support@1 has no validation split (30 train examples)" in refused.output
    assert "--val-fraction 0.2" in refused.output and "--allow-train-eval" in refused.output
    allowed = distill(db, url, "--allow-train-eval")
    assert allowed.exit_code == 0, allowed.output
    assert len(tuning.created) == 1 and "Verdict (exact, n=30)" in allowed.output


def test_distill_json_is_the_fine_tunes_events_then_the_run(
    db: str, provider: tuple[str, FakeFineTuning, FakeModels]
) -> None:
    """`--json`: stdout is JSON lines only, the fine-tune's events in order (each once),
    then the eval run with the verdict; what distill says, and the verdict, on stderr."""
    url, _, _ = provider
    result = distill(db, url, "--json")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    *events, last = lines
    messages = [event["message"] for event in events]
    assert messages.index("Validating training file") < messages.index(
        "The job has successfully completed"
    )
    assert len(messages) == len(set(messages))
    assert [e["data"]["train_loss"] for e in events if e["data"]] == [1.2, 0.4]
    run = last["run"]
    shown = CliRunner().invoke(cli, ["eval", "show", run["id"], "--json", "--database-url", db])
    assert json.loads(shown.stdout)["summary"] == run["summary"]  # the run it stored
    assert set(run["summary"]["candidates"]) == {
        "teacher:teacher",
        "base:weak",
        "tuned:ft:weak:acme:support:abc123",
    }
    verdict = last["verdict"]  # the line, and under 30 items its interval's warning
    assert verdict[0].startswith("Verdict (exact, n=")
    assert all(line in result.stderr for line in verdict)
    assert "Built support@1 in " in result.stderr
