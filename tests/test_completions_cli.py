"""`distillery completions` against real SQLite and Postgres stores, exact output."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from distillery.cli import cli
from distillery.store import open_store
from distillery.store.records import CaptureRecord

T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC).timestamp()


def make(
    i: Any,
    *,
    model: Any = "gpt-4o",
    tags: Any = None,
    user: Any = "hello",
    system: Any = "You are a support bot.",
    status: Any = 200,
    error: Any = None,
    stream: Any = False,
    finish: Any = "stop",
    answer: Any = "Hi there",
    latency: Any = 100.0,
    tenant: Any = "key-aaaaaaaaaaaaaaaa",
    fp: Any = "fp_support",
) -> CaptureRecord:
    return {
        "id": f"cap_{i:028d}",
        "completion_id": f"chatcmpl-{i}",
        "created_at": T0 + i * 3600,
        "tenant": tenant,
        "upstream": "https://api.openai.com/v1",
        "path": "/v1/chat/completions",
        "model_requested": model,
        "model_served": model + "-2024-08-06",
        "status": status,
        "stream": stream,
        "finish_reason": finish if error is None else None,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "latency_ms": latency,
        "ttft_ms": 20.0 if stream else None,
        "upstream_request_id": f"req_{i}",
        "prompt_fingerprint": fp,
        "request": {
            "model": model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        },
        "response": None
        if error
        else {
            "id": f"chatcmpl-{i}",
            "object": "chat.completion",
            "created": int(T0),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer},
                    "finish_reason": finish,
                }
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        },
        "error": error,
        "metadata": tags or {},
    }


RECORDS = [
    make(1, tags={"app": "support", "env": "prod"}, user="Where is my refund?", latency=100),
    make(
        2, tags={"app": "support", "env": "prod"}, user="Cancel my order", stream=True, latency=200
    ),
    make(
        3,
        tags={"app": "sql", "env": "prod"},
        model="gpt-4o-mini",
        system="Write SQL.",
        user="count users",
        fp="fp_sql",
        latency=50,
    ),
    make(
        4,
        tags={"app": "support", "env": "staging"},
        user="refund again",
        status=500,
        error={"error": {"message": "boom"}},
        latency=300,
    ),
    make(
        5,
        tags={"app": "sql"},
        model="gpt-4o-mini",
        system="Write SQL.",
        user="drop table",
        finish="length",
        fp="fp_sql",
        tenant="key-bbbbbbbbbbbbbbbb",
        latency=75,
    ),
]


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    url = (
        f"sqlite:///{tmp_path / 'cli.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    store = open_store(url)
    store.insert(RECORDS)
    store.close()
    return url


def run(db: str, *args: Any, input: Any = None) -> Result:
    result = CliRunner().invoke(
        cli,
        ["completions", *args, "--database-url", db]
        if args and args[0] in ("list", "show", "stats", "tag", "untag", "delete", "export")
        else ["completions", *args],
        input=input,
        catch_exceptions=False,
    )
    return result


def ok(db: str, *args: Any, **kwargs: Any) -> str:
    result = run(db, *args, **kwargs)
    assert result.exit_code == 0, result.output
    return result.output


def ids(output: Any) -> list[str]:
    return [json.loads(line)["id"][-1:] for line in output.splitlines()]


def test_list_table_is_the_default(db: str) -> None:
    output = (
        CliRunner()
        .invoke(cli, ["completions", "--database-url", db, "-n", "3"], catch_exceptions=False)
        .output
    )
    # Numbers right-aligned, one format per column; an error is a column, not a marker.
    assert output == (
        "id                                created_at           model        status  error  tokens  latency_ms  tags                     prompt\n"
        "--------------------------------  -------------------  -----------  ------  -----  ------  ----------  -----------------------  ------------\n"
        "cap_0000000000000000000000000005  2026-11-20 14:00:00  gpt-4o-mini     200             15        75.0  app=sql                  drop table\n"
        "cap_0000000000000000000000000004  2026-11-20 13:00:00  gpt-4o          500  error      15       300.0  app=support,env=staging  refund again\n"
        "cap_0000000000000000000000000003  2026-11-20 12:00:00  gpt-4o-mini     200             15        50.0  app=sql,env=prod         count users\n"
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--tag", "app=support"], ["4", "2", "1"]),
        (["--tag", "app=support", "--tag", "env=prod"], ["2", "1"]),
        (["-m", "gpt-4o-mini"], ["5", "3"]),
        (["--since", "2026-11-20T11:00", "--until", "2026-11-20T13:30"], ["4", "3", "2"]),
        (["--status", "error"], ["4"]),
        (["--status", "ok", "--finish-reason", "length"], ["5"]),
        (["--stream"], ["2"]),
        (["--no-stream", "--tag", "app=support"], ["4", "1"]),
        (["-q", "refund"], ["4", "1"]),
        (["-q", "SQL drop"], ["5"]),
        (["--tenant", "key-bbbbbbbbbbbbbbbb"], ["5"]),
        (["--tag", "app=support", "-n", "1"], ["4"]),
        (["--order", "asc", "-n", "2"], ["1", "2"]),
        (["-n", "0"], ["5", "4", "3", "2", "1"]),
        (["--tag", "app=nothing"], []),
    ],
)
def test_list_filters(db: str, args: Any, expected: Any) -> None:
    assert ids(ok(db, "list", *args, "--nl")) == expected


def test_json_is_one_array_of_whole_records_and_csv_has_a_header(db: str) -> None:
    records = json.loads(ok(db, "list", "--json", "-n", "2"))
    assert [r["id"] for r in records] == [
        "cap_0000000000000000000000000005",
        "cap_0000000000000000000000000004",
    ]
    assert records[0]["request"]["messages"][1]["content"] == "drop table"
    assert records[0]["metadata"] == {"app": "sql"}
    assert json.loads(ok(db, "list", "--json", "--tag", "app=none")) == []
    csv = ok(db, "list", "--csv", "-n", "1")
    assert csv.splitlines() == [
        "id,created_at,model,status,error,tokens,latency_ms,tags,prompt",
        "cap_0000000000000000000000000005,2026-11-20T14:00:00+00:00,gpt-4o-mini,200,,15,75.0,app=sql,drop table",
    ]


def test_show_reads_a_call_whole(db: str) -> None:
    output = ok(db, "show", "chatcmpl-2")
    assert output.splitlines() == [
        "id:          cap_0000000000000000000000000002",
        "completion:  chatcmpl-2",
        "created:     2026-11-20 11:00:00+00:00",
        "tenant:      key-aaaaaaaaaaaaaaaa",
        "model:       gpt-4o -> gpt-4o-2024-08-06",
        "status:      200",
        "stream:      True",
        "finish:      stop",
        "tokens:      10 in, 5 out, 15 total",
        "latency:     200.0 ms (first byte 20.0 ms)",
        "request id:  req_2",
        "fingerprint: fp_support",
        "metadata:    app=support, env=prod",
        "",
        "Messages",
        "  [system] You are a support bot.",
        "  [user] Cancel my order",
        "",
        "Output",
        "  [assistant] Hi there",
    ]
    whole = json.loads(ok(db, "show", "cap_0000000000000000000000000004", "--json"))
    assert whole["error"] == {"error": {"message": "boom"}}


def test_stats_groups_and_finds_the_tasks(db: str) -> None:
    rows = json.loads(ok(db, "stats", "--exact", "--json"))
    assert rows == [
        {
            "group": "gpt-4o-2024-08-06",
            "calls": 3,
            "errors": 1,
            "error_rate": 0.3333,
            "prompt_tokens": 30,
            "completion_tokens": 15,
            "p50_ms": 200.0,
            "p95_ms": 300.0,
            "p99_ms": 300.0,
        },
        {
            "group": "gpt-4o-mini-2024-08-06",
            "calls": 2,
            "errors": 0,
            "error_rate": 0.0,
            "prompt_tokens": 20,
            "completion_tokens": 10,
            "p50_ms": 50.0,
            "p95_ms": 75.0,
            "p99_ms": 75.0,
        },
    ]
    # Without --exact the aggregates answer: the same counts, each percentile as the edge of
    # the latency bucket it lies in (100, 200, 300 ms: the median lies in [200, 400)).
    assert json.loads(ok(db, "stats", "--json")) == [
        {
            **{k: v for k, v in rows[0].items() if not k.endswith("_ms")},
            "p50_under_ms": 400.0,
            "p95_under_ms": 400.0,
            "p99_under_ms": 400.0,
        },
        {
            **{k: v for k, v in rows[1].items() if not k.endswith("_ms")},
            "p50_under_ms": 100.0,
            "p95_under_ms": 100.0,
            "p99_under_ms": 100.0,
        },
    ]
    by_env = {
        r["group"]: r["calls"] for r in json.loads(ok(db, "stats", "--by", "tag:env", "--json"))
    }
    assert by_env == {"prod": 3, "staging": 1, "(none)": 1}
    by_day = json.loads(ok(db, "stats", "--by", "day", "--json"))
    assert [(r["group"], r["calls"]) for r in by_day] == [("2026-11-20", 5)]
    table = ok(db, "stats")  # the tasks from the aggregates
    assert "fp_support       3  60%    You are a support bot." in table
    assert "fp_sql           2  40%    Write SQL." in table
    assert "--exact scans the calls" in table
    table = ok(db, "stats", "--tag", "app=sql")  # ... and from a scan (they know no app)
    assert "Top prompt fingerprints" in table
    assert "fp_sql           2  100%   Write SQL." in table


def test_stats_from_the_aggregates_count_what_a_scan_counts(db: str) -> None:
    """Over ranges that start and end within days, after deletes and relabels, the
    aggregates' counts equal the scan's, and each percentile bound is the edge of the bucket
    the exact percentile lies in."""
    from distillery.store.rollups import EDGES

    rng = random.Random(7)
    store = open_store(db)
    store.insert(
        [
            make(
                100 + i,
                tags={"app": rng.choice(["support", "sql", "billing"])} if i % 7 else {},
                model=rng.choice(["gpt-4o", "gpt-4o-mini"]),
                fp=rng.choice(["fp_a", "fp_b", "fp_c"]),
                latency=rng.lognormvariate(5, 1),
                status=500 if i % 11 == 0 else 200,
                error={"error": {"message": "boom"}} if i % 11 == 0 else None,
                tenant=rng.choice(["key-aaaaaaaaaaaaaaaa", "key-bbbbbbbbbbbbbbbb"]),
            )
            for i in range(0, 120)  # an hour apart: five days from 2026-11-24 13:00
        ]
    )
    store.close()
    ok(db, "delete", "--where", "--tag", "app=billing", "--model", "gpt-4o-mini", "--yes")
    ok(db, "tag", "--where", "--tag", "app=sql", "--since", "2026-11-26", "app=support")
    ranges = [
        (),
        ("--since", "2026-11-25"),
        ("--since", "2026-11-25T07:30:00Z", "--until", "2026-11-27T18:00:00Z"),
        ("--since", "2026-11-26T01:00:00Z", "--until", "2026-11-26T23:00:00Z"),
        ("--until", "2026-11-26T12:00:00Z"),
        ("--since", "2026-11-25", "--until", "2026-11-26"),
    ]
    narrowing = [(), ("--tag", "app=support"), ("--tenant", "key-bbbbbbbbbbbbbbbb")]
    for window in ranges:
        for narrow in narrowing:
            for by in ("model", "day", "fingerprint", "tag:app"):
                if by == "fingerprint" and narrow[:1] == ("--tag",):
                    continue  # a scan answers it (the fingerprints' aggregates know no app)
                args = ("stats", "--by", by, *window, *narrow, "--json")
                fast = json.loads(ok(db, *args))
                exact = json.loads(ok(db, *args, "--exact"))
                assert fast and "p50_under_ms" in fast[0], (args, fast)
                counts = ("group", "calls", "errors", "error_rate", "prompt_tokens")
                assert [[r[k] for k in counts] for r in fast] == [
                    [r[k] for k in counts] for r in exact
                ], args
                for bound, value in (
                    (b[f"p{q}_under_ms"], e[f"p{q}_ms"])
                    for b, e in zip(fast, exact, strict=True)
                    for q in (50, 95, 99)
                ):
                    below = max([0, *(edge for edge in EDGES if edge < (bound or 1e9))])
                    assert bound is None or below <= value <= bound, (
                        args,
                        bound,
                        value,
                    )  # value: to 0.1 ms


def test_tag_untag_by_id_and_where(db: str) -> None:
    assert "Tagged 1 of 1" in run(db, "tag", "chatcmpl-1", "quality=approved").output
    assert ids(ok(db, "list", "--tag", "quality=approved", "--nl")) == ["1"]
    result = run(db, "tag", "--where", "--tag", "app=sql", "quality=approved", "reviewer=ana")
    assert "Tagged 2 of 2" in result.output
    assert ids(ok(db, "list", "--tag", "quality=approved", "--nl")) == ["5", "3", "1"]
    shown = json.loads(ok(db, "show", "chatcmpl-3", "--json"))
    assert shown["metadata"] == {
        "app": "sql",
        "env": "prod",
        "quality": "approved",
        "reviewer": "ana",
    }
    assert (
        "Removed 'quality' from 1 of 1"
        in run(db, "untag", "cap_0000000000000000000000000003", "quality").output
    )
    assert ids(ok(db, "list", "--tag", "quality=approved", "--nl")) == ["5", "1"]


def test_tag_refuses_what_openai_would_refuse(db: str) -> None:
    many = [f"k{i}=v" for i in range(15)]
    result = run(db, "tag", "chatcmpl-1", *many)
    assert result.exit_code == 1
    assert "metadata can hold at most 16 pairs, not 17" in result.output
    assert json.loads(ok(db, "show", "chatcmpl-1", "--json"))["metadata"] == {
        "app": "support",
        "env": "prod",
    }


def test_delete_shows_first_then_deletes_with_yes(db: str) -> None:
    result = run(db, "delete", "--older-than", "100y")
    assert result.exit_code == 0 and "Nothing to delete" in result.output
    result = run(db, "delete", "--where", "--tag", "env=prod")
    assert result.exit_code == 1
    assert "This deletes 3 completions:" in result.output and "Re-run with --yes" in result.output
    assert len(ids(ok(db, "list", "--nl"))) == 5
    result = run(db, "delete", "--where", "--tag", "env=prod", "--yes")
    assert "Deleted 3 completions." in result.output
    assert ids(ok(db, "list", "--nl")) == ["5", "4"]
    assert ids(ok(db, "list", "-q", "refund", "--nl")) == ["4"]  # search index follows
    assert "Deleted 1" in run(db, "delete", "chatcmpl-5", "--yes").output


def test_export_writes_raw_jsonl(db: str, tmp_path: Path) -> None:
    target = tmp_path / "out.jsonl"
    result = run(db, "export", "--where", "--tag", "app=sql", "-o", str(target))
    assert "Exported 2 completions" in result.output
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["id"][-1] for r in lines] == ["3", "5"]
    assert lines[0]["request"]["messages"][1]["content"] == "count users"
    assert len(ok(db, "export").splitlines()) == 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["list", "--since", "yesterday"], "Cannot read 'yesterday' as a time"),
        (["list", "--tag", "novalue"], "must look like key=value"),
        (["list", "--json", "--csv"], "Cannot use --json and --csv together"),
        (["list", "-q", "!!!"], "The search text has no words"),
        (
            ["show", "chatcmpl-404"],
            "No completion 'chatcmpl-404'. Run `distillery completions list`",
        ),
        (["tag", "chatcmpl-1"], "Give at least one KEY=VALUE"),
        (["tag", "k=v"], "Name the completions to tag"),
        (["tag", "chatcmpl-1", "--where", "--tag", "a=b", "k=v"], "not both"),
        (["tag", "--where", "k=v"], "--where needs at least one filter"),
        (["delete", "nope", "--yes"], "No completion 'nope'"),
        (["stats", "--by", "colour"], "Cannot group by 'colour'"),
    ],
)
def test_bad_input_names_the_fix(db: str, args: Any, message: Any) -> None:
    result = run(db, *args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_missing_database_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["completions", "--database-url", f"sqlite:///{tmp_path}/none.db"]
    )
    assert result.exit_code == 1 and "No database at" in result.output


def test_tables_fit_the_terminal_unless_wide(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal a table fits its width, cutting cells with an ellipsis; --wide shows
    them whole; in a pipe nothing is cut to a terminal."""
    import io
    import os

    from distillery.commands.output import write_rows

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("shutil.get_terminal_size", lambda *_: os.terminal_size((60, 24)))
    rows = [{"id": "cap_" + "0" * 28, "prompt": "a long prompt " * 5, "latency_ms": 1234.5}]
    screen = Terminal()
    write_rows(rows, "table", ("id", "prompt", "latency_ms"), out=screen)
    lines = screen.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 60 and "…" in lines[2]
    assert lines[2].endswith("  1234")  # three significant digits at least, right-aligned
    pipe = io.StringIO()
    write_rows(rows, "table", ("id", "prompt", "latency_ms"), out=pipe)
    assert "a long prompt a long prompt a long prompt a long prompt" in pipe.getvalue()
    assert "…" in pipe.getvalue()  # a pipe still cuts cells at 60 characters
    # --wide (which every listing command has) shows every cell whole, even on a terminal.
    import click

    from distillery.commands.output import WIDE

    with click.Context(click.Command("list")) as context:
        context.meta[WIDE] = True
        screen = Terminal()
        write_rows(rows, "table", ("id", "prompt", "latency_ms"), out=screen)
    assert "…" not in screen.getvalue() and ("a long prompt " * 5).strip() in screen.getvalue()
    wide = CliRunner().invoke(cli, ["completions", "--database-url", db, "-n", "1", "--wide"])
    assert wide.exit_code == 0 and "drop table" in wide.output


def test_show_never_prints_none(db: str) -> None:
    output = ok(db, "show", "cap_0000000000000000000000000004")
    assert "None" not in output
