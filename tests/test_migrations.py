"""The migrations build exactly the schema the models declare, and step down again."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Engine
from sqlmodel import SQLModel

from stagegate.db import make_engine
from stagegate.migrate import alembic_config, upgrade


def test_migrated_schema_matches_the_models(migrated_engine: Engine) -> None:
    """A column added to a model without a migration (or the reverse) fails here."""
    with migrated_engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, SQLModel.metadata) == []


def test_the_latest_migrations_downgrade_and_upgrade_again(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'roundtrip.db'}"
    upgrade(url)
    command.downgrade(alembic_config(url), "0002")
    engine = make_engine(url)
    try:
        assert "endpoint" not in inspect(engine).get_table_names()
        evaluation = {c["name"] for c in inspect(engine).get_columns("evaluation")}
        assert "evidence_key" not in evaluation
    finally:
        engine.dispose()
    upgrade(url)
    engine = make_engine(url)
    try:
        assert "endpoint" in inspect(engine).get_table_names()
    finally:
        engine.dispose()
