"""Benchmark: the inference log's feature rows, decoded at write time, read back into Arrow.

    .venv/bin/python benchmarks/log_read.py [--quick]

Logs 1M rows (`--quick`: 100k) x 25 features (15 float, 5 integer, 5 categorical columns), 10
rows per request (`--rows-per-request 1|10|100`), half the requests `dataframe_split` and half
`dataframe_records`, each with one prediction per row, through `LocalInferenceLog` as the
router hands them over (the body's bytes and the parsed JSON). The log writes 1000 records a
file and 100,000 feature rows a file (its defaults).

Measured:
  decode_rows_per_s   `feature_table`, what the writer's thread runs on each batch, alone
  write_rows_per_s    the writer end to end, from the first append until every record and
                      feature row is written; records_only_rows_per_s: the same with
                      `features=False`, the log before the feature rows
  read_s              `read_features(root, model=...)`: the whole window into one Arrow table
                      (best of 3)
  baseline_read_s     what a reader had to do before: `read_records`, then each record's
                      JSON `inputs` and `output` decoded with orjson into columns, then Arrow
  speedup             baseline_read_s / read_s
The last line is one JSON object with these figures. Goal: read_s under 2 s for 1M x 25.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa

from stagegate.serving.inference_log.features import feature_table
from stagegate.serving.inference_log.records import InferenceRecord
from stagegate.serving.inference_log.writer import (
    LocalInferenceLog,
    read_features,
    read_records,
)

MODEL = "bench"
CHUNK_ROWS = 100_000  # generated, then logged, a chunk at a time (bounded memory)
FLUSH_ROWS = 1000
FLOATS = [f"num_{i}" for i in range(15)]
INTS = [f"int_{i}" for i in range(5)]
CATEGORIES = [f"cat_{i}" for i in range(5)]
COLUMNS = [*FLOATS, *INTS, *CATEGORIES]
T0 = datetime(2026, 3, 1, tzinfo=UTC)


def chunk(index: int, per_request: int) -> list[InferenceRecord]:
    """CHUNK_ROWS rows in records as the router builds them: the body's bytes and its parse."""
    rng = np.random.default_rng(index)
    rows = CHUNK_ROWS
    requests = rows // per_request
    floats = rng.normal(size=(rows, len(FLOATS))).round(6).tolist()
    ints = rng.integers(0, 1000, size=(rows, len(INTS))).tolist()
    levels = np.array([f"level_{i}" for i in range(12)])
    cats = levels[rng.integers(0, 12, size=(rows, len(CATEGORIES)))].tolist()
    scores = rng.random(rows).round(6).tolist()
    out = []
    for r in range(requests):
        first = index * CHUNK_ROWS + r * per_request
        span = slice(r * per_request, (r + 1) * per_request)
        data = [f + i + c for f, i, c in zip(floats[span], ints[span], cats[span], strict=True)]
        if r % 2:
            doc: Any = {"dataframe_records": [dict(zip(COLUMNS, row, strict=True)) for row in data]}
        else:
            doc = {"dataframe_split": {"columns": COLUMNS, "data": data}}
        body = orjson.dumps(doc)
        out.append(
            InferenceRecord(
                request_id=f"{first:012d}",
                model=MODEL,
                version=1,
                role="champion",
                key_hash=None,
                inputs=orjson.loads(body),
                output=scores[span],
                status=200,
                latency_ms=1.0,
                at=T0 + timedelta(microseconds=first),
                body=body,
                content_type="application/json",
            )
        )
    return out


def log_chunks(root: str, chunks: int, per_request: int, *, features: bool) -> tuple[float, float]:
    """(seconds the writer took, seconds of `feature_table` alone) over every chunk."""
    log = LocalInferenceLog(
        root,
        flush_rows=FLUSH_ROWS,
        flush_interval_s=60,
        max_buffer_rows=CHUNK_ROWS,
        features=features,
        features_flush_rows=CHUNK_ROWS,  # the default, 100,000
    )
    written = decode = 0.0
    for i in range(chunks):
        records = chunk(i, per_request)
        if features:  # the decoding alone, on the writer's batches
            started = time.perf_counter()
            for b in range(0, len(records), FLUSH_ROWS):
                feature_table(records[b : b + FLUSH_ROWS])
            decode += time.perf_counter() - started
        # A batch at a time, as steady traffic fills the buffer: the writer takes one file's
        # worth (`flush_rows`) per flush.
        started = time.perf_counter()
        for b in range(0, len(records), FLUSH_ROWS):
            target = log.flushed + FLUSH_ROWS
            for record in records[b : b + FLUSH_ROWS]:
                log.append(record)
            while log.flushed < target:
                time.sleep(0.0005)
        # A chunk is as many rows as the log writes per features file: wait for that file.
        rows = (i + 1) * CHUNK_ROWS
        while features and log.features.rows < rows:
            time.sleep(0.0005)
        written += time.perf_counter() - started
    log.close()
    assert log.dropped == 0, log.dropped
    return written, decode


def baseline_read(root: str) -> Any:
    """Before the feature rows: the records' JSON inputs and outputs, decoded at read time."""
    records = read_records(root, model=MODEL)
    columns: dict[str, list[Any]] = {name: [] for name in COLUMNS}
    request_ids, rows_index, predictions, sizes = [], [], [], []
    for rid, inputs, output in zip(
        records["request_id"].to_pylist(),
        records["inputs"].to_pylist(),
        records["output"].to_pylist(),
        strict=True,
    ):
        doc = orjson.loads(inputs)
        if "dataframe_split" in doc:
            split = doc["dataframe_split"]
            names, data = split["columns"], split["data"]
            for name, values in zip(names, zip(*data, strict=True), strict=True):
                columns[name].extend(values)
            n = len(data)
        else:
            rows = doc["dataframe_records"]
            for name, values in zip(
                COLUMNS, zip(*map(itemgetter(*COLUMNS), rows), strict=True), strict=True
            ):
                columns[name].extend(values)
            n = len(rows)
        predictions.extend(orjson.loads(output))
        request_ids.append(rid)
        sizes.append(n)
        rows_index.extend(range(n))
    owner = pa.array(np.repeat(np.arange(len(sizes)), sizes))
    arrays = {
        "request_id": pa.array(request_ids, pa.string()).take(owner),
        "row": pa.array(rows_index, pa.int32()),
        **{name: pa.array(values) for name, values in columns.items()},
        "prediction": pa.array(predictions),
    }
    return pa.table(arrays)


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*.parquet")) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k rows instead of 1M")
    parser.add_argument(
        "--rows-per-request", type=int, choices=[1, 10, 100], default=10, help="default: 10"
    )
    args = parser.parse_args()
    rows = 100_000 if args.quick else 1_000_000
    chunks = rows // CHUNK_ROWS
    per_request = args.rows_per_request
    tmp = Path(tempfile.mkdtemp(prefix="stagegate-log-read-"))
    try:
        root, records_only = str(tmp / "log"), str(tmp / "records-only")
        write_s, decode_s = log_chunks(root, chunks, per_request, features=True)
        records_only_s, _ = log_chunks(records_only, chunks, per_request, features=False)
        print(
            f"wrote {rows:,} rows x {len(COLUMNS)} features in {rows // per_request:,} "
            f"requests: decode {rows / decode_s:,.0f} rows/s alone; the writer "
            f"{rows / write_s:,.0f} rows/s ({rows / records_only_s:,.0f} rows/s records only)",
            flush=True,
        )

        timings = []
        for _ in range(3):
            started = time.perf_counter()
            table = read_features(root, model=MODEL)
            timings.append(time.perf_counter() - started)
        read_s = min(timings)
        assert table.num_rows == rows, table.num_rows
        assert table.num_columns == 5 + len(COLUMNS) + 1, table.schema

        started = time.perf_counter()
        base = baseline_read(root)
        baseline_s = time.perf_counter() - started
        assert base.num_rows == rows
        # The same numbers either way (both sorted by request id and row).
        mine = table.sort_by([("request_id", "ascending"), ("row", "ascending")])
        theirs = base.sort_by([("request_id", "ascending"), ("row", "ascending")])
        for name in ("num_0", "int_4", "cat_2", "prediction"):
            assert mine[name].equals(theirs[name]), name
        print(
            f"read {rows:,} rows into Arrow: read_features {read_s:.3f} s (runs: "
            f"{', '.join(f'{t:.3f}' for t in timings)}); JSON inputs decoded at read time "
            f"{baseline_s:.3f} s; {baseline_s / read_s:.1f}x",
            flush=True,
        )
        features_mb = folder_mb(tmp / "log" / "_features")
        records_mb = folder_mb(tmp / "records-only")
        files = len(list((tmp / "log" / "_features").rglob("*.parquet")))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        json.dumps(
            {
                "benchmark": "log_read",
                "quick": args.quick,
                "rows": rows,
                "features": len(COLUMNS),
                "rows_per_request": per_request,
                "feature_files": files,
                "read_s": round(read_s, 3),
                "baseline_read_s": round(baseline_s, 3),
                "speedup": round(baseline_s / read_s, 1),
                "decode_rows_per_s": round(rows / decode_s),
                "write_rows_per_s": round(rows / write_s),
                "records_only_rows_per_s": round(rows / records_only_s),
                "features_mb": round(features_mb, 1),
                "records_mb": round(records_mb, 1),
                "cpus": os.cpu_count(),
                "goal": {"read_s": 2.0},
            }
        )
    )


if __name__ == "__main__":
    main()
