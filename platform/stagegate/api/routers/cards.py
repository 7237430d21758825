"""Model cards: a version's lineage, approvals, evidence and production history, as JSON or
as a Markdown document."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Response

from stagegate.api import schemas
from stagegate.api.deps import SessionDep, Viewer
from stagegate.api.errors import responses
from stagegate.api.limits import MAX_INT
from stagegate.api.strict import StrictRoute
from stagegate.db import utcnow
from stagegate.governance import cards

router = APIRouter(prefix="/api/v1/models", tags=["models"], route_class=StrictRoute)

ModelName = Annotated[str, Path(min_length=1, max_length=128)]
VersionNo = Annotated[int, Path(ge=1, le=MAX_INT)]

_MARKDOWN: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/markdown": {"schema": {"type": "string"}}},
        "description": "The card: JSON, or with `format=md` a Markdown document.",
    }
}


@router.get(
    "/{name}/versions/{version}/card",
    response_model=schemas.CardPublic,
    responses={**_MARKDOWN, **responses(401, 404, 422, 503)},
)
def get_card(
    session: SessionDep,
    _: Viewer,
    name: ModelName,
    version: VersionNo,
    format: Annotated[
        Literal["json", "md"], Query(description="`json` (default) or `md` (text/markdown)")
    ] = "json",
) -> schemas.CardPublic | Response:
    """What the version is, what it was trained on, who approved each move on what evidence,
    and when it served production. Text from models and people is escaped in Markdown."""
    card = cards.card(session, name, version, now=utcnow())
    if format == "md":
        return Response(cards.markdown(card), media_type="text/markdown; charset=utf-8")
    return schemas.CardPublic.model_validate(card)
