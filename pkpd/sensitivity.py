"""Differentiable predictions of nonlinear models: forward sensitivities, compiled.

For dx/dt = f(x, p, t) the sensitivities S = ∂x/∂p obey dS/dt = (∂f/∂x)·S + ∂f/∂p with
S(0) = ∂x₀/∂p. The augmented system (states and sensitivities) is generated from the model
file's equations by sympy and integrated by the same compiled, error-controlled
Dormand–Prince as simulation (:mod:`pkpd.solvers.compiled`), with NONMEM event semantics
(doses add amounts, which do not depend on parameters; resets restore x₀ and S₀). An output
y = h(x, p) then has ∂y/∂p = (∂h/∂x)·S + ∂h/∂p at each record.

:class:`NonlinearPredictor` wraps this as a PyTensor ``Op`` whose gradient is exact up to the
integration tolerance, so PyMC's NUTS can sample nonlinear population models without a
general-purpose ODE solver in the graph (``pymc.ode`` differentiates through adjoint solves
per subject; here one compiled call covers all subjects).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import pytensor.tensor as pt
import sympy as sp
from pytensor.gradient import DisconnectedType
from pytensor.graph.basic import Apply
from pytensor.graph.op import Op

from .dataset import Dataset, for_model
from .events import Doses, build_events
from .likelihood import SubjectParameters
from .model import TIME, Model
from .solvers.compiled import integrate_events, kernel_source, load_kernel

__all__ = ["NonlinearPredictor", "SensitivityError", "predictor"]


class SensitivityError(ValueError):
    """The model or data set is outside what the sensitivity solver supports."""


def predictor(model: Model, data: Dataset | pd.DataFrame,
              rows: np.ndarray | Sequence[int] | None = None):
    """The likelihood's predictor for ``model``: the closed form
    (:class:`pkpd.likelihood.LinearPredictor`) for linear models whose blocks have ≤ 3
    states, else :class:`NonlinearPredictor` (compiled forward sensitivities)."""
    from .likelihood import LinearPredictor

    lin = model.linear
    if lin is not None and lin.closed_form:
        return LinearPredictor(model, data, rows=rows)
    return NonlinearPredictor(model, data, rows=rows)


class NonlinearPredictor(SubjectParameters):
    """Outputs of a (nonlinear) model at chosen records of a NONMEM data set, with their
    derivatives with respect to every individual parameter.

    Same interface as :class:`pkpd.likelihood.LinearPredictor`: parameters per subject
    (vectors of length ``n_subjects``, subjects in order of first appearance of ID);
    :meth:`predict` returns PyTensor vectors at ``rows`` (default: every EVID 0 record).
    """

    def __init__(self, model: Model, data: Dataset | pd.DataFrame,
                 rows: np.ndarray | Sequence[int] | None = None, *, rtol: float = 1e-6,
                 atol: float = 1e-9):
        if model.dosing:
            raise SensitivityError(f"{model.name}: dose parameters (F, ALAG, R, D) are not "
                                   "differentiated yet; give them as data")
        self.model, self.rtol, self.atol = model, rtol, atol
        ds = for_model(data, model)
        df = ds.data
        self.dataset = ds
        ids = df["ID"].to_numpy()
        first = np.r_[True, ids[1:] != ids[:-1]]
        subject = np.cumsum(first) - 1
        self.n_subjects = int(subject[-1]) + 1
        self.subject_ids = ids[first]
        col = {k: df[k].to_numpy(dtype=float) for k in
               ("TIME", "EVID", "AMT", "CMT", "RATE", "II", "ADDL", "SS")}
        if np.any(col["SS"] > 0):
            raise SensitivityError(f"{ds.source}: steady-state records (SS) are not supported "
                                   "by the nonlinear likelihood yet")
        rows = np.flatnonzero(col["EVID"] == 0) if rows is None else np.asarray(rows, int)
        self.rows = rows
        self._cov_sub = {k: df[k].to_numpy(dtype=float)[first] for k in model.covariates}
        cmt = col["CMT"].astype(int)
        cmt = np.where(cmt == 0, model.default_dose_cmt, cmt)
        state = np.array([model.cmt_numbers.get(c, 0) for c in range(max(model.cmt_numbers)
                                                                      + 1)])[cmt]
        n = len(cmt)
        self.events = build_events(Doses(
            subject=subject, time=col["TIME"], evid=col["EVID"], amt=col["AMT"], cmt=state,
            rate=col["RATE"], ii=col["II"], addl=col["ADDL"], ss=col["SS"], f=np.ones(n),
            lag=np.zeros(n), rate_model=np.full(n, np.nan), dur_model=np.full(n, np.nan)))
        self.out_subject = subject[rows]
        self.out_time = col["TIME"][rows]
        self.out_event = np.searchsorted(self.events.slot, rows, side="right") - 1
        self._system()

    # pickling (PyMC's multiprocess sampling): generated functions are rebuilt, not copied
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_kernel", "_init",
                                                                      "_out")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._system()

    # -- the augmented system -----------------------------------------------------------
    def _system(self) -> None:
        m = self.model
        xs = list(m.state_symbols)
        pars = [sp.Symbol(k, real=True) for k in m.parameters]
        covs = [sp.Symbol(k, real=True) for k in m.covariates]
        f = sp.Matrix([m.odes[s] for s in m.states])
        used = set().union(f.free_symbols, *(c.init.free_symbols for c in m.compartments),
                           *(o.expr.free_symbols for o in m.outputs.values()))
        self.sens_params = [k for k, p in zip(m.parameters, pars, strict=True) if p in used]
        K = [sp.Symbol(k, real=True) for k in self.sens_params]
        nS, nK = len(xs), len(K)
        S = sp.Matrix(nS, nK, lambda i, k: sp.Symbol(f"_S_{i}_{k}", real=True))
        dS = f.jacobian(sp.Matrix(xs)) * S + (f.jacobian(sp.Matrix(K)) if nK else
                                              sp.zeros(nS, 0))
        exprs = list(f) + [dS[i, k] for i in range(nS) for k in range(nK)]
        states = xs + [S[i, k] for i in range(nS) for k in range(nK)]
        args = pars + covs
        self._kernel = load_kernel(kernel_source(exprs, states, args))
        init = sp.Matrix([c.init for c in m.compartments])
        lam = dict(modules="numpy", cse=True)
        self._init = sp.lambdify(args, list(init) + list(
            init.jacobian(sp.Matrix(K)) if nK else []), **lam)
        self._nS, self._nK = nS, nK
        self._out: dict[str, tuple] = {}
        for name, o in m.outputs.items():
            h = sp.Matrix([o.expr])
            self._out[name] = (
                sp.lambdify([*args, *xs, TIME], o.expr, **lam),
                sp.lambdify([*args, *xs, TIME], list(h.jacobian(sp.Matrix(xs))), **lam),
                sp.lambdify([*args, *xs, TIME], list(h.jacobian(sp.Matrix(K))) if nK else [],
                            **lam))

    def evaluate(self, params: Mapping[str, np.ndarray], outputs: Sequence[str]
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Numeric outputs at the rows and their Jacobians (rows × model parameters, zero
        for parameters the model's equations do not use), given per-subject parameters."""
        m, n = self.model, self.n_subjects
        par = [np.broadcast_to(np.asarray(params[k], dtype=float), (n,)) for k in m.parameters]
        cov = [np.broadcast_to(self._cov_sub[k], (n,)) for k in m.covariates]
        args = par + cov
        nS, nK = self._nS, self._nK
        x0 = np.stack([np.broadcast_to(np.asarray(v, dtype=float), (n,))
                       for v in self._init(*args)], axis=1)  # (n, nS + nS·nK)
        p = np.stack(args, axis=1) if args else np.zeros((n, 0))
        amounts = integrate_events(self.model, self.events, x0, p, self.out_subject,
                                   self.out_time, self.out_event, rtol=self.rtol,
                                   atol=self.atol, kernel=self._kernel)  # (rows, states)
        x = amounts[:, :nS].T
        sens = amounts[:, nS:].reshape(-1, nS, nK)
        a_rows = [a[self.out_subject] for a in args]
        pos = [list(m.parameters).index(k) for k in self.sens_params]
        values, jac = {}, {}
        for name in outputs:
            h, dhdx, dhdp = self._out[name]
            vals = (*a_rows, *x, self.out_time)
            values[name] = np.broadcast_to(np.asarray(h(*vals), dtype=float),
                                           (len(self.rows),)).copy()
            gx = np.stack([np.broadcast_to(np.asarray(v, dtype=float), (len(self.rows),))
                           for v in dhdx(*vals)], axis=1)  # (rows, nS)
            J = np.zeros((len(self.rows), len(m.parameters)))
            if nK:
                gp = np.stack([np.broadcast_to(np.asarray(v, dtype=float), (len(self.rows),))
                               for v in dhdp(*vals)], axis=1)
                J[:, pos] = np.einsum("rs,rsk->rk", gx, sens) + gp
            jac[name] = J
        return values, jac

    def predict(self, params: Mapping[str, object], outputs: Sequence[str] | None = None
                ) -> dict[str, pt.TensorVariable]:
        """Model outputs at the rows as PyTensor vectors (differentiable in ``params``)."""
        outputs = list(outputs or self.model.outputs)
        S = self.n_subjects
        P = pt.stack([pt.as_tensor_variable(params[k]) * pt.ones(S)
                      for k in self.model.parameters], axis=1)
        res = _PredictOp(self, tuple(outputs))(P)
        return dict(zip(outputs, res[:len(outputs)], strict=True))


    def compile(self, outputs: Sequence[str] | None = None):
        """A numpy function: individual parameters (vectors over subjects) → outputs."""
        outputs = list(outputs or self.model.outputs)

        def evaluate(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            return self.evaluate(params, outputs)[0]

        return evaluate


class _PredictOp(Op):
    """P (subjects × parameters) → outputs at the rows, then their Jacobians; the gradient
    sums g·J over each subject's rows."""

    __props__ = ("pred", "outputs")

    def __init__(self, pred: NonlinearPredictor, outputs: tuple[str, ...]):
        self.pred, self.outputs = pred, outputs

    def make_node(self, P):
        P = pt.as_tensor_variable(P)
        outs = [pt.dvector() for _ in self.outputs] + [pt.dmatrix() for _ in self.outputs]
        return Apply(self, [P], outs)

    def perform(self, node, inputs, output_storage):
        (P,) = inputs
        names = list(self.pred.model.parameters)
        values, jac = self.pred.evaluate({k: P[:, i] for i, k in enumerate(names)},
                                         self.outputs)
        m = len(self.outputs)
        for i, name in enumerate(self.outputs):
            output_storage[i][0] = values[name]
            output_storage[m + i][0] = jac[name]

    def grad(self, inputs, grads):
        (P,) = inputs
        outs = self(P)
        m = len(self.outputs)
        subj = self.pred.out_subject
        total = pt.zeros_like(P)
        for i in range(m):
            g = grads[i]
            if isinstance(g.type, DisconnectedType):
                continue
            total = pt.inc_subtensor(total[subj], g[:, None] * outs[m + i])
        return [total]

    def connection_pattern(self, node):
        m = len(self.outputs)
        return [[True] * m + [False] * m]
