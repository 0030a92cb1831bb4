"""The local backend: TRL + PEFT on a tiny model built here, as a real subprocess."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from distillery.cli import cli
from distillery.store import open_store

from helpers import ServerThread, record

pytest.importorskip(
    "trl", reason="the training extra is not installed: pip install torch==2.13.0 -e '.[train]'"
)


# Real processes (proxy workers, trainers): seconds each, so out of the fast loop.
# CI runs these again once the training extra is installed (`pytest -m train`).
pytestmark = [pytest.mark.slow, pytest.mark.train]


def build(directory: Path, texts: list[str]) -> Path:
    """A tiny student, as `distillery student create --hidden 64 --layers 2` makes one."""
    from distillery.curation.training.student import create

    create(directory, texts, hidden=64, layers=2, vocab_size=400)
    return directory


NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
PRODUCTS = ["blender", "kettle", "toaster", "lamp", "router", "phone"]


def task(rng: random.Random, i: int) -> tuple[str, str]:
    name, product, order = rng.choice(NAMES), rng.choice(PRODUCTS), 100 + i
    return f"hi, {name} here. my {product} from order {order} broke.", json.dumps(
        {"name": name, "product": product, "order": order}
    )


@pytest.fixture
def setup(tmp_path: Path) -> tuple[str, Path]:
    rng = random.Random(0)
    pairs = [task(rng, i) for i in range(60)]
    db = f"sqlite:///{tmp_path / 'train.db'}"
    store = open_store(db)
    store.insert(
        [
            record(i, user, answer, system="Extract JSON.")
            for i, (user, answer) in enumerate(pairs, 1)
        ]
    )
    store.close()
    built = CliRunner().invoke(
        cli,
        [
            "dataset",
            "build",
            "tickets",
            "--tag",
            "app=support",
            "--val-fraction",
            "0.2",
            "--database-url",
            db,
        ],
        catch_exceptions=False,
    )
    assert built.exit_code == 0, built.output
    model = build(tmp_path / "tiny", [text for pair in pairs for text in pair] + ["Extract JSON."])
    return db, model


def create_local(db: str, model: Any, *args: Any) -> str:
    """`finetune create --backend local` on the tickets dataset; returns the job id."""
    result = ft(
        db,
        "create",
        "--dataset",
        "tickets",
        "--backend",
        "local",
        "--base-model",
        str(model),
        *args,
    )
    assert result.exit_code == 0, result.output
    return result.stdout.strip().splitlines()[-1]  # the id; progress (--watch) is on stderr


def ft(db: str, *args: Any) -> Result:
    return CliRunner().invoke(
        cli, ["finetune", *args, "--database-url", db], catch_exceptions=False
    )


def test_local_lora_trains_merges_and_answers(setup: Any) -> None:
    db, model = setup
    job_id = create_local(
        db,
        model,
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--learning-rate",
        "3e-3",
        "--lora",
        "--merge",
        "--seed",
        "1",
    )
    watched = ft(db, "watch", job_id, "--interval", "0.5")
    assert watched.exit_code == 0, watched.output
    # In a pipe: a line per epoch, each with its step, both losses and the time left.
    epochs = [line for line in watched.output.splitlines() if line.startswith("epoch ")]
    assert [line.split(",")[0] for line in epochs] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert all("train loss " in line and "val loss " in line for line in epochs), epochs
    steps = [int(line.split("step ")[1].split("/")[0]) for line in epochs]
    total = int(epochs[-1].split("step ")[1].split("/")[1].split(",")[0])
    assert steps == sorted(steps) and steps[-1] == total and steps[0] == total // 3
    assert "left at most" in epochs[0] and "0m 00s left at most" in epochs[-1]
    # --json: every event, for machines, on stdout.
    events = [json.loads(line) for line in ft(db, "watch", job_id, "--json").stdout.splitlines()]
    assert sum(bool(e["data"].get("epoch_end")) for e in events) == 3
    assert all(e["data"]["max_steps"] == total for e in events if "step" in e["data"])
    job = json.loads(ft(db, "status", job_id, "--json").output)
    assert job["status"] == "succeeded"
    assert not (Path(job["provider_job_id"]) / "checkpoints").exists()  # gone on success
    merged = Path(job["fine_tuned_model"])
    manifest = json.loads((merged / "manifest.json").read_text())
    assert manifest["first_train_loss"] > manifest["final_train_loss"]  # it learned something
    assert (
        manifest["dataset"] == "tickets@1"
        and manifest["lora"] is True
        and manifest["device"] == "cpu"
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    student = AutoModelForCausalLM.from_pretrained(
        merged
    )  # a plain model: the adapter is merged in
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi, bob here."}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = student.generate(
        **ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_settings_fit_the_student() -> None:
    """From scratch: full, 1e-3, warm-up and a cosine decay to a floor, early stopping.
    Pretrained: LoRA with the usual settings.  What the user gives wins; without a
    validation split (nothing to stop on) or with --epochs, the count is fixed."""
    from distillery.curation.training.settings import choose, default_threads

    scratch = choose(
        examples=1350, parameters=1_000_000, from_scratch=True, has_validation=True, given={}
    )
    assert scratch["method"] == "full" and scratch["learning_rate"] == 1e-3
    assert scratch["warmup_ratio"] > 0 and 0 < scratch["min_learning_rate_ratio"] < 1
    assert scratch["early_stopping"] is True and "lora_r" not in scratch
    assert scratch["profile"].startswith("randomly initialised")
    pretrained = choose(
        examples=1350, parameters=500_000_000, from_scratch=False, has_validation=True, given={}
    )
    assert pretrained["method"] == "lora" and pretrained["learning_rate"] == 2e-4
    assert (pretrained["lora_r"], pretrained["lora_alpha"]) == (16, 32)
    small = choose(
        examples=1350, parameters=5_000_000, from_scratch=False, has_validation=True, given={}
    )
    assert small["method"] == "full" and small["learning_rate"] < scratch["learning_rate"]
    forced = choose(
        examples=1350,
        parameters=5_000_000,
        from_scratch=False,
        has_validation=True,
        given={"learning_rate": 3e-3, "epochs": 4, "lora_r": 8},
        method="lora",
    )
    assert forced["method"] == "lora" and forced["learning_rate"] == 3e-3
    assert forced["lora_r"] == 8 and forced["max_epochs"] == 4 and not forced["early_stopping"]
    blind = choose(
        examples=1350, parameters=1_000_000, from_scratch=True, has_validation=False, given={}
    )
    assert not blind["early_stopping"] and blind["max_epochs"] == 20
    assert (
        choose(examples=280, parameters=1, from_scratch=True, has_validation=True, given={})[
            "batch_size"
        ]
        == 8
    )  # about 40 steps an epoch for a student learning from scratch
    assert scratch["batch_size"] == 32 and pretrained["batch_size"] == 8
    assert default_threads(2) == 1 and default_threads(16) == 8 and default_threads(1) == 1
    assert (
        choose(
            examples=1350, parameters=1, from_scratch=True, has_validation=True, given={}, cuda=True
        )["threads"]
        is None
    )


SYSTEM = "Extract the customer's name, the product and the order number as JSON."


def first_batch(directory: Path, pairs: list[tuple[str, str]], batch_size: int) -> tuple[Any, Any]:
    """Our trainer (TRL's SFTTrainer subclassed) on a tiny student built for these
    (request, answer) pairs, and its first collated training batch."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer  # type: ignore[attr-defined]

    from distillery.curation.training.trainer import recomputing, trainer_class

    model_dir = build(directory / "tiny", [text for pair in pairs for text in pair] + [SYSTEM])
    rows = [
        {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
                      {"role": "assistant", "content": answer}]}
        for user, answer in pairs
    ]  # fmt: skip
    config = SFTConfig(
        output_dir=str(directory / "out"),
        per_device_train_batch_size=batch_size,
        assistant_only_loss=True,
        use_cpu=True,
        **recomputing(False),
        report_to=[],
    )
    trainer = trainer_class(SFTTrainer)(
        model=str(model_dir),
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    return trainer, trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def test_a_prefix_the_batch_shares_computed_once_gives_the_same_loss_and_gradients(
    tmp_path: Path,
) -> None:
    """The trainer computes the tokens every row of a batch starts with (system prompt,
    template) once and repeats their keys and values: the loss and every gradient are
    TRL's own for the whole batch (its compute_loss is the oracle).  The prefix ends where
    the rows differ, and before the first scored token; no saving, no prefix."""
    import torch
    from trl import SFTTrainer  # type: ignore[attr-defined]

    from distillery.curation.training.trainer import shared_prefix

    rng = random.Random(0)
    trainer, batch = first_batch(tmp_path, [task(rng, i) for i in range(32)], 16)
    ids, labels = batch["input_ids"], batch["labels"]
    length = shared_prefix(batch)
    assert length > len(SYSTEM) // 8  # the system turn at least, in a few tokens a word
    assert (ids[:, :length] == ids[:1, :length]).all()
    assert not (ids[:, length] == ids[0, length]).all()  # where the users' texts differ
    assert (labels[:, : length + 1] == -100).all()

    model = trainer.model
    model.train()

    def loss_and_gradients(compute_loss: Callable[..., Any]) -> tuple[float, list[Any]]:
        model.zero_grad()
        loss = compute_loss(model, dict(batch))
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in model.parameters()]

    trl_loss: Callable[..., Any] = SFTTrainer.compute_loss  # TRL's own, the oracle
    plain, plain_grads = loss_and_gradients(lambda m, b: trl_loss(trainer, m, b))
    shared, shared_grads = loss_and_gradients(trainer.compute_loss)
    assert shared == pytest.approx(plain, rel=1e-5)
    for got, want in zip(shared_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)

    # Rows that differ from the first token share nothing; two rows save too little.
    other = {**batch, "input_ids": ids.clone()}
    other["input_ids"][1, 0] = ids[0, 0] + 1
    assert shared_prefix(other) == 0
    assert shared_prefix({key: value[:2] for key, value in batch.items()}) == 0
    # Identical rows: the prefix stops before the first token scored (its prediction is
    # made from the position before it, which must be each row's own).
    same = {key: value[:1].repeat(16, 1) for key, value in batch.items()}
    first = int((same["labels"][0] != -100).nonzero()[0])
    assert shared_prefix(same) == first - 1


def test_a_batch_in_parts_of_similar_length_gives_the_same_loss_gradients_and_metrics(
    tmp_path: Path,
) -> None:
    """Rows of very different lengths are computed in parts, each padded only to its own
    longest: the loss, every gradient and the logged token accuracy and entropy are TRL's own
    for the whole batch in one call (its compute_loss is the oracle), whether the trainer
    passes the batch's token count or not, in training and in evaluation."""
    import torch
    from trl import SFTTrainer  # type: ignore[attr-defined]

    from distillery.curation.training.trainer import length_parts

    rng = random.Random(1)
    pairs = [task(rng, i) for i in range(32)]
    # A third of the requests ramble on: without parts, every row pads to theirs.
    tail = " it was working fine until last week and now it makes a strange noise" * 3
    pairs = [
        (user + tail if i % 3 == 0 else user, answer) for i, (user, answer) in enumerate(pairs)
    ]
    trainer, batch = first_batch(tmp_path, pairs, 32)
    mask = batch["attention_mask"]
    parts = length_parts(batch)
    assert len(parts) >= 2
    assert sorted(int(row) for part in parts for row in part) == list(range(len(mask)))
    lengths = mask.sum(dim=1)
    computed = sum(len(part) * int(lengths[part].max()) for part in parts)
    assert computed < 0.8 * mask.numel()  # the padding the whole batch would compute
    rambling = lengths > (lengths.max() + lengths.min()) / 2
    assert int(rambling.sum()) == len([pair for pair in pairs if tail in pair[0]])
    assert all(len(set(rambling[part].tolist())) == 1 for part in parts)  # never mixed

    model = trainer.model
    trl_loss: Callable[..., Any] = SFTTrainer.compute_loss  # TRL's own, the oracle

    def run(
        compute_loss: Callable[..., Any], count: Any
    ) -> tuple[float, list[Any], dict[str, Any]]:
        model.zero_grad()
        mode = "train" if model.training else "eval"
        trainer._metrics[mode].clear()
        loss = compute_loss(model, dict(batch), num_items_in_batch=count)
        if model.training:
            loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return float(loss.detach()), grads, dict(trainer._metrics[mode])

    count = (batch["labels"][:, 1:] != -100).sum()
    seen: list[int] = []  # the rows of each call to the model
    embed = model.get_input_embeddings()
    sizes = sorted(len(part) for part in parts if len(part) > 1)
    assert len(sizes) >= 2
    for training in (True, False):
        model.train(training)
        for items in (None, count):
            want, want_grads, want_logged = run(
                lambda m, b, **kw: trl_loss(trainer, m, b, **kw), items
            )
            # The model is given the parts, a call each (and a one-row call per shared prefix).
            seen.clear()
            hook = embed.register_forward_hook(lambda _m, args, _o: seen.append(len(args[0])))
            try:
                got, got_grads, got_logged = run(trainer.compute_loss, items)
            finally:
                hook.remove()
            assert sorted(rows for rows in seen if rows > 1) == sizes
            assert got == pytest.approx(want, rel=1e-5)
            assert len(got_grads) == len(want_grads)
            for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
                torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)
            for key in ("mean_token_accuracy", "entropy"):
                assert len(got_logged[key]) == 1  # one entry for the batch, as one call logs
                assert got_logged[key][0] == pytest.approx(want_logged[key][0], rel=1e-5)

    # Rows of one length, or a batch with more than a padded batch's keys: one part.
    assert len(length_parts({key: value[:1].repeat(8, 1) for key, value in batch.items()})) == 1
    positions = torch.arange(mask.shape[1]).repeat(len(mask), 1)
    assert len(length_parts({**batch, "position_ids": positions})) == 1


def test_the_trainer_tells_a_student_made_here_from_a_pretrained_one(tmp_path: Path) -> None:
    """The marker `student create` writes is what makes a model "from scratch"; the same
    weights without it are a small pretrained model (its parameters counted from the
    config), and an explicit --lora is honoured."""
    from distillery.curation.training.job_files import TrainerJob
    from distillery.curation.training.student import MARKER
    from distillery.curation.training.trainer import choose_settings

    model = build(tmp_path / "student", ["hello there", "the answer is 42"] * 10)
    job = TrainerJob(base_model=str(model), dataset_dir=str(tmp_path), dataset="d@1")
    scratch = choose_settings(job, 280, True, False)
    assert scratch["profile"].startswith("randomly initialised") and scratch["method"] == "full"
    assert scratch["batch_size"] == 8 and 10_000 < scratch["parameters"] < 30_000_000
    (model / MARKER).unlink()
    small = choose_settings(job, 280, True, False)
    assert small["profile"].startswith("small") and small["learning_rate"] == 1e-4
    lora = choose_settings(job.model_copy(update={"lora": True}), 280, True, False)
    assert lora["method"] == "lora" and lora["lora_r"] == 16


def test_a_student_made_here_trains_fully_and_stops_at_its_best_epoch(
    setup: Any, tmp_path: Path
) -> None:
    """`student create` makes a randomly initialised student; the trainer sees it, trains
    every weight, stops once the validation score (token accuracy, then loss) has not
    improved for `patience` epochs (never before `min_epochs`) and keeps the best epoch's
    weights.  The settings it used, defaults
    included, are in the manifest and shown by `finetune status`."""
    db, _ = setup
    made = CliRunner().invoke(
        cli,
        [
            *("student", "create", str(tmp_path / "student"), "--dataset", "tickets"),
            *("--hidden", "64", "--layers", "2", "--database-url", db),
        ],
        catch_exceptions=False,
    )
    assert made.exit_code == 0, made.output
    assert "parameters" in made.output
    assert "Writing model shards" not in made.output  # a progress bar, in a pipe
    # A learning rate far too high: the validation loss rises after its best epoch.
    job_id = create_local(db, tmp_path / "student", "--learning-rate", "1.0")
    watched = ft(db, "watch", job_id, "--interval", "0.5")
    assert watched.exit_code == 0, watched.output
    status = ft(db, "status", job_id)
    assert "settings: " in status.output and "method=full" in status.output
    assert "early_stopping=True" in status.output and "learning_rate=1.0" in status.output
    job = json.loads(ft(db, "status", job_id, "--json").output)
    manifest = json.loads((Path(job["fine_tuned_model"]) / "manifest.json").read_text())
    settings = manifest["settings"]
    assert settings["method"] == "full" and manifest["lora"] is False
    assert settings["profile"].startswith("randomly initialised")
    assert settings["threads"] >= 1 and settings["warmup_ratio"] > 0
    assert settings["gradient_checkpointing"] is False  # a third more compute, for nothing
    log = (Path(job["provider_job_id"]) / "events.jsonl").read_text().splitlines()
    events = [json.loads(line)["data"] for line in log]
    from distillery.curation.training.trainer import progress, score

    valid = [
        (score(e["valid_accuracy"], e["valid_loss"]), e["epoch"], e["valid_loss"],
         progress(e["valid_accuracy"], e["valid_loss"]))
        for e in events
        if "valid_loss" in e and "step" in e
    ]  # fmt: skip
    # The best: the highest score (token accuracy, then the lower loss), its first epoch.
    best_score, best_epoch, best_loss, _ = max(valid, key=lambda v: (v[0], -v[1]))
    assert best_score > 0  # token accuracy is reported, and the student got some right
    # The rule, replayed on what the trainer reported: stop at the first epoch, not before
    # min_epochs, after `patience` epochs without progress (a better accuracy, or the same
    # at a lower loss while it is under 1); else run them all.
    expected, best, waited = settings["max_epochs"], None, 0
    for _, epoch, _, now in sorted(valid, key=lambda v: v[1]):
        best, waited = (now, 0) if best is None or now > best else (best, waited + 1)
        if waited >= settings["patience"] and epoch >= settings["min_epochs"]:
            expected = epoch
            break
    assert settings["min_epochs"] <= manifest["epochs_run"] == expected
    assert manifest["best_epoch"] == best_epoch
    assert manifest["valid_loss"] == pytest.approx(best_loss, rel=1e-4)  # the best epoch's weights
    assert score(manifest["valid_accuracy"], manifest["valid_loss"]) == pytest.approx(best_score)


def test_cancel_stops_a_local_job(setup: Any) -> None:
    db, model = setup
    job_id = create_local(db, model, "--epochs", "50", "--batch-size", "2")
    result = ft(db, "cancel", job_id)
    assert result.exit_code == 0 and "cancelled" in result.output
    assert json.loads(ft(db, "status", job_id, "--json").output)["status"] == "cancelled"


def test_serve_answers_like_openai_streaming_too(
    tmp_path: Path, servers: ServerThread, sdk: Callable[..., Any]
) -> None:
    import httpx

    from distillery.curation.serve import make_app

    model = build(tmp_path / "student", ["hello there", "the answer is 42", "Extract JSON."])
    url, _ = servers.serve(make_app(model, "student"))
    client = sdk(url + "/v1")
    answer = client.chat.completions.create(
        model="student", messages=[{"role": "user", "content": "hello"}], max_tokens=6
    )
    assert answer.object == "chat.completion" and answer.model == "student"
    assert answer.usage.completion_tokens <= 6 and answer.usage.prompt_tokens > 0
    assert answer.choices[0].finish_reason in ("stop", "length")
    chunks = list(
        client.chat.completions.create(
            model="student",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.choices[0].message.content  # greedy: the same answer either way
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    assert [m.id for m in client.models.list().data] == ["student"]
    bad = httpx.post(url + "/v1/chat/completions", content=b"{nope")
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def test_serve_refuses_an_adapter_directory(tmp_path: Path) -> None:
    (tmp_path / "adapter").mkdir()
    result = CliRunner().invoke(cli, ["serve", str(tmp_path / "adapter")])
    assert result.exit_code == 1 and "serve its merged/ directory" in result.output


def test_templates_without_generation_markers_train_on_the_completion(
    setup: Any, tmp_path: Path
) -> None:
    """Most hub models' templates lack {% generation %}: the trainer falls back to
    prompt/completion pairs, still counting only the answer."""
    db, model = setup
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = tokenizer.chat_template.replace("{% generation %}", "").replace(
        "{% endgeneration %}", ""
    )
    tokenizer.save_pretrained(model)
    job_id = create_local(
        db,
        model,
        *("--epochs", "2", "--batch-size", "8", "--full", "--watch", "--keep-checkpoints"),
    )
    job = json.loads(ft(db, "status", job_id, "--json").output)
    # Kept when asked: the weights of the last two epochs, without the optimizer's state.
    kept = sorted((Path(job["provider_job_id"]) / "checkpoints").glob("checkpoint-*"))
    assert len(kept) == 2 and all((c / "model.safetensors").exists() for c in kept)
    assert not any((c / "optimizer.pt").exists() for c in kept)
    manifest = json.loads((Path(job["fine_tuned_model"]) / "manifest.json").read_text())
    assert manifest["lora"] is False and manifest["final_train_loss"] < manifest["first_train_loss"]


def test_the_dataset_estimate_uses_the_trainers_epochs(setup: Any, tmp_path: Path) -> None:
    """`dataset build --student DIR` counts the epochs the trainer will run for that student
    (the settings a job chooses), not a flat 3; a run of it lands in that range."""
    db, _ = setup
    student = tmp_path / "student"
    made = CliRunner().invoke(
        cli,
        [
            *("student", "create", str(student), "--dataset", "tickets"),
            *("--hidden", "64", "--layers", "2", "--database-url", db),
        ],
        catch_exceptions=False,
    )
    assert made.exit_code == 0, made.output
    built = CliRunner().invoke(
        cli,
        [
            *("dataset", "build", "tickets", "--tag", "app=support", "--val-fraction", "0.2"),
            *("--student", str(student), "--json", "--database-url", db),
        ],
        catch_exceptions=False,
    )
    assert built.exit_code == 0, built.output
    tokens = json.loads(built.stdout)["tokens"]
    from distillery.curation.training.settings import SCRATCH

    assert (tokens["min_epochs"], tokens["epochs"]) == (
        SCRATCH["min_epochs"],
        SCRATCH["max_epochs"],
    )
    assert tokens["training_tokens"] == tokens["tokens"] * SCRATCH["max_epochs"]
    assert (
        "45-60 epochs, at most (the local trainer's, for this student)"
        in CliRunner().invoke(cli, ["dataset", "show", "tickets", "--database-url", db]).output
    )
    # The same numbers the trainer chooses for a job on this version (what a run obeys: see
    # the test above, which trains one to its early stop).
    from distillery.curation.training.job_files import TrainerJob
    from distillery.curation.training.settings import epoch_range
    from distillery.curation.training.trainer import choose_settings

    job = TrainerJob(base_model=str(student), dataset_dir="", dataset="tickets@2")
    chosen = choose_settings(job, tokens["examples"], True, cuda=False)
    assert epoch_range(chosen) == (tokens["min_epochs"], tokens["epochs"])
    assert (chosen["min_epochs"], chosen["max_epochs"]) == (45, 60)
