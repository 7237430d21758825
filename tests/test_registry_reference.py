"""Reference data: `load_reference` / `describe_reference` against a real MLflow server, and the
same cases on `FakeRegistry` (which reads dataset sources with the same code)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.data
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from stagegate.errors import InvalidInput, NoReference, NotFoundError, RetryableError
from stagegate.registry import reference
from stagegate.registry.mlflow import MlflowRegistry, log_reference
from stagegate.registry.protocol import DatasetRef, ModelRegistry
from tests.fakes import FakeRegistry
from tests.fixtures.mlflow_server import MlflowServer, _tracking_uri
from tests.test_outbound import Listener

_counter = iter(range(1, 100_000))


def training_frame(rows: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "amount": rng.normal(100, 15, rows),
            "country": rng.choice(["de", "fr", "it"], rows),
            "age": rng.integers(18, 90, rows),
            "target": rng.integers(0, 2, rows),
        }
    )


def as_table(frame: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(frame, preserve_index=False)


@pytest.fixture
def listener() -> Iterator[Listener]:
    with Listener() as running:
        yield running


@pytest.fixture(scope="module")
def client(mlflow_server: MlflowServer) -> MlflowClient:
    return MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)


# A dataset as a data scientist logs it: `mlflow.data.from_pandas(frame, source=...)`.
Dataset = tuple[str, str | None, str]  # (name, source, context)


@dataclass
class Made:
    registry: ModelRegistry
    name: str
    version: int
    run_id: str


class MlflowSide:
    """Versions made as a data scientist makes them: a run, then a registered version."""

    def __init__(self, server: MlflowServer, client: MlflowClient) -> None:
        self.server, self.client = server, client

    def make(
        self,
        *,
        reference: Any = None,
        datasets: tuple[Dataset, ...] = (),
        log: Callable[[], None] | None = None,
        **registry_kwargs: Any,
    ) -> Made:
        with _tracking_uri(self.server.url), mlflow.start_run() as run:
            if reference is not None:
                log_reference(reference)
            for name, source, context in datasets:
                # MLflow keeps one dataset per (experiment, name, digest), with the source it
                # was first logged with: a fresh frame gives each case its own source.
                frame = training_frame(5, seed=next(_counter))
                data: Any = mlflow.data
                mlflow.log_input(data.from_pandas(frame, source=source, name=name), context=context)
            if log is not None:
                log()
        run_id = str(run.info.run_id)
        name = f"ref-model-{next(_counter)}"
        self.client.create_registered_model(name)
        mv = self.client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run_id)
        registry = MlflowRegistry(self.server.url, **registry_kwargs)
        return Made(registry, name, int(mv.version), run_id)


class FakeSide:
    """The same cases on `FakeRegistry`: `references` stands for what `log_reference` logged,
    and dataset sources are stored as MLflow stores them."""

    def make(
        self,
        *,
        reference: Any = None,
        datasets: tuple[Dataset, ...] = (),
        log: Callable[[], None] | None = None,
        **registry_kwargs: Any,
    ) -> Made:
        assert log is None, "not modelled by the fake"
        assert not registry_kwargs, "not modelled by the fake"
        fake = FakeRegistry()
        name = f"ref-model-{next(_counter)}"
        refs = tuple(
            DatasetRef(ds_name, f"d{i}", _mlflow_source_json(source), context)
            for i, (ds_name, source, context) in enumerate(datasets)
        )
        fake.add(name, 1, datasets=refs)
        if reference is not None:
            table = reference if isinstance(reference, pa.Table) else as_table(reference)
            fake.references[(name, 1)] = table
        return Made(fake, name, 1, "run1")


def _mlflow_source_json(source: str | None) -> str:
    if source is None:
        return json.dumps({"tags": {"mlflow.source.type": "LOCAL"}})  # a code source
    if source.startswith(("http:", "https:")):
        return json.dumps({"url": source})
    return json.dumps({"uri": source})


@pytest.fixture(params=["mlflow", "fake"])
def side(
    request: pytest.FixtureRequest, mlflow_server: MlflowServer, client: MlflowClient
) -> MlflowSide | FakeSide:
    # Both sides name the server fixture, so every case here counts as starting a process.
    return MlflowSide(mlflow_server, client) if request.param == "mlflow" else FakeSide()


@pytest.fixture
def mlflow_side(mlflow_server: MlflowServer, client: MlflowClient) -> MlflowSide:
    return MlflowSide(mlflow_server, client)


def load(made: Made) -> pa.Table:
    return made.registry.load_reference(made.name, made.version)


def describe(made: Made) -> str | None:
    return made.registry.describe_reference(made.name, made.version)


# -- the artifact convention -----------------------------------------------------------------


def test_logged_frame_reads_back_equal(side: MlflowSide | FakeSide) -> None:
    frame = training_frame()
    made = side.make(reference=frame)

    got = load(made)

    assert got.schema.remove_metadata() == as_table(frame).schema.remove_metadata()
    assert got.equals(as_table(frame))
    assert describe(made) == f"runs:/{made.run_id}/stagegate/reference"


def test_logged_arrow_table_keeps_its_types(mlflow_side: MlflowSide) -> None:
    table = pa.table(
        {
            "small": pa.array([1, 2, None], pa.int8()),
            "city": pa.array(["a", "b", "a"]).dictionary_encode(),
            "at": pa.array([0, 1, 2], pa.timestamp("ms", tz="UTC")),
            "score": pa.array([0.5, None, 1.5]),
        }
    )
    made = mlflow_side.make(reference=table)

    got = load(made)

    assert got.schema.remove_metadata() == table.schema
    assert got.equals(table)


def test_artifact_wins_over_datasets_and_drops_the_pandas_index(
    mlflow_side: MlflowSide, tmp_path: Path
) -> None:
    other = tmp_path / "other.parquet"
    training_frame(7, seed=9).to_parquet(other)
    frame = training_frame().set_index("age")  # a real index: not a feature, not kept
    made = mlflow_side.make(reference=frame, datasets=(("train", str(other), "training"),))

    got = load(made)

    assert got.column_names == ["amount", "country", "target"]
    assert got.num_rows == 300


def test_a_folder_of_parquet_files_is_one_table(mlflow_side: MlflowSide, tmp_path: Path) -> None:
    frame = training_frame(90)
    parts = tmp_path / "parts"
    (parts / "b").mkdir(parents=True)
    pq.write_table(as_table(frame.iloc[:30]), parts / "a-0.parquet")
    pq.write_table(as_table(frame.iloc[30:60]), parts / "a-1.parquet")
    pq.write_table(as_table(frame.iloc[60:]), parts / "b" / "c.parquet")
    (parts / "README.txt").write_text("not data")
    made = mlflow_side.make(log=lambda: mlflow.log_artifacts(str(parts), "stagegate/reference"))

    assert load(made).equals(as_table(frame))


def test_artifact_over_the_cap_is_refused(mlflow_side: MlflowSide) -> None:
    made = mlflow_side.make(reference=training_frame(), reference_max_bytes=1000)

    with pytest.raises(NoReference, match=r"over the 0\.00 GiB reference cap"):
        load(made)


def test_unreadable_parquet_artifact_is_no_reference(
    mlflow_side: MlflowSide, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    made = mlflow_side.make(log=lambda: mlflow.log_artifact(str(bad), "stagegate/reference"))

    with pytest.raises(NoReference, match="not readable as Parquet"):
        load(made)


def test_log_reference_needs_a_run_and_a_frame(mlflow_server: MlflowServer) -> None:
    with _tracking_uri(mlflow_server.url):
        with pytest.raises(InvalidInput, match="active MLflow run"):
            log_reference(training_frame(3))
        with mlflow.start_run():
            with pytest.raises(InvalidInput, match="DataFrame or a pyarrow Table"):
                log_reference([[1, 2]])
            with pytest.raises(InvalidInput, match=r"without '\.\.'"):
                log_reference(training_frame(3), artifact_path="stagegate/../../x")


# -- the dataset-source fallback -------------------------------------------------------------


@pytest.mark.parametrize("as_uri", [False, True])
def test_local_parquet_dataset_source(
    side: MlflowSide | FakeSide, tmp_path: Path, as_uri: bool
) -> None:
    frame = training_frame()
    path = tmp_path / "train.parquet"
    frame.to_parquet(path, index=False)
    source = f"file://{path}" if as_uri else str(path)
    made = side.make(datasets=(("train", source, "training"),))

    assert load(made).equals(as_table(frame))
    assert describe(made) == source


def test_local_csv_dataset_source(side: MlflowSide | FakeSide, tmp_path: Path) -> None:
    frame = training_frame(50)
    path = tmp_path / "train.csv"
    frame.to_csv(path, index=False)
    made = side.make(datasets=(("train", str(path), "training"),))

    got = load(made)

    assert got.column_names == list(frame.columns)
    assert got.column("country").to_pylist() == frame["country"].tolist()
    assert got.column("age").to_pylist() == frame["age"].tolist()
    np.testing.assert_allclose(got.column("amount").to_numpy(), frame["amount"].to_numpy())


def test_training_context_is_preferred(side: MlflowSide | FakeSide, tmp_path: Path) -> None:
    evaluation, train = tmp_path / "eval.parquet", tmp_path / "train.parquet"
    training_frame(11, seed=1).to_parquet(evaluation, index=False)
    training_frame(22, seed=2).to_parquet(train, index=False)
    made = side.make(
        datasets=(
            ("eval", str(evaluation), "evaluation"),
            ("code", None, "training"),  # no location: skipped for the next training dataset
            ("train", str(train), "training"),
        )
    )

    assert load(made).num_rows == 22
    assert describe(made) == str(train)


def test_without_training_context_any_dataset(side: MlflowSide | FakeSide, tmp_path: Path) -> None:
    path = tmp_path / "eval.parquet"
    training_frame(11).to_parquet(path, index=False)
    made = side.make(datasets=(("eval", str(path), "evaluation"),))

    assert load(made).num_rows == 11


def test_folder_dataset_source(side: MlflowSide | FakeSide, tmp_path: Path) -> None:
    folder = tmp_path / "train"
    folder.mkdir()
    training_frame(10, seed=1).to_parquet(folder / "part-0.parquet", index=False)
    training_frame(15, seed=2).to_parquet(folder / "part-1.parquet", index=False)
    made = side.make(datasets=(("train", str(folder), "training"),))

    assert load(made).num_rows == 25


def test_a_folder_is_walked_within_bounds(
    side: MlflowSide | FakeSide, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "train"
    (folder / "sub").mkdir(parents=True)
    training_frame(10).to_parquet(folder / "sub" / "part-0.parquet", index=False)
    (folder / "linked.parquet").symlink_to(folder / "sub" / "part-0.parquet")  # not followed
    made = side.make(datasets=(("train", str(folder), "training"),))
    assert load(made).num_rows == 10

    monkeypatch.setattr(reference, "MAX_FOLDER_ENTRIES", 2)
    with pytest.raises(NoReference, match="holds over 2 entries"):
        load(made)


# -- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("file:///tmp/../etc/passwd", "path traversal"),
        ("file:///tmp/%2e%2e/etc/passwd", "path traversal"),
        ("s3://bucket/train.parquet", "'s3://bucket/train.parquet' is not a local file or an http"),
        ("gs://bucket/train.parquet", "not a local file or an http"),
        ("http://169.254.169.254/latest/train.csv", "cloud metadata"),
        ("http://metadata.google.internal/train.csv", "cloud metadata service"),
        ("http://[::ffff:169.254.169.254]/train.csv", "cloud metadata"),
        ("http://10.1.2.3/train.csv", "private"),
        ("/etc/passwd", "not a Parquet (.parquet, .pq) or CSV (.csv) file"),
        ("/nonexistent/train.parquet", "does not exist on this machine"),
        (None, "names no file or URL"),
    ],
)
def test_refused_sources_say_why(
    side: MlflowSide | FakeSide, source: str | None, reason: str
) -> None:
    made = side.make(datasets=(("train", source, "training"),))

    with pytest.raises(NoReference) as info:
        load(made)
    assert reason in info.value.detail
    assert f"{made.name}/{made.version}" in info.value.detail


def test_a_symlink_is_judged_by_its_target(side: MlflowSide | FakeSide, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("a,b\n1,2\n")
    link = tmp_path / "train.csv"
    link.symlink_to(secret)
    made = side.make(datasets=(("train", str(link), "training"),))

    with pytest.raises(NoReference, match="not a Parquet"):
        load(made)


def test_nothing_to_read_is_no_reference(side: MlflowSide | FakeSide) -> None:
    made = side.make()

    with pytest.raises(NoReference, match="no Parquet under stagegate/reference/ and no datasets"):
        load(made)
    assert describe(made) is None


def test_unsupported_sources_describe_as_none(side: MlflowSide | FakeSide) -> None:
    made = side.make(datasets=(("train", "s3://bucket/x.parquet", "training"),))
    assert describe(made) is None


def test_unknown_versions_and_names(side: MlflowSide | FakeSide) -> None:
    made = side.make()
    with pytest.raises(NotFoundError):
        made.registry.load_reference(made.name, 99)
    with pytest.raises(NotFoundError):
        made.registry.describe_reference(made.name, 99)


def test_invalid_names_never_reach_mlflow(mlflow_registry: MlflowRegistry) -> None:
    with pytest.raises(InvalidInput):
        mlflow_registry.load_reference("../x", 1)
    with pytest.raises(InvalidInput):
        mlflow_registry.describe_reference("churn", 0)


# -- http(s) sources, against a real local listener ------------------------------------------


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(as_table(frame), sink)
    return bytes(sink.getvalue())


def test_http_source_on_a_private_host_is_refused_before_any_request(
    side: MlflowSide | FakeSide, listener: Listener
) -> None:
    listener.routes["/train.csv"] = (200, {"Content-Type": "text/csv"}, b"a,b\n1,2\n")
    for host in ("127.0.0.1", "localhost", "2130706433", "[::ffff:127.0.0.1]"):
        made = side.make(
            datasets=(("train", f"http://{host}:{listener.port}/train.csv", "training"),)
        )
        with pytest.raises(NoReference, match="loopback"):
            load(made)
    assert listener.requests == []


def test_http_source_allowed_on_private_hosts_by_setting(
    mlflow_side: MlflowSide, listener: Listener
) -> None:
    frame = training_frame(40)
    listener.routes["/data/train"] = (200, {}, _parquet_bytes(frame))  # Parquet by its bytes
    listener.routes["/train.csv"] = (200, {}, frame.to_csv(index=False).encode())
    listener.routes["/moved"] = (302, {"Location": "/data/train"}, b"")
    base = f"http://localhost:{listener.port}"

    for path in ("/data/train", "/moved"):
        made = mlflow_side.make(
            datasets=(("train", base + path, "training"),), reference_allow_private=True
        )
        assert load(made).equals(as_table(frame))
        assert describe(made) == base + path
    made = mlflow_side.make(
        datasets=(("train", base + "/train.csv", "training"),), reference_allow_private=True
    )
    assert load(made).column("country").to_pylist() == frame["country"].tolist()
    assert listener.requests == [
        ("/data/train", f"localhost:{listener.port}"),
        ("/moved", f"localhost:{listener.port}"),
        ("/data/train", f"localhost:{listener.port}"),
        ("/train.csv", f"localhost:{listener.port}"),
    ]


@pytest.mark.parametrize(
    ("route", "error", "reason"),
    [
        ((302, {"Location": "http://169.254.169.254/latest/x.csv"}, b""), NoReference, "metadata"),
        ((302, {"Location": "file:///etc/passwd"}, b""), NoReference, "scheme 'file'"),
        ((302, {"Location": "/loop"}, b""), NoReference, "more than 3 redirects"),
        ((404, {}, b"gone"), NoReference, "answered 404"),
        ((403, {}, b"no"), NoReference, "answered 403"),
        ((503, {}, b"later"), RetryableError, "answered 503"),
        ((200, {"Content-Type": "text/html"}, b"<html></html>"), NoReference, "neither Parquet"),
        ((200, {"X-No-Length": "1"}, b"x" * 5000), NoReference, "over the 0.00 GiB reference cap"),
        ((200, {}, b"x" * 5000), NoReference, "over the 0.00 GiB reference cap"),
    ],
)
def test_http_source_failures(
    mlflow_side: MlflowSide,
    listener: Listener,
    route: tuple[int, dict[str, str], bytes],
    error: type[Exception],
    reason: str,
) -> None:
    listener.routes["/loop"] = route
    made = mlflow_side.make(
        datasets=(("train", f"http://localhost:{listener.port}/loop", "training"),),
        reference_allow_private=True,
        reference_max_bytes=4096,
    )

    with pytest.raises(error) as info:
        load(made)
    assert reason in str(info.value)
    assert listener.requests[0][0] == "/loop"


def test_local_roots_confine_local_sources(mlflow_side: MlflowSide, tmp_path: Path) -> None:
    inside, outside = tmp_path / "data", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    training_frame(5).to_parquet(inside / "t.parquet", index=False)
    training_frame(5).to_parquet(outside / "t.parquet", index=False)

    ok = mlflow_side.make(
        datasets=(("t", str(inside / "t.parquet"), "training"),), reference_local_roots=[inside]
    )
    refused = mlflow_side.make(
        datasets=(("t", str(outside / "t.parquet"), "training"),), reference_local_roots=[inside]
    )

    assert load(ok).num_rows == 5
    with pytest.raises(NoReference, match="outside the allowed folders"):
        load(refused)


def test_a_version_without_a_run_has_no_reference(
    mlflow_registry: MlflowRegistry, client: MlflowClient
) -> None:
    name = f"ref-model-{next(_counter)}"
    client.create_registered_model(name)
    version = int(client.create_model_version(name, "s3://bucket/model").version)

    with pytest.raises(NoReference, match="has no training run"):
        mlflow_registry.load_reference(name, version)
    assert mlflow_registry.describe_reference(name, version) is None
