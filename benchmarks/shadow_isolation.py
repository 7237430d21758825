"""A bad shadow must not hurt clients: client p99 and errors with a slow, failing or dead shadow.

Usage: .venv/bin/python benchmarks/shadow_isolation.py [--quick]

Each scenario runs its own `stagegate router` in front of the same champion (a minimal Starlette
model server), mirroring every request (shadow_fraction 1.0) to a shadow that is:
  none   no shadow (the baseline)
  slow   sleeps 2 s before answering
  error  answers 500
  down   nothing listens (connection refused)
Load: a fixed rate, open loop, the scenarios taking turns in 1 s windows.
Prints readable lines, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.request
from typing import Any

# benchmarks/ is this script's folder, so its sibling imports as a top-level module.
import router as bench
from prometheus_client.parser import text_string_to_metric_families


def shadow_counts(router_url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{router_url}/metrics", timeout=5) as resp:  # noqa: S310
        text = resp.read().decode()
    counts: dict[str, float] = {"mirrored": 0, "failed": 0, "dropped": 0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "stagegate_router_shadow_total":
                counts[sample.labels["outcome"]] += sample.value
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (under a minute)")
    parser.add_argument("--rate", type=float, default=500.0, help="fixed rate, requests/s")
    args = parser.parse_args()
    import uvloop

    rounds = 4 if args.quick else 20  # 1 s windows per scenario, taking turns
    results: dict[str, Any] = {}
    with bench.processes() as (procs, tmp):
        champion = bench.start_upstream(procs, tmp, 1)
        shadows: dict[str, str | None] = {
            "none": None,
            "slow": bench.start_upstream(procs, tmp, 3, mode="slow"),
            "error": bench.start_upstream(procs, tmp, 3, mode="error"),
            "down": f"http://127.0.0.1:{bench.free_port()}",
        }
        routers: dict[str, str] = {}
        for name, shadow in shadows.items():
            policy: dict[str, Any] = {
                "model": bench.MODEL,
                "champion": {"version": 1, "url": champion},
            }
            if shadow is not None:
                policy |= {"shadow": {"version": 3, "url": shadow}, "shadow_fraction": 1.0}
            routers[name] = bench.start_router(procs, tmp, policy)
        procs.wait_ready()
        targets = {name: f"{url}/models/{bench.MODEL}/invocations" for name, url in routers.items()}
        fixed = uvloop.run(bench.fixed_rate(targets, args.rate, rounds))
        for name, f in fixed.items():
            counts = shadow_counts(routers[name])
            results[name] = {**f, "shadow": counts}
            print(
                f"shadow {name:5s}: p50 {f['p50_ms']} ms, p99 {f['p99_ms']} ms, max {f['max_ms']} "
                f"ms, client errors {f['errors']}/{f['requests']}; mirrors: "
                + ", ".join(f"{k} {v:.0f}" for k, v in counts.items())
            )
    base = results["none"]
    added = {
        name: {
            "p50_ms": round(r["p50_ms"] - base["p50_ms"], 3),
            "p99_ms": round(r["p99_ms"] - base["p99_ms"], 3),
        }
        for name, r in results.items()
        if name != "none"
    }
    for name, a in added.items():
        print(f"shadow {name:5s} adds p50 {a['p50_ms']:+.3f} ms, p99 {a['p99_ms']:+.3f} ms")
    print(
        json.dumps(
            {
                "benchmark": "shadow_isolation",
                "quick": args.quick,
                "upstream": "starlette",
                "rate_rps": args.rate,
                "seconds_each": rounds,
                "cpus": os.cpu_count(),
                "results": results,
                "added_over_no_shadow": added,
                "client_errors": sum(r["errors"] for r in results.values()),
            }
        )
    )


if __name__ == "__main__":
    main()
