"""What the model server asks of a loaded model: parse a request, predict a batch, encode answers.

Kept free of mlflow so the HTTP layer imports in milliseconds; `model_loader` builds the scorers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import orjson

CONTENT_TYPE_JSON = "application/json"
CONTENT_TYPE_CSV = "text/csv"
CONTENT_TYPE_PARQUET = "application/vnd.apache.parquet"
CONTENT_TYPES = (CONTENT_TYPE_CSV, CONTENT_TYPE_JSON, CONTENT_TYPE_PARQUET)

BAD_REQUEST = "BAD_REQUEST"
INTERNAL_ERROR = "INTERNAL_ERROR"
PREDICT_FAILED_MESSAGE = (
    "Encountered an unexpected error while evaluating the model. Verify that the input is "
    "compatible with the model for inference."
)
MAX_MESSAGE_CHARS = 2000  # mlflow's messages can echo a whole DataFrame back


class ScoringError(Exception):
    """A request answered with an error: HTTP status and mlflow's `{error_code, message}` body."""

    def __init__(self, status: int, error_code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message[:MAX_MESSAGE_CHARS]

    def body(self) -> bytes:
        return orjson.dumps({"error_code": self.error_code, "message": self.message})


def bad_request(message: str) -> ScoringError:
    return ScoringError(400, BAD_REQUEST, message)


def predict_failed() -> ScoringError:
    """The one message a client sees when the model itself raised: details go to the log."""
    return ScoringError(500, INTERNAL_ERROR, PREDICT_FAILED_MESSAGE)


@dataclass(slots=True)
class Parsed:
    """One request's input, ready to predict. Equal non-None `group`s may share a predict call."""

    rows: int
    group: Hashable | None
    data: Any


class Scorer(Protocol):
    def parse(self, body: bytes, media_type: str) -> Parsed:
        """Decode and validate one request body; raise ScoringError for a client error.

        Runs on the event loop for small bodies (keep it cheap), on a helper thread for large;
        a scorer with an `inline_parse_bytes` attribute sets where small ends (0: never inline).
        """
        ...

    def predict(self, batch: Sequence[Parsed]) -> list[bytes | ScoringError]:
        """One response body (or error) per request, in order. Runs on the predict thread."""
        ...


class DocumentScorer(Scorer, Protocol):
    def parse_document(self, document: Any) -> Parsed:
        """Like `parse`, for a JSON body that is already decoded."""
        ...


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to serve, and what `/version` reports about it."""

    scorer: Scorer
    info: Mapping[str, Any] = field(default_factory=dict)


def media_type_of(content_type: str | None) -> str:
    """The request's media type, refused (415) exactly where `mlflow models serve` refuses it."""
    if content_type == CONTENT_TYPE_JSON:  # the common case, without any parsing
        return CONTENT_TYPE_JSON
    if content_type is None:
        content_type = ""
    media_type, *pairs = (part.strip() for part in content_type.split(";"))
    params = {
        key.strip().lower(): value.strip() for key, _, value in (p.partition("=") for p in pairs)
    }
    if params.get("charset", "utf-8").lower() != "utf-8":
        raise ScoringError(415, BAD_REQUEST, "The scoring server only supports UTF-8")
    if unexpected := sorted(set(params) - {"charset"}):
        raise ScoringError(
            415, BAD_REQUEST, f"Unrecognized content type parameters: {', '.join(unexpected)}."
        )
    media_type = media_type.lower()
    if media_type not in CONTENT_TYPES:
        raise ScoringError(
            415,
            BAD_REQUEST,
            "This predictor only supports the following content types: "
            f"Types: {list(CONTENT_TYPES)}. Got '{content_type}'.",
        )
    return media_type


# What one request may hold, checked before pandas sees it: a 400k-column CSV within the body
# limit once cost 24 s and 1 GB to parse. Far above any real model's width and batch.
MAX_COLUMNS = 10_000
MAX_ROWS = 100_000


def too_big(what: str, count: int, limit: int) -> ScoringError:
    return ScoringError(413, BAD_REQUEST, f"The request has {count} {what}; at most {limit}.")


def check_csv_shape(body: bytes) -> None:
    """Columns from the header line and rows from the line count, before any parsing."""
    header_end = body.find(b"\n")
    header = body if header_end < 0 else body[:header_end]
    if (columns := header.count(b",") + 1) > MAX_COLUMNS:
        raise too_big("columns", columns, MAX_COLUMNS)
    if (rows := body.count(b"\n")) > MAX_ROWS + 1:
        raise too_big("rows", rows - 1, MAX_ROWS)


def check_document_shape(document: Any) -> None:
    """Rows and columns of any of mlflow's JSON formats, from lengths alone."""
    if not isinstance(document, dict):
        return
    for key, value in document.items():
        if key == "dataframe_split" and isinstance(value, dict):
            columns = value.get("columns")
            rows = value.get("data")
        elif key in ("dataframe_records", "instances", "inputs"):
            rows = value
            first = value[0] if isinstance(value, list) and value else None
            columns = first if isinstance(first, (dict, list)) else None
        else:
            continue
        if isinstance(rows, list) and len(rows) > MAX_ROWS:
            raise too_big("rows", len(rows), MAX_ROWS)
        if isinstance(columns, (dict, list)) and len(columns) > MAX_COLUMNS:
            raise too_big("columns", len(columns), MAX_COLUMNS)


def decode_json(body: bytes) -> Any:
    """orjson first; the stdlib second, because mlflow's parser accepts NaN, Infinity, huge ints.
    Documents over `MAX_ROWS` or `MAX_COLUMNS` are refused (413) before anything parses them."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        try:
            document = json.loads(body)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError
            raise bad_request(
                "Invalid input. Ensure that input is a valid JSON formatted string. "
                f"Error: '{exc!r}'"
            ) from None
    check_document_shape(document)
    return document


def encode_array_predictions(predictions: np.ndarray[Any, Any]) -> bytes:
    """`{"predictions": [...]}` as mlflow writes an ndarray (`tolist()` then `json.dump`)."""
    values = predictions.tolist()
    if predictions.dtype.kind in "fc" and not np.isfinite(predictions).all():
        # json.dumps writes NaN/Infinity where orjson writes null: answer what mlflow answers.
        return json.dumps({"predictions": values}).encode()
    return orjson.dumps({"predictions": values})


_JSON_TYPE_NAMES = {
    type(None): "null",
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    list: "array",
    dict: "object",
}


def json_type_name(value: Any) -> str:
    """A value's type as a JSON client would name it, for error messages."""
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)
