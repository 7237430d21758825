"""The web UI in a real browser: Playwright drives Debian's chromium against the API served
by uvicorn in this process, with data made through the real services. Every chart is checked
on the data points it drew, against what the API answers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright
from sqlalchemy.engine import Engine

from stagegate.db import transaction
from stagegate.demo import PEOPLE, write_demo_users
from stagegate.governance import audit, evaluations, experiments, tokens
from stagegate.governance.models import Evaluation, ExperimentLook
from stagegate.lifecycle.stages import Stage
from stagegate.settings import Settings
from tests.factories import Factory

pytestmark = pytest.mark.slow  # chromium is a process

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
Json = dict[str, Any]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context(timezone_id="UTC", accept_downloads=True)
    ctx.set_default_timeout(10_000)
    yield ctx
    ctx.close()


@pytest.fixture
def people(engine: Engine) -> dict[str, str]:
    """The demo's people, each with a token secret."""
    with transaction(engine) as s:
        return {n: tokens.create_token(s, name=n, role=r, actor="test") for n, r in PEOPLE.items()}


class Api:
    """The API as each person calls it, to seed and to know what the pages should show."""

    def __init__(self, url: str, people: dict[str, str]) -> None:
        self.http = httpx.Client(base_url=url, timeout=10)
        self.people = people

    def __call__(self, who: str, method: str, path: str, **kw: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.people[who]}"}
        r = self.http.request(method, f"/api/v1{path}", headers=headers, **kw)
        assert r.status_code < 300, r.text
        return r.json()

    def request(self, who: str, model: str, version: int, to: str) -> Json:
        body = {"model": model, "version": version, "to_stage": to, "reason": f"move to {to}"}
        out: Json = self(who, "POST", "/transitions", json=body)
        return out


@pytest.fixture
def api(live_api_url: str, people: dict[str, str]) -> Iterator[Api]:
    a = Api(live_api_url, people)
    yield a
    a.http.close()


def open_as(context: BrowserContext, url: str, secret: str, page: str = "#/fleet") -> Page:
    """Sign in through the page's form, then go to `page`."""
    p = context.new_page()
    p.goto(f"{url}/ui/")
    p.fill("#token", secret)
    p.click("#login-form button[type=submit]")
    expect(p.locator("#view[data-page=fleet][data-ready=true]")).to_be_visible()
    if page != "#/fleet":
        go(p, page)
    return p


def go(p: Page, hash_: str) -> None:
    p.evaluate("h => { location.hash = h }", hash_)
    name = hash_.removeprefix("#/").split("/")[0].split("?")[0]
    expect(p.locator(f"#view[data-page={name}][data-ready=true]")).to_be_visible()


def points(p: Page, chart: str) -> list[dict[str, str]]:
    """Every point the chart drew, with its data attributes."""
    result: list[dict[str, str]] = p.eval_on_selector_all(
        f"svg[data-chart={chart}] circle.point",
        "els => els.map(e => Object.assign({}, e.dataset))",
    )
    return result


def num(value: str | None) -> float | None:
    return None if value in (None, "") else float(value)


# -- seeds ---------------------------------------------------------------------------------


def seed_evidence(engine: Engine, model: str, version: int, champion: int) -> None:
    """A shadow's reports, a canary's A/B looks and decision, and drift checks, shaped as
    steps/evaluate.py, steps/experiment.py and steps/drift.py record them."""
    with transaction(engine) as s:
        for i, agreement in enumerate([0.71, 0.78, 0.83]):
            e = evaluations.record(
                s,
                model=model,
                version=version,
                kind="shadow",
                passed=agreement >= 0.75,
                reason=f"agreement {agreement:.1%}",
                sample_size=200 + 100 * i,
                summary={
                    "arm": {"requests": 300, "errors": 0, "p50_ms": 3.1, "p99_ms": 9.0},
                    "champion": {"requests": 300, "errors": 0, "p50_ms": 3.0, "p99_ms": 8.0},
                    "compared": 200 + 100 * i,
                    "agreement": agreement,
                    "mean_abs_delta": None,
                },
                window_start=T0 + timedelta(hours=i),
                actor="shadow-flow",
                champion_version=champion,
            )
            e.created_at = T0 + timedelta(hours=i, minutes=30)
        start = T0 + timedelta(hours=4)
        for i, (n_t, n_c, est, lo, hi, action) in enumerate(
            [
                (40, 38, 0.05, None, None, "continue"),
                (120, 118, 0.031, -0.02, 0.08, "continue"),
                (400, 395, 0.024, 0.004, 0.045, "promote"),
            ]
        ):
            experiments.record_look(
                s,
                ExperimentLook(
                    model_name=model,
                    version=version,
                    champion_version=champion,
                    window_start=start,
                    at=start + timedelta(minutes=10 * i),
                    action=action,
                    n_treatment=n_t,
                    n_control=n_c,
                    estimate=est,
                    lower=lo,
                    upper=hi,
                    detail={"primary": {"p_value": 0.5 / (i + 1)}, "guardrails": {}},
                ),
            )
        evaluations.record(
            s,
            model=model,
            version=version,
            kind="experiment",
            passed=True,
            reason="the canary's effect is above zero at 95%",
            sample_size=795,
            summary={"action": "promote", "breached": []},
            window_start=start,
            actor="experiment-flow",
            champion_version=champion,
        )
        for i, (f0, f1) in enumerate([(0.02, 0.03), (0.04, 0.06), (0.05, 0.21)]):
            drifted = ["f1"] if f1 > 0.1 else []
            row: Evaluation = evaluations.record(
                s,
                model=model,
                version=version,
                kind="drift",
                passed=not drifted,
                reason="drift in f1" if drifted else "no drift",
                sample_size=500,
                summary={
                    "verdict": "drift" if drifted else "ok",
                    "drifted_features": drifted,
                    "columns": [
                        {
                            "column": c,
                            "kind": "num",
                            "test": "wasserstein",
                            "threshold": 0.1,
                            "score": sc,
                            "drifted": sc > 0.1,
                            "verdict": "drift" if sc > 0.1 else "ok",
                        }
                        for c, sc in (("f0", f0), ("f1", f1))
                    ],
                    "prediction": None,
                    "report": f"drift/{model}/{version}/{i}.html" if i == 2 else None,
                },
                window_start=T0 + timedelta(days=1, hours=i),
                window_end=T0 + timedelta(days=1, hours=i + 1),
                actor="drift-flow",
            )
            assert row.id is not None


# -- tests ---------------------------------------------------------------------------------


def test_demo_user_picker_signs_in_and_the_token_stays_in_session_storage(
    context: BrowserContext, live_api_url: str, settings: Settings, people: dict[str, str]
) -> None:
    write_demo_users(settings, people)
    p = context.new_page()
    response = p.goto(f"{live_api_url}/ui/")
    assert response is not None
    assert "script-src 'self'" in response.headers["content-security-policy"]
    pickers = p.locator("#demo-users button[data-user]")
    expect(pickers).to_have_count(len(PEOPLE))
    p.click("#demo-users button[data-user=alice]")
    expect(p.locator("#who [data-me=alice][data-role=approver]")).to_be_visible()
    assert p.evaluate("sessionStorage.getItem('stagegate.token')") == people["alice"]
    assert p.evaluate("document.cookie") == ""
    assert people["alice"] not in p.url
    assert not context.cookies()
    # A new tab shares no session storage: it asks for a token again.
    other = context.new_page()
    other.goto(f"{live_api_url}/ui/#/audit")
    expect(other.locator("#login-form")).to_be_visible()
    other.fill("#token", "sg_not_a_token")
    other.click("#login-form button[type=submit]")
    expect(other.locator("#login-error")).not_to_be_empty()
    other.fill("#token", people["vic"])
    other.click("#login-form button[type=submit]")  # the deep link survives signing in
    expect(other.locator("#view[data-page=audit][data-ready=true]")).to_be_visible()
    expect(other.locator("#who [data-me=vic]")).to_be_visible()
    p.click("#sign-out")
    expect(p.locator("#login-form")).to_be_visible()
    assert p.evaluate("sessionStorage.getItem('stagegate.token')") is None


def test_approver_approves_in_the_inbox_and_status_and_gates_change(
    context: BrowserContext, live_api_url: str, api: Api, factory: Factory, people: dict[str, str]
) -> None:
    factory.version("fraud", 1, creator="dana")
    t = api.request("dana", "fraud", 1, Stage.shadow)
    before = api("alice", "GET", f"/transitions/{t['id']}")
    assert before["status"] == "pending"
    assert before["allowed_actions"]["approve"]["allowed"]
    p = open_as(context, live_api_url, people["alice"], "#/inbox")
    card = p.locator(f"[data-transition='{t['id']}']")
    expect(card.locator("[data-field=status]")).to_have_text("pending")
    shown = {
        g.get_attribute("data-gate"): g.get_attribute("data-passed")
        for g in card.locator("[data-gate]").all()
    }
    assert shown == {g["gate"]: str(g["passed"]).lower() for g in before["gates"]}
    assert "false" in shown.values()  # the approval is still missing

    card.locator("[data-comment]").fill("shadow it")
    card.locator("button[data-action=approve]").click()
    expect(card.locator("[data-field=status]")).to_have_text("approved")
    after = api("alice", "GET", f"/transitions/{t['id']}")
    assert after["status"] == "approved"
    card = p.locator(f"[data-transition='{t['id']}']")
    shown_after = {
        g.get_attribute("data-gate"): g.get_attribute("data-passed")
        for g in card.locator("[data-gate]").all()
    }
    assert shown_after == {g["gate"]: str(g["passed"]).lower() for g in after["gates"]}
    assert shown_after != shown
    assert "false" not in shown_after.values()
    expect(card.locator("[data-approver=alice][data-decision=approve]")).to_contain_text(
        "shadow it"
    )
    # Decided: the control is now off, with the API's reason.
    expect(card.locator("button[data-action=approve]")).to_be_disabled()
    expect(card.locator("[data-reason-for=approve]")).to_have_text(
        after["allowed_actions"]["approve"]["reason"]
    )


def test_the_authors_own_request_shows_a_disabled_approve_with_its_reason(
    context: BrowserContext, live_api_url: str, api: Api, factory: Factory, people: dict[str, str]
) -> None:
    factory.version("fraud", 1, creator="dana")
    t = api.request("dana", "fraud", 1, Stage.shadow)
    verdict = api("dana", "GET", f"/transitions/{t['id']}")["allowed_actions"]["approve"]
    assert not verdict["allowed"]
    assert verdict["reason"]
    p = open_as(context, live_api_url, people["dana"], "#/inbox")
    card = p.locator(f"[data-transition='{t['id']}']")
    expect(card.locator("button[data-action=approve]")).to_be_disabled()
    expect(card.locator("[data-reason-for=approve]")).to_have_text(verdict["reason"])
    expect(card.locator("button[data-action=approve]")).to_have_attribute(
        "title", verdict["reason"]
    )
    expect(p.locator("#inbox-summary")).to_have_attribute("data-actionable", "0")
    p.check("#only-mine")  # what she may act on: nothing
    expect(p.locator("#view[data-page=inbox][data-ready=true] #only-mine")).to_be_checked()
    expect(p.locator("[data-transition]")).to_have_count(0)
    # The viewer sees it too, with the role refusal.
    vic = api("vic", "GET", f"/transitions/{t['id']}")["allowed_actions"]["reject"]
    v = open_as(context, live_api_url, people["vic"], "#/inbox")
    card = v.locator(f"[data-transition='{t['id']}']")
    expect(card.locator("button[data-action=reject]")).to_be_disabled()
    expect(card.locator("[data-reason-for=reject]")).to_have_text(vic["reason"])


def test_model_page_draws_the_timeline_and_every_evidence_chart(
    context: BrowserContext,
    live_api_url: str,
    api: Api,
    engine: Engine,
    factory: Factory,
    people: dict[str, str],
) -> None:
    factory.version("fraud", 1)
    factory.version("fraud", 2)
    factory.place("fraud", 1, Stage.production)
    factory.place("fraud", 2, Stage.shadow)
    factory.place("fraud", 2, Stage.canary)
    seed_evidence(engine, "fraud", 2, champion=1)
    p = open_as(context, live_api_url, people["vic"], "#/models/fraud?v=2")

    # The timeline: one bar per deployment window the API lists, per version.
    bars = p.eval_on_selector_all(
        "svg[data-chart=timeline] rect.window", "els => els.map(e => Object.assign({}, e.dataset))"
    )
    expected = [
        (v, d["role"], d["started_at"])
        for v in (1, 2)
        for d in api("vic", "GET", f"/models/fraud/versions/{v}/deployments")
    ]
    assert len(expected) == 3
    assert sorted((int(b["version"]), b["role"], b["start"]) for b in bars) == sorted(
        (
            v,
            role,
            datetime.fromisoformat(at)
            .astimezone(UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
        )
        for v, role, at in expected
    )
    fleet = next(m for m in api("vic", "GET", "/fleet")["models"] if m["name"] == "fraud")
    traffic = p.locator("#traffic")
    expect(traffic).to_have_attribute("data-champion", "1")
    expect(traffic).to_have_attribute("data-challenger", "2")
    assert (
        num(traffic.get_attribute("data-challenger-weight"))
        == fleet["traffic"]["challenger_weight"]
    )

    # Shadow agreement: one point per report, oldest first, and the policy's minimum.
    shadow = points(p, "shadow")
    reports = [
        e
        for e in api("vic", "GET", "/models/fraud/versions/2/evaluations")
        if e["kind"] == "shadow"
    ]
    assert sorted(float(pt["y"]) for pt in shadow) == sorted(
        e["summary"]["agreement"] for e in reports
    )
    assert [float(pt["y"]) for pt in shadow] == [0.71, 0.78, 0.83]
    policy = api("vic", "GET", "/models/fraud/policy")
    threshold = p.get_attribute("svg[data-chart=shadow] line.threshold", "data-threshold")
    assert num(threshold) == policy["shadow"]["min_agreement"]

    # The experiment: effect and interval as samples grow, and the decision.
    exp = api("vic", "GET", "/models/fraud/versions/2/experiment")
    drawn = [
        (num(pt["x"]), num(pt["y"]), num(pt.get("lo")), num(pt.get("hi")), pt["action"])
        for pt in points(p, "experiment")
    ]
    assert drawn == [
        (
            lk["n_treatment"] + lk["n_control"],
            lk["estimate"],
            lk["lower"],
            lk["upper"],
            lk["action"],
        )
        for lk in exp["looks"]
    ]
    assert p.locator("svg[data-chart=experiment] line.whisker").count() == 2  # bounded looks
    decision = p.locator("#experiment-decision")
    expect(decision).to_have_attribute("data-action", exp["decision"]["action"])
    expect(decision).to_contain_text(exp["decision"]["reason"])

    # Drift: a series per feature, a point per check, linked to its HTML report.
    history = api("vic", "GET", "/models/fraud/versions/2/drift")
    want = {
        (col["column"], c["id"], col["score"], c["report_url"] or "")
        for c in history["checks"]
        for col in c["columns"]
    }
    got = {
        (pt["series"], int(pt["check"]), float(pt["y"]), pt["report"]) for pt in points(p, "drift")
    }
    assert got == want
    assert len(got) == 6
    assert any(r for *_, r in got)  # the check with a stored report links to it
    expect(p.locator("#drift-checks button[data-report]")).to_have_count(1)

    # What served production at a time, and who approved it.
    p.click("#production-answer >> xpath=.. >> button[type=submit]")
    answer = api("vic", "GET", "/models/fraud/production")
    expect(p.locator("#production-answer [data-version]")).to_have_attribute(
        "data-version", str(answer["version"])
    )
    expect(p.locator("#production-answer [data-approvers]")).to_have_attribute(
        "data-approvers", ",".join(a["approver"] for a in answer["approved_by"])
    )


def test_fleet_lineage_audit_and_card_pages_show_what_the_api_holds(
    context: BrowserContext,
    live_api_url: str,
    api: Api,
    engine: Engine,
    factory: Factory,
    people: dict[str, str],
) -> None:
    factory.version("fraud", 1)
    factory.place("fraud", 1, Stage.production)
    factory.version("fraud", 2, creator="dana", datasets=2)
    factory.version("fraud", 3, creator="dana")
    factory.version("scorer", 1, depends_on=(("fraud", 2),))
    t2 = api.request("dana", "fraud", 2, Stage.shadow)
    api(
        "alice",
        "POST",
        f"/transitions/{t2['id']}/approvals",
        json={"decision": "approve", "comment": "ok"},
    )
    t3 = api.request("dana", "fraud", 3, Stage.shadow)
    no = {"decision": "reject", "comment": "latency too high"}
    api("bob", "POST", f"/transitions/{t3['id']}/approvals", json=no)
    api.request("dana", "scorer", 1, Stage.shadow)  # left pending
    with transaction(engine) as s:  # enough audit rows for a second page
        for i in range(55):
            audit.append(
                s, actor="bulk", action="test.filler", entity_type="test", entity_id=str(i), data={}
            )
    p = open_as(context, live_api_url, people["bob"])

    # Fleet: the figures and each model's row.
    fleet = api("bob", "GET", "/fleet")
    row = p.locator("tr[data-model=fraud]")
    entry = next(m for m in fleet["models"] if m["name"] == "fraud")
    expect(row.locator("[data-role=champion]")).to_have_text(f"v{entry['champion']['version']}")
    expect(row.locator("[data-pending]")).to_have_attribute(
        "data-pending", str(entry["pending_approvals"])
    )
    expect(row.locator("[data-drift]")).to_have_attribute("data-drift", entry["drift"]["status"])
    expect(p.locator("[data-figure=pending] .value")).to_have_text(str(fleet["pending_approvals"]))
    assert fleet["pending_approvals"] == 1
    assert entry["pending_approvals"] == 0
    share = fleet["rejected"]["share"]
    expect(p.locator("[data-figure=rejected] .value")).to_have_text(f"{share * 100:.1f}%")
    reasons = p.eval_on_selector_all(
        "#rejection-reasons tr[data-reason]",
        "els => els.map(e => [e.dataset.reason, +e.cells[1].textContent])",
    )
    assert reasons == [[r["reason"], r["count"]] for r in fleet["rejected"]["reasons"]]
    assert reasons == [["latency too high", 1]]
    expect(p.locator("tr[data-model]")).to_have_count(len(fleet["models"]))

    # Lineage of v2: datasets → run → version → transition → approval, and its consumer.
    go(p, "#/lineage/fraud/2")
    lin = api("bob", "GET", "/models/fraud/versions/2/lineage")
    kinds = p.eval_on_selector_all(
        "svg[data-chart=lineage] g.node", "els => els.map(e => e.dataset.kind)"
    )
    assert sorted(kinds) == sorted(
        ["dataset"] * len(lin["version"]["datasets"])
        + ["run", "version"]
        + ["transition"] * len(lin["transitions"])
        + ["approval"] * sum(len(t["approvals"]) for t in lin["transitions"])
        + ["deployment"] * len(lin["deployments"])
        + ["consumer"] * len(lin["consumers"])
    )
    assert kinds.count("dataset") == 2
    assert kinds.count("approval") == 1
    assert "consumer" in kinds
    approval = lin["transitions"][0]["approvals"][0]["id"]
    edge = f"path[data-from='transition:{t2['id']}'][data-to='approval:{approval}']"
    expect(p.locator(f"svg[data-chart=lineage] {edge}")).to_have_count(1)

    # Audit: the chain's status, a filter, and a second page.
    go(p, "#/audit")
    verify = api("bob", "GET", "/audit/verify")
    expect(p.locator("#audit-verify")).to_have_attribute("data-ok", "true")
    expect(p.locator("#audit-verify")).to_have_attribute("data-rows", str(verify["rows"]))
    first = api("bob", "GET", "/audit", params={"limit": 50})["data"]
    seqs = p.eval_on_selector_all("#audit tr[data-seq]", "els => els.map(e => +e.dataset.seq)")
    assert seqs == [e["seq"] for e in first]
    p.click("#audit-pager button[data-page=next]")
    expect(p.locator("#audit-pager")).to_have_attribute("data-offset", "50")
    second = api("bob", "GET", "/audit", params={"limit": 50, "offset": 50})["data"]
    seqs = p.eval_on_selector_all("#audit tr[data-seq]", "els => els.map(e => +e.dataset.seq)")
    assert seqs == [e["seq"] for e in second]
    assert second
    p.fill("#audit-filters input[name=actor]", "alice")
    p.click("#audit-filters button[type=submit]")
    expect(p.locator("#audit-pager")).to_have_attribute("data-offset", "0")
    mine = api("bob", "GET", "/audit", params={"actor": "alice"})["data"]
    expect(p.locator("#audit tr[data-seq]")).to_have_count(len(mine))
    assert mine
    assert set(
        p.eval_on_selector_all("#audit tr", "els => els.map(e => e.dataset.actor).filter(Boolean)")
    ) == {"alice"}

    # The model card, rendered, and its downloads.
    go(p, "#/card/fraud/2")
    card = api("bob", "GET", "/models/fraud/versions/2/card", params={"format": "json"})
    expect(p.locator("#card")).to_have_attribute("data-stage", card["stage"])
    expect(p.locator("#card-approvals tbody tr")).to_have_count(len(card["approvals"]))
    with p.expect_download() as got:
        p.click("#download-json")
    downloaded = json.loads(Path(got.value.path()).read_text())
    assert (downloaded["model"], downloaded["version"], len(downloaded["approvals"])) == (
        "fraud",
        2,
        1,
    )
    with p.expect_download() as got_md:
        p.click("#download-md")
    assert got_md.value.suggested_filename == "fraud-v2-card.md"
    assert "alice" in Path(got_md.value.path()).read_text()
