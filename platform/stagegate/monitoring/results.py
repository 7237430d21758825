"""What a drift check found, as frozen dataclasses that turn into plain JSON."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Kind = Literal["numerical", "categorical"]
Verdict = Literal["ok", "drift", "insufficient data"]
OK: Verdict = "ok"
DRIFT: Verdict = "drift"
INSUFFICIENT: Verdict = "insufficient data"


@dataclass(frozen=True)
class ColumnDrift:
    """One column's drift test. `score` is a distance (drift at or above `threshold`) or a
    p-value (drift below it; K-S at or below, as in Evidently)."""

    column: str
    kind: Kind | None
    test: str | None
    threshold: float | None
    score: float | None
    drifted: bool
    verdict: Verdict
    reference_rows: int
    current_rows: int
    reason: str | None = None


@dataclass(frozen=True)
class ColumnQuality:
    """Missing values in both windows, and what the current window holds that the reference
    never had: unseen categories, or numbers outside the reference's [min, max]."""

    column: str
    kind: Kind | None
    missing_share_reference: float | None
    missing_share_current: float | None
    unseen_categories: tuple[str, ...] = ()
    unseen_category_count: int = 0
    unseen_share: float | None = None
    out_of_range_share: float | None = None
    reference_min: float | None = None
    reference_max: float | None = None


@dataclass(frozen=True)
class Performance:
    """Accuracy (categorical prediction) or mean absolute error (numerical) on labelled rows."""

    metric: Literal["accuracy", "mae"]
    reference: float | None
    current: float | None
    reference_rows: int
    current_rows: int
    verdict: Literal["ok", "insufficient data"]
    reason: str | None = None


@dataclass(frozen=True)
class DatasetDrift:
    """Evidently's DriftedColumnsCount: the window drifts when the share of drifted columns
    among those tested reaches `drift_share`."""

    tested_columns: int
    drifted_columns: int
    share: float | None
    drift_share: float
    drifted: bool
    verdict: Verdict


@dataclass(frozen=True)
class DriftReport:
    """Everything one check found; `to_dict()` is what an Evaluation's summary stores."""

    reference_rows: int
    current_rows: int
    dataset: DatasetDrift
    columns: tuple[ColumnDrift, ...]
    quality: tuple[ColumnQuality, ...]
    prediction: ColumnDrift | None = None
    performance: Performance | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def drifted_columns(self) -> list[str]:
        return [c.column for c in self.columns if c.drifted]

    def column(self, name: str) -> ColumnDrift:
        for c in self.columns:
            if c.column == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only: NaN and infinities become None (JSON has neither)."""
        summary: dict[str, Any] = _finite(asdict(self))
        return summary


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
