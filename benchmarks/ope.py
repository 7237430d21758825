"""Benchmark: Stagegate's off-policy estimators against Open Bandit Pipeline (obp 0.5.7).

    .venv/bin/python benchmarks/ope.py [--quick]

obp cannot live beside our pins (its metadata asks for Python < 3.11, torch 1.12, numpy 1.23.5,
pandas 1.5.2, scikit-learn 1.1.3), so the benchmark makes its own virtualenv under
`.bench/obp-venv` once and reuses it: torch 2.13.0 from the CPU wheel on local disk, obp 0.5.7
with --no-deps --ignore-requires-python, then the libraries obp imports, numpy at our version so
both sides do the same arithmetic. Setting it up is not timed. If it cannot be set up, the obp
fields are null and `obp_error` says why.

Inputs: a synthetic contextual bandit (10 actions, 5 context features, Bernoulli rewards), the
logging policy's propensities, a softmax candidate and a cross-fitted ridge q_hat. Both sides get
the same arrays, obp in its shapes (action_dist (n, K, 1), position 0).

Timings are the fastest of repeated calls (the machine is shared), estimators only: no imports,
no data loading. Ours always include the analytic intervals, which cost almost nothing.
  - with intervals (`speedup_vs_obp`): ours with analytic intervals (the default) against obp
    with its only interval, `estimate_policy_value` + `estimate_interval` (a percentile
    bootstrap) at `--obp-bootstrap` replicates (1,000; obp's default is 10,000);
  - point (`speedup_point_vs_obp`): obp's `estimate_policy_value` alone, against the same call
    of ours. Both are vectorised NumPy, so this is the ratio of overheads, not of algorithms;
  - bootstrap like for like (`speedup_bootstrap_vs_obp`): ours with the same replicates.

The last line is one JSON object: `max_abs_diff_vs_obp` (point estimates, the three
estimators), `speedup_vs_obp` (obp's estimates with intervals / ours, the default each side
offers), `speedup_point_vs_obp`, `speedup_bootstrap_vs_obp`, `seconds_1m` (ours, the three
estimators with analytic intervals on 1M rows), `coverage` (the lowest, over IPS, SNIPS and DR,
share of 95% intervals covering the true value in 1,000 repetitions) and the details.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))  # run from a checkout without installing

from stagegate.experiments.offpolicy import doubly_robust, ips, snips  # noqa: E402
from stagegate.experiments.reward_model import cross_fitted_q_hat  # noqa: E402

BENCH = ROOT / ".bench"
VENV = BENCH / "obp-venv"
OBP_PYTHON = VENV / "bin" / "python"
READY = VENV / ".stagegate-ready"
N_ACTIONS = 10
FEATURES = 5

OBP_RUNNER = r"""
import json, sys, time, warnings
import numpy as np
warnings.filterwarnings("ignore")
from obp.ope import DoublyRobust, InverseProbabilityWeighting
from obp.ope import SelfNormalizedInverseProbabilityWeighting

path, repeats, n_boot = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = np.load(path)
n = data["reward"].shape[0]
common = dict(
    reward=data["reward"], action=data["action"], pscore=data["pscore"],
    action_dist=data["action_dist"][:, :, None], position=np.zeros(n, dtype=int),
)
dr_extra = dict(estimated_rewards_by_reg_model=data["q_hat"][:, :, None])
estimators = {
    "ips": (InverseProbabilityWeighting(), {}),
    "snips": (SelfNormalizedInverseProbabilityWeighting(), {}),
    "dr": (DoublyRobust(), dr_extra),
}

def best_time(call):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - start)
    return out, min(times)

result = {"values": {}, "point_s": {}, "interval_s": {}, "intervals": {}}
for name, (estimator, extra) in estimators.items():
    value, seconds = best_time(lambda: estimator.estimate_policy_value(**common, **extra))
    result["values"][name] = float(value)
    result["point_s"][name] = seconds
    start = time.perf_counter()
    interval = estimator.estimate_interval(
        **common, **extra, alpha=0.05, n_bootstrap_samples=n_boot, random_state=0
    )
    result["interval_s"][name] = time.perf_counter() - start
    result["intervals"][name] = [float(v) for v in interval.values()][1:]
print(json.dumps(result))
"""


# --- the obp virtualenv ----------------------------------------------------------------------


def ensure_obp_venv() -> tuple[bool, str]:
    """Create `.bench/obp-venv` with obp 0.5.7 unless it is there; (ready, why not)."""
    if READY.exists():
        return True, ""
    BENCH.mkdir(exist_ok=True)
    (BENCH / ".gitignore").write_text("*\n")  # keep the venv and the inputs out of git
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(VENV)],
        # The CPU wheel on disk; a plain `torch` could pull a CUDA build of several GB.
        [*pip, "torch==2.13.0"],
        [*pip, "--no-deps", "--ignore-requires-python", "obp==0.5.7"],
        [
            *pip,
            f"numpy=={np.__version__}",
            "scipy",
            "scikit-learn",
            "pandas",
            "matplotlib",
            "tqdm",
            "pyyaml",
            "seaborn",
        ],
        [str(OBP_PYTHON), "-c", "import obp.ope; print(obp.__version__)"],
    ]
    print("setting up .bench/obp-venv (once; not timed)", file=sys.stderr, flush=True)
    for argv in steps:
        out = subprocess.run(argv, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
            return False, f"`{' '.join(argv[-3:])}` failed: {' | '.join(tail)}"
    READY.write_text("obp 0.5.7\n")
    return True, ""


def run_obp(path: Path, repeats: int, n_bootstrap: int) -> dict[str, Any]:
    runner = BENCH / "obp_runner.py"
    runner.write_text(OBP_RUNNER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run(
        [str(OBP_PYTHON), str(runner), str(path), str(repeats), str(n_bootstrap)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if out.returncode != 0:
        raise RuntimeError(f"obp run failed: {out.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# --- data ------------------------------------------------------------------------------------


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def logged_data(n: int, seed: int) -> dict[str, np.ndarray]:
    """A logged bandit: contexts, the champion's actions and propensities, rewards, the
    candidate's distribution and a cross-fitted q_hat."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES))
    theta = rng.normal(size=(FEATURES, N_ACTIONS)) * 0.5
    q = 1 / (1 + np.exp(-(x @ theta - 1.0)))
    pi_b = 0.7 * softmax(x @ rng.normal(size=(FEATURES, N_ACTIONS))) + 0.3 / N_ACTIONS
    pi_e = 0.8 * softmax(x @ theta * 3) + 0.2 / N_ACTIONS
    u = rng.random((n, 1))
    action = np.minimum((u > np.cumsum(pi_b, axis=1)).sum(axis=1), N_ACTIONS - 1)
    rows = np.arange(n)
    reward = (rng.random(n) < q[rows, action]).astype(np.float64)
    q_hat = cross_fitted_q_hat(x, action, reward, N_ACTIONS, folds=2)
    return {
        "reward": reward,
        "action": action,
        "pscore": pi_b[rows, action],
        "action_dist": pi_e,
        "q_hat": q_hat,
    }


def ours(
    data: dict[str, np.ndarray], interval: str = "analytic", n_bootstrap: int = 1000
) -> dict[str, Any]:
    r, a, p, dist, q = (data[k] for k in ("reward", "action", "pscore", "action_dist", "q_hat"))
    target = dist[np.arange(r.shape[0]), a]
    options: dict[str, Any] = {"interval": interval, "n_bootstrap": n_bootstrap, "seed": 0}
    return {
        "ips": ips(r, p, target, **options),
        "snips": snips(r, p, target, **options),
        "dr": doubly_robust(r, p, a, dist, q, **options),
    }


def best_seconds(call: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` calls: on a shared machine the others measure the neighbours."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


# --- coverage --------------------------------------------------------------------------------


def coverage(reps: int = 1000, n: int = 2000, seed: int = 7) -> dict[str, float]:
    """Share of 95% intervals that cover the true value, over `reps` logged data sets drawn
    from a bandit with finitely many contexts (so the truth is an exact sum)."""
    rng = np.random.default_rng(seed)
    contexts, k = 20, 4
    features = rng.normal(size=(contexts, 3))
    p_context = rng.dirichlet(np.full(contexts, 5.0))
    q = 1 / (1 + np.exp(-(features @ rng.normal(size=(3, k)) - 0.5)))
    pi_b = 0.8 * softmax(features @ rng.normal(size=(3, k))) + 0.2 / k
    pi_e = 0.9 * softmax(2 * features @ rng.normal(size=(3, k))) + 0.1 / k
    truth = float(p_context @ (pi_e * q).sum(axis=1))
    m = rng.choice(contexts, size=(reps, n), p=p_context)
    a = (rng.random((reps, n, 1)) > np.cumsum(pi_b[m], axis=-1)).sum(axis=-1)
    r = (rng.random((reps, n)) < q[m, a]).astype(np.float64)
    hits = {"ips": 0, "snips": 0, "dr": 0}
    rows = np.arange(n)
    for i in range(reps):
        p, dist = pi_b[m[i], a[i]], pi_e[m[i]]
        target = dist[rows, a[i]]
        q_hat = cross_fitted_q_hat(features[m[i]], a[i], r[i], k, folds=2)
        for estimate in (
            ips(r[i], p, target),
            snips(r[i], p, target),
            doubly_robust(r[i], p, a[i], dist, q_hat),
        ):
            hits[estimate.method] += estimate.lower <= truth <= estimate.upper
    return {method: count / reps for method, count in hits.items()}


# --- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k rows against obp (< 60 s)")
    parser.add_argument(
        "--obp-bootstrap", type=int, default=1000, help="bootstrap replicates, both sides"
    )
    args = parser.parse_args()
    n_compare = 100_000 if args.quick else 1_000_000
    n_boot = args.obp_bootstrap
    repeats = 15

    ready, obp_error = ensure_obp_venv()
    start = time.perf_counter()
    big = logged_data(1_000_000, seed=1)
    print(f"1M logged rows generated in {time.perf_counter() - start:.1f} s", flush=True)
    seconds_1m = best_seconds(lambda: ours(big), repeats)
    estimates_1m = ours(big)
    for name, est in estimates_1m.items():
        print(
            f"  {name:>5}: {est.value:.5f} [{est.lower:.5f}, {est.upper:.5f}] ess {est.ess:,.0f}",
            flush=True,
        )
    print(f"ours, 1M rows, three estimators with analytic intervals: {seconds_1m:.3f} s")

    data = big if n_compare == 1_000_000 else {k: v[:n_compare] for k, v in big.items()}
    ours_interval_s = best_seconds(lambda: ours(data), repeats)
    start = time.perf_counter()
    ours_boot = ours(data, interval="bootstrap", n_bootstrap=n_boot)
    ours_boot_s = time.perf_counter() - start
    ours_values = {name: est.value for name, est in ours(data).items()}

    obp: dict[str, Any] | None = None
    if ready:
        path = BENCH / "ope-inputs.npz"
        np.savez(path, **data)
        try:
            obp = run_obp(path, repeats, n_boot)
        except RuntimeError as error:
            obp_error = str(error)
    diffs = (
        {name: abs(ours_values[name] - obp["values"][name]) for name in ours_values} if obp else {}
    )
    obp_point_s = sum(obp["point_s"].values()) if obp else None
    obp_interval_s = (obp_point_s + sum(obp["interval_s"].values())) if obp else None

    start = time.perf_counter()
    covered = coverage()
    coverage_s = time.perf_counter() - start
    print(f"coverage of 95% intervals over 1,000 repetitions: {covered} ({coverage_s:.1f} s)")

    def ratio(slow: float | None, fast: float) -> float | None:
        return round(slow / fast, 1) if slow is not None else None

    result: dict[str, Any] = {
        "max_abs_diff_vs_obp": max(diffs.values()) if diffs else None,
        "speedup_vs_obp": ratio(obp_interval_s, ours_interval_s),
        "speedup_basis": (
            "three estimates with 95% intervals: ours analytic vs obp estimate_policy_value + "
            f"estimate_interval (bootstrap, {n_boot} replicates), {n_compare:,} rows"
        ),
        "speedup_point_vs_obp": ratio(obp_point_s, ours_interval_s),
        "speedup_bootstrap_vs_obp": ratio(obp_interval_s, ours_boot_s),
        "seconds_1m": round(seconds_1m, 4),
        "coverage": min(covered.values()),
        "coverage_by_method": covered,
        "rows_vs_obp": n_compare,
        "ours_s": {
            "with_analytic_intervals": round(ours_interval_s, 4),
            "with_bootstrap_intervals": round(ours_boot_s, 3),
        },
        "obp_s": (
            {
                "point": round(obp_point_s, 4),
                "with_bootstrap_intervals": round(obp_interval_s, 3),
            }
            if obp and obp_point_s is not None and obp_interval_s is not None
            else None
        ),
        "abs_diff_by_method": diffs or None,
        "bootstrap_intervals": {
            "ours": {k: [round(e.lower, 5), round(e.upper, 5)] for k, e in ours_boot.items()},
            "obp": {k: [round(v, 5) for v in iv] for k, iv in obp["intervals"].items()}
            if obp
            else None,
        },
        "obp_error": obp_error or None,
        "quick": args.quick,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
