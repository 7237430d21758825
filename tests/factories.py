"""Test data made through the real services, so every row carries its audit entry (except
`place`, which skips the gates on purpose)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.engine import Engine

from stagegate.db import transaction, utcnow
from stagegate.governance import tokens, transitions, versions
from stagegate.governance.models import Transition, TransitionStatus
from stagegate.governance.versions import DatasetInput, VersionRecord
from stagegate.lifecycle.stages import Role, Stage


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

    def place(self, name: str, version: int, stage: Stage) -> None:
        """Move a recorded version straight to `stage`, with the deployment windows a real
        move writes, but no gates: for tests about what happens once a version is there."""
        with transaction(self.engine) as s:
            row = versions.get_version(s, name, version, lock=True)
            t = Transition(
                model_name=name,
                version=version,
                from_stage=row.stage,
                to_stage=stage,
                reason="placed by a test factory",
                requested_by="factory",
                status=TransitionStatus.applied,
            )
            s.add(t)
            s.flush()
            transitions._move(s, row, stage, t, utcnow(), "none", [])
