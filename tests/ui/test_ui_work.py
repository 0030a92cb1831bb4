"""Datasets, fine-tune jobs, evals and background tasks on the dashboard, over HTTP."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from distillery.core.config import key_fingerprint
from distillery.store import dashboard as dashboard_store
from distillery.store import open_store

from fake_finetuning import FakeFineTuning
from helpers import (
    RunningProxy,
    ServerThread,
    wait_for,
)
from ui_data import (
    ADMIN,
    ALICE,
    XSS,
    browser,
    build_dataset,
    call,
    csrf_of,
    distill_form,
    eval_summary,
    sign_in,
    task_result,
)


def test_datasets_jobs_and_evals_are_for_admins(dashboard: RunningProxy) -> None:
    alice = sign_in(dashboard, ALICE)
    for path in ("/ui/datasets", "/ui/jobs", "/ui/evals", "/ui/datasets/support/1"):
        refused = alice.get(path)
        assert refused.status_code == 403 and "admin key" in refused.text
    assert "/ui/datasets" not in alice.get("/ui/completions").text  # not in the menu either


def test_dataset_versions_their_counts_diff_and_files(dashboard: RunningProxy) -> None:
    build_dataset(dashboard)
    store = open_store(dashboard.settings.storage.resolved_database_url())
    store.insert(
        [
            call(
                70, ALICE, "How do I move my invoices to a new billing address?", {"app": "support"}
            ),
            call(71, ALICE, "Can two people share one seat on the team plan?", {"app": "support"}),
        ]
    )
    store.close()
    build_dataset(dashboard)
    admin = sign_in(dashboard, ADMIN)
    listing = admin.get("/ui/datasets").text
    assert 'data-name="support"' in listing and ">v2<" in listing
    page = admin.get("/ui/datasets/support/2")
    assert page.status_code == 200
    store = open_store(dashboard.settings.storage.resolved_database_url())
    from distillery.store import datasets

    v2 = datasets.get(store, "support", 2)
    store.close()
    assert v2 is not None
    counts = v2["manifest"]["counts"]
    assert f"train {counts['train']}, validation {counts['val']}" in page.text
    found = re.search(r'<p id="diff">(.*?)</p>', page.text)
    assert found is not None, page.text[page.text.index("<main>") :][:1500]
    assert found.group(1) == "Since v1: 2 examples added, 0 removed."
    train = admin.get("/ui/datasets/support/2/train.jsonl")
    assert train.status_code == 200
    assert train.content == (Path(v2["path"]) / "train.jsonl").read_bytes()
    assert 'filename="support-v2-train.jsonl"' in train.headers["content-disposition"]
    assert admin.get("/ui/datasets/support/2/manifest.json").status_code == 404
    assert admin.get("/ui/datasets/support/9").status_code == 404


def test_a_job_page_follows_its_backend_until_it_ends(dashboard: RunningProxy) -> None:
    from distillery.curation.training.backends import JobSpec, new_job_id
    from distillery.curation.training.jobs import start_job
    from distillery.curation.training.memory import InMemoryBackend
    from distillery.store import datasets

    build_dataset(dashboard)
    store = open_store(dashboard.settings.storage.resolved_database_url())
    version = datasets.latest(store, "support")
    assert version is not None
    job = start_job(store, InMemoryBackend(), JobSpec(new_job_id(), version, "tiny"))
    store.close()
    admin = sign_in(dashboard, ADMIN)
    assert f'data-id="{job["id"]}"' in admin.get("/ui/jobs").text
    page = admin.get(f"/ui/jobs/{job['id']}").text
    assert 'id="job-status">queued<' in page and "every 2s" in page
    refresh = f"/ui/jobs/{job['id']}/refresh"
    assert admin.post(refresh).status_code == 403  # no CSRF token
    headers = {"X-CSRF-Token": csrf_of(page), "HX-Request": "true"}
    seen = [admin.post(refresh, headers=headers).text for _ in range(3)]
    assert 'id="job-status">running<' in seen[0]
    assert 'id="job-status">succeeded<' in seen[1] and "every 2s" not in seen[1]
    assert "hx-trigger" not in seen[1]  # a finished job's fragment asks nothing more
    assert 'hx-trigger="load"' in admin.get(f"/ui/jobs/{job['id']}").text  # its page, once
    assert f"ft:tiny:{job['id']}" in seen[1] and "Training finished" in seen[1]
    assert "train_loss" in seen[1]  # the loss table


def test_an_eval_run_shows_every_candidates_scores(dashboard: RunningProxy) -> None:
    from distillery.store import evals

    summary = eval_summary()
    store = open_store(dashboard.settings.storage.resolved_database_url())

    def sample(item: int, label: str, text: str, score: float | None) -> Any:
        passed = score is not None and score >= 0.5
        return {
            "item": item,
            "candidate": label,
            "item_key": f"k{item}",
            "output": {"role": "assistant", "content": text},
            "error": None,
            "grades": {"exact": {"score": score, "passed": passed, "detail": ""}},
            "latency_ms": 10.0,
            "prompt_tokens": 5,
            "completion_tokens": 5,
        }

    labels = list(summary["candidates"])
    samples = [sample(0, label, "same answer", 1.0) for label in labels] + [
        sample(1, labels[0], "the teacher's answer", 1.0),
        sample(1, labels[1], "", None),
        sample(1, labels[2], XSS, 0.0),
    ]
    items: Any = [
        {
            "item": i,
            "item_key": f"k{i}",
            "messages": [{"role": "user", "content": f"question {i}?"}],
            "reference": {"role": "assistant", "content": f"reference {i}"},
        }
        for i in (0, 1)
    ]
    source = {"source": "support@1 (distill)"}
    run = evals.save_run(store, "eval_ui_test", source, summary, samples, items)
    # A later run where the base student now passes item 1: the comparison shows it.
    better = [dict(s) for s in samples]
    better[len(labels) + 1] = sample(1, labels[1], "the teacher's answer", 1.0)
    evals.save_run(store, "eval_ui_test_2", source, summary, better, items)  # type: ignore[arg-type]
    store.close()
    admin = sign_in(dashboard, ADMIN)
    assert 'data-id="eval_ui_test"' in admin.get("/ui/evals").text
    page = admin.get(f"/ui/evals/{run['id']}").text
    rows = re.findall(
        r'<tr class="score( tuned)?">\s*<td>(.*?)</td><td>exact</td>\s*<td class="num">(.*?)</td>',
        page,
    )
    assert [(label, mean) for _, label, mean in rows] == [
        ("teacher:gpt-4o", "0.950"),
        ("base student", "—"),  # no score is never a 0
        (
            "tuned:&lt;script&gt;window.__xss = 1&lt;/script&gt;&lt;img src=x onerror=&#34;window.__xss = 1&#34;&gt;",
            "0.900",
        ),
    ]
    assert [tuned for tuned, _, _ in rows] == ["", "", " tuned"]
    assert "<svg" in page and "<script>window" not in page and "<img src=x" not in page
    # Item 0: every candidate passed; item 1: they disagree, so it alone is shown first,
    # with its prompt and reference beside every candidate's answer.
    assert "(the 1 where the candidates disagree)" in page
    split = re.findall(r'<tr class="item" data-item="(\d+)">', page)
    assert split == ["1"]
    assert '<pre class="prompt">user: question 1?</pre>' in page
    assert '<pre class="reference">reference 1</pre>' in page
    assert '<pre class="answer">&lt;script&gt;window.__xss = 1' in page
    every = admin.get(f"/ui/evals/{run['id']}", params={"show": "all"}).text
    assert re.findall(r'<tr class="item" data-item="(\d+)">', every) == ["0", "1"]
    assert every.count('<pre class="answer">same answer</pre>') == len(labels)
    compared = admin.get("/ui/evals/compare", params={"a": run["id"], "b": "eval_ui_test_2"})
    changed = re.findall(
        r'<tr class="changed"><td><pre class="prompt">([^<]*)</pre></td>\s*<td>([^<]*)</td>',
        compared.text,
    )
    assert changed == [("user: question 1?", "base student")]
    assert admin.get("/ui/evals/compare", params={"a": "nope", "b": run["id"]}).status_code == 404
    assert re.search(r'class="verdict fail">exact: 0<', page)
    assert re.search(r'class="verdict none">exact: no score<', page)


def test_an_eval_started_from_the_dashboard_is_stored_and_shown(
    dashboard: RunningProxy, servers: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fake_models import FakeModels

    models = FakeModels()
    models.url, _ = servers.serve(models.app)
    monkeypatch.setenv("OPENAI_BASE_URL", models.url + "/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-models")
    build_dataset(dashboard)
    admin = sign_in(dashboard, ADMIN)
    form = admin.get("/ui/evals/new").text
    assert 'value="support@1"' in form
    fields = {"csrf": csrf_of(form), "dataset": "support@1", "split": "train", "limit": "5"}
    for extra, reason in (
        ({"candidates": "", "grader": "exact"}, "at least one candidate"),
        ({"candidates": "teacher@nowhere", "grader": "exact"}, "No endpoint &#39;nowhere&#39;"),
        ({"candidates": "teacher"}, "at least one grader"),
    ):
        refused = admin.post("/ui/evals/new", data=fields | extra)
        assert refused.status_code == 400 and reason in refused.text
    started = admin.post(
        "/ui/evals/new",
        data=fields | {"candidates": "teacher\nweak", "grader": ["exact", "fuzzy_match"]},
    )
    assert started.status_code == 303
    run_page = task_result(admin, started.headers["location"], "the eval run")
    page = admin.get(run_page).text
    rows = re.findall(r"<td>(teacher|weak)</td><td>(exact|fuzzy_match)</td>", page)
    assert sorted(rows) == [
        ("teacher", "exact"),
        ("teacher", "fuzzy_match"),
        ("weak", "exact"),
        ("weak", "fuzzy_match"),
    ]
    assert "5 items from support@1 (train)" in page


def test_a_task_is_followed_from_another_host(
    dashboard: RunningProxy,
    start_proxy: Callable[..., RunningProxy],
    fine_tuning_api: FakeFineTuning,
    tmp_path: Path,
) -> None:
    """Two proxies on one database, each with its own data dir (two hosts, or two pods):
    a session signed by one is good on the other, and the task one starts, the other
    follows (a reload can land on either)."""
    other = start_proxy(
        {
            "auth": {"admin_keys": [key_fingerprint(ADMIN)]},
            "storage": {"data_dir": str(tmp_path / "other-host")},
        },
        database_url=dashboard.settings.storage.resolved_database_url(),
        dashboard=True,
    )
    assert other.settings.storage.resolved_data_dir() != (
        dashboard.settings.storage.resolved_data_dir()
    )
    admin = sign_in(dashboard, ADMIN)
    started = distill_form(admin, "tag=app%3Dsupport", name="support", base_model="gpt-4.1-mini")
    assert started.status_code == 303
    follower = browser(other)
    follower.cookies.update(admin.cookies)  # one key to sign them, in the database
    assert follower.get("/ui/").status_code == 200

    def handed_over() -> bool:
        answer = follower.get(started.headers["location"])
        assert answer.status_code in (200, 303), answer.text
        return answer.status_code == 303 and "/ui/jobs/ftjob_" in answer.headers["location"]

    wait_for(handed_over, 60, "the other worker to see the job")
    assert follower.get("/ui/tasks/0123456789abcdef").status_code == 404
    assert follower.get("/ui/tasks/..%2F..%2Fsecret").status_code == 404


def test_a_task_whose_process_went_away_says_so(dashboard: RunningProxy) -> None:
    """A task stops being written when its process dies (a restart, a crash): its page
    says so after a while, instead of following it forever."""

    from distillery.ui import tasks

    store = open_store(dashboard.settings.storage.resolved_database_url())
    long_ago = datetime.now(UTC) - timedelta(seconds=tasks.STOPPED_AFTER_S + 5)
    for task_id, heartbeat in (("00000000000000aa", long_ago), ("00000000000000bb", None)):
        dashboard_store.save_task(
            store,
            {
                "id": task_id,
                "title": "Distilling support",
                "state": "building the dataset",
                "error": None,
                "done_url": None,
                "started_at": long_ago,
            },
        )
        if heartbeat is not None:  # written long ago
            with store.engine.begin() as conn:
                conn.execute(
                    dashboard_store.TASKS.update()
                    .where(dashboard_store.TASKS.c.id == task_id)
                    .values(heartbeat_at=heartbeat)
                )
    store.close()
    admin = sign_in(dashboard, ADMIN)
    gone = admin.get("/ui/tasks/00000000000000aa")
    assert "the process running it went away" in gone.text and "task-error" in gone.text
    assert 'hx-trigger="every 1s"' not in gone.text  # nothing left to follow
    alive = admin.get("/ui/tasks/00000000000000bb")
    assert "building the dataset" in alive.text and "task-error" not in alive.text
    assert 'hx-trigger="every 1s"' in alive.text
    store = open_store(dashboard.settings.storage.resolved_database_url())
    forgotten = dashboard_store.forget_tasks(store, long_ago + timedelta(seconds=1))
    store.close()
    assert forgotten == 1 and admin.get("/ui/tasks/00000000000000aa").status_code == 404
    assert admin.get("/ui/tasks/00000000000000bb").status_code == 200
