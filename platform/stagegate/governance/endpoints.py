"""Endpoints: each model's desired serving state, the route routers poll, and what converged.

The desired state is written in the transaction that moves a stage (or changes the traffic
policy), so it can never disagree with the stages. Converge (`steps/converge.py`) then makes
the data plane match it and reports back here: the route it published for a generation,
the generation routers served, and which applied transitions it announced.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from stagegate.db import utcnow
from stagegate.errors import ConflictError, NotFoundError
from stagegate.governance import audit
from stagegate.governance.models import Endpoint, ModelVersion, Transition, TransitionStatus
from stagegate.governance.policies import DEFAULT_KEY, get_policy
from stagegate.lifecycle.endpoint import EndpointSpec, desired_endpoint
from stagegate.lifecycle.stages import LIVE


@dataclass(frozen=True)
class EndpointState:
    """A detached snapshot of one endpoint row."""

    model: str
    generation: int
    spec: EndpointSpec
    route: dict[str, Any] | None
    route_generation: int
    converged_generation: int
    updated_at: datetime

    @property
    def converged(self) -> bool:
        return self.converged_generation == self.generation


@dataclass(frozen=True)
class Announcement:
    """An applied transition whose `stagegate.transition.applied` has not gone out yet."""

    transition_id: str
    model: str
    version: int
    from_stage: str
    to_stage: str


def _snapshot(row: Endpoint) -> EndpointState:
    return EndpointState(
        model=row.model_name,
        generation=row.generation,
        spec=EndpointSpec.model_validate(row.spec),
        route=row.route,
        route_generation=row.route_generation,
        converged_generation=row.converged_generation,
        updated_at=row.updated_at,
    )


def _row(session: Session, model: str, *, lock: bool) -> Endpoint | None:
    return session.get(Endpoint, model, with_for_update=lock)


def desire(session: Session, model: str, *, actor: str) -> EndpointState:
    """Derive the desired state from the stages and the traffic policy; store it with a new
    generation when it changed. Call it in the transaction that changed either."""
    live = session.exec(
        select(ModelVersion).where(
            ModelVersion.model_name == model, col(ModelVersion.stage).in_(LIVE)
        )
    ).all()
    spec = desired_endpoint(
        {v.version: v.stage for v in live},
        {v.version: v.digest for v in live if v.digest},
        get_policy(session, model).traffic,
    ).model_dump(mode="json")
    row = _row(session, model, lock=True)
    if row is None:
        row = Endpoint(model_name=model)
    if row.generation == 0 or row.spec != spec:
        row.generation += 1
        row.spec, row.updated_at = spec, utcnow()
        session.add(row)
        audit.append(
            session,
            actor=actor,
            action="endpoint.desired",
            entity_type="endpoint",
            entity_id=model,
            data={"generation": row.generation, "spec": spec},
        )
        session.flush()
    return _snapshot(row)


def policy_changed(session: Session, model: str, *, actor: str) -> None:
    """Re-derive the endpoints a policy change may touch (`*` is every model's fallback)."""
    names = session.exec(select(Endpoint.model_name)).all() if model == DEFAULT_KEY else [model]
    for name in names:
        if model == DEFAULT_KEY or _row(session, name, lock=False) is not None:
            desire(session, name, actor=actor)


def get_endpoint(session: Session, model: str) -> EndpointState:
    row = _row(session, model, lock=False)
    if row is None:
        raise NotFoundError(f"model {model!r} has no endpoint")
    return _snapshot(row)


def find_endpoint(session: Session, model: str) -> EndpointState | None:
    row = _row(session, model, lock=False)
    return None if row is None else _snapshot(row)


def publish_route(
    session: Session, model: str, *, generation: int, route: dict[str, Any] | None, actor: str
) -> int:
    """Store the route converge built for the desired state of `generation` (None: no route).

    Returns the generation routers must serve: `generation`, or a newer one when only the
    URLs changed (a server came back on another port). Raises `ConflictError` when the
    desired state moved on meanwhile: the route belongs to a state nobody wants any more.
    """
    row = _row(session, model, lock=True)
    if row is None:
        raise NotFoundError(f"model {model!r} has no endpoint")
    if row.generation != generation:
        raise ConflictError(
            f"endpoint {model} moved to generation {row.generation} while converging {generation}"
        )
    if row.route_generation == row.generation and _same_route(row.route, route):
        return row.route_generation  # nothing new for routers
    if row.route_generation == row.generation:
        row.generation += 1  # same desired state, new URLs: routers must still see it
    row.route = None if route is None else {**route, "generation": row.generation}
    row.route_generation, row.updated_at = row.generation, utcnow()
    session.add(row)
    audit.append(
        session,
        actor=actor,
        action="endpoint.routed",
        entity_type="endpoint",
        entity_id=model,
        data={"generation": row.generation, "route": row.route},
    )
    return row.generation


def _same_route(stored: dict[str, Any] | None, new: dict[str, Any] | None) -> bool:
    if stored is None or new is None:
        return stored is new
    return {k: v for k, v in stored.items() if k != "generation"} == {
        k: v for k, v in new.items() if k != "generation"
    }


def mark_converged(session: Session, model: str, generation: int) -> None:
    row = _row(session, model, lock=True)
    if row is not None and generation > row.converged_generation:
        row.converged_generation = generation
        session.add(row)


def routes(session: Session) -> list[dict[str, Any]]:
    """Every published route, by model: what routers serve."""
    rows = session.exec(
        select(Endpoint).where(col(Endpoint.route).is_not(None)).order_by(Endpoint.model_name)
    ).all()
    return [row.route for row in rows if row.route is not None]


def unannounced(session: Session, model: str, *, served: int) -> list[Announcement]:
    """Applied transitions of `model` not yet announced whose generation routers serve."""
    rows = session.exec(
        select(Transition)
        .where(
            Transition.model_name == model,
            Transition.status == TransitionStatus.applied,
            col(Transition.announced_at).is_(None),
            col(Transition.generation) <= served,
        )
        .order_by(col(Transition.applied_at))
    ).all()
    return [
        Announcement(t.id, t.model_name, t.version, t.from_stage.value, t.to_stage.value)
        for t in rows
    ]


def mark_announced(session: Session, transition_id: str) -> None:
    t = session.get(Transition, transition_id)
    if t is not None and t.announced_at is None:
        t.announced_at = utcnow()
        session.add(t)


def to_converge(session: Session) -> list[str]:
    """Models whose data plane reconcile must check: anything live, anything not converged,
    anything with an applied transition still unannounced."""
    live = set(
        session.exec(select(ModelVersion.model_name).where(col(ModelVersion.stage).in_(LIVE))).all()
    )
    behind = set(
        session.exec(
            select(Endpoint.model_name).where(
                col(Endpoint.converged_generation) < col(Endpoint.generation)
            )
        ).all()
    )
    quiet = set(
        session.exec(
            select(Transition.model_name).where(
                Transition.status == TransitionStatus.applied,
                col(Transition.announced_at).is_(None),
            )
        ).all()
    )
    return sorted(live | behind | quiet)
