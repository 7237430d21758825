"""Policies: which gates apply to which transition. They are data, stored per model."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from stagegate.lifecycle.serving_spec import ServingSpec
from stagegate.lifecycle.stages import ALLOWED_MOVES, Role, Stage


class ApprovalRule(BaseModel):
    """N approvals from the given roles, for moves from any of `from_stages` to `to_stages`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    from_stages: frozenset[Stage] = Field(description="Stages the version leaves.")
    to_stages: frozenset[Stage] = Field(description="Stages the version enters.")
    required: int = Field(ge=0, le=10, description="Approvals needed.")
    roles: frozenset[Role] = Field(description="Roles whose approvals count.")

    @field_validator("roles")
    @classmethod
    def _only_people_approve(cls, roles: frozenset[Role]) -> frozenset[Role]:
        if Role.service in roles or Role.viewer in roles:
            raise ValueError("only approver, admin or author roles may approve")
        return roles

    def covers(self, from_stage: Stage, to_stage: Stage) -> bool:
        return from_stage in self.from_stages and to_stage in self.to_stages


class TrafficSettings(BaseModel):
    """How the model's endpoint treats the shadow and canary stages once they are served."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    challenger_weight: float = Field(
        default=0.1, ge=0.0, le=1.0, description="Share of assignment keys the canary gets."
    )
    shadow_fraction: float = Field(
        default=1.0, ge=0.0, le=1.0, description="Share of requests mirrored to the shadow."
    )
    assignment_field: str | None = Field(
        default=None, description="JSON field with the assignment key when no header is sent."
    )


class ShadowCriteria(BaseModel):
    """When a shadow report passes: enough mirrored answers, close enough to the champion's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    required: bool = Field(default=True, description="shadow->canary needs a passed report.")
    min_comparisons: int = Field(default=200, ge=1, description="Mirrored requests compared.")
    min_agreement: float = Field(
        default=0.9, ge=0, le=1, description="Share of answers equal to the champion's."
    )
    max_error_rate: float = Field(default=0.01, ge=0, le=1, description="Shadow failures.")
    max_wait_s: float = Field(
        default=3600, gt=0, description="The shadow flow gives up (report failed) after this."
    )


class CanaryCriteria(BaseModel):
    """When a canary report passes (a policy threshold until sequential tests arrive)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    required: bool = Field(default=True, description="canary->production needs a passed report.")
    min_requests: int = Field(default=200, ge=1, description="Requests the canary answered.")
    max_error_rate_delta: float = Field(
        default=0.01, ge=0, le=1, description="Canary error rate minus the champion's."
    )
    max_latency_ratio: float = Field(
        default=1.5, gt=0, description="Canary median latency over the champion's..."
    )
    min_latency_delta_ms: float = Field(
        default=5.0,
        ge=0,
        description="...counted only when the medians also differ by this much. The median, "
        "not p99: a canary's few hundred requests make p99 mostly noise.",
    )
    max_wait_s: float = Field(default=3600, gt=0, description="The canary flow gives up after.")


NumericalTest = Literal["auto", "wasserstein", "ks", "jensenshannon"]
CategoricalTest = Literal["auto", "jensenshannon", "chisquare", "z"]
ColumnKind = Literal["numerical", "categorical"]
UnmappedAuthor = Literal["block", "warn"]
Authorship = Literal["registry", "attested"]


class DriftActions(BaseModel):
    """What a drifting window sets off. Each action happens once per alarm, however often the
    window is checked; the alarm stays open until someone acknowledges it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alert_url: str | None = Field(
        default=None,
        max_length=2000,
        description="POST a signed JSON alert here (HMAC-SHA256 of the body in "
        "`X-Stagegate-Signature`). Checked against the outbound allow-list before each call.",
    )
    rollback: bool = Field(
        default=False,
        description="Open a production->rolled_back transition for a drifting champion, "
        "requested by the service identity.",
    )
    rollback_applies_alone: bool = Field(
        default=False,
        description="The drift rollback needs no approval: the service's request is enough, "
        "and the audit log records it as the service's action.",
    )
    emit_event: bool = Field(
        default=True,
        description="Emit the Prefect event `stagegate.model.drift_detected` (a retraining "
        "deployment can trigger on it).",
    )
    block_promotions: bool = Field(
        default=False,
        description="While the champion has an open drift alarm, no other version may move "
        "to production until someone acknowledges the alarm.",
    )

    @field_validator("alert_url")
    @classmethod
    def _http_only(cls, url: str | None) -> str | None:
        # The full check (resolved addresses, allow-list) runs before every call; this one
        # refuses what can never be valid as early as the policy is written.
        if url is not None and not url.lower().startswith(("https://", "http://")):
            raise ValueError("alert_url must be an http(s) URL")
        return url


class DriftCriteria(BaseModel):
    """What the drift monitor checks and when it calls drift (see docs/monitoring.md).

    The defaults are Evidently's `DataDriftPreset`: "auto" picks its test per column type and
    size, a threshold of None takes that test's default, and the window drifts when at least
    `drift_share` of the tested columns drift.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    stages: frozenset[Stage] = Field(
        default=frozenset({Stage.production}),
        description="Stages whose versions are watched.",
    )
    window_s: float = Field(
        default=86400,
        gt=0,
        le=90 * 86400,
        description="Length of the current window of logged traffic.",
    )
    interval_s: float = Field(
        default=3600,
        ge=1,
        le=86400,
        description="How often the scheduled check looks. Windows end on multiples of this "
        "(UTC), so checking the same interval twice checks the same window.",
    )
    columns: tuple[str, ...] | None = Field(
        default=None,
        description="Feature columns to check; None checks every column of the reference "
        "except `exclude_columns`, the prediction and the label.",
    )
    exclude_columns: tuple[str, ...] = Field(
        default=(), description="Columns never checked (ids, timestamps)."
    )
    column_kinds: dict[str, ColumnKind] = Field(
        default_factory=dict,
        description="Numerical or categorical per column, overriding the kind inferred from "
        "the Arrow type (floats numerical; integers numerical above 10 distinct values in "
        "the reference, else categorical; strings, booleans and dictionaries categorical).",
    )
    numerical_test: NumericalTest = Field(
        default="auto",
        description="Test for numerical columns. 'auto' is Evidently's choice: above 1000 "
        "reference rows normalised Wasserstein (Jensen-Shannon with at most 5 distinct "
        "values), else K-S (chi-square or z with at most 5 or 2 distinct values).",
    )
    numerical_threshold: float | None = Field(
        default=None,
        gt=0,
        description="Threshold for numerical columns; None takes the test's default "
        "(0.1 for the distances, which drift at or above it; 0.05 for the p-values, "
        "which drift below it).",
    )
    categorical_test: CategoricalTest = Field(
        default="auto",
        description="Test for categorical columns. 'auto' is Evidently's choice: "
        "Jensen-Shannon above 1000 reference rows, else chi-square (z with two categories).",
    )
    categorical_threshold: float | None = Field(
        default=None,
        gt=0,
        description="Threshold for categorical columns; None takes the test's default.",
    )
    min_rows: int = Field(
        default=1000,
        ge=2,
        description="A column with fewer non-missing values than this in either window gets "
        "'insufficient data' instead of a verdict. Evidently's distance thresholds assume "
        "large samples: 300 rows drawn from the reference itself cross Wasserstein's 0.1 "
        "about one time in eight.",
    )
    drift_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="The window drifts when at least this share of the tested columns drift.",
    )
    prediction_column: str | None = Field(
        default=None, description="Column with the model's answer, checked for prediction drift."
    )
    label_column: str | None = Field(
        default=None,
        description="Column with the feedback label; with the prediction it gives accuracy "
        "(categorical) or MAE (numerical) for both windows.",
    )
    report_sample_rows: int = Field(
        default=50_000,
        ge=1000,
        le=1_000_000,
        description="Rows per window in the stored Evidently HTML report (a seeded sample).",
    )
    html_report: bool = Field(
        default=True, description="Store Evidently's HTML report with each decided check."
    )
    require_reference: bool = Field(
        default=False,
        description="Production needs a readable reference (training frame) for the monitor.",
    )
    actions: DriftActions = Field(
        default_factory=DriftActions, description="What a drifting window sets off, once per alarm."
    )

    @model_validator(mode="after")
    def _p_values_are_probabilities(self) -> DriftCriteria:
        for test, threshold in (
            (self.numerical_test, self.numerical_threshold),
            (self.categorical_test, self.categorical_threshold),
        ):
            if test in ("ks", "chisquare", "z") and threshold is not None and threshold >= 1:
                raise ValueError(f"a {test} threshold is a p-value and must be below 1")
        return self


class TaskCriteria(BaseModel):
    """A multi-task model judged per task: run metrics named `task/<task>/<metric>` are
    compared one by one with the champion's, each within its tolerance."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default_tolerance: float = Field(
        default=0.0, ge=0, description="Largest allowed regression, in the metric's units."
    )
    tolerances: dict[str, float] = Field(
        default_factory=dict,
        description="Per full metric name (`task/ads/auc`) or per task (`ads`): its tolerance.",
    )
    lower_is_better: frozenset[str] = Field(
        default=frozenset(),
        description="Metric names (`logloss`) or full names where lower is better.",
    )

    @field_validator("tolerances")
    @classmethod
    def _non_negative(cls, tolerances: dict[str, float]) -> dict[str, float]:
        bad = [k for k, v in tolerances.items() if not v >= 0]
        if bad:
            raise ValueError(f"tolerances must be >= 0: {', '.join(sorted(bad))}")
        return tolerances


class OffPolicyCriteria(BaseModel):
    """candidate->shadow: replay the champion's logged decisions and estimate the candidate's
    reward before it serves a request (docs/off-policy.md). The champion's answers must carry
    the action it took and that action's probability."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    action_column: str = Field(
        default="prediction.action",
        min_length=1,
        max_length=200,
        description="Logged feature-row column with the champion's action (an integer "
        "0..K-1): `prediction.<key>` for an answer that is an object per row.",
    )
    propensity_column: str = Field(
        default="prediction.propensity",
        min_length=1,
        max_length=200,
        description="Logged column with the probability the champion gave that action.",
    )
    context_columns: tuple[str, ...] | None = Field(
        default=None,
        description="Columns the candidate scores and the reward model reads; None takes "
        "every logged feature column (the reward model uses the numeric ones).",
    )
    reward: str = Field(
        min_length=1,
        max_length=200,
        description="The reward: the label's field of this name, or a plain number label.",
    )
    estimator: Literal["ips", "snips", "dr"] = Field(
        default="dr", description="Doubly robust (with a learned reward model), IPS or SNIPS."
    )
    margin: float = Field(
        default=0.0, ge=0, description="Passes when candidate >= champion - margin (reward units)."
    )
    confidence: float = Field(
        default=0.95, gt=0.5, lt=1, description="One-sided confidence of that comparison."
    )
    min_rows: int = Field(
        default=1000, ge=2, description="Rows with a valid propensity and a reward needed."
    )
    insufficient_data_blocks: bool = Field(
        default=True, description="Whether 'insufficient data' holds the candidate back."
    )
    window_s: float = Field(
        default=7 * 86400,
        gt=0,
        le=90 * 86400,
        description="How far back the champion's logged decisions are read.",
    )


ExperimentMetricKind = Literal["bernoulli", "continuous"]


class ExperimentActions(BaseModel):
    """What an experiment's decision may do by itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_promotion: bool = Field(
        default=True,
        description="A win opens the canary->production transition, requested by the service "
        "identity. It still waits for its approvers.",
    )
    rollback_on_breach: bool = Field(
        default=True,
        description="A guardrail breach opens a canary->rolled_back transition, requested by "
        "the service identity.",
    )
    rollback_applies_alone: bool = Field(
        default=False,
        description="That rollback needs no approval: the breach on record is enough, and the "
        "audit log records it as the service's action.",
    )


class ExperimentCriteria(BaseModel):
    """The canary as an A/B experiment: a sequential test on a business metric from feedback
    labels, with sequential guardrails on errors and latency (see docs/experiments.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str = Field(
        min_length=1,
        max_length=200,
        description="The metric: the label's field of this name when labels are JSON "
        "objects; a plain number (or boolean) label is the metric itself.",
    )
    kind: ExperimentMetricKind = Field(
        default="bernoulli", description="Conversion (0/1) or a continuous value."
    )
    higher_is_better: bool = Field(default=True, description="Direction of the metric.")
    unit: Literal["key", "request"] = Field(
        default="key",
        description="What is randomised: the assignment key (a user; its requests' metric is "
        "averaged) or each request. Requests without a key count as their own unit.",
    )
    attribution_window_s: float = Field(
        default=3600,
        gt=0,
        le=90 * 86400,
        description="How long after a request its label may arrive. Later labels are ignored.",
    )
    missing_label: Literal["zero", "exclude"] = Field(
        default="zero",
        description="A request still unlabelled after the window counts as 0, or not at all.",
    )
    alpha: float = Field(default=0.05, gt=0, lt=0.5, description="Error rate of the test.")
    min_effect: float = Field(
        default=0.0, ge=0, description="A win must beat the champion by more than this."
    )
    min_samples: int = Field(default=200, ge=2, description="Units per arm before any decision.")
    max_samples: int = Field(
        default=100_000,
        ge=2,
        description="Units per arm at which the test stops; the test is designed for this "
        "maximum (its last look spends the alpha left), so set it to about 1.1x the "
        "fixed-horizon sample of the effect worth detecting (docs/experiments.md).",
    )
    max_duration_s: float = Field(
        default=7 * 86400, gt=0, description="The experiment stops after this long."
    )
    winsorize_quantile: float | None = Field(
        default=None,
        gt=0.5,
        lt=1,
        description="Cap unit values at this quantile of both arms together (heavy tails).",
    )
    cuped: bool = Field(
        default=False,
        description="Adjust by each unit's pre-period mean of the same metric (CUPED).",
    )
    pre_period_s: float = Field(
        default=7 * 86400,
        gt=0,
        le=90 * 86400,
        description="CUPED's pre-period: this long before the canary started.",
    )
    max_error_rate_increase: float = Field(
        default=0.01, ge=0, le=1, description="Guardrail: error rate over the champion's."
    )
    max_latency_increase_ms: float = Field(
        default=50, ge=0, description="Guardrail: mean latency over the champion's, in ms."
    )
    actions: ExperimentActions = Field(default_factory=ExperimentActions)

    @model_validator(mode="after")
    def _bounds(self) -> ExperimentCriteria:
        if self.max_samples < self.min_samples:
            raise ValueError("max_samples must be at least min_samples")
        return self


class Policy(BaseModel):
    """Gate settings for one model (or the default for all)."""

    model_config = ConfigDict(extra="forbid")

    approvals: list[ApprovalRule] = Field(description="First matching rule wins.")
    approval_ttl_days: int = Field(default=7, ge=1, le=365, description="Approvals expire.")
    primary_metric: str | None = Field(
        default=None,
        description="Run metric compared with the champion's before canary and production.",
    )
    higher_is_better: bool = Field(default=True, description="Direction of `primary_metric`.")
    require_lineage: bool = Field(
        default=True, description="Production needs a training run and at least one dataset."
    )
    traffic: TrafficSettings = Field(default_factory=TrafficSettings)
    shadow: ShadowCriteria = Field(default_factory=ShadowCriteria)
    canary: CanaryCriteria = Field(default_factory=CanaryCriteria)
    drift: DriftCriteria = Field(default_factory=DriftCriteria)
    tasks: TaskCriteria | None = Field(
        default=None,
        description="Judge `task/<task>/<metric>` run metrics task by task against the "
        "champion's, before shadow, canary and production.",
    )
    offpolicy: OffPolicyCriteria | None = Field(
        default=None,
        description="Gate candidate->shadow on an offline counterfactual estimate of the "
        "candidate's reward from the champion's logged decisions.",
    )
    experiment: ExperimentCriteria | None = Field(
        default=None,
        description="Run the canary as an A/B experiment; its decision replaces the canary "
        "report at the canary->production gate.",
    )
    unmapped_author: UnmappedAuthor | None = Field(
        default=None,
        description="When a version's MLflow author is linked to no identity: 'block' refuses "
        "approvals (until an admin links the name), 'warn' counts them and records a warning. "
        "None: 'block' in prod mode, 'warn' in dev mode.",
    )
    authorship: Authorship | None = Field(
        default=None,
        description="Who wrote a version, for separation of duties: 'registry' trusts the "
        "MLflow author (a name the MLflow client sends); 'attested' also holds approvals of "
        "moves into shadow, canary or production until an authenticated identity attests "
        "authorship of the version's artifact (POST .../authorship), and that identity may "
        "not approve either. None: 'attested' in prod mode, 'registry' in dev mode.",
    )
    serving: ServingSpec = Field(
        default_factory=ServingSpec,
        description="How versions run on Kubernetes (docs/kubernetes.md).",
    )

    def approval_rule(self, from_stage: Stage, to_stage: Stage) -> ApprovalRule | None:
        return next((r for r in self.approvals if r.covers(from_stage, to_stage)), None)

    @field_validator("approvals")
    @classmethod
    def _covers_every_move(cls, rules: list[ApprovalRule]) -> list[ApprovalRule]:
        missing = [
            f"{a}->{b}"
            for a, targets in ALLOWED_MOVES.items()
            for b in targets
            if not any(r.covers(a, b) for r in rules)
        ]
        if missing:
            raise ValueError(f"no approval rule covers {', '.join(sorted(missing))}")
        return rules


PEOPLE = frozenset({Role.approver, Role.admin})


def default_policy() -> Policy:
    """The platform default; see docs/stages-and-gates.md."""
    everything = frozenset(Stage)
    return Policy(
        approvals=[
            ApprovalRule(
                from_stages=frozenset({Stage.canary}),
                to_stages=frozenset({Stage.production}),
                required=2,
                roles=frozenset({Role.approver}),
            ),
            ApprovalRule(
                from_stages=frozenset({Stage.candidate, Stage.shadow}),
                to_stages=frozenset({Stage.shadow, Stage.canary}),
                required=1,
                roles=PEOPLE,
            ),
            ApprovalRule(
                from_stages=frozenset({Stage.production}),
                to_stages=frozenset({Stage.retired}),
                required=1,
                roles=PEOPLE,
            ),
            ApprovalRule(
                from_stages=everything,
                to_stages=frozenset({Stage.rolled_back, Stage.rejected}),
                required=1,
                roles=PEOPLE,
            ),
        ],
    )
