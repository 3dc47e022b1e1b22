"""Speed of the vectorised closed-form simulator against a per-subject solve_ivp loop.

Case (issue 2): 10,000 subjects of selinexor_pk with IIV, 100 mg once weekly for 2 years,
output every 6 h (2,921 times per subject, 29.2 M concentrations). The baseline is the loop a
scientist would write with scipy: for each subject, integrate the ODEs dose interval by dose
interval with solve_ivp (LSODA, rtol 1e-8, atol 1e-10) and t_eval on the output grid. It is
timed on a subset and scaled linearly to 10,000 subjects; both are checked to agree.

    python benchmarks/bench_simulate.py [--n 10000] [--baseline-n 20]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.integrate import solve_ivp

from pkpd.model import load_model
from pkpd.simulation import individual_parameters, sample_etas, simulate_regimen


def scipy_loop(params: dict[str, np.ndarray], idx: np.ndarray, times: np.ndarray,
               dose_times: np.ndarray, dose: float) -> np.ndarray:
    """Per-subject solve_ivp loop (the baseline): CP (len(idx), len(times)) in ng/mL."""
    out = np.empty((len(idx), len(times)))
    for row, s in enumerate(idx):
        cl, v2, q, v3, ka = (float(params[k][s]) for k in ("CL", "V2", "Q", "V3", "KA"))

        def rhs(t, x, cl=cl, v2=v2, q=q, v3=v3, ka=ka):
            return [-ka * x[0], ka * x[0] - (cl + q) / v2 * x[1] + q / v3 * x[2],
                    q / v2 * x[1] - q / v3 * x[2]]

        x = np.zeros(3)
        edges = np.r_[dose_times, times[-1] + 1e-9]
        for k in range(len(dose_times)):
            x[0] += dose
            a, b = edges[k], edges[k + 1]
            sel = (times >= a) & (times < b)
            sol = solve_ivp(rhs, (a, b), x, method="LSODA", rtol=1e-8, atol=1e-10,
                            t_eval=times[sel], dense_output=False)
            out[row, sel] = 1000 * sol.y[1] / v2
            x = solve_ivp(rhs, (a, b), x, method="LSODA", rtol=1e-8, atol=1e-10).y[:, -1]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--baseline-n", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    model = load_model("selinexor_pk")
    times = np.arange(0.0, 2 * 365 * 24 + 1e-9, 6.0)  # 2 years, every 6 h
    regimen = "100 mg QW for 104 weeks"
    print(f"selinexor_pk, {regimen}, {args.n} subjects x {len(times)} times "
          f"({args.n * len(times) / 1e6:.1f} M outputs)")

    simulate_regimen(model, regimen, times[:10], n=10, seed=0)  # warm up (imports, sympy)
    fast = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        res = simulate_regimen(model, regimen, times, n=args.n, seed=1)
        fast.append(time.perf_counter() - t0)
    t_fast = min(fast)
    cp = res["CP"]

    # the same individuals for the baseline (same seed → same η)
    eta = sample_etas(model, args.n, np.random.default_rng(1))
    covs = {k: np.full(args.n, c.default) for k, c in model.covariates.items()}
    params = individual_parameters(model, covs, eta=eta).params
    idx = np.linspace(0, args.n - 1, args.baseline_n).astype(int)
    t0 = time.perf_counter()
    ref = scipy_loop(params, idx, times, np.arange(0, 104) * 168.0, 100.0)
    t_loop = (time.perf_counter() - t0) * args.n / args.baseline_n
    err = np.max(np.abs(cp[idx] - ref)) / np.max(np.abs(ref))

    print(f"vectorised closed form : {t_fast:8.2f} s  (best of {args.repeat}; all runs: "
          f"{', '.join(f'{t:.2f}' for t in fast)}; the first includes page-faulting "
          f"{cp.nbytes / 1e6:.0f} MB of output)")
    print(f"solve_ivp loop (scaled): {t_loop:8.1f} s  (timed on {args.baseline_n} subjects)")
    print(f"speed ratio            : {t_loop / t_fast:8.0f} x")
    print(f"max |difference| / max : {err:.1e}")


if __name__ == "__main__":
    main()
