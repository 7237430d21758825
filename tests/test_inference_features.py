"""The inference log's feature rows: request bodies decoded at write time, read back typed."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from stagegate.errors import InvalidInput
from stagegate.serving.inference_log import decode
from stagegate.serving.inference_log.features import FEATURES_DIR
from stagegate.serving.inference_log.records import InferenceRecord, Role
from stagegate.serving.inference_log.writer import (
    LocalInferenceLog,
    query,
    read_features,
    read_records,
)
from stagegate.serving.model_server import scoring
from tests.waits import wait_for

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
JSON = "application/json"
CSV = "text/csv"
PARQUET = "application/vnd.apache.parquet"
META = ["request_id", "version", "role", "at", "row"]
_ROUTER_PARSE: Any = object()


def rec(
    i: int,
    body: bytes | None,
    *,
    content_type: str | None = JSON,
    output: Any = None,
    inputs: Any = _ROUTER_PARSE,
    version: int = 1,
    role: Role = "champion",
    status: int = 200,
    at: datetime | None = None,
    model: str = "fraud",
) -> InferenceRecord:
    """A record as the router builds it: `inputs` is the body's orjson parse, or None."""
    if inputs is _ROUTER_PARSE:
        try:
            inputs = orjson.loads(body) if body is not None else None
        except orjson.JSONDecodeError:
            inputs = None
    return InferenceRecord(
        request_id=f"req-{i:04d}",
        model=model,
        version=version,
        role=role,
        key_hash=None,
        inputs=inputs,
        output=output,
        status=status,
        latency_ms=1.0,
        at=at or T0 + timedelta(seconds=i),
        body=body,
        content_type=content_type,
    )


def write(root: str, records: list[InferenceRecord], **options: Any) -> LocalInferenceLog:
    log = LocalInferenceLog(root, **options)
    for record in records:
        log.append(record)
    log.close()
    return log


@pytest.fixture
def root(tmp_path: Path) -> str:
    return str(tmp_path / "log")


def test_the_content_types_are_the_model_servers() -> None:
    assert decode.CONTENT_TYPES == scoring.CONTENT_TYPES
    assert (decode.CONTENT_TYPE_JSON, decode.CONTENT_TYPE_CSV, decode.CONTENT_TYPE_PARQUET) == (
        scoring.CONTENT_TYPE_JSON,
        scoring.CONTENT_TYPE_CSV,
        scoring.CONTENT_TYPE_PARQUET,
    )


# --- every body format -----------------------------------------------------------------------

ROWS = [{"a": 1, "b": 0.5, "c": "x"}, {"a": 2, "b": 1.5, "c": "y"}, {"a": 3, "b": None, "c": "z"}]
SPLIT = [list(r.values()) for r in ROWS]
COLUMNS = {name: [r[name] for r in ROWS] for name in ("a", "b", "c")}


def _parquet_body() -> bytes:
    table = pa.table(
        {
            "a": pa.array([1, 2, 3], pa.int32()),  # stored as int64
            "b": pa.array([0.5, 1.5, None], pa.float32()),  # stored as float64
            "c": pa.array(["x", "y", "z"]).dictionary_encode(),  # stored as string
        }
    )
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


FORMATS: dict[str, tuple[bytes, str]] = {
    "dataframe_split": (
        orjson.dumps({"dataframe_split": {"columns": list("abc"), "data": SPLIT}}),
        JSON,
    ),
    "dataframe_records": (orjson.dumps({"dataframe_records": ROWS}), JSON),
    "instances": (orjson.dumps({"instances": ROWS}), JSON),
    "inputs as columns": (orjson.dumps({"inputs": COLUMNS}), JSON),
    "inputs as records, with params": (orjson.dumps({"inputs": ROWS, "params": {"k": 1}}), JSON),
    "csv": (b"a,b,c\n1,0.5,x\n2,1.5,y\n3,,z\n", "text/csv; charset=utf-8"),
    "parquet": (_parquet_body(), PARQUET),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_body_format_reads_back_as_a_typed_table(root: str, fmt: str) -> None:
    body, content_type = FORMATS[fmt]
    log = write(root, [rec(0, body, content_type=content_type, output=[0.25, 0.5, 0.75])])
    table = read_features(root, model="fraud")
    assert table.schema == pa.schema(
        [
            pa.field("request_id", pa.string(), nullable=False),
            pa.field("version", pa.int32(), nullable=False),
            pa.field("role", pa.string(), nullable=False),
            pa.field("at", pa.timestamp("us", tz="UTC"), nullable=False),
            pa.field("row", pa.int32(), nullable=False),
            pa.field("a", pa.int64()),
            pa.field("b", pa.float64()),
            pa.field("c", pa.string()),
            pa.field("prediction", pa.float64()),
        ]
    )
    assert table.to_pydict() == {
        "request_id": ["req-0000"] * 3,
        "version": [1, 1, 1],
        "role": ["champion"] * 3,
        "at": [T0] * 3,
        "row": [0, 1, 2],
        "a": [1, 2, 3],
        "b": [0.5, 1.5, None],
        "c": ["x", "y", "z"],
        "prediction": [0.25, 0.5, 0.75],
    }
    assert log.features.rows == 3
    assert log.features.undecodable == 0
    # The record itself is unchanged: JSON inputs as text, NULL for the others.
    inputs = read_records(root)["inputs"][0].as_py()
    assert (inputs is None) == (content_type != JSON)


def test_positional_and_scalar_shapes_name_columns_by_position(root: str) -> None:
    bodies = [
        orjson.dumps({"instances": [[1.0, 2.0], [3.0, 4.0]]}),  # a 2-D tensor
        orjson.dumps({"inputs": [5.0, 6.0]}),  # one value per row
        orjson.dumps({"inputs": {"x": 7, "y": "q"}}),  # one row given as scalars
        orjson.dumps({"dataframe_split": {"columns": [10, 11], "data": [[1, [2, 3]]]}}),
    ]
    write(root, [rec(i, body, output=None) for i, body in enumerate(bodies)])
    table = read_features(root, model="fraud")
    assert table.column_names == [*META, "0", "1", "x", "y", "10", "11"]
    rows = table.drop_columns(["version", "role", "at"]).to_pylist()
    assert rows == [
        {
            "request_id": "req-0000",
            "row": 0,
            "0": 1.0,
            "1": 2.0,
            "x": None,
            "y": None,
            "10": None,
            "11": None,
        },
        {
            "request_id": "req-0000",
            "row": 1,
            "0": 3.0,
            "1": 4.0,
            "x": None,
            "y": None,
            "10": None,
            "11": None,
        },
        {
            "request_id": "req-0001",
            "row": 0,
            "0": 5.0,
            "1": None,
            "x": None,
            "y": None,
            "10": None,
            "11": None,
        },
        {
            "request_id": "req-0001",
            "row": 1,
            "0": 6.0,
            "1": None,
            "x": None,
            "y": None,
            "10": None,
            "11": None,
        },
        {
            "request_id": "req-0002",
            "row": 0,
            "0": None,
            "1": None,
            "x": 7,
            "y": "q",
            "10": None,
            "11": None,
        },
        # A nested value is kept as JSON text.
        {
            "request_id": "req-0003",
            "row": 0,
            "0": None,
            "1": None,
            "x": None,
            "y": None,
            "10": 1,
            "11": "[2,3]",
        },
    ]


def test_predictions_of_every_shape(root: str) -> None:
    body = orjson.dumps({"dataframe_split": {"columns": ["a"], "data": [[1], [2]]}})
    records = [
        rec(0, body, output=[{"label": "yes", "p": 0.9}, {"label": "no", "p": 0.2}]),
        rec(1, body, output=[[0.1, 0.9], [0.8, 0.2]]),  # class probabilities
        rec(2, body, output={"score": [1.5, 2.5]}),  # an object of columns
        rec(3, body, output=[7]),  # not one prediction per row: features only
    ]
    log = write(root, records)
    table = read_features(root, model="fraud")
    assert table.column_names == [
        *META,
        "a",
        "prediction.label",
        "prediction.p",
        "prediction.0",
        "prediction.1",
        "prediction.score",
    ]
    got = table.drop_columns(["request_id", "version", "role", "at"]).to_pydict()
    assert got == {
        "row": [0, 1] * 4,
        "a": [1, 2] * 4,
        "prediction.label": ["yes", "no", None, None, None, None, None, None],
        "prediction.p": [0.9, 0.2, None, None, None, None, None, None],
        "prediction.0": [None, None, 0.1, 0.8, None, None, None, None],
        "prediction.1": [None, None, 0.9, 0.2, None, None, None, None],
        "prediction.score": [None, None, None, None, 1.5, 2.5, None, None],
    }
    assert (log.features.rows, log.features.unmatched) == (8, 1)


def test_a_feature_named_like_a_table_column_gets_a_prefix(root: str) -> None:
    names = ["request_id", "row", "prediction", "prediction.p", "input.row", "plain"]
    body = orjson.dumps({"dataframe_split": {"columns": names, "data": [[1, 2, 3, 4, 5, 6]]}})
    write(root, [rec(0, body, output=[0.5])])
    row = read_features(root, model="fraud").to_pylist()[0]
    assert {k: v for k, v in row.items() if k not in META} == {
        "input.request_id": 1,
        "input.input.row": 2,  # `input.row` is a feature of its own
        "input.prediction": 3,
        "input.prediction.p": 4,
        "input.row": 5,
        "plain": 6,
        "prediction": 0.5,
    }
    assert (row["request_id"], row["row"]) == ("req-0000", 0)


def test_a_pandas_index_in_a_parquet_body_is_not_a_feature(root: str) -> None:
    frame = pd.DataFrame({"a": [1.0, 2.0]}, index=pd.Index([10, 20], name="id"))
    sink = io.BytesIO()
    frame.to_parquet(sink)
    write(root, [rec(0, sink.getvalue(), content_type=PARQUET, output=[0, 1])])
    table = read_features(root, model="fraud")
    assert table.column_names == [*META, "a", "prediction"]
    assert table["a"].to_pylist() == [1.0, 2.0]


def test_csv_dates_stay_text(root: str) -> None:
    body = b"when,n\n2026-03-01,1\n2026-03-02T10:00:00,2\n"
    write(root, [rec(0, body, content_type=CSV, output=[0, 1])])
    table = read_features(root, model="fraud")
    assert table["when"].to_pylist() == ["2026-03-01", "2026-03-02T10:00:00"]
    assert table.schema.field("n").type == pa.int64()


# --- unification, failures, bounds ----------------------------------------------------------


def test_columns_typed_differently_across_files_are_unified(root: str) -> None:
    def split(columns: list[str], *rows: list[Any]) -> bytes:
        return orjson.dumps({"dataframe_split": {"columns": columns, "data": list(rows)}})

    batches = [
        # n: int here, float later; s: only here; m: int here, text later; z: null, then bool
        [rec(0, split(["n", "s", "m", "z"], [2**60, "a", 1, None]), output=[1])],
        [rec(1, split(["n", "z"], [2.5, True]), output=[0.5])],
        [rec(2, split(["m"], ["x"]), output=["no"])],
        # Within one file: an int in one request, text in the next.
        [rec(3, split(["w"], [1]), output=[2]), rec(4, split(["w"], ["one"]), output=[3])],
    ]
    for records in batches:  # one file each
        write(root, records)
    table = read_features(root, model="fraud")
    kinds = {f.name: f.type for f in table.schema if f.name not in META}
    assert kinds == {
        "n": pa.float64(),
        "s": pa.string(),
        "m": pa.string(),
        "z": pa.bool_(),
        "w": pa.string(),
        "prediction": pa.string(),  # 1, 0.5, "no", 2, 3
    }
    got = table.select(list(kinds)).to_pydict()
    assert got == {
        "n": [float(2**60), 2.5, None, None, None],
        "s": ["a", None, None, None, None],
        "m": ["1", None, "x", None, None],
        "z": [None, True, None, None, None],
        "w": [None, None, None, "1", "one"],
        "prediction": ["1", "0.5", "no", "2", "3"],
    }


def test_an_undecodable_body_still_logs_its_record(root: str) -> None:
    good = orjson.dumps({"dataframe_records": [{"a": 1}]})
    records = [
        rec(0, b"{not json", output=[1]),
        rec(1, orjson.dumps({"columns": ["a"], "data": [[1]]}), output=[1]),  # no format key
        rec(
            2, orjson.dumps({"dataframe_split": {"columns": ["a", "b"], "data": [[1]]}}), output=[1]
        ),
        rec(3, b"a,b\n\xff\xfe,1\n", content_type=CSV, output=[1]),  # not UTF-8
        rec(4, b"PAR1 and then nothing", content_type=PARQUET, output=[1]),
        rec(5, b"a=1", content_type="application/x-www-form-urlencoded", output=[1]),
        rec(6, good, output=[1]),
        rec(7, good, output=None, status=500),  # not scored: no rows, not counted
        rec(8, None, inputs=None, output=[1]),  # nothing to decode
    ]
    log = write(root, records)
    assert read_records(root)["request_id"].to_pylist() == [r.request_id for r in records]
    assert log.flushed == len(records)
    assert log.dropped == 0
    assert read_features(root, model="fraud")["request_id"].to_pylist() == ["req-0006"]
    assert log.features.undecodable == 6
    assert log.features.rows == 1


def test_json_the_router_could_not_parse_is_read_as_the_model_server_reads_it(root: str) -> None:
    body = b'{"dataframe_split": {"columns": ["a"], "data": [[NaN], [1.5]]}}'
    write(root, [rec(0, body, output=[0, 1])])  # orjson refuses NaN: the router logs None
    values = read_features(root, model="fraud")["a"].to_pylist()
    assert values[1] == 1.5
    assert values[0] != values[0]  # NaN, as mlflow's parser reads it


@pytest.mark.parametrize("content_type", [JSON, CSV])
def test_a_request_over_max_rows_keeps_every_kth_row(root: str, content_type: str) -> None:
    rows = 2 * decode.MAX_ROWS + 1  # every 3rd row: 0, 3, …, 20001
    if content_type == JSON:
        body = orjson.dumps(
            {"dataframe_split": {"columns": ["v"], "data": [[i] for i in range(rows)]}}
        )
    else:
        body = ("v\n" + "".join(f"{i}\n" for i in range(rows))).encode()
    output = [2 * i for i in range(rows)]
    log = write(root, [rec(0, body, content_type=content_type, output=output)])
    table = read_features(root, model="fraud")
    kept = list(range(0, rows, 3))
    assert len(kept) <= decode.MAX_ROWS
    assert table["row"].to_pylist() == kept
    assert table["v"].to_pylist() == kept
    assert table["prediction"].to_pylist() == [2 * i for i in kept]
    assert (log.features.sampled, log.features.rows) == (1, len(kept))


def test_a_request_over_max_columns_gives_no_rows(root: str) -> None:
    wide = {f"c{i}": 1 for i in range(decode.MAX_COLUMNS + 1)}
    log = write(root, [rec(0, orjson.dumps({"dataframe_records": [wide]}), output=[1])])
    assert read_features(root, model="fraud").num_rows == 0
    assert read_records(root).num_rows == 1
    assert log.features.undecodable == 1


def test_a_failed_feature_write_keeps_the_records(root: str) -> None:
    os.makedirs(root)
    Path(root, FEATURES_DIR).write_text("a file where the features folder should be")
    body = orjson.dumps({"dataframe_records": [{"a": 1}, {"a": 2}]})
    log = write(root, [rec(0, body, output=[1, 2])])
    assert read_records(root).num_rows == 1
    assert (log.flushed, log.dropped) == (1, 0)
    assert (log.features.rows, log.features.failed_rows) == (0, 2)


def test_feature_rows_wait_for_a_big_enough_file_or_their_age(tmp_path: Path) -> None:
    body = orjson.dumps({"dataframe_records": [{"a": 1}, {"a": 2}]})
    root = str(tmp_path / "by-size")
    log = LocalInferenceLog(
        root,
        flush_rows=1,
        flush_interval_s=0.05,
        features_flush_rows=3,
        features_flush_interval_s=60,
    )
    log.append(rec(0, body, output=[1, 2]))
    wait_for("the first record", lambda: log.flushed == 1)
    log.append(rec(1, body, output=[1, 2]))
    wait_for("a features file", lambda: log.features.rows == 4)
    assert (
        read_features(root, model="fraud")["request_id"].to_pylist()
        == ["req-0000"] * 2 + ["req-0001"] * 2
    )
    # Two record files, one features file: the first record's rows waited for the second's.
    assert len(list(Path(root, "model=fraud").rglob("*.parquet"))) == 2
    assert len(list(Path(root, FEATURES_DIR).rglob("*.parquet"))) == 1
    log.close()

    root = str(tmp_path / "by-age")
    aged = LocalInferenceLog(
        root, flush_rows=1, flush_interval_s=0.05, features_flush_interval_s=0.2
    )
    aged.append(rec(0, body, output=[1, 2]))
    wait_for("rows written for their age", lambda: aged.features.rows == 2, timeout_s=5)
    assert read_features(root, model="fraud").num_rows == 2
    aged.close()

    with pytest.raises(ValueError, match="features_flush_rows"):
        LocalInferenceLog(root, features_flush_rows=0)


def test_features_can_be_switched_off(root: str) -> None:
    body = orjson.dumps({"dataframe_records": [{"a": 1}]})
    write(root, [rec(0, body, output=[1])], features=False)
    assert read_records(root).num_rows == 1
    assert not Path(root, FEATURES_DIR).exists()


def test_the_records_readers_never_see_the_features(root: str) -> None:
    body = orjson.dumps({"dataframe_records": [{"a": 1}, {"a": 2}]})
    write(root, [rec(0, body, output=[1, 2]), rec(1, body, output=[1, 2], model="churn")])
    assert Path(root, FEATURES_DIR).is_dir()
    assert read_records(root).num_rows == 2  # all models: the root's discovery
    assert query(root, "SELECT count(*) AS n FROM inference").to_pylist() == [{"n": 2}]
    assert read_features(root, model="churn")["request_id"].to_pylist() == ["req-0001"] * 2


# --- reading by window, version and role -----------------------------------------------------


def test_read_features_filters_by_window_version_and_role(root: str) -> None:
    body = orjson.dumps({"dataframe_records": [{"a": 1}]})
    day = timedelta(days=1)
    records = [
        rec(0, body, output=[0], at=T0),
        rec(1, body, output=[0], at=T0 + timedelta(hours=1), version=2, role="challenger"),
        rec(2, body, output=[0], at=T0 + timedelta(hours=1), version=2, role="shadow"),
        rec(3, body, output=[0], at=T0 + day),
        rec(4, body, output=[0], at=T0 + 2 * day),
    ]
    write(root, records)

    def ids(**kw: Any) -> list[str]:
        return [i[-1] for i in read_features(root, model="fraud", **kw)["request_id"].to_pylist()]

    assert ids() == ["0", "1", "2", "3", "4"]
    assert ids(version=2) == ["1", "2"]
    assert ids(role="shadow") == ["2"]
    assert ids(version=1, role="champion") == ["0", "3", "4"]
    assert ids(since=T0 + timedelta(minutes=1)) == ["1", "2", "3", "4"]
    assert ids(until=T0 + day) == ["0", "1", "2"]  # until is exclusive
    assert ids(since=T0 + day, until=T0 + day + timedelta(seconds=1)) == ["3"]
    assert read_features(root, model="nobody").column_names == META
    with pytest.raises(InvalidInput):
        read_features(root, model="fraud", since=datetime(2026, 3, 1))  # naive

    # The window prunes whole date folders: one outside it is never opened.
    folder = Path(root, FEATURES_DIR, "model=fraud", "date=2026-03-03")
    (folder / "part-broken.parquet").write_bytes(b"not parquet")
    assert ids(until=T0 + day + timedelta(hours=1)) == ["0", "1", "2", "3"]
    with pytest.raises(pa.ArrowInvalid):
        read_features(root, model="fraud")


# --- through a real router and a real model server ------------------------------------------

START_TIMEOUT_S = 90.0  # the model server imports mlflow before it answers: slow on 2 cores
FEATURES = ["f0", "f1", "f2"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    def healthy() -> bool:
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    wait_for(f"{url}/health", healthy, timeout_s=START_TIMEOUT_S, interval_s=0.1)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _start(args: list[str], log: Path, started: list[subprocess.Popen[bytes]]) -> Any:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stagegate.cli", *args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    started.append(proc)
    return proc


def _post(url: str, body: bytes, content_type: str) -> tuple[str, list[Any]]:
    request = urllib.request.Request(
        url, data=body, headers={"content-type": content_type}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=20) as resp:
        return resp.headers["x-request-id"], json.loads(resp.read())["predictions"]


@pytest.mark.slow
def test_csv_parquet_and_json_requests_through_the_real_router(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    import mlflow.sklearn
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    train = pd.DataFrame(rng.normal(size=(200, 3)), columns=FEATURES)
    model = LogisticRegression().fit(train, (train["f0"] + train["f2"] > 0).astype(int))
    mlflow.sklearn.save_model(model, str(tmp_path / "model"), input_example=train.head(2))

    server_port, router_port = _free_port(), _free_port()
    server_url = f"http://127.0.0.1:{server_port}"
    server_log = tmp_path / "model-server.log"
    server = _start(
        ["serve-model", str(tmp_path / "model"), "--port", str(server_port), "--device", "cpu"],
        server_log,
        processes,
    )
    policy = {"policies": [{"model": "iris", "champion": {"version": 4, "url": server_url}}]}
    (tmp_path / "policy.json").write_bytes(orjson.dumps(policy))
    log_dir = tmp_path / "inference-log"
    router_log = tmp_path / "router.log"
    router = _start(
        [
            *("router", "--policy", str(tmp_path / "policy.json")),
            *("--port", str(router_port), "--log-dir", str(log_dir), "--log-level", "warning"),
        ],
        router_log,
        processes,
    )
    router_url = f"http://127.0.0.1:{router_port}"
    _wait_healthy(server_url, server, server_log)
    _wait_healthy(router_url, router, router_log)

    frame = pd.DataFrame(rng.normal(size=(5, 3)).round(4), columns=FEATURES)
    parquet = io.BytesIO()
    frame.iloc[3:].to_parquet(parquet)
    sent = {
        "csv": (frame.iloc[:2].to_csv(index=False).encode(), CSV, frame.iloc[:2]),
        "split": (
            orjson.dumps({"dataframe_split": frame.iloc[2:3].to_dict(orient="split", index=False)}),
            JSON,
            frame.iloc[2:3],
        ),
        "parquet": (parquet.getvalue(), PARQUET, frame.iloc[3:]),
    }
    invocations = f"{router_url}/models/iris/invocations"
    answers = {name: _post(invocations, body, ct) for name, (body, ct, _) in sent.items()}

    router.send_signal(signal.SIGTERM)  # a graceful stop flushes the log
    assert router.wait(20) == 0, router_log.read_text(errors="replace")

    table = read_features(str(log_dir), model="iris")
    assert table.column_names == [*META, *FEATURES, "prediction"]
    assert table.schema.field("prediction").type == pa.int64()
    for name, (_, _, rows) in sent.items():
        rid, predictions = answers[name]
        got = table.filter(pc.equal(table["request_id"], rid))
        assert got["row"].to_pylist() == list(range(len(rows))), name
        assert got.select(FEATURES).to_pylist() == rows.to_dict(orient="records"), name
        assert got["prediction"].to_pylist() == predictions, name
        assert set(got["version"].to_pylist()) == {4}
        assert set(got["role"].to_pylist()) == {"champion"}
    assert table.num_rows == len(frame)
