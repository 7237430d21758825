"""`stagegate serve-model`: real server processes over real HTTP, against mlflow's own answers.

Two servers run for the module, started together: A serves `models:/NAME/1`, B serves
`models:/NAME@champion` (version 2) and is stopped with SIGTERM by the last test.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from stagegate.errors import InvalidInput
from stagegate.serving.model_server import device as model_device
from stagegate.serving.model_server.numpy_model import NumpyScorer
from stagegate.serving.model_server.scoring import (
    MAX_COLUMNS,
    MAX_ROWS,
    LoadedModel,
    Parsed,
    ScoringError,
)
from stagegate.serving.model_server.server import ModelServer
from tests.fixtures.mlflow_server import MlflowServer, free_port

COLUMNS = [f"f{i}" for i in range(20)]
MAX_BODY = 1_000_000
START_TIMEOUT_S = 180.0  # two servers and an in-process load at once, on a busy 2-core machine
STOP_TIMEOUT_S = 20.0
JSON = {"content-type": "application/json"}


# -- the model: a 20-feature logistic regression, registered twice --------------------------


def _frame(seed: int, rows: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(rng.normal(size=(rows, len(COLUMNS))), columns=COLUMNS)


@contextlib.contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    previous: Any = tracking_utils._tracking_uri
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if previous_env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


def _register(tracking_uri: str, name: str, seed: int) -> None:
    import mlflow
    import mlflow.sklearn
    from sklearn.linear_model import LogisticRegression

    features = _frame(seed, 300)
    target = (features["f0"] + features["f3"] * (1 + seed) > 0).astype(int)
    model = LogisticRegression().fit(features, target)
    with _tracking_uri(tracking_uri), mlflow.start_run():
        logged: Any = mlflow.sklearn.log_model(
            model, name="model", input_example=features.head(3), pip_requirements=["scikit-learn"]
        )
        mlflow.register_model(logged.model_uri, name)


@dataclass
class Served:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    first_health: int | None = None

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@dataclass(frozen=True)
class Stack:
    name: str
    a: Served  # models:/NAME/1, --max-body-bytes MAX_BODY
    b: Served  # models:/NAME@champion, stopped by the SIGTERM test
    v1: Any  # pyfunc models, loaded here, for reference answers
    v2: Any


def _start(uri: str, tracking_uri: str, log: Path, *extra: str) -> Served:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    argv = [sys.executable, "-m", "stagegate.cli", "serve-model", uri, "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*argv, "--tracking-uri", tracking_uri, *extra],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Served(url=f"http://127.0.0.1:{port}", proc=proc, log=log)


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


def _wait_healthy(served: Served) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while (status := _status(served.url + "/health")) != 200:
        if status is not None and served.first_health is None:
            served.first_health = status
        if served.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"model server did not become healthy:\n{served.log_tail()}")
        time.sleep(0.05)
    if served.first_health is None:
        served.first_health = status


def _stop(served: Served) -> None:
    if served.proc.poll() is None:
        served.proc.send_signal(signal.SIGTERM)
        try:
            served.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            served.proc.kill()
            served.proc.wait()


@pytest.fixture(scope="module")
def stack(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    import mlflow
    import mlflow.pyfunc

    name = f"serve-{uuid.uuid4().hex[:8]}"
    _register(mlflow_server.url, name, seed=0)
    _register(mlflow_server.url, name, seed=1)
    mlflow.MlflowClient(mlflow_server.url).set_registered_model_alias(name, "champion", "2")
    logs = tmp_path_factory.mktemp("model-server")
    a = _start(
        f"models:/{name}/1",
        mlflow_server.url,
        logs / "a.log",
        "--max-body-bytes",
        str(MAX_BODY),
    )
    b = _start(f"models:/{name}@champion", mlflow_server.url, logs / "b.log")
    try:
        with _tracking_uri(mlflow_server.url):
            v1 = mlflow.pyfunc.load_model(f"models:/{name}/1")
            v2 = mlflow.pyfunc.load_model(f"models:/{name}/2")
        _wait_healthy(a)
        _wait_healthy(b)
        yield Stack(name=name, a=a, b=b, v1=v1, v2=v2)
    finally:
        _stop(a)
        _stop(b)


@pytest.fixture(scope="module")
def mlflow_app(stack: Stack) -> Iterator[TestClient]:
    """mlflow's own scoring server (`mlflow models serve`'s app), in-process, serving v1."""
    from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT
    from mlflow.pyfunc import scoring_server

    key = _MLFLOW_IS_IN_SERVING_ENVIRONMENT.name
    saved = os.environ.get(key)
    try:
        with TestClient(scoring_server.init(stack.v1)) as client:
            yield client
    finally:  # init() marks the whole process as a serving environment
        os.environ.pop(key, None)
        if saved is not None:
            os.environ[key] = saved


def _post(url: str, body: bytes | str, content_type: str = "application/json") -> tuple[int, Any]:
    data = body.encode() if isinstance(body, str) else body
    where = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname or "", where.port, timeout=10)
    try:
        # A refusal (413) may be answered, and the connection closed, before the whole body is
        # sent: the answer is in the socket all the same, so it is read below.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.request("POST", "/invocations", body=data, headers={"content-type": content_type})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read()


# -- the scoring protocol, against mlflow's own server --------------------------------------

ROWS = _frame(7, 3)
RECORDS = ROWS.to_dict(orient="records")
ONE = RECORDS[0]
AS_LISTS = ROWS.to_numpy().tolist()

FORMATS: dict[str, Any] = {
    "dataframe_split": {"dataframe_split": {"columns": COLUMNS, "data": AS_LISTS}},
    "dataframe_split reordered, extra column": {
        "dataframe_split": {
            "columns": [*COLUMNS[::-1], "extra"],
            "data": [[*row[::-1], 1.0] for row in AS_LISTS],
        }
    },
    "dataframe_split with index": {
        "dataframe_split": {"columns": COLUMNS, "data": AS_LISTS, "index": [7, 8, 9]}
    },
    "dataframe_records": {"dataframe_records": RECORDS},
    "instances": {"instances": RECORDS},
    "inputs as columns": {"inputs": {c: ROWS[c].tolist() for c in COLUMNS}},
    "inputs as records": {"inputs": RECORDS},
    "inputs as one row of scalars": {"inputs": ONE},
    "integers for doubles": {"dataframe_split": {"columns": COLUMNS, "data": [[1] * 20]}},
    "numeric strings and booleans": {
        "dataframe_split": {"columns": COLUMNS, "data": [["1.5", True, *AS_LISTS[0][2:]]]}
    },
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_json_format_answers_as_mlflow_serve_does(
    stack: Stack, mlflow_app: TestClient, fmt: str
) -> None:
    body = json.dumps(FORMATS[fmt])
    theirs = mlflow_app.post("/invocations", content=body, headers=JSON)
    ours = _post(stack.a.url, body)
    assert theirs.status_code == 200, theirs.text
    assert ours == (200, theirs.json())


def test_csv_answers_as_mlflow_serve_does(stack: Stack, mlflow_app: TestClient) -> None:
    body = ROWS.to_csv(index=False)
    theirs = mlflow_app.post("/invocations", content=body, headers={"content-type": "text/csv"})
    assert theirs.status_code == 200, theirs.text
    assert _post(stack.a.url, body, "text/csv") == (200, theirs.json())


def test_fast_path_is_on_and_equals_pyfunc_on_many_rows(stack: Stack) -> None:
    version = json.loads(_get(stack.a.url + "/version"))
    assert version["fast_path"] == "sklearn-numpy", version
    frame = _frame(11, 500)
    expected = stack.v1.predict(frame).tolist()
    body = json.dumps({"dataframe_split": frame.to_dict(orient="split", index=False)})
    assert _post(stack.a.url, body) == (200, {"predictions": expected})


BAD: dict[str, tuple[str, str | None]] = {
    "missing column": (
        json.dumps(
            {"dataframe_split": {"columns": COLUMNS[:3] + COLUMNS[4:], "data": [[0.0] * 19]}}
        ),
        "'f3'",
    ),
    "missing key in a record": (
        json.dumps({"dataframe_records": [{c: 0.0 for c in COLUMNS if c != "f3"}]}),
        "'f3'",
    ),
    "wrong type": (
        json.dumps(
            {"dataframe_split": {"columns": COLUMNS, "data": [[0.0] * 3 + ["abc"] + [0.0] * 16]}}
        ),
        "'f3'",
    ),
    "null where the model takes no missing values": (
        json.dumps(
            {"dataframe_split": {"columns": COLUMNS, "data": [[0.0] * 3 + [None] + [0.0] * 16]}}
        ),
        "'f3'",
    ),
    "malformed JSON": ('{"dataframe_split": ', None),
    "unknown format key": (json.dumps({"dataframe": {"columns": COLUMNS, "data": []}}), None),
    "two format keys": (json.dumps({"instances": RECORDS, "inputs": RECORDS}), None),
    "a list": (json.dumps(RECORDS), None),
}


@pytest.mark.parametrize("case", list(BAD))
def test_client_errors_are_400_naming_the_column(
    stack: Stack, mlflow_app: TestClient, case: str
) -> None:
    body, column = BAD[case]
    theirs = mlflow_app.post("/invocations", content=body, headers=JSON)
    assert theirs.status_code == 400  # mlflow refuses it too
    status, answer = _post(stack.a.url, body)
    assert status == 400
    assert set(answer) == {"error_code", "message"}
    assert answer["error_code"] == "BAD_REQUEST"
    assert "Traceback" not in answer["message"]
    if column:
        assert f"column {column}" in answer["message"] or f"columns {column}" in answer["message"]


def test_unsupported_content_type_is_415(stack: Stack) -> None:
    assert _post(stack.a.url, "x", "text/plain")[0] == 415
    assert _post(stack.a.url, "{}", "application/json; charset=latin-1")[0] == 415


def _raw_http(url: str, head: bytes, body_parts: list[bytes]) -> bytes:
    """Send a request by hand while a reader thread collects the answer as it arrives.

    The server answers 413 and closes while we are still sending; the kernel then resets the
    connection, which can discard an answer nobody had read yet. Reading concurrently, as a
    real client does, gets the answer before the reset.
    """
    host, port = url.removeprefix("http://").split(":")
    received: list[bytes] = []
    with socket.create_connection((host, int(port)), timeout=10) as sock:

        def read() -> None:
            with contextlib.suppress(OSError):
                while chunk := sock.recv(65536):
                    received.append(chunk)

        reader = threading.Thread(target=read)
        reader.start()
        with contextlib.suppress(OSError):  # a reset while sending is expected after a 413
            sock.sendall(head)
            for part in body_parts:
                sock.sendall(part)
        reader.join(timeout=10)
    return b"".join(received)


def test_a_body_over_the_limit_is_413_without_reading_it(stack: Stack) -> None:
    # Announced: refused on the headers alone; the body is never sent.
    head = (
        b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (MAX_BODY * 50)
    )
    assert _raw_http(stack.a.url, head, []).startswith(b"HTTP/1.1 413 ")
    # Streamed without a length: refused once the count passes the limit, not at the end.
    head = (
        b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"%x\r\n%s\r\n" % (100_000, b" " * 100_000)
    assert _raw_http(stack.a.url, head, [chunk] * 11).startswith(b"HTTP/1.1 413 ")


def test_requests_too_wide_or_too_long_are_413_naming_the_limit(stack: Stack) -> None:
    """Refused from lengths alone, before pandas parses anything (a 400k-column CSV once cost
    24 s and 1 GB)."""
    wide_csv = ",".join(f"c{i}" for i in range(MAX_COLUMNS + 1)) + "\n" + "1," * MAX_COLUMNS + "1"
    status, doc = _post(stack.a.url, wide_csv, "text/csv")
    assert (status, doc["message"]) == (
        413,
        f"The request has {MAX_COLUMNS + 1} columns; at most {MAX_COLUMNS}.",
    )
    long_csv = "f0\n" + "1\n" * (MAX_ROWS + 1)
    status, doc = _post(stack.a.url, long_csv, "text/csv")
    assert status == 413
    assert f"at most {MAX_ROWS}" in doc["message"]
    wide_json = {
        "dataframe_split": {"columns": [f"c{i}" for i in range(MAX_COLUMNS + 1)], "data": []}
    }
    assert _post(stack.a.url, json.dumps(wide_json))[0] == 413
    long_json = {"dataframe_records": [{"f0": 1}] * (MAX_ROWS + 1)}
    assert _post(stack.a.url, json.dumps(long_json))[0] == 413
    # Within the limits the same shapes are still parsed (and refused by the schema, 400).
    assert _post(stack.a.url, "c0,c1\n1,2", "text/csv")[0] == 400


def test_a_parquet_body_is_measured_from_its_footer() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stagegate.serving.model_server.loader import check_parquet_shape

    sink = io.BytesIO()
    pq.write_table(pa.table({"f0": list(range(MAX_ROWS + 1))}), sink)
    with pytest.raises(ScoringError, match=f"at most {MAX_ROWS}"):
        check_parquet_shape(sink.getvalue())
    small = io.BytesIO()
    pq.write_table(pa.table({"f0": [1, 2]}), small)
    check_parquet_shape(small.getvalue())  # within the limits: no error


# -- batching, metrics, health ---------------------------------------------------------------


async def _burst(url: str, bodies: list[str]) -> list[tuple[int, Any]]:
    async with aiohttp.ClientSession() as session:

        async def one(body: str) -> tuple[int, Any]:
            async with session.post(url + "/invocations", data=body, headers=JSON) as resp:
                return resp.status, await resp.json(content_type=None)

        return await asyncio.gather(*(one(b) for b in bodies))


def _metrics(url: str) -> dict[str, Any]:
    samples = {}
    for family in text_string_to_metric_families(_get(url + "/metrics").decode()):
        for s in family.samples:
            samples[s.name + json.dumps(s.labels, sort_keys=True)] = s.value
    return samples


def test_concurrent_requests_share_predict_calls_and_get_their_own_answers(stack: Stack) -> None:
    frames = [_frame(100 + i, 1 + i % 3) for i in range(64)]
    bodies = [
        json.dumps({"dataframe_split": f.to_dict(orient="split", index=False)}) for f in frames
    ]
    bad = json.dumps({"dataframe_records": [{"f0": 1.0}]})
    bodies[10] = bodies[40] = bad  # refused alone, without failing their batch-mates

    answers = asyncio.run(_burst(stack.a.url, bodies))

    for i, (frame, (status, answer)) in enumerate(zip(frames, answers, strict=True)):
        if i in (10, 40):
            assert status == 400
        else:
            assert (status, answer) == (200, {"predictions": stack.v1.predict(frame).tolist()})
    m = _metrics(stack.a.url)
    batches = m["stagegate_model_batch_requests_count{}"]
    single = m['stagegate_model_batch_requests_bucket{"le": "1.0"}']
    assert batches > single, "no predict call served more than one request"
    assert m['stagegate_model_requests_total{"status": "400"}'] >= 2
    assert m["stagegate_model_queue_depth{}"] == 0
    assert m["stagegate_model_loaded{}"] == 1
    assert m["stagegate_model_predict_errors_total{}"] == 0


def test_health_answered_503_before_the_model_loaded(stack: Stack) -> None:
    # The port opens before mlflow is even imported, so the first probe found it loading.
    assert stack.a.first_health == 503
    assert _status(stack.a.url + "/ping") == 200


def test_health_is_503_while_loading_then_200(tmp_path: Path) -> None:
    release = threading.Event()

    class Echo:
        def parse(self, body: bytes, media_type: str) -> Parsed:
            return Parsed(1, "echo", body)

        def predict(self, batch: Any) -> list[bytes | ScoringError]:
            return [b'{"predictions": %s}' % item.data for item in batch]

    def slow_load() -> LoadedModel:
        assert release.wait(10)
        return LoadedModel(Echo(), {"version": "7"})

    with TestClient(ModelServer(slow_load)) as client:
        assert client.get("/health").status_code == 503
        assert client.post("/invocations", content=b"[1]", headers=JSON).status_code == 503
        release.set()
        deadline = time.monotonic() + 10
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert client.post("/invocations", content=b"[1]", headers=JSON).json() == {
            "predictions": [1]
        }
        assert client.get("/version").json()["version"] == "7"


# -- aliases and graceful shutdown (server B) ------------------------------------------------


def test_alias_uri_serves_the_aliased_version(stack: Stack) -> None:
    version = json.loads(_get(stack.b.url + "/version"))
    assert (version["name"], version["version"], version["alias"]) == (stack.name, "2", "champion")
    frame = _frame(5, 50)
    body = json.dumps({"dataframe_split": frame.to_dict(orient="split", index=False)})
    expected = stack.v2.predict(frame).tolist()
    assert expected != stack.v1.predict(frame).tolist()  # the versions differ on these rows
    assert _post(stack.b.url, body) == (200, {"predictions": expected})


def test_sigterm_answers_requests_in_flight_then_exits_0(stack: Stack) -> None:
    host, port = stack.b.url.removeprefix("http://").split(":")
    frame = _frame(9, 2)
    body = json.dumps({"dataframe_split": frame.to_dict(orient="split", index=False)}).encode()
    head = (
        b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    # Eight requests with half a body sent: in flight for sure when the signal lands.
    socks = [socket.create_connection((host, int(port)), timeout=10) for _ in range(8)]
    for sock in socks:
        sock.sendall(head + body[:50])
    time.sleep(0.3)
    stack.b.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert stack.b.proc.poll() is None, "exited with requests in flight"
    expected = json.dumps({"predictions": stack.v2.predict(frame).tolist()}).replace(" ", "")
    for sock in socks:
        with sock:
            sock.sendall(body[50:])
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        assert received.startswith(b"HTTP/1.1 200 "), received
        assert received.endswith(expected.encode())
    assert stack.b.proc.wait(timeout=STOP_TIMEOUT_S) == 0, stack.b.log_tail()


# -- units: the fast path's batching and the device option ------------------------------------


class _NoFallback:
    def parse(self, body: bytes, media_type: str) -> Parsed:
        raise ScoringError(400, "BAD_REQUEST", "not for this test")

    def parse_document(self, document: Any) -> Parsed:
        raise ScoringError(400, "BAD_REQUEST", "not for this test")

    def predict(self, batch: Any) -> list[bytes | ScoringError]:
        raise AssertionError("not for this test")


def test_a_request_that_fails_predict_does_not_fail_its_batch() -> None:
    calls: list[int] = []

    def predict(rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        calls.append(len(rows))
        if (rows == 13).any():
            raise ValueError("unlucky")
        total: np.ndarray[Any, Any] = rows.sum(axis=1)
        return total

    scorer = NumpyScorer([("a", "double"), ("b", "long")], predict, _NoFallback(), allow_nan=False)
    batch = [
        scorer.parse_document({"dataframe_split": {"columns": ["a", "b"], "data": rows}})
        for rows in ([[1.5, 2]], [[13, 1], [1, 1]], [[0.25, 3], [1, 1]])
    ]
    answers = scorer.predict(batch)
    assert json.loads(answers[0]) == {"predictions": [3.5]}  # type: ignore[arg-type]
    assert isinstance(answers[1], ScoringError)
    assert answers[1].status == 500
    assert "unlucky" not in answers[1].message
    assert json.loads(answers[2]) == {"predictions": [3.25, 2.0]}  # type: ignore[arg-type]
    assert calls == [5, 1, 2, 2]  # merged first, then one at a time


def test_device_option_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    assert model_device.resolve_device("auto") == "cpu"
    assert model_device.resolve_device("CPU") == "cpu"
    with pytest.raises(InvalidInput, match="needs PyTorch"):
        model_device.check_device("cuda:1")
    with pytest.raises(InvalidInput, match="auto, cpu, cuda or cuda:N"):
        model_device.parse_device("gpu")


@pytest.mark.slow
def test_cli_refuses_cuda_without_torch_before_opening_the_port() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; from stagegate.cli import app; "
        "app(['serve-model', 'models:/x/1', '--device', 'cuda', '--port', '1'])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1
    assert "needs PyTorch" in done.stderr
