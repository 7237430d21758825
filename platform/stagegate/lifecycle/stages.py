"""Stages of a model version, and which moves between them exist at all."""

from __future__ import annotations

from enum import StrEnum


class Stage(StrEnum):
    candidate = "candidate"
    shadow = "shadow"
    canary = "canary"
    production = "production"
    retired = "retired"
    rejected = "rejected"
    rolled_back = "rolled_back"


class Role(StrEnum):
    """Roles carried by API tokens."""

    viewer = "viewer"
    author = "author"
    approver = "approver"
    admin = "admin"
    service = "service"


class DeploymentRole(StrEnum):
    """The part a version plays on its model's endpoint."""

    champion = "champion"
    challenger = "challenger"
    shadow = "shadow"


# Stages that at most one version of a model may hold at a time.
EXCLUSIVE: frozenset[Stage] = frozenset({Stage.shadow, Stage.canary, Stage.production})

# The moves a person or flow may request; anything else is refused before any gate runs.
# Requests never leave retired, rejected or rolled_back. Only applying a rollback moves a
# version out of retired: the previous champion comes back to production.
ALLOWED_MOVES: dict[Stage, frozenset[Stage]] = {
    Stage.candidate: frozenset({Stage.shadow, Stage.rejected}),
    Stage.shadow: frozenset({Stage.canary, Stage.rejected, Stage.rolled_back}),
    Stage.canary: frozenset({Stage.production, Stage.rejected, Stage.rolled_back}),
    Stage.production: frozenset({Stage.retired, Stage.rolled_back}),
    Stage.retired: frozenset(),
    Stage.rejected: frozenset(),
    Stage.rolled_back: frozenset(),
}

# How each live stage is mirrored into the registry.
REGISTRY_ALIAS: dict[Stage, str] = {
    Stage.production: "champion",
    Stage.canary: "challenger",
    Stage.shadow: "shadow",
}

DEPLOYMENT_ROLE: dict[Stage, DeploymentRole] = {
    Stage.production: DeploymentRole.champion,
    Stage.canary: DeploymentRole.challenger,
    Stage.shadow: DeploymentRole.shadow,
}

# Stages whose versions are served: the one definition of "live".
LIVE: frozenset[Stage] = frozenset(DEPLOYMENT_ROLE)
