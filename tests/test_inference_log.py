"""The inference log: round trips, partitions, flushing, whole files, the crash bound, labels."""

from __future__ import annotations

import re
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import fsspec  # type: ignore[import-untyped]
import pytest

from stagegate.errors import InvalidInput
from stagegate.serving.inference_log.format import RECORD_SCHEMA
from stagegate.serving.inference_log.records import InferenceRecord, Role
from stagegate.serving.inference_log.writer import (
    LabelRecord,
    LocalInferenceLog,
    attach_labels,
    query,
    read_labeled,
    read_labels,
    read_records,
    records_from_table,
)

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def rec(
    i: int,
    *,
    model: str = "fraud",
    at: datetime | None = None,
    role: Role = "champion",
    inputs: Any = None,
    output: Any = (0.25,),
) -> InferenceRecord:
    return InferenceRecord(
        request_id=f"{i:06d}",
        model=model,
        version=3,
        role=role,
        key_hash=None if i % 2 else "ab" * 32,
        inputs={"i": i} if inputs is None else inputs,
        output=list(output) if isinstance(output, tuple) else output,
        status=200,
        latency_ms=1.5 + i,
        at=at or T0 + timedelta(milliseconds=i),
    )


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def root(tmp_path: Path) -> str:
    return str(tmp_path / "log")


def write_all(root: str, records: list[InferenceRecord]) -> None:
    log = LocalInferenceLog(root)
    for r in records:
        log.append(r)
    log.close()


def test_round_trip_keeps_every_field(root: str) -> None:
    records = [
        rec(
            0,
            inputs={
                "text": "héllo wörld ✓ 日本語 🙂",
                "nested": {"a": [1, 2.5, None, {"b": True}]},
            },
        ),
        rec(1, output=None),  # a failed arm: no output
        rec(2, role="shadow", inputs=[[1.0, 2.0], [3.0, 4.0]], output={"label": "x", "p": [0.1]}),
    ]
    write_all(root, records)
    table = read_records(root)
    assert table.schema == RECORD_SCHEMA
    assert records_from_table(table) == records
    assert table["output"][1].as_py() is None  # NULL, not the text "null"


@pytest.fixture
def memory_root() -> Iterator[str]:
    url = f"memory://stagegate-test-{uuid.uuid4().hex}"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


def test_round_trip_through_another_fsspec_filesystem(memory_root: str) -> None:
    records = [rec(i) for i in range(5)]
    write_all(memory_root, records)
    assert records_from_table(read_records(memory_root)) == records
    assert query(memory_root, "SELECT count(*) AS n FROM inference").to_pylist() == [{"n": 5}]


def test_partitions_by_model_and_utc_date(root: str) -> None:
    night = datetime(2026, 3, 2, 0, 30, tzinfo=timezone(timedelta(hours=2)))  # 2026-03-01 22:30 UTC
    records = [
        rec(0, model="fraud", at=T0),
        rec(1, model="fraud", at=T0 + timedelta(days=1)),
        rec(2, model="churn v2/eu", at=night),
    ]
    write_all(root, records)
    files = sorted(str(p.relative_to(root)) for p in Path(root).rglob("*.parquet"))
    folders = [f.rsplit("/", 1)[0] for f in files]
    assert folders == [
        "model=churn%20v2%2Feu/date=2026-03-01",
        "model=fraud/date=2026-03-01",
        "model=fraud/date=2026-03-02",
    ]
    assert all(re.fullmatch(r"part-[0-9a-f]{32}\.parquet", f.rsplit("/", 1)[1]) for f in files)

    def ids(**kw: Any) -> list[str]:
        return list(read_records(root, **kw)["request_id"].to_pylist())

    assert ids(model="churn v2/eu") == ["000002"]
    assert ids(model="fraud") == ["000000", "000001"]
    assert ids(model="nobody") == []
    assert ids(since=T0 + timedelta(hours=1)) == ["000002", "000001"]  # ordered by `at`
    assert ids(until=T0 + timedelta(days=1)) == ["000000", "000002"]  # until is exclusive
    assert ids(model="fraud", since=T0, until=T0 + timedelta(seconds=1)) == ["000000"]
    with pytest.raises(InvalidInput):
        read_records(root, since=datetime(2026, 3, 1))  # naive: refused


def test_an_empty_log_reads_as_empty_tables(root: str) -> None:
    table = read_records(root)
    assert table.num_rows == 0
    assert table.schema == RECORD_SCHEMA
    assert query(root, 'SELECT count(*) AS n, max("at") AS last FROM inference').to_pylist() == [
        {"n": 0, "last": None}
    ]
    assert read_labeled(root, "fraud").num_rows == 0


def test_flushes_when_flush_rows_are_buffered(root: str) -> None:
    log = LocalInferenceLog(root, flush_rows=10, flush_interval_s=60)
    for i in range(9):
        log.append(rec(i))
    time.sleep(0.3)
    assert log.flushed == 0
    assert read_records(root).num_rows == 0
    log.append(rec(9))
    wait_until(lambda: log.flushed == 10)
    assert read_records(root).num_rows == 10
    log.close()


def test_flushes_every_interval(root: str) -> None:
    log = LocalInferenceLog(root, flush_rows=1000, flush_interval_s=0.2)
    for i in range(3):
        log.append(rec(i))
    wait_until(lambda: log.flushed == 3, timeout=3)
    assert read_records(root).num_rows == 3
    log.append(rec(3))
    wait_until(lambda: log.flushed == 4, timeout=3)
    log.close()
    assert read_records(root).num_rows == 4


def test_readers_only_ever_see_whole_files(root: str) -> None:
    total, burst = 1500, 50
    log = LocalInferenceLog(root, flush_rows=burst, flush_interval_s=0.05)
    payload = uuid.uuid4().hex * 40  # big enough that a write takes a while

    def write() -> None:
        for i in range(total):
            log.append(rec(i, inputs={"payload": payload, "i": i}))
            if i % burst == 0:
                time.sleep(0.02)
        log.close()

    writer = threading.Thread(target=write)
    writer.start()
    seen: list[int] = []
    while writer.is_alive():
        ids = [int(i) for i in read_records(root)["request_id"].to_pylist()]
        assert sorted(ids) == list(range(len(ids)))  # whole batches, in order
        seen.append(len(ids))
    writer.join()
    assert read_records(root).num_rows == total
    assert seen == sorted(seen)
    assert any(0 < n < total for n in seen), "no read overlapped the writes"


def test_close_flushes_is_idempotent_and_refuses_later_records(root: str) -> None:
    log = LocalInferenceLog(root, flush_rows=1000, flush_interval_s=60)
    for i in range(5):
        log.append(rec(i))
    log.close()
    log.close()
    assert read_records(root).num_rows == 5
    log.append(rec(5))
    assert log.dropped == 1
    assert log.flushed == 5
    assert read_records(root).num_rows == 5


def test_a_full_buffer_drops_the_new_records(root: str) -> None:
    log = LocalInferenceLog(root, flush_rows=1000, flush_interval_s=60, max_buffer_rows=5)
    for i in range(8):
        log.append(rec(i))
    assert log.dropped == 3
    log.close()
    assert read_records(root)["request_id"].to_pylist() == [f"{i:06d}" for i in range(5)]


def test_failed_writes_are_retried_and_dropped_only_at_close(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the log's folder should be")
    log = LocalInferenceLog(str(blocker / "log"), flush_rows=1000, flush_interval_s=0.05)
    log.append(rec(0))
    log.append(rec(1))
    time.sleep(0.3)  # several failed attempts
    assert (log.flushed, log.dropped) == (0, 0)
    blocker.unlink()
    wait_until(lambda: log.flushed == 2)
    log.close()
    assert read_records(str(blocker / "log")).num_rows == 2

    (tmp_path / "blocked").write_text("")
    doomed = LocalInferenceLog(str(tmp_path / "blocked" / "log"), flush_interval_s=60)
    doomed.append(rec(0))
    doomed.close()
    assert (doomed.flushed, doomed.dropped) == (0, 1)


# --- the crash bound -------------------------------------------------------------------------

CHILD = """
import mmap, struct, sys, time
from datetime import UTC, datetime
from stagegate.serving.inference_log.writer import LocalInferenceLog
from stagegate.serving.inference_log.records import InferenceRecord

root, counter, rate, rows, interval, total = sys.argv[1:]
rate, total = float(rate), int(total)
log = LocalInferenceLog(root, flush_rows=int(rows), flush_interval_s=float(interval))
with open(counter, "r+b") as f:
    appended = mmap.mmap(f.fileno(), 8)
at = datetime(2026, 3, 1, tzinfo=UTC)
start = time.monotonic()
for i in range(total):
    delay = start + i / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    struct.pack_into("q", appended, 0, i + 1)  # counted before it is appended: an upper bound
    log.append(InferenceRecord(f"{i:09d}", "fraud", 1, "champion", None, {"i": i}, 1, 200, 1.0, at))
"""  # and no close(): a normal exit must flush through atexit

RATE = 2000  # records/s the child appends
# What may arrive on top of the buffer: the batch being written, plus scheduling delays
# on a shared CI core.
WRITE_SLACK_S = 0.25


def spawn(tmp_path: Path, rows: int, interval_s: float, total: int) -> tuple[Any, Path, str]:
    counter = tmp_path / "appended"
    counter.write_bytes(bytes(8))
    root = str(tmp_path / "log")
    argv = [sys.executable, "-c", CHILD, root, str(counter), str(RATE), str(rows)]
    child = subprocess.Popen([*argv, str(interval_s), str(total)], cwd=ROOT)
    return child, counter, root


def appended(counter: Path) -> int:
    count: int = struct.unpack("q", counter.read_bytes())[0]
    return count


@pytest.mark.slow
@pytest.mark.parametrize(
    ("rows", "interval_s"), [(300, 30.0), (100_000, 0.25)], ids=["rows-bound", "time-bound"]
)
def test_sigkill_loses_at_most_the_unflushed_buffer(
    tmp_path: Path, rows: int, interval_s: float
) -> None:
    child, counter, root = spawn(tmp_path, rows, interval_s, total=10**7)
    try:
        wait_until(lambda: appended(counter) >= RATE * 1.2, timeout=20)  # several flushes in
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    sent = appended(counter)
    ids = [int(i) for i in read_records(root)["request_id"].to_pylist()]
    assert ids == list(range(len(ids)))  # what survived is a gap-free prefix
    assert ids
    lost = sent - len(ids)
    assert 0 <= lost <= min(rows, RATE * interval_s) + RATE * WRITE_SLACK_S, (sent, len(ids))


@pytest.mark.slow
def test_a_normal_exit_without_close_loses_nothing(tmp_path: Path) -> None:
    child, counter, root = spawn(tmp_path, rows=100_000, interval_s=60, total=300)
    assert child.wait(timeout=20) == 0
    assert read_records(root).num_rows == appended(counter) == 300


# --- labels and SQL --------------------------------------------------------------------------


def test_labels_join_the_latest_label_per_request(root: str) -> None:
    write_all(
        root,
        [
            rec(1),
            rec(1, role="shadow"),  # the same request, answered by the shadow too
            rec(2),
            rec(3),  # never labelled
            rec(1, model="churn"),
        ],
    )
    late, early = T0 + timedelta(minutes=5), T0 + timedelta(minutes=1)
    attach_labels(root, [LabelRecord("000001", "fraud", {"fraud": True}, late)])
    attach_labels(  # written later, but received earlier: it does not win
        root,
        [
            LabelRecord("000001", "fraud", {"fraud": False}, early),
            LabelRecord("000002", "fraud", "first", early),
            LabelRecord("000002", "fraud", "second", early),  # a tie in one call: the later item
            LabelRecord("000001", "churn", "other model", late + timedelta(minutes=1)),
            LabelRecord("000009", "fraud", "before its record", early),
        ],
    )
    labeled = read_labeled(root, "fraud").to_pylist()
    assert [(r["request_id"], r["role"], r["label"]) for r in labeled] == [
        ("000001", "champion", '{"fraud":true}'),
        ("000001", "shadow", '{"fraud":true}'),
        ("000002", "champion", '"second"'),
    ]
    assert labeled[0]["labeled_at"] == late
    assert labeled[0]["at"] == T0 + timedelta(milliseconds=1)
    stored = read_labels(root, model="fraud")["request_id"].to_pylist()
    assert sorted(stored) == ["000001", "000001", "000002", "000009"]


def test_query_runs_sql_over_the_inference_and_labels_views(root: str) -> None:
    write_all(root, [rec(i, model="fraud" if i < 3 else "churn") for i in range(5)])
    attach_labels(root, [LabelRecord("000000", "fraud", 1, T0)])
    table = query(
        root,
        "SELECT model, count(*) AS n, min(date) AS day FROM inference"
        " WHERE status = $status GROUP BY model ORDER BY model",
        {"status": 200},
    )
    day = T0.date()
    assert table.to_pylist() == [
        {"model": "churn", "n": 2, "day": day},
        {"model": "fraud", "n": 3, "day": day},
    ]
    joined = query(
        root,
        "SELECT i.request_id, l.label FROM inference i JOIN labels l USING (request_id, model)",
    )
    assert joined.to_pylist() == [{"request_id": "000000", "label": "1"}]
