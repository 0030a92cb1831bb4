"""`distillery eval`: real fake models (teacher, weak student, judge), scores computed by hand."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from distillery.cli import cli
from distillery.curation.evals import graders as g
from distillery.curation.evals import metrics
from distillery.curation.evals.evaluate import bootstrap

from fake_models import FakeModels, answer, vector
from helpers import HTMLTable, ServerThread, readme_code

QUESTIONS = [f"question {i}: how many letters?" for i in range(1, 7)]


@pytest.fixture
def models(servers: ServerThread) -> FakeModels:
    fake = FakeModels()
    fake.url, _ = servers.serve(fake.app)
    return fake


@pytest.fixture
def items_file(tmp_path: Path) -> Path:
    path = tmp_path / "items.jsonl"
    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "Count."},
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": answer(q)},
                ]
            }
        )
        for q in QUESTIONS
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def judge_file(tmp_path: Path) -> Path:
    path = tmp_path / "judge.toml"
    path.write_text(
        '[[graders]]\nname = "judge"\ntype = "score_model"\nmodel = "judge"\nrange = [0, 10]\npass_threshold = 7\n\n'
        '[[graders]]\nname = "pairwise"\ntype = "score_model"\nmodel = "judge"\npairwise = true\n\n'
        '[[graders]]\nname = "contains"\ntype = "string_check"\noperation = "ilike"\nreference = "THE ANSWER"\n'
    )
    return path


def on(models: FakeModels) -> list[str]:
    """Arguments that point candidates (and judges) at the fake models."""
    return ["--base-url", models.url + "/v1", "--api-key-env", "HOME"]


def eval_run(db: str, *args: Any) -> Result:
    return CliRunner().invoke(
        cli, ["eval", "run", "--database-url", db, *args], catch_exceptions=False
    )


def eval_with(config: Any, db: str, *args: Any, **kwargs: Any) -> Result:
    """`eval run` with a config file (for [endpoints.*])."""
    return CliRunner().invoke(
        cli, ["eval", "run", "-c", str(config), "--database-url", db, *args], **kwargs
    )


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'evals.db'}"


def test_baseline_scores_match_hand_computation(
    models: FakeModels, items_file: Path, judge_file: Path, db: str, tmp_path: Path
) -> None:
    report = tmp_path / "report.html"
    result = eval_run(
        db,
        "--file",
        str(items_file),
        "--model",
        "teacher",
        "--model",
        "weak",
        *on(models),
        "--grader",
        "exact",
        "--grader",
        "fuzzy_match",
        "--grader",
        str(judge_file),
        "--json",
        "--html",
        str(report),
    )
    assert result.exit_code == 0, result.output
    run = json.loads(result.output)
    teacher, weak = run["summary"]["candidates"]["teacher"], run["summary"]["candidates"]["weak"]
    # Teacher: every answer equals the reference.
    assert (
        teacher["graders"]["exact"]["mean"] == 1.0 and teacher["graders"]["exact"]["ci_low"] == 1.0
    )
    assert teacher["graders"]["judge"]["mean"] == 10.0
    assert teacher["graders"]["pairwise"]["mean"] == 0.5  # always a tie with the reference
    # Weak: right on questions 2, 4, 6 only.
    assert weak["graders"]["exact"]["mean"] == 0.5
    assert weak["graders"]["exact"]["pass_rate"] == 0.5
    assert weak["graders"]["judge"]["mean"] == (3 * 10 + 3 * 2) / 6
    assert weak["graders"]["judge"]["pass_rate"] == 0.5
    assert weak["graders"]["pairwise"]["mean"] == (3 * 0.5 + 3 * 0) / 6
    assert weak["graders"]["contains"]["mean"] == 0.5
    from rapidfuzz import fuzz

    wrong = [fuzz.ratio("I don't know.", answer(q)) / 100 for q in QUESTIONS[::2]]
    assert math.isclose(
        weak["graders"]["fuzzy_match"]["mean"], round((3 + sum(wrong)) / 6, 4), abs_tol=1e-4
    )
    ci = weak["graders"]["exact"]
    assert ci["ci_low"] < 0.5 < ci["ci_high"]
    assert teacher["prompt_tokens"] == 60 and teacher["latency_p50_ms"] > 0
    html = report.read_text()
    assert "<svg" in html and "teacher" in html and "weak" in html and "I don&#x27;t know." in html
    # Every call, the judge's included, carried the eval tag header.
    assert all(
        {k.lower(): v for k, v in r["headers"].items()}.get("x-distillery-tag-distillery_eval")
        == "1"
        for r in models.requests
    )


def test_cache_means_rerunning_calls_nothing(models: FakeModels, items_file: Path, db: str) -> None:
    args = [
        "--file",
        str(items_file),
        "--model",
        "teacher",
        *on(models),
        "--grader",
        "exact",
        "--json",
    ]
    first = json.loads(eval_run(db, *args).output)
    calls = len(models.requests)
    second = json.loads(eval_run(db, *args).output)
    assert first["summary"]["calls"] == {"made": 6, "cached": 0}
    assert second["summary"]["calls"] == {"made": 0, "cached": 6}
    assert len(models.requests) == calls
    assert second["summary"]["candidates"] == first["summary"]["candidates"]


def test_429_is_retried_with_backoff(models: FakeModels, items_file: Path, db: str) -> None:
    result = eval_run(
        db,
        "--file",
        str(items_file),
        "--model",
        "flaky",
        *on(models),
        "--grader",
        "exact",
        "--json",
    )
    run = json.loads(result.output)
    assert run["summary"]["candidates"]["flaky"]["graders"]["exact"]["mean"] == 1.0
    assert run["summary"]["candidates"]["flaky"]["errors"] == 0
    assert (
        len([r for r in models.requests if r["model"] == "flaky"]) == 12
    )  # a 429, then the answer


def test_fail_under_gates_and_list_show_compare(
    models: FakeModels, items_file: Path, db: str
) -> None:
    base = [
        "--file",
        str(items_file),
        *on(models),
        "--grader",
        "exact",
    ]
    weak = eval_run(db, *base, "--model", "weak", "--fail-under", "0.9")
    assert weak.exit_code == 1 and "Below --fail-under: weak/exact: 0.5 < 0.9" in weak.output
    strong = eval_run(db, *base, "--model", "teacher", "--fail-under", "0.9")
    assert strong.exit_code == 0
    runs = json.loads(
        CliRunner().invoke(cli, ["eval", "list", "--json", "--database-url", db]).output
    )
    assert [r["candidates"] for r in runs] == ["teacher", "weak"]
    newer, older = runs[0]["id"], runs[1]["id"]
    shown = CliRunner().invoke(cli, ["eval", "show", older, "--database-url", db]).output
    assert "weak" in shown and "exact" in shown
    compared = json.loads(
        CliRunner()
        .invoke(cli, ["eval", "compare", older, newer, "--json", "--database-url", db])
        .output
    )
    assert compared == [
        {
            "grader": "exact",
            "a": "weak",
            "b": "teacher",
            "items": 6,
            "b_wins": 3,
            "a_wins": 0,
            "ties": 3,
            "mean_difference": 0.5,
            "ci_low": compared[0]["ci_low"],
            "ci_high": compared[0]["ci_high"],
            "ci_95": compared[0]["ci_95"],
        }
    ]
    assert 0 < compared[0]["ci_low"] <= 0.5 <= compared[0]["ci_high"]


def test_tool_call_and_cosine_graders(models: FakeModels, db: str, tmp_path: Path) -> None:
    path = tmp_path / "tools.jsonl"
    reference = {
        "role": "assistant",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "lookup", "arguments": '{"id": 7, "verbose": false}'},
            }
        ],
    }
    path.write_text(
        json.dumps(
            {
                "messages": [{"role": "user", "content": "find order 7"}, reference],
                "tools": [{"type": "function", "function": {"name": "lookup"}}],
            }
        )
        + "\n"
    )
    grader = tmp_path / "cos.toml"
    grader.write_text(
        '[[graders]]\nname = "cos"\ntype = "text_similarity"\nmetric = "cosine"\nmodel = "embed"\npass_threshold = 0.9\n'
    )
    result = eval_run(
        db,
        "--file",
        str(path),
        "--model",
        "tools",
        "--model",
        "teacher",
        *on(models),
        "--grader",
        "tool_call",
        "--grader",
        str(grader),
        "--json",
    )
    run = json.loads(result.output)
    assert run["summary"]["candidates"]["tools"]["graders"]["tool_call"]["mean"] == 1.0
    assert run["summary"]["candidates"]["teacher"]["graders"]["tool_call"]["mean"] == 0.0
    a, b = (
        vector(answer("find order 7")),
        vector(" "),
    )  # teacher's text vs the (empty) reference text
    expected = sum(x * y for x, y in zip(a, b, strict=False)) / (math.hypot(*a) * math.hypot(*b))
    assert math.isclose(
        run["summary"]["candidates"]["teacher"]["graders"]["cos"]["mean"],
        round(expected, 4),
        abs_tol=1e-4,
    )
    tool_request = next(r for r in models.requests if r["model"] == "tools")
    assert tool_request["body"]["tools"] == [
        {"type": "function", "function": {"name": "lookup"}}
    ]  # replayed


def test_eval_input_from_a_dataset_and_its_traffic_is_excluded_from_builds(
    models: FakeModels, db: str, tmp_path: Path
) -> None:
    from distillery.store import open_store

    from helpers import base_records, record

    store = open_store(db)
    store.insert([*base_records(), record(90, "an eval probe", tags={"distillery_eval": "1"})])
    store.close()
    built = CliRunner().invoke(
        cli,
        [
            "dataset",
            "build",
            "support",
            "--tag",
            "app=support",
            "--val-fraction",
            "0.3",
            "--json",
            "--database-url",
            db,
        ],
        catch_exceptions=False,
    )
    manifest = json.loads(built.output)
    assert "cap_0000000000000000000000000090" not in (
        Path(
            json.loads(
                CliRunner()
                .invoke(cli, ["dataset", "show", "support", "--json", "--database-url", db])
                .output
            )["files"]["train"]
        ).name
    )
    assert manifest["counts"]["considered"] == 22  # the probe was never read
    result = eval_run(
        db,
        "--dataset",
        "support",
        "--model",
        "teacher",
        *on(models),
        "--grader",
        "rouge_l",
        "--json",
        "--by",
        "tag:app",
    )
    run = json.loads(result.output)
    assert run["summary"]["items"] == manifest["counts"]["val"]
    assert set(run["summary"]["candidates"]["teacher"]["graders"]["rouge_l"]["by_tag"]) == {
        "support"
    }


# -- graders on edge cases ----------------------------------------------------------


def test_text_metrics_by_hand() -> None:
    assert metrics.bleu("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert metrics.bleu("", "anything") == 0.0 and metrics.bleu("", "") == 1.0
    assert metrics.rouge_n("a b c", "a b d", 1) == pytest.approx(2 / 3)
    assert metrics.rouge_n("a b c", "a b d", 2) == pytest.approx(0.5)
    assert metrics.rouge_l("a b c d", "a c d") == pytest.approx(2 * (3 / 4) * 1 / (3 / 4 + 1))
    assert metrics.rouge_l("", "x") == 0.0
    assert metrics.tokens("Héllo, wörld! 東京") == ["héllo", "wörld", "東京"]
    long = "word " * 20_000
    assert metrics.rouge_l(long, long) == 1.0  # capped, still exact
    assert 0 < metrics.bleu("the cat sat", "the cat sat on the mat") < 1  # brevity penalty


def test_json_parsing_and_bootstrap() -> None:
    assert metrics.parse_json('```json\n{"a": 1}\n```') == {"a": 1}
    with pytest.raises(ValueError):
        metrics.parse_json("not json")
    mean, low, high = bootstrap([1, 0, 1, 1, 0, 1, 1, 1])
    assert (
        mean == 0.75
        and low <= mean <= high
        and (low, high) == bootstrap([1, 0, 1, 1, 0, 1, 1, 1])[1:]
    )
    assert all(math.isnan(x) for x in bootstrap([]))  # nan, not a made-up number


@pytest.mark.parametrize(
    ("output", "reference", "expected"),
    [
        ('{"a": 1, "b": 2}', '{"a": 1, "b": 3}', 0.5),
        ('```json\n{"a": 1}\n```', '{"a": 1}', 1.0),
        ("no json here", '{"a": 1}', 0.0),
        ('{"a": "é"}', '{"a": "é"}', 1.0),
        ("", '{"a": 1}', 0.0),
    ],
)
def test_json_grader(output: Any, reference: Any, expected: Any) -> None:
    import asyncio

    from distillery.curation.endpoints import Endpoint
    from distillery.curation.evals.generate import Candidate, Generation
    from distillery.curation.evals.items import Item

    grader = g.load_graders("json")[0]
    item = Item(0, [{"role": "user", "content": "x"}], {"role": "assistant", "content": reference})
    generation = Generation({"role": "assistant", "content": output}, {}, 1.0, False)
    grade = asyncio.run(grader.grade(generation, item, Candidate("c", "m", Endpoint("e")), None))  # type: ignore[arg-type]
    assert grade.score == expected


def test_bad_grader_specs_name_the_fix(tmp_path: Path, db: str) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[graders]]\nname = "x"\ntype = "mystery"\n')
    for spec, message in (
        ("nonsense", "No grader 'nonsense'"),
        (str(bad), "unknown type 'mystery'"),
    ):
        result = eval_run(db, "--file", __file__, "--model", "m", "--grader", spec)
        assert (
            result.exit_code == 1 and message in result.output and "Traceback" not in result.output
        )


def test_label_model_and_python_graders(
    models: FakeModels, items_file: Path, db: str, tmp_path: Path
) -> None:
    grader = tmp_path / "more.toml"
    (tmp_path / "length.py").write_text(
        "def grade(sample, item):\n    return 1.0 if len(sample['output_text']) >= len(item['reference_text']) else 0.25\n"
    )
    grader.write_text(
        '[[graders]]\nname = "label"\ntype = "label_model"\nmodel = "judge"\nlabels = ["correct", "wrong"]\n'
        'passing_labels = ["correct"]\n\n[[graders]]\nname = "length"\ntype = "python"\nfile = "length.py"\npass_threshold = 1\n'
    )
    result = eval_run(
        db,
        "--file",
        str(items_file),
        "--model",
        "weak",
        *on(models),
        "--grader",
        str(grader),
        "--json",
    )
    weak = json.loads(result.output)["summary"]["candidates"]["weak"]["graders"]
    assert weak["label"]["mean"] == 0.5 and weak["label"]["pass_rate"] == 0.5
    assert weak["length"]["mean"] == (3 * 1.0 + 3 * 0.25) / 6 and weak["length"]["pass_rate"] == 0.5


def test_judges_never_run_on_the_candidates_server(
    servers: ServerThread,
    models: FakeModels,
    items_file: Path,
    judge_file: Path,
    db: str,
    tmp_path: Path,
) -> None:
    """A local student knows no judge model: judges go to the default endpoint."""
    student = FakeModels()
    student.url, _ = servers.serve(student.app)
    config = tmp_path / "d.toml"
    config.write_text(f'[endpoints.local]\nbase_url = "{student.url}/v1"\napi_key_env = "HOME"\n')
    result = eval_with(
        config,
        db,
        "--file",
        str(items_file),
        "--model",
        "weak@local",
        *on(models),
        "--grader",
        str(judge_file),
        "--json",
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert {r["model"] for r in student.requests} == {"weak"}
    assert {r["model"] for r in models.requests} == {"judge"}
    assert (
        json.loads(result.output)["summary"]["candidates"]["weak@local"]["graders"]["judge"]["mean"]
        == 6.0
    )


def test_eval_over_stored_calls_with_filters_and_a_seeded_sample(
    models: FakeModels, db: str, tmp_path: Path
) -> None:
    from distillery.store import open_store

    from helpers import base_records

    store = open_store(db)
    store.insert(base_records())
    store.close()
    args = [
        "--where",
        "--tag",
        "app=support",
        "--limit",
        "5",
        "--seed",
        "3",
        "--model",
        "teacher",
        *on(models),
        "--grader",
        "tool_call",
        "--json",
    ]
    report = tmp_path / "stored.html"
    first = json.loads(eval_run(db, *args, "--html", str(report)).output)
    second = json.loads(eval_run(db, *args).output)
    assert first["summary"]["items"] == 5
    # The report names the teacher whose stored answers are the reference.
    assert first["config"]["reference_models"] == {"gpt-4o": 5}
    assert "reference: the teacher&#x27;s stored answers, by gpt-4o (5 items)" in report.read_text()
    assert second["summary"]["calls"] == {"made": 0, "cached": 5}  # the same seeded sample
    tools_sent = [r["body"].get("tools") for r in models.requests if r["body"].get("tools")]
    sampled_tool_items = [
        r for r in models.requests if "lookup" in json.dumps(r["body"].get("tools"))
    ]
    assert len(tools_sent) == len(sampled_tool_items)


def test_eval_over_stored_calls_never_takes_a_students_or_an_evals_answer_as_reference(
    models: FakeModels, db: str
) -> None:
    """`eval run --where` grades against the teacher's stored answers: calls a route's
    student answered, and the evals' own calls, are left out as `dataset build` leaves them."""
    from distillery.store import open_store

    from helpers import base_records, record

    store = open_store(db)
    store.insert(base_records())
    store.close()
    args = ["--where", "--tag", "app=support", "--model", "teacher", *on(models), "--json"]
    before = json.loads(eval_run(db, *args, "--grader", "exact").output)["summary"]["items"]
    store = open_store(db)
    store.insert(
        [
            record(
                91,
                "answered by the student",
                tags={"app": "support", "distillery_served_by": "student"},
            ),
            record(92, "an eval probe", tags={"app": "support", "distillery_eval": "1"}),
        ]
    )
    store.close()
    after = json.loads(eval_run(db, *args, "--grader", "exact").output)["summary"]["items"]
    assert before > 0 and after == before


def test_yaml_grader_file(models: FakeModels, items_file: Path, db: str, tmp_path: Path) -> None:
    grader = tmp_path / "graders.yaml"
    grader.write_text(
        "graders:\n  - name: close\n    type: text_similarity\n    metric: rouge_1\n    pass_threshold: 0.9\n"
    )
    result = eval_run(
        db,
        "--file",
        str(items_file),
        "--model",
        "weak",
        *on(models),
        "--grader",
        str(grader),
        "--json",
    )
    stats = json.loads(result.output)["summary"]["candidates"]["weak"]["graders"]["close"]
    wrong = [metrics.rouge_n("I don't know.", answer(q), 1) for q in QUESTIONS[::2]]
    assert stats["mean"] == round((3 + sum(wrong)) / 6, 4) and stats["pass_rate"] == 0.5


def test_an_unset_key_variable_is_an_error_never_a_fallback(
    servers: ServerThread,
    models: FakeModels,
    items_file: Path,
    db: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A key goes only where it was configured: an unset variable is named, and the user's
    OPENAI_API_KEY is never sent in its place (the SDK's silent fallback)."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-users-own-openai-key")
    monkeypatch.delenv("DISTILLERY_UNSET_KEY", raising=False)
    result = eval_run(
        db,
        "--file",
        str(items_file),
        "--model",
        "teacher",
        "--base-url",
        models.url + "/v1",
        "--api-key-env",
        "DISTILLERY_UNSET_KEY",
        "--grader",
        "exact",
    )
    assert result.exit_code == 1
    assert "$DISTILLERY_UNSET_KEY is not set" in result.output
    assert models.requests == []

    config = tmp_path / "endpoints.toml"
    config.write_text(
        f'[endpoints.unset]\nbase_url = "{models.url}/v1"\napi_key_env = "DISTILLERY_UNSET_KEY"\n'
        f'[endpoints.local]\nbase_url = "{models.url}/v1"\n'
    )
    result = eval_with(
        config, db, "--file", str(items_file), "--model", "teacher@unset", "--grader", "exact"
    )
    assert result.exit_code == 1
    assert "$DISTILLERY_UNSET_KEY is not set" in result.output and "'unset'" in result.output
    assert models.requests == []

    # An endpoint configured without api_key_env is keyless: it gets a placeholder, not a key.
    result = eval_with(
        config,
        db,
        "--file",
        str(items_file),
        "--model",
        "teacher@local",
        "--grader",
        "exact",
        "--json",
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert {r["headers"]["Authorization"] for r in models.requests} == {"Bearer distillery-no-key"}


def test_failed_calls_are_errors_not_zero_scores(
    models: FakeModels, items_file: Path, db: str
) -> None:
    """Half the calls fail: the mean is over the answered half, the errors are counted and
    shown, and the run exits 1 with the first error (unless --max-error-rate allows it)."""
    args = [
        "--file",
        str(items_file),
        "--model",
        "broken",
        *on(models),
        "--grader",
        "exact",
        "--retries",
        "0",
    ]
    result = eval_run(db, *args, "--json")
    assert result.exit_code == 1
    summary = json.loads(result.stdout)["summary"]["candidates"]["broken"]
    assert summary["errors"] == 3 and summary["failed_items"] == 3
    assert summary["graders"]["exact"] == {
        **summary["graders"]["exact"],
        "mean": 1.0,
        "n": 3,
        "errors": 3,
        "pass_rate": 1.0,
    }
    assert "broken: 3 of 6 items failed (first: HTTP 500" in result.stderr
    allowed = eval_run(db, *args, "--max-error-rate", "0.5")
    assert allowed.exit_code == 0, allowed.output
    [row] = [line for line in allowed.stdout.splitlines() if line.startswith("broken")]
    assert row.split()[:6] == ["broken", "exact", "1.00", "[1.000,", "1.000]", "1.00"]
    assert row.split()[6:8] == ["3", "3"]  # n scored, errors


def test_a_dead_endpoint_scores_nothing_and_exits_1(items_file: Path, db: str) -> None:
    result = eval_run(
        db,
        "--file",
        str(items_file),
        "--model",
        "teacher",
        "--base-url",
        "http://127.0.0.1:9/v1",
        "--api-key-env",
        "HOME",
        "--grader",
        "exact",
        "--retries",
        "0",
        "--timeout",
        "5",
        "--json",
    )
    assert result.exit_code == 1
    stats = json.loads(result.stdout)["summary"]["candidates"]["teacher"]["graders"]["exact"]
    assert (stats["mean"], stats["ci_low"], stats["n"], stats["errors"]) == (None, None, 0, 6)
    assert "teacher: 6 of 6 items failed (first: APIConnectionError" in result.stderr


def test_a_judge_without_a_verdict_is_an_error_not_a_score(
    models: FakeModels, items_file: Path, db: str, tmp_path: Path
) -> None:
    judges = tmp_path / "mute.toml"
    judges.write_text(
        '[[graders]]\nname = "score"\ntype = "score_model"\nmodel = "mute-judge"\n\n'
        '[[graders]]\nname = "label"\ntype = "label_model"\nmodel = "mute-judge"\n'
        'labels = ["correct", "wrong"]\npassing_labels = ["correct"]\n\n'
        '[[graders]]\nname = "pairwise"\ntype = "score_model"\nmodel = "mute-judge"\npairwise = true\n'
    )
    result = eval_run(
        db,
        "--file",
        str(items_file),
        "--model",
        "teacher",
        *on(models),
        "--grader",
        str(judges),
        "--json",
    )
    assert result.exit_code == 1
    graders = json.loads(result.stdout)["summary"]["candidates"]["teacher"]["graders"]
    for name in ("score", "label", "pairwise"):
        assert (graders[name]["mean"], graders[name]["errors"]) == (None, 6), name
    assert "the judge's answer is not JSON" in result.stderr


def test_fail_under_is_per_grader_when_scales_differ(
    models: FakeModels, items_file: Path, judge_file: Path, db: str
) -> None:
    base = [
        "--file",
        str(items_file),
        "--model",
        "weak",
        *on(models),
        "--grader",
        "rouge_l",
        "--grader",
        str(judge_file),
    ]
    refused = eval_run(db, *base, "--fail-under", "0.6")
    assert refused.exit_code == 2
    assert "one number to graders on different scales (rouge_l 0-1, judge 0-10" in refused.output
    assert models.requests == []
    unknown = eval_run(db, *base, "--fail-under", "nope=1")
    assert unknown.exit_code == 2 and "no grader 'nope'" in unknown.output
    # weak: judge mean (3*10 + 3*2)/6 = 6.0
    passed = eval_run(db, *base, "--fail-under", "judge=6", "--fail-under", "rouge_l=0.1")
    assert passed.exit_code == 0, passed.output
    missed = eval_run(db, *base, "--fail-under", "judge=6.5")
    assert missed.exit_code == 1
    assert "Below --fail-under: weak/judge: 6.0 < 6.5" in missed.stderr


def test_the_report_puts_each_answer_under_its_own_model(
    models: FakeModels, items_file: Path, db: str, tmp_path: Path
) -> None:
    """Candidates given out of alphabetical order: every column's header, answers and
    grades belong to the same model, and the disagreement count is the real one."""
    report = tmp_path / "report.html"
    result = eval_run(
        db,
        "--file",
        str(items_file),
        "--model",
        "weak",
        "--model",
        "teacher",
        *on(models),
        "--grader",
        "exact",
        "--html",
        str(report),
    )
    assert result.exit_code == 0, result.output
    page = report.read_text()
    parser = HTMLTable()
    parser.feed(page)
    header, *rows = parser.tables[-1]
    assert header == ["prompt", "reference", "weak", "teacher"]
    assert len(rows) == 3 and "(3 items)" in page  # weak is wrong on questions 1, 3, 5
    for prompt, reference, weak, teacher in rows:
        assert prompt and reference and teacher.startswith(reference)
        assert weak.startswith("I don't know.") and weak.endswith("exact: 0")
        assert teacher.endswith("exact: 1")
    assert (
        '<span class="fail">exact: 0</span>' in page
        and '<span class="pass">exact: 1</span>' in page
    )
    assert "reference: the final assistant message of each item" in page  # a file names no model


def test_the_cache_knows_a_model_by_its_files_not_its_address(
    servers: ServerThread, items_file: Path, db: str, tmp_path: Path
) -> None:
    """New files served under the same name and port never get the old answers; the same
    files served on another port hit the cache; a server that cannot say what it runs is
    not cached at all; --no-cache calls afresh."""
    first, second = FakeModels(), FakeModels()
    first.url, _ = servers.serve(first.app)
    second.url, _ = servers.serve(second.app)
    first.model_hash = second.model_hash = "files-v1"
    config = tmp_path / "e.toml"
    config.write_text(
        f'[endpoints.a]\nbase_url = "{first.url}/v1"\n[endpoints.b]\nbase_url = "{second.url}/v1"\n'
    )

    def calls(endpoint: Any, *extra: Any) -> tuple[dict[str, int], str]:
        result = eval_with(
            config,
            db,
            "--file",
            str(items_file),
            "--model",
            f"weak@{endpoint}",
            "--grader",
            "exact",
            "--json",
            *extra,
        )
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["summary"]["calls"], result.stderr

    assert calls("a")[0] == {"made": 6, "cached": 0}
    assert calls("a")[0] == {"made": 0, "cached": 6}
    assert calls("b")[0] == {"made": 0, "cached": 6}  # the same files on another port
    first.model_hash = "files-v2"  # a new fine-tune served under the old name and port
    assert calls("a")[0] == {"made": 6, "cached": 0}
    assert calls("a", "--no-cache")[0] == {"made": 6, "cached": 0}
    first.listed = None  # GET /v1/models: 404
    made, note = calls("a")
    assert made == {"made": 6, "cached": 0} and "Not cached: weak" in note
    assert calls("a")[0] == {"made": 6, "cached": 0}


def test_model_hash_follows_the_files(tmp_path: Path) -> None:
    from distillery.curation.serve import model_hash

    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"weights")
        (tmp_path / name / "config.json").write_text("{}")
    assert model_hash(tmp_path / "one") == model_hash(tmp_path / "two")
    (tmp_path / "two" / "model.safetensors").write_bytes(b"weightz")
    assert model_hash(tmp_path / "one") != model_hash(tmp_path / "two")
    assert model_hash(tmp_path / "no-such-dir") != model_hash(tmp_path / "other-name")


@pytest.fixture
def grader_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """The grader types a test registers are its own: the registry is put back after."""
    saved = dict(g.TYPES)
    yield g.TYPES
    g.TYPES.clear()
    g.TYPES.update(saved)


# The README's own example of a grader type: the docs are what the tests run.
KEYWORD_PLUGIN = readme_code("Extending Distillery")[0]


def test_a_grader_type_of_your_own_from_a_grader_file(
    models: FakeModels, items_file: Path, db: str, tmp_path: Path, grader_registry: Any
) -> None:
    """A module named in a grader file's `plugins` registers a type; its scores are the
    ones its function returns (teacher: every answer says "answer"; weak: 3 of 6)."""
    (tmp_path / "keyword_graders.py").write_text(KEYWORD_PLUGIN)
    spec = tmp_path / "mine.toml"
    spec.write_text(
        'plugins = ["keyword_graders.py"]\n\n[[graders]]\nname = "mentions"\ntype = "keyword"\n'
        'words = ["answer"]\npass_threshold = 1\n'
    )
    result = eval_run(
        db,
        "--file",
        str(items_file),
        "--model",
        "teacher",
        "--model",
        "weak",
        *on(models),
        "--grader",
        str(spec),
        "--json",
    )
    assert result.exit_code == 0, result.output
    candidates = json.loads(result.output)["summary"]["candidates"]
    assert candidates["teacher"]["graders"]["mentions"]["mean"] == 1.0
    assert candidates["weak"]["graders"]["mentions"]["mean"] == 0.5
    assert candidates["weak"]["graders"]["mentions"]["pass_rate"] == 0.5
    assert candidates["weak"]["graders"]["mentions"]["scale"] == [0.0, 1.0]


def test_a_grader_type_from_an_entry_point_is_a_grader_name(
    models: FakeModels,
    items_file: Path,
    db: str,
    tmp_path: Path,
    grader_registry: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A package's `distillery.graders` entry point registers its types on first use;
    `--grader TYPE` then names one, like a built-in."""
    from importlib.metadata import EntryPoint

    (tmp_path / "keyword_entry.py").write_text(
        "from distillery.curation.evals.graders import Grade, register\n\n"
        '@register("keyword")\n'
        "async def keyword(grader, sample):\n"
        "    said = 'answer' in sample.generation.text\n"
        "    return Grade(float(said), said)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(
        g,
        "entry_points",
        lambda group: (
            [EntryPoint("keyword", "keyword_entry", group)] if group == "distillery.graders" else []
        ),
    )
    monkeypatch.setattr(g, "_plugins_loaded", False)
    result = eval_run(
        db,
        "--file",
        str(items_file),
        "--model",
        "weak",
        *on(models),
        "--grader",
        "keyword",
        "--json",
    )
    assert result.exit_code == 0, result.output
    weak = json.loads(result.output)["summary"]["candidates"]["weak"]["graders"]
    assert weak["keyword"]["mean"] == 0.5 and weak["keyword"]["n"] == 6


def test_two_graders_under_one_name_are_refused(db: str, tmp_path: Path) -> None:
    result = eval_run(
        db, "--file", __file__, "--model", "m", "--grader", "exact", "--grader", "exact"
    )
    assert result.exit_code == 1 and "Two graders share a name (exact)" in result.output


def test_a_fine_tune_is_never_graded_on_its_own_training_examples(
    models: FakeModels, db: str
) -> None:
    """A model this store fine-tuned, graded on examples of its training split (from the
    dataset or from stored calls), is refused, saying so; its validation split, another
    model, or --allow-train-eval are graded."""
    from distillery.store import finetunes, open_store

    from helpers import base_records

    store = open_store(db)
    store.insert(base_records())
    built = CliRunner().invoke(
        cli,
        [
            *("dataset", "build", "support", "--tag", "app=support", "--val-fraction", "0.3"),
            *("--json", "--database-url", db),
        ],
        catch_exceptions=False,
    )
    counts = json.loads(built.stdout)["counts"]
    tuned = "ft:weak:acme:support:abc123"
    finetunes.insert(
        store,
        {
            "id": "ftjob_mine",
            "backend": "openai",
            "base_url": None,
            "provider_job_id": "ftjob-abc123",
            "dataset": "support",
            "dataset_version": 1,
            "base_model": "weak",
            "status": "succeeded",
            "hyperparameters": {},
        },
    )
    finetunes.update(store, "ftjob_mine", fine_tuned_model=tuned)
    store.close()
    grade = ("--grader", "exact", *on(models))

    refused = eval_run(db, "--dataset", "support", "--split", "train", "--model", tuned, *grade)
    assert refused.exit_code == 1
    assert (
        f"{tuned} was fine-tuned on support@1 (ftjob_mine): {counts['train']} of the "
        f"{counts['train']} items are its training examples" in refused.output
    )
    assert "--allow-train-eval" in refused.output
    where = eval_run(db, "--where", "--tag", "app=support", "--model", tuned, *grade)
    assert where.exit_code == 1 and f"{counts['train']} of the " in where.output
    assert eval_run(db, "--dataset", "support", "--model", tuned, *grade).exit_code == 0  # val
    other = eval_run(db, "--dataset", "support", "--split", "train", "--model", "weak", *grade)
    assert other.exit_code == 0, other.output
    allowed = eval_run(
        db,
        "--dataset",
        "support",
        "--split",
        "train",
        "--model",
        tuned,
        *grade,
        "--allow-train-eval",
        "--json",
    )
    assert allowed.exit_code == 0, allowed.output
    assert json.loads(allowed.stdout)["summary"]["items"] == counts["train"]


def test_few_graded_items_are_said_with_wilsons_interval(
    models: FakeModels, items_file: Path, db: str
) -> None:
    result = eval_run(
        db, "--file", str(items_file), "--model", "teacher", *on(models), "--grader", "exact"
    )
    assert result.exit_code == 0, result.output
    # Six items, all exact: the bootstrap says [1.000, 1.000]; Wilson's interval does not.
    assert (
        "Warning: teacher (exact) scored on 6 items, 95% interval 0.610-1.000: too few to "
        "trust a difference; grade 30 or more." in result.stderr
    )
    assert "Warning" not in result.stdout  # the table stays clean for a pipe
