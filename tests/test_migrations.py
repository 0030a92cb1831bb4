"""Migrations: ordered alembic revisions, one migrator at a time, old databases adopted."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from distillery.cli import cli
from distillery.store.db import create_engine, migrate, schema_revision
from distillery.store.migrations import HEAD, LOCATION

from helpers import RunningProxy


def test_head_constant_matches_the_revision_files() -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(LOCATION))
    assert ScriptDirectory.from_config(config).get_current_head() == HEAD


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return (
        f"sqlite:///{tmp_path / 'm.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )


# Full-text search keeps its own tables (FTS5 on SQLite, tsvector on Postgres), made by
# the migrations and written by store/search.py with SQL: they have no SQLModel class.
SEARCH_TABLES = {"completion_search"}
SEARCH_PREFIX = "completions_fts"


def test_the_models_match_the_migrated_schema(url: str) -> None:
    """Every SQLModel table, column, type, index and key is what the migrations create."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlmodel import SQLModel

    import distillery.store.models  # noqa: F401  (registers the tables)

    def ours(obj: Any, name: Any, type_: Any, reflected: Any, compare_to: Any) -> bool:
        table = name if type_ == "table" else getattr(getattr(obj, "table", None), "name", "")
        return not (table in SEARCH_TABLES or str(table).startswith(SEARCH_PREFIX))

    engine = create_engine(url)
    try:
        migrate(engine)
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"compare_type": True, "include_object": ours}
            )
            differences = compare_metadata(context, SQLModel.metadata)
    finally:
        engine.dispose()
    assert differences == []


def test_db_status_and_upgrade(url: str) -> None:
    status = CliRunner().invoke(cli, ["db", "status", "--database-url", url])
    assert "revision: empty" in status.output and "run `distillery db upgrade`" in status.output
    upgraded = CliRunner().invoke(cli, ["db", "upgrade", "--database-url", url])
    assert upgraded.exit_code == 0 and f"Upgraded empty -> {HEAD}." in upgraded.output
    again = CliRunner().invoke(cli, ["db", "upgrade", "--database-url", url])
    assert f"Already at {HEAD}." in again.output
    assert "(up to date)" in CliRunner().invoke(cli, ["db", "status", "--database-url", url]).output
    engine = create_engine(url)
    tables = set(sa.inspect(engine).get_table_names())
    assert {
        "completions",
        "completion_tags",
        "dataset_versions",
        "eval_runs",
        "generation_cache",
    } <= tables
    engine.dispose()


@pytest.mark.slow
def test_concurrent_migrators_do_not_collide(url: str) -> None:
    """Several processes starting at once on an empty database: one migrates, none fails."""
    script = (
        f"from distillery.store.db import create_engine, migrate; migrate(create_engine({url!r}))"
    )
    processes = [
        subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE) for _ in range(4)
    ]
    errors = [p.communicate(timeout=120)[1].decode() for p in processes]
    assert all(p.returncode == 0 for p in processes), errors
    engine = create_engine(url)
    assert schema_revision(engine) == HEAD
    engine.dispose()


def test_a_database_from_before_migrations_is_adopted(tmp_path: Path) -> None:
    """Release one created its schema without alembic: it is stamped as 0001, not re-created."""
    from sqlmodel import SQLModel

    from distillery.store.db import COMPLETIONS, TAGS

    engine = create_engine(f"sqlite:///{tmp_path / 'old.db'}")
    SQLModel.metadata.create_all(engine, tables=[COMPLETIONS, TAGS])
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE VIRTUAL TABLE completions_fts USING fts5(body)")
    assert schema_revision(engine) == "unversioned"
    migrate(engine)
    assert schema_revision(engine) == HEAD
    engine.dispose()


# Written by the release before 0006 (de4973a), whose stream assembler stored every
# successful stream as an error: scripts/write_v0005_database.py made it.
V0005 = Path(__file__).parent / "data" / "streams-v0005.sqlite"
COPIED = ("completions", "completion_tags", "rollup_apps", "rollup_tasks")


def errors_by_kind(engine: sa.Engine) -> dict[tuple[bool, bool], int]:
    """(stream, has an error) -> calls."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT stream, error IS NOT NULL, COUNT(*) FROM completions GROUP BY 1, 2")
        )
        return {(bool(s), bool(e)): n for s, e, n in rows}


def rollup_errors(engine: sa.Engine) -> list[tuple[int, int]]:
    with engine.connect() as conn:
        return [
            tuple(conn.execute(sa.text(f"SELECT SUM(calls), SUM(errors) FROM {t}")).one())
            for t in ("rollup_apps", "rollup_tasks")
        ]


@pytest.fixture
def old_database(url: str, tmp_path: Path) -> str:
    """The previous version's database, in SQLite as it wrote it, or copied into Postgres."""
    if url.startswith("sqlite"):
        path = tmp_path / "old.db"
        path.write_bytes(V0005.read_bytes())
        return f"sqlite:///{path}"
    from alembic import command

    from distillery.store.db import _alembic_config

    source, target = create_engine(f"sqlite:///{V0005}"), create_engine(url)
    with target.begin() as conn:
        command.upgrade(_alembic_config(conn), "0005")
    tables = sa.MetaData()
    tables.reflect(target, only=COPIED)
    with source.connect() as read, target.begin() as write:
        for name in COPIED:
            rows = [dict(r._mapping) for r in read.execute(sa.text(f"SELECT * FROM {name}"))]
            table = tables.tables[name]
            for row in rows:
                for column in table.columns:
                    if isinstance(column.type, sa.JSON):
                        value = row.get(column.name)
                        # SQL NULL stays NULL (a None would be stored as JSON null).
                        row[column.name] = sa.null() if value is None else json.loads(value)
            write.execute(table.insert(), rows)
    source.dispose()
    target.dispose()
    return url


def test_streamed_calls_the_stream_bug_flagged_are_repaired_on_upgrade(
    old_database: str,
    start_proxy: Callable[..., RunningProxy],
    sdk: Callable[..., Any],
    tmp_path: Path,
) -> None:
    engine = create_engine(old_database)
    assert schema_revision(engine) == "0005"
    # 33 streams, 31 of them fine but stored as errors; 2 really broken; 6 not streamed, 4 errors.
    assert errors_by_kind(engine) == {(True, True): 33, (False, False): 2, (False, True): 4}
    assert rollup_errors(engine) == [(39, 37), (39, 37)]

    upgraded = CliRunner().invoke(cli, ["db", "upgrade", "--database-url", old_database])
    assert upgraded.exit_code == 0 and f"Upgraded 0005 -> {HEAD}." in upgraded.stdout
    assert "Repaired 31 streamed calls" in upgraded.stderr
    assert errors_by_kind(engine) == {
        (True, False): 31,
        (True, True): 2,
        (False, False): 2,
        (False, True): 4,
    }
    assert rollup_errors(engine) == [(39, 6), (39, 6)]
    with engine.connect() as conn:
        kept = [
            json.loads(e) if isinstance(e, str) else e
            for (e,) in conn.execute(
                sa.text("SELECT error FROM completions WHERE stream AND error IS NOT NULL")
            )
        ]
    # The stream that was really broken keeps its error, as does the error event.
    assert sorted((e.get("type", "an error event"), "chunk 2 " in str(e)) for e in kept) == [
        ("an error event", False),
        ("upstream_malformed", True),
    ]

    # The stored-completions API lists them again, to the key that made them ...
    proxy = start_proxy(database_url=old_database)
    listed = sdk(proxy.base_url, "sk-old-user").chat.completions.list(limit=100).data
    assert len(listed) == 33 and sum(1 for c in listed if c.usage is not None) == 33
    # ... and a dataset is built from them.
    built = CliRunner().invoke(
        cli, ["dataset", "build", "everything", "--json", "--database-url", old_database]
    )
    assert built.exit_code == 0, built.output
    counts = json.loads(built.stdout)["counts"]
    assert counts["considered"] == 39 and counts["dropped"]["failed call"] == 6
    assert counts["train"] + counts["val"] > 0
    engine.dispose()
