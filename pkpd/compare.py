"""Dose comparison: the virtual SMM trial under several regimens over parameter draws.

For each parameter draw (from the model files' assumption ranges, ``source="prior"``, or from
a fit's posterior, ``source=<fit folder>``) and each regimen, ``n`` patients are simulated
with :func:`pkpd.trial.run_trial` (label dose modification; common random numbers across
regimens: the same patients and event-time random numbers for every regimen of a draw).
Two kinds of variability are kept apart:

* **parameter uncertainty** — per-draw endpoints (e.g. the 2-year progression rate of the
  draw's n patients) summarised across draws by the median and the 2.5–97.5th percentiles
  (95 % interval);
* **between-patient variability** — within each draw, the 2.5–97.5th percentiles of a
  patient-level quantity (e.g. M-spike change at 1 year), reported as the median over draws.

Prior draws: every parameter marked ``assumption = true`` with both ``lower`` and ``upper``
is drawn independently, **log-uniform** on [lower, upper] when lower > 0, **uniform** when
lower = 0; the others stay at their values.

Decision metrics (probabilities across draws, paired differences within a draw):

* ``P_PROGRESSION_NONINFERIOR`` = P(prog₂ᵧ(low) − prog₂ᵧ(standard) ≤ margin_progression);
* ``P_AE_LOWER`` = P(AE₁ᵧ(standard) − AE₁ᵧ(low) ≥ margin_ae), AE = any grade ≥ 3 event
  (thrombocytopenia, nausea, fatigue, anorexia, hyponatremia) in the first year;
* ``P_BENEFIT_VS_OBSERVATION`` = P(prog₂ᵧ(low) < prog₂ᵧ(observation)).

The low dose is "supported" when all three are ≥ ``threshold`` (default 0.8). Per-draw rates
come from ``n`` patients, so the probabilities include the sampling variability of a trial of
``n`` patients per arm (predictive probabilities for such a trial); they approach the
probabilities for the population's true rates as ``n`` grows.

The draws × regimens loop runs in blocks of ``block_size`` draws; each block's patients use
a seed derived from (seed, block) only, so a run on Dask (:func:`compare` with
``scheduler=``) equals the serial run for the same seed, whatever the scheduling (a different
``block_size`` gives different virtual patients, hence slightly different numbers).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .model import Model, load_model
from .parallel import run_tasks
from .regimen import Regimen
from .trial import WEEK, dose_ladder, run_trial

__all__ = ["Comparison", "CompareError", "compare", "posterior_draws", "prior_draws",
           "prior_ranges", "standard_regimen"]

OBSERVATION = "none"
YEAR_DAYS = 365.0
AE_COLUMNS = {"NAUSEA_G3_1Y": "NAUSEA_G3", "FATIGUE_G3_1Y": "FATIGUE_G3",
              "APPETITE_G3_1Y": "APPETITE_G3", "HYPONATREMIA_G3_1Y": "HYPONATREMIA_G3"}
# per-draw endpoints: name → (unit, kind); kind "rate" (fraction), "median" (of patients)
ENDPOINTS: dict[str, tuple[str, str]] = {
    "PROGRESSION_2Y": ("fraction", "rate"),
    "PFS_1Y": ("fraction", "rate"),
    "MSPIKE_CHANGE_1Y": ("fraction of baseline", "median"),
    "SFLC_CHANGE_1Y": ("fraction of baseline", "median"),
    "SRE_1Y": ("fraction", "rate"),
    "THROMBOCYTOPENIA_G3_1Y": ("fraction", "rate"),
    "NAUSEA_G3_1Y": ("fraction", "rate"),
    "FATIGUE_G3_1Y": ("fraction", "rate"),
    "APPETITE_G3_1Y": ("fraction", "rate"),
    "HYPONATREMIA_G3_1Y": ("fraction", "rate"),
    "ANY_AE_G3_1Y": ("fraction", "rate"),
    "DOSE_INTENSITY": ("fraction of planned", "mean"),
    "DOSE_REDUCED": ("fraction", "rate"),
    "REDUCTION_DAYS": ("days", "median"),
    "XPO1_INH_MEAN": ("fraction", "median"),
}
AE_ENDPOINTS = ("THROMBOCYTOPENIA_G3_1Y", "NAUSEA_G3_1Y", "FATIGUE_G3_1Y", "APPETITE_G3_1Y",
                "HYPONATREMIA_G3_1Y", "ANY_AE_G3_1Y")
# patient-level quantities whose within-draw spread is reported (between-patient variability)
PATIENT_LEVEL = ("MSPIKE_CHANGE_1Y", "SFLC_CHANGE_1Y", "DOSE_INTENSITY", "XPO1_INH_MEAN",
                 "REDUCTION_DAYS")
GRID_MONTHS = np.arange(0, 121, 1.0)  # KM curves on a monthly grid (months of 30.44 days)


class CompareError(ValueError):
    """Bad input to a comparison (regimen, fit folder, draws); one-line message."""


@dataclass(frozen=True)
class Comparison:
    """Results of :func:`compare` (all tables are pandas DataFrames)."""

    regimens: list[str]
    standard: str
    draws: pd.DataFrame  # per draw × regimen endpoints (DRAW, REGIMEN, endpoint columns)
    endpoints: pd.DataFrame  # per regimen × endpoint: median, 95 % interval, patient range
    differences: pd.DataFrame  # paired differences vs the standard regimen
    decision: pd.DataFrame  # per low dose: decision metrics
    sensitivity: pd.DataFrame | None  # per assumption × bound × low dose
    theta: pd.DataFrame  # the parameter draws (DRAW + one column per drawn parameter)
    curves: dict[str, dict[str, np.ndarray]]  # regimen → PROG/PFS (draws, months), MSPIKE
    settings: dict[str, Any] = field(default_factory=dict)

    def decide(self, *, margin_progression: float | None = None,
               margin_ae: float | None = None, threshold: float | None = None) -> pd.DataFrame:
        """The decision table for other margins (fractions) or threshold, from the stored
        per-draw endpoints (no new simulation); defaults are the run's settings."""
        s = self.settings
        obs = next((r for r in self.regimens if _is_observation(r)), None)
        lows = [r for r in self.regimens if r != self.standard and not _is_observation(r)]
        return _decision(self.draws, lows, self.standard, obs,
                         s["margin_progression"] if margin_progression is None
                         else margin_progression,
                         s["margin_ae"] if margin_ae is None else margin_ae,
                         s["threshold"] if threshold is None else threshold)


# -- parameter draws ---------------------------------------------------------------------------

def prior_ranges(model: Model) -> dict[str, tuple[float, float, str]]:
    """Assumption parameters with a stated range: name → (lower, upper, "log-uniform" when
    lower > 0 else "uniform")."""
    out = {}
    for k, p in model.parameters.items():
        if p.assumption and p.lower is not None and p.upper is not None and p.upper > p.lower:
            out[k] = (float(p.lower), float(p.upper),
                      "log-uniform" if p.lower > 0 else "uniform")
    return out


def prior_draws(model: Model, draws: int, seed: int,
                ranges: Mapping[str, tuple[float, float, str]] | None = None) -> pd.DataFrame:
    """``draws`` independent draws of the assumption parameters (see :func:`prior_ranges`);
    columns DRAW and one per parameter. Same seed ⇒ same draws."""
    ranges = prior_ranges(model) if ranges is None else ranges
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xD4A5]))
    out = {"DRAW": np.arange(draws)}
    for k, (lo, hi, kind) in ranges.items():
        u = rng.random(draws)
        out[k] = np.exp(np.log(lo) + u * (np.log(hi) - np.log(lo))) if kind == "log-uniform" \
            else lo + u * (hi - lo)
    return pd.DataFrame(out)


def posterior_draws(fit_dir: str | os.PathLike, model: Model, draws: int) -> pd.DataFrame:
    """``draws`` evenly spaced draws (chains × draws flattened) of the posterior variables of
    ``fit_dir/posterior.nc`` whose names are parameters of ``model`` (typical values) or
    ``omega_<parameter>`` (SD of its IIV: between-patient variability as estimated)."""
    folder = Path(fit_dir)
    path = folder / "posterior.nc"
    if not folder.is_dir():
        raise CompareError(f"--fit {fit_dir}: no such fit directory")
    if not path.is_file():
        raise CompareError(f"--fit {fit_dir}: no posterior.nc in the fit directory")
    import arviz as az

    try:
        idata = az.from_netcdf(str(path))
        post = idata.posterior
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user error here
        raise CompareError(f"--fit {fit_dir}: cannot read posterior.nc ({exc})") from None
    names = [k for k in post.data_vars if k.removeprefix("omega_") in model.parameters
             and post[k].ndim == 2]  # (chain, draw): a typical value or an IIV SD (ω)
    if not names:
        raise CompareError(f"--fit {fit_dir}: the posterior has no variable named like a "
                           f"parameter of {model.name}")
    total = int(post.sizes["chain"] * post.sizes["draw"])
    if draws > total:
        raise CompareError(f"--draws {draws} exceeds the {total} posterior draws in {fit_dir}")
    idx = np.round(np.linspace(0, total - 1, draws)).astype(int)
    out = {"DRAW": np.arange(draws)}
    for k in names:
        out[k] = np.asarray(post[k].values, dtype=float).reshape(-1)[idx]
    return pd.DataFrame(out)


# -- regimens ----------------------------------------------------------------------------------

def _weekly_mg(regimen: str) -> float:
    if " ".join(regimen.lower().split()) == OBSERVATION:
        return 0.0
    _, amounts = Regimen.parse(regimen).doses(until=WEEK)
    return float(np.sum(amounts))


def standard_regimen(regimens: Sequence[str]) -> str:
    """"100 mg QW" when given, else the regimen with the highest weekly dose."""
    for r in regimens:
        if " ".join(r.upper().split()) == "100 MG QW":
            return r
    return max(regimens, key=_weekly_mg)


def _check_regimens(regimens: Sequence[str]) -> list[str]:
    out: list[str] = []
    for r in regimens:
        try:
            dose_ladder(r)
        except ValueError as exc:
            raise CompareError(str(exc)) from None
        if r not in out:
            out.append(r)
    return out


def _is_observation(r: str) -> bool:
    return " ".join(r.lower().split()) == OBSERVATION


# -- one block of draws --------------------------------------------------------------------------

@dataclass(frozen=True)
class _Block:
    index: int
    model: Model | str
    regimens: tuple[str, ...]
    theta: dict[str, np.ndarray]  # per draw of the block
    draw_ids: np.ndarray
    n: int
    years: float
    seed: int
    risk: str
    curves: bool = True
    threads: int | None = None  # numba threads in a Dask worker (None: leave as is)


def _block_seed(seed: int, *key: int) -> int:
    return int(np.random.SeedSequence([seed, *key]).generate_state(1)[0] & 0x7FFFFFFF)


def _km_at(t: np.ndarray, e: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Kaplan–Meier survival at ``grid`` (events before censorings at tied times)."""
    order = np.lexsort((-e, t))
    t, e = t[order], e[order]
    at_risk = len(t) - np.arange(len(t))
    s = np.cumprod(np.where(e == 1, 1.0 - 1.0 / at_risk, 1.0))
    i = np.searchsorted(t, grid, side="right") - 1
    return np.where(i >= 0, s[np.maximum(i, 0)], 1.0)


def _run_block(block: _Block) -> dict[str, Any]:
    """Simulate every regimen for the block's draws; per-draw endpoints and curves."""
    if block.threads is not None:
        import numba

        before = numba.get_num_threads()
        numba.set_num_threads(min(block.threads, numba.config.NUMBA_NUM_THREADS))
        try:
            return _run_block(dataclasses.replace(block, threads=None))
        finally:
            numba.set_num_threads(before)
    nd, n = len(block.draw_ids), block.n
    theta = {k: np.repeat(np.asarray(v, float), n) for k, v in block.theta.items()}
    rows, curves = [], {}
    grid_days = GRID_MONTHS * 30.44
    horizon = min(2.0, block.years) * YEAR_DAYS
    for reg in block.regimens:
        res = run_trial(reg, risk=block.risk, n=nd * n, years=block.years, seed=block.seed,
                        model=block.model, theta=theta or None, summarise=False)
        p = res.patients
        one_year = min(52, res.platelets.shape[1] - 1)
        plt_g3 = (res.platelets[:, 1:one_year + 1].min(axis=1) < 50.0).astype(int)
        cols = {
            "PROGRESSED": p["PROGRESSED"].to_numpy(int), "TTP": p["TTP_DAYS"].to_numpy(),
            "PFS_EVENT": p["PFS_EVENT"].to_numpy(int), "PFS": p["PFS_DAYS"].to_numpy(),
            "MSPIKE_CHANGE_1Y": p["MSPIKE_CHANGE_1Y"].to_numpy(),
            "SFLC_CHANGE_1Y": p["SFLC_CHANGE_1Y"].to_numpy(),
            "SRE_1Y": p["SRE_1Y"].to_numpy(float), "THROMBOCYTOPENIA_G3_1Y": plt_g3,
            **{k: p[c].to_numpy(float) for k, c in AE_COLUMNS.items()},
            "DOSE_INTENSITY": p["DOSE_INTENSITY"].to_numpy(float),
            "REDUCTION_DAYS": p["REDUCTION_DAYS"].to_numpy(float),
            "XPO1_INH_MEAN": p["XPO1_INH_MEAN"].to_numpy(float),
        }
        cols["ANY_AE_G3_1Y"] = np.max([cols[k] for k in AE_ENDPOINTS[:-1]], axis=0)
        c = {k: v.reshape(nd, n) for k, v in cols.items()}
        prog_curve = np.empty((nd, len(grid_days)))
        pfs_curve = np.empty((nd, len(grid_days)))
        for j in range(nd):
            prog_curve[j] = 1.0 - _km_at(c["TTP"][j], c["PROGRESSED"][j], grid_days)
            pfs_curve[j] = _km_at(c["PFS"][j], c["PFS_EVENT"][j], grid_days)
            row = {"DRAW": int(block.draw_ids[j]), "REGIMEN": reg,
                   "PROGRESSION_2Y": float(1.0 - _km_at(c["TTP"][j], c["PROGRESSED"][j],
                                                        np.array([horizon]))[0]),
                   "PFS_1Y": float(_km_at(c["PFS"][j], c["PFS_EVENT"][j],
                                          np.array([min(YEAR_DAYS, horizon)]))[0])}
            for k in ("SRE_1Y", "THROMBOCYTOPENIA_G3_1Y", *AE_COLUMNS, "ANY_AE_G3_1Y"):
                row[k] = float(c[k][j].mean())
            red = c["REDUCTION_DAYS"][j]
            row["DOSE_REDUCED"] = float(np.isfinite(red).mean())
            for k in PATIENT_LEVEL:
                x = c[k][j][np.isfinite(c[k][j])]
                q = np.percentile(x, [50, 2.5, 97.5]) if len(x) else (np.nan,) * 3
                row[k] = float(np.mean(x)) if k == "DOSE_INTENSITY" and len(x) else float(q[0])
                row[f"{k}_P025"], row[f"{k}_P975"] = float(q[1]), float(q[2])
            rows.append(row)
        if block.curves:
            mq = np.percentile(res.mspike.reshape(nd, n, -1), [5, 25, 50, 75, 95], axis=1)
            curves[reg] = {"PROG": prog_curve, "PFS": pfs_curve,
                           "MSPIKE": np.moveaxis(mq, 0, 1), "WEEKS": res.weeks / WEEK}
    return {"index": block.index, "rows": rows, "curves": curves}


# -- execution: serial or Dask --------------------------------------------------------------------

def _execute(blocks: list[_Block], scheduler: Any,
             progress: Callable[[int, int], None] | None) -> list[dict[str, Any]]:
    """Run blocks serially (scheduler None or "serial") or on Dask ("local": a 2-worker
    local cluster; an address; or a ``distributed.Client``). Results in block order."""
    workers = min(2, os.cpu_count() or 1)
    threads = None
    if scheduler == "local":  # one numba thread per worker: no oversubscription
        threads = max(1, (os.cpu_count() or 1) // workers)
    elif scheduler not in (None, "serial"):
        threads = _local_threads(scheduler)
    if threads is not None:
        blocks = [dataclasses.replace(b, threads=threads) for b in blocks]
    return run_tasks(_run_block, blocks, scheduler, workers=workers, progress=progress,
                     error=CompareError)


def _local_threads(scheduler: Any) -> int | None:
    """Numba threads per task for a ``distributed.Client`` whose workers all run on this
    machine (e.g. a LocalCluster): its cores shared among the worker threads, so that the
    compiled trial loop does not oversubscribe them; None (leave as is) otherwise."""
    try:
        from distributed import Client

        if not isinstance(scheduler, Client):
            return None
        import socket

        workers = scheduler.scheduler_info().get("workers", {})
        local = {"127.0.0.1", "localhost", socket.gethostname()}
        try:
            local.add(socket.gethostbyname(socket.gethostname()))
        except OSError:
            pass
        if not workers or any(w.get("host") not in local for w in workers.values()):
            return None
        slots = sum(int(w.get("nthreads", 1)) for w in workers.values())
        return max(1, (os.cpu_count() or 1) // max(1, slots))
    except Exception:  # noqa: BLE001 - a scheduler we cannot inspect: leave it alone
        return None


# -- summaries ---------------------------------------------------------------------------------

def _q(x: np.ndarray) -> tuple[float, float, float]:
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    if not len(x):
        return (math.nan,) * 3
    m, lo, hi = np.percentile(x, [50, 2.5, 97.5])
    return float(m), float(lo), float(hi)


def _summarise(draws: pd.DataFrame, regimens: list[str], n: int) -> pd.DataFrame:
    rows = []
    for reg in regimens:
        d = draws[draws["REGIMEN"] == reg]
        for k, (unit, _) in ENDPOINTS.items():
            m, lo, hi = _q(d[k].to_numpy())
            plo = phi = math.nan
            if k in PATIENT_LEVEL:
                plo = float(np.nanmedian(d[f"{k}_P025"])) if d[f"{k}_P025"].notna().any() \
                    else math.nan
                phi = float(np.nanmedian(d[f"{k}_P975"])) if d[f"{k}_P975"].notna().any() \
                    else math.nan
            rows.append({"REGIMEN": reg, "ENDPOINT": k, "UNIT": unit, "MEDIAN": m,
                         "LOWER": lo, "UPPER": hi, "PATIENT_LOWER": plo,
                         "PATIENT_UPPER": phi, "N_DRAWS": int(d[k].notna().sum()),
                         "N_PATIENTS": n})
    return pd.DataFrame(rows)


def _paired(draws: pd.DataFrame, reg: str, ref: str, k: str) -> np.ndarray:
    a = draws[draws["REGIMEN"] == reg].set_index("DRAW")[k]
    b = draws[draws["REGIMEN"] == ref].set_index("DRAW")[k]
    return (a - b.reindex(a.index)).to_numpy(float)


def _differences(draws: pd.DataFrame, regimens: list[str], standard: str) -> pd.DataFrame:
    rows = []
    for reg in regimens:
        if reg == standard:
            continue
        for k, (unit, _) in ENDPOINTS.items():
            m, lo, hi = _q(_paired(draws, reg, standard, k))
            rows.append({"REGIMEN": reg, "VERSUS": standard, "ENDPOINT": k, "UNIT": unit,
                         "MEDIAN": m, "LOWER": lo, "UPPER": hi})
    return pd.DataFrame(rows)


def _decision(draws: pd.DataFrame, low_doses: list[str], standard: str,
              observation: str | None, margin_progression: float, margin_ae: float,
              threshold: float) -> pd.DataFrame:
    rows = []
    for low in low_doses:
        dprog = _paired(draws, low, standard, "PROGRESSION_2Y")
        dae = _paired(draws, low, standard, "ANY_AE_G3_1Y")
        p_ni = float(np.mean(dprog <= margin_progression))
        p_ae = float(np.mean(-dae >= margin_ae))
        if observation is not None:
            p_ben = float(np.mean(_paired(draws, low, observation, "PROGRESSION_2Y") < 0))
        else:
            p_ben = math.nan
        ok = p_ni >= threshold and p_ae >= threshold and (math.isnan(p_ben) or
                                                          p_ben >= threshold)
        m, lo, hi = _q(dprog)
        am, alo, ahi = _q(dae)
        rows.append({"LOW_DOSE": low, "STANDARD": standard,
                     "MARGIN_PROGRESSION": margin_progression, "MARGIN_AE": margin_ae,
                     "P_PROGRESSION_NONINFERIOR": p_ni, "P_AE_LOWER": p_ae,
                     "P_BENEFIT_VS_OBSERVATION": p_ben, "THRESHOLD": threshold,
                     "DECISION": "supported" if ok else "not supported",
                     "DELTA_PROGRESSION_2Y": m, "DELTA_PROGRESSION_2Y_LOWER": lo,
                     "DELTA_PROGRESSION_2Y_UPPER": hi, "DELTA_ANY_AE_G3_1Y": am,
                     "DELTA_ANY_AE_G3_1Y_LOWER": alo, "DELTA_ANY_AE_G3_1Y_UPPER": ahi,
                     "N_DRAWS": int(np.isfinite(dprog).sum())})
    return pd.DataFrame(rows)


# -- the comparison ----------------------------------------------------------------------------

def compare(regimens: Sequence[str], *,
            source: str | os.PathLike | Sequence[str | os.PathLike] | pd.DataFrame = "prior",
            risk: str = "intermediate,high", n: int = 200, draws: int = 50,
            years: float = 2.0, seed: int = 1, standard: str | None = None,
            observation: bool = True, margin_progression: float = 0.05,
            margin_ae: float = 0.10, threshold: float = 0.8,
            prior_rest: bool = True,
            sensitivity: bool | Sequence[str] = True, sensitivity_n: int | None = None,
            sensitivity_draws: int | None = None, block_size: int = 5,
            model: Model | str = "selinexor_smm", scheduler: Any = None,
            progress: Callable[[str, int, int], None] | None = None) -> Comparison:
    """Compare ``regimens`` on ``n`` patients per parameter draw over ``years``.

    ``source``: ``"prior"`` (assumption ranges of the model files, see :func:`prior_draws`),
    a fit folder holding ``posterior.nc`` (its variables named like model parameters; with
    ``prior_rest`` the assumptions it does not contain are drawn from their ranges, otherwise
    they stay at their values), several fit folders (e.g. the PK and PD fits of a sequential
    analysis: their draws are paired by index), or a DataFrame of draws (one column per
    parameter).
    ``standard`` defaults to :func:`standard_regimen`; observation ("none") is added when
    ``observation`` (needed for P(benefit vs observation)). Margins are absolute fractions
    (0.05 = 5 percentage points). ``sensitivity``: True (every assumption with a range) or a
    list of names; each is fixed at its lower and upper bound while the other assumptions keep
    the first ``sensitivity_draws`` draws (default min(draws, 10)) on ``sensitivity_n``
    patients (default min(n, 20)), with the same patients for every bound.
    ``scheduler``: None/"serial", "local" (Dask local cluster), an address or a Client.
    ``progress(stage, done, total)`` is called after each block.
    """
    if n < 1:
        raise CompareError(f"--n must be >= 1, got {n}")
    if draws < 1:
        raise CompareError(f"--draws must be >= 1, got {draws}")
    if not 0 < years <= 10:
        raise CompareError(f"--years must be in (0, 10], got {years}")
    regs = _check_regimens(regimens)
    if not [r for r in regs if not _is_observation(r)]:
        raise CompareError("give at least one treatment regimen (--regimen)")
    std = standard if standard is not None else standard_regimen(
        [r for r in regs if not _is_observation(r)])
    if std not in regs:
        regs.append(_check_regimens([std])[0])
    obs = next((r for r in regs if _is_observation(r)), None)
    if observation and obs is None:
        obs = OBSERVATION
        regs.append(obs)
    low_doses = [r for r in regs if r != std and not _is_observation(r)]
    m = load_model(model) if isinstance(model, str) else model
    if isinstance(source, pd.DataFrame):
        theta = source.reset_index(drop=True).iloc[:draws].copy()
        if len(theta) < draws:
            raise CompareError(f"--draws {draws} exceeds the {len(theta)} draws given")
        theta["DRAW"] = np.arange(draws)
        src_label = "given draws"
    elif str(source) == "prior":
        theta = prior_draws(m, draws, seed)
        src_label = "prior"
    else:
        dirs = [source] if isinstance(source, (str, os.PathLike)) else list(source)
        theta = posterior_draws(dirs[0], m, draws)
        for d in dirs[1:]:
            more = posterior_draws(d, m, draws).drop(columns="DRAW")
            both = [k for k in more.columns if k in theta.columns]
            if both:
                raise CompareError(f"--fit {d}: {', '.join(both)} also in an earlier --fit")
            theta = theta.join(more)
        fitted = [k for k in theta.columns if k != "DRAW"]
        src_label = f"posterior {' + '.join(map(str, dirs))} ({', '.join(fitted)})"
        if prior_rest:  # assumptions the fit did not estimate keep their prior uncertainty
            rest = {k: v for k, v in prior_ranges(m).items() if k not in fitted}
            if rest:
                theta = theta.join(prior_draws(m, draws, seed, rest).drop(columns="DRAW"))
                src_label += "; other assumptions from their prior ranges"
    unknown = [k for k in theta.columns if k != "DRAW"
               and k.removeprefix("omega_") not in m.parameters]
    if unknown:
        raise CompareError(f"{m.name}: unknown parameter(s) {', '.join(unknown)}")
    pnames = [k for k in theta.columns if k != "DRAW"]
    names: list[str] = []
    if sensitivity:  # checked before any simulation
        ranges = prior_ranges(m)
        names = list(ranges) if sensitivity is True else list(sensitivity)
        bad = [k for k in names if k not in ranges]
        if bad:
            raise CompareError(f"sensitivity: {', '.join(bad)} is not an assumption parameter "
                               "with a range in the model files")
    model_ref: Model | str = model if isinstance(model, str) else m

    blocks = []
    for b, start in enumerate(range(0, draws, block_size)):
        ids = np.arange(start, min(start + block_size, draws))
        blocks.append(_Block(b, model_ref, tuple(regs), {k: theta[k].to_numpy()[ids]
                                                          for k in pnames}, ids, n, years,
                             _block_seed(seed, 1, b), risk))
    started = time.perf_counter()
    results = _execute(blocks, scheduler,
                       (lambda d, t: progress("draws", d, t)) if progress else None)
    draw_table = pd.DataFrame([r for res in results for r in res["rows"]])
    draw_table = draw_table.sort_values(["DRAW", "REGIMEN"], key=lambda s: s.map(
        {r: i for i, r in enumerate(regs)}) if s.name == "REGIMEN" else s,
        kind="stable").reset_index(drop=True)
    curves: dict[str, dict[str, np.ndarray]] = {}
    for reg in regs:
        parts = [res["curves"][reg] for res in results]
        curves[reg] = {k: np.concatenate([p[k] for p in parts]) for k in ("PROG", "PFS",
                                                                           "MSPIKE")}
        curves[reg]["WEEKS"] = parts[0]["WEEKS"]
    curves["_GRID_MONTHS"] = {"MONTHS": GRID_MONTHS}

    endpoints = _summarise(draw_table, regs, n)
    differences = _differences(draw_table, regs, std)
    decision = _decision(draw_table, low_doses, std, obs, margin_progression, margin_ae,
                         threshold)
    sens = None
    if names:
        sens = _sensitivity(m, model_ref, names, theta, regs, std, low_doses, obs, risk,
                            sensitivity_n or min(n, 20),
                            sensitivity_draws or min(draws, 10), years, seed,
                            margin_progression, margin_ae, threshold, scheduler,
                            progress)
    settings = {"source": src_label, "risk": risk, "n": n, "draws": draws, "years": years,
                "seed": seed, "block_size": block_size, "margin_progression":
                margin_progression, "margin_ae": margin_ae, "threshold": threshold,
                "model": m.name, "drawn": pnames,
                "ranges": {k: v for k, v in prior_ranges(m).items()},
                "sensitivity_n": sensitivity_n or min(n, 20),
                "sensitivity_draws": sensitivity_draws or min(draws, 10),
                "seconds": time.perf_counter() - started}
    return Comparison(regs, std, draw_table, endpoints, differences, decision, sens, theta,
                      curves, settings)


def _sensitivity(m: Model, model_ref: Model | str, names: list[str], theta: pd.DataFrame,
                 regs: list[str], std: str, low_doses: list[str], obs: str | None, risk: str,
                 n: int, draws: int, years: float, seed: int, margin_progression: float,
                 margin_ae: float, threshold: float, scheduler: Any,
                 progress: Callable[[str, int, int], None] | None) -> pd.DataFrame:
    """Decision metrics with one assumption at a bound (the others keep their draws)."""
    ranges = prior_ranges(m)
    th = theta.iloc[:draws]
    pnames = [k for k in th.columns if k != "DRAW"]
    settings = [("(reference)", "draws", math.nan)] + [
        (k, b, ranges[k][0] if b == "lower" else ranges[k][1])
        for k in names for b in ("lower", "upper")]
    seed_s = _block_seed(seed, 2)  # the same patients for every setting
    blocks = []
    for i, (k, _, v) in enumerate(settings):
        values = {c: th[c].to_numpy().copy() for c in pnames}
        if k in m.parameters:
            values[k] = np.full(draws, v)
        blocks.append(_Block(i, model_ref, tuple(regs), values, np.arange(draws), n, years,
                             seed_s, risk, curves=False))
    results = _execute(blocks, scheduler,
                       (lambda d, t: progress("sensitivity", d, t)) if progress else None)
    rows = []
    decisions = [_decision(pd.DataFrame(res["rows"]), low_doses, std, obs, margin_progression,
                           margin_ae, threshold) for res in results]
    # a flip: the decision at a bound differs from the reference run on the same patients and
    # draws (comparing with the main run would mix in Monte Carlo noise of the smaller run)
    ref = dict(zip(decisions[0]["LOW_DOSE"], decisions[0]["DECISION"], strict=True))
    for (k, bound, v), dec in zip(settings, decisions, strict=True):
        for _, r in dec.iterrows():
            rows.append({"PARAMETER": k, "BOUND": bound, "VALUE": v,
                         "UNIT": m.parameters[k].unit if k in m.parameters else "",
                         "LOW_DOSE": r["LOW_DOSE"],
                         "P_PROGRESSION_NONINFERIOR": r["P_PROGRESSION_NONINFERIOR"],
                         "P_AE_LOWER": r["P_AE_LOWER"],
                         "P_BENEFIT_VS_OBSERVATION": r["P_BENEFIT_VS_OBSERVATION"],
                         "DELTA_PROGRESSION_2Y": r["DELTA_PROGRESSION_2Y"],
                         "DELTA_ANY_AE_G3_1Y": r["DELTA_ANY_AE_G3_1Y"],
                         "DECISION": r["DECISION"],
                         "FLIPS": bool(r["DECISION"] != ref[r["LOW_DOSE"]])})
    return pd.DataFrame(rows)
