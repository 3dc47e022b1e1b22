"""Predictions of a linear model at every output record of every subject as ONE PyTensor graph.

Superposition: for a linear time-invariant system without constant inputs, the amount in
state a at output time t is

    x_a(t) = Σ_doses Σ_i P_i[a, c] · h_i(dose, t)

over the doses the record sees (same subject, same reset epoch, earlier in file order), with
λ_i and the Frobenius covariants P_i of each subject from the shared closed-form kernels of
:mod:`pkpd.solvers.linear` (the simulator uses the same ones), c the dose compartment and, with
Δ = t − t_dose − ALAG:

* bolus        h = F·AMT · e^{λΔ}·[Δ ≥ 0]
* infusion     h = rate · φ(λ, Δ − m)·e^{λm}·[Δ ≥ 0],  m = max(Δ − D, 0), D = F·AMT/rate
               (RATE > 0 or Rn) or rate = F·AMT/D (Dn)
* SS bolus     h = F·AMT · e^{λ(Δ₀ + s)} / (1 − e^{λ·II}),  Δ₀ = t − t_SS, s = II − (ALAG mod II)
               (the doses of the infinite past; the SS record's own dose is a bolus above)
* SS infusion  the same geometric sums over past infusions, the n still running at t counted
               apart: rate·[φ(λ,D)e^{λ(a+nII−D)}/(1−e^{λII}) + (e^{λa}·(1−e^{λnII})/(1−e^{λII})
               − n)/λ], a = Δ₀ + s, n = max(0, ⌈(D − a)/II⌉)
* SS constant  h = rate · e^{λΔ₀}/(−λ)  (AMT 0, RATE > 0: not continued, as NONMEM)

Resets (EVID 3/4) and SS=1 records start a new epoch: earlier doses are not paired with later
records. The (record, dose) pairs, times, amounts and flags are data, so they are precomputed
as flat numpy arrays; everything that depends on parameters (λ, P, F, ALAG, Rn, Dn, outputs)
is in the graph, hence differentiable. Semantics are NONMEM's, as in :mod:`pkpd.events`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytensor
import pytensor.tensor as pt
import sympy as sp

from .dataset import Dataset, check_against_model, from_frame
from .model import TIME, Model
from .solvers.linear import block_eigenvalues, covariants, phi

__all__ = ["LinearPredictor", "LikelihoodError", "to_pytensor"]

_BOLUS, _INF, _SS_BOLUS, _SS_INF, _SS_CONST = range(5)
_GIVEN, _MODEL_R, _MODEL_D = 0, 1, 2


class LikelihoodError(ValueError):
    """The model or data cannot be expressed by the closed-form likelihood."""


# --------------------------------------------------------------------------- sympy → pytensor

_FUNCS: dict[type, Callable] = {
    sp.exp: pt.exp, sp.log: pt.log, sp.Abs: pt.abs, sp.tanh: pt.tanh,
}


def to_pytensor(expr: sp.Expr, env: Mapping[sp.Symbol, object]):
    """Translate a sympy expression of the model file into a PyTensor expression; symbols are
    looked up in ``env`` (tensors or numbers)."""
    def go(e):
        if e.is_Symbol:
            try:
                return env[e]
            except KeyError:
                raise LikelihoodError(f"no value for {e} in the likelihood") from None
        if e.is_Number:
            return float(e)
        if e is sp.pi:
            return float(np.pi)
        args = [go(a) for a in e.args]
        if e.is_Add:
            out = args[0]
            for a in args[1:]:
                out = out + a
            return out
        if e.is_Mul:
            out = args[0]
            for a in args[1:]:
                out = out * a
            return out
        if e.is_Pow:
            base, ex = e.args
            if ex == sp.Rational(1, 2):
                return pt.sqrt(args[0])
            if ex.is_Integer and abs(int(ex)) <= 3:
                k = int(ex)
                out = args[0]
                for _ in range(abs(k) - 1):
                    out = out * args[0]
                return 1.0 / out if k < 0 else out
            return args[0] ** args[1]
        f = type(e)
        if f in _FUNCS:
            return _FUNCS[f](*args)
        if f is sp.Max:
            out = args[0]
            for a in args[1:]:
                out = pt.maximum(out, a)
            return out
        if f is sp.Min:
            out = args[0]
            for a in args[1:]:
                out = pt.minimum(out, a)
            return out
        if f is sp.Heaviside:
            return pt.switch(pt.gt(args[0], 0), 1.0, pt.switch(pt.eq(args[0], 0), 0.5, 0.0))
        if isinstance(e, sp.Piecewise):
            out = None
            for val, cond in reversed(e.args):
                v = go(val)
                out = v if (cond is sp.true or out is None) else pt.switch(go_cond(cond), v, out)
            return out
        raise LikelihoodError(f"cannot translate {e} into the likelihood graph")

    def go_cond(c):
        if c is sp.true:
            return True
        ops = {sp.StrictLessThan: pt.lt, sp.LessThan: pt.le, sp.StrictGreaterThan: pt.gt,
               sp.GreaterThan: pt.ge, sp.Eq: pt.eq, sp.Ne: pt.neq}
        if type(c) in ops:
            return ops[type(c)](go(c.args[0]), go(c.args[1]))
        if isinstance(c, sp.And):
            out = go_cond(c.args[0])
            for a in c.args[1:]:
                out = pt.and_(out, go_cond(a))
            return out
        if isinstance(c, sp.Or):
            out = go_cond(c.args[0])
            for a in c.args[1:]:
                out = pt.or_(out, go_cond(a))
            return out
        raise LikelihoodError(f"cannot translate condition {c} into the likelihood graph")

    return go(sp.sympify(expr))


# --------------------------------------------------------------------------- the predictor


@dataclass(frozen=True)
class _Pairs:
    """(output row, dose) pairs of one kind, flat; dose fields are per dose record."""

    out: np.ndarray       # index into the output rows
    dose: np.ndarray      # index into the dose records
    t: np.ndarray         # output time − dose time (without lag), h
    ii: np.ndarray        # dosing interval (SS kinds), h


class LinearPredictor:
    """Predictions of a linear model (closed form) at chosen records of a NONMEM data set.

    ``rows`` selects the output records (default: every EVID 0 record). Parameters are given
    per subject (vectors of length ``n_subjects``, in order of first appearance of ID);
    :meth:`predict` returns each model output at the output rows as a PyTensor vector.
    """

    def __init__(self, model: Model, data: Dataset | pd.DataFrame,
                 rows: np.ndarray | Sequence[int] | None = None):
        lin = model.linear
        if lin is None or not lin.closed_form:
            raise LikelihoodError(f"{model.name}: the likelihood needs a linear model whose "
                                  "blocks have at most 3 states (closed form)")
        if any(e != 0 for e in lin.c):
            raise LikelihoodError(f"{model.name}: constant inputs (ODE terms without a state) "
                                  "are not supported by the closed-form likelihood")
        if any(c.init != 0 for c in model.compartments):
            raise LikelihoodError(f"{model.name}: non-zero initial amounts are not supported "
                                  "by the closed-form likelihood")
        self.model = model
        ds = data if isinstance(data, Dataset) else from_frame(data)
        ds = check_against_model(
            ds, compartments=set(model.cmt_numbers), modeled_rate=model.modeled_rate_cmts,
            modeled_duration=model.modeled_duration_cmts,
            covariates={k: c.default for k, c in model.covariates.items()},
            default_dose_cmt=model.default_dose_cmt) or ds
        self.dataset = ds
        df = ds.data
        n_rec = len(df)
        ids = df["ID"].to_numpy()
        first = np.r_[True, ids[1:] != ids[:-1]]
        subject = np.cumsum(first) - 1
        self.n_subjects = int(subject[-1]) + 1
        self.subject_ids = ids[first]
        col = {k: df[k].to_numpy(dtype=float) for k in
               ("TIME", "EVID", "AMT", "CMT", "RATE", "II", "ADDL", "SS")}
        evid = col["EVID"].astype(int)
        if rows is None:
            rows = np.flatnonzero(evid == 0)
        rows = np.asarray(rows, dtype=int)
        self.rows = rows
        self.out_subject = subject[rows]
        self.out_time = col["TIME"][rows]
        self._cov_rec = {k: df[k].to_numpy(dtype=float) for k in model.covariates}
        self._cov_sub = {k: v[first] for k, v in self._cov_rec.items()}

        # dose records ---------------------------------------------------------------------
        is_dose = (evid == 1) | (evid == 4)
        is_reset = (evid == 3) | (evid == 4)
        ss = np.where(is_dose, col["SS"], 0).astype(int)
        c_no = col["CMT"].astype(int)
        c_no = np.where(c_no == 0, model.default_dose_cmt, c_no)
        numbers = model.cmt_numbers
        state = np.array([numbers.get(int(c), -1) for c in c_no])
        const = is_dose & (ss > 0) & (col["AMT"] == 0) & (col["RATE"] > 0)
        dose_rec = np.flatnonzero(is_dose & ~((col["AMT"] == 0) & ~const))
        rate = col["RATE"][dose_rec]
        self._d_rec = dose_rec
        self._d_subject = subject[dose_rec]
        self._d_cmt_no = c_no[dose_rec]
        self._d_state = state[dose_rec]
        self._d_amt = col["AMT"][dose_rec]
        self._d_rate = np.where(rate > 0, rate, 0.0)
        self._d_mode = np.where(rate == -1, _MODEL_R, np.where(rate == -2, _MODEL_D, _GIVEN))
        self._d_inf = rate != 0
        self._d_const = const[dose_rec]
        # epochs: a reset (EVID 3/4) or an SS=1 dose starts a new one -----------------------
        flag = is_reset | (ss == 1)
        c = np.cumsum(flag)
        base = np.maximum.accumulate(np.where(first, c - flag, 0))
        epoch = c - base + subject * (n_rec + 1)  # unique across subjects

        # pairs ----------------------------------------------------------------------------
        groups: dict[int, list[tuple[np.ndarray, ...]]] = {k: [] for k in range(5)}
        # output rows of each epoch, in file order (times non-decreasing within an epoch)
        out_epoch = epoch[rows]
        order = np.lexsort((rows, out_epoch))
        oe, orow = out_epoch[order], rows[order]
        for k, r in enumerate(dose_rec):
            lo, hi = np.searchsorted(oe, epoch[r], "left"), np.searchsorted(oe, epoch[r], "right")
            later = orow[lo:hi] >= r  # a dose record sees its own dose
            targets = order[lo:hi][later]
            if len(targets) == 0:
                continue
            t_out = col["TIME"][rows[targets]]
            t0 = col["TIME"][r]
            ii = col["II"][r]
            if ss[r] > 0:
                kind = _SS_CONST if const[r] else (_SS_INF if rate[k] != 0 else _SS_BOLUS)
                groups[kind].append((targets, np.full(len(targets), k), t_out - t0,
                                     np.full(len(targets), ii)))
            if const[r]:
                continue
            copies = int(col["ADDL"][r]) + 1 if ii > 0 else 1
            td = t0 + ii * np.arange(copies)
            dt = t_out[:, None] - td[None, :]
            tt, cc = np.nonzero(dt >= -1e-12)  # the lag (≥ 0) is applied in the graph
            kind = _INF if rate[k] != 0 else _BOLUS
            groups[kind].append((targets[tt], np.full(len(tt), k), dt[tt, cc],
                                 np.zeros(len(tt))))
        self._pairs = {}
        for kind, parts in groups.items():
            if parts:
                cat = [np.concatenate([p[j] for p in parts]) for j in range(4)]
                self._pairs[kind] = _Pairs(out=cat[0].astype(int), dose=cat[1].astype(int),
                                           t=cat[2].astype(float), ii=cat[3].astype(float))
        self.n_pairs = sum(len(p.out) for p in self._pairs.values())
        # which states the outputs read
        self.used_states = sorted({i for o in model.outputs.values()
                                   for i, x in enumerate(model.state_symbols)
                                   if x in o.expr.free_symbols})
        self._check_dosing_keys()

    def _check_dosing_keys(self) -> None:
        have = set(self.model.dosing)
        for mode, key in ((_MODEL_R, "R"), (_MODEL_D, "D")):
            need = self._d_mode == mode
            for n in np.unique(self._d_cmt_no[need]):
                if f"{key}{n}" not in have:
                    raise LikelihoodError(f"RATE {-mode} needs {key}{n} in the model")

    # -- graph -----------------------------------------------------------------------------
    def predict(self, params: Mapping[str, object], outputs: Sequence[str] | None = None
                ) -> dict[str, pt.TensorVariable]:
        """Model outputs at the output rows, given individual parameters (each a vector of
        length ``n_subjects`` or a scalar)."""
        model = self.model
        S = self.n_subjects
        par = {k: pt.as_tensor_variable(params[k]) * pt.ones(S) for k in model.parameters}
        sym = {sp.Symbol(k, real=True): v for k, v in par.items()}
        cov_s = {sp.Symbol(k, real=True): pt.as_tensor_variable(v)
                 for k, v in self._cov_sub.items()}
        lin = model.linear
        n = model.n_states
        zero = pt.zeros(S)
        entries = [[to_pytensor(lin.A[i, j], {**sym, **cov_s}) * pt.ones(S)
                    if lin.A[i, j] != 0 else zero for j in range(n)] for i in range(n)]
        A = pt.stack([pt.stack(row, axis=-1) for row in entries], axis=-2)  # (S, n, n)
        lam = block_eigenvalues(A, lin.blocks, xp=pt)  # (S, m)
        P = covariants(A, lam, xp=pt, n=n, m=n)  # (S, m, n, n)

        # dose-record quantities (record covariates, subject parameters) -----------------
        ds = self._d_subject
        dsym = {s: v[ds] for s, v in sym.items()}
        dcov = {sp.Symbol(k, real=True): pt.as_tensor_variable(v[self._d_rec])
                for k, v in self._cov_rec.items()}
        denv = {**dsym, **dcov}
        nd = len(self._d_rec)
        F = pt.ones(nd)
        lag = pt.zeros(nd)
        rmod = pt.ones(nd)
        dmod = pt.ones(nd)
        for key, expr in model.dosing.items():
            kind, num = key.rstrip("0123456789"), int(key[len(key.rstrip("0123456789")):])
            mask = self._d_cmt_no == num
            if not mask.any():
                continue
            val = to_pytensor(expr, denv) * pt.ones(nd)
            m = pt.as_tensor_variable(mask)
            if kind == "F":
                F = pt.switch(m, val, F)
            elif kind == "ALAG":
                lag = pt.switch(m, val, lag)
            elif kind == "R":
                rmod = pt.switch(m, val, rmod)
            else:
                dmod = pt.switch(m, val, dmod)
        amt = self._d_amt * F
        mode = self._d_mode
        rate = pt.switch(pt.eq(mode, _MODEL_R), rmod,
                         pt.switch(pt.eq(mode, _MODEL_D), amt / dmod, self._d_rate))
        safe = pt.switch(pt.gt(rate, 0.0), rate, 1.0)  # boluses: no 0/0 in the gradient
        dur = pt.switch(pt.eq(mode, _MODEL_D), dmod, amt / safe)
        rate = pt.switch(self._d_const, self._d_rate, rate)

        n_out = len(self.rows)
        amounts = {}
        for a in self.used_states:
            Pa = P[:, :, a, :].dimshuffle(0, 2, 1).reshape((S * n, n))  # (S·n_cmt, m)
            x = pt.zeros(n_out)
            for kind, pr in self._pairs.items():
                d = pr.dose
                sub = self._d_subject[d]
                w = Pa[sub * n + self._d_state[d]]  # (k, m)
                lk = lam[sub]
                h = self._kernel(kind, pr, lk, amt[d], rate[d], dur[d], lag[d])
                x = pt.inc_subtensor(x[pr.out], (w * h).sum(axis=-1))
            amounts[a] = x

        # outputs -----------------------------------------------------------------------
        osub = self.out_subject
        env = {s: v[osub] for s, v in sym.items()}
        env.update({sp.Symbol(k, real=True): pt.as_tensor_variable(v[self.rows])
                    for k, v in self._cov_rec.items()})
        env.update({model.state_symbols[a]: x for a, x in amounts.items()})
        env[TIME] = pt.as_tensor_variable(self.out_time)
        names = list(model.outputs) if outputs is None else list(outputs)
        return {k: to_pytensor(model.outputs[k].expr, env) * pt.ones(n_out) for k in names}

    @staticmethod
    def _kernel(kind: int, pr: _Pairs, lam, amt, rate, dur, lag):
        """h_i (k, m) for pairs of one kind (see the module docstring)."""
        if kind == _BOLUS:
            dt = pr.t - lag
            on = pt.ge(dt, 0.0)
            dts = pt.switch(on, dt, 0.0)[:, None]
            return pt.switch(on, amt, 0.0)[:, None] * pt.exp(lam * dts)
        if kind == _INF:
            dt = pr.t - lag
            on = pt.ge(dt, 0.0)
            dts = pt.switch(on, dt, 0.0)
            m = pt.maximum(dts - dur, 0.0)[:, None]
            return (pt.switch(on, rate, 0.0)[:, None]
                    * phi(lam, dts[:, None] - m, xp=pt) * pt.exp(lam * m))
        ii = pr.ii[:, None]
        geo = -1.0 / pt.expm1(lam * ii)  # Σ_{k≥0} e^{λ k II}
        if kind == _SS_CONST:
            return (rate[:, None] * pt.exp(lam * pr.t[:, None])) / -lam
        s = (pr.ii - pt.mod(lag, pr.ii))[:, None]
        a = pr.t[:, None] + s
        if kind == _SS_BOLUS:
            return amt[:, None] * pt.exp(lam * a) * geo
        # SS infusion: n infusions of the past still running at the output time
        d = dur[:, None]
        nrun = pt.maximum(0.0, pt.ceil((d - a) / ii - 1e-12))
        nrun = pytensor.gradient.disconnected_grad(nrun)
        done = phi(lam, d, xp=pt) * pt.exp(lam * (a + nrun * ii - d)) * geo
        running = (pt.exp(lam * a) * pt.expm1(lam * nrun * ii) / pt.expm1(lam * ii)
                   - nrun) / lam
        return rate[:, None] * (done + running)

    # -- numpy -----------------------------------------------------------------------------
    def compile(self, outputs: Sequence[str] | None = None
                ) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
        """A numpy function: individual parameters (vectors over subjects) → outputs."""
        names = list(self.model.parameters)
        ins = [pt.vector(k) for k in names]
        outs = self.predict(dict(zip(names, ins, strict=True)), outputs)
        keys = list(outs)
        fn = pytensor.function(ins, [outs[k] for k in keys], on_unused_input="ignore")
        S = self.n_subjects

        def evaluate(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            vals = [np.broadcast_to(np.asarray(params[k], dtype=float), (S,)).copy()
                    for k in names]
            return dict(zip(keys, fn(*vals), strict=True))

        return evaluate

    def individual_typical(self, theta: Mapping[str, float] | None = None
                           ) -> dict[str, np.ndarray]:
        """Typical individual values (covariate model, η = 0) per subject (numpy)."""
        theta = {**self.model.theta, **(theta or {})}
        S = self.n_subjects
        return {k: np.broadcast_to(np.asarray(v, dtype=float), (S,)).copy()
                for k, v in self.model.typical_individual(theta, self._cov_sub).items()}

    @property
    def subject_covariates(self) -> dict[str, np.ndarray]:
        """Covariates at each subject's first record (used by the covariate model)."""
        return dict(self._cov_sub)
