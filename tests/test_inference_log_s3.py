"""The inference log on S3 (`s3://` roots through s3fs), against moto's server mode.

Every reader returns on S3 exactly what it returns on a local folder for the same records,
features and labels; readers see whole files only while the writer flushes; a missing bucket
or refused credentials fail fast with a message that names them. moto runs as a real HTTP
server process, so s3fs, botocore and DuckDB's fsspec bridge are exercised for real (moto is
not real S3: see docs/inference-log-s3.md).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import s3fs  # type: ignore[import-untyped]

from stagegate import reports
from stagegate.serving.inference_log.labels import read_outcomes
from stagegate.serving.inference_log.records import InferenceRecord, Role
from stagegate.serving.inference_log.writer import (
    LabelRecord,
    LocalInferenceLog,
    attach_labels,
    query,
    read_features,
    read_labeled,
    read_labels,
    read_records,
)
from tests.fixtures.mlflow_server import free_port

pytestmark = pytest.mark.slow  # every test here talks to a moto server process

T0 = datetime(2026, 3, 1, 23, 59, 50, tzinfo=UTC)  # the records straddle midnight
JSON = "application/json"


def _start_moto(tmp: Path, **env: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    log = tmp / f"moto-{port}.log"
    with log.open("wb") as out:  # the child keeps its own copy of the handle
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
            return proc, url
        except OSError as exc:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                text = log.read_text(errors="replace")
                raise RuntimeError(f"moto did not start: {text}") from exc
            time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _use_endpoint(mp: pytest.MonkeyPatch, url: str) -> None:
    """The standard AWS variables, as a pod gets them from a Secret."""
    mp.setenv("AWS_ENDPOINT_URL", url)
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        mp.delenv(name, raising=False)
    # fsspec keeps one filesystem per set of arguments: the environment is read once, by the
    # first; a test that changes it needs a fresh one.
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The endpoint URL of a moto S3 server, with the AWS variables pointing at it."""
    proc, url = _start_moto(tmp_path_factory.mktemp("moto"))
    with pytest.MonkeyPatch.context() as mp:
        _use_endpoint(mp, url)
        yield url
    _stop(proc)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def bucket(moto: str) -> str:
    """A fresh, empty bucket."""
    name = f"log-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(name)
    return name


def _bucket_exists(name: str) -> bool:
    return bool(s3fs.S3FileSystem().exists(name))


def rec(
    i: int,
    *,
    model: str = "fraud",
    role: Role = Role.champion,
    version: int = 3,
    status: int = 200,
) -> InferenceRecord:
    """A record as the router builds it, with the JSON body its features are decoded from."""
    rows = [{"a": i, "b": i / 4, "c": f"k{i % 3}"}, {"a": -i, "b": None, "c": "z"}]
    body = orjson.dumps({"dataframe_records": rows})
    return InferenceRecord(
        request_id=f"req-{i:04d}",
        model=model,
        version=version,
        role=role,
        key_hash=None if i % 2 else "ab" * 32,
        inputs=orjson.loads(body),
        output=[i % 2, 1 - i % 2] if status == 200 else None,
        status=status,
        latency_ms=1.0 + i,
        at=T0 + timedelta(seconds=i / 2),
        body=body,
        content_type=JSON,
    )


def traffic(n: int) -> list[InferenceRecord]:
    """Two models, the three roles, a failed answer now and then, over two dates."""
    roles = (Role.champion, Role.challenger, Role.shadow)
    return [
        rec(
            i,
            model="fraud" if i % 5 else "churn",
            role=roles[i % 3],
            version=3 + i % 3,
            status=503 if i % 11 == 0 else 200,
        )
        for i in range(n)
    ]


def write_in_batches(root: str, records: list[InferenceRecord], batch: int) -> LocalInferenceLog:
    """Batches of exactly `batch` records (waiting for each), so both roots get the same files."""
    log = LocalInferenceLog(
        root, flush_rows=batch, flush_interval_s=60, features_flush_rows=2 * batch
    )
    for start in range(0, len(records), batch):
        for record in records[start : start + batch]:
            log.append(record)
        deadline = time.monotonic() + 10
        while log.flushed < min(start + batch, len(records)):
            assert time.monotonic() < deadline, "the writer did not flush"
            time.sleep(0.01)
    log.close()
    return log


LABELS = [
    LabelRecord(f"req-{i:04d}", "fraud" if i % 5 else "churn", i % 2, T0 + timedelta(minutes=1))
    for i in range(0, 60, 2)
] + [LabelRecord("req-0004", "fraud", "late", T0 + timedelta(days=1))]  # supersedes


def every_reading(root: str) -> dict[str, Any]:
    window = {"since": T0 - timedelta(hours=1), "until": T0 + timedelta(hours=1)}
    return {
        "records": read_records(root),
        "records fraud in window": read_records(root, model="fraud", **window),
        "features fraud": read_features(root, model="fraud"),
        "features churn v4 challenger": read_features(
            root, model="churn", version=4, role="challenger", since=T0
        ),
        "labels": read_labels(root),
        "labeled fraud": read_labeled(root, "fraud"),
        "outcomes fraud": read_outcomes(root, "fraud", **window),
        "query": query(
            root, "SELECT model, date, count(*) AS n FROM inference GROUP BY ALL ORDER BY ALL"
        ),
    }


def test_every_reader_returns_on_s3_what_it_returns_locally(bucket: str, tmp_path: Path) -> None:
    records = traffic(60)
    roots = {"local": str(tmp_path / "log"), "s3": f"s3://{bucket}/prod/inference-log"}
    for root in roots.values():
        log = write_in_batches(root, records, batch=15)
        assert (log.flushed, log.dropped, log.features.failed_rows) == (60, 0, 0)
        assert attach_labels(root, LABELS) == len(LABELS) - 1
    local, s3 = (every_reading(root) for root in roots.values())
    for name, table in local.items():
        assert table.num_rows > 0, name  # each comparison compares something
        assert s3[name].equals(table, check_metadata=True), name
    # The s3 files are under the prefix, with the same layout as the local folder.
    fs = s3fs.S3FileSystem()
    keys = {p.split("/inference-log/", 1)[1] for p in fs.find(f"{bucket}/prod/inference-log")}
    local_files = {
        p.relative_to(roots["local"]).as_posix()
        for p in Path(roots["local"]).rglob("*")
        if p.is_file()
    }
    assert {k.rsplit("/", 1)[0] for k in keys} == {f.rsplit("/", 1)[0] for f in local_files}
    assert len(keys) == len(local_files)
    assert not [k for k in keys if not k.endswith(".parquet")]  # no temp objects left behind


def test_readers_see_files_that_another_process_wrote_after_their_last_listing(
    bucket: str, tmp_path: Path
) -> None:
    """A long-lived reader (the API, a worker) is not fooled by an old cached listing."""
    root = f"s3://{bucket}/log"
    write_in_batches(root, [rec(i) for i in range(4)], batch=4)
    assert read_records(root).num_rows == 4
    assert read_features(root, model="fraud").num_rows == 8
    # Another process (the router) writes: its own connection, not this process's filesystem.
    write_in_batches(str(tmp_path / "elsewhere"), [rec(i) for i in range(4, 10)], batch=6)
    router = s3fs.S3FileSystem(skip_instance_cache=True)
    router.put(f"{tmp_path / 'elsewhere'}/", f"{bucket}/log/", recursive=True)
    assert read_records(root).num_rows == 10
    assert read_features(root, model="fraud").num_rows == 20
    assert query(root, "SELECT count(*) FROM inference").to_pylist() == [{"count_star()": 10}]


def test_a_reader_never_sees_a_partial_file_while_the_writer_flushes(bucket: str) -> None:
    root = f"s3://{bucket}/log"
    batch, batches = 40, 10
    log = LocalInferenceLog(root, flush_rows=batch, flush_interval_s=60, features_flush_rows=1)
    done = threading.Event()
    errors: list[BaseException] = []
    # What each reader counts, and the unit a whole file holds: records flush in batches;
    # feature rows (two per record) flush whenever the writer's thread takes records, which
    # may be part of a batch, so their unit is one record's two rows.
    readers = {
        "records": (batch, lambda: read_records(root, model="fraud").num_rows),
        "features": (2, lambda: read_features(root, model="fraud").num_rows),
        "duckdb": (batch, lambda: query(root, "SELECT count(*) AS n FROM inference")[0][0]),
    }
    seen: dict[str, list[int]] = {name: [] for name in readers}

    def read_while_writing(name: str) -> None:
        try:
            while not done.is_set():
                seen[name].append(int(str(readers[name][1]())))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=read_while_writing, args=(name,)) for name in readers]
    for thread in threads:
        thread.start()
    try:
        for b in range(batches):
            for i in range(b * batch, (b + 1) * batch):
                log.append(rec(i))
            deadline = time.monotonic() + 10
            while log.flushed < (b + 1) * batch:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(0.25)  # the readers overlap the flushes
        log.close()
    finally:
        done.set()
        for thread in threads:
            thread.join(30)
    assert not errors, errors
    for name, (unit, _) in readers.items():
        counts = seen[name]
        assert any(0 < n < batch * batches for n in counts), (name, counts)  # mid-way reads
        # Whole files only: whole units, in the order they were written.
        assert all(n % unit == 0 for n in counts), (name, counts)
        assert counts == sorted(counts), (name, counts)
    assert read_records(root).num_rows == batch * batches


def test_a_missing_bucket_is_a_clear_error_and_is_never_created(moto: str) -> None:
    missing = f"missing-{uuid.uuid4().hex[:12]}"
    root = f"s3://{missing}/log"
    started = time.monotonic()
    readers: list[Callable[[], object]] = [
        lambda: read_records(root),
        lambda: read_features(root, model="fraud"),
        lambda: read_labeled(root, "fraud"),
        lambda: query(root, "SELECT 1"),
        lambda: LocalInferenceLog(root),  # the router stops at start rather than drop all
    ]
    for read in readers:
        with pytest.raises(FileNotFoundError, match=f"the bucket '{missing}' does not exist"):
            read()
    with pytest.raises(FileNotFoundError):  # writers that do not check first fail on the PUT
        attach_labels(root, LABELS[:1])
    with pytest.raises(FileNotFoundError):
        reports.save(root, "fraud", "drift", "<html></html>")
    assert time.monotonic() - started < 10
    assert not _bucket_exists(missing)


def test_refused_credentials_are_a_clear_error_and_the_writer_does_not_hang(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A second server that checks every request's credentials (moto knows no access key yet).
    proc, url = _start_moto(tmp_path, INITIAL_NO_AUTH_ACTION_COUNT="0")
    try:
        with pytest.MonkeyPatch.context() as mp:
            _use_endpoint(mp, url)
            root = "s3://some-bucket/log"
            with pytest.raises(PermissionError, match=r"was refused.*AWS_ACCESS_KEY_ID"):
                read_records(root)
            with pytest.raises(PermissionError, match="was refused"):
                read_features(root, model="fraud")
            started = time.monotonic()
            with caplog.at_level(logging.WARNING, "stagegate.serving.inference_log"):
                # Write-only credentials cannot see the bucket: the writer starts, and its
                # writes fail (logged, retried, then counted dropped), without blocking.
                log = LocalInferenceLog(root, flush_rows=5, flush_interval_s=0.2)
                for i in range(5):
                    log.append(rec(i))
                time.sleep(0.5)
                log.close()
            assert (log.flushed, log.dropped) == (0, 5)
            assert time.monotonic() - started < 15
            text = caplog.text
            assert "could not check the bucket" in text
            assert "writing 5 records failed" in text
            assert "Access Key Id you provided does not exist" in text
    finally:
        _stop(proc)
        s3fs.S3FileSystem.clear_instance_cache()


def test_drift_reports_are_stored_beside_the_log_on_s3(bucket: str) -> None:
    root = f"s3://{bucket}/log"
    html = "<html>" + "drift " * 1000 + "</html>"
    relative, sha256 = reports.save(root, "fraud/x", "drift-1", html)
    assert relative == "_reports/model=fraud%2Fx/drift-1.html.gz"
    assert s3fs.S3FileSystem().exists(f"{bucket}/log/{relative}")
    assert reports.load(root, relative, sha256) == html.encode()
    # The reports stay out of every reading of the log.
    write_in_batches(root, [rec(1)], batch=1)
    assert read_records(root).num_rows == 1


def test_the_router_process_writes_its_log_to_s3(bucket: str, tmp_path: Path) -> None:
    """`stagegate router --log-dir s3://…` as in a pod: credentials from the environment."""
    from tests.test_router import START_TIMEOUT_S, Upstreams

    upstreams = Upstreams()
    router: subprocess.Popen[bytes] | None = None
    try:
        champion = upstreams.start(7)
        policy = {"policies": [{"model": "iris", "champion": {"version": 7, "url": champion.url}}]}
        (tmp_path / "policy.json").write_bytes(orjson.dumps(policy))
        port = free_port()
        root = f"s3://{bucket}/cluster-a/inference-log"
        router_log = tmp_path / "router.log"
        # The AWS variables of `moto`, with the S3-only endpoint variable this time.
        env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
        env["AWS_ENDPOINT_URL_S3"] = os.environ["AWS_ENDPOINT_URL"]
        with router_log.open("wb") as out:
            router = subprocess.Popen(
                [
                    *(sys.executable, "-m", "stagegate.cli", "router"),
                    *("--policy", str(tmp_path / "policy.json"), "--port", str(port)),
                    *("--log-dir", root, "--log-level", "warning"),
                ],
                cwd=Path(__file__).resolve().parents[1],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert router.poll() is None, router_log.read_text(errors="replace")
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the router did not start"
                time.sleep(0.1)
        sent: dict[str, float] = {}
        for i in range(5):
            body = orjson.dumps({"dataframe_split": {"columns": ["x"], "data": [[i / 2]]}})
            request = urllib.request.Request(
                f"{url}/models/iris/invocations",
                data=body,
                headers={"content-type": JSON},
                method="POST",
            )
            with urllib.request.urlopen(request, timeout=10) as resp:
                assert orjson.loads(resp.read())["predictions"] == [7]
                sent[resp.headers["x-request-id"]] = i / 2
        router.send_signal(signal.SIGTERM)  # a graceful stop flushes the log
        assert router.wait(20) == 0, router_log.read_text(errors="replace")
    finally:
        if router is not None and router.poll() is None:
            router.kill()
            router.wait()
        upstreams.close()
    records = read_records(root, model="iris")
    assert sorted(records["request_id"].to_pylist()) == sorted(sent)
    assert set(records["version"].to_pylist()) == {7}
    features = read_features(root, model="iris")
    assert (
        dict(zip(features["request_id"].to_pylist(), features["x"].to_pylist(), strict=True))
        == sent
    )
    assert features["prediction"].to_pylist() == [7] * 5


def test_a_write_that_fails_halfway_publishes_nothing(
    bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsspec's files upload what they hold when closed, even by an exception: the encoding
    must fail before anything is sent."""
    from stagegate.serving.inference_log import format as log_format

    def fails_halfway(table: Any, where: Any, **options: Any) -> None:
        where.write(b"PAR1 half a file")
        raise OSError("disk full while encoding")

    fs = s3fs.S3FileSystem()
    table = log_format.records_table([rec(1)])
    monkeypatch.setattr("pyarrow.parquet.write_table", fails_halfway)
    with pytest.raises(OSError, match="disk full"):
        log_format.write_parquet(fs, f"{bucket}/log/model=fraud/date=2026-03-01", table)
    assert fs.find(bucket) == []
    monkeypatch.undo()
    path = log_format.write_parquet(fs, f"{bucket}/log/model=fraud/date=2026-03-01", table)
    assert fs.find(bucket) == [path]
