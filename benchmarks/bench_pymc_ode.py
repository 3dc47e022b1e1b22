"""Issue 4, benchmark (b): ESS per second of our population fit vs the same model written by
hand with ``pymc.ode.DifferentialEquation``, on a subset of benchmark (a)'s data.

Data: the first ``--subjects`` subjects of ``bench_fit.dataset(100)`` (pk_2cmt_oral with
KA = 2 /h, 100 mg every 12 h × 3, samples at 0.5-30 h, 15 % proportional error): the same
design, doses, sampling times and DV as benchmark (a).

Model, identical in both (the toolkit's defaults, see ``pkpd/fitting.py``): log θ ~ N(log
file value, 1) for CL, V2, Q, V3, KA; ω ~ HalfNormal(max(2·√ω²_file, 0.2)) for CL, V2, KA;
non-centred η = ω·z, z ~ N(0, 1); P_i = θ_P·exp(η_iP); CP ~ N(f, σ·|f|), σ ~ HalfNormal(0.5);
chains start at the file's values (z = 0) with a ±0.1 uniform jitter on the unconstrained scale.

1. ours: ``pkpd.fitting.build`` (closed-form likelihood) + nutpie, wall time split into model
   build, numba compilation and sampling;
2. ours with PyMC's NUTS, sampled as ``fit(..., engine="pymc")`` does (adapt_diag, the same
   starts): the same posterior with the sampler pymc.ode must use, and the number of gradient
   evaluations that sampler needs;
3. pymc.ode: per subject one ``DifferentialEquation`` (scipy ``odeint`` on the system augmented
   with forward sensitivities, the right-hand side a compiled PyTensor function called from
   Python) from a single 100 mg dose, the three doses added by superposition (the model is
   linear); ``--ode-method restart`` integrates each dosing interval and adds the dose to the
   depot instead. PyMC's NUTS (nutpie cannot sample it), same seed and starts as run 2. One
   gradient costs ≈ 0.2 s per subject here, so this run is shorter (``--ode-tune``,
   ``--ode-draws``, default 2 × (30 + 30), about an hour for 4 subjects);
4. pymc.ode projected to run 2's settings: run 2's gradient count × run 3's measured seconds per
   gradient + run 3's build and compilation, with run 2's ESS (same sampler, same posterior,
   same starts: the same ESS and tree sizes in distribution; the two log-densities agree to
   ~1e-7, checked at posterior draws).

Metric: min bulk ESS (``arviz.ess``) over the population parameters θ, ω, σ divided by the wall
time including compilation; the issue's target is ours / pymc.ode ≥ 50×. Also prints whether
the posteriors agree (population medians within 3 pooled posterior SDs; run 3 is short) and the
cost of one logp + gradient of each model. ``--context`` adds benchmark (a) itself (N = 100,
centred, 4 × (1000 + 1000), nutpie). Results: ``benchmarks/results/bench_pymc_ode.json``.

    python benchmarks/bench_pymc_ode.py [--subjects 4] [--chains 2] [--tune 200] [--draws 200]
                                        [--ode-tune 30] [--ode-draws 30] [--context]
                                        [--ode-method superposition|restart]
    python benchmarks/bench_pymc_ode.py --quick      # smoke test, ~2 min (nutpie compiles)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from bench_fit import TIMES, dataset

from pkpd import load_model
from pkpd.fitting import Endpoint, Sampler, build, compile_nutpie, fit, sample_nutpie

RESULTS = Path(__file__).resolve().parent / "results" / "bench_pymc_ode.json"
THETA = ["CL", "V2", "Q", "V3", "KA"]
IIV = ["CL", "V2", "KA"]
POP = [*THETA, *(f"omega_{k}" for k in IIV), "sigma_prop_CP"]
JITTER = 0.1
T0 = time.perf_counter()


def stage(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


def sig(x: float, digits: int = 4) -> float:
    """``x`` rounded to ``digits`` significant digits (ESS/s spans 1e-3 to 10 here)."""
    return float(f"{x:.{digits}g}")


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


# --------------------------------------------------------------------------- pymc.ode model


def rhs(y, t, p):
    """pk_2cmt_oral's ODEs (DEPOT, CENTRAL, PERIPHERAL); p = CL, V2, Q, V3, KA."""
    cl, v2, q, v3, ka = p[0], p[1], p[2], p[3], p[4]
    return [-ka * y[0],
            ka * y[0] - (cl + q) / v2 * y[1] + q / v3 * y[2],
            q / v2 * y[1] - q / v3 * y[2]]


def design(sub: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """Shared dose times, observation times, dose amount and DV matrix (subject × time)."""
    d = sub[sub["EVID"] == 1].iloc[0]
    doses = d["TIME"] + d["II"] * np.arange(int(d["ADDL"]) + 1)
    obs = sub[sub["EVID"] == 0]
    times = np.asarray(TIMES, float)
    n = sub["ID"].nunique()
    assert len(obs) == n * len(times) and (sub["EVID"] == 1).sum() == n
    assert np.allclose(obs["TIME"].to_numpy().reshape(n, -1), times)
    return doses, times, float(d["AMT"]), obs["DV"].to_numpy().reshape(n, -1)


def ode_model(sub: pd.DataFrame, method: str = "superposition"):
    """The population model of ``pkpd.fitting.build`` written by hand around
    ``pymc.ode.DifferentialEquation``; returns the PyMC model and its chains' start values."""
    import pymc as pm
    import pytensor.tensor as pt
    from pymc.ode import DifferentialEquation

    m = load_model("pk_2cmt_oral").with_values(KA=2.0)
    doses, times, amt, dv = design(sub)
    S = dv.shape[0]
    y_dose = np.array([amt, 0.0, 0.0])
    if method == "superposition":
        # one integration from a single dose at t = 0 to every t - t_dose > 0, then
        # CENTRAL(t) = Σ_doses CENTRAL_single(t - t_dose) (A: times × relative times)
        rel = np.unique([t - d for d in doses for t in times if t - d > 0])
        A = np.array([[float(np.sum(np.isclose(t - doses, r))) for r in rel] for t in times])
        ops = [DifferentialEquation(func=rhs, times=rel, n_states=3, n_theta=5, t0=0)]
    else:
        # restart at each dose: interval k from doses[k] to the next dose (or the last sample)
        ends = [*doses[1:], times.max()]
        ops, pick = [], []
        for k, (a, b) in enumerate(zip(doses, ends, strict=True)):
            ts = sorted({*(times[(times > a) & (times <= b)] - a), b - a})
            ops.append(DifferentialEquation(func=rhs, times=ts, n_states=3, n_theta=5, t0=0))
            pick += [(k, ts.index(t - a)) for t in times[(times > a) & (times <= b)]]
    with pm.Model() as pmm:
        th = {k: pm.Deterministic(k, pt.exp(pm.Normal(f"log_{k}", math.log(m.parameters[k].value),
                                                      1.0))) for k in THETA}
        om = pm.HalfNormal("omega", sigma=[max(2 * math.sqrt(m.parameters[k].omega2), 0.2)
                                           for k in IIV], shape=len(IIV))
        z = pm.Normal("z", 0.0, 1.0, shape=(S, len(IIV)))
        eta = z * om
        for j, k in enumerate(IIV):
            pm.Deterministic(f"omega_{k}", om[j])
        sigma = pm.HalfNormal("sigma_prop_CP", 0.5)
        preds = []
        for i in range(S):
            p = pt.stack([th["CL"] * pt.exp(eta[i, 0]), th["V2"] * pt.exp(eta[i, 1]), th["Q"],
                          th["V3"], th["KA"] * pt.exp(eta[i, 2])])
            if method == "superposition":
                central = pt.dot(A, ops[0](y0=y_dose, theta=p)[:, 1])
            else:
                y0, segs = y_dose, []
                for op in ops:
                    y = op(y0=y0, theta=p)
                    segs.append(y)
                    y0 = y[-1] + y_dose
                central = pt.stack([segs[k][j, 1] for k, j in pick])
            preds.append(central / p[1])
        f = pt.stack(preds)
        pm.Normal("obs_CP", mu=f, sigma=sigma * pt.abs(f) + 1e-12, observed=dv)
    initial = {**{f"log_{k}": math.log(m.parameters[k].value) for k in THETA},
               "omega": np.array([math.sqrt(m.parameters[k].omega2) for k in IIV]),
               "z": np.zeros((S, len(IIV))), "sigma_prop_CP": 0.2}
    return pmm, initial


def jittered(initial: dict, chains: int, seed: int) -> list[dict]:
    """Per-chain starts as ``pkpd.fitting`` makes them for PyMC: ±0.1 on the unconstrained
    scale (multiplicative for the positive ω and σ)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(chains):
        d = {}
        for k, v in initial.items():
            u = rng.uniform(-JITTER, JITTER, np.shape(v))
            d[k] = np.asarray(v) * np.exp(u) if k.startswith(("omega", "sigma")) else v + u
        out.append(d)
    return out


def logp_grad(pm_model):
    """logp and gradient of a PyMC model (its default C backend) at a point given on the
    constrained scale by random variable name."""
    from pymc.blocking import DictToArrayBijection

    fn = pm_model.logp_dlogp_function(ravel_inputs=True)
    fn.set_extra_values({})

    def at(point: dict) -> tuple[float, np.ndarray]:
        x = {}
        for v in pm_model.value_vars:
            rv = pm_model.values_to_rvs[v]
            val = np.asarray(point[rv.name], float)
            x[v.name] = np.log(val) if pm_model.rvs_to_transforms.get(rv) is not None else val
        lp, g = fn(DictToArrayBijection.map(x).data)
        return float(lp), np.asarray(g)

    return at


def equivalence(ours_pmm, ode_pmm, idata, n_points: int, reps: int) -> dict:
    """Both models' logp and gradient at ``n_points`` posterior draws of our fit (the same
    function of the same parameters up to the ODE solver's tolerance), and the cost of one
    logp + gradient evaluation of each in this process."""
    assert [v.name for v in ours_pmm.value_vars] == [v.name for v in ode_pmm.value_vars]
    post = idata.posterior.stack(sample=("chain", "draw"))
    names = [ours_pmm.values_to_rvs[v].name for v in ours_pmm.value_vars]
    picks = np.linspace(0, post.sizes["sample"] - 1, n_points).astype(int)
    points = [{k: post[k].isel(sample=i).values for k in names} for i in picks]
    f_ours, f_ode = logp_grad(ours_pmm), logp_grad(ode_pmm)
    dlp, dg, cost = [], [], {}
    for point in points:
        (a, ga), (b, gb) = f_ours(point), f_ode(point)
        dlp.append(abs(a - b) / abs(a))
        dg.append(float(np.max(np.abs(ga - gb)) / np.max(np.abs(ga))))
    for label, f, n in (("ours", f_ours, 20 * reps), ("pymc_ode", f_ode, reps)):
        t = time.perf_counter()
        for k in range(n):
            f(points[k % len(points)])
        cost[label] = (time.perf_counter() - t) / n
    return {"points": n_points, "max_rel_diff_logp": float(max(dlp)),
            "max_rel_diff_gradient": float(max(dg)),
            "logp_grad_seconds": {k: round(v, 6) for k, v in cost.items()}}


# --------------------------------------------------------------------------- metrics


def summarise(idata, wall: dict[str, float]) -> dict:
    import arviz as az

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ess = az.ess(idata, var_names=POP, method="bulk")
        rhat = az.rhat(idata, var_names=POP)
    ess_v = {k: float(ess[k]) for k in POP}
    worst = min(ess_v, key=ess_v.get)
    total = sum(wall.values())
    ss = idata.sample_stats
    steps = "n_steps" if "n_steps" in ss else "tree_size" if "tree_size" in ss else None
    post = idata.posterior
    return {"wall_s": {k: round(v, 1) for k, v in wall.items()}, "total_s": round(total, 1),
            "min_ess_bulk": round(ess_v[worst], 1), "min_ess_param": worst,
            "ess_per_s": sig(ess_v[worst] / total),
            "ess_per_s_sampling_only": sig(ess_v[worst] / wall["sampling"])
            if "sampling" in wall else None,
            "ess_bulk": {k: round(v, 1) for k, v in ess_v.items()},
            "max_r_hat": round(max(float(rhat[k]) for k in POP), 3),
            "divergences": int(ss["diverging"].values.sum()) if "diverging" in ss else 0,
            "mean_leapfrog_steps": round(float(ss[steps].mean()), 1) if steps else None,
            "median": {k: float(post[k].median()) for k in POP},
            "sd": {k: float(post[k].std()) for k in POP}}


def agreement(a: dict, b: dict) -> dict:
    """|median_a - median_b| in pooled posterior SDs, per population parameter."""
    return {k: round(abs(a["median"][k] - b["median"][k])
                     / math.sqrt((a["sd"][k] ** 2 + b["sd"][k] ** 2) / 2), 2) for k in POP}


# --------------------------------------------------------------------------- runs


def run_ours_nutpie(sub, s: Sampler) -> tuple[dict, object, object]:
    model = load_model("pk_2cmt_oral").with_values(KA=2.0)
    t0 = time.perf_counter()
    b = build(model, sub, [Endpoint("CP")], centred=False)
    t1 = time.perf_counter()
    compiled = compile_nutpie(b, seed=s.seed)
    t2 = time.perf_counter()
    stage(f"ours/nutpie: built in {t1 - t0:.1f} s, compiled in {t2 - t1:.1f} s; sampling")
    idata = sample_nutpie(compiled, s)
    t3 = time.perf_counter()
    out = summarise(idata, {"build": t1 - t0, "compile": t2 - t1, "sampling": t3 - t2})
    out.update(chains=s.chains, tune=s.tune, draws=s.draws)
    stage(f"ours/nutpie done: {out['total_s']} s")
    return out, b.pm_model, idata


def ours_model(sub) -> tuple[object, dict]:
    """The toolkit's PyMC model (closed-form likelihood) and its start values."""
    b = build(load_model("pk_2cmt_oral").with_values(KA=2.0), sub, [Endpoint("CP")],
              centred=False)
    return b.pm_model, b.initial


def run_pymc_nuts(label: str, make, s: Sampler, depth: tuple[int, int]
                  ) -> tuple[dict, object]:
    """Build a model with ``make()`` and sample it with PyMC's NUTS as ``pkpd.fit(...,
    engine="pymc")`` does (adapt_diag, jittered starts at the file's values). Both PyMC runs go
    through here: ours and pymc.ode get the same sampler, seed and starting points."""
    import pymc as pm

    t0 = time.perf_counter()
    pmm, initial = make()
    t1 = time.perf_counter()
    stage(f"{label}: model built in {t1 - t0:.1f} s; compiling and sampling (PyMC NUTS, "
          f"{s.chains} × ({s.tune} + {s.draws}))")
    with pmm, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        idata = pm.sample(draws=s.draws, tune=s.tune, chains=s.chains, cores=s.cores,
                          random_seed=s.seed, target_accept=s.target_accept,
                          max_treedepth=depth[0], early_max_treedepth=depth[1],
                          init="adapt_diag", initvals=jittered(initial, s.chains, s.seed),
                          progressbar=False, discard_tuned_samples=False,
                          compute_convergence_checks=False)
    t2 = time.perf_counter()
    sampling = float(idata.posterior.attrs.get("sampling_time", t2 - t1))
    wall = {"build": t1 - t0, "compile_init": t2 - t1 - sampling, "sampling": sampling}
    out = summarise(idata, wall)
    n_grad = int(idata.warmup_sample_stats["n_steps"].values.sum()
                 + idata.sample_stats["n_steps"].values.sum())
    out.update(chains=s.chains, tune=s.tune, draws=s.draws, gradient_evaluations=n_grad,
               sampling_s_per_gradient_per_chain=round(
                   sampling * min(s.chains, s.cores or 1) / n_grad, 5))
    stage(f"{label} done: {out['total_s']} s, {n_grad} gradient evaluations")
    return out, pmm


def projection(ours_pymc: dict, ode: dict, chains: int, cores: int) -> dict:
    """pymc.ode at ours/PyMC NUTS's settings: the same sampler on the same posterior from the
    same starts needs the same number of gradients and gives the same ESS (in distribution);
    only the cost of a gradient differs, measured in pymc.ode's own (shorter) run."""
    sampling = (ours_pymc["gradient_evaluations"] / min(chains, cores)
                * ode["sampling_s_per_gradient_per_chain"])
    fixed = ode["wall_s"]["build"] + ode["wall_s"]["compile_init"]
    total = fixed + sampling
    return {"chains": chains, "tune": ours_pymc["tune"], "draws": ours_pymc["draws"],
            "wall_s": {"build_compile_init": round(fixed, 1), "sampling": round(sampling, 1)},
            "total_s": round(total, 1), "min_ess_bulk": ours_pymc["min_ess_bulk"],
            "min_ess_param": ours_pymc["min_ess_param"],
            "ess_per_s": sig(ours_pymc["min_ess_bulk"] / total),
            "gradient_evaluations": ours_pymc["gradient_evaluations"],
            "divergences": None, "mean_leapfrog_steps": ours_pymc["mean_leapfrog_steps"],
            "max_r_hat": None}


def run_context() -> dict:
    """Benchmark (a) as bench_fit.py runs it (N = 100, centred, 4 × (1000 + 1000), nutpie)."""
    df = dataset(100)
    model = load_model("pk_2cmt_oral").with_values(KA=2.0)
    t0 = time.perf_counter()
    res = fit(model, df, [Endpoint("CP")], chains=4, draws=1000, tune=1000, seed=1,
              centred=True, progress=False, posterior_predictive=False)
    return summarise(res.idata, {"build_compile_sampling": time.perf_counter() - t0})


def write_json(out: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".bench_pymc_ode.", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(out, fh, indent=2)
        fh.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--chains", type=int, default=2)
    ap.add_argument("--tune", type=int, default=200, help="ours (both samplers)")
    ap.add_argument("--draws", type=int, default=200, help="ours (both samplers)")
    ap.add_argument("--ode-tune", type=int, default=30, help="pymc.ode")
    ap.add_argument("--ode-draws", type=int, default=30, help="pymc.ode")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--target-accept", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ode-method", default="superposition",
                    choices=["superposition", "restart"])
    ap.add_argument("--no-ours-pymc", action="store_true",
                    help="skip ours with PyMC's NUTS (and the projection)")
    ap.add_argument("--context", action="store_true",
                    help="also run benchmark (a) itself (N = 100, ~1.5 min)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 2 subjects, ours 2 × (10 + 10), pymc.ode 2 × (5 + 5) "
                    "with tree depth ≤ 4, no ours/PyMC NUTS run")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    depth = (10, 8)  # PyMC's defaults: max_treedepth, early_max_treedepth (first 200 tuning)
    if args.quick:
        args.subjects, args.tune, args.draws, args.ode_tune, args.ode_draws = 2, 10, 10, 5, 5
        args.no_ours_pymc, args.context, depth = True, False, (4, 4)
    s = Sampler(args.chains, args.draws, args.tune, seed=args.seed,
                target_accept=args.target_accept, cores=args.cores, progress=False)
    s_ode = dataclasses.replace(s, tune=args.ode_tune, draws=args.ode_draws)
    load = {"start": loadavg()}
    stage(f"load average {load['start']}; {os.cpu_count()} cores")
    df = dataset(100)
    sub = df[df["ID"] <= args.subjects].reset_index(drop=True)
    n_obs = int((sub["EVID"] == 0).sum())
    stage(f"subset: {args.subjects} subjects of bench_fit.dataset(100), {n_obs} observations")
    runs: dict[str, dict] = {}

    stage(f"ours (closed form), nutpie, {s.chains} × ({s.tune} + {s.draws}): build + compile")
    runs["ours_nutpie"], ours_pmm, idata_ours = run_ours_nutpie(sub, s)
    if not args.no_ours_pymc:
        runs["ours_pymc_nuts"], _ = run_pymc_nuts("ours/PyMC NUTS", lambda: ours_model(sub), s,
                                                  depth)
    load["before_ode"] = loadavg()
    runs["pymc_ode"], ode_pmm = run_pymc_nuts(f"pymc.ode ({args.ode_method})",
                                              lambda: ode_model(sub, args.ode_method), s_ode,
                                              depth)
    load["after_ode"] = loadavg()
    if "ours_pymc_nuts" in runs:
        runs["pymc_ode_projected"] = projection(runs["ours_pymc_nuts"], runs["pymc_ode"],
                                                s.chains, s.cores)
    if args.context:
        stage("context: benchmark (a), N = 100, centred, 4 × (1000 + 1000), nutpie")
        runs["context_bench_fit_a_N100"] = run_context()
        stage(f"context done: {runs['context_bench_fit_a_N100']['total_s']} s")

    stage("equivalence: logp and gradient of both models at posterior draws; their cost")
    equiv = equivalence(ours_pmm, ode_pmm, idata_ours, 3 if args.quick else 20,
                        3 if args.quick else 10)
    load["end"] = loadavg()

    ours = runs["ours_nutpie"]["ess_per_s"]
    ratios = {"ours_nutpie_over_pymc_ode_measured": ours / runs["pymc_ode"]["ess_per_s"]}
    if "pymc_ode_projected" in runs:
        proj = runs["pymc_ode_projected"]["ess_per_s"]
        ratios["ours_nutpie_over_pymc_ode_projected"] = ours / proj
        ratios["ours_pymc_nuts_over_pymc_ode_projected"] = (
            runs["ours_pymc_nuts"]["ess_per_s"] / proj)
    ratios = {k: round(v, 1) for k, v in ratios.items()}
    agree = agreement(runs["ours_nutpie"], runs["pymc_ode"])

    print()
    print(f"{'run':<26}{'chains×(tune+draws)':>20}{'build+compile':>14}{'sampling':>10}"
          f"{'total':>9}{'min ESS':>9}{'(param)':>15}{'ESS/s':>9}{'div':>5}{'steps':>7}"
          f"{'R-hat':>7}")
    for name, r in runs.items():
        smp = r["wall_s"].get("sampling", float("nan"))
        cfg = f"{r.get('chains', s.chains)}×({r.get('tune', s.tune)}+{r.get('draws', s.draws)})"
        if name.startswith("context"):
            cfg = "4×(1000+1000)"
        div = "" if r["divergences"] is None else r["divergences"]
        rh = "" if r["max_r_hat"] is None else f"{r['max_r_hat']:.3f}"
        print(f"{name:<26}{cfg:>20}{r['total_s'] - smp:>13.1f}s{smp:>9.1f}s"
              f"{r['total_s']:>8.1f}s{r['min_ess_bulk']:>9.0f}{r['min_ess_param']:>15}"
              f"{r['ess_per_s']:>9.3g}{div:>5}{r['mean_leapfrog_steps'] or float('nan'):>7.1f}"
              f"{rh:>7}")
    c = equiv["logp_grad_seconds"]
    print(f"\nlogp + gradient (PyMC C backend, this process): ours {1e3 * c['ours']:.3g} ms, "
          f"pymc.ode {1e3 * c['pymc_ode']:.3g} ms; in pymc.ode's sampling run "
          f"{1e3 * runs['pymc_ode']['sampling_s_per_gradient_per_chain']:.3g} ms per chain")
    print(f"same function: max relative difference over {equiv['points']} posterior draws: "
          f"logp {equiv['max_rel_diff_logp']:.1e}, gradient {equiv['max_rel_diff_gradient']:.1e}")
    for k, v in ratios.items():
        print(f"ESS/s ratio {k}: {v:g}×" + ("" if "pymc_nuts" in k else
                                            f" (target ≥ 50×: {'met' if v >= 50 else 'NOT met'})"))
    if args.quick:
        print("(--quick: a smoke test of the script; its ESS and ratios mean nothing)")
    print("\nposterior agreement, |median ours/nutpie - median pymc.ode| / pooled SD:")
    print(f"{'param':<15}{'ours':>10}{'pymc.ode':>10}{'SD ours':>10}{'SD ode':>10}{'dist':>7}")
    for k in POP:
        a, o = runs["ours_nutpie"], runs["pymc_ode"]
        print(f"{k:<15}{a['median'][k]:>10.4g}{o['median'][k]:>10.4g}{a['sd'][k]:>10.3g}"
              f"{o['sd'][k]:>10.3g}{agree[k]:>7.2f}")
    ok = max(agree.values()) < 3
    print(f"agreement: {'OK' if ok else 'CHECK'} (max {max(agree.values()):.2f} pooled SD, "
          "threshold 3)")
    stage(f"load average at the end {load['end']}")

    import nutpie
    import pymc
    import scipy

    out = {"subjects": args.subjects, "observations": n_obs, "cores": s.cores,
           "seed": s.seed, "target_accept": s.target_accept,
           "pymc_max_treedepth": depth[0], "pymc_early_max_treedepth": depth[1],
           "ode_method": args.ode_method, "quick": args.quick,
           "population_parameters": POP, "runs": runs, "equivalence": equiv,
           "ess_per_s_ratios": ratios, "target_ratio": 50,
           "target_met_measured": ratios["ours_nutpie_over_pymc_ode_measured"] >= 50,
           "agreement_pooled_sd": agree, "agreement_ok": ok, "loadavg": load,
           "versions": {"python": platform.python_version(), "pymc": pymc.__version__,
                        "nutpie": nutpie.__version__, "scipy": scipy.__version__,
                        "numpy": np.__version__},
           "date": time.strftime("%Y-%m-%d %H:%M")}
    write_json(out, args.out)
    stage(f"wrote {args.out}")


if __name__ == "__main__":
    main()
