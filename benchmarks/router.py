"""What the router adds: direct vs through `stagegate router` vs through nginx, same upstreams.

Usage: .venv/bin/python benchmarks/router.py [--quick]

Upstream: `stagegate serve-model` on a saved 20-feature sklearn model when the model server is
installed, else a minimal Starlette app scoring a 20-feature logistic model in Python.
Paths measured (each upstream twice, champion and challenger, 90/10 by a random key):
  direct        client -> champion upstream
  router        client -> stagegate router (90/10) -> upstreams
  router_shadow the same, plus a 10% shadow mirror to the challenger
  nginx         client -> nginx (split_clients 90/10, `mirror` of 10% to the challenger)
For each: p50/p99 at a fixed rate (open loop: requests start on a fixed schedule whatever the
answers do; the paths take turns in 1 s windows) and the max rate (wrk, 16 connections; a
closed-loop Python client without wrk).
Prints readable lines, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
N_FEATURES = 20
ROW = [round(0.05 * i, 2) for i in range(N_FEATURES)]
BODY = json.dumps({"inputs": [ROW]}).encode()
MODEL = "bench"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes] | None = None, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{proc.args!r} exited with {proc.returncode}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(url, timeout=2) as resp,  # noqa: S310 - loopback only
        ):
            if resp.status == 200:
                return
        time.sleep(0.1)
    raise SystemExit(f"{url} did not answer in {timeout_s:.0f} s")


# --- upstreams ----------------------------------------------------------------------------------


def starlette_upstream_main(port: int, version: int, mode: str) -> None:
    """A minimal model server: mode ok, slow (sleeps 2 s) or error (500)."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    weights = [((i * 37) % 11 - 5) / 10 for i in range(N_FEATURES)]

    async def invocations(request: Request) -> Response:
        payload = await request.json()
        if mode == "slow":
            await asyncio.sleep(2.0)
        if mode == "error":
            return JSONResponse({"error_code": "INTERNAL_ERROR"}, status_code=500)
        preds = [
            1 / (1 + math.exp(-sum(w * x for w, x in zip(weights, row, strict=True))))
            for row in payload["inputs"]
        ]
        return JSONResponse({"predictions": preds, "version": version})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    app = Starlette(
        routes=[
            Route("/invocations", invocations, methods=["POST"]),
            Route("/health", health),
        ]
    )
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


def serve_model_available() -> bool:
    """The model server is installed and its CLI command is registered."""
    if importlib.util.find_spec("stagegate.serving.model_server.server") is None:
        return False
    out = subprocess.run(
        [str(BIN / "stagegate"), "serve-model", "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return out.returncode == 0


def save_sklearn_model(root: Path) -> Path:
    """A 20-feature logistic regression, saved with mlflow.sklearn (no MLflow server)."""
    import mlflow.sklearn
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, N_FEATURES))
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    path = root / "model"
    mlflow.sklearn.save_model(LogisticRegression().fit(x, y), str(path))
    return path


class Procs:
    """Child processes, started without waiting (so they boot in parallel), stopped on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self._pending: list[tuple[subprocess.Popen[bytes], str]] = []

    def start(self, argv: list[str], log: Path, health_url: str) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        self.procs.append(proc)
        self._pending.append((proc, health_url))
        return proc

    def wait_ready(self, timeout_s: float = 120) -> None:
        """Every process started since the last call answers its health URL with 200."""
        for proc, url in self._pending:
            wait_http(url, proc, timeout_s)  # a model server loads its model first
        self._pending.clear()

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start_upstream(
    procs: Procs, tmp: Path, version: int, *, mode: str = "ok", model_dir: Path | None = None
) -> str:
    """A model server (not waited for: see `Procs.wait_ready`)."""
    port = free_port()
    log = tmp / f"upstream-{version}-{mode}-{port}.log"
    if model_dir is not None:
        argv = [str(BIN / "stagegate"), "serve-model", str(model_dir), "--port", str(port)]
        argv += ["--device", "cpu"]
    else:
        argv = [sys.executable, __file__, "--serve-upstream", str(port), str(version), mode]
    url = f"http://127.0.0.1:{port}"
    procs.start(argv, log, f"{url}/health")
    return url


def start_router(procs: Procs, tmp: Path, policy: dict[str, Any], *extra: str) -> str:
    port = free_port()
    path = tmp / f"policy-{port}.json"
    path.write_text(json.dumps({"policies": [policy]}))
    argv = [str(BIN / "stagegate"), "router", "--policy", str(path), "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    procs.start(
        [*argv, "--log-level", "warning", *extra], tmp / f"router-{port}.log", f"{url}/health"
    )
    return url


NGINX_CONF = """
worker_processes 1;
daemon off;
{user}
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    upstream champion {{ server {champion}; keepalive 64; }}
    upstream challenger {{ server {challenger}; keepalive 64; }}
    split_clients "$http_x_stagegate_key" $arm {{ 90% champion; * challenger; }}
    split_clients "$request_id" $mirrored {{ 10% 1; * 0; }}
    server {{
        listen 127.0.0.1:{port};
        location ~ ^/models/[^/]+/invocations$ {{
            mirror /mirror;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://$arm/invocations;
        }}
        location = /mirror {{
            internal;
            if ($mirrored = 0) {{ return 204; }}
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://challenger/invocations;
        }}
        location = /health {{ return 200 "ok"; }}
    }}
}}
"""


def start_nginx(procs: Procs, tmp: Path, champion: str, challenger: str) -> str:
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if nginx is None:
        raise SystemExit(
            "nginx is missing: install Debian's nginx-light (apt-get install -y nginx-light wrk)"
        )
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            user="user root;" if os.geteuid() == 0 else "",
            tmp=tmp,
            port=port,
            champion=champion.removeprefix("http://"),
            challenger=challenger.removeprefix("http://"),
        )
    )
    url = f"http://127.0.0.1:{port}"
    procs.start([nginx, "-c", str(conf), "-p", str(tmp)], tmp / "nginx.log", f"{url}/health")
    return url


# --- load -------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def fixed_rate(
    targets: dict[str, str], rate: float, rounds: int, window_s: float = 1.0
) -> dict[str, dict[str, Any]]:
    """Open loop at `rate`: request i of a window starts at i/rate whatever the others do.

    The targets take turns in windows of `window_s`, `rounds` times, so that a stall of the
    machine (2 shared cores) or of an upstream lands on all of them alike, not on one.
    """
    import aiohttp

    latencies: dict[str, list[float]] = {name: [] for name in targets}
    errors: dict[str, list[str]] = {name: [] for name in targets}
    sessions = {
        name: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) for name in targets
    }

    async def one(name: str, record: bool = True) -> None:
        headers = {
            "content-type": "application/json",
            "x-stagegate-key": str(random.getrandbits(48)),
        }
        started = time.perf_counter()
        try:
            async with sessions[name].post(targets[name], data=BODY, headers=headers) as resp:
                await resp.read()
                status = resp.status
        except aiohttp.ClientError as exc:
            errors[name].append(type(exc).__name__)
            return
        if status != 200:
            errors[name].append(str(status))
        elif record:
            latencies[name].append((time.perf_counter() - started) * 1000)

    try:
        for name in targets:  # open the connections first
            await asyncio.gather(*(one(name, record=False) for _ in range(20)))
        loop = asyncio.get_running_loop()
        n = int(rate * window_s)
        for _ in range(rounds):
            for name in targets:
                start = loop.time() + 0.05
                tasks = []
                for i in range(n):
                    delay = start + i / rate - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.create_task(one(name)))
                await asyncio.gather(*tasks)
    finally:
        for session in sessions.values():
            await session.close()
    return {
        name: {
            "requests": n * rounds,
            "errors": len(errors[name]),
            "p50_ms": round(percentile(lat, 50), 3) if lat else None,
            "p99_ms": round(percentile(lat, 99), 3) if lat else None,
            "max_ms": round(max(lat), 3) if lat else None,
        }
        for name, lat in latencies.items()
    }


WRK_LUA = """
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
request = function()
  wrk.headers["x-stagegate-key"] = tostring(math.random(1, 1000000000))
  return wrk.format()
end
"""


def max_rate(target: str, duration_s: float, tmp: Path) -> dict[str, Any]:
    """wrk with 16 connections, or a closed-loop Python client with 16 when wrk is missing."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return asyncio.run(closed_loop(target, duration_s))
    script = tmp / "post.lua"
    script.write_text(WRK_LUA.format(body=BODY.decode()))
    out = subprocess.run(
        [wrk, "-t1", "-c16", f"-d{duration_s:g}s", "-s", str(script), target],
        capture_output=True,
        text=True,
        check=True,
        timeout=duration_s + 30,
    ).stdout
    rps = next(float(line.split()[1]) for line in out.splitlines() if "Requests/sec" in line)
    bad = next((int(line.split()[-1]) for line in out.splitlines() if "Non-2xx" in line), 0)
    errors = sum(
        int(part.split()[-1])
        for line in out.splitlines()
        if "Socket errors" in line
        for part in line.split(":", 1)[1].split(",")
    )
    return {"tool": "wrk", "rps": round(rps), "non_2xx": bad, "socket_errors": errors}


async def closed_loop(target: str, duration_s: float) -> dict[str, Any]:
    import aiohttp

    done = errors = 0
    deadline = time.monotonic() + duration_s
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            nonlocal done, errors
            while time.monotonic() < deadline:
                headers = {"content-type": "application/json", "x-stagegate-key": "k"}
                async with session.post(target, data=BODY, headers=headers) as resp:
                    await resp.read()
                    done += 1
                    errors += resp.status != 200

        await asyncio.gather(*(worker() for _ in range(16)))
    return {"tool": "python", "rps": round(done / duration_s), "non_2xx": errors}


# --- main -------------------------------------------------------------------------------------


def policy(champion: str, challenger: str, shadow_fraction: float = 0.0) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": MODEL,
        "champion": {"version": 1, "url": champion},
        "challenger": {"version": 2, "url": challenger},
        "challenger_weight": 0.1,
    }
    if shadow_fraction:
        out["shadow"] = {"version": 2, "url": challenger}
        out["shadow_fraction"] = shadow_fraction
    return out


@contextlib.contextmanager
def processes() -> Iterator[tuple[Procs, Path]]:
    procs = Procs()
    with tempfile.TemporaryDirectory(prefix="stagegate-bench-") as tmp:
        os.chmod(tmp, 0o755)  # noqa: S103 - nginx workers read their config here
        try:
            yield procs, Path(tmp)
        finally:
            procs.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (under a minute)")
    parser.add_argument("--rate", type=float, default=500.0, help="fixed rate, requests/s")
    parser.add_argument(
        "--upstream",
        choices=["auto", "starlette"],
        default="auto",
        help="auto: `stagegate serve-model` when installed; starlette: the minimal app",
    )
    parser.add_argument("--serve-upstream", nargs=3, metavar=("PORT", "VERSION", "MODE"))
    args = parser.parse_args()
    if args.serve_upstream:
        port, version, mode = args.serve_upstream
        starlette_upstream_main(int(port), int(version), mode)
        return
    import uvloop

    rounds, max_s = (4, 2.0) if args.quick else (20, 10.0)
    with processes() as (procs, tmp):
        model_dir = None
        upstream_kind = "starlette"
        if args.upstream == "auto" and serve_model_available():
            model_dir = save_sklearn_model(tmp)
            upstream_kind = "stagegate serve-model (sklearn, 20 features)"
        print(f"upstream: {upstream_kind}")
        champion = start_upstream(procs, tmp, 1, model_dir=model_dir)
        challenger = start_upstream(procs, tmp, 2, model_dir=model_dir)
        route = f"/models/{MODEL}/invocations"
        targets = {
            "direct": f"{champion}/invocations",
            "router": start_router(procs, tmp, policy(champion, challenger)) + route,
            "router_shadow": start_router(procs, tmp, policy(champion, challenger, 0.1)) + route,
            "nginx": start_nginx(procs, tmp, champion, challenger) + route,
        }
        procs.wait_ready()
        fixed = uvloop.run(fixed_rate(targets, args.rate, rounds))
        results: dict[str, Any] = {}
        for name, target in targets.items():
            peak = max_rate(target, max_s, tmp)
            f = results.setdefault(name, {"fixed_rate": fixed[name]})["fixed_rate"]
            results[name]["max"] = peak
            print(
                f"{name:14s} at {args.rate:.0f} rps: p50 {f['p50_ms']} ms, p99 {f['p99_ms']} ms, "
                f"max {f['max_ms']} ms, errors {f['errors']}/{f['requests']}; "
                f"max {peak['rps']} rps ({peak['tool']}, 16 connections)"
            )
    base = results["direct"]["fixed_rate"]
    added = {
        name: {
            "p50_ms": round(results[name]["fixed_rate"]["p50_ms"] - base["p50_ms"], 3),
            "p99_ms": round(results[name]["fixed_rate"]["p99_ms"] - base["p99_ms"], 3),
        }
        for name in list(targets)[1:]
    }
    for name, a in added.items():
        print(f"{name:14s} adds p50 {a['p50_ms']:+.3f} ms, p99 {a['p99_ms']:+.3f} ms over direct")
    print(
        json.dumps(
            {
                "benchmark": "router",
                "quick": args.quick,
                "upstream": upstream_kind,
                "rate_rps": args.rate,
                "fixed_rate_s_each": rounds,
                "max_rate_s": max_s,
                "cpus": os.cpu_count(),
                "results": results,
                "added_over_direct": added,
                "goal": {"p50_ms": 0.3, "p99_ms": 1.0},
            }
        )
    )


if __name__ == "__main__":
    main()
