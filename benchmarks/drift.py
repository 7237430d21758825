"""Benchmark: Stagegate's drift check against plain Evidently on the same generated data.

    .venv/bin/python benchmarks/drift.py [--quick]

Cases (rows x columns, four numerical columns to one categorical): 100k x 20, 100k x 100 and
1M x 25 (20 numerical, 5 categorical). `--quick` runs only 100k x 20. The current window has
the case's rows; the reference has 10% more (a training set rarely has the window's size, and
unequal sizes take the general, slower Wasserstein path). Drift is injected into a known
subset of columns: mean shifts of 0.05, 0.15 and 0.5 standard deviations and scale changes on
numerical columns, and moved category shares on categorical ones.

Each engine runs each case in its own subprocess, so its peak memory (ru_maxrss) is its own:
  - ours: `stagegate.monitoring.check.check` on Arrow tables;
  - evidently: `Report([DataDriftPreset()], include_tests=True)` with an explicit
    DataDefinition, on pandas frames, then `.dict()` to read the verdicts.
Time is the check alone, without imports or data generation. Peak memory is over the whole
subprocess, divided by the size of the data (both windows as Arrow tables).

The last line is one JSON object: `speedup` (the smallest Evidently time / ours over the cases
run), `agreement` (the lowest share of columns whose verdicts agree), `seconds_1m` and
`peak_mem_ratio_1m` (null under --quick), and the figures per case.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CASES: dict[str, tuple[int, int]] = {  # name: (rows, columns)
    "100k_x_20": (100_000, 20),
    "100k_x_100": (100_000, 100),
    "1m_x_25": (1_000_000, 25),
}
QUICK = ("100k_x_20",)
CATEGORIES = 8
# Numerical drift by column index modulo 10: (mean shift, scale) in reference standard deviations.
NUMERICAL_DRIFT = {1: (0.5, 1.0), 4: (0.15, 1.0), 7: (0.05, 1.0), 9: (0.0, 1.6)}


def columns(count: int) -> tuple[list[str], list[str]]:
    categorical = count // 5
    return [f"num_{i}" for i in range(count - categorical)], [
        f"cat_{i}" for i in range(categorical)
    ]


def generate(rows: int, count: int) -> tuple[Any, Any, set[str]]:
    """Reference (rows * 1.1) and current (rows) Arrow tables, and the columns drifted."""
    import numpy as np
    import pyarrow as pa

    numerical, categorical = columns(count)
    rng = np.random.default_rng(20260101)
    ref_rows = rows + rows // 10
    base = np.linspace(1.0, 4.0, CATEGORIES)
    names = np.array([f"category_{i}" for i in range(CATEGORIES)], dtype="S10")
    drifted: set[str] = set()
    ref: dict[str, Any] = {}
    cur: dict[str, Any] = {}
    for i, name in enumerate(numerical):
        loc, scale = rng.normal(0, 5), rng.uniform(0.5, 3)
        shift, stretch = NUMERICAL_DRIFT.get(i % 10, (0.0, 1.0))
        if shift >= 0.15 or stretch != 1.0:
            drifted.add(name)
        ref[name] = pa.array(rng.normal(loc, scale, ref_rows))
        cur[name] = pa.array(rng.normal(loc + shift * scale, scale * stretch, rows))
    for i, name in enumerate(categorical):
        p = base / base.sum()
        q = p[::-1] if i % 3 == 1 else p
        if i % 3 == 1:
            drifted.add(name)
        for table, size, probs in ((ref, ref_rows, p), (cur, rows, q)):
            # A plain string column built from numpy buffers (names of 10 bytes each), so that
            # no Arrow memory pool keeps the generation's scratch space in the peak.
            chars = names[rng.choice(CATEGORIES, size, p=probs)]
            offsets = np.arange(0, 10 * (size + 1), 10, dtype=np.int32)
            table[name] = pa.StringArray.from_buffers(
                size, pa.py_buffer(offsets), pa.py_buffer(chars)
            )
    return pa.table(ref), pa.table(cur), drifted


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(case: str, engine: str) -> dict[str, Any]:
    """One engine on one case, in this (fresh) process."""
    rows, count = CASES[case]
    numerical, categorical = columns(count)
    kinds = dict.fromkeys(numerical, "numerical") | dict.fromkeys(categorical, "categorical")
    if engine == "ours":
        from stagegate.lifecycle.policy import DriftCriteria
        from stagegate.monitoring.check import check

        baseline = peak_mb()
        reference, current, drifted = generate(rows, count)
        data_mb = (reference.nbytes + current.nbytes) / 2**20
        start = time.perf_counter()
        report = check(reference, current, DriftCriteria(), kinds=kinds)  # type: ignore[arg-type]
        seconds = time.perf_counter() - start
        verdicts = {c.column: c.drifted for c in report.columns}
    else:
        from stagegate.monitoring.evidently import evidently_drift

        baseline = peak_mb()
        reference, current, drifted = generate(rows, count)
        data_mb = (reference.nbytes + current.nbytes) / 2**20
        import evidently  # noqa: F401  the import is not part of the time

        start = time.perf_counter()
        plain = evidently_drift(reference, current, kinds)  # type: ignore[arg-type]
        seconds = time.perf_counter() - start
        verdicts = {c: r.drifted for c, r in plain.columns.items()}
    return {
        "case": case,
        "engine": engine,
        "seconds": seconds,
        "peak_mb": peak_mb(),
        "baseline_mb": baseline,
        "data_mb": data_mb,
        "verdicts": verdicts,
        "injected": sorted(drifted),
    }


def spawn(case: str, engine: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--case", case, "--engine", engine],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"{engine} on {case} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the 100k x 20 case")
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--engine", choices=["ours", "evidently"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.engine)))
        return

    summary: dict[str, Any] = {}
    for case in QUICK if args.quick else CASES:
        ours = spawn(case, "ours")
        plain = spawn(case, "evidently")
        injected = set(ours["injected"])
        same = sum(ours["verdicts"][c] == plain["verdicts"].get(c) for c in ours["verdicts"])
        found = {c for c, d in ours["verdicts"].items() if d}
        row = {
            "ours_s": round(ours["seconds"], 3),
            "evidently_s": round(plain["seconds"], 2),
            "speedup": round(plain["seconds"] / ours["seconds"], 1),
            "agreement": same / len(ours["verdicts"]),
            "ours_peak_mb": round(ours["peak_mb"]),
            "ours_baseline_mb": round(ours["baseline_mb"]),
            "evidently_peak_mb": round(plain["peak_mb"]),
            "data_mb": round(ours["data_mb"]),
            "ours_peak_mem_ratio": round(ours["peak_mb"] / ours["data_mb"], 2),
            "evidently_peak_mem_ratio": round(plain["peak_mb"] / ours["data_mb"], 2),
            "injected": len(injected),
            "found_injected": len(found & injected),
            "false_alarms": len(found - injected),
        }
        summary[case] = row
        print(
            f"{case:>11}: ours {row['ours_s']:.2f} s, {row['ours_peak_mb']} MB peak | "
            f"evidently {row['evidently_s']:.1f} s, {row['evidently_peak_mb']} MB peak | "
            f"data {row['data_mb']} MB | {row['speedup']}x | agreement {row['agreement']:.3f} | "
            f"drift found in {row['found_injected']}/{row['injected']} injected columns, "
            f"{row['false_alarms']} others",
            flush=True,
        )
    big = summary.get("1m_x_25")
    print(
        json.dumps(
            {
                "speedup": min(r["speedup"] for r in summary.values()),
                "agreement": min(r["agreement"] for r in summary.values()),
                "seconds_1m": big["ours_s"] if big else None,
                "peak_mem_ratio_1m": big["ours_peak_mem_ratio"] if big else None,
                "cases": summary,
            }
        )
    )


if __name__ == "__main__":
    main()
