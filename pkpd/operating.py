"""Operating characteristics of a population-PK trial design by replicate fits.

Stochastic simulation and estimation (as PsN's ``sse``): the design — patients, their
covariates, doses and sampling times — is fixed; each replicate ``r`` draws new
between-subject effects (η) and residual errors (ε) from the true parameters, and the
population model is fitted to the replicate's data with the toolkit's Bayesian fit
(:mod:`pkpd.fitting`, nutpie). Per replicate and estimated parameter (typical values, IIV SDs
``omega_*``, residual SD ``sigma_*``) the table holds the truth, the posterior median, the
central ``level`` credible interval (default 90 %), whether it covers the truth, the relative
bias of the median, a precision criterion and the replicate's sampling diagnostics;
:func:`summarise` gives per parameter the coverage rate, mean relative bias, RMSE, the
fraction of replicates meeting the precision criterion (and a decision, if one is given), and
the fraction of replicates with sampling problems.

* **Precision** (``PRECISE``): the 95 % CrI lies within 60–140 % of the posterior median, the
  criterion of Wang et al. 2012 (J Clin Pharmacol 52:1601; FDA paediatric study guidance)
  for the typical CL and V of a paediatric PK study (there a 95 % CI with 80 % power).
* **Decision** (optional): P(parameter < or > threshold) over the posterior and whether it
  reaches ``prob``, e.g. ``"SEX_CL<0.95"`` with prob 0.9: "CL/F in women is at least 5 %
  lower with 90 % probability" (:func:`parse_decision`).
* **Sampling problem** (``PROBLEM``): any divergence after tuning, max R-hat > ``rhat_max``
  (default 1.05) or min bulk/tail ESS < ``ess_min`` (default 100), R-hat and ESS over the
  population parameters and every η (as :meth:`pkpd.fitting.FitResult.diagnostics`); looser
  than ``pkpd fit``'s warnings (1.01, 400) because replicate fits are short.

Reproducibility: replicate ``r``'s η, ε and sampler seeds are derived from (``seed``, r) only
(numpy ``SeedSequence``, :func:`pkpd.compare._block_seed`), each fit runs its chains on one
core, and the model is compiled once per process (nutpie; only the observations change
between replicates, ``CompiledModel.with_data``). nutpie with a fixed seed is bit-for-bit
reproducible across processes, so a run on Dask (a local cluster, a scheduler address or a
``distributed.Client``) gives the same table as the serial run, whatever the scheduling.
"""

from __future__ import annotations

import functools
import math
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .compare import _block_seed
from .fitting import Endpoint, FitSpecError, Prior, Sampler
from .model import Model, ModelError, load_model
from .parallel import progress_bar, run_tasks
from .regimen import Regimen, RegimenError

__all__ = ["Design", "OperatingError", "operating_characteristics", "parse_decision", "parse_times",
           "progress_bar", "replicate_data", "run_tasks", "summarise", "write"]

SIM_ERRORS = ("additive", "proportional", "lognormal")  # residual error models simulated
_SIGMA_PREFIX = {"additive": "sigma_add", "proportional": "sigma_prop", "lognormal": "sigma_log"}
_KEY = 0x0C  # seed-derivation key of replicate fits (compare uses 1 and 2)
PRECISION = (0.6, 1.4)  # 95 % CrI within 60-140 % of the median (Wang et al. 2012)


class OperatingError(ValueError):
    """Bad input to an operating-characteristics run; one-line message."""


# -- the design ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Design:
    """A population-PK trial design and the analysis fitted to it.

    ``n`` patients receive ``regimen`` (dose records until the last sample) and are sampled
    for ``output`` of ``model`` (a linear model: closed-form likelihood) at ``times`` (h after
    the first dose): one sample per slot, a slot being a time (every patient) or a tuple of
    alternatives (each patient one of them, drawn with ``seed``). The default is a sparse
    design like fits/data/make_selinexor_poppk.py: 6 samples, 3 in the first 6 h (0.5 or
    1 h, 2 or 3 h, 4 or 6 h), 24 h, before the day-3 dose (47.9 h) and 1, 2 or 4 h after the
    day-22 dose. Covariates of the patients, drawn once with ``seed``: WT ~ N(75, 15) kg
    clipped to 45-130, SEX female with probability 0.4 (as fits/data/make_selinexor_poppk.py);
    other covariates at the model file's defaults.
    Truth: the model file's typical values, replaced by ``truth`` (name, value) pairs, its IIV
    (ω² of the file) and residual SD ``sigma`` of the ``error`` model (proportional: fraction).
    The fit uses the model file's default priors (centred on the file's values, whatever the
    truth), replaced by ``priors`` (name, :class:`pkpd.fitting.Prior`) pairs; ``priors=None``
    gives selinexor_pk the priors of fits/selinexor_poppk.toml (log-normal, log-SD 0.5, on Q
    and V3, which sparse sampling barely informs) and other models none.
    """

    model: str = "selinexor_pk"
    n: int = 30
    regimen: str = "80 mg BIW for 4 weeks"
    times: tuple[float | tuple[float, ...], ...] = ((0.5, 1.0), (2.0, 3.0), (4.0, 6.0), 24.0,
                                                   47.9, (505.0, 506.0, 508.0))
    output: str | None = None  # default: the model's first output
    error: str = "proportional"
    sigma: float = 0.2
    truth: tuple[tuple[str, float], ...] = ()
    priors: tuple[tuple[str, Prior], ...] | None = None
    centred: bool = False
    seed: int = 1

    def __post_init__(self) -> None:  # lists → tuples: a design is hashable (compile cache)
        def slot(x: Any) -> float | tuple[float, ...]:
            if isinstance(x, (list, tuple, np.ndarray)):
                return tuple(float(v) for v in x)
            return float(x)

        try:
            object.__setattr__(self, "times", tuple(slot(x) for x in self.times))
            object.__setattr__(self, "truth", tuple((str(k), float(v))
                                                    for k, v in dict(self.truth).items()))
        except (TypeError, ValueError):
            raise OperatingError(f"--times / --set: expected numbers, got {self.times!r}, "
                                 f"{self.truth!r}") from None
        if self.priors is not None:
            object.__setattr__(self, "priors", tuple(dict(self.priors).items()))

    # -- derived -------------------------------------------------------------------------------
    def load(self) -> Model:
        """The model, after checking the whole design (raises :class:`OperatingError`)."""
        try:
            m = _load(self.model)
        except (ModelError, OSError) as exc:
            raise OperatingError(f"--model {self.model}: {str(exc).splitlines()[0]}") from None
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise OperatingError(f"--n must be >= 1, got {self.n!r}")
        if m.linear is None or not m.linear.closed_form:
            raise OperatingError(f"--model {m.name}: operating characteristics need a linear "
                                 "model with a closed-form likelihood (fits of nonlinear "
                                 "models take minutes each)")
        if self.output is not None and self.output not in m.outputs:
            raise OperatingError(f"--output {self.output}: not an output of {m.name} "
                                 f"({', '.join(m.outputs)})")
        slots = self.slots()
        t = np.concatenate(slots) if slots else np.array([])
        if len(t) == 0 or not np.all(np.isfinite(t)) or np.any(t <= 0) or not all(
                len(s) for s in slots):
            raise OperatingError(f"--times: expected sampling times > 0 h, got "
                                 f"{_times_text(self.times) or 'none'}")
        if self.error not in SIM_ERRORS:
            raise OperatingError(f"--error must be one of {', '.join(SIM_ERRORS)}, got "
                                 f"{self.error!r}")
        if not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma)
                and self.sigma > 0):
            raise OperatingError(f"--sigma must be > 0, got {self.sigma!r}")
        for k, v in self.truth:
            if k not in m.parameters:
                raise OperatingError(f"--set {k}: {m.name} has no parameter of that name "
                                     f"(parameters: {', '.join(m.parameters)})")
            if not math.isfinite(float(v)):
                raise OperatingError(f"--set {k}={v}: expected a finite number")
        for k, p in self._priors(m).items():
            if k not in m.parameters:
                raise OperatingError(f"prior on unknown parameter {k!r} ({m.name} has "
                                     f"{', '.join(m.parameters)})")
            if p.dist not in ("lognormal", "normal", "logitnormal", "fixed"):
                raise OperatingError(f"prior on {k}: unknown distribution {p.dist!r}")
        try:
            doses = Regimen.parse(self.regimen).doses(until=float(t.max()) + 1e-6)[0]
        except RegimenError as exc:
            raise OperatingError(f"--regimen: {exc}") from None
        if not len(doses):
            raise OperatingError(f"--regimen {self.regimen!r}: no dose before the last sample")
        return m

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.output or next(iter(_load(self.model).outputs)), error=self.error)

    def _priors(self, m: Model) -> dict[str, Prior]:
        if self.priors is not None:
            return dict(self.priors)
        if m.name == "selinexor_pk":  # as fits/selinexor_poppk.toml
            return {k: Prior("lognormal", m.parameters[k].value, 0.5) for k in ("Q", "V3")}
        return {}

    def theta(self) -> dict[str, float]:
        """True typical values of every model parameter."""
        m = _load(self.model)
        return {**m.theta, **{k: float(v) for k, v in self.truth}}

    def truth_values(self) -> dict[str, float]:
        """Truth of every quantity a fit can estimate: typical values, ``omega_<P>`` (SD of
        η, from the model file's ω²) and the residual SD (``sigma_prop_<output>`` etc.)."""
        m = _load(self.model)
        out = self.theta()
        out.update({f"omega_{k}": math.sqrt(p.omega2) for k, p in m.parameters.items()
                    if p.omega2 > 0})
        out[f"{_SIGMA_PREFIX[self.error]}_{self.endpoint.label}"] = float(self.sigma)
        return out

    def estimated(self) -> list[str]:
        """Names reported per replicate: estimated typical values (neither fixed in the model
        file nor by a "fixed" prior), IIV SDs and the residual SD."""
        m = self.load()
        pri = self._priors(m)
        est = [k for k, p in m.parameters.items()
               if not p.fixed and pri.get(k, Prior("lognormal", 1.0)).dist != "fixed"]
        return est + [f"omega_{k}" for k, p in m.parameters.items() if p.omega2 > 0] + [
            f"{_SIGMA_PREFIX[self.error]}_{self.endpoint.label}"]

    def slots(self) -> list[np.ndarray]:
        """The sampling times as slots: each a number (every patient) or a tuple of
        alternatives (each patient one of them, drawn with ``seed``)."""
        try:
            return [np.atleast_1d(np.asarray(s, dtype=float)).ravel() for s in self.times]
        except (TypeError, ValueError):
            raise OperatingError(f"--times: expected numbers, got {self.times!r}") from None

    def records(self) -> pd.DataFrame:
        """The design's NONMEM records (doses and samples; DV empty), the same every call."""
        m = self.load()
        slots = self.slots()
        last = max(float(s.max()) for s in slots)
        dose_t, dose_a = Regimen.parse(self.regimen).doses(until=last + 1e-6)
        dose_cmt = m.default_dose_cmt
        obs_cmt = next((c.cmt for c in m.compartments if c.cmt != dose_cmt), dose_cmt)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _KEY, 0xDE51]))
        wt = np.clip(rng.normal(75.0, 15.0, self.n), 45.0, 130.0).round(1)
        sex = (rng.random(self.n) < 0.4).astype(int)
        picks = np.stack([rng.integers(len(s), size=self.n) for s in slots], axis=1)
        rows = []
        for i in range(self.n):
            t_obs = np.unique([s[j] for s, j in zip(slots, picks[i], strict=True)])
            recs = sorted([(float(t), 1, float(a)) for t, a in zip(dose_t, dose_a, strict=True)]
                          + [(float(t), 0, 0.0) for t in t_obs], key=lambda r: (r[0], -r[1]))
            covs = {}
            if "WT" in m.covariates:
                covs["WT"] = float(wt[i])
            if "SEX" in m.covariates:
                covs["SEX"] = int(sex[i])
            rows += [{"ID": i + 1, "TIME": t, "EVID": e, "AMT": a,
                      "CMT": dose_cmt if e else obs_cmt, "MDV": e, "DV": np.nan, **covs}
                     for t, e, a in recs]
        return pd.DataFrame(rows)


def _times_text(times: Sequence[Any]) -> str:
    """Sampling times as the CLI writes them: comma-separated slots, alternatives by "|"."""
    return ",".join("|".join(f"{x:g}" for x in np.atleast_1d(np.asarray(s, dtype=float)))
                    for s in times)


@functools.lru_cache(maxsize=16)
def _load(name: str) -> Model:
    return load_model(name)


def _residual(error: str, f: np.ndarray, sigma: float, eps: np.ndarray) -> np.ndarray:
    if error == "additive":
        return f + sigma * eps
    if error == "lognormal":
        return f * np.exp(sigma * eps)
    return f * (1.0 + sigma * eps)


def replicate_data(design: Design, seed: int, replicate: int) -> pd.DataFrame:
    """Replicate ``replicate`` of the design's data (run seed ``seed``): the records with DV
    simulated from the truth (η ~ N(0, ω²) per patient, then residual error)."""
    m = design.load()
    df = design.records()
    f = _simulate(design, m, df, _block_seed(seed, _KEY, replicate, 0))
    eps = np.random.default_rng(_block_seed(seed, _KEY, replicate, 1)).standard_normal(len(df))
    obs = df["EVID"].to_numpy() == 0
    df["DV"] = np.where(obs, _residual(design.error, f, design.sigma, eps), np.nan)
    return df


def _simulate(design: Design, m: Model, df: pd.DataFrame, eta_seed: int | None) -> np.ndarray:
    from .simulation import simulate

    out = design.endpoint.output
    return simulate(m, df, params=design.theta(), iiv=eta_seed is not None,
                    seed=eta_seed)[out].to_numpy(dtype=float)


def parse_times(text: str) -> tuple[float | tuple[float, ...], ...]:
    """``"0.5|1,2|3,24"`` → ((0.5, 1.0), (2.0, 3.0), 24.0): comma-separated sampling slots
    (h after the first dose), alternatives separated by "|" (see :class:`Design`)."""
    try:
        slots = [tuple(float(v) for v in part.split("|")) for part in text.split(",")]
        if not slots or any(not all(math.isfinite(v) and v > 0 for v in s) for s in slots):
            raise ValueError
    except ValueError:
        raise OperatingError(f"--times {text!r}: expected comma-separated sampling times > 0 "
                             "h, alternatives separated by |, e.g. 0.5|1,4,24") from None
    return tuple(s[0] if len(s) == 1 else s for s in slots)


# -- decisions ----------------------------------------------------------------------------------

_DECISION = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*([<>])\s*(\S+)\s*$")


def parse_decision(text: str) -> tuple[str, str, float]:
    """``"NAME<VALUE"`` or ``"NAME>VALUE"`` → (name, "<" or ">", value)."""
    m = _DECISION.match(text or "")
    try:
        if not m:
            raise ValueError
        value = float(m.group(3))
        if not math.isfinite(value):
            raise ValueError
    except ValueError:
        raise OperatingError(f"--decision {text!r}: expected NAME<VALUE or NAME>VALUE, e.g. "
                             "SEX_CL<0.95") from None
    return m.group(1), m.group(2), value


# -- one replicate ------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Task:
    design: Design
    replicate: int
    seed: int
    sampler: Sampler
    level: float
    decision: tuple[str, str, float] | None
    decision_prob: float
    rhat_max: float
    ess_min: float


_CACHE: dict[Design, tuple[Any, ...]] = {}
_CACHE_LOCK = threading.Lock()


def _compiled(design: Design) -> tuple[Any, Any, Any, float]:
    """(dataset, built model, nutpie compiled model, seconds it took) for ``design``, once per
    process: built on the design's expected data (typical predictions, no error) so that it
    does not depend on any replicate; replicates only replace the observations."""
    with _CACHE_LOCK:
        if design in _CACHE:
            ds, b, compiled, _ = _CACHE[design]
            return ds, b, compiled, 0.0
        from .dataset import from_frame
        from .fitting import build, compile_nutpie

        started = time.perf_counter()
        m = design.load()
        df = design.records()
        obs = df["EVID"].to_numpy() == 0
        df["DV"] = np.where(obs, _simulate(design, m, df, None), np.nan)
        ds = from_frame(df, source=f"design of {m.name}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            b = build(m, ds, [design.endpoint], priors=design._priors(m),
                      centred=design.centred, where="operating characteristics")
            compiled = compile_nutpie(b, seed=1)
        seconds = time.perf_counter() - started
        if len(_CACHE) >= 4:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[design] = (ds, b, compiled, seconds)
        return ds, b, compiled, seconds


def _fit_replicate(task: _Task) -> dict[str, Any]:
    """Simulate replicate ``task.replicate``, fit it, and tabulate every estimated quantity."""
    from .fitting import FitResult, sample_nutpie

    design = task.design
    ds, b, compiled, compile_s = _compiled(design)
    started = time.perf_counter()
    data = replicate_data(design, task.seed, task.replicate)
    ep = b.endpoints[0]
    dv = data["DV"].to_numpy(dtype=float)[b.obs[ep.label]["rows"]]
    sampler = Sampler(task.sampler.chains, task.sampler.draws, task.sampler.tune,
                      _block_seed(task.seed, _KEY, task.replicate, 2),
                      task.sampler.target_accept, "nutpie", 1, False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idata = sample_nutpie(compiled.with_data(**{f"dv_{ep.label}": dv}), sampler)
        res = FitResult(model=_load(design.model), dataset=ds, built=b, idata=idata,
                        sampler=sampler, wall_time=time.perf_counter() - started)
        d = res.diagnostics()
    min_ess = min(d["min_ess_bulk"], d["min_ess_tail"])
    problem = int(d["divergences"] > 0 or not d["max_r_hat"] <= task.rhat_max
                  or not min_ess >= task.ess_min)
    truth = design.truth_values()
    names = list(b.estimated) + [f"omega_{k}" for k in b.iiv] + [
        n for v in b.sigma_names.values() for n in v]
    a = (1.0 - task.level) / 2.0
    rows = []
    for k in names:
        x = res._draws(k).astype(float)
        med, lo, hi, lo95, hi95 = np.quantile(x, [0.5, a, 1.0 - a, 0.025, 0.975])
        tv = float(truth[k])
        row = {"REPLICATE": task.replicate, "SEED": task.seed, "PARAMETER": k, "TRUTH": tv,
               "MEDIAN": float(med), "LOWER": float(lo), "UPPER": float(hi),
               "COVERED": int(lo <= tv <= hi),
               "REL_BIAS": float((med - tv) / tv) if tv != 0 else math.nan,
               "PRECISE": int(med > 0 and lo95 >= PRECISION[0] * med
                              and hi95 <= PRECISION[1] * med),
               "MAX_RHAT": d["max_r_hat"], "MIN_ESS": float(min_ess),
               "DIVERGENCES": int(d["divergences"]), "PROBLEM": problem}
        if task.decision is not None:
            name, op, thr = task.decision
            p = float(np.mean(x < thr if op == "<" else x > thr)) if k == name else math.nan
            row["P_DECISION"] = p
            row["DECISION"] = (int(p >= task.decision_prob) if k == name else math.nan)
        rows.append(row)
    return {"replicate": task.replicate, "rows": rows, "compile_s": compile_s,
            "fit_s": time.perf_counter() - started, "pid": os.getpid()}


# -- execution: serial or Dask ------------------------------------------------------------------

# -- the run ------------------------------------------------------------------------------------

def operating_characteristics(design: Design | None = None, *, replicates: int = 20,
                              seed: int = 1, scheduler: Any = "local", workers: int = 2,
                              chains: int = 2, draws: int = 500, tune: int = 500,
                              target_accept: float = 0.9, level: float = 0.9,
                              decision: str | tuple[str, str, float] | None = None,
                              decision_prob: float = 0.9, rhat_max: float = 1.05,
                              ess_min: float = 100.0,
                              progress: Callable[[int, int], None] | None = None
                              ) -> pd.DataFrame:
    """Fit ``replicates`` simulated data sets of ``design`` (default :class:`Design`: 30
    patients on selinexor 80 mg BIW, 6 samples each, selinexor_pk) and return one row per
    replicate × estimated parameter (see the module docstring; :func:`summarise` for rates).

    Each fit: nutpie, ``chains`` × (``tune`` + ``draws``) on one core. ``scheduler``:
    "local" (default: a Dask cluster of ``workers`` processes), None or "serial" (this
    process), an address or a ``distributed.Client``; the table is the same for the same
    ``seed`` whatever the scheduler. ``decision``: "NAME<VALUE" / "NAME>VALUE" (or a tuple)
    adds P(NAME < VALUE) (P_DECISION) and whether it is ≥ ``decision_prob`` (DECISION) on the
    rows of NAME. ``table.attrs`` holds the settings and timings.
    """
    design = Design() if design is None else design
    for name, v, low in (("replicates", replicates, 1), ("workers", workers, 1),
                         ("chains", chains, 1), ("draws", draws, 1), ("tune", tune, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise OperatingError(f"--{name} must be an integer >= {low}, got {v!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise OperatingError(f"--seed must be an integer >= 0, got {seed!r}")
    for name, v in (("level", level), ("decision-prob", decision_prob),
                    ("target-accept", target_accept)):
        if not (isinstance(v, (int, float)) and 0 < v < 1):
            raise OperatingError(f"--{name} must be in (0, 1), got {v!r}")
    estimated = design.estimated()  # checks the whole design
    dec = parse_decision(decision) if isinstance(decision, str) else (
        None if decision is None else (decision[0], decision[1], float(decision[2])))
    if dec is not None and dec[0] not in estimated:
        raise OperatingError(f"--decision {dec[0]}: not an estimated quantity (estimated: "
                             f"{', '.join(estimated)})")
    sampler = Sampler(chains, draws, tune, seed, target_accept, "nutpie", 1, False)
    try:
        sampler.check()
    except FitSpecError as exc:
        raise OperatingError(str(exc)) from None
    tasks = [_Task(design, r, seed, sampler, float(level), dec, float(decision_prob),
                   float(rhat_max), float(ess_min)) for r in range(replicates)]
    started = time.perf_counter()
    results = run_tasks(_fit_replicate, tasks, scheduler, workers=workers, progress=progress,
                        error=OperatingError)
    table = pd.DataFrame([row for res in results for row in res["rows"]])
    table.attrs.update({
        "design": design, "replicates": replicates, "seed": seed, "level": level,
        "chains": chains, "draws": draws, "tune": tune, "target_accept": target_accept,
        "decision": dec, "decision_prob": decision_prob, "rhat_max": rhat_max,
        "ess_min": ess_min, "scheduler": "serial" if scheduler in (None, "serial") else
        str(scheduler), "seconds": time.perf_counter() - started,
        "compile_seconds": [r["compile_s"] for r in results if r["compile_s"] > 0],
        "fit_seconds": [r["fit_s"] for r in results],
        "processes": len({r["pid"] for r in results})})
    return table


def write(table: pd.DataFrame, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``out/operating.csv`` (the table) and ``out/operating_summary.csv``
    (:func:`summarise`), each atomically (temporary file, then rename); creates ``out``."""
    from ._io import atomic_write_csv

    folder = Path(out)
    summary = summarise(table)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "operating.csv", folder / "operating_summary.csv"
    atomic_write_csv(table, paths[0])
    atomic_write_csv(summary, paths[1])
    return paths


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Per parameter (and "ALL", pooled over every replicate × parameter): N_REPLICATES,
    TRUTH, COVERAGE (mean of COVERED) and its Monte Carlo SE, MEAN_REL_BIAS, RMSE (of the
    median, parameter units), REL_RMSE, PRECISE_RATE, DECISION_RATE (when a decision was
    given), PROBLEM_RATE (fraction of replicates with a sampling problem) and
    MEAN_CRI_WIDTH (UPPER − LOWER)."""
    has_decision = "DECISION" in table.columns
    problem_rate = float(table.groupby("REPLICATE")["PROBLEM"].first().mean())

    def stats(d: pd.DataFrame, name: str, pooled: bool) -> dict[str, Any]:
        cov = float(d["COVERED"].mean())
        n = len(d)
        rel = d["REL_BIAS"].to_numpy(dtype=float)
        row = {"PARAMETER": name, "N_REPLICATES": int(d["REPLICATE"].nunique()),
               "TRUTH": math.nan if pooled else float(d["TRUTH"].iloc[0]),
               "COVERAGE": cov, "COVERAGE_MCSE": math.sqrt(cov * (1 - cov) / n),
               "MEAN_REL_BIAS": math.nan if pooled else float(np.mean(rel)),
               "RMSE": math.nan if pooled else float(np.sqrt(np.mean(
                   (d["MEDIAN"] - d["TRUTH"]).to_numpy(dtype=float) ** 2))),
               "REL_RMSE": float(np.sqrt(np.mean(rel ** 2))),
               "PRECISE_RATE": float(d["PRECISE"].mean()),
               "MEAN_CRI_WIDTH": math.nan if pooled else float((d["UPPER"] - d["LOWER"])
                                                                .mean())}
        if has_decision:
            dd = d["DECISION"].dropna()
            row["DECISION_RATE"] = float(dd.mean()) if len(dd) else math.nan
        row["PROBLEM_RATE"] = problem_rate
        return row

    rows = [stats(d, str(k), False) for k, d in table.groupby("PARAMETER", sort=False)]
    rows.append(stats(table, "ALL", True))
    return pd.DataFrame(rows)
