"""Joint PK → XPO1 → M-spike fit benchmark (issue 4, benchmark c): N = 60 patients over
2 years, the spec fits/selinexor_smm_joint.toml on fits/data/selinexor_smm_joint.csv
(40/60/100 mg QW × 104 weeks, sparse CP, 4-weekly M-spike).

The likelihood is the compiled forward-sensitivity solver (pkpd.sensitivity). Sampling the
full spec takes hours, so this script measures what the wall time is made of and projects it:

1. build (sympy generation, kernel load/compile, PyMC graph) — measured;
2. one gradient of the log density (all 60 patients × 2 years with sensitivities) — measured,
   median of repeated calls;
3. leapfrog steps per NUTS iteration — measured on a short run (``--probe`` draws + tune per
   chain, PyMC's multiprocess NUTS, 2 chains on 2 cores);
4. projected wall time of the spec's sampler settings = build + iterations × steps × gradient
   time / parallel chains.

The same is measured for the sequential (IPP) alternative: the PK fit (closed form, nutpie,
measured in full) and the M-spike fit with each patient's PK fixed (fits/selinexor_smm_pd.toml).

The periodic likelihood (``fit(..., likelihood="periodic")``, pkpd.periodic_likelihood) of
the same spec is measured too: build, compilation and gradient with PyTensor's C backend and,
if JAX is installed, its JAX backend (``--periodic-only``: just that, assuming 50 leapfrog
steps per iteration).

``--run`` times the whole ``pkpd fit`` of fits/selinexor_smm_joint_net.toml (the net-rate
model, periodic likelihood with JAX, partial centring from the EBE, 2 × (500 + 500)): the
benchmark's number, with its diagnostics, written to results/bench_joint_run.json and the
fit's folder fits/selinexor_smm_joint_net/.

    python benchmarks/bench_joint.py [--probe 30] [--out benchmarks/results/bench_joint.json]
    python benchmarks/bench_joint.py --periodic-only
    python benchmarks/bench_joint.py --run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from pkpd._io import atomic_write_text
from pkpd.fitting import build, fit, fit_spec, load_spec

ROOT = Path(__file__).resolve().parent.parent


def _gradient_ms(b, repeats: int = 10) -> float:
    fn = b.pm_model.compile_dlogp()
    point = b.pm_model.initial_point()
    fn(point)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(point)
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def _measure(spec, probe: int, label: str) -> dict:
    print(f"[{label}] build", flush=True)
    t = time.perf_counter()
    b = build(spec.model, spec.data, spec.endpoints, priors=spec.priors,
              omega_scale=spec.omega_scale, iiv=spec.iiv, prior_sd=spec.prior_sd,
              centred=spec.centred, where=str(spec.path), individual=spec.individual)
    t_build = time.perf_counter() - t
    grad = _gradient_ms(b)
    print(f"[{label}] build {t_build:.1f} s, gradient {grad:.1f} ms; probing NUTS "
          f"(2 chains × ({probe} + {probe}))", flush=True)
    t = time.perf_counter()
    res = fit(spec.model, spec.data, spec.endpoints, priors=spec.priors,
              omega_scale=spec.omega_scale, iiv=spec.iiv, prior_sd=spec.prior_sd,
              centred=spec.centred, chains=2, draws=probe, tune=probe, seed=1,
              target_accept=spec.sampler.target_accept, progress=False,
              posterior_predictive=False, individual=spec.individual)
    t_probe = time.perf_counter() - t
    steps = float(res.idata.sample_stats["n_steps"].mean())
    s = spec.sampler
    iters = s.draws + s.tune
    parallel = min(s.chains, os.cpu_count() or 1)
    projected = t_build + s.chains * iters * steps * grad / 1000 / parallel
    return {"build_s": round(t_build, 1), "gradient_ms": round(grad, 2),
            "probe": {"chains": 2, "draws": probe, "tune": probe,
                      "wall_s": round(t_probe, 1), "steps_per_iteration": round(steps, 1)},
            "spec_sampler": {"chains": s.chains, "draws": s.draws, "tune": s.tune},
            "projected_wall_s": round(projected, 0)}


def _gradient_fn_ms(fn, point: dict, names: list[str], repeats: int = 20) -> float:
    args = [point[k] for k in names]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        [np.asarray(x) for x in fn(*args)]  # JAX returns before it has computed
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def _measure_periodic(spec, steps_per_iteration: float) -> dict:
    """The periodic likelihood graph (pkpd.periodic_likelihood) of the same spec: build,
    compilation and one gradient of the log density with PyTensor's C backend (PyMC's
    sampler) and, if JAX is installed, its JAX backend; projected wall time of the spec's
    sampler settings with ``steps_per_iteration`` leapfrog steps per NUTS iteration."""
    import pytensor

    print("[periodic] build", flush=True)
    t = time.perf_counter()
    b = build(spec.model, spec.data, spec.endpoints, priors=spec.priors,
              omega_scale=spec.omega_scale, iiv=spec.iiv, prior_sd=spec.prior_sd,
              centred=spec.centred, where=str(spec.path), individual=spec.individual,
              likelihood="periodic")
    t_build = time.perf_counter() - t
    m = b.pm_model
    values = m.value_vars
    logp = m.logp()
    outs = [logp, *pytensor.grad(logp, values)]
    point = m.initial_point()
    names = [v.name for v in values]
    pr = b.predictor
    res = {"build_s": round(t_build, 1),
           "grid": {"fine_steps_per_period": pr._K, "coarse_points_per_period": pr._G,
                    "periods": pr._Nmax}}
    s = spec.sampler
    iters = s.draws + s.tune
    parallel = min(s.chains, os.cpu_count() or 1)
    modes = ["C"]
    try:
        import jax  # noqa: F401

        modes.append("JAX")
    except ImportError:
        pass
    for mode in modes:
        print(f"[periodic] compile ({mode})", flush=True)
        t = time.perf_counter()
        fn = pytensor.function(values, outs, mode=None if mode == "C" else mode)
        [np.asarray(x) for x in fn(*[point[k] for k in names])]
        t_comp = time.perf_counter() - t
        grad = _gradient_fn_ms(fn, point, names)
        res[mode] = {"compile_s": round(t_comp, 1), "gradient_ms": round(grad, 2),
                     "projected_wall_s": round(t_build + t_comp + s.chains * iters
                                               * steps_per_iteration * grad / 1000
                                               / parallel, 0)}
        print(f"[periodic] {mode}: compile {t_comp:.1f} s, gradient {grad:.2f} ms", flush=True)
    res["steps_per_iteration_assumed"] = steps_per_iteration
    return res


def _run(path: Path, load: float) -> dict:
    """The whole ``pkpd fit`` of ``path``: build, compile, EBE, sampling (timed as the fit's
    wall time), then posterior predictive, tables and plots (timed apart)."""
    from machine import describe

    spec = load_spec(path)
    t = time.perf_counter()
    res = fit_spec(spec, progress=True, write=False)
    t_fit = time.perf_counter() - t
    res.save(spec.output, spec_text=spec.text)
    t_all = time.perf_counter() - t
    d = res.diagnostics()
    truth = json.loads((ROOT / "fits" / "data" / "selinexor_smm_joint_truth.json").read_text())
    summ = res.summary().set_index("parameter")
    post = {k: float(f"{summ.loc[k, 'median']:.6g}") for k in summ.index
            if not k.startswith("eta")}
    return {"spec": str(path.relative_to(ROOT)), "machine": describe(),
            "load_average_at_start": round(load, 2), "target_s": 600,
            "fit_wall_s": round(res.wall_time, 1), "fit_and_predictive_s": round(t_fit, 1),
            "with_tables_and_plots_s": round(t_all, 1), "diagnostics": d,
            "posterior_medians": post, "truth": truth["theta"],
            "truth_omega_sd": truth["omega_sd"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--probe", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_joint.json"))
    ap.add_argument("--periodic-only", action="store_true",
                    help="measure only the periodic likelihood (steps per iteration: 50)")
    ap.add_argument("--run", action="store_true",
                    help="time the whole fit of fits/selinexor_smm_joint_net.toml")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    load = os.getloadavg()[0]
    if args.run:
        _write(_run(ROOT / "fits" / "selinexor_smm_joint_net.toml", load),
               Path(args.out).with_name("bench_joint_run.json"))
        return
    spec = load_spec(ROOT / "fits" / "selinexor_smm_joint.toml")
    if args.periodic_only:
        result = {"n_patients": 60, "weeks": 104, "load_average_at_start": round(load, 2),
                  "target_s": 600, "joint_periodic": _measure_periodic(spec, 50.0)}
        _write(result, Path(args.out).with_name("bench_joint_periodic.json"))
        return
    joint = _measure(spec, args.probe, "joint")
    # sequential: the PK fit in full (its individual.csv feeds the PD spec), then the PD probe
    with tempfile.TemporaryDirectory() as tmp:
        pk_spec = load_spec(ROOT / "fits" / "selinexor_smm_pk.toml")
        pk_spec = dataclasses.replace(pk_spec, output=Path(tmp) / "selinexor_smm_pk")
        print("[ipp] PK fit (closed form, nutpie, spec settings)", flush=True)
        t = time.perf_counter()
        pk = fit_spec(pk_spec, progress=False)
        t_pk = time.perf_counter() - t
        pd_spec = load_spec(ROOT / "fits" / "selinexor_smm_pd.toml")
        pd_spec = dataclasses.replace(pd_spec, individual=pk.individual_parameters())
        pd_part = _measure(pd_spec, args.probe, "ipp")
    ipp = {"pk_fit_wall_s": round(t_pk, 1), "pd": pd_part,
           "projected_wall_s": round(t_pk + pd_part["projected_wall_s"], 0)}
    periodic = _measure_periodic(spec, joint["probe"]["steps_per_iteration"])
    result = {"n_patients": 60, "weeks": 104, "load_average_at_start": round(load, 2),
              "target_s": 600, "joint": joint, "joint_periodic": periodic, "ipp": ipp}
    _write(result, Path(args.out))


def _write(result: dict, out: Path) -> None:
    print(json.dumps(result, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
