"""Simulation: a model file plus NONMEM records (or a regimen) → model outputs.

Linear time-invariant models take the exact path (closed form, or matrix exponential),
vectorised over subjects: one pass over the event index, all subjects at once. Everything
else, and the reference for tests, runs scipy ``solve_ivp`` through the same event table.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import sympy as sp

from .dataset import Dataset, DatasetError, for_model
from .events import (
    BOLUS,
    RATE,
    RESET,
    SS_BOLUS,
    SS_CONSTANT,
    SS_INFUSION,
    STEADY,
    DoseError,
    Doses,
    EventTable,
    build_events,
)
from .model import TIME, Model
from .regimen import Regimen
from .solvers.compiled import Unsupported, integrate_events
from .solvers.linear import Expm, Spectral, make_propagator, phi
from .solvers.ode import solve_reference

__all__ = ["Course", "simulate", "simulate_records", "simulate_regimen", "Individuals",
           "individual_parameters", "sample_etas"]

METHODS = ("auto", "closed-form", "expm", "rk", "ode")


@dataclass(frozen=True)
class Individuals:
    """Individual parameter values (one per subject) and the η used to make them."""

    params: dict[str, np.ndarray]
    eta: dict[str, np.ndarray]


def sample_etas(model: Model, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """η ~ N(0, ω²) for every parameter with IIV (diagonal Ω)."""
    return {k: rng.normal(0.0, np.sqrt(p.omega2), n) for k, p in model.parameters.items()
            if p.omega2 > 0}


def individual_parameters(model: Model, covs: Mapping[str, np.ndarray],
                          theta: Mapping[str, float] | None = None,
                          eta: Mapping[str, np.ndarray] | None = None) -> Individuals:
    """Covariate model, then × exp(η): P_i = TV(θ, covariates_i) · exp(η_i)."""
    theta = {**model.theta, **(theta or {})}
    typical = model.typical_individual(theta, covs)
    eta = dict(eta or {})
    params = {k: np.asarray(v * np.exp(eta[k]) if k in eta else v, dtype=float)
              for k, v in typical.items()}
    return Individuals(params, eta)


def simulate(model: Model, data: Dataset | pd.DataFrame, *, params: Mapping[str, float] |
             None = None, iiv: bool = False, seed: int | None = None,
             eta: Mapping[str, np.ndarray] | None = None, method: str = "auto") -> pd.DataFrame:
    """Simulate every record of a NONMEM data set; one output row per input record, in order.

    Columns: ID, TIME, EVID and every model output. Typical values unless ``iiv`` (η drawn
    with ``seed``) or ``eta`` (dict of per-subject arrays) is given.
    """
    ds = for_model(data, model)
    df = ds.data
    ids = df["ID"].to_numpy()
    first = np.r_[True, ids[1:] != ids[:-1]]
    subject = np.cumsum(first) - 1
    n_sub = int(subject[-1]) + 1
    if eta is None and iiv:
        eta = sample_etas(model, n_sub, np.random.default_rng(seed))
    try:
        amounts, par_rec, cov_rec = simulate_records(model, df, subject, n_sub, params=params,
                                                     eta=eta, method=method)
    except DoseError as exc:
        raise DatasetError(f"{ds.where(exc.record)}: {exc}") from None
    id_col = df["ID"].to_numpy()
    if np.all(id_col == np.round(id_col)):
        id_col = id_col.astype(np.int64)
    out = pd.DataFrame({"ID": id_col, "TIME": df["TIME"].to_numpy(),
                        "EVID": df["EVID"].to_numpy().astype(int)})
    t = df["TIME"].to_numpy(dtype=float)
    for name, o in model.outputs.items():
        out[name] = model.compile(o.expr, states=True, time=True)(par_rec, cov_rec, amounts, t)
    return out


def simulate_records(model: Model, df: pd.DataFrame, subject: np.ndarray, n_sub: int, *,
                     params: Mapping[str, float] | None = None,
                     eta: Mapping[str, np.ndarray] | None = None, method: str = "auto",
                     grid: np.ndarray | None = None, rtol: float = 1e-5, atol: float = 1e-8,
                     individual: Mapping[str, np.ndarray] | None = None,
                     x_start: np.ndarray | None = None, all_states: bool = False,
                     ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Amounts, state-major: (n_states, n_records), or (n_states, len(grid), n_sub) at every
    ``grid`` time of every subject.

    ``df`` holds the standard NONMEM columns (upper case, filled) and the model's covariates.
    Also returns individual parameters and covariates that broadcast against the outputs.
    Methods: linear models use the closed form or the matrix exponential (exact); nonlinear
    ones "rk" (compiled Dormand–Prince per subject, ``rtol``/``atol``, with the model's
    linear part in closed form; :mod:`pkpd.solvers.compiled`) unless the records need the
    reference "ode" (scipy solve_ivp per subject; steady state, resets with time reversal).

    For simulation in segments (e.g. dose decisions week by week): ``individual`` gives the
    subjects' parameter values directly, ``x_start`` (n_sub, n_states) the amounts at each
    subject's first record (instead of the model's ``init``), and ``all_states`` computes
    every state at the outputs, not only those the outputs read.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    col = {k: df[k].to_numpy(dtype=float) for k in df.columns if k in _NEEDED or
           k in model.covariates}
    first = np.r_[True, subject[1:] != subject[:-1]]
    cov_rec = {k: col[k] for k in model.covariates}
    cov_sub = {k: v[first] for k, v in cov_rec.items()}
    _warn_time_varying(model, cov_rec, cov_sub, subject)
    if individual is None:
        individual = individual_parameters(model, cov_sub, params, eta).params
    par_sub = {k: np.broadcast_to(np.asarray(v, dtype=float), (n_sub,))
               for k, v in individual.items()}
    par_rec = {k: v[subject] for k, v in par_sub.items()}

    # dose parameters of each record's compartment (Fn, ALAGn, Rn, Dn) -------------------
    numbers = model.cmt_numbers
    cmt_no = col["CMT"].astype(int)
    cmt_no = np.where(cmt_no == 0, model.default_dose_cmt, cmt_no)
    state = np.array([numbers.get(c, 0) for c in range(max(numbers) + 1)])[cmt_no]
    dose_par = {"F": np.ones(len(cmt_no)), "ALAG": np.zeros(len(cmt_no)),
                "R": np.full(len(cmt_no), np.nan), "D": np.full(len(cmt_no), np.nan)}
    for key, expr in model.dosing.items():
        kind, n = key.rstrip("0123456789"), int(key[len(key.rstrip("0123456789")):])
        mask = cmt_no == n
        if mask.any():
            vals = model.compile(expr)(par_rec, cov_rec)
            dose_par[kind][mask] = np.broadcast_to(vals, mask.shape)[mask]
    doses = Doses(subject=subject, time=col["TIME"], evid=col["EVID"], amt=col["AMT"],
                  cmt=state, rate=col["RATE"], ii=col["II"], addl=col["ADDL"], ss=col["SS"],
                  f=dose_par["F"], lag=dose_par["ALAG"], rate_model=dose_par["R"],
                  dur_model=dose_par["D"])
    events = build_events(doses)

    # outputs: each sees the last event processed before it ----------------------------------
    if grid is None:
        out_time, out_subject = col["TIME"], subject
        out_event = np.searchsorted(events.slot, np.arange(len(subject)), side="right") - 1
        o_par, o_cov = par_rec, cov_rec
    else:  # a time grid shared by all subjects; flat (subject-major) arrays only if needed
        grid = np.asarray(grid, dtype=float)
        out_event = out_subject = out_time = None
        o_par, o_cov = par_sub, cov_sub  # broadcast against (T, n_sub)

    def flat_grid():
        last = _last_event_on_grid(events, grid, n_sub).T.reshape(-1)
        return np.repeat(np.arange(n_sub), len(grid)), np.tile(grid, n_sub), last

    if x_start is None:
        x0 = _per_subject(model, [c.init for c in model.compartments], par_sub, cov_sub, n_sub)
    else:
        x0 = np.array(x_start, dtype=float).reshape(n_sub, model.n_states)
    lin = model.linear
    if lin is not None and method != "ode":
        A = _per_subject_matrix(model, lin.A, par_sub, cov_sub, n_sub)
        base = _per_subject(model, list(lin.c), par_sub, cov_sub, n_sub)
        prop = make_propagator(A, lin.blocks, method=method)
        used = list(range(model.n_states)) if all_states else sorted(
            {i for o in model.outputs.values() for i, x in enumerate(model.state_symbols)
             if x in o.expr.free_symbols})
        if isinstance(prop, Spectral):
            X, R, Y, YR = _run_linear(events, prop, x0, base, modal=used)
        else:
            X, R = _run_linear(events, prop, x0, base)
            Y = YR = None
        if grid is not None and Y is not None:
            amounts = _observe_grid(prop, events, Y, YR, grid, n_sub, used, n_states=len(x0[0]))
        else:
            if out_event is None:
                out_subject, out_time, out_event = flat_grid()
            amounts = _observe(prop, events, X, R, Y, YR, out_subject, out_time, out_event,
                               used).T
    else:
        if method in ("closed-form", "expm"):
            raise ValueError(f"{model.name}: {method} needs a linear time-invariant model")
        amounts = None
        if method in ("auto", "rk"):
            try:
                if out_event is None:
                    out_subject, out_time, out_event = flat_grid()
                p = _parameter_table(model, par_sub, cov_sub, n_sub)
                amounts = integrate_events(model, events, x0, p, out_subject, out_time,
                                           out_event, exact=_exact_part(model, par_sub, cov_sub,
                                                                        n_sub),
                                           rtol=rtol, atol=atol).T
            except Unsupported:
                if method == "rk":
                    raise
    if amounts is None:
        if out_event is None:
            out_subject, out_time, out_event = flat_grid()
        amounts = solve_reference(_rhs(model, par_sub, cov_sub, n_sub), events, x0, out_subject,
                                  out_time, out_event, rtol=min(rtol, 1e-10),
                                  atol=min(atol, 1e-12)).T
    if grid is not None and amounts.ndim == 2:  # (n, n_sub·T) subject-major → (n, T, n_sub)
        amounts = amounts.reshape(-1, n_sub, len(grid)).transpose(0, 2, 1)
    return amounts, o_par, o_cov


_NEEDED = ("TIME", "EVID", "AMT", "CMT", "RATE", "II", "ADDL", "SS")


class Course:
    """Subjects simulated segment by segment (e.g. week by week, with dose decisions between
    segments) by the compiled solver, with the model, individual parameters and covariates
    bound once. Each segment starts from the amounts the previous one ended with.

    ``individual`` and ``covariates`` map names to one value per subject; ``x0`` (n, S) the
    starting amounts (default: the model's ``init``). Doses are boluses into the model's dose
    compartment, with its F and lag.
    """

    def __init__(self, model: Model, individual: Mapping[str, np.ndarray],
                 covariates: Mapping[str, np.ndarray], *, x0: np.ndarray | None = None,
                 rtol: float = 1e-5, atol: float = 1e-8):
        n = len(next(iter(individual.values())))
        self.model, self.n, self.rtol, self.atol = model, n, rtol, atol
        self.par = {k: np.broadcast_to(np.asarray(v, dtype=float), (n,)) for k, v in
                    individual.items()}
        self.cov = {k: np.broadcast_to(np.asarray(covariates[k], dtype=float), (n,))
                    for k in model.covariates}
        self.p = _parameter_table(model, self.par, self.cov, n)
        self.exact = _exact_part(model, self.par, self.cov, n)
        self.x = (_per_subject(model, [c.init for c in model.compartments], self.par, self.cov,
                               n) if x0 is None else np.array(x0, dtype=float))
        cmt = model.default_dose_cmt
        dose_par = {"F": 1.0, "ALAG": 0.0}
        for key, expr in model.dosing.items():
            kind = key.rstrip("0123456789")
            if kind in dose_par and int(key[len(kind):]) == cmt:
                dose_par[kind] = model.compile(expr)(self.par, self.cov)
        self.f = np.broadcast_to(dose_par["F"], (n,))
        self.lag = np.broadcast_to(dose_par["ALAG"], (n,))
        self.state = model.cmt_numbers[cmt]

    def run(self, t0: float, grid: np.ndarray, subject: np.ndarray, time: np.ndarray,
            amt: np.ndarray) -> np.ndarray:
        """Amounts (S, len(grid), n) from ``t0`` on; doses (mg) of ``subject`` at ``time``
        (≥ t0, sorted by subject then time; lagged doses must fall within the segment).
        Advances the course to ``grid[-1]``."""
        n = self.n
        first = np.arange(n)
        sub = np.r_[first, subject].astype(np.int64)
        order = np.lexsort((np.r_[np.zeros(n), np.ones(len(subject))], np.r_[
            np.full(n, t0), time], sub))
        m = len(order)
        is_dose = np.r_[np.zeros(n, bool), np.ones(len(subject), bool)][order]
        sub = sub[order]
        doses = Doses(subject=sub, time=np.r_[np.full(n, t0), time][order],
                      evid=np.where(is_dose, 1.0, 2.0), amt=np.r_[np.zeros(n), amt][order],
                      cmt=np.full(m, self.state), rate=np.zeros(m), ii=np.zeros(m),
                      addl=np.zeros(m), ss=np.zeros(m), f=self.f[sub], lag=self.lag[sub],
                      rate_model=np.full(m, np.nan), dur_model=np.full(m, np.nan))
        events = build_events(doses)
        grid = np.asarray(grid, dtype=float)
        last = _last_event_on_grid(events, grid, n).T.reshape(-1)
        out = integrate_events(self.model, events, self.x, self.p,
                               np.repeat(first, len(grid)), np.tile(grid, n), last,
                               exact=self.exact, rtol=self.rtol, atol=self.atol)
        amounts = out.reshape(n, len(grid), -1).transpose(2, 1, 0)
        self.x = amounts[:, -1, :].T.copy()
        return amounts


def _warn_time_varying(model: Model, cov_rec, cov_sub, subject: np.ndarray) -> None:
    """Covariates in the covariate model, ODEs or initial amounts are taken at each subject's
    first record (NONMEM would update them record by record): say so when they vary."""
    structural = set().union(*(e.free_symbols for e in [*model.individual.values(),
                                                        *model.odes.values(),
                                                        *(c.init for c in model.compartments)]))
    varying = [k for k in model.covariates if sp.Symbol(k, real=True) in structural
               and np.any(cov_rec[k] != cov_sub[k][subject])]
    if varying:
        warnings.warn(f"{model.name}: covariate(s) {', '.join(varying)} change within a "
                      "subject; the structural model uses each subject's first-record value",
                      stacklevel=3)


def _per_subject(model: Model, exprs: Sequence[sp.Expr], par, cov, n_sub: int) -> np.ndarray:
    cols = [np.broadcast_to(model.compile(e)(par, cov), (n_sub,)) for e in exprs]
    return np.stack(cols, axis=-1).astype(float).copy()


def _per_subject_matrix(model: Model, A: sp.Matrix, par, cov, n_sub: int) -> np.ndarray:
    n = A.shape[0]
    out = np.zeros((n_sub, n, n))
    for i in range(n):
        for j in range(n):
            if A[i, j] != 0:
                out[:, i, j] = model.compile(A[i, j])(par, cov)
    return out


def _parameter_table(model: Model, par, cov, n_sub: int) -> np.ndarray:
    """(n_sub, parameters + covariates) in the model's order: the compiled kernels' ``p``."""
    cols = [np.broadcast_to(np.asarray(par[k], dtype=float), (n_sub,)) for k in model.parameters]
    cols += [np.broadcast_to(np.asarray(cov[k], dtype=float), (n_sub,))
             for k in model.covariates]
    return np.stack(cols, axis=1) if cols else np.zeros((n_sub, 0))


def _exact_part(model: Model, par, cov, n_sub: int) -> Spectral | None:
    """Closed form of the model's linear part for these subjects (None: none, or not
    well-conditioned for some subject; then every state is integrated)."""
    part = model.linear_part
    if part is None:
        return None
    _, lin = part
    if not lin.closed_form:
        return None
    A = _per_subject_matrix(model, lin.A, par, cov, n_sub)
    if not Spectral.well_conditioned(A, lin.blocks):
        return None
    prop = Spectral(A, lin.blocks)
    prop.base = _per_subject(model, list(lin.c), par, cov, n_sub)
    return prop


def _rhs(model: Model, par, cov, n_sub: int):
    """dx/dt of one subject for the reference solver: (s, t, x, r) → (S,)."""
    args = [sp.Symbol(k, real=True) for k in (*model.parameters, *model.covariates)]
    fn = sp.lambdify([*args, *model.state_symbols, TIME],
                     [model.odes[k] for k in model.states], modules="math", cse=True)
    table = _parameter_table(model, par, cov, n_sub)
    cache: dict[int, list[float]] = {}

    def rhs(s: int, t: float, x: np.ndarray, r: np.ndarray) -> np.ndarray:
        vals = cache.get(s)
        if vals is None:
            vals = cache[s] = table[s].tolist()
        return np.array(fn(*vals, *x.tolist(), t), dtype=float) + r

    return rhs


def _run_linear(ev: EventTable, prop: Spectral | Expm, x0: np.ndarray, base: np.ndarray,
                modal: Sequence[int] | None = None) -> tuple[np.ndarray, ...]:
    """Amounts and input rates just after each event: one step per event index, all subjects
    at once (in the propagator's coordinates: modal for the closed form).

    With ``modal`` (closed form only) also returns the modal coordinates of those states
    after each event, (n_events, modes, len(modal)), for amounts and for rates.
    """
    n_sub, n = x0.shape
    bounds = np.searchsorted(ev.subject, np.arange(n_sub + 1))
    count = np.diff(bounds)
    X = np.empty((len(ev), n))
    R = np.zeros((len(ev), n))
    everyone = np.arange(n_sub)
    s0, sbase = prop.coords(x0, everyone), prop.coords(base, everyone)
    s, sr = s0.copy(), sbase.copy()
    t = np.zeros(n_sub)
    if modal is not None:
        Y = np.empty((len(ev), s.shape[1], len(modal)))
        YR = np.zeros_like(Y)
    # without infusions or constant inputs the rate terms are skipped altogether
    rates = bool(np.any(base != 0) or np.any(ev.kind == RATE) or np.any(
        ev.ss_type == SS_INFUSION))
    for step in range(int(count.max(initial=0))):
        active = count > step
        everyone_active = bool(active.all())
        sidx = everyone if everyone_active else np.flatnonzero(active)
        e = bounds[sidx] + step
        kind = ev.kind[e]
        dt = np.where(kind == RESET, 0.0, ev.time[e] - t[sidx])
        srs = (sr if everyone_active else sr[sidx]) if rates else None
        ss = prop.advance(s if everyone_active else s[sidx], srs, dt, sidx)
        m = np.flatnonzero(kind == RESET)
        if len(m):
            ss[m] = s0[sidx[m]]
            if rates:
                srs[m] = sbase[sidx[m]]
        m = np.flatnonzero(kind == BOLUS)
        if len(m) == len(e):  # everyone doses at this step (the usual regimen case)
            ss += _scale(ev.value[e], prop.unit(sidx, ev.cmt[e]))
        elif len(m):
            ss[m] += _scale(ev.value[e[m]], prop.unit(sidx[m], ev.cmt[e[m]]))
        m = np.flatnonzero(kind == RATE)
        if len(m):
            srs[m] += _scale(ev.value[e[m]], prop.unit(sidx[m], ev.cmt[e[m]]))
        m = np.flatnonzero(kind == STEADY)
        if len(m):
            xss, on = _steady_state(prop, ev, e[m], sidx[m], n, base[sidx[m]])
            reset = ev.ss_mode[ev.ss_row[e[m]]] == 1
            cs = prop.coords(xss, sidx[m])
            ss[m] = np.where(_expand(reset, cs), cs, ss[m] + cs)
            if rates:
                srs[m] = np.where(_expand(reset, cs), sbase[sidx[m]], srs[m])
                srs[m] += _scale(on * ev.ss_rate[ev.ss_row[e[m]]],
                                 prop.unit(sidx[m], ev.cmt[e[m]]))
        if everyone_active:
            s = ss
        else:
            s[sidx] = ss
        t[sidx] = ev.time[e]
        X[e] = prop.amounts(ss)
        if modal is not None:
            Y[e] = ss[:, :, modal]
        if rates:
            if everyone_active:
                sr = srs
            else:
                sr[sidx] = srs
            R[e] = prop.amounts(srs)
            if modal is not None:
                YR[e] = srs[:, :, modal]
    if modal is not None:
        return X, R, Y, YR
    return X, R


def _scale(v: np.ndarray, arr: np.ndarray) -> np.ndarray:
    return v.reshape(-1, *([1] * (arr.ndim - 1))) * arr


def _expand(mask: np.ndarray, like: np.ndarray) -> np.ndarray:
    return mask.reshape(-1, *([1] * (like.ndim - 1)))


def _steady_state(prop, ev: EventTable, e: np.ndarray, sidx: np.ndarray, n: int,
                  base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Amounts at SS records (doses every II since −∞, lagged by ALAG) and running infusions.

    With s_k = k·II − ALAG the time since the k-th previous dose started: bolus doses give
    e^{A s_k0}(I − e^{A II})^{-1} d; infusions still running (s_k < D) give ∫_0^{s_k}e^{As}ds·r,
    finished ones e^{A(s_k1 − D)}(I − e^{A II})^{-1}∫_0^D e^{As}ds·r. SS=1 also puts states fed
    by constant inputs at their own steady state.
    """
    k = len(e)
    idx = np.arange(k)
    unit = np.zeros((k, n))
    unit[idx, ev.cmt[e]] = 1.0
    row = ev.ss_row[e]
    typ, ii, lag, dur = ev.ss_type[row], ev.ss_ii[row], ev.ss_lag[row], ev.ss_dur[row]
    k0, k1 = ev.ss_k0[row].astype(int), ev.ss_k1[row].astype(int)
    rate = ev.ss_rate[row][:, None] * unit
    x = np.zeros((k, n))

    def mv(Mat, v):
        return np.einsum("kab,kb->ka", Mat, v)

    b = typ == SS_BOLUS
    if b.any():
        M, _ = prop.transition(k0[b] * ii[b] - lag[b], sidx[b])
        x[b] = mv(M, mv(prop.geometric(ii[b], sidx[b]), ev.ss_amt[row][b, None] * unit[b]))
    f = typ == SS_INFUSION
    if f.any():
        _, N = prop.transition(dur[f], sidx[f])
        M, _ = prop.transition(k1[f] * ii[f] - lag[f] - dur[f], sidx[f])
        x[f] = mv(M, mv(prop.geometric(ii[f], sidx[f]), mv(N, rate[f])))
        running = (k1 - k0) * f
        for j in range(int(running.max(initial=0))):
            m = running > j
            _, N = prop.transition((k0[m] + j) * ii[m] - lag[m], sidx[m])
            x[m] += mv(N, rate[m])
    c = typ == SS_CONSTANT
    if c.any():
        x[c] = mv(prop.neg_inverse(sidx[c]), rate[c])
    has_base = np.any(base != 0, axis=1) & (ev.ss_mode[row] == 1)
    if has_base.any():
        x[has_base] += mv(prop.neg_inverse(sidx[has_base]), base[has_base])
    on = np.where(f, k1 - k0, 0)
    return x, on


def _observe(prop, ev: EventTable, X: np.ndarray, R: np.ndarray, Y: np.ndarray | None,
             YR: np.ndarray | None, subj: np.ndarray, time: np.ndarray, last: np.ndarray,
             used: Sequence[int], chunk: int = 500_000) -> np.ndarray:
    """Amounts at output times from the state after each output's last event.

    With the closed form, ``Y``/``YR`` are the modal coordinates of the ``used`` states after
    each event (x(t) = Σ_i e^{λ_i Δt} y_i + φ(λ_i, Δt) yr_i) and only those states are
    computed (the others are NaN); otherwise amounts ``X`` and rates ``R`` are propagated.
    """
    n = X.shape[1]
    out = np.full((len(time), n), np.nan)
    used = list(used)
    if not used:
        return out
    rates = Y is not None and bool(np.any(YR != 0))
    for a in range(0, len(time), chunk):
        sl = slice(a, a + chunk)
        e = last[sl]
        dt = time[sl] - ev.time[e]
        if Y is not None:
            lam = prop.lam[subj[sl]]
            x = np.einsum("ki,kia->ka", np.exp(lam * dt[:, None]), Y[e])
            if rates:
                x += np.einsum("ki,kia->ka", phi(lam, dt[:, None]), YR[e])
            out[sl, used] = x
        else:
            M, N = prop.transition(dt, subj[sl])
            out[sl] = np.einsum("kab,kb->ka", M, X[e]) + np.einsum("kab,kb->ka", N, R[e])
    return out


def _observe_grid(prop: Spectral, ev: EventTable, Y: np.ndarray, YR: np.ndarray,
                  grid: np.ndarray, n_sub: int, used: Sequence[int],
                  n_states: int) -> np.ndarray:
    """Amounts (n_states, T, n_sub) on a time grid shared by all subjects, stepping along it.

    Between events each mode decays by e^{λ·h} per grid step h (computed once per distinct
    step), so the cost is O(T × n_sub × modes) multiplications and no exponentials per
    output. An event at a grid time is included in that output. States the outputs do not
    read are left unset. ``Y``/``YR`` are the modal coordinates of the ``used`` states after
    each event (amounts and input rates).
    """
    T = len(grid)
    out = np.empty((n_states, T, n_sub))
    used = list(used)
    if not used:
        return out
    # events grouped by the first grid index that sees them; within a group only the last
    # event of each subject matters (its state already includes the earlier ones)
    pos = np.searchsorted(grid, ev.time, side="left")
    order = np.argsort(pos, kind="stable")  # stays subject-major, in processing order
    pos_sorted = pos[order]
    keep = np.r_[(ev.subject[order][1:] != ev.subject[order][:-1])
                 | (pos_sorted[1:] != pos_sorted[:-1]), True]
    order, pos_sorted = order[keep], pos_sorted[keep]
    bounds = np.searchsorted(pos_sorted, np.arange(T + 1))
    if bounds[1] - bounds[0] != n_sub or np.any(ev.time[order[:bounds[1]]] > grid[0]):
        raise ValueError("every subject needs a record at or before the first output time")
    lam_t = np.ascontiguousarray(prop.lam.T)  # (modes, n_sub)
    m, u = lam_t.shape[0], len(used)
    z = np.zeros((m, u, n_sub))  # modal amounts of the used states
    zr = np.zeros_like(z)  # modal input rates
    any_rate = bool(np.any(YR != 0))
    steps: dict[float, tuple[np.ndarray, np.ndarray]] = {}
    for j in range(T):
        if j:
            h = float(grid[j] - grid[j - 1])
            if h not in steps:
                steps[h] = (np.exp(lam_t * h)[:, None, :], phi(lam_t, h)[:, None, :])
            E, F = steps[h]
            z *= E
            if any_rate:
                z += F * zr
        if bounds[j + 1] > bounds[j]:
            ee = order[bounds[j]:bounds[j + 1]]
            changed = ev.subject[ee]
            dt = (grid[j] - ev.time[ee])[:, None]
            lam = prop.lam[changed]
            y = Y[ee].transpose(1, 2, 0)  # (modes, used, k)
            zc = np.exp(lam * dt).T[:, None, :] * y
            if any_rate:
                yr = YR[ee].transpose(1, 2, 0)
                zc += phi(lam, dt).T[:, None, :] * yr
                zr[:, :, changed] = yr
            z[:, :, changed] = zc
        for k, state in enumerate(used):  # explicit adds: much faster than z.sum(axis=0)
            o = out[state, j]
            if m == 1:
                o[:] = z[0, k]
            else:
                np.add(z[0, k], z[1, k], out=o)
                for i in range(2, m):
                    o += z[i, k]
    return out


def _last_event_on_grid(ev: EventTable, grid: np.ndarray, n_sub: int) -> np.ndarray:
    """(T, n_sub) index of the last event at or before each grid time (events at a grid time
    come first: a dose at t is in the output at t). Grid subjects have no resets."""
    bounds = np.searchsorted(ev.subject, np.arange(n_sub + 1))
    pos = np.searchsorted(grid, ev.time, side="left")
    counts = np.zeros((len(grid) + 1, n_sub), dtype=np.int64)
    np.add.at(counts, (pos, ev.subject), 1)
    seen = np.cumsum(counts[:-1], axis=0)
    if np.any(seen[0] == 0):
        raise ValueError("output times must not precede the first record")
    seen += bounds[:-1] - 1
    return seen


def simulate_regimen(model: Model, regimen: Regimen | str, times: np.ndarray, *, n: int = 1,
                     iiv: bool | None = None, seed: int | None = None,
                     covariates: Mapping[str, float | np.ndarray] | None = None,
                     params: Mapping[str, float] | None = None, cmt: int | None = None,
                     method: str = "auto") -> dict[str, np.ndarray]:
    """Simulate ``n`` subjects on one regimen; outputs as arrays of shape (n, len(times)).

    IIV is on when ``n > 1`` unless ``iiv=False``. ``covariates`` gives one value or one value
    per subject for each covariate (model defaults otherwise). Doses go to ``cmt`` (default:
    the model's dose compartment). A dose at an output time is included in that output.
    """
    reg = Regimen.parse(regimen) if isinstance(regimen, str) else regimen
    times = np.asarray(times, dtype=float)
    if times.ndim != 1 or len(times) == 0 or np.any(np.diff(times) < 0) or times[0] < 0:
        raise ValueError("times must be a non-empty, sorted 1-D array of times >= 0")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    iiv = n > 1 if iiv is None else iiv
    rec = reg.to_records(cmt=cmt or model.default_dose_cmt, until=float(times[-1]) + 1e-9)
    # EVID 2 records at the first and last output times: the subject starts at time 0 and the
    # implied doses (ADDL) up to the last output are kept
    def other(t: float) -> pd.DataFrame:
        return pd.DataFrame({"ID": [1], "TIME": [t], "EVID": [2], "AMT": [0.0], "CMT": [0],
                             "II": [0.0], "ADDL": [0]})

    rec = pd.concat([other(0.0), rec, other(float(times[-1]))], ignore_index=True)
    m = len(rec)
    df = pd.DataFrame({k: np.tile(rec[k].to_numpy(dtype=float), n) if k in rec else
                       np.zeros(n * m) for k in _NEEDED})
    subject = np.repeat(np.arange(n), m)
    for k, c in model.covariates.items():
        v = (covariates or {}).get(k, c.default)
        if v is None:
            raise ValueError(f"covariate {k} has no default in {model.name}: give a value")
        v = np.broadcast_to(np.asarray(v, dtype=float), (n,))
        df[k] = v[subject]
    eta = sample_etas(model, n, np.random.default_rng(seed)) if iiv else None
    amounts, par, cov = simulate_records(model, df, subject, n, params=params, eta=eta,
                                         method=method, grid=times)
    return {name: model.compile(o.expr, states=True, time=True)(par, cov, amounts,
                                                                 times[:, None]).T
            for name, o in model.outputs.items()}
