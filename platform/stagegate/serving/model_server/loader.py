"""Loads an MLflow pyfunc model for the model server; the only serving module that imports mlflow.

Every model is served through pyfunc, with mlflow's own request parsing and answer encoding,
so answers match `mlflow models serve`. sklearn models on numeric columns also get the numpy
fast path (`model_numpy`), switched on only after it answered a probe exactly as pyfunc did.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import time
import warnings
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from io import BytesIO, StringIO
from pathlib import Path
from typing import Any

import mlflow
import mlflow.artifacts
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.pyfunc import scoring_server as _scoring_server
from mlflow.store.artifact.models_artifact_repo import REGISTERED_MODEL_META_FILE_NAME
from mlflow.types import DataType

from stagegate.artifacts import tree_digest
from stagegate.errors import PermanentError
from stagegate.serving.model_server.device import parse_device, resolve_device
from stagegate.serving.model_server.numpy_model import FAST_GROUP, ColumnType, NumpyScorer
from stagegate.serving.model_server.scoring import (
    CONTENT_TYPE_CSV,
    CONTENT_TYPE_JSON,
    MAX_COLUMNS,
    MAX_ROWS,
    LoadedModel,
    Parsed,
    Scorer,
    ScoringError,
    bad_request,
    check_csv_shape,
    decode_json,
    predict_failed,
    too_big,
)
from stagegate.serving.model_server.torch_model import FAST_PATH as TORCH_FAST_PATH
from stagegate.serving.model_server.torch_model import TorchScorer, answers_agree

logger = logging.getLogger(__name__)

FAST_PATH = "sklearn-numpy"
# mlflow's scoring-server helpers carry no annotations; reached through Any to keep mypy strict.
scoring_server: Any = _scoring_server
_COLUMN_TYPES: dict[DataType, ColumnType] = {DataType.double: "double", DataType.long: "long"}
# pyfunc hands a PyTorch model `frame.to_numpy(float32)`: any numeric column reads the same way.
_TORCH_COLUMN_TYPES: dict[DataType, ColumnType] = {
    DataType.double: "double",
    DataType.float: "double",
    DataType.long: "long",
    DataType.integer: "long",
}


def load_model(
    model_uri: str, *, tracking_uri: str | None, device: str, expect_digest: str | None = None
) -> LoadedModel:
    """Resolve, download and load `model_uri`; pick the fastest scorer that answers as pyfunc.

    With `expect_digest`, the downloaded tree must hash to it (`stagegate.artifacts`) before
    anything in it is loaded: an artifact swapped after its approval is never unpickled.
    """
    started = time.perf_counter()
    if tracking_uri:
        # `models:/` URIs resolve against mlflow's process-global registry URI.
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    load_uri, name, version, alias = _resolve(model_uri)
    local_path = mlflow.artifacts.download_artifacts(artifact_uri=load_uri)
    if expect_digest is not None:
        # A `models:/` download adds a file the client writes from the registry's answer
        # (name and version); it is not in the artifact store, so not in the approved digest.
        found = tree_digest(Path(local_path), skip=frozenset({REGISTERED_MODEL_META_FILE_NAME}))
        if found != expect_digest:
            raise PermanentError(
                f"{model_uri}: artifact digest {found} is not the approved {expect_digest}; "
                "refusing to load it"
            )
    meta: Any = Model.load(os.path.join(local_path, "MLmodel"))
    conf = meta.flavors.get("python_function")
    if conf is None:
        raise PermanentError(f"{model_uri} has no python_function flavor: pyfunc cannot serve it")

    used_device = "cpu"
    pt2 = _pt2_path(local_path, conf)
    if conf.get("loader_module") == "mlflow.pytorch":
        used_device = resolve_device(device)
        pyfunc_model, pyfunc_device = _load_pytorch_pyfunc(local_path, used_device, pt2)
    else:
        if parse_device(device).startswith("cuda"):
            logger.warning(
                "--device %s ignored: %s models run on the CPU", device, conf["loader_module"]
            )
        pyfunc_model = mlflow.pyfunc.load_model(local_path)
    generic = PyfuncScorer(pyfunc_model)
    scorer: Scorer = generic
    fast: Scorer | None
    fast_name = FAST_PATH
    if conf.get("loader_module") == "mlflow.pytorch":
        # A pt2 program pyfunc holds on another device is moved for the fast path.
        move_from = pt2 if pyfunc_device != used_device else None
        fast, why = _torch_scorer(meta, pyfunc_model, generic, used_device, move_from)
        fast_name = TORCH_FAST_PATH
    else:
        fast, why = _numpy_scorer(meta, pyfunc_model, generic)
    if fast is not None:
        scorer = fast
    logger.info(
        "loaded %s (%s) in %.1f s; fast path: %s",
        model_uri,
        load_uri,
        time.perf_counter() - started,
        why,
    )
    info = {
        "model_uri": model_uri,
        "resolved_uri": load_uri,
        "name": name,
        "version": version,
        "alias": alias,
        "run_id": meta.run_id,
        "model_id": getattr(meta, "model_id", None),
        "flavors": sorted(meta.flavors),
        "loader_module": conf.get("loader_module"),
        "fast_path": fast_name if fast is not None else None,
        "fast_path_detail": why,
        "device": used_device,
        "digest_checked": expect_digest,
        "mlflow_version": mlflow.__version__,
    }
    return LoadedModel(scorer=scorer, info=info)


def _resolve(model_uri: str) -> tuple[str, str | None, str | None, str | None]:
    """(URI to load, name, version, alias): an alias or stage is pinned to its version once,
    so what is loaded and what `/version` reports cannot drift apart."""
    if not model_uri.startswith("models:/"):
        return model_uri, None, None, None
    from mlflow.store.artifact.utils.models import _parse_model_uri, get_model_name_and_version

    parsed = _parse_model_uri(model_uri)
    if parsed.model_id is not None:
        return model_uri, None, None, None
    resolve: Any = get_model_name_and_version
    name, version = resolve(mlflow.MlflowClient(), model_uri)
    return f"models:/{name}/{version}", str(name), str(version), parsed.alias


# -- the generic scorer: pyfunc, parsed and encoded by mlflow's scoring server -----------------


@dataclass(frozen=True, slots=True)
class _Input:
    data: Any
    params: dict[str, Any] | None
    unwrapped: bool  # a unified LLM request: answered without the "predictions" wrapper


class PyfuncScorer:
    """Any pyfunc model, exactly as `mlflow models serve` parses, predicts and answers."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self._metadata = model.metadata
        self._schema = model.metadata.get_input_schema()

    def parse(self, body: bytes, media_type: str) -> Parsed:
        if media_type == CONTENT_TYPE_JSON:
            return self.parse_document(decode_json(body))
        with _client_errors():
            if media_type == CONTENT_TYPE_CSV:
                check_csv_shape(body)
                text = body.decode("utf-8")
                frame = scoring_server.parse_csv_input(
                    csv_input=StringIO(text), schema=self._schema
                )
            else:
                check_parquet_shape(body)
                frame = scoring_server.parse_parquet_input(parquet_input=BytesIO(body))
        return self._parsed(_Input(frame, None, unwrapped=False))

    def parse_document(self, document: Any) -> Parsed:
        if not isinstance(document, dict):
            got = "a list" if isinstance(document, list) else f"a {type(document).__name__}"
            raise bad_request(
                f"Invalid input. {scoring_server.REQUIRED_INPUT_FORMAT}. Received {got}."
            )
        with _client_errors():
            parsed = scoring_server._parse_json_data(document, self._metadata, self._schema)
        return self._parsed(_Input(parsed.data, parsed.params, parsed.is_unified_llm_input))

    def _parsed(self, item: _Input) -> Parsed:
        data = item.data
        group: Hashable | None = None
        if isinstance(data, pd.DataFrame) and not item.params and not item.unwrapped:
            # Frames with the same columns and dtypes can be concatenated into one predict.
            group = ("frame", tuple(map(str, data.columns)), tuple(map(str, data.dtypes)))
        rows = len(data) if isinstance(data, (pd.DataFrame, np.ndarray, list)) else 1
        return Parsed(max(rows, 1), group, item)

    def predict(self, batch: Sequence[Parsed]) -> list[bytes | ScoringError]:
        results: list[bytes | ScoringError | None] = [None] * len(batch)
        groups: dict[Hashable, list[int]] = {}
        for i, item in enumerate(batch):
            if item.group is None:
                results[i] = self._predict_one(item.data)
            else:
                groups.setdefault(item.group, []).append(i)
        for indexes in groups.values():
            answers = self._predict_frames([batch[i] for i in indexes])
            for i, answer in zip(indexes, answers, strict=True):
                results[i] = answer
        return [r if r is not None else predict_failed() for r in results]

    def _predict_frames(self, items: list[Parsed]) -> list[bytes | ScoringError]:
        if len(items) == 1:
            return [self._predict_one(items[0].data)]
        merged = pd.concat([item.data.data for item in items], ignore_index=True)
        try:
            parts = _split(self._model.predict(merged, params=None), [i.rows for i in items])
            if parts is not None:
                return [_encode(part, unwrapped=False) for part in parts]
        except Exception:  # noqa: S110 - retried one by one below, where errors are reported
            pass
        # The model failed on the batch or answered in a shape we cannot split: one at a time,
        # so one bad request cannot fail its batch-mates.
        return [self._predict_one(item.data) for item in items]

    def _predict_one(self, item: _Input) -> bytes | ScoringError:
        try:
            output = self._model.predict(item.data, params=item.params)
        except MlflowException as error:
            exc: Any = error
            status = exc.get_http_status_code()
            if status < 500:  # schema enforcement: the client's input does not fit
                return ScoringError(
                    status, exc.error_code, f"Failed to predict data. {exc.message}"
                )
            logger.exception("predict failed")
            return predict_failed()
        except Exception:
            logger.exception("predict failed")
            return predict_failed()
        try:
            return _encode(output, unwrapped=item.unwrapped)
        except Exception:
            logger.exception("could not encode the predictions as JSON")
            return predict_failed()


def check_parquet_shape(body: bytes) -> None:
    """Rows and columns from the Parquet footer, before any column is read."""
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    meta = pq.ParquetFile(BytesIO(body)).metadata
    if meta.num_columns > MAX_COLUMNS:
        raise too_big("columns", meta.num_columns, MAX_COLUMNS)
    if meta.num_rows > MAX_ROWS:
        raise too_big("rows", meta.num_rows, MAX_ROWS)


@contextlib.contextmanager
def _client_errors() -> Iterator[None]:
    """Parsing failures are the client's: 400 with mlflow's message, never a traceback."""
    try:
        yield
    except ScoringError:
        raise
    except MlflowException as error:
        exc: Any = error
        status = exc.get_http_status_code()
        raise ScoringError(status if status < 500 else 400, exc.error_code, exc.message) from None
    except Exception as exc:
        raise bad_request(f"Invalid input. {type(exc).__name__}: {exc}") from None


def _split(output: Any, sizes: list[int]) -> list[Any] | None:
    """`output` cut back into one part per request, or None when it is not one row per row."""
    if isinstance(output, (pd.DataFrame, pd.Series)):
        rows: Any = output.iloc
    elif isinstance(output, (np.ndarray, list)):
        rows = output
    else:
        return None
    if len(output) != sum(sizes):
        return None
    parts, start = [], 0
    for size in sizes:
        parts.append(rows[start : start + size])
        start += size
    return parts


def _encode(output: Any, *, unwrapped: bool) -> bytes:
    buffer = StringIO()
    if unwrapped:
        scoring_server.unwrapped_predictions_to_json(output, buffer)
    else:
        scoring_server.predictions_to_json(output, buffer)
    return buffer.getvalue().encode()


# -- the sklearn fast path --------------------------------------------------------------------


def _numpy_scorer(
    meta: Any, pyfunc_model: Any, fallback: PyfuncScorer
) -> tuple[NumpyScorer | None, str]:
    """The numpy scorer when pyfunc's predict is just `estimator.<fn>(frame)`; else why not."""
    conf = meta.flavors["python_function"]
    columns = _numeric_columns(meta)
    if isinstance(columns, str):
        return None, f"off ({columns})"
    estimator = pyfunc_model.get_raw_model()
    predict_fn = str(conf.get("predict_fn", "predict"))
    predict = getattr(estimator, predict_fn, None)
    if predict is None:
        return None, f"off (the estimator has no {predict_fn})"
    if getattr(estimator, "feature_names_in_", None) is not None:
        # Fitted on a DataFrame, sklearn warns on every numpy call; the columns are in order.
        warnings.filterwarnings(
            "ignore", message="X does not have valid feature names", category=UserWarning
        )
    scorer = NumpyScorer(columns, predict, fallback, allow_nan=_allows_nan(estimator))
    try:
        mismatch = _probe(scorer, pyfunc_model, columns)
    except Exception as exc:
        mismatch = f"{type(exc).__name__}: {exc}"
    if mismatch:
        return None, f"off (its answer differed from pyfunc's: {mismatch})"
    return scorer, f"on ({type(estimator).__name__}.{predict_fn} on numpy)"


def _numeric_columns(meta: Any) -> list[tuple[str, ColumnType]] | str:
    """The signature's columns when all are required doubles/longs, else why the path is off."""
    conf = meta.flavors["python_function"]
    if "sklearn" not in meta.flavors or conf.get("loader_module") != "mlflow.sklearn":
        return "not an sklearn model"
    if meta._is_signature_from_type_hint() or meta._is_type_hint_from_example():
        return "signature from type hints"
    schema = meta.get_input_schema()
    if schema is None or not schema.has_input_names() or schema.is_tensor_spec():
        return "no column signature"
    if meta.get_params_schema() is not None:
        return "the model takes params"
    columns: list[tuple[str, ColumnType]] = []
    for spec in schema.inputs:
        kind = _COLUMN_TYPES.get(spec.type) if isinstance(spec.type, DataType) else None
        if kind is None or not spec.required:
            return f"column {spec.name!r} is {spec.type}, not a required double/long"
        columns.append((str(spec.name), kind))
    return columns


def _allows_nan(estimator: Any) -> bool:
    """Whether sklearn says the estimator takes NaN (then nulls pass through as NaN)."""
    try:
        return bool(estimator.__sklearn_tags__().input_tags.allow_nan)
    except Exception:
        return True  # unknown: let the estimator decide, as pyfunc would


def _probe(scorer: NumpyScorer, pyfunc_model: Any, columns: list[tuple[str, ColumnType]]) -> str:
    """Score the input example and a synthetic frame both ways; describe the first difference."""
    names = [name for name, _ in columns]
    frames = []
    example = pyfunc_model.input_example
    if isinstance(example, pd.DataFrame) and set(names) <= set(example.columns):
        frames.append(example[names].head(20))
    ramp = np.arange(4 * len(names)).reshape(4, len(names)) % 9 - 4
    frames.append(
        pd.DataFrame(
            {
                name: ramp[:, i] if kind == "long" else ramp[:, i] / 4  # fractions for doubles
                for i, (name, kind) in enumerate(columns)
            }
        )
    )
    compared = 0
    for frame in frames:
        try:
            want = _encode(pyfunc_model.predict(frame), unwrapped=False)
        except Exception:  # noqa: S112 - rows pyfunc refuses prove nothing either way
            continue
        split = frame.to_dict(orient="split", index=False)  # exact Python numbers
        parsed = scorer.parse_document({"dataframe_split": split})
        if parsed.group != FAST_GROUP:
            return "the fast path did not take the probe rows"
        got = scorer.predict([parsed])[0]
        if isinstance(got, ScoringError):
            return got.message
        if json.loads(got) != json.loads(want):
            return f"{got[:200]!r} != {want[:200]!r}"
        compared += 1
    return "" if compared else "pyfunc scored none of the probe rows"


# -- the PyTorch fast path --------------------------------------------------------------------


def _pt2_path(local_path: str, conf: dict[str, Any]) -> str | None:
    """The `torch.export` archive of an `mlflow.pytorch` model saved as pt2 (mlflow's default)."""
    if conf.get("loader_module") != "mlflow.pytorch":
        return None
    path = os.path.join(local_path, str(conf.get("data", "data")), "model.pt2")
    return path if os.path.isfile(path) else None


def _load_pytorch_pyfunc(local_path: str, device: str, pt2: str | None) -> tuple[Any, str]:
    """pyfunc's model on `device` (its loader maps the weights there), and the device it is on.

    mlflow refuses to load a pt2 program on another device than the one it was saved on; then
    pyfunc keeps it on that device, and the fast path moves a copy (`torch_module_on`).
    """
    try:
        return mlflow.pyfunc.load_model(local_path, model_config={"device": device}), device
    except MlflowException:
        if pt2 is None:
            raise
        other = "cpu" if device != "cpu" else "cuda"
        try:
            model = mlflow.pyfunc.load_model(local_path, model_config={"device": other})
        except Exception:  # saved on a device this machine lacks: the first error says so
            raise PermanentError(
                f"the pt2 model cannot be loaded on {device} nor on {other}"
            ) from None
        return model, other


def _torch_scorer(
    meta: Any, pyfunc_model: Any, fallback: PyfuncScorer, device: str, pt2: str | None
) -> tuple[TorchScorer | None, str]:
    """The torch scorer when pyfunc's predict is `module(tensor(frame))`; else why not.

    `pt2` is the archive to move to `device` when pyfunc holds the model elsewhere."""
    torch: Any = importlib.import_module("torch")
    shape = _torch_inputs(meta)
    if isinstance(shape, str):
        if pt2 is not None:
            # pyfunc holds this program on another device: serving it there ignores --device.
            raise PermanentError(
                f"--device {device}: this pt2 model cannot take the torch fast path ({shape}); "
                "log it with serialization_format='pickle' to serve it through pyfunc on "
                f"{device}, or serve it with --device cpu"
            )
        return None, f"off ({shape})"
    columns, tensor_signature = shape
    module = pyfunc_model.get_raw_model()
    if pt2 is not None:
        module = torch_module_on(pt2, device, torch)
    scorer = TorchScorer(
        columns, module, device, fallback, tensor_signature=tensor_signature, torch=torch
    )
    # pyfunc answers on the CPU for a moved pt2 model: the probe is then the CUDA-vs-CPU check.
    tolerance = 1e-5 if device == "cpu" else 1e-4
    try:
        mismatch = _torch_probe(scorer, fallback, pyfunc_model, tolerance)
    except Exception as exc:
        mismatch = f"{type(exc).__name__}: {exc}"
    if mismatch:
        if device != "cpu":
            raise PermanentError(f"--device {device}: the model answers differently: {mismatch}")
        return None, f"off (its answer differed from pyfunc's: {mismatch})"
    kind = "tensor" if tensor_signature else "columns"
    return scorer, f"on (one forward per micro-batch on {device}, {kind} signature)"


def torch_module_on(pt2: str, device: str, torch: Any) -> Any:
    """The pt2 program moved to `device`, weights, buffers and device constants alike.

    mlflow refuses to load a pt2 model on another device than it was saved on; the program's
    own `move_to_device_pass` rewrites it. pyfunc has already loaded (and checked) the archive.
    """
    try:
        passes: Any = importlib.import_module("torch.export.passes")
        program = torch.export.load(pt2)
        return passes.move_to_device_pass(program, device).module()
    except Exception as exc:
        raise PermanentError(
            f"could not move the pt2 model to {device} ({type(exc).__name__}: {exc}); log it "
            "with serialization_format='pickle' (and MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true "
            "where it is served), or save it from a module already on that device"
        ) from exc


def _torch_inputs(meta: Any) -> tuple[list[tuple[str, ColumnType]], bool] | str:
    """(columns, tensor signature?) that pyfunc turns into one float32 matrix; else why not."""
    schema = meta.get_input_schema()
    if "pytorch" not in meta.flavors or schema is None or meta.get_params_schema() is not None:
        return "not a PyTorch model with a signature and no params"
    if schema.is_tensor_spec():
        width = _tensor_width(schema.inputs)
        if isinstance(width, str):
            return width
        return [(str(i), "double") for i in range(width)], True
    if not schema.has_input_names():
        return "no column names"
    columns: list[tuple[str, ColumnType]] = []
    for spec in schema.inputs:
        kind = _TORCH_COLUMN_TYPES.get(spec.type) if isinstance(spec.type, DataType) else None
        if kind is None or not spec.required:
            return f"column {spec.name!r} is {spec.type}, not a required number"
        columns.append((str(spec.name), kind))
    return columns, False


def _tensor_width(specs: list[Any]) -> int | str:
    """F for one float32 input tensor of shape (-1, F); else why the fast path is off."""
    if len(specs) != 1:
        return "more than one input tensor"
    spec = specs[0]
    dims = tuple(spec.shape)
    if spec.type != np.dtype(np.float32) or len(dims) != 2 or dims[0] != -1 or dims[1] < 1:
        return f"input tensor {spec.type}{dims}, not float32 of shape (-1, F)"
    return int(dims[1])


def _torch_probe(
    scorer: TorchScorer, fallback: PyfuncScorer, pyfunc_model: Any, tolerance: float
) -> str:
    """Score the input example and a synthetic batch both ways; describe the first difference."""
    width = len(scorer.names)
    ramp = (np.arange(4 * width).reshape(4, width) % 9 - 4) / 4
    blocks = [ramp]
    example = pyfunc_model.input_example
    if isinstance(example, np.ndarray) and example.ndim == 2 and example.shape[1] == width:
        blocks.insert(0, example[:20].astype(np.float64))
    elif isinstance(example, pd.DataFrame) and set(scorer.names) <= set(example.columns):
        blocks.insert(0, example[scorer.names].head(20).to_numpy(dtype=np.float64))
    compared = 0
    for block in blocks:
        rows = block.tolist()
        if scorer._tensor:
            document: dict[str, Any] = {"inputs": rows}
        else:
            document = {"dataframe_split": {"columns": scorer.names, "data": rows}}
        try:
            want = fallback.predict([fallback.parse_document(document)])[0]
        except ScoringError:
            continue
        if isinstance(want, ScoringError):
            continue  # rows pyfunc refuses prove nothing either way
        parsed = scorer.parse_document(document)
        if parsed.group != FAST_GROUP:
            return "the fast path did not take the probe rows"
        got = scorer.predict([parsed])[0]
        if isinstance(got, ScoringError):
            return got.message
        if mismatch := answers_agree(got, want, tolerance):
            return mismatch
        compared += 1
    return "" if compared else "pyfunc scored none of the probe rows"
