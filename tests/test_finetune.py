"""`distillery finetune` against a fake of OpenAI's fine-tuning API."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from click.testing import CliRunner, Result

from distillery.cli import cli
from distillery.curation.training.backends import JobEvent, JobState
from distillery.store import open_store

from fake_finetuning import FakeFineTuning
from helpers import ServerThread, base_records, readme_code


@pytest.fixture
def api(servers: ServerThread) -> FakeFineTuning:
    fake = FakeFineTuning()
    fake.url, _ = servers.serve(fake.app)
    return fake


@pytest.fixture
def db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'ft.db'}"
    store = open_store(url)
    store.insert(base_records())
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
            "0.2",
            "--database-url",
            url,
        ],
        catch_exceptions=False,
    )
    assert built.exit_code == 0, built.output
    return url


def ft(db: str, api: FakeFineTuning | None, *args: Any) -> Result:
    return CliRunner().invoke(
        cli, ["finetune", *args, "--database-url", db], catch_exceptions=False
    )


def create(db: str, api: FakeFineTuning, model: Any = "gpt-4.1-mini", *extra: Any) -> Result:
    return ft(
        db,
        api,
        "create",
        "--dataset",
        "support",
        "--base-model",
        model,
        "--base-url",
        api.url + "/v1",
        "--api-key-env",
        "HOME",
        *extra,
    )


def test_create_uploads_the_version_and_records_the_job(
    db: str, api: FakeFineTuning, tmp_path: Path
) -> None:
    result = create(db, api, "gpt-4.1-mini", "--suffix", "support", "--epochs", "3", "--seed", "7")
    assert result.exit_code == 0, result.output
    job_id = result.output.strip().splitlines()[-1]
    [request] = api.created
    assert request["model"] == "gpt-4.1-mini"
    assert request["method"] == {
        "type": "supervised",
        "supervised": {"hyperparameters": {"n_epochs": 3}},
    }
    assert (request["suffix"], request["seed"]) == ("support", 7)
    assert (
        request["metadata"]["dataset"] == "support@1"
        and request["metadata"]["distillery_job"] == job_id
    )
    train = (tmp_path / "data" / "datasets" / "support" / "v1" / "train.jsonl").read_bytes()
    assert api.files[request["training_file"]] == train
    assert request["validation_file"] in api.files
    listing = json.loads(ft(db, api, "list", "--json").output)
    assert [(j["id"], j["status"], j["dataset_version"]) for j in listing] == [
        (job_id, "validating_files", 1)
    ]


def test_watch_follows_events_to_the_fine_tuned_model(db: str, api: FakeFineTuning) -> None:
    job_id = create(db, api, "gpt-4.1-mini", "--suffix", "support").output.strip().splitlines()[-1]
    result = ft(db, api, "watch", job_id, "--api-key-env", "HOME", "--interval", "0.01")
    assert result.exit_code == 0, result.output
    assert "Step 1/2: training loss=1.20  (step=1, train_loss=1.2, valid_loss=1.3)" in result.output
    assert result.output.index("Validating") < result.output.index("Step 2/2")
    assert "ft:gpt-4.1-mini:acme:support:abc123" in result.output
    shown = json.loads(ft(db, api, "status", job_id, "--api-key-env", "HOME", "--json").output)
    assert (
        shown["status"] == "succeeded"
        and shown["fine_tuned_model"] == "ft:gpt-4.1-mini:acme:support:abc123"
    )
    assert shown["metrics"]["train_loss"] == 0.4 and shown["metrics"]["valid_loss"] == 0.5
    assert len(shown["metrics"]["checkpoints"]) == 2


def test_a_failed_job_says_why_and_exits_1(db: str, api: FakeFineTuning) -> None:
    job_id = create(db, api, "fail-model").output.strip().splitlines()[-1]
    result = ft(db, api, "watch", job_id, "--api-key-env", "HOME", "--interval", "0.01")
    assert result.exit_code == 1 and "failed" in result.output
    status = ft(db, api, "status", job_id, "--api-key-env", "HOME").output
    assert "error: The file has 3 examples" in status


def test_cancel(db: str, api: FakeFineTuning) -> None:
    job_id = create(db, api).output.strip().splitlines()[-1]
    result = ft(db, api, "cancel", job_id, "--api-key-env", "HOME")
    assert result.exit_code == 0 and "cancelled" in result.output
    assert json.loads(ft(db, api, "list", "--json").output)[0]["status"] == "cancelled"


def test_refusal_is_plain_and_points_elsewhere(db: str, api: FakeFineTuning) -> None:
    result = create(db, api, "refused-model")
    assert result.exit_code == 1
    assert (
        "The fine-tuning API refused the job: You do not have access to fine-tuning."
        in result.output
    )
    assert "Traceback" not in result.output
    assert json.loads(ft(db, api, "list", "--json").output) == []


def test_unknown_job_and_dataset_name_the_fix(db: str, api: FakeFineTuning) -> None:
    assert "No fine-tune job 'nope'" in ft(db, api, "status", "nope").output
    result = ft(
        db,
        api,
        "create",
        "--dataset",
        "missing",
        "--base-model",
        "m",
        "--base-url",
        api.url + "/v1",
    )
    assert "No dataset 'missing'" in result.output


def test_create_without_a_key_is_one_line_naming_the_variable(
    db: str, api: FakeFineTuning, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No traceback, and no other key sent in its place."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    result = CliRunner().invoke(
        cli,
        [
            "finetune",
            "create",
            "--dataset",
            "support",
            "--base-model",
            "gpt-4.1-mini",
            "--base-url",
            api.url + "/v1",
            "--database-url",
            db,
        ],
    )
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: $OPENAI_API_KEY is not set: it holds the API key for endpoint 'fine-tuning'. "
        "Export it (no other key is sent in its place)."
    ]
    assert api.created == []


def test_a_provider_without_events_or_checkpoints_still_records_the_model(
    db: str, api: FakeFineTuning
) -> None:
    """Events and checkpoints are optional detail: their 404 never turns a job that
    succeeded into a failure."""
    api.detail_endpoints = False
    job_id = create(db, api, "gpt-4.1-mini", "--suffix", "support").output.strip().splitlines()[-1]
    result = ft(db, api, "watch", job_id, "--api-key-env", "HOME", "--interval", "0.01")
    assert result.exit_code == 0, result.output
    shown = json.loads(ft(db, api, "status", job_id, "--api-key-env", "HOME", "--json").output)
    assert shown["status"] == "succeeded"
    assert shown["fine_tuned_model"] == "ft:gpt-4.1-mini:acme:support:abc123"


def test_a_dataset_below_the_providers_minimum_is_refused_before_upload(
    api: FakeFineTuning, tmp_path: Path
) -> None:
    """OpenAI needs 10 training examples: fewer is refused here, not by a failed job."""
    url = f"sqlite:///{tmp_path / 'small.db'}"
    store = open_store(url)
    store.insert(base_records()[:5])
    store.close()
    built = CliRunner().invoke(
        cli,
        [
            "dataset",
            "build",
            "tiny",
            "--tag",
            "app=support",
            "--val-fraction",
            "0",
            "--database-url",
            url,
        ],
        catch_exceptions=False,
    )
    assert built.exit_code == 0, built.output
    result = ft(
        url,
        api,
        "create",
        "--dataset",
        "tiny",
        "--base-model",
        "gpt-4.1-mini",
        "--base-url",
        api.url + "/v1",
        "--api-key-env",
        "HOME",
    )
    assert result.exit_code == 1
    assert "has 5 examples; OpenAI's fine-tuning API needs at least 10" in result.output
    assert api.files == {} and api.created == []


@pytest.fixture
def backend_registry() -> Iterator[ModuleType]:
    """Backends a test registers are its own: the registry is put back after."""
    from distillery.curation.training import registry

    registry.names()  # the built-ins and plugins, loaded before the snapshot
    saved = dict(registry._REGISTRY)
    yield registry
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


def test_the_memory_backend_runs_a_job_through_the_cli(db: str) -> None:
    """`--backend memory` trains nothing and needs no API: the same job row, events and
    states as any backend, in one process."""
    created = ft(
        db,
        None,
        "create",
        "--dataset",
        "support",
        "--backend",
        "memory",
        "--base-model",
        "tiny",
        "--epochs",
        "2",
    )
    assert created.exit_code == 0, created.output
    job_id = created.output.strip().splitlines()[-1]
    watched = ft(db, None, "watch", job_id, "--interval", "0.01")
    assert watched.exit_code == 0, watched.output
    assert "Training started" in watched.output and "Training finished" in watched.output
    status = ft(db, None, "status", job_id, "--json")
    job = json.loads(status.output)
    assert job["backend"] == "memory" and job["status"] == "succeeded"
    assert job["fine_tuned_model"] == f"ft:tiny:{job_id}"
    assert job["hyperparameters"] == {"epochs": 2}
    assert job["dataset"] == "support" and job["dataset_version"] == 1


def test_a_backend_of_your_own(db: str, backend_registry: Any) -> None:
    """A class with name, local_models, start, state, events, cancel and close is a
    backend; registered under a name, `--backend NAME` uses it."""
    from distillery.curation.training.backends import FineTuneBackend, Started

    seen = []

    class Recorder:
        name = "recorder"
        local_models = False

        def start(self, spec: Any) -> Started:
            seen.append(spec)
            return Started("rec-1", "running", "http://recorder.test", spec.hyperparameters.given())

        def state(self, job: Any) -> JobState:
            return {
                "status": "succeeded",
                "fine_tuned_model": "rec-model",
                "metrics": {},
                "error": None,
            }

        def events(self, job: Any) -> list[JobEvent]:
            return [{"id": "1", "level": "info", "message": "recorded", "data": {}}]

        def cancel(self, job: Any) -> str:
            return "cancelled"

        def close(self) -> None:
            pass

    assert isinstance(Recorder(), FineTuneBackend)
    backend_registry.register("recorder", lambda context: Recorder())
    created = ft(
        db,
        None,
        "create",
        "--dataset",
        "support",
        "--backend",
        "recorder",
        "--base-model",
        "b",
        "--batch-size",
        "4",
    )
    assert created.exit_code == 0, created.output
    [spec] = seen
    assert spec.label == "support@1" and spec.dataset["train_examples"] > 0
    job_id = created.output.strip().splitlines()[-1]
    job = json.loads(ft(db, None, "status", job_id, "--json").output)
    assert (job["backend"], job["provider_job_id"], job["base_url"]) == (
        "recorder",
        "rec-1",
        "http://recorder.test",
    )
    assert job["status"] == "succeeded" and job["hyperparameters"] == {"batch_size": 4}


def test_an_unknown_backend_names_the_ones_there_are(db: str) -> None:
    result = ft(
        db, None, "create", "--dataset", "support", "--backend", "nope", "--base-model", "b"
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "No fine-tuning backend 'nope': use one of local, memory, openai" in result.output


def test_start_job_and_wait_record_a_failed_job_with_its_reason(db: str) -> None:
    from distillery.curation.training.backends import JobSpec, new_job_id
    from distillery.curation.training.jobs import start_job, wait
    from distillery.curation.training.memory import InMemoryBackend
    from distillery.store import datasets, finetunes

    store = open_store(db)
    version = datasets.latest(store, "support")
    assert version is not None
    backend = InMemoryBackend()
    job = start_job(store, backend, JobSpec(new_job_id(), version, "will-fail"))
    queued = finetunes.get(store, job["id"])
    assert queued is not None and queued["status"] == "queued"
    events: list[JobEvent] = []
    job = wait(store, job, backend, 0.0, events.append)
    assert job["status"] == "failed" and (job["error"] or {}).get("code") == "memory_failure"
    stored = finetunes.get(store, job["id"])
    assert stored is not None
    assert stored["status"] == "failed" and stored["error"] == job["error"]
    assert [e["message"] for e in events] == [
        "Created job on support@1",
        "Training started",
        "Training failed",
    ]
    store.close()


def test_the_readme_backend_example_is_a_backend(backend_registry: Any, tmp_path: Path) -> None:
    """The README's backend example implements the interface and registers under its name."""
    from distillery.curation.endpoints import Endpoint
    from distillery.curation.training.backends import BackendContext, FineTuneBackend
    from distillery.curation.training.registry import open_backend

    namespace: dict[str, Any] = {}
    exec(readme_code("Extending Distillery")[1], namespace)
    context = BackendContext(tmp_path, Endpoint("mycloud", "http://mycloud.test/v1", "key"))
    backend = open_backend("mycloud", context)
    assert isinstance(backend, FineTuneBackend) and backend.name == "mycloud"
    assert "mycloud" in backend_registry.names()


def test_a_local_jobs_files_are_typed_records(db: str, tmp_path: Path) -> None:
    """The trainer's job.json and status.json are read through typed records: a field one
    side misspells fails at once, naming the file and the field, instead of a KeyError
    in the trainer or a job that looks queued for ever."""
    from distillery.curation.training import trainer
    from distillery.store import finetunes

    directory = tmp_path / "data" / "finetunes" / "ftjob_typed"
    directory.mkdir(parents=True)
    job = {"base_model": "m", "dataset_dir": str(tmp_path), "dataset": "support@1"}
    (directory / "job.json").write_text(json.dumps({**job, "hyperparamters": {"epochs": 2}}))
    handler = signal.getsignal(signal.SIGTERM)  # the trainer takes SIGTERM; put it back
    try:
        assert trainer.run(directory) == 1  # fails before any model is loaded
    finally:
        signal.signal(signal.SIGTERM, handler)
    status = json.loads((directory / "status.json").read_text())
    assert status["status"] == "failed"
    assert "job.json: hyperparamters: a field this version" in status["error"]["message"]
    # A status.json with a field this version does not know is refused, naming it.
    store = open_store(db)
    finetunes.insert(
        store,
        {
            "id": "ftjob_typed",
            "backend": "local",
            "base_url": None,
            "provider_job_id": str(directory),
            "dataset": "support",
            "dataset_version": 1,
            "base_model": "m",
            "status": "running",
            "hyperparameters": {},
        },
    )
    store.close()
    (directory / "status.json").write_text(json.dumps({"status": "running", "modle_dir": "x"}))
    shown = ft(db, None, "status", "ftjob_typed")
    assert shown.exit_code == 1 and "status.json: modle_dir: a field this version" in shown.output
    assert "Traceback" not in shown.output


def test_a_spec_is_checked_where_it_is_made_whoever_makes_it(db: str, api: FakeFineTuning) -> None:
    """The hyperparameters' limits and the suffix's length are the spec's own rules: the
    flags take their ranges from the same table, and a spec made in code is refused too.
    Nothing reaches the provider."""
    from distillery.curation.training.backends import (
        LIMITS,
        FineTuneError,
        Hyperparameters,
        JobSpec,
    )

    long_suffix = create(db, api, "gpt-4.1-mini", "--suffix", "s" * 65)
    assert long_suffix.exit_code == 1
    assert "The suffix can be at most 64 characters." in long_suffix.output
    too_many = create(db, api, "gpt-4.1-mini", "--epochs", str(int(LIMITS["epochs"].high or 0) + 1))
    assert too_many.exit_code == 2 and "1<=x<=500" in too_many.output
    # The local trainer may run 500; OpenAI's API takes 50, said before anything is uploaded.
    for_openai = create(db, api, "gpt-4.1-mini", "--epochs", "51")
    assert for_openai.exit_code == 1 and "at most 50 epochs, not 51" in for_openai.output
    with pytest.raises(FineTuneError, match="batch size must be from 1 to 256, not 0"):
        Hyperparameters(batch_size=0)
    with pytest.raises(FineTuneError, match="learning rate multiplier must be above 0"):
        Hyperparameters(learning_rate_multiplier=0.0)
    with pytest.raises(FineTuneError, match="Name the base model"):
        JobSpec("ftjob_x", {}, " ")  # type: ignore[typeddict-item]
    assert api.files == {} and api.created == []


def trainer_events(epochs: int = 3, steps_per_epoch: int = 4, seconds: float = 2.0) -> list[Any]:
    """What the local trainer journals: messages, train losses, a validation loss per epoch,
    each at its time (a step every ``seconds``)."""
    total = epochs * steps_per_epoch
    events: list[Any] = [
        {"id": "0", "level": "info", "message": "loading the base model", "data": {}, "time": 0.0}
    ]
    for step in range(1, total + 1):
        where = {"step": step, "max_steps": total, "epochs": epochs, "epoch": step / 4}
        when = 100 + seconds * step
        events.append(
            {
                "id": f"t{step}",
                "level": "info",
                "message": f"step {step}: train loss",
                "data": {**where, "train_loss": 2.0 / step},
                "time": when,
            }
        )
        if step % steps_per_epoch == 0:
            events.append(
                {
                    "id": f"v{step}",
                    "level": "info",
                    "message": f"step {step}: valid loss",
                    "data": {**where, "valid_loss": 1.5 / step, "epoch_end": True},
                    "time": when,
                }
            )
    events.append({"id": "end", "level": "info", "message": "done: /m", "data": {}, "time": 200})
    return events


def test_training_progress_in_a_pipe_is_a_line_per_epoch(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from distillery.commands.shared import TrainingProgress

    progress = TrainingProgress(terminal=False)
    for event in trainer_events():
        progress(event)
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "info  loading the base model",
        # A step every 2 s from step 1 on: 8 steps left at step 4 are 16 s.
        "epoch 1/3, step 4/12, train loss 0.5000, val loss 0.3750, 0m 16s left at most",
        "epoch 2/3, step 8/12, train loss 0.2500, val loss 0.1875, 0m 08s left at most",
        "epoch 3/3, step 12/12, train loss 0.1667, val loss 0.1250, 0m 00s left at most",
        "info  done: /m",
    ]


def test_training_progress_on_a_terminal_and_as_json(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from distillery.commands.shared import TrainingProgress

    progress = TrainingProgress(terminal=True)
    for event in trainer_events(epochs=1, steps_per_epoch=4, seconds=90.0):
        progress(event)
    progress.close()
    err = capsys.readouterr().err
    # One line rewritten in place at every step, mid-epoch too; messages below it.
    assert err.count("\r\x1b[2K") == 5
    assert "\r\x1b[2Kepoch 0.5/1, step 2/4, train loss 1.0000, 3m 00s left at most" in err
    assert err.endswith("0m 00s left at most\ninfo  done: /m\n")

    progress = TrainingProgress(as_json=True, terminal=True)
    events = trainer_events(epochs=1)
    for event in events:
        progress(event)
    out = capsys.readouterr()
    assert [json.loads(line) for line in out.out.splitlines()] == events and out.err == ""


def test_the_epoch_range_is_where_early_stopping_can_end() -> None:
    """The fewest epochs: `patience` epochs with no better loss after the first, never
    before min_epochs; the most: max_epochs; a fixed count or no validation: exactly that."""
    from distillery.curation.training.settings import choose, epoch_range

    def run(**kwargs: Any) -> tuple[int, int]:
        base = {"parameters": 10**9, "examples": 280, "from_scratch": False}
        return epoch_range(choose(**{**base, "has_validation": True, "given": {}, **kwargs}))

    assert run(from_scratch=True) == (45, 60)  # min_epochs 45, patience 10
    assert run(parameters=10**6) == (4, 20)  # small: patience 3, no floor
    assert run() == (3, 5)  # LoRA: patience 2, at most 5
    assert run(has_validation=False) == (3, 3)
    assert run(has_validation=False, from_scratch=True) == (20, 20)
    assert run(given={"epochs": 7}) == (7, 7)


def test_a_student_from_scratch_runs_as_many_updates_whatever_its_epoch_holds() -> None:
    """The scratch profile's 45-60 epochs were measured at 35 updates an epoch (280 examples
    in batches of 8); a dataset with more updates an epoch runs the same updates in fewer
    epochs, never more epochs; a count given, or no validation split, is kept as it is."""
    from distillery.curation.training.settings import SCRATCH, choose, epoch_range

    def scratch(examples: int, **kwargs: Any) -> dict[str, Any]:
        kwargs = {"has_validation": True, "given": {}, **kwargs}
        return choose(parameters=10**6, examples=examples, from_scratch=True, **kwargs)

    assert SCRATCH["epoch_updates"] == 35 and -(-280 // 8) == 35
    assert epoch_range(scratch(280)) == (45, 60)
    assert epoch_range(scratch(100)) == (45, 60)  # 13 updates an epoch: never more epochs
    for examples in (400, 1188, 1350, 5000):
        settings = scratch(examples)
        updates = -(-examples // settings["batch_size"])
        low, high = epoch_range(settings)
        assert (low, high) == (-(-45 * 35 // updates), -(-60 * 35 // updates))
        assert 60 * 35 <= high * updates < 60 * 35 + updates  # the same updates, to an epoch
    assert epoch_range(scratch(1350)) == (37, 49)  # batches of 32, 43 updates an epoch
    assert epoch_range(scratch(1350, given={"epochs": 60})) == (60, 60)
    assert epoch_range(scratch(1350, has_validation=False)) == (20, 20)
    assert "epoch_updates" not in scratch(1350)  # a measurement, not a setting of the run


def test_only_a_large_model_recomputes_activations_in_the_backward_pass() -> None:
    """Gradient checkpointing (TRL's default) trades a third more compute a step for memory:
    off for a model under SMALL_MODEL parameters, on for larger ones, whatever the method."""
    from distillery.curation.training.settings import SMALL_MODEL, choose

    def checkpointing(parameters: int, method: str | None = None) -> bool:
        chosen = choose(parameters=parameters, examples=500, from_scratch=False,
                        has_validation=True, given={}, method=method)  # fmt: skip
        return bool(chosen["gradient_checkpointing"])

    assert not checkpointing(SMALL_MODEL - 1) and not checkpointing(SMALL_MODEL - 1, "lora")
    assert checkpointing(SMALL_MODEL) and checkpointing(10**9, "full")


def test_what_counts_as_progress_and_which_epoch_is_best() -> None:
    """Early stopping's progress: a better validation token accuracy, or the same at a lower
    loss while some answer tokens are wrong; once all are right, the loss no longer counts.
    The kept epoch: the best accuracy, the lower loss breaking ties; never the loss alone (on a
    split whose held-apart prompts drive the loss up, the loss would keep a first epoch)."""
    from distillery.curation.training.trainer import progress, score

    assert progress(0.90, 0.5) > progress(0.80, 0.1)  # accuracy first
    assert progress(0.90, 0.4) > progress(0.90, 0.5)  # then the loss, while under 1
    assert not progress(1.0, 0.001) > progress(1.0, 0.002)  # all right: the loss is no reason
    assert progress(None, 0.4) > progress(None, 0.5)  # no accuracy reported: the loss
    assert score(0.95, 1.8) > score(0.60, 0.9)  # epoch 2 over epoch 1 on a rising loss
    assert score(1.0, 0.001) > score(1.0, 0.002) > score(0.9999, 0.0)
