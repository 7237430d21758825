"""The pure domain: stage moves, policies and gates."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from stagegate.lifecycle import gates
from stagegate.lifecycle.gates import ApprovalFacts, GateContext, VersionFacts
from stagegate.lifecycle.policy import ApprovalRule, Policy, default_policy
from stagegate.lifecycle.stages import Role, Stage

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def facts(
    version: int = 2,
    *,
    stage: Stage = Stage.canary,
    accuracy: float | None = 0.9,
    digest: str = "d2",
    datasets: int = 1,
    run_id: str | None = "r",
) -> VersionFacts:
    metrics = {} if accuracy is None else {"accuracy": accuracy}
    return VersionFacts("m", version, stage, digest, "dana", run_id, metrics, datasets)


def approval(
    who: str,
    *,
    role: Role = Role.approver,
    age_days: float = 0,
    digest: str = "d2",
    approve: bool = True,
) -> ApprovalFacts:
    return ApprovalFacts(who, role, approve, digest, NOW - timedelta(days=age_days))


def ctx(
    *approvals: ApprovalFacts,
    frm: Stage = Stage.canary,
    to: Stage = Stage.production,
    version: VersionFacts | None = None,
    champion: VersionFacts | None = None,
    policy: Policy | None = None,
    occupant: VersionFacts | None = None,
) -> GateContext:
    return GateContext(
        frm,
        to,
        "erin",
        version or facts(stage=frm),
        champion,
        approvals,
        policy or default_policy(),
        NOW,
        occupant,
    )


def by_name(c: GateContext) -> dict[str, gates.GateResult]:
    return {r.gate: r for r in gates.evaluate(c)}


@pytest.mark.parametrize(
    ("frm", "to", "ok"),
    [
        (Stage.candidate, Stage.shadow, True),
        (Stage.candidate, Stage.production, False),
        (Stage.shadow, Stage.canary, True),
        (Stage.canary, Stage.production, True),
        (Stage.production, Stage.retired, True),
        (Stage.production, Stage.rolled_back, True),
        (Stage.retired, Stage.production, False),
        (Stage.rejected, Stage.shadow, False),
    ],
)
def test_stage_machine(frm: Stage, to: Stage, ok: bool) -> None:
    assert (gates.check_move(frm, to) is None) == ok


def test_production_needs_two_fresh_approvers_on_the_same_digest() -> None:
    assert not by_name(ctx(approval("alice")))["approvals"].passed
    assert by_name(ctx(approval("alice"), approval("bob")))["approvals"].passed
    # the same person twice counts once
    assert not by_name(ctx(approval("alice"), approval("alice")))["approvals"].passed
    # expired after 7 days
    stale = ctx(approval("alice"), approval("bob", age_days=7.01))
    assert not by_name(stale)["approvals"].passed
    # bound to the digest: an approval of another artifact does not count
    swapped = ctx(approval("alice"), approval("bob", digest="other"))
    assert not by_name(swapped)["approvals"].passed
    # admins may not stand in for approvers on canary->production
    assert not by_name(ctx(approval("alice"), approval("root", role=Role.admin)))[
        "approvals"
    ].passed


def test_requester_and_author_approvals_never_count() -> None:
    c = ctx(approval("erin"), approval("dana"), approval("alice"))
    assert gates.counting_approvers(c) == ["alice"]


def test_rejections_do_not_count_as_approvals() -> None:
    assert not by_name(ctx(approval("alice"), approval("bob", approve=False)))["approvals"].passed


def test_metric_gate_compares_with_the_champion_of_the_moment() -> None:
    policy = default_policy().model_copy(update={"primary_metric": "accuracy"})
    base = (approval("alice"), approval("bob"))
    better = ctx(*base, policy=policy, champion=facts(1, stage=Stage.production, accuracy=0.8))
    worse = ctx(*base, policy=policy, champion=facts(1, stage=Stage.production, accuracy=0.95))
    alone = ctx(*base, policy=policy)
    missing = ctx(*base, policy=policy, version=facts(accuracy=None))
    assert by_name(better)["offline_metric"].passed
    assert not by_name(worse)["offline_metric"].passed
    assert "worse" in by_name(worse)["offline_metric"].reason
    assert by_name(alone)["offline_metric"].passed
    assert not by_name(missing)["offline_metric"].passed
    lower = policy.model_copy(update={"higher_is_better": False})
    assert by_name(
        ctx(*base, policy=lower, champion=facts(1, stage=Stage.production, accuracy=0.95))
    )["offline_metric"].passed


def test_metric_gate_only_when_the_policy_names_a_metric() -> None:
    assert "offline_metric" not in by_name(ctx())


def test_lineage_gate_before_production() -> None:
    res = by_name(ctx(version=facts(datasets=0, run_id=None)))["lineage"]
    assert not res.passed
    assert "training run" in res.reason
    assert "training dataset" in res.reason
    assert "lineage" not in by_name(ctx(frm=Stage.candidate, to=Stage.shadow))


def test_shadow_slot_must_be_free() -> None:
    held = ctx(
        approval("alice"),
        frm=Stage.candidate,
        to=Stage.shadow,
        version=facts(stage=Stage.candidate),
        occupant=facts(1, stage=Stage.shadow),
    )
    assert not by_name(held)["stage_free"].passed
    free = ctx(
        approval("alice"),
        frm=Stage.candidate,
        to=Stage.shadow,
        version=facts(stage=Stage.candidate),
    )
    assert gates.all_passed(gates.evaluate(free))


def test_policy_must_cover_every_move() -> None:
    with pytest.raises(ValidationError, match="no approval rule covers"):
        Policy(
            approvals=[
                ApprovalRule(
                    from_stages=frozenset({Stage.candidate}),
                    to_stages=frozenset({Stage.shadow}),
                    required=1,
                    roles=frozenset({Role.approver}),
                )
            ]
        )


def test_service_accounts_cannot_be_approvers() -> None:
    with pytest.raises(ValidationError, match="only approver"):
        ApprovalRule(
            from_stages=frozenset(Stage),
            to_stages=frozenset(Stage),
            required=1,
            roles=frozenset({Role.service}),
        )


def test_the_lineage_gate_can_require_a_reference_for_the_drift_monitor() -> None:
    base = default_policy()
    strict = base.model_copy(
        update={"drift": base.drift.model_copy(update={"require_reference": True})}
    )
    without = by_name(ctx(version=facts(), policy=strict))["lineage"]
    assert not without.passed
    assert "reference data for the drift monitor" in without.reason
    with_ref = replace(facts(), reference_source="runs:/r/stagegate/reference")
    assert by_name(ctx(version=with_ref, policy=strict))["lineage"].passed
    assert by_name(ctx(version=facts()))["lineage"].passed  # not required by default
