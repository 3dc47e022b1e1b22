"""Issue 3 benchmark: the full SMM trial model for 10,000 patients × 2 years.

    .venv/bin/python benchmarks/bench_trial.py            # --n 10000 --years 2 --baseline-n 4

Fast path: ``pkpd.trial.run_trial`` — population, individual parameters, 104 weekly segments
with the label's dose modification, endpoints and summary — with each of its engines, in the
same run: "periodic" (the default, ``pkpd.solvers.periodic``: affine maps of the PK-driven
states per pair of weekly patterns, exponential Heun steps of 24 h (12 h after a dose) of the
slow states with the platelet transit chain exact in its coupling, the whole course with the
dose rule in one compiled loop per patient) and "ode" (the compiled per-patient
Dormand–Prince with the PK in closed form, ``pkpd.solvers.compiled``).
Baseline: the loop a scientist writes with scipy — per patient, per week, ``solve_ivp``
(LSODA, rtol 1e-6, atol 1e-9) of the same model file's right-hand side with the week's dose
added at its start and daily ``t_eval``; timed on ``--baseline-n`` patients at 100 mg QW without
holds and scaled linearly. Both are checked against each other on those patients (M-spike,
platelets, XPO1 inhibition after two years).

Printed beside the times: the machine's load average (other work slows the run) and the CPU
time of the process during the fast path; ``--json PATH`` writes the figures (e.g.
``benchmarks/results/bench_trial.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import sympy as sp
from machine import describe
from scipy.integrate import solve_ivp

from pkpd._io import atomic_write_text
from pkpd.model import TIME, load_model
from pkpd.simulation import Course, individual_parameters, sample_etas
from pkpd.trial import WEEK, run_trial


def scipy_loop(m, ind: dict, covs: dict, weeks: int, dose: float) -> np.ndarray:
    """(S, n) amounts after ``weeks`` of ``dose`` mg QW, one solve_ivp per patient-week."""
    args = [sp.Symbol(k, real=True) for k in (*m.parameters, *m.covariates)]
    f = sp.lambdify([TIME, m.state_symbols, *args], [m.odes[s] for s in m.states],
                    modules="numpy", cse=True)
    x0 = Course(m, ind, covs).x  # the model's initial amounts, (n, S)
    depot = m.cmt_numbers[m.default_dose_cmt]
    out = []
    for i, x in enumerate(x0):
        vals = [ind[k][i] for k in m.parameters] + [covs[k][i] for k in m.covariates]
        for w in range(weeks):
            x = x.copy()
            x[depot] += dose
            sol = solve_ivp(f, (w * WEEK, (w + 1) * WEEK), x, args=tuple(vals),
                            method="LSODA", rtol=1e-6, atol=1e-9,
                            t_eval=np.arange(w * WEEK, (w + 1) * WEEK + 1, 24.0))
            x = sol.y[:, -1]
        out.append(x)
    return np.array(out).T


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--years", type=float, default=2.0)
    ap.add_argument("--baseline-n", type=int, default=4)
    ap.add_argument("--json", default=None, help="write the figures to this file")
    a = ap.parse_args()
    weeks = int(round(a.years * 52))
    m = load_model("selinexor_smm")
    run_trial("100 mg QW", n=300, years=2 / 52, seed=2)  # compile/load the kernels once

    run_trial("100 mg QW", n=300, years=2 / 52, seed=2, engine="ode")
    load0 = os.getloadavg()
    t = time.perf_counter()
    cpu = time.process_time()
    res = run_trial("100 mg QW", n=a.n, years=a.years, seed=1)
    fast = time.perf_counter() - t
    cpu = time.process_time() - cpu
    prog = res.summary.query("RISK == 'all' and ENDPOINT.str.startswith('PROGRESSION')")
    t = time.perf_counter()
    res_ode = run_trial("100 mg QW", n=a.n, years=a.years, seed=1, engine="ode")
    ode = time.perf_counter() - t
    est = [r.summary.set_index(["RISK", "ENDPOINT"])["ESTIMATE"] for r in (res, res_ode)]
    gap = (est[0] - est[1]).abs().xs("all")

    rng = np.random.default_rng(7)
    k = a.baseline_n
    covs = {c: np.full(k, v.default) for c, v in m.covariates.items()}
    ind = individual_parameters(m, covs, eta=sample_etas(m, k, rng)).params
    t = time.perf_counter()
    ref = scipy_loop(m, ind, covs, weeks, 100.0)
    base = time.perf_counter() - t
    course = Course(m, ind, covs, rtol=1e-4, atol=1e-8)
    for w in range(weeks):
        t0 = w * WEEK
        amounts = course.run(t0, t0 + np.arange(0.0, WEEK + 1, 24.0), np.arange(k),
                             np.full(k, t0), np.full(k, 100.0))
    got = amounts[:, -1, :]
    idx = {s: i for i, s in enumerate(m.states)}
    diff = {s: float(np.max(np.abs(got[idx[s]] - ref[idx[s]]) / np.abs(ref[idx[s]])))
            for s in ("MPROT", "FLC", "CIRC", "BOUND", "SENS", "HPROG")}

    per_fast = fast / (a.n * weeks)
    per_base = base / (k * weeks)
    print(f"cores: {os.cpu_count()}, numba threads: {__import__('numba').get_num_threads()}")
    print(f"fast path (periodic): {a.n} patients x {weeks} weeks: {fast:.1f} s "
          f"({per_fast * 1e6:.2f} us per patient-week; CPU time {cpu:.1f} s); load average "
          f"(1 min) before {load0[0]:.2f}, at the end {os.getloadavg()[0]:.2f}")
    print(f"  2-y progression (all): {float(prog['ESTIMATE'].iloc[0]):.3f}")
    print(f"engine ode: {ode:.1f} s ({ode / (a.n * weeks) * 1e6:.1f} us per patient-week); "
          f"periodic is {ode / fast:.1f}x faster; largest difference of a summary estimate "
          f"(all patients): {gap.max():.4f} ({gap.idxmax()})")
    print(f"scipy loop: {k} patients x {weeks} weeks: {base:.1f} s "
          f"({per_base * 1e3:.2f} ms per patient-week); scaled to {a.n}: "
          f"{per_base * a.n * weeks:.0f} s")
    print(f"speed ratio: {per_base / per_fast:.0f}x")
    print("max relative difference after 2 years, fast vs scipy loop: "
          + ", ".join(f"{s} {v:.1e}" for s, v in diff.items()))
    if a.json:  # written whole or not at all
        out = {**describe(), "n": a.n, "years": a.years,
               "periodic_seconds": fast, "periodic_cpu_seconds": cpu,
               "periodic_us_per_patient_week": per_fast * 1e6, "ode_seconds": ode,
               "ode_over_periodic": ode / fast, "largest_summary_gap": float(gap.max()),
               "scipy_ms_per_patient_week": per_base * 1e3,
               "load_before": load0[0], "load_end": os.getloadavg()[0]}
        atomic_write_text(a.json, json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
