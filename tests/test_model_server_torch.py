"""The model server's PyTorch fast path on the CPU, against pyfunc's own answers.

Two small MLPs saved by `mlflow.pytorch`: one in mlflow's default pt2 format (tensor signature),
one pickled with a column signature. Loaded in-process for the scorer's own claims; one real
server process (slow) for batching over HTTP.
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pandas as pd
import pytest
import torch
from starlette.testclient import TestClient

from stagegate.errors import PermanentError
from stagegate.serving.model_server.loader import PyfuncScorer, load_model, torch_module_on
from stagegate.serving.model_server.scoring import (
    CONTENT_TYPE_CSV,
    CONTENT_TYPE_JSON,
    CONTENT_TYPE_PARQUET,
    LoadedModel,
    Parsed,
    ScoringError,
)
from stagegate.serving.model_server.server import ModelServer
from stagegate.serving.model_server.torch_model import TorchScorer, answers_agree
from tests.fixtures.mlflow_server import free_port

WIDTH = 16
TOLERANCE = 1e-5
JSON_TYPE = "application/json"


@dataclass(frozen=True)
class Saved:
    pt2: Path  # tensor signature (-1, WIDTH), mlflow's default format
    pickled: Path  # column signature f0..f15
    rows: np.ndarray[Any, Any]


def _mlp() -> Any:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(WIDTH, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)
    ).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    import mlflow.pytorch

    root = tmp_path_factory.mktemp("torch-models")
    rows = np.random.default_rng(1).normal(size=(40, WIDTH))
    net = _mlp()
    mlflow.pytorch.save_model(
        net,
        str(root / "pt2"),
        input_example=rows[:4].astype(np.float32),
        pip_requirements=["torch"],
    )
    frame = pd.DataFrame(rows[:4], columns=[f"f{i}" for i in range(WIDTH)])
    mlflow.pytorch.save_model(
        net,
        str(root / "pickled"),
        input_example=frame,
        serialization_format="pickle",
        pip_requirements=["torch"],
    )
    return Saved(root / "pt2", root / "pickled", rows)


@pytest.fixture(scope="module")
def pt2_model(saved: Saved) -> LoadedModel:
    return load_model(str(saved.pt2), tracking_uri=None, device="cpu")


@pytest.fixture(scope="module")
def pickled_model(saved: Saved) -> Iterator[LoadedModel]:
    # mlflow refuses pickled models unless told they are trusted.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
        yield load_model(str(saved.pickled), tracking_uri=None, device="cpu")


def _scorer(model: LoadedModel) -> TorchScorer:
    assert isinstance(model.scorer, TorchScorer), model.info["fast_path_detail"]
    return model.scorer


def _generic(scorer: TorchScorer) -> PyfuncScorer:
    fallback = scorer._fallback
    assert isinstance(fallback, PyfuncScorer)
    return fallback


def _answer(scorer: Any, body: bytes, media_type: str = CONTENT_TYPE_JSON) -> bytes:
    result = scorer.predict([scorer.parse(body, media_type)])[0]
    assert not isinstance(result, ScoringError), result.message
    assert isinstance(result, bytes)
    return result


def _bodies(rows: np.ndarray[Any, Any], columns: list[str]) -> dict[str, tuple[bytes, str]]:
    """The same rows in every format the server reads."""
    values = rows.tolist()
    frame = pd.DataFrame(rows, columns=columns)
    records = frame.to_dict(orient="records")
    parquet = io.BytesIO()
    frame.to_parquet(parquet)
    docs = {
        "dataframe_split": {"dataframe_split": {"columns": columns, "data": values}},
        "dataframe_records": {"dataframe_records": records},
        "instances": {"instances": records},
    }
    bodies = {k: (json.dumps(v).encode(), CONTENT_TYPE_JSON) for k, v in docs.items()}
    bodies["csv"] = (frame.to_csv(index=False).encode(), CONTENT_TYPE_CSV)
    bodies["parquet"] = (parquet.getvalue(), CONTENT_TYPE_PARQUET)
    return bodies


def _all_bodies(model: LoadedModel, rows: np.ndarray[Any, Any]) -> dict[str, tuple[bytes, str]]:
    scorer = _scorer(model)
    bodies = _bodies(rows, scorer.names)
    if scorer._tensor:
        bodies["inputs"] = (json.dumps({"inputs": rows.tolist()}).encode(), CONTENT_TYPE_JSON)
        bodies["instances"] = (json.dumps({"instances": rows.tolist()}).encode(), CONTENT_TYPE_JSON)
    else:
        columns = {name: rows[:, i].tolist() for i, name in enumerate(scorer.names)}
        bodies["inputs"] = (json.dumps({"inputs": columns}).encode(), CONTENT_TYPE_JSON)
    return bodies


# -- in-process: the scorer -------------------------------------------------------------------


@pytest.mark.parametrize("which", ["pt2_model", "pickled_model"])
def test_every_format_takes_the_fast_path_and_answers_as_pyfunc(
    which: str, saved: Saved, request: pytest.FixtureRequest
) -> None:
    model: LoadedModel = request.getfixturevalue(which)
    assert model.info["fast_path"] == "torch"
    scorer = _scorer(model)
    for name, (body, media_type) in _all_bodies(model, saved.rows[:7]).items():
        parsed = scorer.parse(body, media_type)
        assert parsed.group == "numpy", name
        assert parsed.rows == 7, name
        got = _answer(scorer, body, media_type)
        assert (
            answers_agree(got, _reference(model, saved.rows[:7], body, media_type), TOLERANCE) == ""
        ), name
        assert len(json.loads(got)["predictions"]) == 7


def _reference(
    model: LoadedModel, rows: np.ndarray[Any, Any], body: bytes, media_type: str
) -> bytes:
    """pyfunc's answer. For a tensor signature mlflow reads neither CSV nor Parquet (it refuses a
    float64 frame), so its answer to the same rows as `inputs` stands in for theirs."""
    scorer = _scorer(model)
    if scorer._tensor and media_type != CONTENT_TYPE_JSON:
        body, media_type = json.dumps({"inputs": rows.tolist()}).encode(), CONTENT_TYPE_JSON
    return _answer(_generic(scorer), body, media_type)


def test_pickled_column_model_answers_records_like_pyfunc(pickled_model: LoadedModel) -> None:
    body = json.dumps({"dataframe_records": [{f"f{i}": 0.5 for i in range(WIDTH)}]}).encode()
    answer = json.loads(_answer(_scorer(pickled_model), body))
    assert list(answer["predictions"][0]) == ["0"]  # pyfunc writes DataFrame(preds) as records


def test_a_micro_batch_of_every_format_is_one_forward_pass(
    pt2_model: LoadedModel, saved: Saved
) -> None:
    scorer = _scorer(pt2_model)
    calls: list[int] = []
    hook = scorer.module.register_forward_hook(lambda _m, args, _out: calls.append(len(args[0])))
    rows = saved.rows[:3]
    bodies = list(_all_bodies(pt2_model, rows).values())
    pairs = [(rows, body) for body in bodies]
    for i in range(0, 12, 2):  # several `inputs` requests, as a burst of clients sends them
        chunk = saved.rows[i : i + 2]
        pairs.append((chunk, (json.dumps({"inputs": chunk.tolist()}).encode(), CONTENT_TYPE_JSON)))
    try:
        batch = [scorer.parse(body, media_type) for _, (body, media_type) in pairs]
        answers = scorer.predict(batch)
    finally:
        hook.remove()
    assert calls == [sum(p.rows for p in batch)], "the micro-batch was not one forward pass"
    for (chunk, (body, media_type)), got in zip(pairs, answers, strict=True):
        assert isinstance(got, bytes)
        want = _reference(pt2_model, chunk, body, media_type)
        assert answers_agree(got, want, TOLERANCE) == ""


def test_many_rows_equal_pyfunc_predict(pt2_model: LoadedModel, saved: Saved) -> None:
    import mlflow.pyfunc

    pyfunc = mlflow.pyfunc.load_model(str(saved.pt2), model_config={"device": "cpu"})
    rows = np.random.default_rng(7).normal(size=(500, WIDTH)).astype(np.float32)
    got = json.loads(_answer(_scorer(pt2_model), json.dumps({"inputs": rows.tolist()}).encode()))
    want = pyfunc.predict(rows)
    np.testing.assert_allclose(np.array(got["predictions"]), want, rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ({"inputs": [[1.0] * (WIDTH - 1)]}, f"rows of {WIDTH} numbers"),
        ({"inputs": [[1.0] * WIDTH, [1.0] * (WIDTH + 2)]}, f"a row holds {WIDTH + 2}"),
        ({"inputs": [["a"] * WIDTH]}, "column '0' expects double values, but row 0 has string"),
        ({"inputs": [[1.0] * (WIDTH - 1) + [float("inf")]]}, "infinite value"),
        ({"nonsense": [[1.0] * WIDTH]}, "exactly one of the input fields"),
    ],
)
def test_bad_input_is_400_with_its_reason(
    pt2_model: LoadedModel, document: dict[str, Any], reason: str
) -> None:
    body = json.dumps(document).encode()
    with pytest.raises(ScoringError) as caught:
        _scorer(pt2_model).parse(body, CONTENT_TYPE_JSON)
    assert caught.value.status == 400
    assert reason in caught.value.message


def test_a_missing_column_is_400_naming_it(pickled_model: LoadedModel) -> None:
    frame = pd.DataFrame([[0.5] * (WIDTH - 1)], columns=[f"f{i}" for i in range(1, WIDTH)])
    with pytest.raises(ScoringError) as caught:
        _scorer(pickled_model).parse(frame.to_csv(index=False).encode(), CONTENT_TYPE_CSV)
    assert caught.value.status == 400
    assert "'f0'" in caught.value.message


def test_pt2_program_is_moved_to_the_device_by_the_export_pass(
    pt2_model: LoadedModel, saved: Saved
) -> None:
    # The `--device cuda` code path for pt2, run on the device this machine has.
    moved = torch_module_on(str(saved.pt2 / "data" / "model.pt2"), "cpu", torch)
    x = torch.from_numpy(saved.rows[:5].astype(np.float32))
    with torch.inference_mode():
        np.testing.assert_allclose(moved(x).numpy(), _scorer(pt2_model).module(x).numpy())
    with pytest.raises(PermanentError, match="serialization_format='pickle'"):
        torch_module_on(str(saved.pt2 / "MLmodel"), "cpu", torch)


# -- a real server process ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(saved: Saved, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("torch-server") / "server.log"
    argv = [sys.executable, "-m", "stagegate.cli", "serve-model", str(saved.pt2)]
    argv += ["--port", str(port), "--device", "cpu", "--max-wait-ms", "20"]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while _status(url + "/health") != 200:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read()


async def _burst(url: str, bodies: list[bytes]) -> list[tuple[int, Any]]:
    async with aiohttp.ClientSession() as session:

        async def one(body: bytes) -> tuple[int, Any]:
            headers = {"content-type": "application/json"}
            async with session.post(url + "/invocations", data=body, headers=headers) as r:
                return r.status, await r.json(content_type=None)

        return await asyncio.gather(*(one(b) for b in bodies))


def _batch_counts(url: str) -> tuple[float, float]:
    from prometheus_client.parser import text_string_to_metric_families

    samples = {
        s.name + json.dumps(s.labels, sort_keys=True): s.value
        for family in text_string_to_metric_families(_get(url + "/metrics").decode())
        for s in family.samples
    }
    return (
        samples["stagegate_model_batch_requests_count{}"],
        samples['stagegate_model_batch_requests_bucket{"le": "1.0"}'],
    )


@pytest.mark.slow
def test_server_merges_concurrent_inputs_requests_and_answers_as_pyfunc(
    server: str, saved: Saved
) -> None:
    import mlflow.pyfunc

    version = json.loads(_get(server + "/version"))
    assert (version["fast_path"], version["device"]) == ("torch", "cpu")
    pyfunc = mlflow.pyfunc.load_model(str(saved.pt2), model_config={"device": "cpu"})
    chunks = [saved.rows[i % 20 : i % 20 + 1 + i % 3] for i in range(48)]
    bodies = [json.dumps({"inputs": chunk.tolist()}).encode() for chunk in chunks]
    bodies[5] = json.dumps({"inputs": [[1.0] * 3]}).encode()  # refused alone

    answers = asyncio.run(_burst(server, bodies))

    for i, (chunk, (status, answer)) in enumerate(zip(chunks, answers, strict=True)):
        if i == 5:
            assert status == 400
            assert f"rows of {WIDTH} numbers" in answer["message"]
            continue
        assert status == 200, answer
        want = pyfunc.predict(chunk.astype(np.float32))
        got = np.array(answer["predictions"])
        np.testing.assert_allclose(got, want, rtol=TOLERANCE, atol=TOLERANCE)
    batches, single = _batch_counts(server)
    assert batches > single, "no forward pass served more than one request"


@pytest.mark.slow
def test_server_reads_csv_and_parquet_as_tensor_rows(server: str, saved: Saved) -> None:
    frame = pd.DataFrame(saved.rows[:6], columns=[str(i) for i in range(WIDTH)])
    parquet = io.BytesIO()
    frame.to_parquet(parquet)
    for body, media_type in [
        (frame.to_csv(index=False).encode(), CONTENT_TYPE_CSV),
        (parquet.getvalue(), CONTENT_TYPE_PARQUET),
    ]:
        request = urllib.request.Request(
            server + "/invocations", data=body, headers={"content-type": media_type}
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            got = json.loads(resp.read())
        assert len(got["predictions"]) == 6
        want = _answer(
            _generic_for(saved), json.dumps({"inputs": frame.to_numpy().tolist()}).encode()
        )
        assert answers_agree(json.dumps(got).encode(), want, TOLERANCE) == ""


def _generic_for(saved: Saved) -> PyfuncScorer:
    import mlflow.pyfunc

    return PyfuncScorer(mlflow.pyfunc.load_model(str(saved.pt2), model_config={"device": "cpu"}))


def test_parsed_requests_are_numpy_blocks_parsed_off_the_event_loop(
    pt2_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    scorer = _scorer(pt2_model)
    parse = scorer.parse
    on_loop: list[bool] = []

    def recording(body: bytes, media_type: str) -> Parsed:
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return parse(body, media_type)

    monkeypatch.setattr(scorer, "parse", recording)
    body = json.dumps({"inputs": [[0.25] * WIDTH]}).encode()  # small: would be parsed inline
    with TestClient(ModelServer(lambda: pt2_model)) as client:
        deadline = time.monotonic() + 10
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        answer = client.post(
            "/invocations", content=body, headers={"content-type": "application/json"}
        )
    assert answer.status_code == 200
    assert len(answer.json()["predictions"]) == 1
    assert on_loop == [False], "the body was parsed on the event loop"
    parsed = parse(body, CONTENT_TYPE_JSON)
    assert isinstance(parsed.data, np.ndarray)
    assert parsed.data.shape == (1, WIDTH)
