"""Migrations: ordered alembic revisions, one migrator at a time, old databases adopted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from distillery.cli import cli
from distillery.store.db import create_engine, migrate, schema_revision
from distillery.store.migrations import HEAD, LOCATION


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
