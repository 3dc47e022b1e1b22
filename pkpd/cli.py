"""Command line: ``pkpd simulate``, ``pkpd nca``, ``pkpd trial``, ``pkpd fit``, ``pkpd models``.

Every error is one line on stderr (``pkpd: error: ...``) with exit status 2, and no output
file is written (results go to a temporary file that is renamed when complete).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ._io import atomic_path, atomic_write_csv

__all__ = ["main"]


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except (CliError, ValueError, OSError) as exc:  # model, dataset, regimen errors too
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"pkpd: error: {msg}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pkpd", description="Pharmacometrics toolkit.")
    sub = p.add_subparsers(dest="command")

    s = sub.add_parser("simulate", help="simulate a model on a NONMEM data set or a regimen",
                       description="Simulate MODEL (a path or a name under models/) on a "
                       "NONMEM-format data set (--data) or on a regimen (--regimen, --times).")
    s.add_argument("model", help="model file or shipped model name (see `pkpd models`)")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="NONMEM-format CSV; one output row per record, in order")
    src.add_argument("--regimen", help='e.g. "80 mg BIW for 4 weeks", "100 mg QW", "none"')
    s.add_argument("--times", help="output times in h for --regimen: START:STOP:STEP "
                   "(inclusive) or a comma list")
    s.add_argument("--n", type=int, default=1, help="number of subjects for --regimen "
                   "(IIV on when > 1)")
    s.add_argument("--out", required=True, help="output CSV")
    s.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="typical value of a parameter (or, with --regimen, a covariate value)")
    s.add_argument("--iiv", action="store_true", help="draw between-subject variability")
    s.add_argument("--seed", type=int, default=None, help="random seed for IIV")
    s.add_argument("--method", default="auto", choices=["auto", "closed-form", "expm", "ode"],
                   help="solver (auto: closed form or matrix exponential for linear models, "
                   "solve_ivp otherwise)")
    s.add_argument("--plot", help="PNG/SVG of population percentiles (with --regimen)")
    s.set_defaults(run=_simulate)

    n = sub.add_parser("nca", help="non-compartmental analysis of a data set or simulation",
                       description="NCA per subject: Cmax, Tmax, AUClast, AUCinf, λz, t½.")
    n.add_argument("data", help="NONMEM-format CSV or `pkpd simulate` output")
    n.add_argument("--conc", help="concentration column (default: CP if present, else DV)")
    n.add_argument("--auc-method", default="linear-up/log-down",
                   choices=["linear-up/log-down", "linear"])
    n.add_argument("--conc-unit", default="", help="unit label for concentrations, e.g. ng/mL")
    n.add_argument("--time-unit", default="h", help="unit label for time")
    n.add_argument("--out", help="also write the table as CSV")
    n.set_defaults(run=_nca)

    t = sub.add_parser("trial", help="simulate a virtual SMM trial of a selinexor regimen",
                       description="Simulate SMM patients on a regimen with the label's dose "
                       "modification; write patients.csv, summary.csv and figures to --out.")
    t.add_argument("--regimen", required=True, help='e.g. "40 mg QW", "80 mg BIW", "none"')
    t.add_argument("--risk", default="intermediate,high",
                   help="risk groups, comma-separated (low, intermediate, high)")
    t.add_argument("--n", type=int, default=2000, help="number of patients")
    t.add_argument("--years", type=float, default=2.0, help="follow-up in years")
    t.add_argument("--seed", type=int, default=1)
    t.add_argument("--population", default="smm", choices=["smm", "rrmm"],
                   help="platelet baseline: smoldering (normal) or relapsed/refractory MM")
    t.add_argument("--engine", default="periodic", choices=["periodic", "ode"],
                   help="periodic: weekly maps per dose level (default, fast); ode: the "
                   "error-controlled Dormand-Prince reference")
    t.add_argument("--out", required=True, help="output directory")
    t.set_defaults(run=_trial)

    c = sub.add_parser("compare", help="compare selinexor regimens over parameter draws",
                       description="Simulate the virtual SMM trial under each regimen for "
                       "parameter draws from the model files' assumption ranges (--prior) or "
                       "a fit's posterior (--fit DIR); write endpoints.csv, decision.csv, "
                       "sensitivity.csv, figures and report.html to --out.")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--prior", action="store_true", help="draw the assumption parameters "
                     "from their stated ranges (log-uniform; uniform when lower = 0)")
    src.add_argument("--fit", metavar="DIR", action="append", help="fit folder with "
                     "posterior.nc: typical values of the parameters it holds (repeat for the "
                     "PK and PD fits of a sequential analysis); the other assumptions are "
                     "drawn from their ranges unless --fit-only")
    c.add_argument("--fit-only", action="store_true", help="with --fit: keep parameters not "
                   "in the posterior at their values")
    c.add_argument("--regimen", action="append", default=None,
                   help='repeatable, e.g. "40 mg QW" (default: 40, 60 and 100 mg QW; '
                   'observation "none" is always added)')
    c.add_argument("--standard", help='standard dose (default "100 mg QW" if given, else the '
                   "highest weekly dose)")
    c.add_argument("--risk", default="intermediate,high",
                   help="risk groups, comma-separated (low, intermediate, high)")
    c.add_argument("--n", type=int, default=200, help="patients per draw and regimen")
    c.add_argument("--draws", type=int, default=50, help="parameter draws")
    c.add_argument("--years", type=float, default=2.0, help="follow-up in years")
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--margin-progression", type=float, default=5.0,
                   help="non-inferiority margin on 2-y progression, percentage points")
    c.add_argument("--margin-ae", type=float, default=10.0,
                   help="required reduction of any grade >= 3 AE, percentage points")
    c.add_argument("--threshold", type=float, default=0.8,
                   help="probability each decision metric must reach")
    c.add_argument("--scheduler", default="local", metavar="ADDRESS",
                   help="Dask scheduler address; 'local' (default) starts a 2-worker local "
                   "cluster, 'serial' runs in this process")
    c.add_argument("--no-sensitivity", action="store_true", help="skip the tornado analysis")
    c.add_argument("--sensitivity-params", metavar="NAME,...",
                   help="assumptions to vary (default: every assumption with a range)")
    c.add_argument("--sensitivity-n", type=int, default=None,
                   help="patients per draw in the sensitivity runs (default min(n, 20))")
    c.add_argument("--sensitivity-draws", type=int, default=None,
                   help="draws in the sensitivity runs (default min(draws, 10))")
    c.set_defaults(run=_compare)

    o = sub.add_parser("oc", help="operating characteristics of a popPK design by replicate "
                       "fits", description="Simulate --replicates data sets of a population-PK "
                       "design from the true parameters, fit each (nutpie, one core per fit) "
                       "and write OUT/operating.csv (per replicate and parameter: truth, "
                       "median, CrI, coverage, bias, diagnostics) and OUT/operating_summary.csv"
                       " (coverage, bias, RMSE, precision, sampling problems).")
    o.add_argument("--replicates", type=int, default=20, help="simulated trials (default 20)")
    o.add_argument("--n", type=int, default=30, help="patients per trial (default 30)")
    o.add_argument("--seed", type=int, default=1, help="seed of the replicates (η, ε, NUTS)")
    o.add_argument("--out", required=True, help="output directory")
    o.add_argument("--scheduler", default="local", metavar="ADDRESS",
                   help="Dask scheduler address; 'local' (default) starts a local cluster of "
                   "--workers processes, 'serial' runs in this process")
    o.add_argument("--workers", type=int, default=2, help="workers of the local cluster")
    o.add_argument("--model", default="selinexor_pk", help="linear model (default selinexor_pk)")
    o.add_argument("--regimen", default="80 mg BIW for 4 weeks", help="dosing regimen")
    o.add_argument("--times", default="0.5|1,2|3,4|6,24,47.9,505|506|508",
                   help="sampling times in h after the first dose, comma-separated; "
                   "alternatives separated by | (each patient gets one, drawn once)")
    o.add_argument("--design-seed", type=int, default=1,
                   help="seed of the patients' covariates and sampling alternatives")
    o.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="true typical value differing from the model file (fit priors stay "
                   "centred on the file)")
    o.add_argument("--error", default="proportional",
                   choices=["proportional", "additive", "lognormal"], help="residual error")
    o.add_argument("--sigma", type=float, default=0.2, help="true residual SD (default 0.2)")
    o.add_argument("--chains", type=int, default=2, help="chains per fit (default 2)")
    o.add_argument("--draws", type=int, default=500, help="draws per chain (default 500)")
    o.add_argument("--tune", type=int, default=500, help="tuning steps per chain (default 500)")
    o.add_argument("--level", type=float, default=0.9, help="credible level (default 0.9)")
    o.add_argument("--decision", metavar="NAME<VALUE",
                   help="also P(NAME < VALUE) (or >) per fit, e.g. 'SEX_CL<0.95'")
    o.add_argument("--decision-prob", type=float, default=0.9,
                   help="probability the decision needs (default 0.9)")
    o.set_defaults(run=_oc)

    m = sub.add_parser("models", help="list the shipped models")
    m.set_defaults(run=_models)

    d = sub.add_parser("demo", help="the whole analysis on a small example: simulate an SMM "
                       "trial, fit, compare 40/60/100 mg QW, write the report")
    d.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    d.add_argument("--n", type=int, default=30, help="patients in the simulated data set")
    d.add_argument("--draws", type=int, default=100, help="parameter draws in the comparison")
    d.add_argument("--patients", type=int, default=100,
                   help="virtual patients per draw and regimen")
    d.add_argument("--fit-draws", type=int, default=800,
                   help="draws (and tuning steps) per chain of the PK fit, 2 chains")
    d.add_argument("--pd-draws", type=int, default=300,
                   help="draws (and tuning steps) per chain of the M-spike fit, 2 chains")
    d.add_argument("--seed", type=int, default=1)
    d.set_defaults(run=_demo)

    f = sub.add_parser("fit", help="hierarchical Bayesian population fit from a spec (TOML)",
                       description="Fit the spec's model to its data with NUTS (nutpie) and "
                       "write fits/<name>/: posterior.nc, summary.csv, diagnostics.json, "
                       "predictions.csv and GOF/VPC/individual/trace plots.")
    f.add_argument("spec", help="fit spec (TOML; format in pkpd.fitting.load_spec)")
    f.add_argument("--out", help="results folder (default: <spec folder>/<name>/)")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    f.set_defaults(run=_fit)
    return p


def _settings(pairs: Sequence[str]) -> dict[str, float]:
    out = {}
    for item in pairs:
        name, sep, value = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise CliError(f"--set {item!r}: expected NAME=NUMBER") from None
    return out


def _times(text: str | None) -> np.ndarray:
    if not text:
        raise CliError("--regimen needs --times START:STOP:STEP (h)")
    try:
        if ":" in text:
            a, b, step = (float(v) for v in text.split(":"))
            if step <= 0 or b < a:
                raise ValueError
            t = np.arange(a, b + step * 0.5, step)
        else:
            t = np.array([float(v) for v in text.split(",")])
    except ValueError:
        raise CliError(f"--times {text!r}: expected START:STOP:STEP with STEP > 0 and "
                       "STOP >= START, or a comma-separated list of times") from None
    if len(t) == 0 or np.any(t < 0) or np.any(np.diff(t) < 0):
        raise CliError(f"--times {text!r}: expected sorted times >= 0")
    return t


def _simulate(args: argparse.Namespace) -> int:
    from .dataset import read_nonmem
    from .model import load_model
    from .simulation import simulate, simulate_regimen

    model = load_model(args.model)
    settings = _settings(args.set)
    params = {k: v for k, v in settings.items() if k in model.parameters}
    covs = {k.upper(): v for k, v in settings.items() if k not in model.parameters}
    unknown = [k for k in covs if k not in model.covariates or args.data]
    if unknown:
        raise CliError(f"--set {unknown[0]}: {model.name} has no parameter of that name "
                       f"(parameters: {', '.join(model.parameters)})")
    out = Path(args.out)
    _ensure_parent(out)
    if args.plot:
        _ensure_parent(Path(args.plot))
    started = time.perf_counter()
    if args.data:
        if args.plot:
            raise CliError("--plot is for --regimen simulations")
        ds = read_nonmem(args.data)
        table = simulate(model, ds, params=params, iiv=args.iiv, seed=args.seed,
                         method=args.method)
    else:
        if args.n < 1:
            raise CliError(f"--n must be >= 1, got {args.n}")
        times = _times(args.times)
        iiv = args.iiv or args.n > 1
        res = simulate_regimen(model, args.regimen, times, n=args.n, iiv=iiv, seed=args.seed,
                               covariates=covs, params=params, method=args.method)
        table = pd.DataFrame({"ID": np.repeat(np.arange(1, args.n + 1), len(times)),
                              "TIME": np.tile(times, args.n)})
        for name, values in res.items():
            table[name] = np.asarray(values).reshape(-1)
    atomic_write_csv(table, out)
    if args.plot:
        _plot(model, res, times, args.regimen, args.n, Path(args.plot))
    print(f"pkpd: wrote {out} ({len(table)} rows, {model.name}, "
          f"{time.perf_counter() - started:.2f} s)", file=sys.stderr)
    return 0


def _bands(ax, t: np.ndarray, y: np.ndarray) -> None:
    """Median with 25–75th and 5–95th percentile bands across subjects (rows of y)."""
    lo, q1, med, q3, hi = np.percentile(y, [5, 25, 50, 75, 95], axis=0)
    ax.fill_between(t, lo, hi, alpha=0.2, color="C0", label="5th–95th percentile")
    ax.fill_between(t, q1, q3, alpha=0.35, color="C0", label="25th–75th percentile")
    ax.plot(t, med, color="C0", lw=1.5, label="median")


def _ensure_parent(path: Path) -> None:
    """Create the output's folder (like `mkdir -p`); a clear error if that is impossible."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror} ({path.parent})") from None


def _plot(model, res: dict[str, np.ndarray], times: np.ndarray, regimen: str, n: int,
          path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res)
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 3.2 * len(names)), squeeze=False)
    days = times[-1] > 96
    t = times / 24 if days else times
    for ax, name in zip(axes[:, 0], names, strict=True):
        y = np.asarray(res[name])
        unit = model.outputs[name].unit
        if n > 1:
            _bands(ax, t, y)
            ax.legend(loc="upper right", fontsize=8, frameon=False)
        else:
            ax.plot(t, y[0], color="C0", lw=1.5)
        ax.set_ylabel(f"{name} ({unit})" if unit else name)
        ax.set_xlabel("Time (days)" if days else f"Time ({model.time_unit})")
        ax.grid(alpha=0.3)
    who = f"{n} simulated subjects" if n > 1 else "typical subject"
    axes[0, 0].set_title(f"{model.name}: {regimen} ({who})")
    fig.tight_layout()
    suffix = path.suffix.lower().lstrip(".") or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=suffix, dpi=120)
    plt.close(fig)


def _nca(args: argparse.Namespace) -> int:
    from .dataset import read_nonmem
    from .nca import format_table, nca

    ds = read_nonmem(args.data)
    df = ds.data
    conc = (args.conc or ("CP" if "CP" in df.columns else "DV")).upper()
    if conc not in df.columns:
        raise CliError(f"{args.data}: expected a concentration column {conc}, got columns "
                       f"{', '.join(df.columns)}")
    table = nca(df, conc=conc, auc_method=args.auc_method)
    units = {"time": args.time_unit}
    if args.conc_unit:
        units["conc"] = args.conc_unit
    print(format_table(table, units=units))
    if args.out:
        atomic_write_csv(table, args.out)
    return 0


def _trial(args: argparse.Namespace) -> int:
    import os
    import shutil
    import tempfile

    from .population import PopulationError, parse_risk_groups
    from .trial import dose_ladder, run_trial

    if args.n < 1:
        raise CliError(f"--n must be >= 1, got {args.n}")
    try:
        parse_risk_groups(args.risk)
    except PopulationError as exc:
        raise CliError(f"--risk: {exc}") from None
    dose_ladder(args.regimen)  # a bad regimen fails here, before any work
    out = Path(args.out)
    parent = _writable_folder(out)
    started = time.perf_counter()

    def progress(week: int, total: int) -> None:
        if week % 13 == 0 or week == total:
            print(f"pkpd trial: week {week}/{total} ({time.perf_counter() - started:.0f} s)",
                  file=sys.stderr)

    res = run_trial(args.regimen, risk=args.risk, n=args.n, years=args.years, seed=args.seed,
                    population=args.population, progress=progress, engine=args.engine)
    tmp = Path(tempfile.mkdtemp(prefix=".pkpd-trial-", dir=parent))
    try:
        res.patients.to_csv(tmp / "patients.csv", index=False)
        res.summary.to_csv(tmp / "summary.csv", index=False)
        _trial_plots(res, args.regimen, tmp)
        out.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"pkpd: wrote {out}/patients.csv, summary.csv and figures ({args.n} patients, "
          f"{time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return 0


def _trial_plots(res, regimen: str, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .endpoints import kaplan_meier

    p = res.patients
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, group in enumerate(["all", "low", "intermediate", "high"]):
        d = p if group == "all" else p[p["RISK"] == group]
        if len(d) == 0 or (group != "all" and d["RISK"].nunique() == p["RISK"].nunique()):
            continue
        km = kaplan_meier(d["TTP_DAYS"].to_numpy() / 30.44, d["PROGRESSED"].to_numpy())
        ax.step(km["TIME"], 1 - km["SURVIVAL"], where="post", color=f"C{i}",
                label=f"{group} (n = {len(d)})")
        ax.fill_between(km["TIME"], 1 - km["UPPER"], 1 - km["LOWER"], step="post",
                        color=f"C{i}", alpha=0.15)
    ax.set_xlabel("Time (months)")
    ax.set_ylabel("Cumulative progression to myeloma")
    ax.set_title(f"Progression, {regimen}")
    ax.set_ylim(0, 1)
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "km_progression.png", dpi=120)
    plt.close(fig)
    weeks = res.weeks / WEEK_H
    for name, values, unit, fname in (("M-spike", res.mspike, "g/dL", "mspike_bands.png"),
                                      ("Platelets (weekly minimum)", res.platelets, "10⁹/L",
                                       "platelets_bands.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        _bands(ax, weeks, values)
        ax.set_xlabel("Time (weeks)")
        ax.set_ylabel(f"{name} ({unit})")
        ax.set_title(f"{name}, {regimen} ({len(values)} patients)")
        ax.legend(frameon=False)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / fname, dpi=120)
        plt.close(fig)


WEEK_H = 168.0


def _compare(args: argparse.Namespace) -> int:
    import os
    import shutil
    import tempfile

    from .compare import compare
    from .parallel import progress_bar
    from .population import PopulationError, parse_risk_groups
    from .report import write_report
    from .trial import dose_ladder

    for name in ("n", "draws"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("sensitivity_n", "sensitivity_draws"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise CliError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if not 0 <= args.margin_progression <= 100 or not 0 <= args.margin_ae <= 100:
        raise CliError("--margin-progression and --margin-ae are percentage points in [0, 100]")
    if not 0 < args.threshold <= 1:
        raise CliError(f"--threshold must be a probability in (0, 1], got {args.threshold}")
    try:
        parse_risk_groups(args.risk)
    except PopulationError as exc:
        raise CliError(f"--risk: {exc}") from None
    regimens = args.regimen or ["40 mg QW", "60 mg QW", "100 mg QW"]
    for r in regimens + ([args.standard] if args.standard else []):
        try:
            dose_ladder(r)
        except ValueError as exc:
            raise CliError(f"--regimen: {exc}") from None
    for d in args.fit or []:
        if not (Path(d) / "posterior.nc").is_file():
            raise CliError(f"--fit {d}: no such fit directory with posterior.nc")
    out = Path(args.out)
    parent = _writable_folder(out)
    started = time.perf_counter()
    bars: dict = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            bars[stage] = progress_bar(f"pkpd compare: {stage:<11}", "blocks", started=started)
        bars[stage](done, total)

    scheduler = None if args.scheduler == "serial" else args.scheduler
    sensitivity: bool | list[str] = not args.no_sensitivity
    if sensitivity and args.sensitivity_params:
        sensitivity = [k.strip() for k in args.sensitivity_params.split(",") if k.strip()]
    res = compare(regimens, source=args.fit or "prior", risk=args.risk, n=args.n,
                  draws=args.draws, years=args.years, seed=args.seed, standard=args.standard,
                  margin_progression=args.margin_progression / 100,
                  margin_ae=args.margin_ae / 100, threshold=args.threshold,
                  prior_rest=not args.fit_only,
                  sensitivity=sensitivity, sensitivity_n=args.sensitivity_n,
                  sensitivity_draws=args.sensitivity_draws, scheduler=scheduler,
                  progress=progress)
    tmp = Path(tempfile.mkdtemp(prefix=".pkpd-compare-", dir=parent))
    try:
        write_report(res, tmp)
        if out.exists():  # file by file, report.html last (other files in OUT are kept)
            for f in sorted(tmp.iterdir(), key=lambda f: f.name == "report.html"):
                os.replace(f, out / f.name)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for r in res.decision.itertuples():
        print(f"pkpd compare: {r.LOW_DOSE} vs {r.STANDARD}: P(progression within "
              f"{args.margin_progression:g} pts) = {r.P_PROGRESSION_NONINFERIOR:.2f}, "
              f"P(AE lower by {args.margin_ae:g} pts) = {r.P_AE_LOWER:.2f}, P(benefit vs "
              f"observation) = {r.P_BENEFIT_VS_OBSERVATION:.2f}: {r.DECISION}",
              file=sys.stderr)
    print(f"pkpd: wrote {out}/report.html ({time.perf_counter() - started:.0f} s)",
          file=sys.stderr)
    return 0


def _oc(args: argparse.Namespace) -> int:
    from . import operating as oc

    if args.replicates < 1:
        raise CliError(f"--replicates must be >= 1, got {args.replicates}")
    out = Path(args.out)
    _writable_folder(out)
    design = oc.Design(model=args.model, n=args.n, regimen=args.regimen,
                       times=oc.parse_times(args.times), error=args.error, sigma=args.sigma,
                       truth=tuple(_settings(args.set).items()), seed=args.design_seed)
    table = oc.operating_characteristics(
        design, replicates=args.replicates, seed=args.seed,
        scheduler=None if args.scheduler == "serial" else args.scheduler,
        workers=args.workers, chains=args.chains, draws=args.draws, tune=args.tune,
        level=args.level, decision=args.decision, decision_prob=args.decision_prob,
        progress=oc.progress_bar("pkpd oc:"))
    paths = oc.write(table, out)
    s = oc.summarise(table)
    cols = [c for c in ("PARAMETER", "TRUTH", "COVERAGE", "MEAN_REL_BIAS", "REL_RMSE",
                        "PRECISE_RATE", "DECISION_RATE", "PROBLEM_RATE") if c in s.columns]
    print(s[cols].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    a = table.attrs
    fits = a["fit_seconds"]
    print(f"pkpd: wrote {paths[0]} and {paths[1]} ({args.replicates} replicates, "
          f"{a['seconds']:.0f} s; compile {max(a['compile_seconds'], default=0):.0f} s per "
          f"process, {sum(fits) / len(fits):.1f} s per replicate fit)", file=sys.stderr)
    return 0


def _writable_folder(out: Path) -> Path:
    """Check that ``out`` can be created or written as a folder; returns its parent."""
    import os

    parent = out.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK) or (
            out.exists() and (not out.is_dir() or not os.access(out, os.W_OK))):
        raise CliError(f"cannot write to {out}: not a writable directory")
    return parent


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    for name in ("n", "draws", "patients", "fit_draws", "pd_draws"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be >= 1, got "
                           f"{getattr(args, name)}")
    out = Path(args.out)
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    _writable_folder(out)
    report = run_demo(out, n=args.n, draws=args.draws, patients=args.patients,
                      fit_draws=args.fit_draws, pd_draws=args.pd_draws, seed=args.seed)
    print(f"report: {report}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from .model import MODELS_DIR, load_model

    for f in sorted(MODELS_DIR.glob("*.toml")):
        m = load_model(f)
        kind = "linear" if m.linear is not None else "nonlinear"
        print(f"{m.name:<22} {kind:<10} {m.description}")
    return 0


def _fit(args: argparse.Namespace) -> int:
    import dataclasses

    from .fitting import fit_spec, load_spec

    spec = load_spec(args.spec)  # every spec error is raised here, before sampling
    if args.out:
        spec = dataclasses.replace(spec, output=Path(args.out))
    res = fit_spec(spec, progress=not args.no_progress)
    d = res.diagnostics()
    print(f"pkpd: wrote {spec.output}/ ({spec.model.name}, {res.built.predictor.n_subjects} "
          f"subjects; wall time {d['wall_time_s']:.1f} s; max R-hat {d['max_r_hat']:.3f}; "
          f"min ESS {min(d['min_ess_bulk'], d['min_ess_tail']):.0f}; divergences "
          f"{d['divergences']})", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
