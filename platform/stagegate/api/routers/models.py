"""Models, versions, lineage and policies."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, status
from fastapi.responses import JSONResponse

from stagegate.api import present, schemas
from stagegate.api.deps import Admin, Attester, SessionDep, StateDep, Viewer
from stagegate.api.errors import responses
from stagegate.api.limits import MAX_INT, Instant
from stagegate.api.strict import StrictRoute
from stagegate.db import utcnow
from stagegate.errors import InvalidInput
from stagegate.events.announce import announce_if_approved
from stagegate.governance import (
    authorship,
    cards,
    endpoints,
    evaluations,
    lineage,
    policies,
    versions,
)
from stagegate.governance.models import PolicyChangeStatus
from stagegate.lifecycle.policy import Policy
from stagegate.lifecycle.stages import Stage
from stagegate.serving.policy import TrafficPolicy

router = APIRouter(prefix="/api/v1/models", tags=["models"], route_class=StrictRoute)

ModelName = Annotated[str, Path(min_length=1, max_length=128)]
VersionNo = Annotated[int, Path(ge=1, le=MAX_INT)]


# An OpenAPI link: a listed version can be put forward. Clients may follow it; the fuzzer's
# linked sequences do, so they reach real transitions rather than unknown names.
_REQUEST_A_MOVE = {
    "operationRef": "#/paths/~1api~1v1~1transitions/post",
    "requestBody": {
        "model": "$response.body#/data/0/name",
        "version": "$response.body#/data/0/versions/0/version",
    },
    "description": "Request a stage move for the first listed model's first version.",
}


@router.get(
    "", responses={200: {"links": {"RequestMove": _REQUEST_A_MOVE}}, **responses(401, 422, 503)}
)
def list_models(
    session: SessionDep,
    _: Viewer,
    offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
    limit: Annotated[int, Query(ge=1, le=schemas.MAX_PAGE)] = 50,
) -> schemas.ModelsPublic:
    rows, total = versions.list_models(session, offset=offset, limit=limit)
    versions_by_model = versions.versions_of(session, [m.name for m in rows])
    data = []
    for m in rows:
        vs = versions_by_model[m.name]
        champion = next((v.version for v in vs if v.stage is Stage.production), None)
        data.append(
            schemas.ModelPublic(
                name=m.name,
                created_at=m.created_at,
                champion=champion,
                versions=[
                    schemas.VersionSummary(
                        version=v.version, stage=v.stage, stage_changed_at=v.stage_changed_at
                    )
                    for v in vs
                ],
            )
        )
    return schemas.ModelsPublic(data=data, count=total)


@router.get("/{name}/endpoint", responses=responses(401, 404, 422, 503))
def get_endpoint(session: SessionDep, _: Viewer, name: ModelName) -> schemas.EndpointPublic:
    """The model's desired serving state and its convergence (404 before its first move)."""
    state = endpoints.get_endpoint(session, name)
    return schemas.EndpointPublic(
        model=state.model,
        generation=state.generation,
        spec=state.spec,
        route=None if state.route is None else TrafficPolicy.model_validate(state.route),
        route_generation=state.route_generation,
        converged_generation=state.converged_generation,
        converged=state.converged,
        updated_at=state.updated_at,
    )


@router.get("/{name}/versions/{version}", responses=responses(401, 404, 422, 503))
def get_version(
    session: SessionDep, _: Viewer, name: ModelName, version: VersionNo
) -> schemas.VersionPublic:
    return present.version(session, versions.get_version(session, name, version))


@router.post(
    "/{name}/versions/{version}/authorship",
    status_code=status.HTTP_201_CREATED,
    responses=responses(401, 403, 404, 409, 422, 503),
)
def attest_authorship(
    session: SessionDep, state: StateDep, principal: Attester, name: ModelName, version: VersionNo
) -> schemas.VersionPublic:
    """The caller attests that they wrote this version's artifact. Under `authorship:
    attested`, approvals of its moves into shadow, canary or production count only after an
    attestation, and the attester may not approve them. One per artifact: a second is 409."""
    row, pending = authorship.attest(
        session, principal=principal, model=name, version=version, now=utcnow()
    )
    session.commit()
    for t in pending:  # approvals given earlier may complete a transition now
        announce_if_approved(state.sink, t)
    return present.version(session, row)


@router.get("/{name}/versions/{version}/lineage", responses=responses(401, 404, 422, 503))
def get_lineage(
    session: SessionDep, principal: Viewer, name: ModelName, version: VersionNo
) -> schemas.LineagePublic:
    row = versions.get_version(session, name, version)
    ts, _approvals, deps = lineage.history_of(session, row)
    return schemas.LineagePublic(
        version=present.version(session, row),
        transitions=present.transitions_for(session, ts, principal),
        deployments=[present.deployment(d) for d in deps],
        consumers=[
            schemas.VersionRefPublic(model=c.model_name, version=c.version, stage=c.stage)
            for c in lineage.consumers_of(session, name, version)
        ],
        drift=[
            schemas.DriftLinkPublic(
                evaluation_id=e.id or 0,
                verdict=str(e.summary.get("verdict", "")),
                window_start=e.window_start,
                window_end=e.window_end,
                drifted_features=list(e.summary.get("drifted_features", [])),
                report_url=present.report_url(e),
            )
            for e in evaluations.list_for(session, name, version)
            if e.kind == "drift"
        ],
    )


@router.get("/{name}/versions/{version}/consumers", responses=responses(401, 404, 422, 503))
def get_consumers(
    session: SessionDep,
    _: Viewer,
    name: ModelName,
    version: VersionNo,
    production_only: bool = False,
) -> list[schemas.VersionRefPublic]:
    """Versions that declared this one upstream (`stagegate.depends_on`)."""
    return [
        schemas.VersionRefPublic(model=c.model_name, version=c.version, stage=c.stage)
        for c in lineage.consumers_of(session, name, version, production_only=production_only)
    ]


@router.get("/{name}/versions/{version}/deployments", responses=responses(401, 404, 422, 503))
def get_deployments(
    session: SessionDep, _: Viewer, name: ModelName, version: VersionNo
) -> list[schemas.DeploymentWindowPublic]:
    """The windows in which the version served a role (champion, challenger, shadow), oldest
    first, with the digest approved for each and the transition that opened it."""
    return [
        schemas.DeploymentWindowPublic(
            role=w.role,
            started_at=w.started_at,
            ended_at=w.ended_at,
            digest=w.digest,
            transition_id=w.transition_id,
        )
        for w in cards.windows_of(session, name, version)
    ]


@router.get("/{name}/versions/{version}/evaluations", responses=responses(401, 404, 422, 503))
def get_evaluations(
    session: SessionDep, _: Viewer, name: ModelName, version: VersionNo
) -> list[schemas.EvaluationPublic]:
    """The version's evaluations, newest first: shadow, canary, experiment, offpolicy and drift
    reports, each with its summary (the gates use the newest of each kind)."""
    return [
        schemas.EvaluationPublic(
            id=e.id or 0,
            model=e.model_name,
            version=e.version,
            kind=e.kind,
            passed=e.passed,
            reason=e.reason,
            sample_size=e.sample_size,
            summary=e.summary,
            window_start=e.window_start,
            created_at=e.created_at,
        )
        for e in evaluations.list_for(session, name, version)
    ]


@router.get("/{name}/production", responses=responses(401, 404, 422, 503))
def production_at(
    session: SessionDep,
    principal: Viewer,
    name: ModelName,
    at: Annotated[Instant | None, Query(description="ISO-8601 instant; default now")] = None,
) -> schemas.ProductionPublic:
    """Which version served production at `at`, who approved it, and when."""
    if at is not None and at.tzinfo is None:
        raise InvalidInput("`at` needs a timezone, e.g. 2026-11-27T10:00:00Z")
    when = at or utcnow()
    found = lineage.production_at(session, name, when)
    if found is None:
        return schemas.ProductionPublic(model=name, at=when, version=None)
    return schemas.ProductionPublic(
        model=name,
        at=when,
        version=found.version.version,
        since=found.deployment.started_at,
        until=found.deployment.ended_at,
        digest=found.version.digest,
        run_id=found.version.run_id,
        transition=present.transition(session, found.promotion, principal),
        window_opened_by=found.deployment.transition_id,
        approved_by=[present.approval(a) for a in found.approvals],
        datasets=[
            schemas.DatasetPublic.model_validate(d)
            for d in lineage.datasets_of(session, found.version)
        ],
    )


@router.get("/{name}/policy", responses=responses(401, 404, 422, 503))
def get_policy(session: SessionDep, _: Viewer, name: ModelName) -> Policy:
    """The model's effective policy; `*` names the default for models without their own."""
    if name != policies.DEFAULT_KEY:
        versions.get_model(session, name)
    return policies.get_policy(session, name)


_PENDING: dict[int | str, dict[str, Any]] = {
    202: {
        "model": schemas.PolicyChangePublic,
        "description": "The change weakens the policy and waits for a second admin: approve "
        "it at POST /api/v1/policy-changes/{id}/approvals.",
    }
}


@router.put(
    "/{name}/policy",
    response_model=Policy,
    responses={**_PENDING, **responses(401, 403, 404, 409, 413, 422, 503)},
)
def put_policy(
    session: SessionDep, state: StateDep, admin: Admin, name: ModelName, body: Policy
) -> Policy | JSONResponse:
    """Replace the model's gate policy (admin). Applies to decisions taken from now on; a
    change that weakens it answers 202 and waits for a second admin (four eyes)."""
    if name != policies.DEFAULT_KEY:
        versions.get_model(session, name)
    change = policies.change_policy(
        session, name, body, actor=admin.name, floor=state.settings.governance.min_approvals
    )
    session.commit()
    if change.status is PolicyChangeStatus.pending:
        pending = present.policy_change(change)
        return JSONResponse(pending.model_dump(mode="json"), status_code=202)
    return body
