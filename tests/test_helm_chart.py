"""The Helm chart (helm/stagegate): `helm lint --strict`, `helm template` for each ci values
file, every rendered object validated strictly against Kubernetes 1.30 and 1.37, and the
properties the chart promises (HA router, least-privilege RBAC, locked-down pods, secrets
kept out of the output, GPU defaults, values checks that fail clearly).

No Kubernetes API server runs here: this is the whole check (docs/helm.md)."""

from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import kubernetes_validate.utils
import pytest
import typer.main
import yaml

from stagegate.cli import app as cli_app
from stagegate.settings import KubernetesSettings

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "stagegate"
HELM = Path(os.environ.get("STAGEGATE_HELM", ROOT / ".venv" / "bin" / "helm"))
CI_FILES = sorted((CHART / "ci").glob("values-*.yaml"))
KUBE_VERSIONS = ("1.30.0", "1.37.0")
RELEASE, NAMESPACE = "sg", "stagegate"
CREDENTIAL_ENV = {
    "STAGEGATE_WEBHOOK__SECRET",
    "STAGEGATE_ALERTS__SECRET",
    "STAGEGATE_ROUTER_TOKEN",
    "STAGEGATE_DB__URL",
    "POSTGRES_PASSWORD",
    "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY",
}
WORKER_VERBS = {"get", "list", "create", "patch", "delete"}
POD_KINDS = {"Deployment", "Job", "StatefulSet", "DaemonSet"}
WORKER_RULES = {
    ("apps", "deployments"),
    ("", "services"),
    ("autoscaling", "horizontalpodautoscalers"),
    ("policy", "poddisruptionbudgets"),
}

slow = pytest.mark.slow  # these run the helm binary


def _helm(*args: str) -> subprocess.CompletedProcess[str]:
    if not os.access(HELM, os.X_OK):
        pytest.fail(f"no helm at {HELM}: run `make helm-bin` (or set STAGEGATE_HELM)")
    return subprocess.run(
        [str(HELM), *args], capture_output=True, text=True, timeout=60, check=False
    )


def template(*values: Path, sets: tuple[str, ...] = (), kube: str = "1.30.0") -> list[Any]:
    """The rendered objects, hooks included; fails the test with helm's message."""
    done = _template_run(values, sets, kube)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@cache
def _template_run(
    values: tuple[Path, ...], sets: tuple[str, ...], kube: str
) -> subprocess.CompletedProcess[str]:
    argv = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", kube]
    for v in values:
        argv += ["-f", str(v)]
    for s in sets:
        argv += ["--set", s]
    return _helm(*argv)


def template_error(*values: Path, sets: tuple[str, ...] = ()) -> str:
    done = _template_run(values, sets, "1.30.0")
    assert done.returncode != 0, "rendered, but should have been refused"
    return done.stderr


def ci(name: str) -> Path:
    return CHART / "ci" / f"values-{name}.yaml"


def ci_values(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(ci(name).read_text())
    return loaded


def find(objs: list[Any], kind: str, suffix: str = "") -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind and o["metadata"]["name"].endswith(suffix)]


def one(objs: list[Any], kind: str, suffix: str = "") -> dict[str, Any]:
    (found,) = find(objs, kind, suffix)
    return found


def pod_specs(objs: list[Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for o in objs:
        if o["kind"] in POD_KINDS:
            yield f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.fixture(scope="module", autouse=True)
def _schema_reads_cached() -> Iterator[None]:
    """kubernetes-validate re-reads the 1.8 MB definitions file for every object (two thirds
    of its time); the reads are pure, so keep them for this module. Validation is unchanged."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            kubernetes_validate.utils,
            "schema_contents",
            cache(kubernetes_validate.utils.schema_contents),
        )
        yield


# -- lint, render, validate -----------------------------------------------------------------


@slow
@pytest.mark.parametrize("values", CI_FILES, ids=lambda p: p.stem)
def test_lint_strict(values: Path) -> None:
    done = _helm("lint", "--strict", str(CHART), "-f", str(values))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


def test_ci_files_include_the_three_the_issue_names() -> None:
    names = {p.stem for p in CI_FILES}
    assert {"values-minimal", "values-gpu", "values-external-db"} <= names


@slow
@pytest.mark.parametrize("kube", KUBE_VERSIONS)
@pytest.mark.parametrize("values", CI_FILES, ids=lambda p: p.stem)
def test_every_rendered_object_validates_strictly(values: Path, kube: str) -> None:
    objs = template(values, kube=kube)
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "Service", "ConfigMap", "Role", "RoleBinding"} <= kinds
    problems = []
    for o in objs:
        try:
            kubernetes_validate.validate(o, kube, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{o['kind']}/{o['metadata']['name']}: {exc.message} at {exc.path}")
    assert not problems, "\n".join(problems)


@slow
def test_notes_give_the_access_steps() -> None:
    """NOTES.txt renders (only install shows it; `--dry-run=client` needs no cluster)."""
    done = _helm(
        "install",
        RELEASE,
        str(CHART),
        "--dry-run=client",
        "--namespace",
        NAMESPACE,
        "-f",
        str(ci("minimal")),
    )
    assert done.returncode == 0, done.stderr
    notes = done.stdout.split("NOTES:", 1)[1]
    assert f"port-forward svc/{RELEASE}-stagegate-api 8765" in notes
    assert "stagegate token create YOUR-NAME --role admin" in notes
    assert (
        f"http://{RELEASE}-stagegate-router.{NAMESPACE}.svc:8080/models/MODEL/invocations" in notes
    )
    assert "stagegate register-webhook" in notes  # registerWebhook is off in this file
    assert "TRIAL MODE" not in notes


@slow
def test_strict_validation_would_catch_a_misspelled_field() -> None:
    """The check above is only worth something if it refuses what a cluster would."""
    deployment = one(template(ci("minimal")), "Deployment", "-router")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolicyy"):
        kubernetes_validate.validate(deployment, "1.37.0", strict=True)


# -- the router -----------------------------------------------------------------------------


@slow
@pytest.mark.parametrize("values", CI_FILES, ids=lambda p: p.stem)
def test_router_runs_two_or_more_replicas_with_hpa_and_pdb(values: Path) -> None:
    objs = template(values)
    router = one(objs, "Deployment", "-router")
    pod_labels = router["spec"]["template"]["metadata"]["labels"]
    hpa = one(objs, "HorizontalPodAutoscaler", "-router")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": router["metadata"]["name"],
    }
    assert "replicas" not in router["spec"]  # the HPA owns the count
    fewest = hpa["spec"]["minReplicas"]
    assert fewest >= 2
    assert hpa["spec"]["maxReplicas"] >= fewest
    pdb = one(objs, "PodDisruptionBudget", "-router")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert 1 <= pdb["spec"]["minAvailable"] < fewest  # a node can still be drained


@slow
def test_router_without_autoscaling_keeps_its_replica_count() -> None:
    objs = template(ci("minimal"), sets=("router.autoscaling.enabled=false",))
    assert one(objs, "Deployment", "-router")["spec"]["replicas"] >= 2
    assert not find(objs, "HorizontalPodAutoscaler")
    assert find(objs, "PodDisruptionBudget", "-router")


@slow
def test_router_polls_the_api_traffic_endpoint_with_its_token_only() -> None:
    objs = template(ci("minimal"))
    api_service = one(objs, "Service", "-api")
    port = api_service["spec"]["ports"][0]["port"]
    (container,) = one(objs, "Deployment", "-router")["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    policy = args[args.index("--policy") + 1]
    api_host = f"{api_service['metadata']['name']}.{NAMESPACE}.svc"
    assert policy == f"http://{api_host}:{port}/api/v1/traffic"
    env = env_of(container)
    assert env["STAGEGATE_ROUTER_TOKEN"]["secretKeyRef"]["key"] == "router-token"
    # Least privilege: the router can read policies, not the database or the webhook secret.
    assert "STAGEGATE_DB__URL" not in env
    assert "STAGEGATE_WEBHOOK__SECRET" not in env
    assert "envFrom" not in container


@slow
def test_chart_commands_are_real_cli_commands_and_options() -> None:
    """Every `stagegate` command and option the chart runs exists in cli.py."""
    group = typer.main.get_command(cli_app)
    commands: dict[str, Any] = group.commands  # type: ignore[attr-defined]
    seen = 0
    for what, spec in pod_specs(template(ci("trial"))):
        for c in spec.get("initContainers", []) + spec["containers"]:
            argv = c.get("command", []) + c.get("args", [])
            if not argv or argv[0] != "stagegate":
                continue
            seen += 1
            command = commands[argv[1]]
            known = {opt for p in command.params for opt in p.opts}
            flags = {a for a in argv[2:] if a.startswith("--")}
            assert flags <= known, f"{what}: {flags - known} not options of {argv[1]}"
    assert seen >= 3  # router, worker, register-webhook


@slow
def test_inline_scripts_are_the_linted_files_and_dependents_wait_for_the_api() -> None:
    """`python -c` bodies are exactly files/*.py (which ruff checks and these tests run)."""
    shipped = {p.read_text(): p.name for p in (CHART / "files").glob("*.py")}
    objs = template(ci("trial"))
    used = set()
    for what, spec in pod_specs(objs):
        for c in spec.get("initContainers", []) + spec["containers"]:
            if c.get("command") == ["python", "-c"]:
                assert c["args"][0] in shipped, f"{what} {c['name']} runs an unlisted script"
                used.add(shipped[c["args"][0]])
    assert used == set(shipped.values())
    health = f"http://{RELEASE}-stagegate-api.{NAMESPACE}.svc:8765/api/health"
    for component in ("router", "worker"):
        spec = one(objs, "Deployment", f"-{component}")["spec"]["template"]["spec"]
        (wait,) = spec["initContainers"]
        assert wait["args"] == [(CHART / "files" / "wait_for.py").read_text(), health]


def test_wait_for_returns_only_once_the_url_answers_2xx() -> None:
    import http.server
    import threading

    answers = [503, 200]
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            self.send_response(answers[min(len(seen), len(answers)) - 1])
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        wait_for = runpy.run_path(str(CHART / "files" / "wait_for.py"), run_name="chart_files")
        wait_for["main"](f"http://127.0.0.1:{server.server_port}/api/health")
    finally:
        server.shutdown()
        server.server_close()
    assert seen == ["/api/health", "/api/health"]  # the 503 was not taken for ready


# -- RBAC and pod security ------------------------------------------------------------------


def _grants(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> verbs; refuses wildcards, names and escalation verbs."""
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "*" not in rule["verbs"]
        assert "resourceNames" not in rule
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


@slow
def test_worker_role_without_pod_reads_is_exactly_the_four_kinds() -> None:
    objs = template(ci("minimal"), sets=("serving.workerReadsPods=false",))
    assert _grants(one(objs, "Role", "-worker")) == dict.fromkeys(WORKER_RULES, WORKER_VERBS)


@slow
@pytest.mark.parametrize("values", CI_FILES, ids=lambda p: p.stem)
def test_worker_role_is_exactly_serving_objects_in_the_serving_namespace(values: Path) -> None:
    objs = template(values)
    serving_ns = (
        ci_values(values.stem.removeprefix("values-"))
        .get("serving", {})
        .get("namespace", "stagegate-serving")
    )
    assert serving_ns != NAMESPACE
    assert not find(objs, "ClusterRole")
    assert not find(objs, "ClusterRoleBinding")
    role = one(objs, "Role", "-worker")
    assert role["metadata"]["namespace"] == serving_ns
    assert _grants(role) == {
        **dict.fromkeys(WORKER_RULES, WORKER_VERBS),
        ("", "pods"): {"get", "list"},  # read-only: a stuck rollout names its pods' reasons
    }
    binding = one(objs, "RoleBinding", "-worker")
    assert binding["metadata"]["namespace"] == serving_ns
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    worker_sa = one(objs, "Deployment", "-worker")["spec"]["template"]["spec"]
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": worker_sa["serviceAccountName"],
            "namespace": NAMESPACE,
        }
    ]
    # Nothing else in the release namespace may touch serving objects or read Secrets broadly.
    for other in find(objs, "Role"):
        if other is role:
            continue
        for rule in other["rules"]:
            assert set(rule["resources"]) == {"secrets"}
            assert "create" in rule["verbs"] or rule.get("resourceNames")


@slow
@pytest.mark.parametrize("values", CI_FILES, ids=lambda p: p.stem)
def test_pods_are_non_root_read_only_without_capabilities(values: Path) -> None:
    objs = template(values)
    token_holders = set()
    for what, spec in pod_specs(objs):
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", what
        assert not spec.get("hostNetwork"), what
        assert not spec.get("hostPID"), what
        if spec.get("automountServiceAccountToken") is not False:
            token_holders.add(what.split("/", 1)[1].removeprefix(f"{RELEASE}-stagegate-"))
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            where = f"{what} {c['name']}"
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
            assert (sc.get("runAsUser") or pod_sc.get("runAsUser", 0)) != 0, where
            assert sc.get("privileged") is not True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert not sc["capabilities"].get("add"), where
    # Only the worker (and the pre-install Job that makes the Secret) holds an API token.
    assert token_holders <= {"worker", "secrets"}
    assert "worker" in token_holders
    for sa in find(objs, "ServiceAccount"):
        if not sa["metadata"]["name"].endswith("-worker"):
            assert sa["automountServiceAccountToken"] is False


@slow
def test_network_policies_admit_only_what_serves() -> None:
    objs = template(ci("trial"))
    policies = {
        o["metadata"]["name"].removeprefix(f"{RELEASE}-stagegate-"): o["spec"]
        for o in find(objs, "NetworkPolicy")
    }
    assert set(policies) == {"api", "router", "worker", "postgresql", "mlflow", "prefect"}
    for name, spec in policies.items():
        pods = [
            d
            for d in find(objs, "Deployment", f"-{name}")
            if spec["podSelector"]["matchLabels"].items()
            <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(pods) == 1, f"{name}'s policy selects {len(pods)} Deployments"
        assert spec["policyTypes"] == ["Ingress"]
    assert policies["worker"]["ingress"] == []  # serves nothing
    (db_rule,) = policies["postgresql"]["ingress"]
    assert db_rule["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/instance": RELEASE}}}
    ]
    assert db_rule["ports"] == [{"port": 5432, "protocol": "TCP"}]
    serving_ns = ci_values("trial")["serving"]["namespace"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": serving_ns}}} in (
        policies["mlflow"]["ingress"][0]["from"]
    )
    off = template(ci("minimal"), sets=("networkPolicy.enabled=false",))
    assert not find(off, "NetworkPolicy")


@slow
def test_api_gets_a_pdb_only_with_replicas_to_spare() -> None:
    assert not find(template(ci("minimal")), "PodDisruptionBudget", "-api")
    objs = template(ci("external-db"))
    replicas = one(objs, "Deployment", "-api")["spec"]["replicas"]
    assert replicas == ci_values("external-db")["api"]["replicaCount"] >= 2
    assert one(objs, "PodDisruptionBudget", "-api")["spec"]["minAvailable"] < replicas


# -- secrets --------------------------------------------------------------------------------


def _secret_refs(objs: list[Any]) -> set[tuple[str, str]]:
    refs = set()
    for _, spec in pod_specs(objs):
        for c in spec.get("initContainers", []) + spec["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.add((ref["name"], ref["key"]))
    return refs


@slow
def test_existing_secrets_keep_credentials_out_of_the_output() -> None:
    values = ci_values("external-db")
    objs = template(ci("external-db"))
    assert not find(objs, "Secret")  # nothing rendered from values
    (worker,) = one(objs, "Deployment", "-worker")["spec"]["template"]["spec"]["containers"]
    tracking = values["modelServer"]["existingTrackingSecret"]
    assert env_of(worker)["STAGEGATE_KUBERNETES__TRACKING_SECRET"] == tracking
    assert not [
        o
        for o in objs
        if "helm.sh/hook" in o["metadata"].get("annotations", {})
        and o["kind"] == "Job"
        and o["metadata"]["name"].endswith("-secrets")
    ]
    given = values["auth"]["existingSecret"]
    db = values["externalDatabase"]
    assert _secret_refs(objs) == {
        (given, "webhook-secret"),
        (given, "alert-secret"),
        (given, "router-token"),
        (db["existingSecret"], db["existingSecretKey"]),
    }
    # Every variable holding a credential is a reference, never a literal.
    for what, spec in pod_specs(objs):
        for c in spec.get("initContainers", []) + spec["containers"]:
            for name, value in env_of(c).items():
                if name in CREDENTIAL_ENV:
                    assert isinstance(value, dict), f"{what} {name} is a literal"


@slow
def test_a_database_url_in_values_lands_only_in_a_secret() -> None:
    password = "hunter2-not-in-configmaps"
    url = f"postgresql+psycopg://stagegate:{password}@db.example.com/stagegate"
    objs = template(
        ci("minimal"), sets=("externalDatabase.existingSecret=", f"externalDatabase.url={url}")
    )
    holders = [o for o in objs if password in json.dumps(o)]
    found = [(o["kind"], o["metadata"]["name"]) for o in holders]
    assert found == [("Secret", f"{RELEASE}-stagegate-db")]
    assert holders[0]["stringData"] == {"url": url}
    assert (f"{RELEASE}-stagegate-db", "url") in _secret_refs(objs)


@slow
def test_generated_secret_holds_every_key_the_pods_read() -> None:
    """The pre-install Job's script makes each key any pod reads from the auth Secret."""
    made = runpy.run_path(str(CHART / "files" / "make_secrets.py"), run_name="chart_files")
    fresh = made["fresh"]()
    objs = template(ci("trial"))  # trial pods read the most keys
    job = one(objs, "Job", "-secrets")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-c"]
    assert container["args"] == [(CHART / "files" / "make_secrets.py").read_text()]
    auth = env_of(container)["SECRET_NAME"]
    read = {key for name, key in _secret_refs(objs) if name == auth}
    assert read == set(fresh)
    assert fresh["router-token"].startswith("sg_")
    assert fresh != made["fresh"]()  # random each time, never a fixed default


def test_bootstrap_migrates_and_registers_the_router_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API's init container script, run as the pod runs it, twice (idempotent)."""
    from stagegate.db import make_engine, transaction
    from stagegate.governance import tokens
    from stagegate.lifecycle.stages import Role
    from stagegate.settings import get_settings

    secrets = runpy.run_path(str(CHART / "files" / "make_secrets.py"), run_name="chart_files")
    token = secrets["fresh"]()["router-token"]
    db_url = f"sqlite:///{tmp_path / 'governance.db'}"
    monkeypatch.setenv("STAGEGATE_DB__URL", db_url)
    monkeypatch.setenv("STAGEGATE_HOME", str(tmp_path))
    monkeypatch.setenv("STAGEGATE_ROUTER_TOKEN", token)
    script = str(CHART / "files" / "bootstrap.py")
    get_settings.cache_clear()
    try:
        runpy.run_path(script, run_name="__main__")
        runpy.run_path(script, run_name="__main__")
    finally:
        get_settings.cache_clear()
    engine = make_engine(db_url)
    try:
        with transaction(engine, read_only=True) as s:
            who = tokens.authenticate(s, token)
            listed = [t for t in tokens.list_tokens(s) if t.name == "stagegate-router"]
    finally:
        engine.dispose()
    assert (who.name, who.role) == ("stagegate-router", Role.service)
    assert len(listed) == 1


def test_bootstrap_refuses_a_token_without_the_prefix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stagegate.settings import get_settings

    monkeypatch.setenv("STAGEGATE_DB__URL", f"sqlite:///{tmp_path / 'g.db'}")
    monkeypatch.setenv("STAGEGATE_HOME", str(tmp_path))
    monkeypatch.setenv("STAGEGATE_ROUTER_TOKEN", "not-a-stagegate-token")
    get_settings.cache_clear()
    try:
        with pytest.raises(SystemExit, match="cannot register the stagegate-router token"):
            runpy.run_path(str(CHART / "files" / "bootstrap.py"), run_name="__main__")
    finally:
        get_settings.cache_clear()


# -- model-server defaults ------------------------------------------------------------------


@slow
def test_gpu_values_reach_the_model_server_defaults() -> None:
    wanted = ci_values("gpu")["modelServer"]
    objs = template(ci("gpu"))
    (worker,) = one(objs, "Deployment", "-worker")["spec"]["template"]["spec"]["containers"]
    env = env_of(worker)
    assert env["STAGEGATE_SERVING__BACKEND"] == "kubernetes"
    # One JSON object in the shape of a model policy's `serving` spec, as given.
    defaults = json.loads(env["STAGEGATE_KUBERNETES__SERVING_DEFAULTS"])
    assert defaults == wanted["defaults"]
    # The worker's settings take it as the cluster's serving spec.
    kube = KubernetesSettings.model_validate({"serving_defaults": defaults})
    assert kube.serving_defaults is not None
    assert kube.serving_defaults.gpus == defaults["gpus"]
    assert defaults["gpus"] >= 1
    assert defaults["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert env["STAGEGATE_KUBERNETES__IMAGE"].endswith(":" + wanted["image"]["tag"])
    serving_ns = ci_values("gpu")["serving"]["namespace"]
    assert env["STAGEGATE_KUBERNETES__NAMESPACE"] == serving_ns
    assert one(objs, "Namespace")["metadata"]["name"] == serving_ns
    # What the backend's Deployments name exists in the serving namespace, made by the chart.
    tracking = one(objs, "Secret", "-mlflow")
    assert tracking["metadata"]["name"] == env["STAGEGATE_KUBERNETES__TRACKING_SECRET"]
    assert tracking["metadata"]["namespace"] == serving_ns
    assert tracking["stringData"] == {
        env["STAGEGATE_KUBERNETES__TRACKING_SECRET_KEY"]: ci_values("gpu")["config"][
            "mlflowTrackingUri"
        ]
    }
    model_sa = one(objs, "ServiceAccount", "-model-server")
    assert model_sa["metadata"]["name"] == env["STAGEGATE_KUBERNETES__SERVICE_ACCOUNT"]
    assert model_sa["metadata"]["namespace"] == serving_ns
    assert model_sa["automountServiceAccountToken"] is False
    # The CPU default leaves GPUs out and keeps the main image.
    (cpu_worker,) = one(template(ci("minimal")), "Deployment", "-worker")["spec"]["template"][
        "spec"
    ]["containers"]
    cpu_env = env_of(cpu_worker)
    assert json.loads(cpu_env["STAGEGATE_KUBERNETES__SERVING_DEFAULTS"])["gpus"] == 0
    assert cpu_env["STAGEGATE_KUBERNETES__IMAGE"] == cpu_worker["image"]


# -- validateValues -------------------------------------------------------------------------


@slow
@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("externalDatabase.existingSecret=",), "external database missing"),
        (("config.mlflowTrackingUri=",), "MLflow missing"),
        (("config.prefectApiUrl=",), "Prefect missing"),
        (("postgresql.enabled=true",), "trial instances"),
        (("config.mlflowTrackingUri=http://mlflow.internal:5000",), "prod mode refuses plain http"),
        ((f"serving.namespace={NAMESPACE}",), "worker could change the chart's own Deployments"),
        (("router.pdb.minAvailable=2",), "or no node could ever be drained"),
        (("externalDatabase.url=sqlite:///x.db",), "SQLite"),
        (("config.extraEnv.STAGEGATE_WEBHOOK__SECRET=x",), "would show in plain text"),
        (("router.resources.requests=null",), "needs router.resources.requests.cpu"),
        (("api.replicaCount=2", "api.pdb.minAvailable=2"), "below api.replicaCount"),
        (
            (
                "serving.namespace=stagegate",
                "serving.allowReleaseNamespace=true",
                "serving.createNamespace=true",
            ),
            "would create the release namespace itself",
        ),
        (("config.prefectApiUrl=http://localhost.evil.com/api",), "prod mode refuses plain http"),
    ],
)
def test_validate_values_refuses_with_a_clear_message(sets: tuple[str, ...], message: str) -> None:
    err = template_error(ci("minimal"), sets=sets)
    assert "VALUES VALIDATION" in err
    assert message in err


@slow
def test_validate_values_lists_every_mistake_at_once() -> None:
    err = template_error()  # the defaults name no database, MLflow or Prefect
    for message in ("external database missing", "MLflow missing", "Prefect missing"):
        assert message in err


@slow
def test_schema_refuses_unknown_and_mistyped_values() -> None:
    err = template_error(ci("minimal"), sets=("router.replicas=3",))
    assert "additional properties 'replicas' not allowed" in err
    err = template_error(ci("minimal"), sets=("router.autoscaling.minReplicas=1",))
    assert "minReplicas" in err
    # The serving defaults are checked in the shape of a model policy's `serving` spec.
    err = template_error(ci("minimal"), sets=("modelServer.defaults.resources.memory=8GB",))
    assert "/modelServer/defaults/resources/memory" in err
    err = template_error(ci("minimal"), sets=("modelServer.defaults.nodeSelector.a=b",))
    assert "'nodeSelector' not allowed" in err


# -- conventions ----------------------------------------------------------------------------


def _leaves(tree: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _leaves(value, path + ".")
        else:
            yield path


def test_every_value_has_a_param_comment_and_a_schema_entry() -> None:
    text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    params = set(re.findall(r"^\s*## @param (\S+) \S", text, flags=re.MULTILINE))
    leaves = set(_leaves(values))
    undocumented = {
        leaf for leaf in leaves if not any(leaf == p or leaf.startswith(p + ".") for p in params)
    }
    assert not undocumented, f"values without an @param line: {sorted(undocumented)}"
    stale = {p for p in params if not any(leaf == p or leaf.startswith(p + ".") for leaf in leaves)}
    assert not stale, f"@param lines naming no value: {sorted(stale)}"
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(values) <= set(schema["properties"])
    assert schema["additionalProperties"] is False


def test_secure_defaults_in_values() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["config"]["mode"] == "prod"
    assert values["containerSecurityContext"]["readOnlyRootFilesystem"] is True
    assert values["containerSecurityContext"]["capabilities"]["drop"] == ["ALL"]
    assert values["podSecurityContext"]["runAsNonRoot"] is True
    assert values["podSecurityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert not any(values[k]["enabled"] for k in ("postgresql", "mlflow", "prefect"))


@slow
def test_the_inference_log_on_s3_needs_no_volume_and_reaches_every_pod_that_uses_it() -> None:
    """The API (feedback labels, reports), router (writes) and worker (reads) all see the same
    log: one shared volume by default, or the object store with its credentials."""
    users = ("-api", "-router", "-worker")

    def containers(objs: list[Any], suffix: str) -> dict[str, Any]:
        spec = one(objs, "Deployment", suffix)["spec"]["template"]["spec"]
        (main,) = (c for c in spec["containers"] if c["name"] == suffix[1:])
        return {"pod": spec, "main": main}

    s3 = template(ci("s3"))
    url = ci_values("s3")["inferenceLog"]["url"]
    assert find(s3, "PersistentVolumeClaim") == []
    assert one(s3, "ConfigMap", "-config")["data"]["STAGEGATE_SERVING__LOG_URL"] == url
    for suffix in users:
        got = containers(s3, suffix)
        refs = [e["secretRef"]["name"] for e in got["main"].get("envFrom", []) if "secretRef" in e]
        assert refs == ["stagegate-inference-log"], (suffix, got["main"].get("envFrom"))
        assert "inference-log" not in {v["name"] for v in got["pod"]["volumes"]}
    router = containers(s3, "-router")["main"]["args"]
    assert router[router.index("--log-dir") + 1] == url

    shared = template(ci("minimal"))
    assert one(shared, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]
    for suffix in users:
        got = containers(shared, suffix)
        mounts = {m["name"]: m["mountPath"] for m in got["main"]["volumeMounts"]}
        assert mounts["inference-log"] == "/var/lib/stagegate/inference-log", suffix
        assert not [e for e in got["main"].get("envFrom", []) if "secretRef" in e]
