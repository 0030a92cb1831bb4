"""The dashboard's Distill dialog over HTTP: what the backend would refuse is refused first,
the version is built and the job started, the estimate priced.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from distillery.core.config import key_fingerprint
from distillery.store import open_store

from fake_finetuning import FakeFineTuning
from helpers import (
    RunningProxy,
    capture_record,
    wait_for,
)
from ui_data import ADMIN, ALICE, csrf_of, distill_form, sign_in, task_result


def test_distill_refuses_what_the_backend_would_before_anything_starts(
    dashboard: RunningProxy, fine_tuning_api: FakeFineTuning
) -> None:
    admin = sign_in(dashboard, ADMIN)
    page = admin.get("/ui/distill?tag=app%3Dsupport").text
    assert "57 calls match" in page  # alice's 55 and payload, bob's 1: an admin's view
    few = distill_form(admin, "tag=app%3Dsales", name="sales", base_model="gpt-4.1-mini")
    assert few.status_code == 400
    assert "selects 5 calls; OpenAI&#39;s fine-tuning API needs at least 10" in few.text
    for fields, reason in (
        ({"name": "no spaces", "base_model": "m"}, "use letters, digits"),
        ({"name": "ok", "base_model": ""}, "Name the base model"),
        ({"name": "ok", "base_model": "m", "epochs": "many"}, "epochs must be a number"),
        # The same limits as `finetune create --epochs` and `distill --epochs`.
        ({"name": "ok", "base_model": "m", "epochs": "501"}, "epochs must be from 1 to 500"),
        ({"name": "ok", "base_model": "m", "learning_rate": "0"}, "learning rate must be above 0"),
        ({"name": "ok", "base_model": "m", "backend": "nope"}, "No fine-tuning backend"),
    ):
        refused = distill_form(admin, "tag=app%3Dsupport", **fields)
        assert refused.status_code == 400 and reason in refused.text
    assert fine_tuning_api.created == []
    assert "support" not in admin.get("/ui/datasets").text
    alice = sign_in(dashboard, ALICE)
    assert alice.get("/ui/distill?tag=app%3Dsupport").status_code == 403


def test_distill_builds_the_version_and_starts_the_job(
    dashboard: RunningProxy, fine_tuning_api: FakeFineTuning
) -> None:
    admin = sign_in(dashboard, ADMIN)
    started = distill_form(
        admin, "tag=app%3Dsupport", name="support", base_model="gpt-4.1-mini", epochs="2"
    )
    assert started.status_code == 303, started.text
    job_page = task_result(admin, started.headers["location"], "the build and the job start")
    assert job_page.startswith("/ui/jobs/ftjob_")
    [request] = fine_tuning_api.created
    assert request["model"] == "gpt-4.1-mini" and request["metadata"]["dataset"] == "support@1"
    assert request["method"]["supervised"]["hyperparameters"] == {"n_epochs": 2}
    page = admin.get(job_page).text
    headers = {"X-CSRF-Token": csrf_of(page), "HX-Request": "true"}

    def succeeded() -> bool:
        return (
            'id="job-status">succeeded<' in admin.post(job_page + "/refresh", headers=headers).text
        )

    wait_for(succeeded, 30, "the fine-tune to succeed")
    assert "ft:gpt-4.1-mini" in admin.get(job_page).text
    done = admin.post(job_page + "/refresh", headers=headers).text
    # The fake API's losses (steps 1 and 2: train 1.2 then 0.4, validation 1.3 then 0.5),
    # drawn as two lines, and its checkpoints listed.
    assert done.count("<polyline") == 2 and ">train_loss</text>" in done
    assert ">valid_loss</text>" in done and 'id="checkpoints"' in done


def estimates(start_proxy: Callable[..., RunningProxy]) -> Callable[..., str]:
    """The Distill dialog's estimate for 12 stored calls of 1,000 tokens (tag app=x), asked
    by an admin with the given form fields; its text, whitespace folded."""
    proxy = start_proxy({"auth": {"admin_keys": [key_fingerprint(ADMIN)]}}, dashboard=True)
    store = open_store(proxy.settings.storage.resolved_database_url())
    store.insert(
        [
            capture_record(f"cap_{n:028d}", total_tokens=1000, metadata={"app": "x"})
            for n in range(12)
        ]
    )
    store.close()
    admin = sign_in(proxy, ADMIN)
    headers = {"X-CSRF-Token": csrf_of(admin.get("/ui/distill?tag=app%3Dx").text)}

    def estimate(**fields: str) -> str:
        answer = admin.post("/ui/distill/estimate?tag=app%3Dx", data=fields, headers=headers)
        assert answer.status_code == 200, answer.text
        return " ".join(answer.text.split())

    return estimate


def test_the_distill_estimate_prices_the_training_tokens(
    start_proxy: Callable[..., RunningProxy],
) -> None:
    estimate = estimates(start_proxy)
    priced = estimate(backend="openai", base_model="gpt-4o-mini", epochs="2")
    # 12 calls x 1,000 tokens x 2 epochs at gpt-4o-mini's $3.00 per million trained tokens.
    assert "About <strong>24,000</strong> training tokens" in priced
    assert '<strong id="price">$0.07</strong>' in priced
    unpriced = estimate(backend="openai", base_model="my-model")
    assert '<strong id="price">—</strong>' in unpriced and "36,000" in unpriced  # 3 epochs
    assert "no API price" in estimate(backend="local", base_model="./student")
    # A student directory this proxy cannot read as a model: the flat guess, said as one.
    assert "times 3 epochs (if auto picks 3)" in estimate(backend="local", base_model="/")


@pytest.mark.slow
@pytest.mark.train
def test_the_distill_estimate_for_a_local_student_uses_its_trainers_epochs(
    start_proxy: Callable[..., RunningProxy], tmp_path: Path
) -> None:
    pytest.importorskip("trl", reason="the training extra is not installed")
    from distillery.curation.training.settings import SCRATCH
    from distillery.curation.training.student import create

    student = tmp_path / "student"
    create(student, ["hi there", "the answer is 42"], hidden=64, layers=2, vocab_size=300)
    text = estimates(start_proxy)(backend="local", base_model=str(student))
    low, high = SCRATCH["min_epochs"], SCRATCH["max_epochs"]
    # 12 calls x 1,000 tokens x the most epochs the trainer runs for a student from scratch.
    assert f"About <strong>{12 * 1000 * high:,}</strong> training tokens" in text
    assert f"times {low}-{high} epochs, the most (the local trainer's for this student" in text
