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

from .dataset import Dataset, for_model
from .model import TIME, Model
from .solvers.linear import block_eigenvalues, phi

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
        if isinstance(e, sp.Piecewise):
            out = None
            for val, cond in reversed(e.args):
                v = go(val)
                out = v if (cond is sp.true or out is None) else pt.switch(go_cond(cond), v, out)
            return out
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


def _covariant_entries(A, lam, a: int, c: int) -> list:
    """P_i[a, c] for every mode i, with A given entrywise (lists of (S,) tensors or arrays)
    and the eigenvalues ``lam`` as a list: Sylvester's formula as in
    :func:`pkpd.solvers.linear.covariants`, but only row a of the matrix products, so the
    graph is elementwise (no batched matrix products; tested equal to the shared kernel)."""
    n = len(A)
    out = []
    for i in range(len(lam)):
        row = [1.0 if b == a else 0.0 for b in range(n)]
        for j in range(len(lam)):
            if j == i:
                continue
            new = []
            for b in range(n):
                acc = -lam[j] * row[b] if not _is_zero(row[b]) else 0.0
                for k in range(n):
                    if not _is_zero(row[k]) and not _is_zero(A[k][b]):
                        acc = acc + row[k] * A[k][b]
                new.append(acc)
            row = [x / (lam[i] - lam[j]) if not _is_zero(x) else 0.0 for x in new]
        out.append(row[c] if not _is_zero(row[c]) else lam[i] * 0.0)
    return out


def _is_zero(x) -> bool:
    return isinstance(x, float) and x == 0.0


@dataclass(frozen=True)
class _Doses:
    """Doses of one kind laid out per subject, padded: arrays (S, D) or (S, J, D)."""

    rec: np.ndarray       # (S, D) record index of the dose (padding: the subject's first)
    t: np.ndarray         # (S, J, D) output time − dose time (without lag), h
    on: np.ndarray        # (S, J, D) the output sees the dose (same epoch, file order, time)
    amt: np.ndarray       # (S, D) AMT
    rate: np.ndarray      # (S, D) RATE when > 0, else 0
    mode: np.ndarray      # (S, D) _GIVEN, _MODEL_R or _MODEL_D
    cmt_no: np.ndarray    # (S, D) CMT number
    state: np.ndarray     # (S, D) state index
    ii: np.ndarray        # (S, D) II (SS kinds), h


def _id(v) -> str:
    """An ID as the data file shows it (1, not 1.0)."""
    return str(int(v)) if isinstance(v, (float, np.floating)) and float(v).is_integer() else str(v)


def subject_layout(data: Dataset | pd.DataFrame, model: Model):
    """The data set checked against ``model``, with each record's subject index (subjects in
    order of first appearance of ID): (dataset, first-record mask, subject index, number of
    subjects, subject IDs, the NONMEM event columns as float arrays)."""
    ds = for_model(data, model)
    df = ds.data
    ids = df["ID"].to_numpy()
    first = np.r_[True, ids[1:] != ids[:-1]]
    subject = np.cumsum(first) - 1
    col = {k: df[k].to_numpy(dtype=float) for k in
           ("TIME", "EVID", "AMT", "CMT", "RATE", "II", "ADDL", "SS")}
    return ds, first, subject, int(subject[-1]) + 1, ids[first], col


def layout_events(model: Model, subject: np.ndarray, col: Mapping[str, np.ndarray]):
    """The event table (:func:`pkpd.events.build_events`: ADDL copies, NONMEM order) of
    :func:`subject_layout`'s records, with F = 1 and no lag (models that compute F, lags or
    rates are not handled by the predictors that use it)."""
    from .events import Doses, build_events

    cmt = col["CMT"].astype(int)
    cmt = np.where(cmt == 0, model.default_dose_cmt, cmt)
    state = np.array([model.cmt_numbers.get(c, 0)
                      for c in range(max(model.cmt_numbers) + 1)])[cmt]
    n = len(cmt)
    return build_events(Doses(
        subject=subject, time=col["TIME"], evid=col["EVID"], amt=col["AMT"], cmt=state,
        rate=col["RATE"], ii=col["II"], addl=col["ADDL"], ss=col["SS"], f=np.ones(n),
        lag=np.zeros(n), rate_model=np.full(n, np.nan), dur_model=np.full(n, np.nan)))


class SubjectParameters:
    """Per-subject typical values and covariates, shared by the predictors (needs
    ``self.model``, ``self.n_subjects`` and ``self._cov_sub``)."""

    fixed_individual: dict[str, np.ndarray] = {}  # noqa: RUF012 (replaced, never mutated)

    def individual_typical(self, theta: Mapping[str, float] | None = None
                           ) -> dict[str, np.ndarray]:
        """Typical individual values (covariate model, η = 0) per subject (numpy); parameters
        fixed per subject (:meth:`fix_individual`) take their given values."""
        theta = {**self.model.theta, **(theta or {})}
        S = self.n_subjects
        out = {k: np.broadcast_to(np.asarray(v, dtype=float), (S,)).copy()
               for k, v in self.model.typical_individual(theta, self._cov_sub).items()}
        out.update({k: v.copy() for k, v in self.fixed_individual.items()})
        return out

    def fix_individual(self, table: pd.DataFrame, source: str = "individual parameters"
                       ) -> None:
        """Fix parameters per subject (the IPP approach: e.g. individual PK parameters from
        a PK fit while fitting the PD): ``table`` has ID and one column per parameter."""
        if "ID" not in table.columns:
            raise ValueError(f"{source}: expected a column ID")
        cols = [c for c in table.columns if c != "ID"]
        unknown = [c for c in cols if c not in self.model.parameters]
        if unknown:
            raise ValueError(f"{source}: columns {', '.join(unknown)} are not parameters of "
                             f"{self.model.name}")
        by_id = table.drop_duplicates("ID").set_index("ID")
        missing = [i for i in self.subject_ids if i not in by_id.index]
        if missing:
            raise ValueError(f"{source}: no row for ID {_id(missing[0])} ({len(missing)} "
                             "subjects of the data set missing)")
        fixed = {}
        for c in cols:
            v = pd.to_numeric(by_id.loc[list(self.subject_ids), c], errors="coerce").to_numpy(
                dtype=float)
            if not np.all(np.isfinite(v)):
                bad = list(self.subject_ids)[int(np.flatnonzero(~np.isfinite(v))[0])]
                raise ValueError(f"{source}: column {c}, ID {_id(bad)}: expected a number")
            fixed[c] = v
        self.fixed_individual = fixed

    @property
    def subject_covariates(self) -> dict[str, np.ndarray]:
        """Covariates at each subject's first record (used by the covariate model)."""
        return dict(self._cov_sub)


class LinearPredictor(SubjectParameters):
    """Predictions of a linear model (closed form) at chosen records of a NONMEM data set.

    ``rows`` selects the output records (default: every EVID 0 record). Parameters are given
    per subject (vectors of length ``n_subjects``, in order of first appearance of ID);
    :meth:`predict` returns each model output at the output rows as a PyTensor vector.

    Layout: outputs (S, J) and doses of each kind (S, D) per subject, padded, so the graph is
    dense broadcasting (subject × output × dose × mode) with a single gather at the end and
    no scatter in the gradient.
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
        ds, first, subject, S, self.subject_ids, col = subject_layout(data, model)
        self.dataset, self.n_subjects = ds, S
        df = ds.data
        first_rec = np.flatnonzero(first)
        evid = col["EVID"].astype(int)
        if rows is None:
            rows = np.flatnonzero(evid == 0)
        rows = np.asarray(rows, dtype=int)
        self.rows = rows
        self.out_subject = subject[rows]
        self.out_time = col["TIME"][rows]
        self._cov_rec = {k: df[k].to_numpy(dtype=float) for k in model.covariates}
        self._cov_sub = {k: v[first] for k, v in self._cov_rec.items()}

        # epochs: a reset (EVID 3/4) or an SS=1 dose starts a new one -----------------------
        is_dose = (evid == 1) | (evid == 4)
        is_reset = (evid == 3) | (evid == 4)
        ss = np.where(is_dose, col["SS"], 0).astype(int)
        flag = is_reset | (ss == 1)
        c = np.cumsum(flag)
        base = np.maximum.accumulate(np.where(first, c - flag, 0))
        epoch = c - base

        # outputs per subject, padded (S, J) ------------------------------------------------
        order = np.lexsort((rows, self.out_subject))
        o_sub = self.out_subject[order]
        counts = np.bincount(o_sub, minlength=S)
        J = max(int(counts.max(initial=0)), 1)
        slot = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
        out_rec = np.repeat(first_rec[:, None], J, axis=1)
        out_rec[o_sub, slot] = rows[order]
        self._out_valid = np.zeros((S, J), bool)
        self._out_valid[o_sub, slot] = True
        self._out_rec = out_rec
        flat = np.empty(len(rows), int)
        flat[order] = o_sub * J + slot
        self._flat = flat  # position of each output row in the flattened (S, J) layout
        self._J = J

        # dose instances (ADDL copies expanded) and SS records, by kind ---------------------
        c_no = col["CMT"].astype(int)
        c_no = np.where(c_no == 0, model.default_dose_cmt, c_no)
        numbers = model.cmt_numbers
        state = np.array([numbers.get(int(x), -1) for x in c_no])
        const = is_dose & (ss > 0) & (col["AMT"] == 0) & (col["RATE"] > 0)
        dose_rec = np.flatnonzero(is_dose & ~((col["AMT"] == 0) & ~const))
        last_out = np.full(S, -np.inf)
        np.maximum.at(last_out, self.out_subject, self.out_time)
        inst: dict[int, list[tuple[int, float]]] = {k: [] for k in range(5)}
        for r in dose_rec:
            ii = col["II"][r]
            rate = col["RATE"][r]
            if ss[r] > 0:
                kind = _SS_CONST if const[r] else (_SS_INF if rate != 0 else _SS_BOLUS)
                inst[kind].append((r, col["TIME"][r]))
            if const[r]:
                continue
            copies = int(col["ADDL"][r]) + 1 if ii > 0 else 1
            td = col["TIME"][r] + ii * np.arange(copies)
            td = td[td <= last_out[subject[r]] + 1e-9] if copies > 1 else td
            kind = _INF if rate != 0 else _BOLUS
            inst[kind].extend((r, t) for t in td)
        self._doses: dict[int, _Doses] = {}
        t_out = col["TIME"][out_rec]  # (S, J)
        for kind, lst in inst.items():
            if not lst:
                continue
            rr = np.array([x[0] for x in lst])
            tt = np.array([x[1] for x in lst])
            sub = subject[rr]
            o = np.lexsort((tt, rr, sub))
            rr, tt, sub = rr[o], tt[o], sub[o]
            cnt = np.bincount(sub, minlength=S)
            D = int(cnt.max())
            pos = np.arange(len(rr)) - np.repeat(np.cumsum(cnt) - cnt, cnt)
            drec = np.repeat(first_rec[:, None], D, axis=1)
            drec[sub, pos] = rr
            dt = np.zeros((S, D))
            dt[sub, pos] = tt
            dvalid = np.zeros((S, D), bool)
            dvalid[sub, pos] = True
            delta = t_out[:, :, None] - dt[:, None, :]
            on = (dvalid[:, None, :] & self._out_valid[:, :, None]
                  & (epoch[out_rec][:, :, None] == epoch[drec][:, None, :])
                  & (out_rec[:, :, None] >= drec[:, None, :]))
            if kind in (_BOLUS, _INF):
                on &= delta >= -1e-12  # the lag (≥ 0) is applied in the graph
            rate = col["RATE"][drec]
            self._doses[kind] = _Doses(
                rec=drec, t=np.where(on, delta, 0.0), on=on, amt=col["AMT"][drec],
                rate=np.where(rate > 0, rate, 0.0),
                mode=np.where(rate == -1, _MODEL_R, np.where(rate == -2, _MODEL_D, _GIVEN)),
                cmt_no=c_no[drec], state=state[drec], ii=np.where(dvalid, col["II"][drec], 1.0))
        self.n_pairs = int(sum(d.on.sum() for d in self._doses.values()))
        self.used_states = sorted({i for o in model.outputs.values()
                                   for i, x in enumerate(model.state_symbols)
                                   if x in o.expr.free_symbols})
        have = set(model.dosing)
        for d in self._doses.values():
            for mode, key in ((_MODEL_R, "R"), (_MODEL_D, "D")):
                for n in np.unique(d.cmt_no[d.on.any(axis=1) & (d.mode == mode)]):
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
                    if lin.A[i, j] != 0 else 0.0 for j in range(n)] for i in range(n)]
        A = pt.stack([pt.stack([zero if _is_zero(x) else x for x in row], axis=-1)
                      for row in entries], axis=-2)  # (S, n, n)
        lam = block_eigenvalues(A, lin.blocks, xp=pt)  # (S, m), m = n
        lam_list = [lam[:, i] for i in range(n)]
        lam4 = lam[:, None, None, :]  # (S, 1, 1, m)
        sym2 = {s: v[:, None] for s, v in sym.items()}  # (S, 1) against (S, D)

        amounts = {a: pt.zeros((S, self._J)) for a in self.used_states}
        for kind, d in self._doses.items():
            env = {**sym2, **{sp.Symbol(k, real=True): pt.as_tensor_variable(v[d.rec])
                              for k, v in self._cov_rec.items()}}
            amt, rate, dur, lag = self._dose_terms(d, env)
            h = self._kernel(kind, d, lam4, amt, rate, dur, lag)  # (S, J, D, m)
            for a in self.used_states:
                w = None
                for cs in np.unique(d.state):
                    wc = pt.stack([x * pt.ones(S) for x in
                                   _covariant_entries(entries, lam_list, a, int(cs))], axis=-1)
                    m = (d.state == cs)[:, None, :, None]
                    term = pt.switch(m, wc[:, None, None, :], 0.0)
                    w = term if w is None else w + term
                contrib = pt.switch(d.on[..., None], w * h, 0.0).sum(axis=(-1, -2))
                amounts[a] = amounts[a] + contrib

        # outputs on (S, J), then one gather into output-row order --------------------------
        env = {s: v[:, None] for s, v in sym.items()}
        env.update({sp.Symbol(k, real=True): pt.as_tensor_variable(v[self._out_rec])
                    for k, v in self._cov_rec.items()})
        env.update({model.state_symbols[a]: x for a, x in amounts.items()})
        env[TIME] = pt.as_tensor_variable(
            self.dataset.data["TIME"].to_numpy(dtype=float)[self._out_rec])
        names = list(model.outputs) if outputs is None else list(outputs)
        res = {}
        for k in names:
            y = to_pytensor(model.outputs[k].expr, env) * pt.ones((S, self._J))
            res[k] = y.reshape((S * self._J,))[self._flat]
        return res

    def _dose_terms(self, d: _Doses, env):
        """F·AMT, infusion rate and duration, lag time: (S, D) tensors."""
        F, lag, rmod, dmod = 1.0, 0.0, 1.0, 1.0
        for key, expr in self.model.dosing.items():
            kind, num = key.rstrip("0123456789"), int(key[len(key.rstrip("0123456789")):])
            mask = d.cmt_no == num
            if not mask.any():
                continue
            val = to_pytensor(expr, env)
            if kind == "F":
                F = pt.switch(mask, val, F)
            elif kind == "ALAG":
                lag = pt.switch(mask, val, lag)
            elif kind == "R":
                rmod = pt.switch(mask, val, rmod)
            else:
                dmod = pt.switch(mask, val, dmod)
        amt = d.amt * F
        rate = pt.switch(pt.eq(d.mode, _MODEL_R), rmod,
                         pt.switch(pt.eq(d.mode, _MODEL_D), amt / dmod, d.rate))
        safe = pt.switch(pt.gt(rate, 0.0), rate, 1.0)  # boluses: no 0/0 in the gradient
        dur = pt.switch(pt.eq(d.mode, _MODEL_D), dmod, amt / safe)
        return amt, rate, dur, lag * pt.ones(d.amt.shape)

    @staticmethod
    def _kernel(kind: int, d: _Doses, lam, amt, rate, dur, lag):
        """h_i (S, J, D, m) for doses of one kind (see the module docstring)."""
        amt, rate, dur, lag = (x[:, None, :, None] for x in (amt, rate, dur, lag))
        t = d.t[..., None]
        if kind == _BOLUS:
            dt = t - lag
            on = pt.ge(dt, 0.0)
            return pt.switch(on, amt * pt.exp(lam * pt.switch(on, dt, 0.0)), 0.0)
        if kind == _INF:
            dt = t - lag
            on = pt.ge(dt, 0.0)
            dts = pt.switch(on, dt, 0.0)
            m = pt.maximum(dts - dur, 0.0)
            return pt.switch(on, rate * phi(lam, dts - m, xp=pt) * pt.exp(lam * m), 0.0)
        ii = d.ii[:, None, :, None]
        geo = -1.0 / pt.expm1(lam * ii)  # Σ_{k≥0} e^{λ k II}
        if kind == _SS_CONST:
            return rate * pt.exp(lam * t) / -lam
        s = ii - pt.mod(lag, ii)
        a = t + s
        if kind == _SS_BOLUS:
            return amt * pt.exp(lam * a) * geo
        # SS infusion: n infusions of the past still running at the output time
        nrun = pt.maximum(0.0, pt.ceil((dur - a) / ii - 1e-12))
        nrun = pytensor.gradient.disconnected_grad(nrun)
        done = phi(lam, dur, xp=pt) * pt.exp(lam * (a + nrun * ii - dur)) * geo
        running = (pt.exp(lam * a) * pt.expm1(lam * nrun * ii) / pt.expm1(lam * ii)
                   - nrun) / lam
        return rate * (done + running)

    # -- numpy -----------------------------------------------------------------------------
    def compile(self, outputs: Sequence[str] | None = None, mode: str | None = None
                ) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
        """A numpy function: individual parameters (vectors over subjects) → outputs.
        ``mode``: PyTensor's compilation mode (e.g. "FAST_COMPILE": no C compilation)."""
        names = list(self.model.parameters)
        ins = [pt.vector(k) for k in names]
        outs = self.predict(dict(zip(names, ins, strict=True)), outputs)
        keys = list(outs)
        fn = pytensor.function(ins, [outs[k] for k in keys], on_unused_input="ignore",
                               mode=mode)
        S = self.n_subjects

        def evaluate(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            vals = [np.broadcast_to(np.asarray(params[k], dtype=float), (S,)).copy()
                    for k in names]
            return dict(zip(keys, fn(*vals), strict=True))

        return evaluate
