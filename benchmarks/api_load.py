"""The governance API under load: mixed reads and approvals at a fixed rate, SQLite and PostgreSQL.

Usage: .venv/bin/python benchmarks/api_load.py [--quick] [--rate 200] [--duration 60]
                                              [--workers N] [--find-limit]

For each database (a fresh SQLite file; a throwaway PostgreSQL from tests/support/postgres.sh
when its server binaries are installed) the script migrates, seeds models, versions, pending
candidate->shadow transitions and tokens through the governance services, starts the API as
the embedded stack does (`uvicorn stagegate.api.app:create_app --factory`, with
`--workers` from `STAGEGATE_API__WORKERS` unless `--workers` says otherwise), and sends an
open-loop load: requests start on a fixed schedule whatever the answers do, and
latency counts from the scheduled start, so a stalled server cannot hide its queue. The mix:
90% reads (GET /api/v1/models, /models/{m}/versions/{v}, /transitions, /audit) by viewer
tokens, 10% decisions (80% approve, 20% reject) on distinct pending transitions by approvers.
Events go to a stub of Prefect's /events (a 204 each), so approvals pay for their announcement.

It also counts the SQL statements of one GET /api/v1/models with 1 and with 50 models (in
process, an engine event listener): equal counts mean no query per model (no N+1).

Each run reports the API's CPU time per request (its processes' user+system time over the run,
from /proc), which a machine shared with other work distorts far less than latency, and the
load average before and after. `--find-limit` then searches, by bisection over `duration`-long
steps against the same server, for the highest rate that holds p99 under 100 ms with 0 errors.

Prints readable lines, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PG_SCRIPT = ROOT / "tests" / "support" / "postgres.sh"
P99_TARGET_MS = 100.0
READ_SHARE = 0.9
APPROVE_SHARE = 0.8  # of the decisions; the rest are rejections
MODELS = 50
APPROVERS = 8


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args!r} exited with {proc.returncode}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(url, timeout=2) as resp,  # noqa: S310 - loopback only
        ):
            if resp.status == 200:
                return
        time.sleep(0.1)
    raise SystemExit(f"{url} did not answer in {timeout_s:.0f} s")


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants (uvicorn's workers), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(current := todo.pop())
        todo.extend(children.get(current, []))
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` and its descendants (0 where /proc is not there)."""
    ticks = 0
    for p in _tree(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- a stub of Prefect's event endpoint (its own process: not on the load client's GIL) -------


def serve_events_main(port: int) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


# --- seeding, through the governance services -------------------------------------------------


@dataclass
class Seeded:
    viewer: str
    approvers: list[str]
    models: list[str]
    versions: list[tuple[str, int]]
    pending: list[str]  # transition ids, shuffled


def _record(session: Any, model: str, version: int) -> None:
    from stagegate.governance.versions import DatasetInput, VersionRecord, record_version

    record_version(
        session,
        VersionRecord(
            name=model,
            version=version,
            source=f"models:/{model}/{version}",
            run_id=f"run-{model}-{version}",
            creator="dana",
            registered_at=datetime(2026, 1, 1, tzinfo=UTC),
            digest=f"{version:064x}",
            metrics={"accuracy": 0.9},
            datasets=[DatasetInput("train", f"file:///data/{model}.csv", f"d{version}")],
        ),
        actor="bench",
    )


def seed(url: str, *, models: int, pending: int, rng: random.Random) -> Seeded:
    """`models` models whose versions, all candidates, hold `pending` open transitions."""
    from stagegate.db import make_engine, transaction, utcnow
    from stagegate.governance import tokens, transitions
    from stagegate.lifecycle.stages import Role, Stage
    from stagegate.migrate import upgrade
    from stagegate.steps.common import SERVICE

    upgrade(url)
    engine = make_engine(url)
    names = [f"model-{i:03d}" for i in range(models)]
    per_model = max(1, math.ceil(pending / models))
    ids: list[str] = []
    versions: list[tuple[str, int]] = []
    try:
        for name in names:
            with transaction(engine) as session:
                for v in range(1, per_model + 1):
                    _record(session, name, v)
                    versions.append((name, v))
                    t, _ = transitions.request(
                        session,
                        principal=SERVICE,
                        model=name,
                        version=v,
                        to_stage=Stage.shadow,
                        reason="bench: new version registered",
                        now=utcnow(),
                        idempotency_key=f"intake:{name}:{v}",
                    )
                    ids.append(t.id)
        with transaction(engine) as session:
            viewer = tokens.create_token(session, name="vic", role=Role.viewer)
            approvers = [
                tokens.create_token(session, name=f"approver-{i}", role=Role.approver)
                for i in range(APPROVERS)
            ]
    finally:
        engine.dispose()
    rng.shuffle(ids)
    return Seeded(viewer, approvers, names, versions, ids)


# --- the N+1 check ------------------------------------------------------------------------------


def models_queries(models: int, tmp: Path) -> int:
    """SQL statements one GET /api/v1/models (limit 50) runs with `models` models of 3 versions."""
    from fastapi.testclient import TestClient
    from sqlalchemy import event

    from stagegate.api.app import create_app
    from stagegate.db import make_engine, transaction
    from stagegate.events.sink import MemorySink
    from stagegate.governance import tokens
    from stagegate.lifecycle.stages import Role
    from stagegate.migrate import upgrade
    from stagegate.settings import Settings

    url = f"sqlite:///{tmp / f'n1-{models}.db'}"
    upgrade(url)
    engine = make_engine(url)
    with transaction(engine) as session:
        for i in range(models):
            for v in (1, 2, 3):
                _record(session, f"m{i:03d}", v)
        viewer = tokens.create_token(session, name="vic", role=Role.viewer)
    statements: list[str] = []
    counting = False

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if counting:
            statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    app = create_app(Settings(home=tmp / "n1-home"), engine=engine, sink=MemorySink())
    headers = {"Authorization": f"Bearer {viewer}"}
    with TestClient(app) as client:
        client.get("/api/v1/models", headers=headers)  # warm: first-use queries aside
        counting = True
        r = client.get("/api/v1/models?limit=50", headers=headers)
        counting = False
    engine.dispose()
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == models
    return len(statements)


# --- the load ---------------------------------------------------------------------------------


@dataclass
class Result:
    kind: str  # "read" or "decide"
    path: str
    status: int  # 0: no answer (connection error or timeout)
    latency_ms: float


@dataclass
class Plan:
    seeded: Seeded
    rng: random.Random
    pending: list[str] = field(default_factory=list)

    def next_request(self) -> tuple[str, str, str, dict[str, Any] | None, str]:
        """(kind, method, path, json body, token)."""
        rng, s = self.rng, self.seeded
        if rng.random() >= READ_SHARE and self.pending:
            tid = self.pending.pop()
            decision = "approve" if rng.random() < APPROVE_SHARE else "reject"
            body = {"decision": decision, "comment": "bench"}
            return (
                "decide",
                "POST",
                f"/api/v1/transitions/{tid}/approvals",
                body,
                rng.choice(s.approvers),
            )
        which = rng.randrange(4)
        if which == 0:
            offset = rng.randrange(0, max(1, len(s.models) - 10))
            path = f"/api/v1/models?limit=10&offset={offset}"
        elif which == 1:
            model, version = rng.choice(s.versions)
            path = f"/api/v1/models/{model}/versions/{version}"
        elif which == 2:
            path = f"/api/v1/transitions?model={rng.choice(s.models)}&status=pending&limit=20"
        else:
            path = "/api/v1/audit?limit=20"
        return "read", "GET", path, None, s.viewer


async def drive(
    base_url: str, plan: Plan, rate: float, duration_s: float
) -> tuple[list[Result], float]:
    """Open loop: request i starts at t0 + i/rate. Returns the results and the wall time."""
    import aiohttp

    results: list[Result] = []
    total = int(rate * duration_s)
    connector = aiohttp.TCPConnector(limit=256)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(base_url, connector=connector, timeout=timeout) as session:

        async def one(at: float) -> None:
            kind, method, path, body, token = plan.next_request()
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            headers = {"Authorization": f"Bearer {token}"}
            status = 0
            try:
                async with session.request(method, path, json=body, headers=headers) as resp:
                    await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError):
                pass
            latency = (time.perf_counter() - at) * 1000  # from the schedule, not the send
            results.append(Result(kind, path.split("?")[0], status, latency))

        # Warm the connection pool and the server's first-use paths; not measured.
        warm = Plan(plan.seeded, random.Random(1))
        for _ in range(20):
            _k, _m, path, _b, token = warm.next_request()
            if _m == "GET":
                async with session.get(path, headers={"Authorization": f"Bearer {token}"}) as r:
                    await r.read()
        t0 = time.perf_counter() + 0.1
        tasks = []
        for i in range(total):
            at = t0 + i / rate
            # Create tasks shortly before they are due, so the scheduler's list stays short.
            while at - time.perf_counter() > 0.05:
                await asyncio.sleep(0.01)
            tasks.append(asyncio.create_task(one(at)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    return results, wall


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def summarize(results: list[Result], wall_s: float, rate: float) -> dict[str, Any]:
    ok = [r for r in results if 200 <= r.status < 300]
    errors = [r for r in results if not 200 <= r.status < 300]
    reads = [r.latency_ms for r in results if r.kind == "read"]
    decides = [r.latency_ms for r in results if r.kind == "decide"]
    every = [r.latency_ms for r in results]
    p99 = percentile(every, 0.99)
    return {
        "target_rps": rate,
        "requests": len(results),
        "rps": round(len(ok) / wall_s, 1),
        "p50_ms": round(percentile(every, 0.50), 1),
        "p99_ms": round(p99, 1),
        "max_ms": round(max(every), 1) if every else None,
        "reads_p99_ms": round(percentile(reads, 0.99), 1),
        "decisions": len(decides),
        "decisions_p99_ms": round(percentile(decides, 0.99), 1),
        "errors": len(errors),
        "statuses": dict(sorted(Counter(str(r.status) for r in results).items())),
        "p99_under_target": p99 < P99_TARGET_MS,
    }


@contextlib.contextmanager
def api_server(
    url: str, home: Path, events_url: str, extra_args: list[str], workers: int
) -> Iterator[tuple[str, int]]:
    port = free_port()
    env = {
        **os.environ,
        "STAGEGATE_HOME": str(home),
        "STAGEGATE_DB__URL": url,
        "STAGEGATE_PREFECT__API_URL": events_url,
        "NO_PROXY": "127.0.0.1",
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT / "platform"), os.environ.get("PYTHONPATH")) if p
        ),
    }
    argv = [sys.executable, "-m", "uvicorn", "stagegate.api.app:create_app", "--factory"]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
    argv += ["--log-level", "warning", "--workers", str(workers), *extra_args]
    log = (home / "api.log").open("wb")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/api/health", proc)
        yield base, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def measure(
    name: str, base: str, pid: int, plan: Plan, rate: float, duration_s: float
) -> dict[str, Any]:
    """One open-loop run at `rate` against the running API, summarized."""
    load_before, cpu_before = load_average(), cpu_seconds(pid)
    results, wall = asyncio.run(drive(base, plan, rate, duration_s))
    cpu = cpu_seconds(pid) - cpu_before
    summary = summarize(results, wall, rate)
    summary["api_cpu_ms_per_request"] = round(cpu * 1000 / max(1, len(results)), 2)
    summary["api_cpu_share"] = round(cpu / wall, 2)  # of one core
    summary["load_average"] = {"before": load_before, "after": load_average()}
    print(
        f"{name} @ {rate:g} rps: {summary['rps']} rps ({summary['requests']} requests, "
        f"{wall:.1f} s), p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms "
        f"(reads {summary['reads_p99_ms']}, decisions {summary['decisions_p99_ms']}), "
        f"errors {summary['errors']} {summary['statuses']}; API CPU "
        f"{summary['api_cpu_ms_per_request']} ms/request ({summary['api_cpu_share']} cores); "
        f"load average {load_before} -> {summary['load_average']['after']}",
        flush=True,
    )
    return summary


def holds(summary: dict[str, Any]) -> bool:
    return bool(summary["p99_under_target"]) and summary["errors"] == 0


def run_backend(
    name: str,
    url: str,
    home: Path,
    events_url: str,
    rate: float,
    duration_s: float,
    extra_args: list[str],
    *,
    workers: int,
    find_limit: int = 0,
) -> dict[str, Any]:
    """The run at `rate`; with `find_limit` steps, then a bisection for the highest rate that
    holds (`limit_rps`), each step `duration_s` long against the same server."""
    rng = random.Random(7)
    runs = 1 + find_limit
    decisions = math.ceil(rate * duration_s * (1 - READ_SHARE) * 1.3 * runs) + 20 * runs
    started = time.perf_counter()
    seeded = seed(url, models=MODELS, pending=decisions, rng=rng)
    print(
        f"{name}: seeded {len(seeded.models)} models, {len(seeded.versions)} versions, "
        f"{len(seeded.pending)} pending transitions in {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    home.mkdir(parents=True, exist_ok=True)
    plan = Plan(seeded, random.Random(11), list(seeded.pending))
    with api_server(url, home, events_url, extra_args, workers) as (base, pid):
        summary = measure(name, base, pid, plan, rate, duration_s)
        summary["workers"] = workers
        if find_limit:
            # Bisection between 0 and `rate` (or from `rate` up, should it hold).
            low, high = (rate, 2 * rate) if holds(summary) else (0.0, rate)
            steps = []
            for _ in range(find_limit):
                mid = round((low + high) / 2, 1)
                step = measure(name, base, pid, plan, mid, duration_s)
                steps.append({k: step[k] for k in ("target_rps", "rps", "p99_ms", "errors")})
                low, high = (mid, high) if holds(step) else (low, mid)
            summary["limit_rps"] = low
            summary["limit_steps"] = steps
            print(f"{name}: highest rate that held p99 < {P99_TARGET_MS:g} ms: {low} rps")
        # Every decision appended to the audit chain, from however many workers: still one chain.
        verify = urllib.request.Request(  # noqa: S310 - loopback only
            f"{base}/api/v1/audit/verify", headers={"Authorization": f"Bearer {seeded.viewer}"}
        )
        with urllib.request.urlopen(verify, timeout=120) as resp:  # noqa: S310 - loopback only
            chain = json.loads(resp.read())
        summary["audit_chain_ok"] = chain["ok"]
        summary["audit_rows"] = chain["rows"]
        verdict = "verifies" if chain["ok"] else "is BROKEN"
        print(f"{name}: the audit chain {verdict}, {chain['rows']} rows", flush=True)
    if summary["statuses"].keys() - {"200", "201"}:  # say why, from the API's own log
        errors = [
            line
            for line in (home / "api.log").read_text(errors="replace").splitlines()
            if "Error" in line or "error" in line
        ]
        if errors:
            print(f"{name}: API log errors (last 5 of {len(errors)}):", *errors[-5:], sep="\n  ")
    return summary


@contextlib.contextmanager
def postgres(tmp: Path) -> Iterator[str | None]:
    """A throwaway PostgreSQL URL, or None (with the reason printed) when none can start."""
    if not shutil.which("bash") or not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        print("postgres: skipped, no server binaries (apt-get install postgresql)", flush=True)
        yield None
        return
    data = tmp / "pg"
    port = str(free_port())
    started = subprocess.run(
        ["bash", str(PG_SCRIPT), "start", str(data), port],
        capture_output=True,
        text=True,
        check=False,
    )
    if started.returncode != 0:
        print(f"postgres: skipped, could not start: {started.stderr.strip()}", flush=True)
        yield None
        return
    try:
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(PG_SCRIPT), "stop", str(data)], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 s per database")
    parser.add_argument("--rate", type=float, default=200.0, help="fixed rate, requests/s")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per database")
    parser.add_argument(
        "--databases", default="sqlite,postgres", help="which of sqlite,postgres to load"
    )
    parser.add_argument(
        "--uvicorn-args", default="", help="extra uvicorn flags, e.g. '--limit-concurrency 32'"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="API processes; default: the stack's own (STAGEGATE_API__WORKERS, else 1)",
    )
    parser.add_argument(
        "--find-limit",
        nargs="?",
        type=int,
        const=5,
        default=0,
        metavar="STEPS",
        help="after the run, bisect for the highest rate that holds (default 5 steps)",
    )
    parser.add_argument("--serve-events", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_events:
        serve_events_main(args.serve_events)
        return
    duration = 10.0 if args.quick else args.duration
    sys.path.insert(0, str(ROOT / "platform"))
    from stagegate.settings import get_settings

    workers = args.workers or get_settings().api.workers

    out: dict[str, Any] = {
        "rate": args.rate,
        "duration_s": duration,
        "p99_target_ms": P99_TARGET_MS,
        "workers": workers,
    }
    with tempfile.TemporaryDirectory(prefix="api-load-") as raw_tmp:
        tmp = Path(raw_tmp)
        tmp.chmod(0o755)  # as root, PostgreSQL runs as `postgres` and must reach its folder
        out["models_queries_1"] = models_queries(1, tmp)
        out["models_queries_50"] = models_queries(50, tmp)
        print(
            f"GET /api/v1/models: {out['models_queries_1']} SQL statements with 1 model, "
            f"{out['models_queries_50']} with 50",
            flush=True,
        )
        events_port = free_port()
        stub = subprocess.Popen(
            [sys.executable, __file__, "--serve-events", str(events_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        events_url = f"http://127.0.0.1:{events_port}/api"
        try:
            wait_http(f"{events_url}/health", stub)
            databases = set(args.databases.split(","))
            extra = args.uvicorn_args.split()
            out["sqlite"] = out["postgres"] = None
            if "sqlite" in databases:
                sqlite_url = f"sqlite:///{tmp / 'governance.db'}"
                out["sqlite"] = run_backend(
                    "sqlite",
                    sqlite_url,
                    tmp / "home-sqlite",
                    events_url,
                    args.rate,
                    duration,
                    extra,
                    workers=workers,
                    find_limit=args.find_limit,
                )
            if "postgres" not in databases:
                out["postgres_skipped"] = "--databases"
            else:
                with postgres(tmp) as pg_url:
                    if pg_url is None:
                        out["postgres_skipped"] = "PostgreSQL could not start (see above)"
                    else:
                        out["postgres"] = run_backend(
                            "postgres",
                            pg_url,
                            tmp / "home-pg",
                            events_url,
                            args.rate,
                            duration,
                            extra,
                            workers=workers,
                            find_limit=args.find_limit,
                        )
        finally:
            stub.terminate()
            stub.wait(10)
    out["cpus"] = os.cpu_count()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
