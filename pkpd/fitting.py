"""Hierarchical Bayesian population fits of linear (closed-form) models with PyMC.

Population model, for subject i and parameter P with IIV:

    P_i = TV_P(θ, covariates_i) · exp(η_iP),   η_i = L·z_i,  z_i ~ N(0, I)   (non-centred)

or centred (η sampled directly), or partially centred per subject (u_iP ~ N(0, ω_P^λ),
η_iP = u_iP·ω_P^(1−λ), λ_iP in [0, 1]; ``centred="auto"`` takes λ from the empirical Bayes
estimates, :mod:`pkpd.ebe`).
TV is the model file's ``[individual]`` expression (or θ_P). Ω = L·Lᵀ is diagonal (L = diag ω)
or a full block with an LKJ(2) prior on the correlations (``iiv="block"``). Parameters with
ω² = 0 in the model file have no IIV; ``fixed`` ones are not estimated.

Priors, derived from the model file and overridable:

* θ_P > 0: log-normal with median = model value and log-SD ``prior_sd`` (default 1, i.e. 95 %
  within ×/÷ 7); θ_P with lower and upper bounds: logit-normal on (lower, upper) centred at
  the value; θ_P ≤ 0: normal with mean value and SD max(|value|, 1)·prior_sd.
* ω_P (SD of η, ≈ CV): half-normal with scale 2·√ω²_file (at least 0.2).
* residual SDs: half-normal (proportional 0.5, log-normal 0.5, additive 0.5·median DV).

Residual error per endpoint: additive (sd = a), proportional (sd = b·f), combined
(sd = √(a² + b²f²)), log-normal (log DV ~ N(log f, σ)). BLQ by M3: a left-censored record
contributes P(Y < LLOQ) (``CENS`` = 1 with DV = LLOQ, or ``BLQ``/``BLOQ`` = 1 with ``LLOQ``).

Sequential fits: ``individual`` fixes parameters per subject (IPP); ``population`` fixes
population parameters (θ, ω, residual error; PPP&D, Zhang, Beal & Sheiner 2003) at an earlier
fit's posterior medians while every subject's η and the data stay in the likelihood.

Sampling: nutpie (NUTS, numba-compiled) by default, PyMC's NUTS as fallback; chains start at
the model file's values (η = 0) with a small jitter (±0.1 on the unconstrained scale).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
import tomllib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import sympy as sp

from .dataset import Dataset, DatasetError, from_frame, read_nonmem
from .loo import loo
from .model import Model, ModelError, load_model

__all__ = ["Endpoint", "FitResult", "FitSpecError", "Prior", "Sampler", "fit", "fit_spec",
           "load_spec", "read_individual", "read_population", "ERROR_MODELS"]

ERROR_MODELS = ("additive", "proportional", "combined", "lognormal")
REPO_FITS = Path(__file__).resolve().parent.parent / "fits"  # example specs
ENGINES = ("auto", "nutpie", "pymc")
BACKENDS = ("numba", "jax")
LIKELIHOODS = ("auto", "periodic", "sensitivity")
MASS_MATRICES = ("diagonal", "low-rank")
_JITTER = 0.1


class FitSpecError(ValueError):
    """A malformed fit spec or call; the message names the spec file and key."""


@dataclass(frozen=True)
class Endpoint:
    """One observed quantity: model ``output`` at records with ``DVID == dvid`` (all
    observation records when ``dvid`` is None) with a residual ``error`` model. ``sigma_add``
    and ``sigma_prop`` are the half-normal prior scales (None: defaults)."""

    output: str
    error: str = "proportional"
    dvid: int | None = None
    sigma_add: float | None = None
    sigma_prop: float | None = None

    @property
    def label(self) -> str:
        return self.output if self.dvid is None else f"{self.output}_{self.dvid}"


@dataclass(frozen=True)
class Prior:
    """Prior of a typical value: ``dist`` "lognormal" (``center`` = median, ``sd`` of log),
    "normal" (mean, sd), "logitnormal" (on the parameter's bounds) or "fixed" (at center)."""

    dist: str
    center: float
    sd: float = 1.0


@dataclass(frozen=True)
class Sampler:
    """NUTS settings; ``engine`` "nutpie", "pymc" or "auto" (default: nutpie for closed-form
    likelihoods; PyMC's multiprocess NUTS for nonlinear models: the compiled sensitivity
    Op would serialise nutpie's threaded chains, and nutpie's numba build of the periodic
    graph takes minutes)."""

    chains: int = 4
    draws: int = 1000
    tune: int = 1000
    seed: int = 1
    target_accept: float = 0.8
    engine: str = "auto"
    cores: int | None = None
    progress: bool = True
    # "diagonal", or "low-rank" (nutpie's low-rank modified mass matrix, adapted from draws
    # and gradients: for posteriors with strongly correlated directions, e.g. kill and growth
    # rates pinned by an M-spike decline through their difference)
    mass_matrix: str = "diagonal"
    # nutpie's backend: "numba", or "jax" (needs jax: ``pip install pkpd[jax]``; compiles the
    # periodic likelihood's graph in seconds instead of minutes)
    backend: str = "numba"
    # low-rank only: eigenvalues of the (diagonally scaled) posterior covariance between
    # 1/cutoff and cutoff are left to the diagonal (nutpie's mass_matrix_eigval_cutoff, 100
    # by default there); 3 also corrects correlations of ≈ 0.9-0.98, such as those of
    # sparsely sampled PK parameters (V2 with KA, Q with V3)
    low_rank_cutoff: float = 100.0

    def check(self, where: str = "sampler") -> None:
        for k in ("chains", "draws", "tune"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if k == "tune" else 1):
                raise FitSpecError(f"{where}.{k}: expected a positive integer, got {v!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise FitSpecError(f"{where}.seed: expected an integer, got {self.seed!r}")
        if not (isinstance(self.target_accept, (int, float)) and 0 < self.target_accept < 1):
            raise FitSpecError(f"{where}.target_accept: expected a number in (0, 1), got "
                               f"{self.target_accept!r}")
        if self.engine not in ENGINES:
            raise FitSpecError(f"{where}.engine: expected one of {', '.join(ENGINES)}, got "
                               f"{self.engine!r}")
        if self.mass_matrix not in MASS_MATRICES:
            raise FitSpecError(f"{where}.mass_matrix: expected one of "
                               f"{', '.join(MASS_MATRICES)}, got {self.mass_matrix!r}")
        if self.backend not in BACKENDS:
            raise FitSpecError(f"{where}.backend: expected one of {', '.join(BACKENDS)}, got "
                               f"{self.backend!r}")
        if self.backend == "jax" and self.engine == "pymc":
            raise FitSpecError(f"{where}.backend: 'jax' is nutpie's backend; engine 'pymc' "
                               "compiles with PyTensor's C backend")
        c = self.low_rank_cutoff
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 1:
            raise FitSpecError(f"{where}.low_rank_cutoff: expected a number > 1, got {c!r}")
        if c != 100.0 and self.mass_matrix != "low-rank":
            raise FitSpecError(f"{where}.low_rank_cutoff: applies to mass_matrix = 'low-rank' "
                               f"only (got mass_matrix {self.mass_matrix!r})")
        if self.mass_matrix == "low-rank" and self.engine == "pymc":
            raise FitSpecError(f"{where}.mass_matrix: 'low-rank' needs engine 'nutpie' (PyMC's "
                               "NUTS adapts a diagonal mass matrix)")


# --------------------------------------------------------------------------- model building


@dataclass
class _Built:
    pm_model: object
    predictor: object  # pkpd.likelihood.LinearPredictor
    endpoints: list[Endpoint]
    estimated: list[str]
    iiv: list[str]
    fixed: dict[str, float]
    obs: dict[str, dict[str, np.ndarray]]  # label → rows (into dataset), dv, cens, lloq
    initial: dict[str, np.ndarray]
    sigma_names: dict[str, list[str]]
    # population parameters fixed by ``population`` (PPP&D): θ names, omega_<P>, sigma names
    population: dict[str, float] = field(default_factory=dict)
    # centred = "auto": the centring weights λ (subjects × η) are the data "eta_lambda",
    # set from the EBE before sampling (pkpd.ebe); ω at the start point
    auto_centring: bool = False
    omega_start: np.ndarray | None = None
    centring: object = None  # pkpd.ebe.EBE, once computed
    # partial centring also of the location: log |typical individual value| at the start
    # point (subjects × η), so the start u = η/ω^(1−λ) + λ·loc_start
    loc_start: np.ndarray | None = None


def _default_prior(model: Model, name: str, prior_sd: float) -> Prior:
    p = model.parameters[name]
    if p.fixed:
        return Prior("fixed", p.value)
    if p.lower is not None and p.upper is not None and p.lower < p.value < p.upper:
        return Prior("logitnormal", p.value, prior_sd)
    if p.value > 0:
        return Prior("lognormal", p.value, prior_sd)
    return Prior("normal", p.value, max(abs(p.value), 1.0) * prior_sd)


def _observations(ds: Dataset, endpoints: Sequence[Endpoint], where: str
                  ) -> dict[str, dict[str, np.ndarray]]:
    df = ds.data
    evid = df["EVID"].to_numpy()
    mdv = df["MDV"].to_numpy()
    dv = df["DV"].to_numpy(dtype=float)
    base = (evid == 0) & (mdv == 0) & np.isfinite(dv)
    cens = np.zeros(len(df), bool)
    lloq = np.full(len(df), np.inf)
    if "CENS" in df.columns:
        c = df["CENS"].fillna(0).to_numpy()
        if np.any(c < 0):
            raise DatasetError(f"{ds.source}: CENS = -1 (right censoring) is not supported")
        cens = c == 1
        lloq = np.where(cens, dv, np.inf)
    else:
        flag = next((k for k in ("BLQ", "BLOQ") if k in df.columns), None)
        if flag is not None:
            cens = df[flag].fillna(0).to_numpy() == 1
            if cens.any():
                if "LLOQ" not in df.columns:
                    raise DatasetError(f"{ds.source}: column {flag} needs a column LLOQ")
                lloq = np.where(cens, df["LLOQ"].to_numpy(dtype=float), np.inf)
                bad = cens & ~np.isfinite(lloq)
                if bad.any():
                    raise DatasetError(f"{ds.where(int(np.flatnonzero(bad)[0]), 'LLOQ')}: "
                                       "expected a number for a BLQ record")
                base |= cens & (evid == 0)
    out = {}
    multi = len(endpoints) > 1
    for i, ep in enumerate(endpoints):
        mask = base.copy()
        if ep.dvid is not None:
            if "DVID" not in df.columns:
                raise FitSpecError(f"{where}: endpoints[{i}].dvid = {ep.dvid} but {ds.source} "
                                   "has no DVID column")
            mask &= df["DVID"].to_numpy() == ep.dvid
        elif multi:
            raise FitSpecError(f"{where}: endpoints[{i}].dvid is required with several "
                               "endpoints")
        if not mask.any():
            raise FitSpecError(f"{where}: endpoints[{i}] ({ep.label}) has no observations in "
                               f"{ds.source}")
        rows = np.flatnonzero(mask)
        out[ep.label] = {"rows": rows, "dv": np.where(cens[rows], lloq[rows], dv[rows]),
                         "cens": cens[rows], "lloq": lloq[rows]}
    return out


def _centring(centred: Mapping[str, object], eta_names: list[str], n: int, iiv: str,
              where: str) -> np.ndarray:
    """Partial centring λ (subjects × η, each in [0, 1]) from ``centred`` = {name: λ or one λ
    per subject}; parameters not named get λ = 0 (non-centred)."""
    unknown = sorted(set(centred) - set(eta_names))
    if unknown:
        raise FitSpecError(f"{where}: centred: {', '.join(unknown)} not a parameter with IIV "
                           f"(those are {', '.join(eta_names) or 'none'})")
    if iiv != "diagonal" and len(eta_names) > 1:
        raise FitSpecError(f"{where}: centred: partial centring needs iiv = 'diagonal', "
                           f"got {iiv!r}")
    lam = np.zeros((n, len(eta_names)))
    for j, k in enumerate(eta_names):
        if k not in centred:
            continue
        try:
            v = np.broadcast_to(np.asarray(centred[k], dtype=float), (n,))
        except (TypeError, ValueError):
            raise FitSpecError(f"{where}: centred.{k}: expected a number in [0, 1] or one per "
                               f"subject ({n})") from None
        if not np.all((v >= 0) & (v <= 1)):
            raise FitSpecError(f"{where}: centred.{k}: λ must be in [0, 1]")
        lam[:, j] = v
    return lam


def _centred(centred: bool | Sequence[str], eta_names: list[str], iiv: str,
              where: str) -> set[str]:
    """The parameters whose η are sampled directly (``centred``: all, none or names)."""
    if isinstance(centred, bool):
        return set(eta_names) if centred else set()
    if isinstance(centred, str):
        raise FitSpecError(f"{where}: centred: expected true/false, 'auto' or a list of "
                           f"parameter names, got {centred!r}")
    cen = set(centred)
    unknown = sorted(cen - set(eta_names))
    if unknown:
        raise FitSpecError(f"{where}: centred: {', '.join(unknown)} not a parameter with IIV "
                           f"(those are {', '.join(eta_names) or 'none'})")
    if cen and len(cen) < len(eta_names) and iiv != "diagonal":
        raise FitSpecError(f"{where}: centred: some parameters centred and some not needs "
                           f"iiv = 'diagonal', got {iiv!r}")
    return cen


def build(model: Model, data: Dataset | pd.DataFrame, endpoints: Sequence[Endpoint], *,
          priors: Mapping[str, Prior] | None = None,
          omega_scale: Mapping[str, float] | None = None, iiv: str = "diagonal",
          prior_sd: float = 1.0, centred: bool | Sequence[str] = False,
          where: str = "fit", individual: pd.DataFrame | None = None,
          population: Mapping[str, float] | None = None, likelihood: str = "auto") -> _Built:
    """The PyMC model of a population fit (see the module docstring); ``centred`` samples η
    directly (better when individual data are rich) instead of z: True for all parameters
    with IIV, or the names of some (diagonal IIV; e.g. the data-rich disease parameters of
    a joint fit, while sparse PK keeps the non-centred form). ``individual`` (ID and
    parameter columns) fixes those parameters per subject (IPP: e.g. the individual PK
    parameters of an earlier PK fit, :meth:`FitResult.individual_parameters`).
    ``population`` (name → value, e.g. :func:`read_population` of an earlier fit) fixes
    population parameters (PPP&D): θ by parameter name, ω by ``omega_<P>`` and residual
    error by ``sigma_<add|prop|log>_<endpoint>``; the η of P stay sampled (with ω fixed)."""
    import pymc as pm
    import pytensor.tensor as pt

    from .likelihood import to_pytensor
    from .sensitivity import predictor
    from .solvers.periodic import Unsupported

    ds = data if isinstance(data, Dataset) else from_frame(data)
    priors = dict(priors or {})
    for k in priors:
        if k not in model.parameters:
            raise FitSpecError(f"{where}: prior on unknown parameter {k!r} ({model.name} has "
                               f"{', '.join(model.parameters)})")
    if iiv not in ("diagonal", "block"):
        raise FitSpecError(f"{where}: iiv must be 'diagonal' or 'block', got {iiv!r}")
    for i, ep in enumerate(endpoints):
        if ep.output not in model.outputs:
            raise FitSpecError(f"{where}: endpoints[{i}].output {ep.output!r} is not an output "
                               f"of {model.name} ({', '.join(model.outputs)})")
        if ep.error not in ERROR_MODELS:
            raise FitSpecError(f"{where}: endpoints[{i}].error must be one of "
                               f"{', '.join(ERROR_MODELS)}, got {ep.error!r}")
    obs = _observations(ds, endpoints, where)
    rows = np.unique(np.concatenate([o["rows"] for o in obs.values()]))
    per_subject = _check_individual(individual, model, priors, where)
    pop = _check_population(population, model, priors, omega_scale, endpoints, per_subject,
                            iiv, where)
    prior = {k: priors.get(k, _default_prior(model, k, prior_sd)) for k in model.parameters}
    prior.update({k: Prior("fixed", model.parameters[k].value) for k in per_subject})
    if per_subject:  # e.g. covariate exponents of PK parameters now fixed per subject
        needed = set().union(*(e.free_symbols for e in model.odes.values()),
                             *(c.init.free_symbols for c in model.compartments),
                             *(o.expr.free_symbols for o in model.outputs.values()),
                             *(e.free_symbols for k, e in model.individual.items()
                               if k not in per_subject))
        prior.update({k: Prior("fixed", model.parameters[k].value) for k in model.parameters
                      if k not in per_subject and sp.Symbol(k, real=True) not in needed})
    prior.update({k: Prior("fixed", v) for k, v in pop.theta.items()})  # PPP&D
    estimated = [k for k, p in prior.items() if p.dist != "fixed"]
    fixed = {k: p.center for k, p in prior.items() if p.dist == "fixed"}
    eta_names = [k for k, p in model.parameters.items()
                 if p.omega2 > 0 and (omega_scale or {}).get(k) != 0  # scale 0: no IIV
                 and k not in per_subject]
    est_syms = {sp.Symbol(k, real=True) for k in estimated}
    vary = [k for k in model.parameters if k not in per_subject and (k in eta_names or (
        model.individual[k].free_symbols & est_syms if k in model.individual else
        k in estimated))]
    # closed form, or compiled sensitivities of the individual parameters that vary and of
    # the states the endpoints need, or (likelihood="periodic") the periodic graph, which
    # needs grid points only where outputs of driven/slow states are observed (see
    # pkpd.sensitivity.predictor)
    out_rows: dict[str, list] = {}
    for ep, o in zip(endpoints, obs.values(), strict=True):
        out_rows.setdefault(ep.output, []).extend(o["rows"])
    if likelihood not in LIKELIHOODS:
        raise FitSpecError(f"{where}: likelihood must be 'auto', 'periodic' or 'sensitivity', "
                           f"got {likelihood!r}")
    try:
        pred = predictor(model, ds, rows=rows, vary=vary, method=likelihood,
                         outputs=sorted({ep.output for ep in endpoints}), output_rows=out_rows)
    except Unsupported as e:
        raise FitSpecError(f"{where}: likelihood 'periodic': {e}") from None
    if per_subject:
        try:
            pred.fix_individual(individual, f"{where}: individual parameters")
        except ValueError as e:
            raise FitSpecError(str(e)) from None
    pos = {r: j for j, r in enumerate(rows)}
    for o in obs.values():
        o["pos"] = np.array([pos[r] for r in o["rows"]])
    S = pred.n_subjects
    auto = isinstance(centred, str) and centred == "auto"  # λ from the EBE, later
    lam = (_centring(centred if not auto else {}, eta_names, S, iiv, where)
           if auto or isinstance(centred, Mapping) else None)
    cen = _centred(centred, eta_names, iiv, where) if lam is None else set()
    omega_start = None
    coords = {"subject": pred.subject_ids, "eta_param": eta_names}
    initial: dict[str, np.ndarray] = {}
    sigma_names: dict[str, list[str]] = {}
    with pm.Model(coords=coords) as pmm:
        theta = {}
        for k in model.parameters:
            p = prior[k]
            if p.dist == "fixed":
                theta[k] = pt.as_tensor_variable(float(p.center))
            elif p.dist == "lognormal":
                z = pm.Normal(f"log_{k}", mu=math.log(p.center), sigma=p.sd)
                initial[f"log_{k}"] = np.array(math.log(model.parameters[k].value))
                theta[k] = pm.Deterministic(k, pt.exp(z))
            elif p.dist == "normal":
                z = pm.Normal(f"raw_{k}", mu=p.center, sigma=p.sd)
                initial[f"raw_{k}"] = np.array(model.parameters[k].value)
                theta[k] = pm.Deterministic(k, z)
            elif p.dist == "logitnormal":
                lo, hi = model.parameters[k].lower, model.parameters[k].upper
                u = (p.center - lo) / (hi - lo)
                z = pm.Normal(f"logit_{k}", mu=math.log(u / (1 - u)), sigma=p.sd)
                u0 = (model.parameters[k].value - lo) / (hi - lo)
                initial[f"logit_{k}"] = np.array(math.log(u0 / (1 - u0)))
                theta[k] = pm.Deterministic(k, lo + (hi - lo) * pt.sigmoid(z))
            else:
                raise FitSpecError(f"{where}: priors.{k}: unknown distribution {p.dist!r}")
        # typical individual values (covariate model, η = 0) ------------------------------
        env = {sp.Symbol(k, real=True): v for k, v in theta.items()}
        env.update({sp.Symbol(k, real=True): pt.as_tensor_variable(v)
                    for k, v in pred.subject_covariates.items()})
        tv = {k: (to_pytensor(model.individual[k], env) if k in model.individual else theta[k])
              * pt.ones(S) for k in model.parameters if k not in per_subject}
        # IIV ---------------------------------------------------------------------------
        eta = {}
        loc_start = None
        if eta_names:
            K = len(eta_names)
            scale = np.array([float((omega_scale or {}).get(
                k, max(2.0 * math.sqrt(model.parameters[k].omega2), 0.2))) for k in eta_names])
            start = np.array([math.sqrt(model.parameters[k].omega2) for k in eta_names])
            free = [j for j, k in enumerate(eta_names) if k not in pop.omega]
            if (iiv == "diagonal" or K == 1) and len(free) == K:
                om = pm.HalfNormal("omega", sigma=scale, dims="eta_param")
                initial["omega"] = start
            elif iiv == "diagonal" or K == 1:  # some ω fixed by ``population`` (PPP&D)
                om = pt.as_tensor_variable(np.array([pop.omega.get(k, 0.0) for k in eta_names]))
                if free:
                    om_free = pm.HalfNormal("omega__free", sigma=scale[free], shape=len(free))
                    initial["omega__free"] = start[free]
                    om = pt.set_subtensor(om[free], om_free)
                om = pm.Deterministic("omega", om, dims="eta_param")
            else:
                chol, _, stds = pm.LKJCholeskyCov(
                    "omega_chol", n=K, eta=2.0, sd_dist=pm.HalfNormal.dist(scale, shape=K),
                    compute_corr=True)
                om = pm.Deterministic("omega", stds, dims="eta_param")
            omega_start = np.array([pop.omega.get(k, start[j]) for j, k in enumerate(eta_names)])
            if lam is not None:
                # partial centring of location and scale (Papaspiliopoulos, Roberts & Sköld
                # 2003; Gorinova et al. 2020): u ~ N(λ·m, ω^λ), η = (u − λ·m)·ω^(1−λ), with
                # m = log |typical individual value|; λ = 1 samples the individual log
                # parameter itself, λ = 0 the standard normal z
                m = pt.stack([pt.log(pt.abs(tv[k])) for k in eta_names], axis=-1)  # (S, K)
                typ0 = pred.individual_typical({k: float(v) for k, v in fixed.items()})
                loc_start = np.stack([np.log(np.abs(typ0[k])) for k in eta_names], axis=-1)
                initial["eta_u"] = lam * loc_start
                if auto:  # replaced before sampling (nutpie's with_data), no recompilation
                    lam = pm.Data("eta_lambda", lam, dims=("subject", "eta_param"))
                u = pm.Normal("eta_u", lam * m, om ** lam, dims=("subject", "eta_param"))
                e = pm.Deterministic("eta", (u - lam * m) * om ** (1.0 - lam),
                                     dims=("subject", "eta_param"))
            elif 0 < len(cen) < K:  # mixed: η of rich-data parameters direct, the rest via z
                jc = [j for j, k in enumerate(eta_names) if k in cen]
                jn = [j for j, k in enumerate(eta_names) if k not in cen]
                pmm.add_coord("eta_centred", [eta_names[j] for j in jc])
                pmm.add_coord("eta_noncentred", [eta_names[j] for j in jn])
                ec = pm.Normal("eta_c", 0.0, om[jc], dims=("subject", "eta_centred"))
                z = pm.Normal("z", 0.0, 1.0, dims=("subject", "eta_noncentred"))
                initial["eta_c"], initial["z"] = np.zeros((S, len(jc))), np.zeros((S, len(jn)))
                e = pt.zeros((S, K))
                e = pt.set_subtensor(e[:, jc], ec)
                e = pm.Deterministic("eta", pt.set_subtensor(e[:, jn], z * om[jn]),
                                     dims=("subject", "eta_param"))
            elif cen:
                initial["eta"] = np.zeros((S, K))
                if iiv == "diagonal" or K == 1:
                    e = pm.Normal("eta", 0.0, om, dims=("subject", "eta_param"))
                else:
                    e = pm.MvNormal("eta", mu=np.zeros(K), chol=chol,
                                    dims=("subject", "eta_param"))
            else:
                z = pm.Normal("z", 0.0, 1.0, dims=("subject", "eta_param"))
                initial["z"] = np.zeros((S, K))
                e = z * om if (iiv == "diagonal" or K == 1) else z @ chol.T
                e = pm.Deterministic("eta", e, dims=("subject", "eta_param"))
            for j, k in enumerate(eta_names):
                pm.Deterministic(f"omega_{k}", om[j])
                eta[k] = e[:, j]
        # individual parameters -------------------------------------------------------------
        indiv = {}
        for k in model.parameters:
            if k in per_subject:
                indiv[k] = pt.as_tensor_variable(pred.fixed_individual[k])
            else:
                indiv[k] = tv[k] * pt.exp(eta[k]) if k in eta else tv[k]
        outputs = pred.predict(indiv, outputs=sorted({ep.output for ep in endpoints}))
        # residual error -----------------------------------------------------------------
        def residual_sd(nm: str, scale: float, start: float):
            if nm in pop.sigma:  # fixed (PPP&D): a constant in the posterior
                return pm.Deterministic(nm, pt.as_tensor_variable(pop.sigma[nm]))
            initial[nm] = np.array(start)
            return pm.HalfNormal(nm, sigma=scale)

        for ep in endpoints:
            o = obs[ep.label]
            f = outputs[ep.output][o["pos"]]
            dvpos = o["dv"][~o["cens"]]
            typical = max(float(np.median(np.abs(dvpos))) if len(dvpos) else 1.0, 1e-12)
            names = []
            if ep.error in ("additive", "combined"):
                names.append(f"sigma_add_{ep.label}")
                a = residual_sd(names[-1], ep.sigma_add or 0.5 * typical, 0.1 * typical)
            if ep.error in ("proportional", "combined", "lognormal"):
                kind = "sigma_log" if ep.error == "lognormal" else "sigma_prop"
                names.append(f"{kind}_{ep.label}")
                b = residual_sd(names[-1], ep.sigma_prop or 0.5, 0.2)
            sigma_names[ep.label] = names
            name = f"obs_{ep.label}"
            pmm.add_coord(f"{name}_dim", np.arange(len(o["dv"])))
            if ep.error == "lognormal":
                cls, kw = pm.LogNormal, {"mu": pt.log(pt.maximum(f, 1e-30)), "sigma": b}
            else:
                if ep.error == "additive":
                    sd = a
                elif ep.error == "proportional":
                    sd = b * pt.abs(f) + 1e-12
                else:
                    sd = pt.sqrt(a ** 2 + (b * f) ** 2)
                cls, kw = pm.Normal, {"mu": f, "sigma": sd}
            dv = pm.Data(f"dv_{ep.label}", o["dv"], dims=f"{name}_dim")  # replaceable
            if o["cens"].any():
                # left censoring: an observation at ``lower`` contributes P(Y ≤ LLOQ)
                pm.Censored(name, cls.dist(**kw), lower=np.where(o["cens"], o["lloq"], -np.inf),
                            upper=None, observed=dv, dims=f"{name}_dim")
            else:
                cls(name, **kw, observed=dv, dims=f"{name}_dim")
    return _Built(pmm, pred, list(endpoints), estimated, eta_names, fixed, obs, initial,
                  sigma_names, population=pop.names(), auto_centring=auto and bool(eta_names),
                  omega_start=omega_start, loc_start=loc_start)


# --------------------------------------------------------------------------- sampling


def _engine(b: _Built, s: Sampler) -> Sampler:
    """``engine = "auto"`` resolved for this likelihood (see :class:`Sampler`)."""
    if s.engine != "auto":
        return s
    from .likelihood import LinearPredictor

    return dataclasses.replace(s, engine="nutpie" if s.backend == "jax" or isinstance(
        b.predictor, LinearPredictor) else "pymc")


def _sample(b: _Built, s: Sampler):
    """Sample with ``s.engine`` (resolved by :func:`_engine`)."""
    import pymc as pm

    rng = np.random.default_rng(s.seed)
    if s.engine == "nutpie":
        try:
            import nutpie  # noqa: F401
        except ImportError:
            warnings.warn("nutpie is not installed: sampling with PyMC's NUTS (diagonal mass "
                          "matrix)", stacklevel=3)
            s = dataclasses.replace(s, engine="pymc", mass_matrix="diagonal")
    if s.engine == "nutpie":
        return sample_nutpie(compile_nutpie(b, s.seed, backend=s.backend), s)
    with b.pm_model:
        inits = []
        for _ in range(s.chains):
            d = {}
            for k, v in b.initial.items():
                if k.startswith(("omega", "sigma")):
                    d[k] = v * np.exp(rng.uniform(-_JITTER, _JITTER, np.shape(v)))
                else:
                    d[k] = v + rng.uniform(-_JITTER, _JITTER, np.shape(v))
            inits.append(d)
        return pm.sample(draws=s.draws, tune=s.tune, chains=s.chains, random_seed=s.seed,
                         target_accept=s.target_accept, initvals=inits, init="adapt_diag",
                         progressbar=s.progress, cores=s.cores or min(s.chains, 2),
                         compute_convergence_checks=False)


def compile_nutpie(b: _Built, seed: int = 1, backend: str = "numba"):
    """nutpie's compiled model (``backend`` "numba" or "jax") whose chains start at the model
    file's values (η = 0) plus a uniform ±0.1 jitter on the unconstrained scale (different
    per chain). With ``centred="auto"`` the centring weights come from the EBE (:mod:`pkpd.ebe`) and
    the chains start there."""
    import nutpie

    if backend == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
        # not frozen when λ is data to be replaced (PyMC's freeze_dims_and_data also breaks
        # the graph of a data-dependent σ: "shape error")
        compiled = nutpie.compile_pymc_model(b.pm_model, initial_points=b.initial,
                                             jitter_rvs=set(), backend="jax",
                                             gradient_backend="jax",
                                             freeze_model=not b.auto_centring)
        start_fn = compiled._make_initial_points
    else:
        compiled = nutpie.compile_pymc_model(b.pm_model, initial_points=b.initial,
                                             jitter_rvs=set())
        start_fn = compiled.initial_point_func
    x_start = None
    if b.auto_centring:
        compiled, x_start = _auto_centring(b, compiled, backend, np.asarray(start_fn(0)))

    def jittered(chain_seed):
        x = np.asarray(start_fn(chain_seed) if x_start is None else x_start, dtype=float)
        r = np.random.default_rng([int(np.asarray(chain_seed).ravel()[0]) % 2**32, seed])
        return x + r.uniform(-_JITTER, _JITTER, x.shape)

    if backend == "jax":
        return dataclasses.replace(compiled, _make_initial_points=jittered)
    return dataclasses.replace(compiled, initial_point_func=jittered)


def _flat_block(pm_model, name: str) -> slice:
    """Where value variable ``name`` sits in nutpie's flat vector (free RVs in order; a model
    nutpie freezes, as its JAX build does unless λ is data, has them in another order)."""
    ip = pm_model.initial_point()
    at = 0
    for rv in pm_model.free_RVs:
        v = pm_model.rvs_to_values[rv].name
        n = int(np.size(ip[v]))
        if v == name:
            return slice(at, at + n)
        at += n
    raise KeyError(name)


def _auto_centring(b: _Built, compiled, backend: str, x0: np.ndarray):
    """EBE of every subject's η at the start point; sets the centring weights λ = 1 − r²
    (r = Laplace SD / ω) as the data ``eta_lambda`` and returns the start point at the EBE."""
    from .ebe import ebe

    S, K = len(b.predictor.subject_ids), len(b.iiv)
    block = _flat_block(b.pm_model, "eta_u")
    t = time.perf_counter()
    if backend == "jax":
        fn = compiled._make_logp_func()

        def logp_grad(x):
            v, g = fn(x, **compiled._shared_data)
            return float(v), np.asarray(g, dtype=float)
    else:  # nutpie's compiled C callback (no second compilation)
        import ctypes

        cfunc = compiled.compiled_logp_func.ctypes
        dbl = ctypes.POINTER(ctypes.c_double)
        user = compiled.user_data.ctypes.data_as(ctypes.c_void_p)

        def logp_grad(x):
            x = np.ascontiguousarray(x, dtype=float)
            g, v = np.empty_like(x), np.zeros(1)
            rc = cfunc(x.size, x.ctypes.data_as(dbl), g.ctypes.data_as(dbl),
                       v.ctypes.data_as(dbl), user)
            if rc not in (0, 3, 4):  # 3, 4: not finite (returned as such)
                raise RuntimeError(f"nutpie's log density failed (code {rc})")
            return float(v[0]), g

    lam0 = np.zeros((S, K))  # the graph's λ at compilation
    res = ebe(logp_grad, x0, block, b.omega_start, lam0, b.loc_start)
    print(f"EBE: {res.iterations} Newton steps, {res.gradients} gradients, "
          f"{time.perf_counter() - t:.1f} s; centring λ (median by parameter): "
          + ", ".join(f"{k} {np.median(res.lam[:, j]):.2f}" for j, k in enumerate(b.iiv)),
          file=sys.stderr, flush=True)
    b.centring = res
    compiled = compiled.with_data(eta_lambda=res.lam)
    b.pm_model.set_data("eta_lambda", res.lam)  # for predictive draws and the log-likelihood
    x = np.array(x0, dtype=float)
    x[block] = (res.eta / b.omega_start[None, :] ** (1.0 - res.lam)
                + res.lam * b.loc_start).ravel()
    return compiled, x


def sample_nutpie(compiled, s: Sampler):
    """Run nutpie on a compiled model (e.g. ``compiled.with_data(dv_CP=...)`` for replicates)."""
    import nutpie

    return nutpie.sample(compiled, draws=s.draws, tune=s.tune, chains=s.chains, seed=s.seed,
                         target_accept=s.target_accept, progress_bar=s.progress,
                         cores=s.cores or min(s.chains, os.cpu_count() or 1),
                         save_warmup=False,
                         **({"low_rank_modified_mass_matrix": True,
                             "mass_matrix_eigval_cutoff": float(s.low_rank_cutoff)}
                            if s.mass_matrix == "low-rank" else {}))


def _check_individual(table: pd.DataFrame | None, model: Model, priors: Mapping[str, Prior],
                      where: str) -> list[str]:
    """The parameters a table of individual parameters fixes per subject (its columns but
    ID), checked: an ID column, model parameters only, none with a prior."""
    if table is None:
        return []
    if "ID" not in table.columns:
        raise FitSpecError(f"{where}: individual parameters: expected a column ID")
    cols = [c for c in table.columns if c != "ID"]
    for k in cols:
        if k not in model.parameters:
            raise FitSpecError(f"{where}: individual parameters: {k!r} is not a parameter of "
                               f"{model.name}")
        if k in priors:
            raise FitSpecError(f"{where}: [priors] {k}: fixed per subject by the individual "
                               "parameters")
    return cols


def read_individual(path: str | os.PathLike) -> pd.DataFrame:
    """Individual parameters for :func:`fit`'s ``individual``: a CSV (ID and one column per
    parameter) or a fit folder written by :meth:`FitResult.save` (its ``individual.csv``,
    posterior medians of each subject's parameters)."""
    p = Path(path)
    if p.is_dir():
        p = p / "individual.csv"
    if not p.is_file():
        raise FitSpecError(f"{path}: no individual parameters (expected a CSV with ID and "
                           "parameter columns, or a fit folder with individual.csv)")
    return pd.read_csv(p)


_SIGMA_KINDS = {"additive": ("add",), "proportional": ("prop",), "combined": ("add", "prop"),
                "lognormal": ("log",)}


class PopulationValues(dict):
    """Population parameter values (name → value) and where they come from (``source``, named
    in error messages): what :func:`read_population` returns."""

    def __init__(self, values: Mapping[str, float], source: str = "population"):
        super().__init__(values)
        self.source = source


@dataclass(frozen=True)
class _Population:
    """Population parameters fixed by ``population`` (PPP&D), checked against a fit."""

    theta: dict[str, float] = field(default_factory=dict)  # parameter → θ
    omega: dict[str, float] = field(default_factory=dict)  # parameter → ω (SD of η)
    sigma: dict[str, float] = field(default_factory=dict)  # sigma_<kind>_<label> → value

    def names(self) -> dict[str, float]:
        return {**self.theta, **{f"omega_{k}": v for k, v in self.omega.items()},
                **self.sigma}


def _check_population(values: Mapping[str, float] | None, model: Model,
                      priors: Mapping[str, Prior], omega_scale: Mapping[str, float] | None,
                      endpoints: Sequence[Endpoint], per_subject: Sequence[str], iiv: str,
                      where: str) -> _Population:
    """The population parameters ``values`` fixes, checked: θ of model parameters, ω of
    parameters with IIV (``omega_P``), residual errors of the fit's endpoints
    (``sigma_<add|prop|log>_<output>`` or ``..._<output>_<dvid>``: a label without DVID
    applies to every endpoint of that output); none also fixed per subject, none with a
    prior, finite numbers (ω and σ > 0)."""
    if not values:
        return _Population()
    source = getattr(values, "source", "population")
    src = f"{where}: population" if source == "population" else f"{where}: population {source}"
    omega_scale = omega_scale or {}
    out = _Population()
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                or not math.isfinite(v):
            raise FitSpecError(f"{src}: {name}: expected a finite number, got {v!r}")
        v = float(v)
        if name in model.parameters:
            if name in per_subject:
                raise FitSpecError(f"{src}: {name}: fixed per subject by the individual "
                                   "parameters and by the population parameters (give it "
                                   "to one of them)")
            if name in priors:
                raise FitSpecError(f"{where}: [priors] {name}: fixed by the population "
                                   f"parameters ({source})")
            out.theta[name] = v
            continue
        par = name[len("omega_"):] if name.startswith("omega_") else None
        if par in model.parameters:
            if model.parameters[par].omega2 <= 0:
                raise FitSpecError(f"{src}: {name}: {par} has no IIV in {model.name}")
            if par in per_subject:
                raise FitSpecError(f"{src}: {name}: {par} is fixed per subject by the "
                                   "individual parameters (no η)")
            if par in omega_scale:
                raise FitSpecError(f"{where}: [priors.omega] {par}: ω fixed by the population "
                                   f"parameters ({source})")
            if v <= 0:
                raise FitSpecError(f"{src}: {name}: expected ω > 0, got {v:g} (remove the IIV "
                                   f"with [priors.omega] {par} = 0)")
            out.omega[par] = v
            continue
        kind = next((k for k in ("add", "prop", "log") if name.startswith(f"sigma_{k}_")),
                    None)
        if kind is None:
            raise FitSpecError(f"{src}: {name!r} is not a parameter of {model.name} (nor "
                               "omega_<parameter> or sigma_<add|prop|log>_<endpoint>)")
        label = name[len(f"sigma_{kind}_"):]
        output, dvid = label, None
        if label not in model.outputs and "_" in label:
            head, tail = label.rsplit("_", 1)
            if head in model.outputs and tail.isdigit():
                output, dvid = head, int(tail)
        same = [(i, ep) for i, ep in enumerate(endpoints) if ep.output == output and (
            dvid is None or ep.dvid is None or ep.dvid == dvid)]
        if not same:
            raise FitSpecError(f"{src}: {name}: no endpoint {label} in this fit (endpoints: "
                               f"{', '.join(ep.label for ep in endpoints)})")
        hit = [(i, ep) for i, ep in same if kind in _SIGMA_KINDS[ep.error]]
        if not hit:
            raise FitSpecError(f"{src}: {name}: endpoint {same[0][1].label} has a(n) "
                               f"{same[0][1].error} residual error (no sigma_{kind})")
        if v <= 0:
            raise FitSpecError(f"{src}: {name}: expected a residual error > 0, got {v:g}")
        for i, ep in hit:
            if (ep.sigma_add if kind == "add" else ep.sigma_prop) is not None:
                key = "sigma_add" if kind == "add" else "sigma_prop"
                raise FitSpecError(f"{where}: endpoints[{i}].{key}: a prior on a residual "
                                   f"error fixed by the population parameters ({name})")
            out.sigma[f"sigma_{kind}_{ep.label}"] = v
    n_eta = sum(1 for k, p in model.parameters.items() if p.omega2 > 0
                and omega_scale.get(k) != 0 and k not in per_subject)
    if out.omega and iiv == "block" and n_eta > 1:
        raise FitSpecError(f"{src}: {', '.join('omega_' + k for k in out.omega)}: a fixed ω "
                           "needs iiv = 'diagonal' (not a block Ω)")
    return out


def read_population(path: str | os.PathLike) -> PopulationValues:
    """Population parameters for :func:`fit`'s ``population`` (PPP&D): from a fit folder
    written by :meth:`FitResult.save`, the posterior medians of the parameters listed in its
    ``summary.csv`` (θ, ``omega_<P>``, ``sigma_..._<endpoint>``), computed from its
    ``posterior.nc`` (full precision; ``summary.csv``'s medians when it is absent); or a CSV
    with columns ``parameter`` and ``median``."""
    p = Path(path)
    table_path = p / "summary.csv" if p.is_dir() else p
    if not table_path.is_file():
        raise FitSpecError(f"{path}: no population parameters (expected a fit folder with "
                           "summary.csv and posterior.nc, or a CSV with columns parameter "
                           "and median)")
    try:
        table = pd.read_csv(table_path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise FitSpecError(f"{table_path}: not a readable CSV ({exc})") from None
    for col in ("parameter", "median"):
        if col not in table.columns:
            raise FitSpecError(f"{table_path}: expected a column {col}")
    values = dict(zip(table["parameter"].astype(str), table["median"], strict=True))
    nc = p / "posterior.nc"
    if p.is_dir() and nc.is_file():
        import arviz as az

        post = az.from_netcdf(str(nc)).posterior
        for name in values:
            if name not in post:
                raise FitSpecError(f"{nc}: no draws of {name} (listed in {table_path.name})")
            values[name] = float(np.median(post[name].values))
    return PopulationValues(values, str(table_path))


def fit(model: Model | str, data: Dataset | pd.DataFrame | str | os.PathLike,
        endpoints: Sequence[Endpoint] | None = None, *,
        priors: Mapping[str, Prior] | None = None,
        omega_scale: Mapping[str, float] | None = None, iiv: str = "diagonal",
        prior_sd: float = 1.0, centred: bool | str | Sequence[str] | Mapping = False,
        chains: int = 4, draws: int = 1000,
        tune: int = 1000,
        seed: int = 1, target_accept: float = 0.8, engine: str = "auto",
        cores: int | None = None, progress: bool = True, posterior_predictive: bool = True,
        where: str = "fit", individual: pd.DataFrame | str | os.PathLike | None = None,
        population: Mapping[str, float] | str | os.PathLike | None = None,
        likelihood: str = "auto", mass_matrix: str = "diagonal",
        backend: str = "numba", low_rank_cutoff: float = 100.0) -> FitResult:
    """Fit a population model to a NONMEM data set; returns a :class:`FitResult`.

    ``endpoints`` default: the model's first output, proportional error, all observations.
    ``centred`` samples η directly instead of the non-centred z (η = L·z); prefer it when
    every subject has rich data (then the non-centred form can diverge and its trees grow
    long). True for all parameters with IIV, or a list of names (diagonal IIV), e.g. the
    M-spike parameters of a joint fit whose PK samples are sparse. "auto": partial centring
    per subject and parameter from the empirical Bayes estimates at the start point, where
    the chains then start (:mod:`pkpd.ebe`; nutpie). A mapping name → λ (one or one per
    subject) sets the centring weights directly (λ = 1 centred, 0 non-centred).
    ``individual``: parameters fixed per subject (IPP), a table (ID and parameter columns), a
    CSV of one, or a fit folder (its ``individual.csv``); see :func:`read_individual`.
    ``population``: population parameters fixed (PPP&D), name → value (θ by parameter name,
    ``omega_<P>``, ``sigma_<add|prop|log>_<endpoint>``) or a fit folder (its posterior
    medians, :func:`read_population`); the η and the data of the earlier fit's endpoints stay
    in the likelihood.
    ``likelihood``: "auto" (closed form for linear models, else compiled sensitivities),
    "periodic" (the periodic graph of :mod:`pkpd.periodic_likelihood`, for PK-driven models
    under regular dosing) or "sensitivity"; see :func:`pkpd.sensitivity.predictor`.
    ``mass_matrix``: "diagonal" or "low-rank" (nutpie only; see :class:`Sampler`), with
    ``low_rank_cutoff`` (see :class:`Sampler`).
    ``backend``: nutpie's "numba" or "jax" (see :class:`Sampler`).
    """
    model = load_model(model) if isinstance(model, (str, os.PathLike)) else model
    ds = read_nonmem(data) if isinstance(data, (str, os.PathLike)) else (
        data if isinstance(data, Dataset) else from_frame(data))
    endpoints = list(endpoints or [Endpoint(next(iter(model.outputs)))])
    sampler = Sampler(chains, draws, tune, seed, target_accept, engine, cores, progress,
                      mass_matrix, backend, low_rank_cutoff)
    label = f"{where}: sampler" if where != "fit" else "sampler"
    sampler.check(label)
    started = time.perf_counter()
    if individual is not None and not isinstance(individual, pd.DataFrame):
        individual = read_individual(individual)
    if population is not None and not isinstance(population, Mapping):
        population = read_population(population)
    b = build(model, ds, endpoints, priors=priors, omega_scale=omega_scale, iiv=iiv,
              prior_sd=prior_sd, centred=centred, where=where, individual=individual,
              population=population, likelihood=likelihood)
    sampler = _engine(b, sampler)
    sampler.check(label)  # again with the engine resolved (e.g. low-rank needs nutpie)
    if b.auto_centring and sampler.engine != "nutpie":
        raise FitSpecError(f"{where}: centred 'auto' needs engine 'nutpie' (got "
                           f"{sampler.engine!r})")
    if sampler.backend == "jax" and any(o["cens"].any() for o in b.obs.values()):
        raise FitSpecError(f"{label}.backend: 'jax' cannot fit BLQ records (M3): PyTensor's "
                           "JAX backend has no erfcx; use backend 'numba'")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        idata = _sample(b, sampler)
    wall = time.perf_counter() - started
    res = FitResult(model=model, dataset=ds, built=b, idata=idata, sampler=sampler,
                    wall_time=wall)
    if posterior_predictive:
        res.add_predictive()
    res.check(stream=sys.stderr)
    return res


# --------------------------------------------------------------------------- results


@dataclass
class FitResult:
    """A finished fit: ``idata`` (ArviZ InferenceData), tables and plots."""

    model: Model
    dataset: Dataset
    built: _Built
    idata: object
    sampler: Sampler
    wall_time: float
    warnings: list[str] = field(default_factory=list)
    _pred_fn: object = None
    _sims: dict | None = None

    # -- derived arrays -------------------------------------------------------------------
    @property
    def population_names(self) -> list[str]:
        return list(self.built.estimated)

    def _draws(self, name: str) -> np.ndarray:
        v = self.idata.posterior[name].values
        return v.reshape(-1, *v.shape[2:])

    def _n_draws(self) -> int:
        """Posterior draws over all chains (also when no θ is estimated, e.g. PPP&D)."""
        post = self.idata.posterior
        return int(post.sizes["chain"] * post.sizes["draw"])

    def add_predictive(self) -> None:
        """Posterior predictive and pointwise log-likelihood into ``idata``."""
        import pymc as pm

        with self.built.pm_model, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pp = pm.sample_posterior_predictive(self.idata, random_seed=self.sampler.seed,
                                                progressbar=False)
            self.idata.extend(pp)
            pm.compute_log_likelihood(self.idata, progressbar=False)

    def diagnostics(self) -> dict:
        """Max R-hat, min bulk/tail ESS, divergences, wall time (s), PSIS-LOO; the population
        parameters fixed by ``population`` (``fixed_population``), if any."""
        import arviz as az

        names = self._summary_vars()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = az.summary(self.idata, var_names=names + (["eta"] if self.built.iiv else []),
                           kind="diagnostics")
        ss = self.idata.sample_stats
        div = int(ss["diverging"].values.sum()) if "diverging" in ss else 0
        out = {"max_r_hat": float(s["r_hat"].max()), "min_ess_bulk": float(s["ess_bulk"].min()),
               "min_ess_tail": float(s["ess_tail"].min()), "divergences": div,
               "chains": self.sampler.chains, "draws": self.sampler.draws,
               "tune": self.sampler.tune, "engine": self.sampler.engine,
               "mass_matrix": self.sampler.mass_matrix,
               **({"low_rank_cutoff": self.sampler.low_rank_cutoff}
                  if self.sampler.mass_matrix == "low-rank" else {}),
               "wall_time_s": round(self.wall_time, 2), "warnings": list(self.warnings)}
        if self.built.population:  # PPP&D: what was fixed, not estimated
            out["fixed_population"] = dict(self.built.population)
        if "log_likelihood" in self.idata.groups():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    out.update(loo(self.idata, var_name=None if len(self.built.endpoints) == 1
                                   else f"obs_{self.built.endpoints[0].label}"))
                except Exception as exc:  # noqa: BLE001 - LOO is informative only
                    out["elpd_loo"] = f"unavailable: {exc}"
        return out

    def check(self, stream=None) -> list[str]:
        """Sampling problems (divergences, R-hat > 1.01, ESS < 400), recorded and reported
        once: printed on ``stream`` if given, else as Python warnings (notebooks)."""
        d = self.diagnostics()
        msgs = []
        if d["divergences"]:
            msgs.append(f"{d['divergences']} divergent transitions after tuning")
        if d["max_r_hat"] > 1.01:
            msgs.append(f"max R-hat {d['max_r_hat']:.3f} > 1.01: chains disagree (a chain "
                        "may be stuck in another mode)")
        if min(d["min_ess_bulk"], d["min_ess_tail"]) < 400:
            msgs.append(f"min ESS {min(d['min_ess_bulk'], d['min_ess_tail']):.0f} < 400")
        self.warnings = msgs
        for m in msgs:  # once: on the stream when given (CLI), else as a Python warning
            if stream is not None:
                print(f"pkpd: warning: {m}", file=stream)
            else:
                warnings.warn(f"pkpd fit: {m}", stacklevel=2)
        return msgs

    def _summary_vars(self) -> list[str]:
        """Estimated population parameters (not those fixed by ``population``)."""
        names = list(self.built.estimated) + [f"omega_{k}" for k in self.built.iiv]
        for v in self.built.sigma_names.values():
            names += v
        return [k for k in names if k not in self.built.population]

    def summary(self) -> pd.DataFrame:
        """Per parameter: median, 95 % CrI, posterior CV %, IIV CV %, η-shrinkage %, R-hat,
        bulk/tail ESS."""
        import arviz as az

        names = self._summary_vars()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            diag = az.summary(self.idata, var_names=names, kind="diagnostics")
        rows = []
        eta_mean = None
        if self.built.iiv:
            eta_mean = self.idata.posterior["eta"].mean(dim=("chain", "draw")).values
        for k in names:
            x = self._draws(k)
            row = {"parameter": k,
                   "unit": self.model.parameters[k].unit if k in self.model.parameters else "",
                   "median": float(np.median(x)), "q2.5": float(np.quantile(x, 0.025)),
                   "q97.5": float(np.quantile(x, 0.975)),
                   "posterior_cv_percent": float(100 * np.std(x) / abs(np.mean(x))),
                   "iiv_cv_percent": np.nan, "shrinkage_percent": np.nan}
            if k.startswith("omega_"):
                p = k[len("omega_"):]
                row["unit"] = "SD of eta"
                row["iiv_cv_percent"] = float(100 * np.sqrt(np.expm1(np.median(x) ** 2)))
                j = self.built.iiv.index(p)
                row["shrinkage_percent"] = float(100 * (1 - np.std(eta_mean[:, j], ddof=1)
                                                        / np.median(x)))
            elif k in self.built.iiv:
                om = self._draws(f"omega_{k}")
                row["iiv_cv_percent"] = float(100 * np.sqrt(np.expm1(np.median(om) ** 2)))
            elif k.startswith("sigma_prop") or k.startswith("sigma_log"):
                row["unit"] = "fraction"
            elif k.startswith("sigma_add"):
                lab = k[len("sigma_add_"):]
                ep = next(e for e in self.built.endpoints if e.label == lab)
                row["unit"] = self.model.outputs[ep.output].unit
            row.update(r_hat=float(diag.loc[k, "r_hat"]),
                       ess_bulk=float(diag.loc[k, "ess_bulk"]),
                       ess_tail=float(diag.loc[k, "ess_tail"]))
            rows.append(row)
        return pd.DataFrame(rows)

    # -- predictions ---------------------------------------------------------------------
    def _predict(self, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._pred_fn is None:
            self._pred_fn = self.built.predictor.compile()
        return self._pred_fn(params)

    def _individual(self, theta: Mapping[str, float], eta: np.ndarray | None
                    ) -> dict[str, np.ndarray]:
        p = self.built.predictor.individual_typical(theta)
        if eta is not None:
            for j, k in enumerate(self.built.iiv):
                p[k] = p[k] * np.exp(eta[:, j])
        return p

    def individual_parameters(self, max_draws: int = 500) -> pd.DataFrame:
        """Each subject's individual parameters (covariates, θ and η of each draw), posterior
        median over up to ``max_draws`` evenly spaced draws: ID and one column per model
        parameter (NONMEM's patab; the input of an IPP fit, ``fit(individual=...)``)."""
        total = self._n_draws()
        take = np.unique(np.linspace(0, total - 1, min(max_draws, total)).astype(int))
        eta = self._draws("eta") if self.built.iiv else None
        stack = [self._individual(self._theta_draw(int(i)),
                                  None if eta is None else eta[int(i)]) for i in take]
        out = {"ID": self.built.predictor.subject_ids}
        for k in self.model.parameters:
            out[k] = np.median(np.stack([d[k] for d in stack]), axis=0)
        return pd.DataFrame(out)

    def _theta_draw(self, i: int) -> dict[str, float]:
        th = {k: float(self._draws(k)[i]) for k in self.built.estimated}
        return {**self.built.fixed, **th}

    def _simulate(self, n_sim: int = 300) -> dict:
        """Prior-predictive replicates of the data set (new subjects): θ from posterior draws,
        η ~ N(0, Ω_draw), residual error added. Used for CWRES-like, NPDE and the pcVPC."""
        if self._sims is not None and self._sims["n"] == n_sim:
            return self._sims
        rng = np.random.default_rng(self.sampler.seed + 7)
        b = self.built
        n_draws = self._n_draws()
        S = b.predictor.n_subjects
        K = len(b.iiv)
        sims = {ep.label: [] for ep in b.endpoints}
        preds = {ep.label: [] for ep in b.endpoints}
        chol = self._draws("omega_chol") if "omega_chol" in self.idata.posterior else None
        for _ in range(n_sim):
            i = int(rng.integers(n_draws))
            theta = self._theta_draw(i)
            eta = None
            if K:
                zz = rng.standard_normal((S, K))
                if chol is not None:
                    L = _unpack_chol(chol[i], K)
                    eta = zz @ L.T
                else:
                    eta = zz * np.array([self._draws(f"omega_{k}")[i] for k in b.iiv])
            out = self._predict(self._individual(theta, eta))
            for ep in b.endpoints:
                f = out[ep.output][b.obs[ep.label]["pos"]]
                y = self._add_error(ep, f, i, rng)
                sims[ep.label].append(y)
                preds[ep.label].append(f)
        self._sims = {"n": n_sim, "y": {k: np.array(v) for k, v in sims.items()},
                      "f": {k: np.array(v) for k, v in preds.items()}}
        return self._sims

    def _add_error(self, ep: Endpoint, f: np.ndarray, i: int, rng) -> np.ndarray:
        e = rng.standard_normal(f.shape)
        if ep.error == "lognormal":
            return f * np.exp(self._draws(f"sigma_log_{ep.label}")[i] * e)
        a = self._draws(f"sigma_add_{ep.label}")[i] if ep.error in ("additive",
                                                                     "combined") else 0.0
        bb = self._draws(f"sigma_prop_{ep.label}")[i] if ep.error in ("proportional",
                                                                       "combined") else 0.0
        return f + np.sqrt(a ** 2 + (bb * f) ** 2) * e

    def predictions(self, n_sim: int = 300, n_ipred: int = 200) -> pd.DataFrame:
        """One row per fitted observation: ID, TIME, TAD (time after the latest dose, see
        :meth:`pkpd.dataset.Dataset.time_after_dose`), DVID, DV, CENS, PRED (typical subject at
        the posterior medians), IPRED (posterior median of the individual prediction),
        IWRES, CWRES-like (Monte Carlo population residual decorrelated within subject, i.e.
        NONMEM's EWRES) and NPDE (``n_sim`` replicates; NaN for censored records)."""
        b = self.built
        med = {k: float(np.median(self._draws(k))) for k in b.estimated}
        theta = {**b.fixed, **med}
        pred = self._predict(self._individual(theta, None))
        n_draws = self._n_draws()
        idx = np.unique(np.linspace(0, n_draws - 1, min(n_ipred, n_draws)).astype(int))
        ip = {ep.output: [] for ep in b.endpoints}
        eta_d = self._draws("eta") if b.iiv else None
        for i in idx:
            out = self._predict(self._individual(self._theta_draw(int(i)),
                                                 None if eta_d is None else eta_d[i]))
            for k in ip:
                ip[k].append(out[k])
        ipred = {k: np.median(np.array(v), axis=0) for k, v in ip.items()}
        sims = self._simulate(n_sim)
        df = self.dataset.data
        tad = self.dataset.time_after_dose()
        tables = []
        for ep in b.endpoints:
            o = b.obs[ep.label]
            pos = o["pos"]
            rows = o["rows"]
            t = pd.DataFrame({"ID": df["ID"].to_numpy()[rows], "TIME": df["TIME"].to_numpy()[rows],
                              "TAD": tad[rows],
                              "DVID": ep.dvid if ep.dvid is not None else 1,
                              "ENDPOINT": ep.output, "DV": o["dv"],
                              "CENS": o["cens"].astype(int),
                              "PRED": pred[ep.output][pos], "IPRED": ipred[ep.output][pos]})
            sd = self._sd(ep, t["IPRED"].to_numpy())
            t["IWRES"] = (t["DV"] - t["IPRED"]) / sd
            if ep.error == "lognormal":
                t["IWRES"] = np.log(t["DV"].clip(lower=1e-30) / t["IPRED"].clip(lower=1e-30)
                                    ) / sd
            cw, npde = _npde(t["ID"].to_numpy(), o["dv"], o["cens"], sims["y"][ep.label],
                             log=ep.error == "lognormal")
            t["CWRES"] = cw
            t["NPDE"] = npde
            tables.append(t)
        return pd.concat(tables, ignore_index=True)

    def _sd(self, ep: Endpoint, f: np.ndarray) -> np.ndarray:
        med = {k: float(np.median(self._draws(k))) for k in self.built.sigma_names[ep.label]}
        if ep.error == "lognormal":
            return np.full(len(f), med[f"sigma_log_{ep.label}"])
        a = med.get(f"sigma_add_{ep.label}", 0.0)
        bb = med.get(f"sigma_prop_{ep.label}", 0.0)
        return np.sqrt(a ** 2 + (bb * f) ** 2)

    # -- plots -----------------------------------------------------------------------------
    def plot_gof(self, path: str | os.PathLike | None = None, table: pd.DataFrame | None = None):
        """Standard GOF panels: DV vs PRED and IPRED, CWRES vs TIME and PRED, |IWRES| vs
        IPRED, QQ of CWRES and NPDE. Returns the figure (saved when ``path`` is given)."""
        return _plot_gof(self, self.predictions() if table is None else table, path)

    def vpc(self, path: str | os.PathLike | None = None, n_sim: int = 300, bins: int = 8):
        """Prediction-corrected VPC: observed 5/50/95th percentiles against the 95 % interval
        of the simulated ones, per time bin."""
        return _plot_pcvpc(self, n_sim=n_sim, bins=bins, path=path)

    def plot_individual(self, path: str | os.PathLike | None = None, n: int = 12):
        return _plot_individual(self, n=n, path=path)

    def plot_trace(self, path: str | os.PathLike | None = None):
        return _plot_trace(self, path=path)

    # -- writing ---------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike, spec_text: str | None = None) -> Path:
        """Write the results folder (posterior.nc, summary.csv, diagnostics.json,
        predictions.csv, individual.csv, plots) to a temporary sibling, then rename it onto
        ``folder``: an error leaves no half-written folder (a previous one is replaced only on
        success)."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            self.idata.to_netcdf(str(tmp / "posterior.nc"))
            self.summary().to_csv(tmp / "summary.csv", index=False, float_format="%.6g")
            diag = self.diagnostics()
            (tmp / "diagnostics.json").write_text(json.dumps(diag, indent=2) + "\n")
            table = self.predictions()
            table.to_csv(tmp / "predictions.csv", index=False, float_format="%.6g")
            self.individual_parameters().to_csv(tmp / "individual.csv", index=False,
                                                float_format="%.8g")
            for name, fig in (("gof.png", self.plot_gof(table=table)),
                              ("vpc.png", self.vpc()),
                              ("individual_fits.png", self.plot_individual()),
                              ("trace_rank.png", self.plot_trace())):
                fig.savefig(tmp / name, dpi=110)
                plt.close(fig)
            if spec_text is not None:
                (tmp / "spec.toml").write_text(spec_text)
            old = None
            if folder.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
                os.replace(folder, old / folder.name)
            os.replace(tmp, folder)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder


def _unpack_chol(packed: np.ndarray, K: int) -> np.ndarray:
    L = np.zeros((K, K))
    L[np.tril_indices(K)] = packed
    return L


def _npde(ids: np.ndarray, dv: np.ndarray, cens: np.ndarray, ysim: np.ndarray, log: bool
          ) -> tuple[np.ndarray, np.ndarray]:
    """Per subject: decorrelate observed and simulated vectors with the Cholesky factor of the
    simulated covariance (Comets et al. 2008); CWRES-like = decorrelated residual, NPDE =
    Φ⁻¹ of the rank of the decorrelated observation among the decorrelated simulations."""
    from scipy.stats import norm

    K = ysim.shape[0]
    cw = np.full(len(dv), np.nan)
    nd = np.full(len(dv), np.nan)
    y = np.log(np.maximum(dv, 1e-30)) if log else dv
    ys = np.log(np.maximum(ysim, 1e-30)) if log else ysim
    for i in pd.unique(ids):
        m = (ids == i) & ~cens
        if not m.any():
            continue
        Y = ys[:, m]
        mu = Y.mean(axis=0)
        C = np.atleast_2d(np.cov(Y, rowvar=False))
        try:
            L = np.linalg.cholesky(C + 1e-12 * np.eye(len(mu)) * np.trace(C))
        except np.linalg.LinAlgError:
            L = np.diag(np.sqrt(np.maximum(np.diag(C), 1e-300)))
        obs = np.linalg.solve(L, y[m] - mu)
        sim = np.linalg.solve(L, (Y - mu).T).T
        cw[m] = obs
        pde = (sim < obs).mean(axis=0)
        pde = np.clip(pde, 1 / (2 * K), 1 - 1 / (2 * K))
        nd[m] = norm.ppf(pde)
    return cw, nd


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class FitSpec:
    """A parsed ``pkpd fit`` spec (TOML)."""

    path: Path
    name: str
    model: Model
    data: Dataset
    endpoints: list[Endpoint]
    priors: dict[str, Prior]
    omega_scale: dict[str, float]
    iiv: str
    prior_sd: float
    centred: bool | str | tuple[str, ...]
    sampler: Sampler
    output: Path
    text: str
    individual: pd.DataFrame | None = None
    population: PopulationValues | None = None
    likelihood: str = "auto"


_SPEC_KEYS = {"fit": {"name", "model", "data", "iiv", "prior_sd", "output",
                     "parameterization", "individual", "population", "likelihood"},
              "endpoints": {"output", "error", "dvid", "sigma_add", "sigma_prop"},
              "sampler": {"chains", "draws", "tune", "seed", "target_accept", "engine",
                          "cores", "progress", "mass_matrix", "backend", "low_rank_cutoff"},
              "priors": None}


def load_spec(path: str | os.PathLike) -> FitSpec:
    """Read and check a fit spec; every problem raises :class:`FitSpecError` naming the spec
    file and key, before anything is sampled. Format::

        [fit]
        name = "selinexor_poppk"     # output folder <spec dir>/<name>/ (or output = "...")
        model = "selinexor_pk"       # shipped name or path (relative to the spec)
        data = "data/x.csv"          # NONMEM CSV, relative to the spec
        iiv = "diagonal"             # or "block" (LKJ)
        parameterization = "noncentred"   # or "centred" (rich individual data), or the
                                          # parameters to centre, e.g. ["KG", "KKILL"], or
                                          # "auto" (per subject, from the EBE; nutpie)
        likelihood = "auto"               # or "periodic", "sensitivity" (nonlinear models)
        individual = "selinexor_poppk"    # optional (IPP): parameters fixed per subject, a
                                          # fit folder (its individual.csv) or a CSV
        population = "selinexor_poppk"    # optional (PPP&D): θ, ω and residual errors fixed
                                          # at a fit folder's posterior medians (its η and
                                          # data stay in the fit; see read_population)
        [[endpoints]]                     # one table per endpoint
        output = "CP"                     # a model output
        error = "proportional"            # additive | proportional | combined | lognormal
        dvid = 1                          # optional (required with several endpoints)
        sigma_prop = 0.5                  # half-normal prior scale (sigma_add likewise)
        [priors]
        CL = { median = 16, sd = 0.5 }    # log-normal; { mean, sd }: normal; { fixed = 16 }
        [priors.omega]
        CL = 0.5                          # half-normal scale of ω_CL (0: no IIV, ω = 0)
        [sampler]                         # defaults shown; engine "pymc" is the fallback
        chains = 4
        draws = 1000
        tune = 1000
        seed = 1
        target_accept = 0.8
        engine = "auto"                   # nutpie (closed form) or pymc (nonlinear)
        mass_matrix = "diagonal"          # or "low-rank" (nutpie)
        low_rank_cutoff = 100             # low-rank: eigenvalues kept outside [1/c, c]
        backend = "numba"                 # nutpie's; or "jax" (pip install pkpd[jax])

    BLQ records: a ``CENS`` column (1 = below LLOQ, DV = LLOQ) or ``BLQ``/``BLOQ`` with
    ``LLOQ``; they enter by the M3 method.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise FitSpecError(f"{path}: cannot read the spec ({exc.strerror})") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FitSpecError(f"{path}: not valid TOML: {exc}") from None
    where = str(path)
    for sec in doc:
        if sec not in _SPEC_KEYS:
            raise FitSpecError(f"{where}: unknown section [{sec}] (expected "
                               f"{', '.join('[' + s + ']' for s in _SPEC_KEYS)})")
    f = doc.get("fit")
    if not isinstance(f, dict):
        raise FitSpecError(f"{where}: missing section [fit]")
    for k in f:
        if k not in _SPEC_KEYS["fit"]:
            raise FitSpecError(f"{where}: [fit] {k}: unknown key")
    for k in ("name", "model", "data"):
        if not isinstance(f.get(k), str) or not f[k]:
            raise FitSpecError(f"{where}: [fit] {k}: expected a string")
    base = path.parent
    mref = f["model"]
    mpath = base / mref
    try:
        model = load_model(mpath if mref.endswith(".toml") and mpath.exists() else mref)
    except (ModelError, FileNotFoundError, OSError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FitSpecError(f"{where}: [fit] model: {msg}") from None
    dpath = base / f["data"]
    if not dpath.is_file():
        raise FitSpecError(f"{where}: [fit] data: no such file {dpath}")
    try:
        data = read_nonmem(dpath)
    except DatasetError as exc:
        raise FitSpecError(f"{where}: [fit] data: {exc}") from None
    eps_raw = doc.get("endpoints", [{"output": next(iter(model.outputs))}])
    if isinstance(eps_raw, dict):
        eps_raw = [eps_raw]
    endpoints = []
    for i, e in enumerate(eps_raw):
        if not isinstance(e, dict):
            raise FitSpecError(f"{where}: endpoints[{i}]: expected a table")
        for k in e:
            if k not in _SPEC_KEYS["endpoints"]:
                raise FitSpecError(f"{where}: endpoints[{i}].{k}: unknown key")
        if e.get("output") not in model.outputs:
            raise FitSpecError(f"{where}: endpoints[{i}].output: {e.get('output')!r} is not an "
                               f"output of {model.name} ({', '.join(model.outputs)})")
        if e.get("error", "proportional") not in ERROR_MODELS:
            raise FitSpecError(f"{where}: endpoints[{i}].error: expected one of "
                               f"{', '.join(ERROR_MODELS)}, got {e.get('error')!r}")
        for k in ("sigma_add", "sigma_prop"):
            if k in e and not (isinstance(e[k], (int, float)) and e[k] > 0):
                raise FitSpecError(f"{where}: endpoints[{i}].{k}: expected a number > 0")
        if "dvid" in e and "DVID" not in data.data.columns:
            raise FitSpecError(f"{where}: endpoints[{i}].dvid: data {dpath.name} has no DVID "
                               "column")
        endpoints.append(Endpoint(e["output"], e.get("error", "proportional"), e.get("dvid"),
                                  e.get("sigma_add"), e.get("sigma_prop")))
    priors: dict[str, Prior] = {}
    omega_scale: dict[str, float] = {}
    for k, v in (doc.get("priors") or {}).items():
        if k == "omega":
            if not isinstance(v, dict):
                raise FitSpecError(f"{where}: [priors.omega]: expected a table")
            for p, s in v.items():
                if p not in model.parameters or model.parameters[p].omega2 <= 0:
                    raise FitSpecError(f"{where}: [priors.omega] {p}: not a parameter with IIV "
                                       f"in {model.name}")
                if not (isinstance(s, (int, float)) and not isinstance(s, bool) and s >= 0):
                    raise FitSpecError(f"{where}: [priors.omega] {p}: expected a number ≥ 0 "
                                       "(0: no IIV)")
                omega_scale[p] = float(s)
            continue
        if k not in model.parameters:
            raise FitSpecError(f"{where}: [priors] {k}: unknown parameter (model {model.name} "
                               f"has {', '.join(model.parameters)})")
        priors[k] = _parse_prior(where, k, v, model)
    iiv = f.get("iiv", "diagonal")
    if iiv not in ("diagonal", "block"):
        raise FitSpecError(f"{where}: [fit] iiv: expected 'diagonal' or 'block', got {iiv!r}")
    param = f.get("parameterization", "noncentred")
    if isinstance(param, list) and all(isinstance(k, str) for k in param):
        centred: bool | str | tuple[str, ...] = tuple(param)
        unknown = sorted(k for k in param if k not in model.parameters
                         or model.parameters[k].omega2 <= 0)
        if unknown:
            raise FitSpecError(f"{where}: [fit] parameterization: {', '.join(unknown)}: not a "
                               f"parameter of {model.name} with IIV")
    elif param in ("noncentred", "centred"):
        centred = param == "centred"
    elif param == "auto":
        centred = "auto"
    else:
        raise FitSpecError(f"{where}: [fit] parameterization: expected 'noncentred', "
                           f"'centred', 'auto' or a list of the parameters to centre, got "
                           f"{param!r}")
    likelihood = f.get("likelihood", "auto")
    if likelihood not in LIKELIHOODS:
        raise FitSpecError(f"{where}: [fit] likelihood: expected 'auto', 'periodic' or "
                           f"'sensitivity', got {likelihood!r}")
    prior_sd = f.get("prior_sd", 1.0)
    if not (isinstance(prior_sd, (int, float)) and prior_sd > 0):
        raise FitSpecError(f"{where}: [fit] prior_sd: expected a number > 0")
    sraw = doc.get("sampler", {})
    for k in sraw:
        if k not in _SPEC_KEYS["sampler"]:
            raise FitSpecError(f"{where}: [sampler] {k}: unknown key")
    sampler = Sampler(**sraw)
    sampler.check(f"{where}: [sampler]")
    out = base / f.get("output", f["name"])
    # the endpoints' observations exist (DVID values, BLQ columns): checked now, not later
    _observations(data, endpoints, where)
    individual = None
    if "individual" in f:
        try:
            individual = read_individual(base / f["individual"])
        except FitSpecError as e:
            raise FitSpecError(f"{where}: [fit] individual: {e}") from None
    per_subject = _check_individual(individual, model, priors, f"{where}: [fit] individual")
    population = None
    if "population" in f:
        if not isinstance(f["population"], str) or not f["population"]:
            raise FitSpecError(f"{where}: [fit] population: expected a string (a fit folder)")
        try:
            population = read_population(base / f["population"])
        except FitSpecError as e:
            raise FitSpecError(f"{where}: [fit] population: {e}") from None
        _check_population(population, model, priors, omega_scale, endpoints, per_subject, iiv,
                          where)
    return FitSpec(path, f["name"], model, data, endpoints, priors, omega_scale, iiv,
                   float(prior_sd), centred, sampler, out, text, individual,
                   population, likelihood)


def _parse_prior(where: str, k: str, v: object, model: Model) -> Prior:
    key = f"{where}: [priors] {k}"
    if not isinstance(v, dict):
        raise FitSpecError(f"{key}: expected a table such as {{ median = 5, sd = 0.5 }}")
    if "fixed" in v:
        val = model.parameters[k].value if v["fixed"] is True else v["fixed"]
        if not isinstance(val, (int, float)) or isinstance(val, bool):
            raise FitSpecError(f"{key}.fixed: expected true or a number")
        return Prior("fixed", float(val))
    sd = v.get("sd", 1.0)
    if not (isinstance(sd, (int, float)) and sd > 0):
        raise FitSpecError(f"{key}.sd: expected a number > 0, got {sd!r}")
    if "median" in v:
        if not (isinstance(v["median"], (int, float)) and v["median"] > 0):
            raise FitSpecError(f"{key}.median: expected a number > 0")
        return Prior("lognormal", float(v["median"]), float(sd))
    if "mean" in v:
        if not isinstance(v["mean"], (int, float)):
            raise FitSpecError(f"{key}.mean: expected a number")
        return Prior("normal", float(v["mean"]), float(sd))
    raise FitSpecError(f"{key}: expected median (log-normal), mean (normal) or fixed")


def fit_spec(spec: FitSpec | str | os.PathLike, *, progress: bool = True,
             write: bool = True) -> FitResult:
    """Run a spec and (``write``) save its results folder atomically."""
    spec = spec if isinstance(spec, FitSpec) else load_spec(spec)
    s = dataclasses.replace(spec.sampler, progress=progress and spec.sampler.progress)
    res = fit(spec.model, spec.data, spec.endpoints, priors=spec.priors,
              omega_scale=spec.omega_scale, iiv=spec.iiv, prior_sd=spec.prior_sd,
              centred=spec.centred, chains=s.chains, draws=s.draws, tune=s.tune, seed=s.seed,
              target_accept=s.target_accept, engine=s.engine, cores=s.cores,
              progress=s.progress, where=str(spec.path), individual=spec.individual,
              population=spec.population, mass_matrix=s.mass_matrix, backend=s.backend,
              likelihood=spec.likelihood, low_rank_cutoff=s.low_rank_cutoff)
    if write:
        res.save(spec.output, spec_text=spec.text)
    return res


# --------------------------------------------------------------------------- plots


def _unit(res: FitResult, output: str) -> str:
    u = res.model.outputs[output].unit
    return f" ({u})" if u else ""


def _plot_gof(res: FitResult, table: pd.DataFrame, path=None):
    import matplotlib.pyplot as plt
    from scipy.stats import norm

    t = table[table["CENS"] == 0]
    out = t["ENDPOINT"].iloc[0] if len(t) else ""
    unit = _unit(res, out) if out else ""
    tu = res.model.time_unit
    fig, ax = plt.subplots(2, 3, figsize=(13, 8))

    def ident(a, x, y):
        lo = max(min(np.nanmin(x), np.nanmin(y)), 1e-12)
        hi = max(np.nanmax(x), np.nanmax(y))
        a.plot([lo, hi], [lo, hi], "k--", lw=1)
        a.set_xscale("log")
        a.set_yscale("log")

    for a, col in ((ax[0, 0], "PRED"), (ax[0, 1], "IPRED")):
        a.scatter(t[col], t["DV"], s=8, alpha=0.5)
        ident(a, t[col].to_numpy(), t["DV"].to_numpy())
        a.set_xlabel(f"{col}{unit}")
        a.set_ylabel(f"DV{unit}")
        a.set_title(f"DV vs {col}")
    ax[0, 2].scatter(t["IPRED"], t["IWRES"].abs(), s=8, alpha=0.5)
    ax[0, 2].set_xlabel(f"IPRED{unit}")
    ax[0, 2].set_ylabel("|IWRES|")
    ax[0, 2].set_title("|IWRES| vs IPRED")
    for a, col, lab in ((ax[1, 0], "TIME", f"time ({tu})"), (ax[1, 1], "PRED", f"PRED{unit}")):
        a.scatter(t[col], t["CWRES"], s=8, alpha=0.5)
        a.axhline(0, color="k", lw=1)
        for v in (-2, 2):
            a.axhline(v, color="k", lw=0.5, ls=":")
        a.set_xlabel(lab)
        a.set_ylabel("CWRES (MC, decorrelated)")
        a.set_title(f"CWRES vs {col}")
    a = ax[1, 2]
    for col in ("CWRES", "NPDE"):
        v = np.sort(t[col].dropna().to_numpy())
        if len(v):
            q = norm.ppf((np.arange(1, len(v) + 1) - 0.5) / len(v))
            a.plot(q, v, ".", ms=3, label=col)
    a.plot([-3, 3], [-3, 3], "k--", lw=1)
    a.set_xlabel("standard normal quantile")
    a.set_ylabel("sample quantile")
    a.set_title("QQ plot")
    a.legend()
    fig.suptitle(f"{res.model.name}: goodness of fit")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def _plot_pcvpc(res: FitResult, n_sim: int = 300, bins: int = 8, path=None):
    """Prediction-corrected VPC (Bergstrand et al. 2011), one panel per endpoint."""
    import matplotlib.pyplot as plt

    b = res.built
    sims = res._simulate(n_sim)
    med = {k: float(np.median(res._draws(k))) for k in b.estimated}
    typical = res._predict(res._individual({**b.fixed, **med}, None))
    n = len(b.endpoints)
    fig, axes = plt.subplots(1, n, figsize=(8 if n == 1 else 6.5 * n, 5.5), squeeze=False)
    for ax, ep in zip(axes[0], b.endpoints, strict=True):
        o = b.obs[ep.label]
        _pcvpc_panel(ax, res, ep, o, sims["y"][ep.label], typical[ep.output][o["pos"]],
                     n_sim, bins)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def _vpc_time(res: FitResult, ep: Endpoint, rows: np.ndarray) -> tuple[np.ndarray, str]:
    """The VPC's x axis for an endpoint: time after dose for a PK output (one that depends
    only on the dose-driven linear compartments) when the subjects take repeated doses, so
    the sparse samples of every dosing interval share bins; otherwise time."""
    m = res.model
    lin = m.linear_part
    pk = (set(m.state_symbols) if m.linear is not None
          else {m.state_symbols[i] for i in lin[0]} if lin else set())
    syms = m.outputs[ep.output].expr.free_symbols & set(m.state_symbols)
    if syms and syms <= pk:
        df = res.dataset.data
        doses = df[df["EVID"].isin((1, 4))]
        n_dose = (doses.groupby("ID")["ADDL"].sum() + doses.groupby("ID").size())
        tad = res.dataset.time_after_dose()[rows]
        if n_dose.median() >= 2 and np.all(np.isfinite(tad)):
            return tad, f"time after dose ({m.time_unit})"
    return res.dataset.data["TIME"].to_numpy()[rows], f"time ({m.time_unit})"


def _pcvpc_panel(ax, res: FitResult, ep: Endpoint, o: dict, y_sim: np.ndarray,
                 pred: np.ndarray, n_sim: int, bins: int) -> None:
    t, xlabel = _vpc_time(res, ep, o["rows"])
    keep = ~o["cens"]
    nominal = np.unique(np.round(t, 6))
    if len(nominal) <= bins:  # a few nominal sampling times: one bin each
        edges = np.r_[nominal, np.inf]
    else:
        edges = np.unique(np.quantile(t, np.linspace(0, 1, bins + 1)))
    k = np.clip(np.searchsorted(edges, np.round(t, 6), side="right") - 1, 0, len(edges) - 2)
    pcorr = np.ones(len(t))
    for j in range(len(edges) - 1):
        m = k == j
        if m.any():
            pcorr[m] = np.median(pred[m]) / np.maximum(pred[m], 1e-30)
    dv_pc = o["dv"] * pcorr
    ys_pc = y_sim * pcorr
    mid, obs_q, sim_q = [], [], []
    for j in range(len(edges) - 1):
        m = (k == j) & keep
        if m.sum() < 3:
            continue
        mid.append(np.median(t[m]))
        obs_q.append(np.percentile(dv_pc[m], [5, 50, 95]))
        sq = np.percentile(ys_pc[:, m], [5, 50, 95], axis=1)  # (3, n_sim)
        sim_q.append(np.percentile(sq, [2.5, 50, 97.5], axis=1))  # (3 CI, 3 pct)
    mid = np.array(mid)
    obs_q = np.array(obs_q)
    sim_q = np.array(sim_q)
    ax.plot(t[keep], dv_pc[keep], ".", color="0.6", ms=3, label="observed (pc)")
    colors = ("tab:blue", "tab:red", "tab:blue")
    for p in range(3):
        if len(mid):
            ax.fill_between(mid, sim_q[:, 0, p], sim_q[:, 2, p], color=colors[p], alpha=0.2,
                            label="95 % CI of simulated percentiles" if p == 1 else None)
            ax.plot(mid, obs_q[:, p], color=colors[p],
                    ls="-" if p == 1 else "--", label="observed 5/50/95th" if p == 1 else None)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"prediction-corrected {ep.output}{_unit(res, ep.output)}")
    ax.set_title(f"pcVPC of {ep.label} ({n_sim} simulated replicates, {len(mid)} bins)")
    ax.legend(fontsize=8)


def _plot_individual(res: FitResult, n: int = 12, path=None):
    """DV, IPRED and PRED against time for the first ``n`` subjects (predictions on a
    dense grid between records)."""
    import matplotlib.pyplot as plt

    b = res.built
    ep = b.endpoints[0]
    df = res.dataset.data
    ids = res.built.predictor.subject_ids[:n]
    sub = df[df["ID"].isin(ids)]
    # dense EVID 2 records (inserted after the records at equal times: file order kept)
    grid_rows = []
    for i in ids:
        d = sub[sub["ID"] == i]
        tt = d["TIME"].to_numpy()
        if np.any(np.diff(tt) < 0):  # time restarts after a reset: no dense grid
            continue
        for g in np.unique(np.r_[np.linspace(tt.min(), tt.max(), 400), tt,
                                 tt + 0.5, tt + 1.0, tt + 2.0]):
            if g > tt.max():
                continue
            grid_rows.append({"ID": i, "TIME": g, "EVID": 2, "MDV": 1})
    grid = pd.DataFrame(grid_rows)
    full = pd.concat([sub.assign(_k=0), grid.assign(_k=1)], ignore_index=True)
    full = full.sort_values(["ID", "TIME", "_k"], kind="stable",
                            key=lambda c: c.map({v: j for j, v in enumerate(ids)})
                            if c.name == "ID" else c)
    full = full.drop(columns="_k").reset_index(drop=True)
    for col in ("AMT", "RATE", "II", "ADDL", "SS", "CMT"):
        full[col] = full[col].fillna(0.0)
    for col in res.model.covariates:
        if col in full:
            full[col] = full.groupby("ID")[col].transform(lambda s: s.bfill().ffill())
    rows = np.flatnonzero(full["EVID"].to_numpy() == 2)
    from .sensitivity import predictor

    lp = predictor(res.model, full, rows=rows, vary=(), method="sensitivity")
    fixed_ind = b.predictor.fixed_individual
    if fixed_ind:
        lp.fix_individual(pd.DataFrame({"ID": b.predictor.subject_ids, **fixed_ind}))
    fn = lp.compile([ep.output])
    med = {k: float(np.median(res._draws(k))) for k in b.estimated}
    theta = {**b.fixed, **med}
    pred = fn(lp.individual_typical(theta))[ep.output]
    eta = None
    if b.iiv:
        eta_all = res.idata.posterior["eta"].median(dim=("chain", "draw")).values
        pos = {v: j for j, v in enumerate(res.built.predictor.subject_ids)}
        eta = eta_all[[pos[v] for v in lp.subject_ids]]
    ind = lp.individual_typical(theta)
    if eta is not None:
        for j, k in enumerate(b.iiv):
            ind[k] = ind[k] * np.exp(eta[:, j])
    ipred = fn(ind)[ep.output]
    gid = full["ID"].to_numpy()[rows]
    gt = full["TIME"].to_numpy()[rows]
    ncol = 4
    nrow = max(1, int(np.ceil(len(ids) / ncol)))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 2.8 * nrow), squeeze=False)
    o = b.obs[ep.label]
    oid = df["ID"].to_numpy()[o["rows"]]
    ot = df["TIME"].to_numpy()[o["rows"]]
    for a, i in zip(axes.ravel(), ids, strict=False):
        m = gid == i
        a.plot(gt[m], ipred[m], "-", color="tab:blue", label="IPRED")
        a.plot(gt[m], pred[m], "--", color="0.4", label="PRED")
        mo = oid == i
        a.plot(ot[mo & ~o["cens"]], o["dv"][mo & ~o["cens"]], "o", color="tab:red", ms=4,
               label="DV")
        if (mo & o["cens"]).any():
            a.plot(ot[mo & o["cens"]], o["dv"][mo & o["cens"]], "v", color="tab:orange",
                   ms=4, label="LLOQ (BLQ)")
        a.set_title(f"ID {i:g}", fontsize=9)
        a.set_xlabel(f"time ({res.model.time_unit})", fontsize=8)
        a.set_ylabel(f"{ep.output}{_unit(res, ep.output)}", fontsize=8)
    for a in axes.ravel()[len(ids):]:
        a.axis("off")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def _plot_trace(res: FitResult, path=None):
    """Per population parameter: posterior density per chain and rank plot."""
    import arviz as az
    import matplotlib.pyplot as plt

    names = res._summary_vars()
    fig, ax = plt.subplots(len(names), 2, figsize=(10, 1.9 * len(names)), squeeze=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        az.plot_trace(res.idata, var_names=names, kind="rank_bars", axes=ax,
                      compact=False)
    for k, name in enumerate(names):
        unit = res.model.parameters[name].unit if name in res.model.parameters else ""
        ax[k, 0].set_xlabel(f"{name} ({unit})" if unit else name, fontsize=8)
        ax[k, 1].set_xlabel("rank (all chains)", fontsize=8)
        ax[k, 1].set_ylabel("chain", fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
