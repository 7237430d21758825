"""The PyTorch fast path: each request decoded into one float block, a micro-batch in one forward.

pyfunc builds a DataFrame and enforces the schema per request (~26 ms for 256 columns); here each
request (the four JSON formats, CSV, Parquet) becomes a numpy block on a helper thread, and all
blocks of a micro-batch are concatenated into one tensor on the device for one forward pass.
torch is reached through `Any`: the server and its type check do not need it installed.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
import pandas as pd

from stagegate.serving.model_server.numpy_model import (
    _RECORD_KEYS,
    FAST_GROUP,
    ColumnType,
    NumpyScorer,
)
from stagegate.serving.model_server.scoring import (
    CONTENT_TYPE_CSV,
    CONTENT_TYPE_JSON,
    DocumentScorer,
    Parsed,
    bad_request,
    check_csv_shape,
    decode_json,
)

logger = logging.getLogger(__name__)

FAST_PATH = "torch"


class TorchScorer(NumpyScorer):
    """Scores an `mlflow.pytorch` model whose pyfunc predict is `module(tensor(frame, float32))`.

    `columns` names the signature's columns (answers are records, as pyfunc answers a DataFrame)
    or, for a tensor signature `(-1, F)`, is `F` synthetic names (answers are nested lists).
    """

    # The server parses every body on a helper thread, never on the event loop.
    inline_parse_bytes = 0

    def __init__(
        self,
        columns: Sequence[tuple[str, ColumnType]],
        module: Any,
        device: str,
        fallback: DocumentScorer,
        *,
        tensor_signature: bool,
        torch: Any,
    ) -> None:
        super().__init__(columns, self._forward, fallback, allow_nan=True)
        self.module = module
        self.device = device
        self._torch = torch
        self._tensor = tensor_signature
        if tensor_signature:
            # pyfunc refuses nulls in a tensor; its parser says so (the fallback decides).
            self._plain_types = {int, float}
        self.forward_calls = 0  # read by tests and the benchmark: one per micro-batch

    # -- parsing (helper thread) ----------------------------------------------------------

    def parse(self, body: bytes, media_type: str) -> Parsed:
        if media_type == CONTENT_TYPE_JSON:
            return self.parse_document(decode_json(body))
        if self._tensor and media_type == CONTENT_TYPE_CSV:
            # mlflow's CSV reader refuses tensor signatures; the columns are the tensor's, in order.
            check_csv_shape(body)
            try:
                frame = pd.read_csv(io.BytesIO(body))
            except (ValueError, UnicodeDecodeError) as exc:
                raise bad_request(f"Invalid input. Could not read the CSV: {exc}") from None
            array = self._frame_array(frame)
            if array is None:
                raise bad_request("Invalid input. The CSV must hold numbers only.")
            return Parsed(len(array), FAST_GROUP, array)
        # mlflow's own CSV/Parquet readers (and their errors), then the same float block.
        parsed = self._fallback.parse(body, media_type)
        frame = getattr(parsed.data, "data", None)
        if isinstance(frame, pd.DataFrame) and (array := self._frame_array(frame)) is not None:
            return Parsed(len(array), FAST_GROUP, array)
        return parsed

    def _frame_array(self, frame: pd.DataFrame) -> np.ndarray[Any, Any] | None:
        if frame.empty:
            return None
        if self._tensor:
            picked = frame
            if frame.shape[1] != len(self.names):
                raise self._width_error(frame.shape[1])
        else:
            if missing := [name for name in self.names if name not in frame.columns]:
                raise self._missing(missing)
            picked = frame[self.names]
        if not all(dtype.kind in "biuf" for dtype in picked.dtypes):
            return None  # strings or objects: pyfunc's conversion decides
        # pyfunc casts the frame itself: `frame.to_numpy(float32)`.
        array: np.ndarray[Any, Any] = picked.to_numpy(dtype=np.float32)
        return array

    def _rows(self, document: Any) -> list[Any] | None:
        if not self._tensor:
            return super()._rows(document)
        if type(document) is not dict or len(document) != 1:
            return None
        ((key, value),) = document.items()
        rows = _tensor_rows(key, value)
        if type(rows) is not list or not rows or not all(type(r) is list for r in rows):
            return None
        width = len(self.names)
        for row in rows:
            if len(row) != width:
                raise self._width_error(len(row))
        return rows

    def _width_error(self, got: int) -> Exception:
        width = len(self.names)
        return bad_request(
            f"Invalid input. The model takes rows of {width} numbers (a tensor of shape "
            f"(-1, {width})); a row holds {got}."
        )

    # -- predicting (predict thread) --------------------------------------------------------

    def _forward(self, array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        torch = self._torch
        # pyfunc feeds `frame.to_numpy(float32)`: the same cast, on the whole micro-batch.
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        with torch.inference_mode():
            output = self.module(tensor.to(self.device))
            self.forward_calls += 1
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"the model returned {type(output).__name__}, not one tensor")
            result: np.ndarray[Any, Any] = output.to("cpu").numpy()
        return result

    def _encode(self, predictions: np.ndarray[Any, Any]) -> bytes:
        if self._tensor:
            return super()._encode(predictions)
        # pyfunc answers a DataFrame input with `DataFrame(preds)`, written as records.
        table = predictions.reshape(len(predictions), -1).tolist()
        keys = [str(i) for i in range(len(table[0]))] if table else []
        records = [dict(zip(keys, row, strict=True)) for row in table]
        if not np.isfinite(predictions).all():
            return json.dumps({"predictions": records}).encode()  # NaN as mlflow writes it
        return orjson.dumps({"predictions": records})


def _tensor_rows(key: str, value: Any) -> Any:
    """The rows a tensor-signature request holds, as pyfunc reads them (columns in order)."""
    if key == "dataframe_split" and type(value) is dict and "data" in value:
        # With an index, pyfunc's own reading applies.
        return None if set(value) - {"columns", "data"} else value["data"]
    if key not in _RECORD_KEYS or type(value) is not list:
        return None
    if value and all(type(r) is dict for r in value):
        keys = list(value[0])
        if not all(list(r) == keys for r in value):
            return None
        return [list(r.values()) for r in value]
    return value


def answers_agree(got: bytes, want: bytes, tolerance: float) -> str:
    """'' when two JSON answers have the same shape and numbers within `tolerance`; else why."""
    got_numbers: list[float] = []
    want_numbers: list[float] = []
    if _skeleton(json.loads(got), got_numbers) != _skeleton(json.loads(want), want_numbers):
        return f"different shapes: {got[:200]!r} != {want[:200]!r}"
    a, b = np.array(got_numbers, dtype=np.float64), np.array(want_numbers, dtype=np.float64)
    close = np.isclose(a, b, rtol=tolerance, atol=tolerance, equal_nan=True)
    if close.all():
        return ""
    at = int(np.argmin(close))
    return f"{a[at]!r} vs {b[at]!r} (value {at}, tolerance {tolerance:g})"


def _skeleton(value: Any, numbers: list[float]) -> Any:
    """`value` with every number replaced by 0 (and collected into `numbers`, in order)."""
    if isinstance(value, dict):
        return {key: _skeleton(item, numbers) for key, item in value.items()}
    if isinstance(value, list):
        return [_skeleton(item, numbers) for item in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        numbers.append(float(value))
        return 0
    return value
