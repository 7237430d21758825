"""The `stagegate` command line."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from stagegate.errors import StagegateError
from stagegate.lifecycle.stages import Role
from stagegate.settings import Settings, get_settings

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Stagegate: gated promotion of MLflow model versions.",
)
token_app = typer.Typer(no_args_is_help=True, help="API tokens.")
audit_app = typer.Typer(no_args_is_help=True, help="The tamper-evident audit log.")
db_app = typer.Typer(no_args_is_help=True, help="The governance database.")
drift_app = typer.Typer(no_args_is_help=True, help="The drift monitor.")
k8s_app = typer.Typer(no_args_is_help=True, help="Kubernetes manifests (docs/kubernetes.md).")
versions_app = typer.Typer(no_args_is_help=True, help="Model versions, through the API.")
app.add_typer(token_app, name="token")
app.add_typer(audit_app, name="audit")
app.add_typer(db_app, name="db")
app.add_typer(drift_app, name="drift")
app.add_typer(k8s_app, name="k8s")
app.add_typer(versions_app, name="versions")

console = Console()
err = Console(stderr=True)


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/] {message}")
    return typer.Exit(code)


def _start_stack(settings: Settings) -> None:
    from stagegate import embedded

    embedded.start(settings, on_event=lambda line: console.print(f"  {line}"))


@app.command()
def up() -> None:
    """Start MLflow, Prefect, the API and the worker under $STAGEGATE_HOME (.stagegate/)."""
    try:
        _start_stack(get_settings())
    except StagegateError as exc:
        raise _fail(exc.detail) from None
    status(as_json=False)


@app.command()
def down() -> None:
    """Stop every service of the embedded stack."""
    from stagegate import stack

    stopped = stack.down(get_settings())
    console.print("stopped: " + (", ".join(stopped) or "nothing was running"))


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False,
) -> None:
    """Each service's URL, PID, health and restarts (by the watchdog), and the watchdog."""
    from stagegate import stack

    settings = get_settings()
    services = stack.status(settings)
    if as_json:  # keyed by service only; the watchdog is a row of the table
        typer.echo(
            json.dumps({k: v.model_dump(mode="json") for k, v in services.items()}, indent=2)
        )
        return
    statuses = {**services, "watchdog": stack.watchdog_status(settings)}
    table = Table("service", "url", "pid", "healthy", "restarts", "rss MiB")
    for name, s in statuses.items():
        rss = f"{s.rss_bytes / 2**20:.0f}" if s.rss_bytes else "-"
        health = "failed" if s.failed else "yes" if s.healthy else "no"
        restarts = str(s.restarts) if name != "watchdog" else "-"
        table.add_row(name, s.url or "-", str(s.pid or "-"), health, restarts, rss)
    console.print(table)
    for name, s in statuses.items():
        if s.failed:
            console.print(f"[red]{name} failed:[/] {s.failed}")
        elif s.last_restart_at:
            console.print(
                f"{name}: last restarted {_when(s.last_restart_at)} UTC ({s.last_restart_reason})"
            )
    if not statuses["watchdog"].running and any(s.running for s in statuses.values()):
        console.print(
            "[yellow]the watchdog is not running:[/] a crashed service stays down until "
            "`stagegate up`"
        )


@app.command()
def worker() -> None:
    """Serve the flow deployments of prefect.yaml, with their triggers (used by `up`)."""
    from stagegate import worker as worker_mod
    from stagegate.stack import worker_ready_file

    settings = get_settings()
    worker_mod.serve(poll_s=settings.prefect.runner_poll_s, ready_file=worker_ready_file(settings))


@app.command()
def router(
    policy: Annotated[
        str,
        typer.Option(
            help="Router config: a JSON/YAML file, or the governance API's "
            "/api/v1/traffic URL (token in STAGEGATE_ROUTER_TOKEN)."
        ),
    ],
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    log_dir: Annotated[
        str | None, typer.Option(help="Inference log root; no logging when left out.")
    ] = None,
    shadow_queue: Annotated[
        int, typer.Option(help="Mirrors waiting per shadow; more are dropped.")
    ] = 1000,
    shadow_workers: Annotated[int, typer.Option(help="Mirrors in flight per shadow.")] = 8,
    features_flush_s: Annotated[
        float | None,
        typer.Option(
            help="Decoded feature rows wait at most this long for a bigger file "
            "(default: STAGEGATE_SERVING__LOG_FEATURES_FLUSH_INTERVAL_S)."
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Route model traffic by policy: champion/challenger, shadow mirrors, fallback.

    Reloads the policy on SIGHUP and when the file changes; drains on SIGTERM.
    /policies and /metrics need the bearer token STAGEGATE_SERVING__ROUTER_ADMIN_TOKEN.
    """
    import logging

    from stagegate.serving.router import server as router_mod
    from stagegate.serving.router.config import policy_source

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    settings = get_settings()
    admin_token = settings.serving.router_admin_token
    if admin_token is None:
        if settings.mode == "prod":
            raise _fail("prod mode: set STAGEGATE_SERVING__ROUTER_ADMIN_TOKEN (guards /policies)")
        logging.getLogger("stagegate.router").warning(
            "no STAGEGATE_SERVING__ROUTER_ADMIN_TOKEN: /policies and /metrics are open"
        )
    app_ = router_mod.Router(
        policy_source(policy),
        router_mod.writer_for(
            log_dir,
            features_flush_interval_s=features_flush_s
            or settings.serving.log_features_flush_interval_s,
        ),
        shadow_queue_size=shadow_queue,
        shadow_workers=shadow_workers,
        admin_token=admin_token,
    )
    try:
        router_mod.serve(app_, host=host, port=port, log_level=log_level)
    except StagegateError as exc:
        raise _fail(exc.detail) from None


@app.command("serve-model")
def serve_model(
    model_uri: Annotated[
        str,
        typer.Argument(help="models:/name/version, models:/name@alias, runs:/..., or a path."),
    ],
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    device: Annotated[
        str, typer.Option(help="auto, cpu, cuda or cuda:N (used by PyTorch models).")
    ] = "auto",
    max_batch_rows: Annotated[
        int, typer.Option(min=1, help="Most rows merged into one predict call.")
    ] = 64,
    max_wait_ms: Annotated[
        float, typer.Option(min=0, help="Longest a forming batch waits for requests in flight.")
    ] = 2.0,
    max_body_bytes: Annotated[
        int, typer.Option(min=1, help="Larger request bodies are refused with 413.")
    ] = 8 * 2**20,
    tracking_uri: Annotated[
        str | None,
        typer.Option(envvar="MLFLOW_TRACKING_URI", help="MLflow tracking and registry server."),
    ] = None,
    expect_digest: Annotated[
        str | None,
        typer.Option(
            help="sha256 the artifact tree must have (the approved one); otherwise refuse to load."
        ),
    ] = None,
) -> None:
    """Serve an MLflow pyfunc model: mlflow's /invocations protocol, micro-batched, with metrics."""
    from stagegate.serving.model_server.server import serve

    try:
        serve(
            model_uri,
            host=host,
            port=port,
            device=device,
            max_batch_rows=max_batch_rows,
            max_wait_ms=max_wait_ms,
            max_body_bytes=max_body_bytes,
            tracking_uri=tracking_uri,
            expect_digest=expect_digest,
        )
    except StagegateError as exc:
        raise _fail(exc.detail) from None


@app.command("register-webhook")
def register_webhook() -> None:
    """Register the webhook on an existing MLflow server (the embedded stack does it itself).

    Uses STAGEGATE_MLFLOW__TRACKING_URI, STAGEGATE_API__PUBLIC_URL and STAGEGATE_WEBHOOK__SECRET.
    """
    from stagegate import embedded
    from stagegate.settings import DEV_WEBHOOK_SECRET

    settings = get_settings()
    if settings.webhook.secret == DEV_WEBHOOK_SECRET:
        raise _fail("set STAGEGATE_WEBHOOK__SECRET (the API must be given the same one)")
    try:
        console.print(embedded.register_webhook(settings, settings.webhook.secret))
    except StagegateError as exc:
        raise _fail(exc.detail) from None


@app.command()
def reconcile() -> None:
    """Run one reconcile pass now (the worker also runs it every minute)."""
    from dataclasses import asdict

    from stagegate import runtime

    report = runtime.reconcile(runtime.current())
    typer.echo(json.dumps(asdict(report), indent=2))


@app.command()
def evaluate(
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[int, typer.Argument(help="Version in shadow or canary.")],
) -> None:
    """Decide the version's shadow or canary report now, if the traffic allows (the shadow
    and canary flows do this on their own)."""
    from dataclasses import asdict

    from stagegate import runtime
    from stagegate.steps.evaluate import evaluate as step

    rt = runtime.current()
    try:
        result = step(rt.engine, rt.sink, rt.settings.inference_log_url, model, version)
    except StagegateError as exc:
        raise _fail(exc.detail) from None
    typer.echo(json.dumps(asdict(result), indent=2, default=str))


@drift_app.command("check")
def drift_check(
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[
        int | None, typer.Option(help="Version to check (default: every watched live one).")
    ] = None,
    aligned: Annotated[
        bool,
        typer.Option(
            "--aligned", help="Check the scheduled window (ending on the policy's interval)."
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Check for drift now, through the same step as the scheduled flow: the window ends now,
    the evaluation is recorded, and drift sets off the policy's actions."""
    from dataclasses import asdict

    from stagegate import runtime
    from stagegate.db import utcnow
    from stagegate.monitoring.results import DRIFT
    from stagegate.steps.drift import check_version, targets

    rt = runtime.current()
    monitor = runtime.monitor(rt)
    chosen = [(model, version)] if version else [t for t in targets(rt.engine) if t[0] == model]
    if not chosen:
        raise _fail(f"{model} has no live version its drift policy watches; pass --version")
    outcomes = []
    for name, number in chosen:
        try:
            outcomes.append(
                check_version(monitor, name, number, until=None if aligned else utcnow())
            )
        except StagegateError as exc:
            raise _fail(exc.detail) from None
    if as_json:
        typer.echo(json.dumps([asdict(o) for o in outcomes], indent=2, default=str))
        return
    for o in outcomes:
        colour = {"drift": "red", "ok": "green"}.get(o.verdict, "yellow")
        console.print(f"{o.model} v{o.version}: [{colour}]{o.verdict}[/] - {o.reason}")
        console.print(f"  window {o.window_start:%Y-%m-%d %H:%M:%S} .. {o.window_end:%H:%M:%S} UTC")
        if o.drifted_features:
            console.print(f"  drifted features: {', '.join(o.drifted_features)}")
        if o.report_url:
            console.print(f"  report: {o.report_url}")
        for action, result in o.actions.items():
            console.print(f"  {action}: {result}")
    if any(o.verdict == DRIFT for o in outcomes):
        raise typer.Exit(3)  # scripts can tell drift from a clean check


def _forget_embedded_state(settings: Settings) -> None:
    """The demo's story needs an empty registry: a second run would find its versions."""
    if settings.mode == "prod" or settings.db.url is not None:
        err.print(
            "[red]--fresh deletes embedded state only: "
            "not in prod mode, nor with STAGEGATE_DB__URL set[/]"
        )
        raise typer.Exit(2)
    from stagegate import stack

    stack.down(settings)
    if settings.home.exists():
        shutil.rmtree(settings.home)
        console.print(f"fresh start: stopped the stack and removed {settings.home}")


@app.command()
def demo(
    exit_: Annotated[
        bool, typer.Option("--exit", help="Stop the stack after; exit 0 on success.")
    ] = False,
    model: Annotated[str, typer.Option(help="Registered model name to use.")] = "demo-fraud",
    fresh: Annotated[
        bool,
        typer.Option(
            "--fresh",
            help="Stop the embedded stack and delete its home first (dev mode, embedded "
            "database only), so the demo starts from nothing, as `make demo` does.",
        ),
    ] = False,
) -> None:
    """Train, register v1 and v2 with MLflow's client, and approve both into production."""
    from stagegate import stack
    from stagegate.demo import Demo, DemoFailed

    settings = get_settings()
    if fresh:
        _forget_embedded_state(settings)
    # Demo-sized traffic: feature rows reach the drift monitor within seconds, not minutes.
    fast = settings.serving.model_copy(update={"log_features_flush_interval_s": 1.0})
    settings = settings.model_copy(update={"serving": fast})
    ok = False
    try:
        console.rule("starting the embedded stack")
        _start_stack(settings)
        console.rule("the lifecycle of two versions")
        ok = Demo(settings, console, model=model).run()
    except (DemoFailed, StagegateError) as exc:
        err.print(f"[red]demo failed:[/] {exc}")
    finally:
        if exit_:
            stack.down(settings)
    if not exit_:
        console.print(
            f"\nWeb UI: {settings.api.url}/ui/ (pick a demo user to sign in)\n"
            f"API docs: {settings.api.url}/api/docs   MLflow: "
            f"{settings.mlflow.tracking_uri}   Prefect: "
            f"{settings.prefect.api_url.removesuffix('/api')}\n"
            "Stop everything with: .venv/bin/stagegate down"
        )
    raise typer.Exit(0 if ok else 1)


def _when(at: datetime | None) -> str:
    return at.strftime("%Y-%m-%d %H:%M") if at else "-"


@token_app.command("create")
def token_create(
    role: Annotated[Role, typer.Option(help="viewer, author, approver, admin or service.")],
    name: Annotated[
        str | None, typer.Argument(help="The identity approvals and audit rows name.")
    ] = None,
    name_option: Annotated[
        str | None, typer.Option("--name", help="The same as NAME (older spelling).")
    ] = None,
    expires_in: Annotated[
        str | None,
        typer.Option(help="Lifetime, such as 30d, 12h or 2w; without it, until revoked."),
    ] = None,
) -> None:
    """Create an API token and print it (only its hash is stored).

    The platform's own identities (stagegate, mlflow-webhook, stagegate-router) are refused.
    """
    from stagegate.governance import tokens
    from stagegate.migrate import upgrade

    if name is not None and name_option is not None and name != name_option:
        raise _fail(f"two names given: {name!r} and --name {name_option!r}", code=2)
    who = name if name is not None else name_option
    if who is None:
        raise _fail("name the identity: stagegate token create NAME --role ROLE", code=2)
    try:
        lifetime = tokens.parse_lifetime(expires_in) if expires_in is not None else None
    except StagegateError as exc:
        raise _fail(exc.detail, code=2) from None
    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    try:
        with _db(settings.database_url) as s:
            secret = tokens.create_token(s, name=who, role=role, expires_in=lifetime)
    except StagegateError as exc:
        raise _fail(exc.detail) from None
    typer.echo(secret)


@token_app.command("list")
def token_list(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False,
) -> None:
    """Every token: name, role, created, expires, revoked (never a secret or a hash)."""
    from dataclasses import asdict

    from stagegate.governance import tokens
    from stagegate.migrate import upgrade

    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    with _db(settings.database_url, read_only=True) as s:
        rows = tokens.list_tokens(s)
    if as_json:
        iso = {"created_at", "expires_at", "revoked_at"}
        typer.echo(
            json.dumps(
                [
                    {k: (v.isoformat() if k in iso and v else v) for k, v in asdict(t).items()}
                    for t in rows
                ],
                indent=2,
            )
        )
        return
    table = Table("name", "role", "created (UTC)", "expires (UTC)", "revoked (UTC)", "status")
    for t in rows:
        table.add_row(
            t.name,
            t.role.value,
            _when(t.created_at),
            _when(t.expires_at),
            _when(t.revoked_at),
            t.status,
        )
    console.print(table)


@token_app.command("revoke")
def token_revoke(
    name: Annotated[str | None, typer.Argument(help="Identity whose tokens to revoke.")] = None,
    name_option: Annotated[
        str | None, typer.Option("--name", help="The same as NAME (older spelling).")
    ] = None,
) -> None:
    """Revoke every active token of an identity."""
    from stagegate.governance import tokens

    who = name if name is not None else name_option
    if who is None:
        raise _fail("name the identity: stagegate token revoke NAME", code=2)
    try:
        with _db(get_settings().database_url) as s:
            n = tokens.revoke_token(s, name=who)
    except StagegateError as exc:
        raise _fail(exc.detail) from None
    typer.echo(f"revoked {n} token(s) of {who}")


@token_app.command("link")
def token_link(
    name: Annotated[str, typer.Argument(help="The identity (a token holder).")],
    mlflow_user: Annotated[str, typer.Argument(help="An MLflow user name that is this person.")],
) -> None:
    """Link an MLflow user name to an identity: versions that MLflow user registers are then
    the identity's own, which may not approve them (separation of duties)."""
    from stagegate.governance import identities
    from stagegate.migrate import upgrade

    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    try:
        with _db(settings.database_url) as s:
            added = identities.link(s, identity=name, mlflow_user=mlflow_user, actor="cli")
    except StagegateError as exc:
        raise _fail(exc.detail) from None
    typer.echo(f"{'linked' if added else 'already linked:'} MLflow user {mlflow_user} -> {name}")


@token_app.command("unlink")
def token_unlink(
    name: Annotated[str, typer.Argument(help="The identity.")],
    mlflow_user: Annotated[str, typer.Argument(help="The MLflow user name to unlink.")],
) -> None:
    """Remove a link; that MLflow user's versions are then unmapped (see the policy)."""
    from stagegate.governance import identities

    try:
        with _db(get_settings().database_url) as s:
            identities.unlink(s, identity=name, mlflow_user=mlflow_user, actor="cli")
    except StagegateError as exc:
        raise _fail(exc.detail) from None
    typer.echo(f"unlinked MLflow user {mlflow_user} from {name}")


@versions_app.command("attest")
def versions_attest(
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[int, typer.Argument(help="The version you wrote.")],
    token: Annotated[
        str,
        typer.Option(
            envvar="STAGEGATE_TOKEN",
            help="Your API token (author, approver or admin): the attestation is its identity's.",
        ),
    ],
    api_url: Annotated[
        str | None,
        typer.Option(
            envvar="STAGEGATE_API_URL", help="The governance API (default: this home's API)."
        ),
    ] = None,
) -> None:
    """Attest that you wrote MODEL VERSION. Under `authorship: attested` its approvals count
    only after this, and you may not approve it yourself (separation of duties)."""
    import httpx

    url = (api_url or get_settings().api.url).rstrip("/")
    path = f"/api/v1/models/{model}/versions/{version}/authorship"
    try:
        r = httpx.post(url + path, headers={"Authorization": f"Bearer {token}"}, timeout=30.0)
    except httpx.HTTPError as exc:
        raise _fail(f"cannot reach the API at {url}: {exc}") from None
    if r.status_code != 201:
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        raise _fail(f"{r.status_code}: {detail}")
    body = r.json()
    typer.echo(
        f"attested {model} v{version} as {body['attested_by']} "
        f"(artifact {str(body['attested_digest'])[:12]}, registry author "
        f"{body['creator'] or 'none'})"
    )


@audit_app.command("verify")
def audit_verify(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False,
    checkpoint_file: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint",
            help="Also check the log against this signed checkpoint: exit 1 if the log was "
            "truncated or rewritten since, 3 if the checkpoint is forged or unreadable.",
        ),
    ] = None,
    pubkey: Annotated[
        Path | None,
        typer.Option(
            help="The public key (KEY.pub) the checkpoint must be signed with. Without it, "
            "only the checkpoint's own key is checked, which proves nothing about who wrote it."
        ),
    ] = None,
) -> None:
    """Walk the hash chain; exit 1 and name the first bad row if it was tampered with."""
    from dataclasses import asdict

    from stagegate.db import make_engine, transaction
    from stagegate.governance import audit
    from stagegate.governance import checkpoint as cp

    if pubkey is not None and checkpoint_file is None:
        raise _fail("--pubkey checks a checkpoint: give --checkpoint FILE too", code=2)
    try:
        saved = cp.read(checkpoint_file) if checkpoint_file else None
        trusted = cp.load_public_key(pubkey) if pubkey else None
        engine = make_engine(get_settings().database_url)
        try:
            with transaction(engine, read_only=True) as s:
                result = audit.verify(s)
                checked = cp.check(s, saved, trusted=trusted) if saved else None
        finally:
            engine.dispose()
    except cp.CheckpointError as exc:
        raise _fail(exc.detail, code=3) from None
    ok = result.ok and (checked is None or checked.ok)
    code = 0 if ok else 3 if checked is not None and checked.problem == "forged" else 1
    if as_json:
        doc = {**asdict(result), "ok": ok}
        if checked is not None:
            doc["checkpoint"] = checked.as_dict()
        typer.echo(json.dumps(doc))
        raise typer.Exit(code)
    if result.ok:
        console.print(f"audit chain ok: {result.rows} rows, head {result.head_hash[:16]}")
    else:
        console.print(f"[red]audit chain broken at row {result.first_bad_seq}:[/] {result.reason}")
    if checked is not None and checked.ok:
        console.print(f"checkpoint ok: {checked.reason}")
        if not checked.key_trusted:
            console.print(
                f"[yellow]note:[/] signed by key {checked.key_fingerprint}, named in the "
                "checkpoint itself; pass --pubkey to prove it is yours"
            )
    elif checked is not None and checked.problem != "broken":  # broken is said above
        console.print(f"[red]checkpoint check failed ({checked.problem}):[/] {checked.reason}")
    raise typer.Exit(code)


@audit_app.command("keygen")
def audit_keygen(
    key: Annotated[Path, typer.Option(help="Where to write the private key (mode 0600).")],
) -> None:
    """Make an Ed25519 signing key for checkpoints, and KEY.pub beside it.

    Keep the private key off the database's host: whoever holds it can sign any log.
    """
    from stagegate.governance import checkpoint as cp

    try:
        made = cp.generate_key(key)
    except cp.CheckpointError as exc:
        raise _fail(exc.detail) from None
    console.print(
        f"signing key {key} (0600), public key {cp.public_path(key)}, "
        f"fingerprint {cp.fingerprint(made.public_key())}"
    )


@audit_app.command("checkpoint")
def audit_checkpoint(
    key: Annotated[
        Path, typer.Option(help="Ed25519 signing key; made (0600, with KEY.pub) if missing.")
    ],
    out: Annotated[Path, typer.Option(help="Where to write the signed checkpoint (JSON).")],
) -> None:
    """Sign the head of the audit log into a file kept outside the database.

    `audit verify --checkpoint FILE --pubkey KEY.pub` later proves the log was neither cut
    short nor rewritten up to that head. Refused (exit 1) if the chain is already broken.
    """
    from stagegate.db import make_engine, transaction
    from stagegate.governance import checkpoint as cp

    try:
        if key.exists():
            signing = cp.load_private_key(key)
        else:
            signing = cp.generate_key(key)
            console.print(f"made signing key {key} (0600) and {cp.public_path(key)}")
        engine = make_engine(get_settings().database_url)
        try:
            with transaction(engine, read_only=True) as s:
                made = cp.create(s, signing)
        finally:
            engine.dispose()
        cp.write(made, out)
    except cp.CheckpointError as exc:
        raise _fail(exc.detail) from None
    console.print(
        f"checkpoint {out}: row {made.seq}, head {made.hash[:16]}, "
        f"key {cp.fingerprint(signing.public_key())}"
    )


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the database migrations."""
    from stagegate.migrate import upgrade

    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    console.print("database at head")


# -- k8s: the Kubernetes backend's manifests, for GitOps -------------------------------------


@k8s_app.command("render")
def k8s_render(
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[
        int | None,
        typer.Argument(help="Version to render (default: every version the endpoint serves)."),
    ] = None,
    role: Annotated[
        str | None,
        typer.Option(help="champion, challenger or shadow (default: the version's role now)."),
    ] = None,
    traffic: Annotated[
        str | None,
        typer.Option(help="`gateway-api`: add an HTTPRoute with the endpoint's split."),
    ] = None,
    gateway: Annotated[str, typer.Option(help="The Gateway the HTTPRoute attaches to.")] = (
        "stagegate"
    ),
    gateway_namespace: Annotated[
        str | None, typer.Option(help="The Gateway's namespace (default: the route's).")
    ] = None,
) -> None:
    """Print the manifests the Kubernetes backend would apply, as multi-document YAML."""
    from stagegate.db import make_engine, transaction
    from stagegate.governance import endpoints, policies, versions
    from stagegate.lifecycle.stages import DeploymentRole
    from stagegate.runtime import kube_cluster
    from stagegate.serving.backends.kubernetes import Gateway
    from stagegate.serving.backends.kubernetes.render import endpoint_documents, to_yaml

    if traffic not in (None, "gateway-api"):
        raise _fail(f"unknown --traffic {traffic!r}; the one choice is gateway-api")
    try:
        chosen_role = DeploymentRole(role) if role is not None else None
    except ValueError:
        raise _fail(f"unknown role {role!r}; one of champion, challenger, shadow") from None
    settings = get_settings()
    engine = make_engine(settings.database_url)
    try:
        with transaction(engine, read_only=True) as session:
            spec = policies.get_policy(session, model).serving
            endpoint = endpoints.find_endpoint(session, model)
            row = versions.find_version(session, model, version) if version is not None else None
            recorded = row.digest if row is not None else None
    finally:
        engine.dispose()  # a one-shot command: close its connections, don't leave them to GC
    roles = {v: r for r, v in endpoint.spec.arms.items()} if endpoint else {}
    digests = endpoint.spec.digests if endpoint else {}
    if version is not None:
        if row is None:
            raise _fail(f"model {model!r} has no version {version}")
        plays = chosen_role or roles.get(version)
        if plays is None:
            raise _fail(f"{model} v{version} plays no role on its endpoint; pass --role")
        wanted = {version: (plays, digests.get(version, recorded))}
    else:
        wanted = {v: (r, digests.get(v)) for v, r in roles.items()}
        if not wanted:
            raise _fail(f"{model} serves no version; name one and pass --role")
    route = None
    if traffic == "gateway-api":
        if endpoint is None:
            raise _fail(f"{model} has no endpoint to route")
        route = (endpoint.spec, Gateway(gateway, gateway_namespace))
    try:
        docs = endpoint_documents(model, wanted, spec, kube_cluster(settings), route=route)
    except StagegateError as exc:
        raise _fail(exc.detail) from None
    typer.echo(to_yaml(docs), nl=False)


@contextmanager
def _db(url: str, *, read_only: bool = False) -> Iterator[Any]:
    """One transaction on a one-shot engine, disposed after: a command's connections are
    closed, not left to the garbage collector."""
    from stagegate.db import make_engine, transaction

    engine = make_engine(url)
    try:
        with transaction(engine, read_only=read_only) as session:
            yield session
    finally:
        engine.dispose()


if __name__ == "__main__":
    app()
