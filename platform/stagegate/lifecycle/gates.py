"""Gates: rule classes that accept a transition or hold it back with a reason.

Each gate names the stages it guards (`FROM_STAGES`, `TO_STAGES`) and looks only at a
`GateContext`, a snapshot taken when the decision is made, so the champion compared against
is the one of that moment, not the one at registration.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import ClassVar

from stagegate.experiments.tasks import compare_tasks
from stagegate.lifecycle.policy import Authorship, Policy, UnmappedAuthor
from stagegate.lifecycle.stages import ALLOWED_MOVES, LIVE, Role, Stage


@dataclass(frozen=True)
class VersionFacts:
    name: str
    version: int
    stage: Stage
    digest: str | None
    author: str | None
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    dataset_count: int = 0
    reference_source: str | None = None  # where the drift monitor reads the training frame


@dataclass(frozen=True)
class ApprovalFacts:
    approver: str
    role: Role
    approve: bool
    digest: str | None
    created_at: datetime


@dataclass(frozen=True)
class ReportFacts:
    """The latest report of each kind for the version (see `governance/evaluations.py`)."""

    kind: str  # shadow | canary | experiment | drift
    passed: bool
    reason: str
    digest: str | None = None  # the artifact it judged
    champion_version: int | None = None  # the champion it was compared with
    breached: tuple[str, ...] = ()  # experiment: the guardrails it found broken


@dataclass(frozen=True)
class AlarmFacts:
    """An open drift alarm (see `governance/alarms.py`)."""

    id: str
    version: int
    drifted_features: tuple[str, ...]


@dataclass(frozen=True)
class QueuedFacts:
    """Another version's open transition into the same shadow or canary slot, ahead of this
    one in the queue: approved already, or its approvals complete earlier."""

    version: int
    transition_id: str
    approved_at: datetime


@dataclass(frozen=True)
class AuthorFacts:
    """The version's authors as Stagegate knows them: the MLflow user name recorded at intake,
    the identity an admin linked to it (None: none is), what the policy does then, and the
    identity that attested authorship, if one did."""

    mlflow_user: str | None
    identity: str | None
    unmapped: UnmappedAuthor  # resolved: the policy's value, else the mode's default
    authorship: Authorship = "registry"  # resolved like `unmapped`
    # Who attested authorship (an author of record even after the artifact changed), and
    # whether that attestation covers the version's current artifact.
    attester: str | None = None
    attested: bool = False

    def warning(self) -> str | None:
        """Why the author is unknown to Stagegate, or None when an identity is linked."""
        if self.identity is not None:
            return None
        if self.mlflow_user is None:
            return "the version records no MLflow author"
        return f"the author, MLflow user {self.mlflow_user!r}, is linked to no identity"

    def of_record(self) -> set[str]:
        """Every name that wrote the version: none of them may approve it."""
        return {n for n in (self.mlflow_user, self.identity, self.attester) if n is not None}

    def awaiting_attestation(self, model: str, version: int, to_stage: Stage) -> str | None:
        """Why approvals of this move wait for an attestation, or None when they do not.

        Only moves into a served stage wait: taking a version out of service (rejected,
        rolled back, retired) never does, so a rollback is never stuck on an attestation."""
        if self.authorship != "attested" or self.attested or to_stage not in LIVE:
            return None
        how = f"stagegate versions attest {model} {version}"
        if self.attester is not None:
            return (
                f"waiting for the author's attestation: {model} v{version}'s artifact changed "
                f"since {self.attester} attested it, so its author attests again ({how}); "
                "the policy says authorship: attested"
            )
        named = (
            f" (the registry names {self.identity})"
            if self.identity is not None
            else f" (the registry names MLflow user {self.mlflow_user!r})"
            if self.mlflow_user is not None
            else ""
        )
        return (
            f"waiting for the author's attestation: nobody has attested authorship of {model} "
            f"v{version}{named}; approvals count once its author does ({how}), as the policy "
            "says authorship: attested"
        )


SERVICE_NAME = "stagegate"  # the platform's own identity; reserved, no person can hold it


@dataclass(frozen=True)
class GateContext:
    from_stage: Stage
    to_stage: Stage
    requested_by: str
    version: VersionFacts
    champion: VersionFacts | None
    approvals: Sequence[ApprovalFacts]
    policy: Policy
    now: datetime
    # Another version holding the (exclusive, non-production) target stage, if any.
    occupant: VersionFacts | None = None
    reports: dict[str, ReportFacts] = field(default_factory=dict)
    # Open drift alarms of the version itself and of the champion.
    version_alarm: AlarmFacts | None = None
    champion_alarm: AlarmFacts | None = None
    # Versions queued for the same (exclusive, non-production) target stage ahead of this one.
    queue_ahead: tuple[QueuedFacts, ...] = ()
    # The author mapped through the identity links. None (tests of other gates): only the
    # raw MLflow name in `version.author` is compared; governance always fills it in.
    author: AuthorFacts | None = None


@dataclass(frozen=True)
class GateResult:
    gate: str
    passed: bool
    reason: str


class Gate(ABC):
    FROM_STAGES: ClassVar[frozenset[Stage]] = frozenset(Stage)
    TO_STAGES: ClassVar[frozenset[Stage]] = frozenset(Stage)
    name: ClassVar[str]

    def applies(self, ctx: GateContext) -> bool:
        return ctx.from_stage in self.FROM_STAGES and ctx.to_stage in self.TO_STAGES

    @abstractmethod
    def check(self, ctx: GateContext) -> GateResult: ...

    def ok(self, reason: str) -> GateResult:
        return GateResult(self.name, True, reason)

    def hold(self, reason: str) -> GateResult:
        return GateResult(self.name, False, reason)


def counting_approvers(ctx: GateContext) -> list[str]:
    """Approvers whose approval counts now: right role, fresh, same digest, not conflicted."""
    rule = ctx.policy.approval_rule(ctx.from_stage, ctx.to_stage)
    if rule is None:
        return []
    oldest = ctx.now - timedelta(days=ctx.policy.approval_ttl_days)
    # The requester, the MLflow name, the identity linked to it and the attester: none of
    # them counts.
    conflicted = {ctx.requested_by, ctx.version.author}
    if ctx.author is not None:
        conflicted |= ctx.author.of_record()
    return sorted(
        {
            a.approver
            for a in ctx.approvals
            if a.approve
            and a.role in rule.roles
            and a.created_at >= oldest
            and a.digest == ctx.version.digest
            and a.approver not in conflicted
        }
    )


def drift_rollback_alone(ctx: GateContext) -> bool:
    """The policy lets the service roll back a champion whose drift alarm is open, unapproved.

    The alarm is a fact of the database, not of the request, and only the service identity's
    own request qualifies, so no person can use this to skip an approval."""
    return (
        ctx.policy.drift.actions.rollback_applies_alone
        and ctx.from_stage is Stage.production
        and ctx.to_stage is Stage.rolled_back
        and ctx.requested_by == SERVICE_NAME
        and ctx.version_alarm is not None
    )


def experiment_rollback_alone(ctx: GateContext) -> bool:
    """The policy lets the service roll back a canary whose experiment found a guardrail
    broken, unapproved. As with drift, the evidence is a recorded report for this very
    artifact, and only the service identity's own request qualifies."""
    criteria = ctx.policy.experiment
    report = ctx.reports.get("experiment")
    return (
        criteria is not None
        and criteria.actions.rollback_applies_alone
        and ctx.from_stage is Stage.canary
        and ctx.to_stage is Stage.rolled_back
        and ctx.requested_by == SERVICE_NAME
        and report is not None
        and bool(report.breached)
        and report.digest == ctx.version.digest
    )


class ApprovalsGate(Gate):
    name = "approvals"

    def check(self, ctx: GateContext) -> GateResult:
        rule = ctx.policy.approval_rule(ctx.from_stage, ctx.to_stage)
        if rule is None:
            return self.hold(f"no policy rule covers {ctx.from_stage}->{ctx.to_stage}")
        if drift_rollback_alone(ctx):
            assert ctx.version_alarm is not None
            return self.ok(
                f"drift rollback applies alone by policy (alarm {ctx.version_alarm.id[:12]})"
            )
        if experiment_rollback_alone(ctx):
            breached = ", ".join(ctx.reports["experiment"].breached)
            return self.ok(f"guardrail rollback applies alone by policy ({breached} breached)")
        unknown = ctx.author.warning() if ctx.author is not None else None
        if rule.required > 0 and (blocked := _author_unknown(ctx)) is not None:
            return self.hold(blocked)
        have = counting_approvers(ctx)
        roles = "/".join(sorted(rule.roles))
        if len(have) >= rule.required:
            warned = f"; warning: {unknown}" if unknown and rule.required > 0 else ""
            return self.ok(f"{len(have)} of {rule.required} approvals ({roles}){warned}")
        return self.hold(
            f"{len(have)} of {rule.required} approvals from {roles} "
            f"(fresh, for digest {str(ctx.version.digest)[:12]})"
        )


def _author_unknown(ctx: GateContext) -> str | None:
    """Why no approval can count yet, because who wrote the version is not known well enough
    to keep its author from approving it; None when it is."""
    author = ctx.author
    if author is None:
        return None
    unknown = author.warning()
    if unknown and author.unmapped == "block":
        # An unknown author: no approval counts until an admin links the name (or the
        # policy says warn).
        return f"{unknown}; the policy blocks approvals (unmapped_author: block)"
    # Nobody authenticated has said they wrote this artifact: an approver could have
    # registered it under a colleague's MLflow name, so no approval counts yet.
    return author.awaiting_attestation(ctx.version.name, ctx.version.version, ctx.to_stage)


class OfflineMetricGate(Gate):
    """The version's offline metric is at least as good as the current champion's."""

    FROM_STAGES = frozenset({Stage.candidate, Stage.shadow, Stage.canary})
    TO_STAGES = frozenset({Stage.canary, Stage.production})
    name = "offline_metric"

    def applies(self, ctx: GateContext) -> bool:
        return super().applies(ctx) and ctx.policy.primary_metric is not None

    def check(self, ctx: GateContext) -> GateResult:
        metric = ctx.policy.primary_metric
        assert metric is not None  # applies() guarantees it
        mine = ctx.version.metrics.get(metric)
        if mine is None:
            return self.hold(f"run logged no metric {metric!r}")
        champ = ctx.champion
        if champ is None or champ.version == ctx.version.version:
            return self.ok(f"{metric}={mine:.6g}; no champion to beat")
        theirs = champ.metrics.get(metric)
        if theirs is None:
            return self.ok(f"{metric}={mine:.6g}; champion v{champ.version} has none")
        better_or_equal = mine >= theirs if ctx.policy.higher_is_better else mine <= theirs
        verdict = f"{metric}={mine:.6g} vs champion v{champ.version} {theirs:.6g}"
        return self.ok(verdict) if better_or_equal else self.hold(verdict + " (worse)")


class TaskMetricsGate(Gate):
    """A multi-task model: every task's offline metrics hold up against the champion's, each
    within its tolerance. One task regressing holds the version back and is named."""

    TO_STAGES = frozenset({Stage.shadow, Stage.canary, Stage.production})
    name = "task_metrics"

    def applies(self, ctx: GateContext) -> bool:
        return super().applies(ctx) and ctx.policy.tasks is not None

    def check(self, ctx: GateContext) -> GateResult:
        criteria = ctx.policy.tasks
        assert criteria is not None  # applies() guarantees it
        champ = ctx.champion
        if champ is None or champ.version == ctx.version.version:
            return self.ok("no champion to compare tasks with")
        higher = dict.fromkeys(criteria.lower_is_better, False)
        verdict = compare_tasks(
            ctx.version.metrics,
            champ.metrics,
            criteria.tolerances,
            criteria.default_tolerance,
            higher or True,
        )
        against = f" against champion v{champ.version}"
        if verdict.passed:
            return self.ok(verdict.reason + against)
        return self.hold(f"{', '.join(verdict.failed_tasks)} regressed{against}: {verdict.reason}")


class LineageGate(Gate):
    TO_STAGES = frozenset({Stage.production})
    name = "lineage"

    def applies(self, ctx: GateContext) -> bool:
        return super().applies(ctx) and ctx.policy.require_lineage

    def check(self, ctx: GateContext) -> GateResult:
        missing = []
        if not ctx.version.run_id:
            missing.append("training run")
        if ctx.version.dataset_count == 0:
            missing.append("training dataset")
        if not ctx.version.digest:
            missing.append("artifact digest")
        if ctx.policy.drift.require_reference and not ctx.version.reference_source:
            missing.append("reference data for the drift monitor")
        if missing:
            return self.hold("lineage lacks " + ", ".join(missing))
        return self.ok("run, datasets and digest recorded")


class StageFreeGate(Gate):
    """Shadow and canary hold one version each; wait until the slot frees up. Versions
    waiting for the slot queue in a stated order: first approved, first served."""

    TO_STAGES = frozenset({Stage.shadow, Stage.canary})
    name = "stage_free"

    def check(self, ctx: GateContext) -> GateResult:
        if ctx.occupant is not None and ctx.occupant.version != ctx.version.version:
            return self.hold(f"v{ctx.occupant.version} is in {ctx.to_stage}; move it on first")
        if ctx.queue_ahead:
            first = min(ctx.queue_ahead, key=lambda q: q.approved_at)
            return self.hold(
                f"{len(ctx.queue_ahead)} ahead in the queue for {ctx.to_stage} (first approved, "
                f"first served): v{first.version}, approved {first.approved_at:%Y-%m-%d %H:%M:%S}"
            )
        return self.ok(f"{ctx.to_stage} is free")


class ShadowReportGate(Gate):
    """shadow->canary: the shadow's answers were compared with the champion's, and held up."""

    FROM_STAGES = frozenset({Stage.shadow})
    TO_STAGES = frozenset({Stage.canary})
    name = "shadow_report"
    kind = "shadow"

    def applies(self, ctx: GateContext) -> bool:
        return super().applies(ctx) and self.required(ctx)

    def required(self, ctx: GateContext) -> bool:
        return ctx.policy.shadow.required

    def check(self, ctx: GateContext) -> GateResult:
        report = ctx.reports.get(self.kind)
        if report is None:
            return self.hold(f"no {self.kind} report yet (the {self.kind} flow writes it)")
        # Evidence counts only while it still describes this artifact against this champion.
        if report.digest != ctx.version.digest:
            return self.hold(f"the {self.kind} report judged another artifact: a new one is due")
        champion = ctx.champion.version if ctx.champion else None
        if report.champion_version != champion:
            return self.hold(
                f"the {self.kind} report compared with {_champion(report.champion_version)}; "
                f"the champion is {_champion(champion)}: a new one is due"
            )
        verdict = f"{self.kind} report: {report.reason}"
        return self.ok(verdict) if report.passed else self.hold(verdict)


def _champion(version: int | None) -> str:
    return "no champion" if version is None else f"v{version}"


class CanaryReportGate(ShadowReportGate):
    """canary->production: the canary's live error rate and latency stayed within the policy."""

    FROM_STAGES = frozenset({Stage.canary})
    TO_STAGES = frozenset({Stage.production})
    name = "canary_report"
    kind = "canary"

    def required(self, ctx: GateContext) -> bool:
        # An experiment, where the policy runs one, takes the threshold report's place.
        return ctx.policy.canary.required and ctx.policy.experiment is None


class ExperimentGate(ShadowReportGate):
    """canary->production: the A/B experiment decided the version wins (sequential test on
    the business metric, guardrails held), against this artifact and this champion."""

    FROM_STAGES = frozenset({Stage.canary})
    TO_STAGES = frozenset({Stage.production})
    name = "experiment"
    kind = "experiment"

    def required(self, ctx: GateContext) -> bool:
        return ctx.policy.experiment is not None


class OffPolicyGate(ShadowReportGate):
    """candidate->shadow: the candidate's reward, estimated offline from the champion's
    logged decisions, is at least the champion's minus the policy's margin."""

    FROM_STAGES = frozenset({Stage.candidate})
    TO_STAGES = frozenset({Stage.shadow})
    name = "offpolicy"
    kind = "offpolicy"

    def required(self, ctx: GateContext) -> bool:
        return ctx.policy.offpolicy is not None


class DriftAlarmGate(Gate):
    """By policy, an open drift alarm on the champion blocks other versions from production
    until someone acknowledges it: the evidence they were judged against has moved."""

    TO_STAGES = frozenset({Stage.production})
    name = "drift_alarm"

    def applies(self, ctx: GateContext) -> bool:
        return super().applies(ctx) and ctx.policy.drift.actions.block_promotions

    def check(self, ctx: GateContext) -> GateResult:
        alarm = ctx.champion_alarm
        if alarm is None or (ctx.champion and ctx.champion.version == ctx.version.version):
            return self.ok("no open drift alarm on the champion")
        features = ", ".join(alarm.drifted_features) or "the prediction"
        return self.hold(
            f"champion v{alarm.version} has an open drift alarm ({features}); "
            f"acknowledge alarm {alarm.id[:12]} first"
        )


GATES: tuple[Gate, ...] = (
    ApprovalsGate(),
    OfflineMetricGate(),
    TaskMetricsGate(),
    LineageGate(),
    StageFreeGate(),
    ShadowReportGate(),
    CanaryReportGate(),
    ExperimentGate(),
    OffPolicyGate(),
    DriftAlarmGate(),
)


def check_move(from_stage: Stage, to_stage: Stage) -> str | None:
    """Why a move can never happen, or None if the stage machine allows it."""
    if to_stage not in ALLOWED_MOVES[from_stage]:
        return f"a {from_stage} version cannot move to {to_stage}"
    return None


def evaluate(ctx: GateContext, gates: Sequence[Gate] = GATES) -> list[GateResult]:
    return [g.check(ctx) for g in gates if g.applies(ctx)]


def all_passed(results: Sequence[GateResult]) -> bool:
    return all(r.passed for r in results)
