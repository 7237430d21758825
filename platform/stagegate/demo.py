"""`stagegate demo`: a data scientist registers two versions; people approve them to production.

This module plays the data scientist, so it uses MLflow's own client directly (the platform
itself reaches MLflow only through `registry/mlflow.py`). It trains on generated data.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from sqlmodel import Session

from stagegate.db import make_engine, transaction
from stagegate.governance import identities, tokens
from stagegate.lifecycle.stages import DEPLOYMENT_ROLE, Role, Stage
from stagegate.settings import Settings
from stagegate.ui import demo_users_path

FEATURES = [f"f{i}" for i in range(20)]
COLUMNS = [*FEATURES, "channel"]

PEOPLE: dict[str, Role] = {
    "dana": Role.author,
    "alice": Role.approver,
    "bob": Role.approver,
    "vic": Role.viewer,
    "ops": Role.admin,
    "sam": Role.admin,  # the second pair of eyes on policy changes that weaken a gate
}


AUTHOR = "dana"  # the data scientist: she registers every version


class DemoFailed(Exception):
    pass


def mlflow_login() -> str:
    """The MLflow user the demo's versions carry: MLflow's client tags each run with the OS
    user (`mlflow.user`), and intake records it as the versions' author."""
    return getpass.getuser()


def link_author(session: Session, mlflow_user: str) -> bool:
    """Link the demo's MLflow login to dana, so separation of duties knows the versions are
    hers (an admin's step; `stagegate token link dana USER` does the same)."""
    return identities.link(session, identity=AUTHOR, mlflow_user=mlflow_user, actor="demo")


def write_demo_users(settings: Settings, secrets: dict[str, str]) -> Path:
    """The web UI's 'demo users' picker reads this file (mode 0600, never in prod mode)."""
    if settings.mode == "prod":
        raise ValueError("prod mode never writes demo tokens to disk")
    path = demo_users_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = [{"name": n, "role": PEOPLE[n].value, "token": t} for n, t in secrets.items()]
    # Created 0600 before any secret is written, so no other user can ever read it.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an older file may have had looser bits
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2)
    return path


@dataclass
class Delivery:
    headers: dict[str, str]
    body: dict[str, Any]


class AlertReceiver:
    """The on-call end of a drift alert: a local HTTP server that keeps the first delivery
    whose signature verifies, and answers 401 to any other."""

    def __init__(self, secret: str) -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from stagegate.events.alert import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify

        self.got = threading.Event()
        self.delivery: Delivery | None = None
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                ok = verify(
                    secret,
                    self.headers.get(TIMESTAMP_HEADER, ""),
                    body,
                    self.headers.get(SIGNATURE_HEADER, ""),
                )
                if ok and outer.delivery is None:
                    outer.delivery = Delivery(dict(self.headers), json.loads(body))
                    outer.got.set()
                self.send_response(204 if ok else 401)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/on-call/drift"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, timeout_s: float) -> Delivery | None:
        self.got.wait(timeout_s)
        return self.delivery

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Demo:
    settings: Settings
    console: Console
    model: str = "demo-fraud"
    timeout_s: float = 90.0
    headers: dict[str, dict[str, str]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    errors: int = 0  # client errors seen while sending traffic
    samples: Any = None  # held-out rows the traffic is drawn from
    truth: Any = None  # their true classes: the downstream team's confirmed outcomes
    phases: int = 0  # traffic phases so far: each draws other rows

    def __post_init__(self) -> None:
        self.api = httpx.Client(base_url=self.settings.api.url, timeout=15.0)

    # -- helpers ---------------------------------------------------------------------------
    def say(self, text: str) -> None:
        self.console.print(text)

    def call(self, who: str, method: str, path: str, **kw: Any) -> Any:
        r = self.api.request(method, path, headers=self.headers[who], **kw)
        if r.status_code >= 400:
            raise DemoFailed(f"{method} {path} as {who}: {r.status_code} {r.text}")
        return r.json()

    def wait_for(self, what: str, probe: Callable[[], Any]) -> tuple[Any, float]:
        start = time.monotonic()
        while time.monotonic() - start < self.timeout_s:
            found = probe()
            if found:
                return found, time.monotonic() - start
            time.sleep(0.25)
        raise DemoFailed(f"timed out after {self.timeout_s:.0f} s waiting for {what}")

    def stage_of(self, version: int) -> str | None:
        r = self.api.get(
            f"/api/v1/models/{self.model}/versions/{version}", headers=self.headers["vic"]
        )
        return str(r.json()["stage"]) if r.status_code == 200 else None

    def open_transition(self, version: int) -> dict[str, Any] | None:
        page = self.call(
            "vic", "GET", "/api/v1/transitions", params={"model": self.model, "status": "pending"}
        )
        return next((t for t in page["data"] if t["version"] == version), None)

    # -- the story -------------------------------------------------------------------------
    def quiet_mlflow(self) -> None:
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # The drift check downloads the reference in this process; no progress bar for it.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    def issue_tokens(self) -> None:
        engine = make_engine(self.settings.database_url)
        secrets: dict[str, str] = {}
        with transaction(engine) as s:
            for name, role in PEOPLE.items():
                secrets[name] = tokens.create_token(s, name=name, role=role, actor="demo")
                self.headers[name] = {"Authorization": f"Bearer {secrets[name]}"}
            login = mlflow_login()
            link_author(s, login)
        engine.dispose()
        if self.settings.mode != "prod":
            write_demo_users(self.settings, secrets)
        self.say(
            "[bold]1.[/] tokens issued: dana (author), alice and bob (approvers), "
            f"vic (viewer), ops and sam (admins); dana's MLflow login {login!r} linked to dana"
        )

    def data(self) -> tuple[Any, Any, Any, Any]:
        """Generated training data: 20 numeric features and a sales channel."""
        import numpy as np
        import pandas as pd
        from sklearn.datasets import make_classification
        from sklearn.model_selection import train_test_split

        x, y = make_classification(n_samples=3000, n_features=20, n_informative=8, random_state=7)
        frame = pd.DataFrame(x, columns=FEATURES)
        # The channel leans on the label a little, so the model has a reason to use it.
        rng = np.random.default_rng(7)
        frame["channel"] = np.where(
            rng.random(len(y)) < 0.3 + 0.2 * y, "web", rng.choice(["store", "phone"], len(y))
        )
        return tuple(train_test_split(frame, y, test_size=0.3, random_state=7))

    def register(self, c: float, *, slow_ms: float = 0) -> tuple[int, float]:
        """Train a logistic regression (stronger with higher C) and register it, logging its
        training frame (with the model's predictions) where the drift monitor reads it.
        `slow_ms`: a release that waits this long in every call (a pyfunc around the model)."""
        import mlflow
        import mlflow.data
        import mlflow.pyfunc
        import mlflow.sklearn
        from sklearn.compose import ColumnTransformer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import OneHotEncoder

        from stagegate.registry.mlflow import log_reference

        x_tr, x_te, y_tr, y_te = self.data()
        self.samples = x_te
        self.truth = dict(zip(x_te.index, y_te.tolist(), strict=True))
        encode = ColumnTransformer(
            [("channel", OneHotEncoder(handle_unknown="ignore"), ["channel"])],
            remainder="passthrough",
        )
        model = make_pipeline(encode, LogisticRegression(C=c, max_iter=500)).fit(x_tr, y_tr)
        accuracy = float(model.score(x_te, y_te))
        mlflow.set_tracking_uri(self.settings.mlflow.tracking_uri)
        mlflow.set_experiment("stagegate-demo")
        with warnings.catch_warnings(), mlflow.start_run():
            # MLflow hints about integer targets in the logged dataset; not a demo concern.
            warnings.simplefilter("ignore", UserWarning)
            mlflow.log_params({"C": c, "model": "logistic_regression"})
            mlflow.log_metric("accuracy", accuracy)
            data: Any = mlflow.data
            mlflow.log_input(
                data.from_pandas(x_tr.assign(target=y_tr), name="fraud-train", targets="target"),
                context="training",
            )
            log_reference(x_tr.assign(prediction=model.predict(x_tr)))
            if slow_ms:
                # MLflow warns that a Python object is pickled: the demo's own closure.
                logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)
                warnings.simplefilter("ignore")
                info: Any = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=_slow(model, slow_ms),
                    input_example=x_tr.head(2),
                    pip_requirements=["scikit-learn", "pandas"],
                )
            else:
                info = mlflow.sklearn.log_model(
                    model,
                    name="model",
                    input_example=x_tr.head(2),
                    pip_requirements=["scikit-learn", "pandas"],
                )
            registered: Any = mlflow.register_model(info.model_uri, self.model)
        return int(registered.version), accuracy

    def approve(self, who: str, tid: str) -> dict[str, Any]:
        t: dict[str, Any] = self.call(
            who,
            "POST",
            f"/api/v1/transitions/{tid}/approvals",
            json={"decision": "approve", "comment": f"ok by {who}"},
        )
        return t

    def refused_self_approval(self, version: int, tid: str) -> None:
        """dana tries to approve her own version: separation of duties, through the link of
        her MLflow login, refuses it (403) before her role is even looked at."""
        r = self.api.post(
            f"/api/v1/transitions/{tid}/approvals",
            headers=self.headers[AUTHOR],
            json={"decision": "approve", "comment": "my own model, looks great"},
        )
        if r.status_code != 403 or "author" not in r.json().get("detail", ""):
            raise DemoFailed(f"dana's self-approval was not refused: {r.status_code} {r.text}")
        self.say(
            f"   dana tries to approve her own v{version}: [red]refused[/] ({r.json()['detail']})"
        )

    def attest(self, version: int, tid: str | None = None) -> None:
        """dana attests that she wrote the version, with her own token: under `authorship:
        attested` (the demo's policy, and prod mode's default) no approval of its moves into
        serving counts before this. Given its open transition, an approver tries first."""
        if tid is not None:
            r = self.api.post(
                f"/api/v1/transitions/{tid}/approvals",
                headers=self.headers["alice"],
                json={"decision": "approve", "comment": "looks fine"},
            )
            if r.status_code != 403 or "attestation" not in r.json().get("detail", ""):
                raise DemoFailed(
                    f"an unattested approval was not refused: {r.status_code} {r.text}"
                )
            self.say(
                f"   alice approves before dana attests: [red]refused[/] ({r.json()['detail']})"
            )
        row = self.call(
            AUTHOR, "POST", f"/api/v1/models/{self.model}/versions/{version}/authorship"
        )
        self.say(
            f"   dana attests authorship of v{version} with her token (the registry's name, "
            f"MLflow user {row['creator']!r}, is whatever her client sent)"
        )

    def move(
        self,
        version: int,
        to: str,
        approvers: tuple[str, ...],
        transition: dict[str, Any] | None = None,
    ) -> None:
        if transition is None:
            transition = self.call(
                "dana",
                "POST",
                "/api/v1/transitions",
                json={
                    "model": self.model,
                    "version": version,
                    "to_stage": to,
                    "reason": f"demo: ready for {to}",
                },
            )
        for who in approvers:
            transition = self.approve(who, transition["id"])
        gates = ", ".join(f"{g['gate']}: {g['reason']}" for g in transition["gates"])
        if transition["status"] != "approved":
            raise DemoFailed(f"v{version}->{to} not approved: {gates}")
        _, waited = self.wait_for(f"v{version} to reach {to}", lambda: self.stage_of(version) == to)
        self.timings.setdefault("approved_to_applied_s", waited)
        self.say(
            f"   v{version} -> [green]{to}[/] (approved by {', '.join(approvers)}; "
            f"applied by the promote flow {waited:.1f} s later)\n      gates: {gates}"
        )

    def version_story(self, step: int, c: float) -> int:
        started = time.monotonic()
        version, accuracy = self.register(c)
        registered = time.monotonic()
        self.say(
            f"[bold]{step}.[/] dana registered {self.model} v{version} "
            f"(accuracy {accuracy:.3f}) with MLflow's client in "
            f"{registered - started:.1f} s"
        )
        t, waited = self.wait_for(
            f"intake to open a transition for v{version}", lambda: self.open_transition(version)
        )
        self.timings.setdefault("register_to_transition_s", waited)
        self.say(
            f"   webhook -> Prefect event -> intake flow opened candidate->shadow in {waited:.1f} s"
        )
        if step == 2:
            self.refused_self_approval(version, t["id"])
            self.set_policy()
        self.attest(version, t["id"] if step == 2 else None)
        for to, approvers in (
            ("shadow", ("alice",)),
            ("canary", ("bob",)),
            ("production", ("alice", "bob")),
        ):
            if to == "production":
                # The experiment's win opened canary->production itself; people approve it.
                t, _ = self.wait_for(
                    f"the experiment to request production for v{version}",
                    lambda: self.open_transition(version),
                )
                self.say(f"   {t['requested_by']} requested canary->production: {t['reason']}")
            self.move(version, to, approvers, t if to in ("shadow", "production") else None)
            routed = self.wait_routed(version, to)
            if routed and to == "canary":
                self.experiment_traffic(version)
            elif routed:
                self.traffic(f"v{version} in {to}")
            if to != "production":
                self.wait_report(version, "experiment" if to == "canary" else to)
        return version

    def wait_report(self, version: int, kind: str) -> None:
        """The shadow/canary flow writes the report the next gate needs; show it."""

        def written() -> dict[str, Any] | None:
            rows = self.call(
                "vic", "GET", f"/api/v1/models/{self.model}/versions/{version}/evaluations"
            )
            return next((e for e in rows if e["kind"] == kind), None)

        report, waited = self.wait_for(f"the {kind} report of v{version}", written)
        verdict = "[green]passed[/]" if report["passed"] else "[red]failed[/]"
        self.say(f"   {kind} flow: report {verdict} ({report['reason']}; {waited:.1f} s)")

    def router_policy(self) -> dict[str, Any] | None:
        """The traffic policy the router serves for the demo's model (its admin path needs
        the router's token), or None while it routes none."""
        from stagegate import stack

        token = stack.effective_router_admin_token(self.settings, stack.load_secrets(self.settings))
        admin = {"Authorization": f"Bearer {token}"} if token else {}
        r = self.api.get(f"{self.settings.serving.router_url}/policies", headers=admin)
        if r.status_code == 401:
            raise DemoFailed(f"the router refused its /policies: {r.text}")
        doc = r.json()
        return next((p for p in doc.get("policies", []) if p["model"] == self.model), None)

    def wait_routed(self, version: int, stage: str) -> bool:
        """Wait until the router serves the new stage (endpoint sync follows the commit).

        False when there is nothing to route yet: no champion means no route at all."""
        arm = DEPLOYMENT_ROLE[Stage(stage)].value
        if stage != "production" and self.router_policy() is None:
            return False
        _, waited = self.wait_for(
            f"the router to route v{version} as {arm}",
            lambda: (
                (p := self.router_policy()) is not None
                and (p.get(arm) or {}).get("version") == version
            ),
        )
        self.say(f"   endpoint: router sends v{version} the {arm} role ({waited:.1f} s later)")
        return True

    def challenger_version(self) -> int | None:
        """The version the router now sends the challenger's share, if any."""
        policy = self.router_policy() or {}
        version: int | None = (policy.get("challenger") or {}).get("version")
        return version

    def bodies(self, requests: int, drifted: bool) -> list[dict[str, Any]]:
        """One held-out row a request; drifted: f0 shifted by 3 and a channel never seen."""
        self.phases += 1
        rows = self.samples.sample(requests, replace=True, random_state=self.phases)
        if drifted:
            rows = rows.assign(f0=rows["f0"] + 3.0, channel="partner")
        return [
            {"dataframe_split": {"columns": COLUMNS, "data": [list(row)]}}
            for row in rows[COLUMNS].itertuples(index=False)
        ]

    def traffic(self, phase: str, requests: int = 400, *, drifted: bool = False) -> Counter[str]:
        """Send held-out rows through the router, once a champion serves; show who answered."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        from stagegate.serving.inference_log.writer import read_records

        url = f"{self.settings.serving.router_url}/models/{self.model}/invocations"
        bodies = self.bodies(requests, drifted)
        started, answered, errors, latencies = datetime.now(UTC), Counter[str](), 0, []
        with Progress(
            TextColumn(f"   traffic ({phase})"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[live]}"),
            console=self.console,
            transient=True,
        ) as bar:
            task = bar.add_task("", total=requests, live="")
            for i in range(requests):
                t0 = time.perf_counter()
                r = self.api.post(
                    url, json=bodies[i], headers={"x-stagegate-key": f"user-{i % 200}"}
                )
                latencies.append((time.perf_counter() - t0) * 1000)
                if r.status_code == 200:
                    answered[f"v{r.headers['x-stagegate-version']}"] += 1
                else:
                    errors += 1
                bar.update(
                    task, advance=1, live=" ".join(f"{k}:{n}" for k, n in sorted(answered.items()))
                )
        self.errors += errors
        time.sleep(1.5)  # the inference log flushes every second
        logged = read_records(self.settings.inference_log_url, model=self.model, since=started)
        roles = Counter(
            f"{r}:v{v}"
            for r, v in zip(
                logged.column("role").to_pylist(), logged.column("version").to_pylist(), strict=True
            )
        )
        latencies.sort()
        self.say(
            f"   traffic: {requests} requests, answered by "
            f"{', '.join(f'{k} {n}' for k, n in sorted(answered.items()))}; "
            f"{errors} errors; p50 {latencies[len(latencies) // 2]:.1f} ms; "
            f"inference log: {', '.join(f'{k} {n}' for k, n in sorted(roles.items()))}"
        )
        return answered

    def labelled_batch(self, requests: int) -> list[dict[str, Any]]:
        """Send held-out rows through the router, each with its own buyer key; return the
        feedback for the answers: whether the decision was right, as the fraud team says."""
        url = f"{self.settings.serving.router_url}/models/{self.model}/invocations"
        self.phases += 1
        rows = self.samples.sample(requests, replace=True, random_state=self.phases)
        labels = []
        for n, (index, row) in enumerate(
            zip(rows.index, rows[COLUMNS].itertuples(index=False), strict=True)
        ):
            body = {"dataframe_split": {"columns": COLUMNS, "data": [list(row)]}}
            r = self.api.post(
                url, json=body, headers={"x-stagegate-key": f"buyer-{self.phases}-{n}"}
            )
            if r.status_code != 200:
                self.errors += 1
                continue
            right = int(r.json()["predictions"][0] == self.truth[index])
            labels.append(
                {
                    "request_id": r.headers["x-request-id"],
                    "model": self.model,
                    "label": {"correct": right},
                }
            )
        self.call("dana", "POST", "/api/v1/feedback", json={"items": labels})
        return labels

    def next_look(self, path: str, shown: int) -> dict[str, Any] | None:
        """The experiment once it has a look (or a decision) beyond the first `shown`."""
        doc: dict[str, Any] = self.call("vic", "GET", path)
        return doc if doc["decision"] is not None or len(doc["looks"]) > shown else None

    def experiment_traffic(self, version: int) -> dict[str, Any]:
        """Labelled traffic until the canary flow's sequential test decides; show its looks."""
        path = f"/api/v1/models/{self.model}/versions/{version}/experiment"
        started, shown, deadline = time.monotonic(), 0, time.monotonic() + 4 * self.timeout_s
        self.say("   experiment: labelled traffic; the canary flow looks every 5 s")
        doc = self.call("vic", "GET", path)
        while doc["decision"] is None:
            if time.monotonic() > deadline:
                raise DemoFailed(f"the experiment of v{version} did not decide in time")
            self.labelled_batch(60)
            # A batch between looks, so each look the flow takes is shown as it narrows.
            doc, _ = self.wait_for(
                "the canary flow's next look", partial(self.next_look, path, shown)
            )
            for look in doc["looks"][shown:]:
                self.say("      " + _look_line(look))
            shown = len(doc["looks"])
        decision = doc["decision"]
        took = time.monotonic() - started
        self.timings.setdefault("experiment_s", took)
        colour = "green" if decision["passed"] else "red"
        self.say(
            f"   experiment decided [{colour}]{decision['action']}[/] after {took:.0f} s: "
            f"{decision['reason']}"
        )
        return dict(decision)

    def set_policy(self) -> None:
        policy = self.call("vic", "GET", f"/api/v1/models/{self.model}/policy")
        policy["primary_metric"] = "accuracy"
        # Demo-sized traffic: 400 requests a phase, of which the canary answers about 10%.
        policy["shadow"]["min_comparisons"] = 200
        # v2 is right where v1 is wrong on about a fifth of the rows: agreement is ~80%.
        policy["shadow"]["min_agreement"] = 0.7
        policy["traffic"]["challenger_weight"] = 0.5
        # Approvals count once the author attests with her own token (prod mode's default).
        policy["authorship"] = "attested"
        # The canary is an A/B test on the share of decisions the fraud team confirms as
        # right, sequential so the flow may look every few seconds; demo-sized samples.
        policy["experiment"] = {
            "metric": "correct",
            "kind": "bernoulli",
            "attribution_window_s": 30,
            # v1 is right 78% of the time, v2 89%. The test is designed for a 7-point gap
            # (1.1x its fixed-horizon sample of 430 an arm), so it catches this one early.
            "min_samples": 100,
            "max_samples": 475,
            "max_latency_increase_ms": 25,
            "actions": {"rollback_applies_alone": True},
        }
        change = self.call("ops", "PUT", f"/api/v1/models/{self.model}/policy", json=policy)
        self.say(
            "   ops proposed the model's policy: accuracy must match or beat the champion; "
            "200 shadow comparisons agreeing 70%; the canary gets half the keys and runs an "
            "A/B test on confirmed decisions (sequential, alpha 5%), with guardrails on errors "
            "and latency (+25 ms); a guardrail breach rolls back alone; approvals wait for "
            "the author's attestation"
        )
        if change.get("status") == "pending":  # it weakens a gate: four eyes
            self.call(
                "sam",
                "POST",
                f"/api/v1/policy-changes/{change['id']}/approvals",
                json={"decision": "approve", "comment": "reviewed"},
            )
            self.say(
                f"   it weakens a gate ({'; '.join(change['weakens'])}): sam, a second "
                "admin, approved it"
            )

    def check_registry(self, champion: int, retired: int) -> None:
        """The registry mirrors the database right after each commit; wait for it."""
        from mlflow import MlflowClient

        client = MlflowClient(self.settings.mlflow.tracking_uri)

        def mirrored() -> bool:
            alias = int(client.get_model_version_by_alias(self.model, "champion").version)
            tag = client.get_model_version(self.model, str(retired)).tags.get("stagegate.stage")
            return alias == champion and tag == "retired"

        _, waited = self.wait_for("the MLflow alias to follow", mirrored)
        self.say(
            f"   MLflow: alias champion -> v{champion}; v{retired} tagged retired "
            f"(mirrored {waited:.1f} s after the stage change)"
        )

    def logged_features(self, version: int, since: datetime) -> int:
        from stagegate.serving.inference_log.writer import read_features

        rows = read_features(
            self.settings.inference_log_url, model=self.model, version=version, since=since
        )
        return int(rows.num_rows)

    def guardrail_story(self, step: int, champion: int) -> bool:
        """A release that adds latency: its shadow agrees, but the canary's latency guardrail
        breaks, and the service rolls it back alone, as the policy allows."""
        version, _ = self.register(1e-3, slow_ms=60)
        self.say(
            f"[bold]{step}.[/] dana registered {self.model} v{version}: the same model in a "
            "release that spends 60 ms more on every call"
        )
        t, _ = self.wait_for(
            f"intake to open a transition for v{version}", lambda: self.open_transition(version)
        )
        self.attest(version)
        self.move(version, "shadow", ("alice",), t)
        if self.wait_routed(version, "shadow"):
            self.traffic(f"v{version} in shadow")
        self.wait_report(version, "shadow")
        self.move(version, "canary", ("bob",))
        self.wait_routed(version, "canary")
        decision = self.experiment_traffic(version)
        _, waited = self.wait_for(
            f"v{version} to be rolled back", lambda: self.stage_of(version) == "rolled_back"
        )
        self.wait_for(
            f"the router to stop sending v{version} traffic",
            lambda: self.challenger_version() is None,
        )
        self.say(
            f"   guardrail breached ({', '.join(decision['breached']) or 'none'}): the service "
            f"rolled v{version} back alone, {waited:.1f} s after the decision, with no approval "
            f"(policy: rollback_applies_alone); v{champion} keeps production"
        )
        return bool(decision["action"] == "rollback" and "latency_ms" in decision["breached"])

    def drift_story(self, step: int, champion: int, previous: int) -> bool:
        """Traffic drifts; the monitor fires; an alert arrives; a rollback waits for its
        approval, is approved, and the previous champion serves again."""
        from stagegate import runtime, stack
        from stagegate.events.alert import DELIVERY_HEADER

        secret = stack.effective_alert_secret(self.settings, stack.load_secrets(self.settings))
        receiver = AlertReceiver(secret or "")
        policy = self.call("vic", "GET", f"/api/v1/models/{self.model}/policy")
        policy["drift"].update(
            columns=["f0", "f1", "f2", "f3", "channel"],
            prediction_column="prediction",
            drift_share=0.4,
            min_rows=200,
            actions={"alert_url": receiver.url, "rollback": True},
        )
        self.call("ops", "PUT", f"/api/v1/models/{self.model}/policy", json=policy)
        self.say(
            f"[bold]{step}.[/] ops set the drift policy: f0-f3 and channel, drift when 2 of 5 "
            "drift; on drift: alert the on-call receiver, open a rollback"
        )
        drifted_at, loop_started = datetime.now(UTC), time.monotonic()
        self.traffic("drifting: f0 +3, channel 'partner'", drifted=True)
        self.wait_for(
            "the router to write the drifted requests' feature rows "
            f"(every {self.settings.serving.log_features_flush_interval_s:g} s)",
            lambda: self.logged_features(champion, drifted_at) >= 400,
        )

        # The scheduled drift-check flow runs every 10 minutes; the demo runs the same step
        # now, as `stagegate drift check` does. Its alerts may go to this one local receiver.
        rt = runtime.build(self.settings)
        alerts = self.settings.alerts.model_copy(
            update={"secret": secret, "allowed_hosts": ["127.0.0.1"]}
        )
        monitor = runtime.monitor(rt)
        monitor = type(monitor)(**{**monitor.__dict__, "alerts": alerts})
        from stagegate.steps.drift import check_version

        started = time.monotonic()
        outcome = check_version(monitor, self.model, champion, until=datetime.now(UTC))
        self.timings["drift_check_s"] = time.monotonic() - started
        self.say(
            f"   drift check of v{champion} ({self.timings['drift_check_s']:.1f} s): "
            f"[red]{outcome.verdict}[/] - {outcome.reason}"
        )
        if outcome.report_url:
            self.say(f"   Evidently report: {outcome.report_url}")
        delivered = receiver.wait(self.timeout_s)
        receiver.close()
        if delivered is None:
            raise DemoFailed(f"no alert arrived: {outcome.actions.get('alert')}")
        self.say(
            f"   alert delivered to the local receiver, signature verified "
            f"(delivery {delivered.headers[DELIVERY_HEADER][:12]}): drifted "
            f"{', '.join(delivered.body['drifted_features'])}"
        )
        rollback = self.open_transition(champion)
        if rollback is None or rollback["to_stage"] != "rolled_back":
            raise DemoFailed(f"no rollback transition opened: {outcome.actions}")
        self.say(
            f"   rollback v{champion} production->rolled_back opened by {rollback['requested_by']},"
            f" {rollback['status']}: {rollback['status_reason'] or 'waiting for an approval'}"
        )
        self.move(champion, "rolled_back", ("alice",), rollback)
        self.wait_routed(previous, "production")
        answered = self.traffic("after the rollback", requests=100)
        report = self.api.get(outcome.report_url or "", headers=self.headers["vic"])
        self.say(
            f"   v{previous} serves production again; the report ({len(report.content) // 1024} "
            f"KiB of HTML) is at {outcome.report_url}"
        )
        self.timings["drift_loop_s"] = time.monotonic() - loop_started
        self.say(f"   the drift loop took {self.timings['drift_loop_s']:.0f} s")
        return bool(
            outcome.verdict == "drift"
            and set(answered) == {f"v{previous}"}
            and report.status_code == 200
        )

    def run(self) -> bool:
        self.quiet_mlflow()
        self.issue_tokens()
        v1 = self.version_story(2, c=3e-6)
        between = datetime.now(UTC)
        v2 = self.version_story(3, c=1e-3)
        self.say(f"[bold]4.[/] v{v2} is champion; v{v1} retired as part of the same transition")
        self.check_registry(v2, v1)
        then = self.call(
            "vic",
            "GET",
            f"/api/v1/models/{self.model}/production",
            params={"at": between.isoformat()},
        )
        approvers = ", ".join(a["approver"] for a in then["approved_by"])
        self.say(
            f"[bold]5.[/] production at {between:%H:%M:%S}: v{then['version']} "
            f"(approved by {approvers})"
        )
        guarded = self.guardrail_story(6, v2)
        looped = self.drift_story(7, v2, v1)
        verdict = self.call("vic", "GET", "/api/v1/audit/verify")
        self.say(
            f"[bold]8.[/] audit chain: {'ok' if verdict['ok'] else 'BROKEN'} "
            f"({verdict['rows']} rows)"
        )
        return bool(
            then["version"] == v1 and guarded and looped and verdict["ok"] and self.errors == 0
        )


def _slow(model: Any, ms: float) -> Callable[[Any], Any]:
    """The model behind a pyfunc that sleeps first: cloudpickle stores this closure whole."""

    def predict(model_input):  # type: ignore[no-untyped-def]  # mlflow reads the hints
        time.sleep(ms / 1000)
        return model.predict(model_input)

    return predict


def _bound(x: float | None) -> str:
    return "..." if x is None else f"{x:+.3f}"


def _look_line(look: dict[str, Any]) -> str:
    """One look of the experiment: samples, effect, always-valid interval, what it decided."""
    est = look["estimate"]
    effect = "n/a" if est is None else f"{est:+.3f}"
    return (
        f"look: v-new {look['n_treatment']} / champion {look['n_control']} units; "
        f"effect {effect} [{_bound(look['lower'])}, {_bound(look['upper'])}] -> {look['action']}"
    )
