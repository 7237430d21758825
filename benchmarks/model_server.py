"""Benchmark: `stagegate serve-model` against `mlflow models serve` on the same sklearn model.

    .venv/bin/python benchmarks/model_server.py [--quick]

Trains a 20-feature logistic regression, saves it with `mlflow.sklearn.save_model`, starts both
servers on free ports (one at a time is measured, so they do not compete for the CPUs), checks
they give the same answers, then measures rps, p50 and p99 for: one JSON row at 1 and at 16
connections, and a 100-row batch at 1 connection. Uses `wrk` when installed, else a closed-loop
aiohttp client. Prints readable lines, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _process import running as serve

FEATURES = 20
BIN = Path(sys.executable).parent
SCENARIOS = [  # (name, connections, rows per request)
    ("c1_row1", 1, 1),
    ("c16_row1", 16, 1),
    ("c1_rows100", 1, 100),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def save_model(path: Path) -> list[list[float]]:
    """Train and save the model; return 100 rows of inputs to score."""
    import warnings

    import mlflow.sklearn
    import numpy as np
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    columns = [f"f{i}" for i in range(FEATURES)]
    frame = pd.DataFrame(rng.normal(size=(2000, FEATURES)), columns=columns)
    target = (frame["f0"] + 0.5 * frame["f3"] - frame["f7"] > 0).astype(int)
    model = LogisticRegression().fit(frame, target)
    warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
    mlflow.sklearn.save_model(
        model, str(path), input_example=frame.head(3), pip_requirements=["scikit-learn"]
    )
    rows: list[list[float]] = frame.head(100).to_numpy().tolist()
    return rows


def body(rows: list[list[float]]) -> bytes:
    columns = [f"f{i}" for i in range(FEATURES)]
    return json.dumps({"dataframe_split": {"columns": columns, "data": rows}}).encode()


@contextlib.contextmanager
def running(argv: list[str], url: str, log: Path) -> Iterator[float]:
    """A server with our venv first on PATH and no tracking URI from the caller's shell."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with serve(argv, url, log, env=env) as ready_s:
        yield ready_s


def post(url: str, payload: bytes) -> Any:
    request = urllib.request.Request(  # noqa: S310 - our own http://127.0.0.1 URL
        url + "/invocations",
        data=payload,
        headers={"content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310
        return json.loads(resp.read())


# -- load generators ---------------------------------------------------------------------


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * _UNITS[unit]


def run_wrk(
    url: str, payload: bytes, connections: int, seconds: float, work: Path
) -> dict[str, Any]:
    script = work / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = [==[{payload.decode()}]==]\n"
    )
    threads = min(connections, 2)
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency"]
    argv += ["-s", str(script), url + "/invocations"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    n_errors = (int(bad.group(1)) if bad else 0) + (sum(map(int, errors.groups())) if errors else 0)
    return {"rps": rps, "p50_ms": round(p50, 3), "p99_ms": round(p99, 3), "errors": n_errors}


def run_aiohttp(url: str, payload: bytes, connections: int, seconds: float) -> dict[str, Any]:
    import aiohttp

    async def main() -> tuple[list[float], int]:
        latencies: list[float] = []
        errors = 0
        deadline = time.perf_counter() + seconds
        connector = aiohttp.TCPConnector(limit=connections)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def worker() -> None:
                nonlocal errors
                headers = {"content-type": "application/json"}
                while (start := time.perf_counter()) < deadline:
                    async with session.post(
                        url + "/invocations", data=payload, headers=headers
                    ) as r:
                        await r.read()
                        if r.status != 200:
                            errors += 1
                    latencies.append(time.perf_counter() - start)

            await asyncio.gather(*(worker() for _ in range(connections)))
        return latencies, errors

    latencies, errors = asyncio.run(main())
    cuts = statistics.quantiles(latencies, n=100)
    return {
        "rps": round(len(latencies) / seconds, 1),
        "p50_ms": round(cuts[49] * 1e3, 3),
        "p99_ms": round(cuts[98] * 1e3, 3),
        "errors": errors,
    }


def measure(url: str, rows: list[list[float]], seconds: float, work: Path) -> dict[str, Any]:
    use_wrk = shutil.which("wrk") is not None
    results: dict[str, Any] = {}
    warm = body(rows[:1])
    if use_wrk:
        run_wrk(url, warm, 16, 1, work)
    else:
        run_aiohttp(url, warm, 16, 1)
    for name, connections, n_rows in SCENARIOS:
        payload = body(rows[:n_rows])
        if use_wrk:
            results[name] = run_wrk(url, payload, connections, seconds, work)
        else:
            results[name] = run_aiohttp(url, payload, connections, seconds)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 s per scenario (< 60 s in all)")
    args = parser.parse_args()
    seconds = 3.0 if args.quick else 10.0
    tool = "wrk" if shutil.which("wrk") else "aiohttp closed loop (wrk not installed)"

    with tempfile.TemporaryDirectory(prefix="sg-bench-") as tmp:
        work = Path(tmp)
        rows = save_model(work / "model")
        ours_port, theirs_port = free_port(), free_port()
        servers = {
            "stagegate": (
                [sys.executable, "-m", "stagegate.cli", "serve-model", str(work / "model"),
                 "--port", str(ours_port)],
                f"http://127.0.0.1:{ours_port}",
            ),
            "mlflow": (
                [str(BIN / "mlflow"), "models", "serve", "-m", str(work / "model"),
                 "--env-manager", "local", "-h", "127.0.0.1", "-p", str(theirs_port)],
                f"http://127.0.0.1:{theirs_port}",
            ),
        }  # fmt: skip
        results: dict[str, Any] = {}
        answers: dict[str, Any] = {}
        print(f"load generator: {tool}; {seconds:g} s per scenario; {os.cpu_count()} CPUs")
        for name, (argv, url) in servers.items():
            with running(argv, url, work / f"{name}.log") as ready_s:
                answers[name] = post(url, body(rows))
                results[name] = measure(url, rows, seconds, work)
            results[name]["ready_s"] = round(ready_s, 2)
            print(f"{name}: healthy after {ready_s:.1f} s")
            for scenario, r in results[name].items():
                if isinstance(r, dict):
                    print(
                        f"  {scenario:<11} {r['rps']:>9.0f} rps  p50 {r['p50_ms']:7.3f} ms  "
                        f"p99 {r['p99_ms']:7.3f} ms  errors {r['errors']}"
                    )

    same = answers["stagegate"] == answers["mlflow"]
    ours, theirs = results["stagegate"], results["mlflow"]
    ratios = {
        "rps_c16_row1": ours["c16_row1"]["rps"] / theirs["c16_row1"]["rps"],
        "rps_c1_row1": ours["c1_row1"]["rps"] / theirs["c1_row1"]["rps"],
        "rps_c1_rows100": ours["c1_rows100"]["rps"] / theirs["c1_rows100"]["rps"],
        "p50_c1_row1": ours["c1_row1"]["p50_ms"] / theirs["c1_row1"]["p50_ms"],
        "p99_c16_row1": ours["c16_row1"]["p99_ms"] / theirs["c16_row1"]["p99_ms"],
    }
    ratios = {k: round(v, 3) for k, v in ratios.items()}
    print(f"same answers on 100 rows: {same}")
    print(
        f"stagegate/mlflow: {ratios['rps_c16_row1']:.1f}x rps at 16 connections, "
        f"p50 at 1 connection {ratios['p50_c1_row1']:.2f}x"
    )
    print(
        json.dumps(
            {
                "tool": tool,
                "quick": args.quick,
                "seconds_per_scenario": seconds,
                "same_answers": same,
                "stagegate": ours,
                "mlflow": theirs,
                "ratios": ratios,
            }
        )
    )


if __name__ == "__main__":
    main()
