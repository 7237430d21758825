"""Feedback: ground-truth labels for logged inferences, written beside the inference log."""

from __future__ import annotations

import logging
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, status
from pydantic import BaseModel, Discriminator, Field, JsonValue, Tag, field_validator

from stagegate.api.deps import StateDep, require
from stagegate.api.errors import responses
from stagegate.api.schemas import Strict
from stagegate.api.strict import StrictRoute
from stagegate.db import utcnow
from stagegate.errors import RetryableError
from stagegate.governance.tokens import Principal
from stagegate.lifecycle.stages import Role
from stagegate.serving.inference_log.labels import LabelRecord, attach_labels

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1/feedback", tags=["feedback"], route_class=StrictRoute)

MAX_ITEMS = 1000
MAX_LABEL_BYTES = 16 * 1024  # a label is an outcome, not a payload

Labeler = Annotated[Principal, Depends(require(Role.service, Role.author, Role.admin))]


def inference_log_url(state: StateDep) -> str:
    return state.settings.inference_log_url


LogUrl = Annotated[str, Depends(inference_log_url)]


class FeedbackItem(Strict):
    request_id: str = Field(min_length=1, max_length=128, description="As the router logged it.")
    model: str = Field(min_length=1, max_length=128, description="Registered model name.")
    label: JsonValue = Field(
        description=f"The true outcome, any JSON up to {MAX_LABEL_BYTES} bytes; a later label "
        "supersedes."
    )

    @field_validator("label")
    @classmethod
    def _small(cls, label: JsonValue) -> JsonValue:
        try:
            encoded = orjson.dumps(label)  # as the inference log will store it
        except orjson.JSONEncodeError:  # an integer beyond 64 bits
            raise ValueError("a label's integers must fit in 64 bits") from None
        if len(encoded) > MAX_LABEL_BYTES:
            raise ValueError(f"a label is at most {MAX_LABEL_BYTES} bytes of JSON")
        return label


class FeedbackBatch(Strict):
    items: list[FeedbackItem] = Field(min_length=1, max_length=MAX_ITEMS)


def _shape(body: Any) -> str:
    return "batch" if isinstance(body, dict) and "items" in body else "item"


# Told apart by shape, so a bad batch is not also reported as a bad single item.
FeedbackBody = Annotated[
    Annotated[FeedbackItem, Tag("item")] | Annotated[FeedbackBatch, Tag("batch")],
    Discriminator(_shape),
]


class FeedbackAccepted(BaseModel):
    accepted: int


@router.post("", status_code=status.HTTP_202_ACCEPTED, responses=responses(401, 403, 413, 422, 503))
def post_feedback(_: Labeler, log_url: LogUrl, body: FeedbackBody) -> FeedbackAccepted:
    """Store labels. Unknown request ids are accepted: a label may beat its record's flush."""
    items = body.items if isinstance(body, FeedbackBatch) else [body]
    now = utcnow()
    labels = [LabelRecord(i.request_id, i.model, i.label, now) for i in items]
    try:
        attach_labels(log_url, labels)
    except OSError as exc:
        log.warning("writing labels failed: %s", exc)
        raise RetryableError("inference log unavailable; retry") from exc
    return FeedbackAccepted(accepted=len(items))
