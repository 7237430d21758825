"""Test data made through the real services, so every row carries its audit entry."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.engine import Engine

from stagegate.db import transaction
from stagegate.governance import tokens, versions
from stagegate.governance.versions import DatasetInput, VersionRecord
from stagegate.lifecycle.stages import Role


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@dataclass
class Factory:
    engine: Engine

    def token(self, name: str, role: Role | str) -> dict[str, str]:
        with transaction(self.engine) as s:
            secret = tokens.create_token(s, name=name, role=Role(role))
        return auth(secret)

    def version(
        self,
        name: str = "fraud",
        version: int = 1,
        *,
        creator: str = "dana",
        digest: str | None = None,
        metrics: dict[str, float] | None = None,
        datasets: int = 1,
        depends_on: tuple[tuple[str, int], ...] = (),
    ) -> None:
        rec = VersionRecord(
            name=name,
            version=version,
            source=f"models:/{name}/{version}",
            run_id=f"run{version:04d}",
            creator=creator,
            registered_at=datetime(2026, 1, 1, tzinfo=UTC),
            digest=digest or f"{version:064x}",
            metrics=metrics or {"accuracy": 0.9},
            datasets=[
                DatasetInput("train", f"file:///data/{name}.csv", f"d{i}") for i in range(datasets)
            ],
            depends_on=depends_on,
        )
        with transaction(self.engine) as s:
            versions.record_version(s, rec, actor="test")
