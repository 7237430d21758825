"""The inference log writer: buffered in memory, flushed as Hive-partitioned Parquet.

Durability. `append()` only buffers; one background thread takes the whole buffer when it
holds `flush_rows` records or `flush_interval_s` after its last write, whichever comes first,
and writes it as one file per `model=<name>/date=<YYYY-MM-DD>` partition. A graceful stop
(`close()`, which also runs at interpreter exit) loses nothing. A SIGKILL or crash loses only
what was not yet written: at most `flush_rows` records or `flush_interval_s` seconds of
traffic, whichever is smaller, plus what arrived while the last batch was being written
(about 3 ms per 1000 records locally; longer on remote filesystems). Batches are written in
order, so what survives in a partition is a gap-free prefix of what was appended (unless a
write failed and is being retried). Files are fsynced before they are renamed into place,
but their folders are not: a power loss may lose the last files, never leave a torn one.
On an object store (`s3://bucket/prefix`) each file is one PUT of the whole encoded file,
which the store publishes only once complete: readers see whole files there too.

Features. Once a batch's records are written, the same thread decodes their request bodies
into typed feature rows (`features.py`): that work never touches the request path, and a body
it cannot decode costs only its feature rows (its record is written all the same; `features`
counts it). The rows are written under `_features/` in bigger files than the records, which
readers need: per partition, once it holds `features_flush_rows` rows or its oldest are
`features_flush_interval_s` old, and at close. A crash loses the rows still waiting, and a
failed feature write is logged and counted, not retried: the records hold the JSON inputs.

Readers: `read_records`, `read_features`, `query`/`connect` (DuckDB) and the labels functions,
re-exported here.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections import defaultdict
from dataclasses import replace
from datetime import date

from stagegate.serving.inference_log.features import (
    FeatureCounts,
    FeatureFiles,
    read_features,
)
from stagegate.serving.inference_log.format import (
    FileSystem,
    check_bucket,
    open_root,
    partition_dir,
    records_from_table,
    records_table,
    utc,
    write_parquet,
)
from stagegate.serving.inference_log.labels import (
    LabelRecord,
    attach_labels,
    read_labeled,
    read_labels,
)
from stagegate.serving.inference_log.read import connect, query, read_records
from stagegate.serving.inference_log.records import InferenceRecord

__all__ = [
    "FeatureCounts",
    "LabelRecord",
    "LocalInferenceLog",
    "attach_labels",
    "connect",
    "query",
    "read_features",
    "read_labeled",
    "read_labels",
    "read_records",
    "records_from_table",
]

log = logging.getLogger(__name__)

_Part = tuple[str, date, list[InferenceRecord]]  # one partition's records: model, date, records


def _check_storage(fs: FileSystem, root: str, root_url: str) -> None:
    """A missing bucket stops the writer at once (it would only ever drop records). A refusal
    or an unreachable store is logged and left to the writes: write-only credentials cannot
    see the bucket, and a store that is down may come back."""
    try:
        check_bucket(fs, root, root_url)
    except FileNotFoundError:
        raise
    except Exception as exc:
        log.warning("inference log %s: could not check the bucket: %s", root_url, exc)


class LocalInferenceLog:
    """An `InferenceLogWriter` onto any fsspec URL (a local folder by default).

    On an object store, a missing bucket raises FileNotFoundError here (it is never created);
    refused credentials only show in the failed writes, logged and retried."""

    def __init__(
        self,
        root_url: str,
        *,
        flush_rows: int = 1000,
        flush_interval_s: float = 1.0,
        max_buffer_rows: int = 100_000,
        features: bool = True,
        features_flush_rows: int = 100_000,
        features_flush_interval_s: float = 300.0,
    ) -> None:
        if flush_rows < 1 or flush_interval_s <= 0 or max_buffer_rows < 1:
            raise ValueError("need flush_rows >= 1, flush_interval_s > 0, max_buffer_rows >= 1")
        if features_flush_rows < 1 or features_flush_interval_s <= 0:
            raise ValueError("need features_flush_rows >= 1 and features_flush_interval_s > 0")
        self._fs, self._root = open_root(root_url)
        _check_storage(self._fs, self._root, root_url)
        self._flush_rows = flush_rows
        self._interval = flush_interval_s
        self._max_buffer = max_buffer_rows
        self._wake = threading.Condition(threading.Lock())
        self._buffer: list[InferenceRecord] = []
        self._closed = False
        self._dropped = 0
        self._flushed = 0
        self._features = FeatureCounts()
        self._feature_files = (  # None: records only, no `_features/` files
            FeatureFiles(
                self._fs,
                self._root,
                flush_rows=features_flush_rows,
                flush_interval_s=features_flush_interval_s,
            )
            if features
            else None
        )
        # A daemon, because the interpreter joins other threads before it runs atexit hooks,
        # and close() (an atexit hook) is what stops this one.
        self._thread = threading.Thread(target=self._run, name="inference-log", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    @property
    def dropped(self) -> int:
        """Records not logged: the buffer was full, the log was closed, or a last write failed."""
        with self._wake:
            return self._dropped

    @property
    def flushed(self) -> int:
        """Records written so far."""
        with self._wake:
            return self._flushed

    @property
    def features(self) -> FeatureCounts:
        """What decoding the records into feature rows made of them so far (a copy)."""
        with self._wake:
            return replace(self._features)

    def append(self, record: InferenceRecord) -> None:
        with self._wake:
            # A full buffer means storage is not keeping up. Dropping the new record, not the
            # oldest, keeps what gets written a gap-free prefix, and costs the caller nothing.
            if self._closed or len(self._buffer) >= self._max_buffer:
                self._dropped += 1
                return
            self._buffer.append(record)
            if len(self._buffer) == self._flush_rows:
                self._wake.notify()

    def close(self) -> None:
        with self._wake:
            first = not self._closed
            self._closed = True
            self._wake.notify()
        self._thread.join()
        if first:
            atexit.unregister(self.close)

    def _due(self) -> bool:
        return self._closed or len(self._buffer) >= self._flush_rows

    def _run(self) -> None:
        failing = False
        reported = 0
        while True:
            with self._wake:
                if failing and not self._closed:
                    self._wake.wait(self._interval)  # back off; close() still wakes us
                elif not failing:
                    self._wake.wait_for(self._due, self._interval)
                batch, self._buffer = self._buffer, []
                closing = self._closed
            unwritten, written = self._write(batch)
            with self._wake:
                self._flushed += len(batch) - len(unwritten)
                if closing:
                    self._dropped += len(unwritten)
                else:  # retry first, keeping the oldest records if the buffer overflows
                    kept = (unwritten + self._buffer)[: self._max_buffer]
                    self._dropped += len(unwritten) + len(self._buffer) - len(kept)
                    self._buffer = kept
                dropped = self._dropped
            if self._feature_files is not None:  # after the records are counted written
                self._features_of(written, everything=closing)
            if dropped > reported:  # logged here, not in append(), which must not do I/O
                log.warning("inference log dropped %d records so far", dropped)
                reported = dropped
            if closing:
                return
            failing = bool(unwritten)

    def _write(self, batch: list[InferenceRecord]) -> tuple[list[InferenceRecord], list[_Part]]:
        """Write one file per partition; return the records of the partitions that failed,
        and (model, date, records) of those written."""
        partitions: dict[tuple[str, date], list[InferenceRecord]] = defaultdict(list)
        for record in batch:
            partitions[record.model, utc(record.at).date()].append(record)
        unwritten: list[InferenceRecord] = []
        written: list[_Part] = []
        for (model, day), records in partitions.items():
            directory = partition_dir(self._root, model=model, date=day.isoformat())
            try:
                write_parquet(self._fs, directory, records_table(records))
            except Exception:
                log.exception("inference log: writing %d records failed", len(records))
                unwritten += records
                continue
            written.append((model, day, records))
        return unwritten, written

    def _features_of(self, written: list[_Part], *, everything: bool) -> None:
        assert self._feature_files is not None
        counts = FeatureCounts()
        for model, day, records in written:
            counts.add(self._feature_files.add(model, day, records))
        counts.add(self._feature_files.flush(everything=everything))
        with self._wake:
            self._features.add(counts)
