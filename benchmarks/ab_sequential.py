"""Benchmark: Stagegate's sequential A/B test against a fixed-horizon z-test, a plain mSPRT and an
O'Brien-Fleming design with 5 looks, on the same simulated conversion data.

    .venv/bin/python benchmarks/ab_sequential.py [--quick]

Setup: conversion p = 5% in the control, a minimum detectable effect (MDE) of 10% relative
(+0.5 points), two-sided alpha 5%, power 80%. N is the fixed-horizon z-test's per-arm sample.
Effects of 0, 0.5, 1 and 2 MDE; 20k simulations each (`--quick`: 2k). Every method reads the
same simulated paths (one seed per effect).

How the canary flow looks (the model): traffic reaches each arm as a Poisson stream of 25 units
a second; the flow looks every 5 s with a jitter of +-2 s (uniform), so about 125 new units per
arm between looks and some 280 looks by the maximum sample. The arms' counts differ at a look.

Methods:
  - ours: `stagegate.experiments` as the canary flow runs it: the truncated design
    (`sequential_test(max_samples=1.1 N)`: an mSPRT at every flow look whose continuous
    crossing spends 60% of alpha, and a last look at 1.1 N per arm that spends the rest), with
    the verdict by the rules of `decide` and a minimum sample of 1000 per arm: promote when the
    interval is above 0, roll back when below 0 or inconclusive at 1.1 N.
  - fixed_z: one look at N per arm, the pooled two-proportion z-test (p-value from scipy).
  - msprt: the plain mSPRT (tau = MDE, Ville's 1/alpha threshold) at every flow look, stopped
    without a verdict at the same 1.1 N (it has no last look to spend what is left).
  - obf5: O'Brien-Fleming with 5 equally spaced looks (pooled z), the critical constant and the
    maximum sample (R N, R for 80% power) computed by numerical integration. It needs those
    fixed looks: the flow would have to look exactly there.

Figures per method: type I error (any rejection at effect 0), power (a win at the MDE, also at
0.5 and 2 MDE), mean and maximum per-arm sample the test used, over N. `seconds` times ours
alone on 20k simulated paths (the verdict at every look of every path), with the last look's
critical-value table already built (`seconds_table` is that one-off cost). A few paths are
also replayed unit by unit through `sequential_test` and `decide` and must give the same
verdicts at the same looks (`replay_agreement`).

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import numpy as np
from scipy import stats

from stagegate.experiments.decision import decide
from stagegate.experiments.sequential import (
    TRUNCATED_RHO,
    arm_variance,
    crossing,
    fixed_horizon_samples,
    halfwidth,
    mixture_log_lr,
    sequential_test,
    truncated_design,
)

P_CONTROL = 0.05
MDE_RELATIVE = 0.10
ALPHA = 0.05
POWER = 0.80
MAX_RATIO = 1.1
MIN_SAMPLES = 1000
RATE = 25.0  # units per second per arm
LOOK_EVERY = 5.0  # seconds
JITTER = 2.0  # seconds, uniform either side
EFFECTS = (0.0, 0.5, 1.0, 2.0)  # in MDEs
OBF_LOOKS = 5
SEED = 20260101

DELTA = P_CONTROL * MDE_RELATIVE
N = fixed_horizon_samples(
    DELTA,
    (P_CONTROL + DELTA) * (1 - P_CONTROL - DELTA),
    P_CONTROL * (1 - P_CONTROL),
    alpha=ALPHA,
    power=POWER,
)
M = math.floor(MAX_RATIO * N)
TAU2 = DELTA**2


def _bisect(f: Any, lo: float, hi: float, tol: float = 1e-7) -> float:
    """Root of an increasing f on [lo, hi]."""
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return 0.5 * (lo + hi)


def obf_design() -> tuple[float, int, list[int]]:
    """O'Brien-Fleming's constant C (|z_k| >= C sqrt(K/k)), its maximum sample and looks."""
    times = np.arange(1, OBF_LOOKS + 1) / OBF_LOOKS

    def level(c: float) -> float:  # in W = z sqrt(t) the boundary is the constant C
        return crossing(lambda t: np.full_like(t, c), times, continuous=False).probability

    c = _bisect(lambda v: ALPHA - level(v), 1.5, 4.0)
    z = stats.norm.ppf(1 - ALPHA / 2) + stats.norm.ppf(POWER)

    def power(r: float) -> float:
        return crossing(
            lambda t: np.full_like(t, c), times, drift=z * math.sqrt(r), continuous=False
        ).probability

    ratio = _bisect(lambda r: power(r) - POWER, 1.0, 1.5)
    n_max = math.ceil(ratio * N)
    return c, n_max, [round(n_max * k / OBF_LOOKS) for k in range(1, OBF_LOOKS + 1)]


def simulate(
    effect: float, sims: int, fixed: list[int], rng: np.random.Generator
) -> dict[str, Any]:
    """Counts and conversions per arm at every flow look and at the fixed points."""
    gaps_needed = math.ceil(1.4 * M / (RATE * (LOOK_EVERY - JITTER))) + 5
    gaps = rng.uniform(LOOK_EVERY - JITTER, LOOK_EVERY + JITTER, (sims, gaps_needed))
    out: dict[str, Any] = {}
    for arm, p in (("t", P_CONTROL + effect * DELTA), ("c", P_CONTROL)):
        exposed = np.cumsum(rng.poisson(RATE * gaps), axis=1)
        if np.any(exposed[:, -1] < M):
            raise RuntimeError("a simulated path did not reach the maximum sample")
        # Units past the maximum sample are never read; each path is cut after both reach it.
        points = np.concatenate(
            [np.minimum(exposed, M), np.broadcast_to(np.array(fixed), (sims, len(fixed)))], axis=1
        )
        order = np.argsort(points, axis=1, kind="stable")
        ordered = np.take_along_axis(points, order, axis=1)
        steps = np.diff(ordered, axis=1, prepend=0)
        wins = rng.binomial(steps, p)
        conversions = np.empty_like(wins)
        np.put_along_axis(conversions, order, np.cumsum(wins, axis=1), axis=1)
        looks = exposed.shape[1]
        out[arm] = {
            "exposed": exposed,
            "n": np.minimum(exposed, M),
            "s": conversions[:, :looks],
            "fixed_s": conversions[:, looks:],
            "steps": steps,
            "wins": wins,
        }
    return out


def first_stop(stop: np.ndarray) -> np.ndarray:
    if not np.all(stop.any(axis=1)):
        raise RuntimeError("a simulated path never stopped")
    return np.argmax(stop, axis=1)


def ours(data: dict[str, Any], chunk: int = 1024) -> dict[str, np.ndarray]:
    """The verdict at the first look that acts, vectorised over paths and looks (in blocks of
    paths, so that the temporaries stay in cache)."""
    t, c = data["t"], data["c"]
    sims = t["n"].shape[0]
    at = np.empty(sims, dtype=np.int64)
    win_at = np.empty(sims, dtype=bool)
    worse_at = np.empty(sims, dtype=bool)
    for lo in range(0, sims, chunk):
        rows = slice(lo, lo + chunk)
        nt, nc = t["n"][rows].astype(np.float64), c["n"][rows].astype(np.float64)
        st, sc = t["s"][rows], c["s"][rows]
        d = st / nt - sc / nc
        vt = arm_variance(nt, st, None, "bernoulli")
        vc = arm_variance(nc, sc, None, "bernoulli")
        final = (t["n"][rows] == M) & (c["n"][rows] == M)
        half = halfwidth(vt / nt + vc / nc, alpha=ALPHA, final_variance=(vt + vc) / M, final=final)
        active = np.minimum(nt, nc) >= MIN_SAMPLES
        win, worse = active & (d > half), active & (d < -half)
        first = first_stop(win | worse | final)
        idx = np.arange(first.size)
        at[rows], win_at[rows], worse_at[rows] = first, win[idx, first], worse[idx, first]
    return _at(data, at, win_at, worse_at)


def plain_msprt(data: dict[str, Any]) -> dict[str, np.ndarray]:
    t, c = data["t"], data["c"]
    nt, nc = t["n"].astype(np.float64), c["n"].astype(np.float64)
    d = t["s"] / nt - c["s"] / nc
    variance = arm_variance(nt, t["s"], None, "bernoulli") / nt + (
        arm_variance(nc, c["s"], None, "bernoulli") / nc
    )
    reject = (mixture_log_lr(d, variance, TAU2) >= math.log(1 / ALPHA)) & (
        np.minimum(nt, nc) >= MIN_SAMPLES
    )
    win, worse = reject & (d > 0), reject & (d < 0)
    at = first_stop(win | worse | ((t["n"] == M) & (c["n"] == M)))
    return _verdicts(data, at, win, worse)


def _verdicts(
    data: dict[str, Any], at: np.ndarray, win: np.ndarray, worse: np.ndarray
) -> dict[str, np.ndarray]:
    rows = np.arange(at.size)
    return _at(data, at, win[rows, at], worse[rows, at])


def _at(
    data: dict[str, Any], at: np.ndarray, win: np.ndarray, worse: np.ndarray
) -> dict[str, np.ndarray]:
    rows = np.arange(at.size)
    t, c = data["t"], data["c"]
    return {
        "win": win,
        "reject": win | worse,
        "n": (t["n"][rows, at] + c["n"][rows, at]) / 2,
        "exposed": (t["exposed"][rows, at] + c["exposed"][rows, at]) / 2,
        "look": at,
    }


def pooled_z(st: np.ndarray, sc: np.ndarray, n: int) -> np.ndarray:
    pooled = (st + sc) / (2 * n)
    se = np.sqrt(np.maximum(pooled * (1 - pooled) * 2 / n, 1e-300))
    z: np.ndarray = (st - sc) / n / se
    return z


def fixed_z(data: dict[str, Any]) -> dict[str, np.ndarray]:
    z = pooled_z(data["t"]["fixed_s"][:, 0], data["c"]["fixed_s"][:, 0], N)
    p = 2 * stats.norm.sf(np.abs(z))
    reject = p <= ALPHA
    n = np.full(z.shape, float(N))
    return {"win": reject & (z > 0), "reject": reject, "n": n, "exposed": n}


def obf(data: dict[str, Any], c_obf: float, looks: list[int]) -> dict[str, np.ndarray]:
    k = np.arange(1, OBF_LOOKS + 1)
    z = np.stack(
        [
            pooled_z(data["t"]["fixed_s"][:, 1 + j], data["c"]["fixed_s"][:, 1 + j], looks[j])
            for j in range(OBF_LOOKS)
        ],
        axis=1,
    )
    cross = np.abs(z) >= c_obf * np.sqrt(OBF_LOOKS / k)
    stop = cross.copy()
    stop[:, -1] = True
    at = np.argmax(stop, axis=1)
    rows = np.arange(at.size)
    reject = cross[rows, at]
    n = np.array(looks, dtype=np.float64)[at]
    return {"win": reject & (z[rows, at] > 0), "reject": reject, "n": n, "exposed": n}


def replay(data: dict[str, Any], path: int) -> tuple[str, int]:
    """One path unit by unit through sequential_test and decide: (action, look index)."""
    units = {}
    for arm in ("t", "c"):
        steps, wins = data[arm]["steps"][path], data[arm]["wins"][path]
        units[arm] = np.concatenate(
            [np.r_[np.ones(w), np.zeros(s - w)] for s, w in zip(steps, wins, strict=True)]
        )
    for look in range(data["t"]["n"].shape[1]):
        nt, nc = int(data["t"]["exposed"][path, look]), int(data["c"]["exposed"][path, look])
        result = sequential_test(
            units["t"][:nt],
            units["c"][:nc],
            alpha=ALPHA,
            metric="bernoulli",
            mde=DELTA,
            max_samples=M,
        )
        decision = decide(
            result,
            [],
            min_samples=MIN_SAMPLES,
            max_samples=M,
            elapsed_s=0.0,
            max_duration_s=1e12,
        )
        if decision.action != "continue":
            return decision.action, look
    raise RuntimeError("the replayed path never stopped")


def figures(by_effect: dict[float, dict[str, np.ndarray]]) -> dict[str, Any]:
    return {
        "type1": float(by_effect[0.0]["reject"].mean()),
        "power": float(by_effect[1.0]["win"].mean()),
        "power_half_mde": float(by_effect[0.5]["win"].mean()),
        "power_2mde": float(by_effect[2.0]["win"].mean()),
        "max_n_ratio": max(float(v["n"].max()) for v in by_effect.values()) / N,
        "max_exposed_ratio": max(float(v["exposed"].max()) for v in by_effect.values()) / N,
        "mean_n_ratio_h0": float(by_effect[0.0]["n"].mean()) / N,
        "mean_n_ratio_half_mde": float(by_effect[0.5]["n"].mean()) / N,
        "mean_n_ratio_mde": float(by_effect[1.0]["n"].mean()) / N,
        "mean_n_ratio_2mde": float(by_effect[2.0]["n"].mean()) / N,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2k simulations per point")
    parser.add_argument("--sims", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the simulated paths")
    args = parser.parse_args()
    sims = args.sims or (2_000 if args.quick else 20_000)
    replays = 10 if args.quick else 40

    start = time.perf_counter()
    design = truncated_design(ALPHA)
    table_s = time.perf_counter() - start
    c_obf, n_obf, obf_looks = obf_design()
    fixed = [N, *obf_looks, M]
    print(
        f"N = {N} per arm (fixed horizon), maximum {M} (1.1 N); OBF C = {c_obf:.4f}, "
        f"maximum {n_obf} ({n_obf / N:.4f} N); {sims} simulations per effect",
        flush=True,
    )
    results: dict[str, dict[float, dict[str, np.ndarray]]] = {
        m: {} for m in ("ours", "fixed_z", "msprt", "obf5")
    }
    ours_s: float | None = None
    ours_cpu_s = math.nan
    simulate_s = 0.0
    agree = total = 0
    looks_per_path = 0.0
    for i, effect in enumerate(EFFECTS):
        rng = np.random.default_rng([args.seed, i])
        t0 = time.perf_counter()
        data = simulate(effect, sims, fixed, rng)
        simulate_s = max(simulate_s, time.perf_counter() - t0)
        t0, cpu0 = time.perf_counter(), time.process_time()
        results["ours"][effect] = ours(data)
        if effect == 1.0:
            ours_s = (time.perf_counter() - t0) * 20_000 / sims
            ours_cpu_s = (time.process_time() - cpu0) * 20_000 / sims
        results["fixed_z"][effect] = fixed_z(data)
        results["msprt"][effect] = plain_msprt(data)
        results["obf5"][effect] = obf(data, c_obf, obf_looks)
        looks_per_path = max(looks_per_path, float(results["ours"][effect]["look"].mean()) + 1)
        for path in range(replays // len(EFFECTS)):
            action, look = replay(data, path)
            r = results["ours"][effect]
            expected = "promote" if r["win"][path] else "rollback"
            agree += int(action == expected and look == r["look"][path])
            total += 1
        row = {m: figures_row(results[m][effect]) for m in results}
        print(f"effect {effect} MDE: " + json.dumps(row), flush=True)

    summary = {m: figures(results[m]) for m in results}
    best = summary.pop("ours")
    goals = {
        "type1<=0.055": best["type1"] <= 0.055,
        "power>=0.80": best["power"] >= 0.80,
        "max_n_ratio<=1.1": best["max_n_ratio"] <= 1.1,
        "mean_n_ratio_mde<=0.8": best["mean_n_ratio_mde"] <= 0.8,
        "mean_n_ratio_2mde<=0.5": best["mean_n_ratio_2mde"] <= 0.5,
        "seconds<2": (ours_s or math.inf) < 2,
    }
    print(
        json.dumps(
            {
                **{k: round(v, 4) for k, v in best.items()},
                "seconds": round(ours_s or math.nan, 3),
                "cpu_seconds": round(ours_cpu_s, 3),
                "seconds_table": round(table_s, 2),
                "seconds_simulate": round(simulate_s, 2),
                "replay_agreement": agree / total,
                "goals": goals,
                "peers": {m: {k: round(v, 4) for k, v in f.items()} for m, f in summary.items()},
                "setup": {
                    "p_control": P_CONTROL,
                    "mde_absolute": DELTA,
                    "alpha": ALPHA,
                    "n_fixed": N,
                    "n_max": M,
                    "min_samples": MIN_SAMPLES,
                    "ours_rho": TRUNCATED_RHO,
                    "ours_tau_over_mde": round(
                        math.sqrt(TRUNCATED_RHO * 2 * P_CONTROL * (1 - P_CONTROL) / M) / DELTA, 3
                    ),
                    "ours_early_alpha": round(design.early_alpha, 5),
                    "ours_early_crossing": round(design.early_crossing, 5),
                    "ours_last_look_z": round(design.critical_value, 4),
                    "obf_c": round(c_obf, 4),
                    "obf_n_max_ratio": round(n_obf / N, 4),
                    "sims_per_effect": sims,
                    "seed": args.seed,
                    "mean_looks_per_path_max": round(looks_per_path, 1),
                    "mc_se_type1": round(math.sqrt(ALPHA * (1 - ALPHA) / sims), 4),
                },
            }
        )
    )


def figures_row(r: dict[str, np.ndarray]) -> dict[str, float]:
    return {
        "reject": round(float(r["reject"].mean()), 4),
        "win": round(float(r["win"].mean()), 4),
        "mean_n": round(float(r["n"].mean()) / N, 3),
    }


if __name__ == "__main__":
    main()
