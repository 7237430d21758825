"""Ground-truth labels for logged inferences, stored beside them and joined on request id."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import pyarrow as pa  # type: ignore[import-untyped]

from stagegate.serving.inference_log.format import (
    LABEL_SCHEMA,
    LABELS_DIR,
    dumps,
    open_root,
    partition_dir,
    utc,
    write_parquet,
)
from stagegate.serving.inference_log.read import connect


@dataclass(frozen=True)
class LabelRecord:
    """The true outcome of one request of one model; a later `at` supersedes an earlier one."""

    request_id: str
    model: str
    label: Any  # JSON-compatible; None is a label too (stored as JSON `null`)
    at: datetime  # when it was received (aware UTC)


def attach_labels(root_url: str, labels: list[LabelRecord]) -> int:
    """Write the labels (one file per date) and return how many were kept.

    Within one call only the latest label per (model, request_id) is kept, the later item on
    a tie, so `read_labeled` need not break ties inside a file. Labels need not match a
    logged request yet: they may arrive before the request's record is flushed.
    """
    latest: dict[tuple[str, str], LabelRecord] = {}
    for label in labels:
        key = (label.model, label.request_id)
        if key not in latest or utc(label.at) >= utc(latest[key].at):
            latest[key] = label
    by_date: dict[date, list[LabelRecord]] = defaultdict(list)
    for label in latest.values():
        by_date[utc(label.at).date()].append(label)
    fs, root = open_root(root_url)
    for day, rows in by_date.items():
        table = pa.Table.from_pydict(
            {
                "request_id": [r.request_id for r in rows],
                "model": [r.model for r in rows],
                "label": [dumps(r.label) for r in rows],
                "at": [utc(r.at) for r in rows],
            },
            schema=LABEL_SCHEMA,
        )
        write_parquet(fs, partition_dir(f"{root}/{LABELS_DIR}", date=day.isoformat()), table)
    return len(latest)


def read_labels(root_url: str, *, model: str | None = None) -> Any:
    """Every stored label (superseded ones too), ordered by `at`."""
    sql = (
        'SELECT request_id, model, label, "at" FROM labels'
        ' WHERE $model::VARCHAR IS NULL OR model = $model ORDER BY "at", request_id'
    )
    with connect(root_url, model=model) as con:
        return con.sql(sql, params={"model": model}).to_arrow_table()


# `at` is a reserved word in DuckDB 2, hence the quotes.
_LABELED = """
WITH latest AS (
    SELECT request_id, label, "at" AS labeled_at FROM labels WHERE model = $model
    QUALIFY row_number() OVER (PARTITION BY request_id ORDER BY "at" DESC) = 1
)
SELECT i.request_id, i.model, i.version, i.role, i.key_hash, i.inputs, i.output, i.status,
       i.latency_ms, i.at, l.label, l.labeled_at
FROM inference AS i JOIN latest AS l USING (request_id)
WHERE i.model = $model
ORDER BY i.at, i.request_id, i.role
"""


def read_labeled(root_url: str, model: str) -> Any:
    """The model's logged records that have a label, each with its latest label.

    Every arm's record of a request (champion, challenger, shadow) gets the request's label.
    """
    with connect(root_url, model=model) as con:
        return con.sql(_LABELED, params={"model": model}).to_arrow_table()


# Every answer of the champion and the challenger in a window, with the request's latest
# label if any (a LEFT JOIN: an unlabelled request still counts, by the attribution rule).
_OUTCOMES = """
WITH latest AS (
    SELECT request_id, label, "at" AS labeled_at FROM labels WHERE model = $model
    QUALIFY row_number() OVER (PARTITION BY request_id ORDER BY "at" DESC) = 1
)
SELECT i.request_id, i.version, i.role, i.key_hash, i.status, i.latency_ms, i."at",
       l.label, l.labeled_at
FROM inference AS i LEFT JOIN latest AS l USING (request_id)
WHERE i.model = $model AND i.role IN ('champion', 'challenger')
  AND i."at" >= $since AND i."at" < $until
ORDER BY i."at", i.request_id, i.role
"""


def read_outcomes(root_url: str, model: str, *, since: datetime, until: datetime) -> Any:
    """The champion's and challenger's answers logged in [since, until), each with its
    request's latest label (null when none came): what an A/B experiment reads."""
    with connect(root_url, model=model) as con:
        return con.sql(
            _OUTCOMES, params={"model": model, "since": utc(since), "until": utc(until)}
        ).to_arrow_table()
