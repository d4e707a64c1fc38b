"""Alembic upgrade/downgrade on both databases; no drift between models and migrations."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect

from service.db import make_engine
from service.migrate import alembic_config, downgrade, upgrade
from service.models import Base
from service.settings import Settings, load_settings
from tests.service.conftest import PG_ADMIN_DSN

TABLES = set(Base.metadata.tables)


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    """Settings for a fresh, empty database: a temporary SQLite file or a throwaway PostgreSQL one."""
    if request.param == "sqlite":
        yield load_settings(home=tmp_path, database_url=f"sqlite:///{tmp_path / 'migrations.db'}")
        return
    import psycopg

    name = f"tunepool_migrations_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield load_settings(
            home=tmp_path, database_url=f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        )
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    engine = make_engine(settings)
    yield engine
    engine.dispose()


def tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def test_one_head_named_0001_first() -> None:
    script = ScriptDirectory.from_config(alembic_config(load_settings()))
    assert len(script.get_heads()) == 1, "several heads: merge them"
    assert [r.revision for r in script.walk_revisions()][-1] == "0001"


def test_upgrade_downgrade_upgrade(settings: Settings, engine: Engine) -> None:
    assert tables(engine) == set()

    upgrade(settings)
    assert tables(engine) == TABLES | {"alembic_version"}
    head = revision(engine)
    assert head is not None
    upgrade(settings)  # again: nothing to do
    assert revision(engine) == head

    downgrade(settings)
    assert tables(engine) == {"alembic_version"}
    assert revision(engine) is None

    upgrade(settings)
    assert tables(engine) == TABLES | {"alembic_version"}
    assert revision(engine) == head


def test_models_and_migrations_agree(settings: Settings, engine: Engine) -> None:
    upgrade(settings)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    assert diff == [], f"models differ from the migrations; add a revision: {diff}"


def test_indexes_and_constraints_are_named_alike(settings: Settings, engine: Engine) -> None:
    """The naming convention gives every backend the same names (later migrations rely on them)."""
    upgrade(settings)
    found = inspect(engine)
    indexes = {ix["name"] for table in TABLES for ix in found.get_indexes(table)}
    assert {"ix_jobs_pool_status_priority_pk", "ix_api_keys_team_id", "ix_files_team_id_pk"} <= indexes
    uniques = {uq["name"] for table in TABLES for uq in found.get_unique_constraints(table)}
    assert {"uq_teams_name", "uq_api_keys_prefix", "uq_jobs_team_id_idempotency_key"} <= uniques
