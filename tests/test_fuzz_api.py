"""Schemathesis fuzzes the governance API in process, with a valid token for each role.

Every answer must be a status the OpenAPI document declares, with a body that matches the
declared schema, and never a server error. Each operation gets schema-driven cases (boundary
values, then random valid and invalid ones); then linked sequences run (list models, open a
transition, approve it...). The database is real SQLite, seeded through the real services.

`make test` runs the default profile: at least 300 cases (about 1,400 with the boundary
cases), the same ones every run.
`make fuzz` sets `STAGEGATE_FUZZ_CASES=10000`: at least that many, different on every run.
"""

from __future__ import annotations

import os
import sqlite3
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, seed, settings
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import ASGIClient
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy.engine import Engine

from stagegate.api.app import ROUTERS, create_app
from stagegate.api.deps import ANYONE
from stagegate.db import make_engine, transaction, utcnow
from stagegate.events.sink import MemorySink
from stagegate.governance import transitions
from stagegate.governance.models import TransitionStatus
from stagegate.governance.tokens import Principal
from stagegate.lifecycle.stages import Role
from stagegate.migrate import upgrade
from stagegate.settings import Settings
from stagegate.steps.apply import apply_transition
from stagegate.steps.intake import intake
from tests.factories import Factory
from tests.fakes import FakeRegistry

# An explicit size explores (new cases each run); the default profile repeats itself, so
# `make test` is not flaky. Either way the failing case is printed, shrunk.
CASES = int(os.environ.get("STAGEGATE_FUZZ_CASES", "300"))
EXPLORE = "STAGEGATE_FUZZ_CASES" in os.environ
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    response_schema_conformance,
    content_type_conformance,
    response_headers_conformance,
    negative_data_rejection,  # input off the schema must be refused, never accepted
]
# Callers: no token at all, then one token per role.
ROLES: tuple[Role | None, ...] = (None, *ANYONE)


def _schema_source() -> Any:
    """The app the OpenAPI document is read from at collection; requests go to `target`."""
    return create_app(
        Settings(home=Path("/nonexistent/stagegate-fuzz")),
        engine=make_engine("sqlite://"),
        sink=MemorySink(),
    )


schema = schemathesis.openapi.from_asgi("/api/openapi.json", _schema_source())
OPERATIONS = sum(1 for result in schema.get_all_operations() if result.ok())
# Half the budget goes to single operations (boundary cases come on top), half to sequences.
PER_OPERATION = max(10, CASES // (2 * OPERATIONS))


@dataclass
class Target:
    client: ASGIClient
    tokens: dict[Role, dict[str, str]]
    engine: Engine
    seeded: Path  # a copy of the database as seeded
    answers: Counter[tuple[str, int]] = field(default_factory=Counter)

    def reset(self) -> None:
        """Back to the seeded database, so a replayed sequence meets the same state."""
        raw = self.engine.raw_connection()
        try:
            with closing(sqlite3.connect(self.seeded)) as source:
                source.backup(raw.driver_connection)  # type: ignore[arg-type]
        finally:
            raw.close()

    @property
    def cases(self) -> int:
        return sum(self.answers.values())

    def authorize(self, case: schemathesis.Case, step: int | None = None) -> None:
        """Put the caller's token on the case: the next role at each step of a sequence (an
        author requests, then an approver decides...), else a function of the input, so that
        Hypothesis can replay it. Set on the case, not passed as an override, so schemathesis
        judges the header actually sent when it checks that invalid input was refused.
        """
        if step is None:
            # The generated headers count too: some operations take nothing else.
            key = repr(
                (case.operation.label, case.path_parameters, case.query, case.headers, case.body)
            )
            step = zlib.crc32(key.encode())
        role = ROLES[step % len(ROLES)]
        kept = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
        case.headers = kept if role is None else {**kept, **self.tokens[role]}

    def call(self, case: schemathesis.Case) -> None:
        self.authorize(case)
        response = case.call_and_validate(session=self.client, checks=CHECKS)
        self.answers[(case.operation.label, response.status_code)] += 1


def _seed(engine: Engine) -> None:
    """Two fraud versions from intake (v1 applied to shadow, v2 pending) and a ranker on v1."""
    registry, sink = FakeRegistry(), MemorySink()
    for version in (1, 2):
        registry.add("fraud", version)
        intake(engine, registry, sink, "fraud", version)
    with transaction(engine) as s:
        pending = transitions.list_transitions(
            s, model="fraud", status=TransitionStatus.pending, offset=0, limit=10
        )
        first = next(t.id for t in pending if t.version == 1)
        transitions.decide(
            s,
            principal=Principal("alice", Role.approver),
            transition_id=first,
            decision="approve",
            comment="seed",
            now=utcnow(),
        )
    apply_transition(engine, registry, first)
    Factory(engine).version("ranker", 1, depends_on=(("fraud", 1),))


@pytest.fixture(scope="module")
def target(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Target]:
    home = tmp_path_factory.mktemp("fuzz")
    url = f"sqlite:///{home / 'governance.db'}"
    upgrade(url)
    engine = make_engine(url)
    _seed(engine)
    factory = Factory(engine)
    tokens = {role: factory.token(f"fuzz-{role.value}", role) for role in ANYONE}
    seeded = home / "seeded.db"
    raw = engine.raw_connection()
    try:
        with closing(sqlite3.connect(seeded)) as copy:
            raw.driver_connection.backup(copy)  # type: ignore[union-attr]
    finally:
        raw.close()
    app = create_app(Settings(home=home / "home"), engine=engine, sink=MemorySink())
    with ASGIClient(app) as client:
        found = Target(client, tokens, engine, seeded)
        yield found
    engine.dispose()
    statuses: Counter[int] = Counter()
    for (_, status), n in found.answers.items():
        statuses[status] += n
    summary = (
        f"fuzz: {found.cases} cases over {OPERATIONS} operations; "
        f"answers by status {dict(sorted(statuses.items()))}"
    )
    if EXPLORE:  # `make fuzz`: how far the cases got, operation by operation
        by_operation: dict[str, dict[int, int]] = {}
        for (label, status), n in sorted(found.answers.items()):
            by_operation.setdefault(label, {})[status] = n
        summary += "".join(f"\n  {label}: {counts}" for label, counts in by_operation.items())
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is not None and reporter is not None:
        with capture.global_and_fixture_disabled():  # shown even though output is captured
            reporter.write_line("\n" + summary)


# Hypothesis keeps no example database: cases share one API database that changes as they
# run, so a stored example would not replay the same answer.
FUZZ_SETTINGS = settings(
    max_examples=PER_OPERATION,
    deadline=None,
    database=None,
    derandomize=not EXPLORE,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@schema.parametrize()
@FUZZ_SETTINGS
def test_each_operation(case: schemathesis.Case, target: Target) -> None:
    target.call(case)


def test_linked_sequences(target: Target) -> None:
    """Stateful phase: chains that feed one answer into the next call, until the budget."""

    class Workflow(schema.as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            # Links follow what the answers hold, so each sequence starts from the same state.
            target.reset()
            self.calls = 0

        def before_call(self, case: schemathesis.Case) -> None:
            self.calls += 1
            target.authorize(case, self.calls)

        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"session": target.client}

        def validate_response(self, response: Any, case: schemathesis.Case, **kwargs: Any) -> None:
            target.answers[(case.operation.label, response.status_code)] += 1
            case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs)

    before = target.cases
    rounds = 0
    while target.cases < CASES or target.cases == before:
        # A new seed each round, unless exploring: then Hypothesis draws its own.
        machine = Workflow if EXPLORE else seed(rounds)(Workflow)
        run_settings = settings(
            max_examples=max(10, (CASES - target.cases) // 10),
            stateful_step_count=10,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        schemathesis.stateful.run_state_machine_as_test(machine, settings=run_settings)
        rounds += 1
    assert target.cases >= CASES


def _routes() -> list[APIRoute]:
    return [r for router in ROUTERS for r in router.routes if isinstance(r, APIRoute)]


def _guard(route: APIRoute) -> frozenset[Role] | None:
    """The roles the route's authorization dependency lets in (None: no role check)."""
    stack = list(route.dependant.dependencies)
    while stack:
        dep = stack.pop()
        roles = getattr(dep.call, "__stagegate_roles__", None)
        if roles is not None:
            return frozenset(roles)
        stack.extend(dep.dependencies)
    return None


@pytest.mark.parametrize("route", _routes(), ids=lambda r: f"{sorted(r.methods)[0]} {r.path}")
def test_shared_errors_are_declared_where_they_apply(route: APIRoute) -> None:
    """What shared parts answer: tokens 401, roles 403, the body limits 413, StrictRoute 422
    (an unknown query parameter, on any route), the database 503.

    The fuzzer finds the rest; this catches a new route before any case reaches it.
    """
    declared = {int(s) for s in route.responses if str(s).isdigit()}
    needed = {422, 503}
    if route.path != "/api/health":
        needed.add(401)
    roles = _guard(route)
    if roles is not None and roles != frozenset(ANYONE):
        needed.add(403)
    if route.body_field is not None or "requestBody" in (route.openapi_extra or {}):
        needed.add(413)
    assert needed <= declared, f"undeclared: {sorted(needed - declared)}"
