"""The fleet overview: every model's live versions, split, approvals waiting and drift, and
the platform's lead time and rejections."""

from __future__ import annotations

from fastapi import APIRouter

from stagegate.api import schemas
from stagegate.api.deps import SessionDep, Viewer
from stagegate.api.errors import responses
from stagegate.api.strict import StrictRoute
from stagegate.governance import fleet as fleet_service
from stagegate.lifecycle.stages import DeploymentRole

router = APIRouter(prefix="/api/v1/fleet", tags=["fleet"], route_class=StrictRoute)


def _holder(m: fleet_service.ModelFleet, role: DeploymentRole) -> schemas.HolderPublic | None:
    found = m.holders.get(role)
    return None if found is None else schemas.HolderPublic(version=found.version, since=found.since)


@router.get("", responses=responses(401, 422, 503))
def get_fleet(session: SessionDep, _: Viewer) -> schemas.FleetPublic:
    """Per model: champion, challenger and shadow, the traffic split, pending approvals and
    drift. Over all models: pending approvals, lead time from registration to production
    (median and p90), and the share of versions rejected with the most frequent reasons."""
    f = fleet_service.fleet(session)
    return schemas.FleetPublic(
        models=[
            schemas.FleetModelPublic(
                name=m.name,
                versions=m.versions,
                champion=_holder(m, DeploymentRole.champion),
                challenger=_holder(m, DeploymentRole.challenger),
                shadow=_holder(m, DeploymentRole.shadow),
                traffic=schemas.TrafficPublic(
                    challenger_weight=m.challenger_weight, shadow_fraction=m.shadow_fraction
                ),
                pending_approvals=m.pending_approvals,
                drift=schemas.DriftStatusPublic(
                    status=m.drift.status,
                    open_alarms=m.drift.open_alarms,
                    last_checked=m.drift.last_checked,
                ),
            )
            for m in f.models
        ],
        pending_approvals=f.pending_approvals,
        lead_time_s=schemas.LeadTimePublic(
            median=f.lead_time.median, p90=f.lead_time.p90, samples=f.lead_time.samples
        ),
        rejected=schemas.RejectedPublic(
            share=f.rejected.share,
            versions=f.rejected.versions,
            reasons=[schemas.ReasonCountPublic(reason=r, count=n) for r, n in f.rejected.reasons],
        ),
    )
