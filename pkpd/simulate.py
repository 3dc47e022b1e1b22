"""Simulation: a model file plus NONMEM records (or a regimen) → model outputs.

Linear time-invariant models take the exact path (closed form, or matrix exponential),
vectorised over subjects: one pass over the event index, all subjects at once. Everything
else, and the reference for tests, runs scipy ``solve_ivp`` through the same event table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import sympy as sp

from .dataset import Dataset, DatasetError, check_against_model, from_frame
from .events import (
    BOLUS,
    RATE,
    RESET,
    SS_BOLUS,
    SS_CONSTANT,
    SS_INFUSION,
    STEADY,
    Doses,
    DoseError,
    EventTable,
    build_events,
)
from .model import TIME, Model
from .solvers.linear import Expm, Spectral, make_propagator
from .solvers.ode import solve_reference

__all__ = ["simulate", "simulate_records", "Individuals", "individual_parameters",
           "sample_etas"]

METHODS = ("auto", "closed-form", "expm", "ode")


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
    ds = data if isinstance(data, Dataset) else from_frame(data)
    ds = check_against_model(
        ds, compartments=set(model.cmt_numbers), modeled_rate=model.modeled_rate_cmts,
        modeled_duration=model.modeled_duration_cmts,
        covariates={k: c.default for k, c in model.covariates.items()},
        default_dose_cmt=model.default_dose_cmt) or ds
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
    out = pd.DataFrame({"ID": df["ID"].to_numpy(), "TIME": df["TIME"].to_numpy(),
                        "EVID": df["EVID"].to_numpy().astype(int)})
    t = df["TIME"].to_numpy(dtype=float)
    for name, o in model.outputs.items():
        out[name] = model.compile(o.expr, states=True, time=True)(par_rec, cov_rec, amounts, t)
    return out


def simulate_records(model: Model, df: pd.DataFrame, subject: np.ndarray, n_sub: int, *,
                     params: Mapping[str, float] | None = None,
                     eta: Mapping[str, np.ndarray] | None = None, method: str = "auto",
                     out_time: np.ndarray | None = None, out_subject: np.ndarray | None = None,
                     ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Amounts (n_out, n_states) at every record (or at ``out_time``/``out_subject``).

    ``df`` holds the standard NONMEM columns (upper case, filled) and the model's covariates.
    Also returns individual parameters and covariates aligned with the outputs.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    col = {k: df[k].to_numpy(dtype=float) for k in df.columns if k in _NEEDED or
           k in model.covariates}
    first = np.r_[True, subject[1:] != subject[:-1]]
    cov_rec = {k: col[k] for k in model.covariates}
    cov_sub = {k: v[first] for k, v in cov_rec.items()}
    ind = individual_parameters(model, cov_sub, params, eta)
    par_sub = {k: np.broadcast_to(v, (n_sub,)) for k, v in ind.params.items()}
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
    events = build_events(doses, n_sub)

    # outputs: each sees the last event processed before it ----------------------------------
    if out_time is None:
        out_time, out_subject = col["TIME"], subject
        out_event = np.searchsorted(events.slot, np.arange(len(subject)), side="right") - 1
        o_par, o_cov = par_rec, cov_rec
    else:
        out_event = _last_event_on_grid(events, out_subject, out_time, n_sub)
        o_par = {k: v[out_subject] for k, v in par_sub.items()}
        o_cov = {k: v[out_subject] for k, v in cov_sub.items()}

    x0 = _per_subject(model, [c.init for c in model.compartments], par_sub, cov_sub, n_sub)
    lin = model.linear
    if lin is not None and method != "ode":
        A = _per_subject_matrix(model, lin.A, par_sub, cov_sub, n_sub)
        base = _per_subject(model, list(lin.c), par_sub, cov_sub, n_sub)
        prop = make_propagator(A, lin.blocks, method=method)
        X, R = _run_linear(events, prop, x0, base)
        amounts = _observe(prop, events, X, R, out_subject, out_time, out_event)
    else:
        if method in ("closed-form", "expm"):
            raise ValueError(f"{model.name}: {method} needs a linear time-invariant model")
        amounts = solve_reference(_rhs(model, par_sub, cov_sub), events, x0, out_subject,
                                  out_time, out_event)
    return amounts, o_par, o_cov


_NEEDED = ("TIME", "EVID", "AMT", "CMT", "RATE", "II", "ADDL", "SS")


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


def _rhs(model: Model, par, cov):
    f = model.compile(sp.Matrix([model.odes[s] for s in model.states]), states=True, time=True)

    def rhs(s: int, t: float, x: np.ndarray, r: np.ndarray) -> np.ndarray:
        p = {k: v[s] for k, v in par.items()}
        c = {k: v[s] for k, v in cov.items()}
        return np.asarray(f(p, c, x, t), dtype=float).reshape(-1) + r

    return rhs


def _run_linear(ev: EventTable, prop: Spectral | Expm, x0: np.ndarray,
                base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """State (amounts) and input rates just after each event; one step per event index."""
    n_sub, n = x0.shape
    bounds = np.searchsorted(ev.subject, np.arange(n_sub + 1))
    count = np.diff(bounds)
    X = np.empty((len(ev), n))
    R = np.empty((len(ev), n))
    x = x0.copy()
    r = base.copy()
    t = np.zeros(n_sub)
    for step in range(int(count.max(initial=0))):
        sidx = np.flatnonzero(count > step)
        e = bounds[sidx] + step
        kind = ev.kind[e]
        dt = np.where(kind == RESET, 0.0, ev.time[e] - t[sidx])
        M, N = prop.transition(dt, sidx)
        xs = np.einsum("kab,kb->ka", M, x[sidx]) + np.einsum("kab,kb->ka", N, r[sidx])
        rs = r[sidx]
        m = kind == RESET
        xs[m], rs[m] = x0[sidx[m]], base[sidx[m]]
        m = np.flatnonzero(kind == BOLUS)
        xs[m, ev.cmt[e[m]]] += ev.value[e[m]]
        m = np.flatnonzero(kind == RATE)
        rs[m, ev.cmt[e[m]]] += ev.value[e[m]]
        m = np.flatnonzero(kind == STEADY)
        if len(m):
            xss, on = _steady_state(prop, ev, e[m], sidx[m], n, base[sidx[m]])
            reset = ev.ss_mode[e[m]] == 1
            xs[m] = np.where(reset[:, None], xss, xs[m] + xss)
            rs[m] = np.where(reset[:, None], base[sidx[m]], rs[m])
            rs[m, ev.cmt[e[m]]] += on * ev.ss_rate[e[m]]
        x[sidx], r[sidx], t[sidx] = xs, rs, ev.time[e]
        X[e], R[e] = xs, rs
    return X, R


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
    typ, ii, lag, dur = ev.ss_type[e], ev.ss_ii[e], ev.ss_lag[e], ev.ss_dur[e]
    k0, k1 = ev.ss_k0[e].astype(int), ev.ss_k1[e].astype(int)
    rate = ev.ss_rate[e][:, None] * unit
    x = np.zeros((k, n))

    def mv(Mat, v):
        return np.einsum("kab,kb->ka", Mat, v)

    b = typ == SS_BOLUS
    if b.any():
        M, _ = prop.transition(k0[b] * ii[b] - lag[b], sidx[b])
        x[b] = mv(M, mv(prop.geometric(ii[b], sidx[b]), ev.ss_amt[e][b, None] * unit[b]))
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
    has_base = np.any(base != 0, axis=1) & (ev.ss_mode[e] == 1)
    if has_base.any():
        x[has_base] += mv(prop.neg_inverse(sidx[has_base]), base[has_base])
    on = np.where(f, k1 - k0, 0)
    return x, on


def _observe(prop, ev: EventTable, X: np.ndarray, R: np.ndarray, subj: np.ndarray,
             time: np.ndarray, last: np.ndarray, chunk: int = 400_000) -> np.ndarray:
    """Amounts at output times from the state after each output's last event."""
    out = np.empty((len(time), X.shape[1]))
    if isinstance(prop, Spectral):
        Y = np.einsum("kiab,kb->kia", prop.P[ev.subject], X)  # modal components per event
        active = np.any(R != 0, axis=1)
        YR = np.einsum("kiab,kb->kia", prop.P[ev.subject[active]], R[active])
        where_r = np.full(len(ev), -1)
        where_r[active] = np.arange(active.sum())
    for a in range(0, len(time), chunk):
        sl = slice(a, a + chunk)
        e = last[sl]
        dt = time[sl] - ev.time[e]
        if isinstance(prop, Spectral):
            wr = where_r[e]
            x = prop.observe(Y[e], None, subj[sl], dt)
            has = wr >= 0
            if has.any():
                from .solvers.linear import phi

                lam = prop.lam[subj[sl][has]]
                x[has] += np.einsum("ki,kia->ka", phi(lam, dt[has, None]), YR[wr[has]])
            out[sl] = x
        else:
            M, N = prop.transition(dt, subj[sl])
            out[sl] = np.einsum("kab,kb->ka", M, X[e]) + np.einsum("kab,kb->ka", N, R[e])
    return out


def _last_event_on_grid(ev: EventTable, subj: np.ndarray, time: np.ndarray,
                        n_sub: int) -> np.ndarray:
    """For outputs on a per-subject time grid (no resets): index of the last event at or
    before each output time (events at the output time come first)."""
    order = np.lexsort((time, subj))
    if np.any(order != np.arange(len(order))):
        raise ValueError("output times must be sorted by subject, then time")
    bounds = np.searchsorted(ev.subject, np.arange(n_sub + 1))
    obounds = np.searchsorted(subj, np.arange(n_sub + 1))
    # global sortable keys: subject offset + time rank within the combined time axis
    t_all = np.concatenate([ev.time, time])
    _, inv = np.unique(t_all, return_inverse=True)
    big = len(inv) + 1
    ke = ev.subject.astype(np.int64) * big + inv[: len(ev)]
    ko = subj.astype(np.int64) * big + inv[len(ev):]
    last = np.searchsorted(ke, ko, side="right") - 1
    ok = last >= bounds[subj]
    if not np.all(ok):
        raise ValueError("an output time precedes the subject's first record")
    del obounds
    return last


_ = (TIME, SS_BOLUS)
