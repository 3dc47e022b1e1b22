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
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytensor.tensor as pt
import sympy as sp
from pytensor.gradient import DisconnectedType
from pytensor.graph.basic import Apply
from pytensor.graph.op import Op

from .dataset import Dataset
from .likelihood import SubjectParameters, layout_events, subject_layout
from .model import TIME, Model
from .solvers.compiled import integrate_events, kernel_source, load_kernel

__all__ = ["NonlinearPredictor", "SensitivityError", "predictor"]


class SensitivityError(ValueError):
    """The model or data set is outside what the sensitivity solver supports."""


def predictor(model: Model, data: Dataset | pd.DataFrame,
              rows: np.ndarray | Sequence[int] | None = None,
              vary: Sequence[str] | None = None, outputs: Sequence[str] | None = None,
              method: str = "auto", output_rows: Mapping[str, Sequence[int]] | None = None):
    """The likelihood's predictor for ``model``: the closed form
    (:class:`pkpd.likelihood.LinearPredictor`) for linear models whose blocks have ≤ 3
    states; else :class:`NonlinearPredictor` (compiled forward sensitivities), or with
    ``method="periodic"`` the periodic graph
    (:class:`pkpd.periodic_likelihood.PeriodicPredictor`, for PK-driven models under regular
    dosing; :class:`pkpd.solvers.periodic.Unsupported` if the model or data do not have its
    structure). ``output_rows`` (output → rows where it is used) lets the periodic graph skip
    grid points that only PK outputs need."""
    from .likelihood import LinearPredictor
    from .periodic_likelihood import PeriodicPredictor

    if method not in ("auto", "periodic", "sensitivity"):
        raise ValueError(f"method must be 'auto', 'periodic' or 'sensitivity', got {method!r}")
    lin = model.linear
    if lin is not None and lin.closed_form:
        return LinearPredictor(model, data, rows=rows)
    if method == "periodic":
        return PeriodicPredictor(model, data, rows=rows, output_rows=output_rows)
    return NonlinearPredictor(model, data, rows=rows, vary=vary, outputs=outputs, rtol=1e-4,
                              atol=1e-8)


class NonlinearPredictor(SubjectParameters):
    """Outputs of a (nonlinear) model at chosen records of a NONMEM data set, with their
    derivatives with respect to every individual parameter.

    Same interface as :class:`pkpd.likelihood.LinearPredictor`: parameters per subject
    (vectors of length ``n_subjects``, subjects in order of first appearance of ID);
    :meth:`predict` returns PyTensor vectors at ``rows`` (default: every EVID 0 record).
    """

    def __init__(self, model: Model, data: Dataset | pd.DataFrame,
                 rows: np.ndarray | Sequence[int] | None = None, *, rtol: float = 1e-6,
                 atol: float = 1e-9, vary: Sequence[str] | None = None,
                 outputs: Sequence[str] | None = None):
        if model.dosing:
            raise SensitivityError(f"{model.name}: dose parameters (F, ALAG, R, D) are not "
                                   "differentiated yet; give them as data")
        self.model, self.rtol, self.atol = model, rtol, atol
        unknown = sorted(set(vary or ()) - set(model.parameters))
        if unknown:
            raise SensitivityError(f"{model.name}: vary names unknown parameters "
                                   f"{', '.join(unknown)}")
        self.vary = tuple(model.parameters) if vary is None else tuple(
            k for k in model.parameters if k in vary)
        unknown = sorted(set(outputs or ()) - set(model.outputs))
        if unknown:
            raise SensitivityError(f"{model.name}: no outputs {', '.join(unknown)}")
        self.outputs = tuple(model.outputs) if outputs is None else tuple(outputs)
        ds, first, subject, self.n_subjects, self.subject_ids, col = subject_layout(data, model)
        df = ds.data
        self.dataset = ds
        if np.any(col["SS"] > 0):
            raise SensitivityError(f"{ds.source}: steady-state records (SS) are not supported "
                                   "by the nonlinear likelihood yet")
        rows = np.flatnonzero(col["EVID"] == 0) if rows is None else np.asarray(rows, int)
        self.rows = rows
        self._cov_sub = {k: df[k].to_numpy(dtype=float)[first] for k in model.covariates}
        self.events = layout_events(model, subject, col)
        self.out_subject = subject[rows]
        self.out_time = col["TIME"][rows]
        self.out_event = np.searchsorted(self.events.slot, rows, side="right") - 1
        self._system()

    # pickling (PyMC's multiprocess sampling): generated functions are rebuilt, not copied
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_systems",
                                                                      "_exact_cache")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._system()

    # -- the augmented system -----------------------------------------------------------
    def _system(self) -> None:
        self._systems: dict[tuple[bool, bool], _Augmented] = {}
        self._exact_cache: tuple = (None, None)  # (parameters, closed form) of the last call

    def _augmented(self, exact: bool, derivatives: bool) -> _Augmented:
        part = self.model.linear_part
        exact = exact and part is not None and part[1].closed_form  # else: one system
        aug = self._systems.get((exact, derivatives))
        if aug is None:
            aug = self._systems[exact, derivatives] = _Augmented(
                self.model, self.vary if derivatives else (), exact, self.outputs)
        return aug

    def evaluate(self, params: Mapping[str, np.ndarray], outputs: Sequence[str],
                 derivatives: bool = True
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Numeric outputs at the rows and their Jacobians (rows × model parameters, zero
        for parameters the model's equations do not use or that do not vary; all zero
        without ``derivatives``), given per-subject parameters."""
        from .simulation import _exact_part

        m, n = self.model, self.n_subjects
        missing = [k for k in outputs if k not in self.outputs]
        if missing:
            raise SensitivityError(f"{', '.join(missing)}: not among this predictor's outputs "
                                   f"({', '.join(self.outputs)})")
        par = {k: np.broadcast_to(np.asarray(params[k], dtype=float), (n,))
               for k in m.parameters}
        cov = {k: np.broadcast_to(self._cov_sub[k], (n,)) for k in m.covariates}
        aug = self._augmented(True, derivatives)
        steps = {k: 1e-6 * np.maximum(np.abs(par[k]), 1e-12) for k in aug.copied}
        exact = linear = None
        if len(aug.linear):
            # the closed form of every copy at once: copies as extra subjects
            C = 1 + len(aug.copied)
            par_all = {k: np.concatenate([v] + [v + steps[k] if k == c else v
                                                for c in aug.copied]) for k, v in par.items()}
            key = (derivatives, tuple(np.concatenate([par_all[k] for k in aug.lin_params]
                                                     ).tolist()))
            if self._exact_cache[0] == key:  # e.g. PK fixed per subject (IPP): reuse
                exact = self._exact_cache[1]
            else:
                props = _exact_part(m, par_all, {k: np.tile(v, C) for k, v in cov.items()},
                                    n * C)
                exact = None if props is None else _stack(props, C)
                self._exact_cache = (key, exact)
            if exact is not None:
                linear = aug.linear
        if exact is None:  # no closed form (or ill-conditioned): integrate every state
            aug = self._augmented(False, derivatives)
            steps = {}
        args = [par[k] for k in m.parameters] + [cov[k] for k in m.covariates]
        x0 = aug.initial(args, [steps[k] for k in aug.copied])
        p = np.stack(args + [steps[k] for k in aug.copied], axis=1)
        amounts = integrate_events(m, self.events, x0, p, self.out_subject, self.out_time,
                                   self.out_event, exact=exact, linear=linear, dup=aug.dup,
                                   n_ctrl=aug.n_states, rtol=self.rtol, atol=self.atol,
                                   kernel=aug.kernel)  # (rows, augmented states)
        x = amounts[:, :aug.n_states]
        sens = aug.sensitivities(amounts, [steps[k][self.out_subject] for k in aug.copied])
        a_rows = [a[self.out_subject] for a in args]
        pos = [list(m.parameters).index(k) for k in aug.params]
        values, jac = {}, {}
        r = len(self.rows)
        for name in outputs:
            h, dhdx, dhdp = aug.outputs[name]
            vals = (*a_rows, *x.T, self.out_time)
            values[name] = np.broadcast_to(np.asarray(h(*vals), dtype=float), (r,)).copy()
            J = np.zeros((r, len(m.parameters)))
            if aug.params:
                gx = np.stack([np.broadcast_to(np.asarray(v, dtype=float), (r,))
                               for v in dhdx(*vals)], axis=1)  # (rows, states)
                gp = np.stack([np.broadcast_to(np.asarray(v, dtype=float), (r,))
                               for v in dhdp(*vals)], axis=1)
                J[:, pos] = np.einsum("rs,rsk->rk", gx, sens) + gp
            jac[name] = J
        return values, jac

    def predict(self, params: Mapping[str, object], outputs: Sequence[str] | None = None
                ) -> dict[str, pt.TensorVariable]:
        """Model outputs at the rows as PyTensor vectors (differentiable in ``params``)."""
        outputs = list(outputs or self.outputs)
        S = self.n_subjects
        P = pt.stack([pt.as_tensor_variable(params[k]) * pt.ones(S)
                      for k in self.model.parameters], axis=1)
        res = _PredictOp(self, tuple(outputs))(P)
        return dict(zip(outputs, res[:len(outputs)], strict=True))


    def compile(self, outputs: Sequence[str] | None = None):
        """A numpy function: individual parameters (vectors over subjects) → outputs."""
        outputs = list(outputs or self.outputs)

        def evaluate(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            return self.evaluate(params, outputs, derivatives=False)[0]

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


class _Augmented:
    """The model's states with their forward sensitivities, generated by sympy and compiled.

    Sensitivities are kept only for the parameters in ``vary`` that reach a state
    (structural zeros dropped). With ``exact`` the model's linear part (the PK) keeps its
    closed form: its sensitivities come from copies of the linear states solved, also in
    closed form, with one parameter raised by a relative 1e-6 (forward differences of an
    exact solution: ≈ 1e-6 relative accuracy, no stiffness), and only the rest is
    integrated. States: [model states | copies (one set per perturbed parameter) |
    sensitivities]; only the model states enter the error test (CVODES' default)."""

    def __init__(self, model: Model, vary: Sequence[str], exact: bool,
                 outputs: Sequence[str]):
        m = model
        xs = list(m.state_symbols)
        n = len(xs)
        pars = [sp.Symbol(k, real=True) for k in m.parameters]
        covs = [sp.Symbol(k, real=True) for k in m.covariates]
        f = [m.odes[s] for s in m.states]
        # states the outputs need (through the coupling); the others are frozen (dx/dt = 0)
        needed = {i for i in range(n) for o in outputs if xs[i] in m.outputs[o].expr.free_symbols}
        frontier = list(needed)
        while frontier:
            i = frontier.pop()
            for j in range(n):
                if j not in needed and sp.diff(f[i], xs[j]) != 0:
                    needed.add(j)
                    frontier.append(j)
        f = [f[i] if i in needed else sp.Integer(0) for i in range(n)]
        init = [c.init for c in m.compartments]
        used = set().union(*(e.free_symbols for e in f), *(init[i].free_symbols for i in needed),
                           *(m.outputs[o].expr.free_symbols for o in outputs))
        self.params = [k for k, p in zip(m.parameters, pars, strict=True)
                       if p in used and k in vary]
        sym = {k: sp.Symbol(k, real=True) for k in self.params}
        part = m.linear_part if exact else None
        L = list(part[0]) if part is not None else []
        lin_syms = set().union(*(e.free_symbols for e in part[1].A),
                               *(e.free_symbols for e in part[1].c)) if L else set()
        self.copied = [k for k in self.params if sym[k] in lin_syms]
        self.lin_params = [k for k, p in zip(m.parameters, pars, strict=True) if p in lin_syms]
        # which parameters each state depends on (fixpoint over the coupling)
        dep = {i: ({k for k in self.copied} if i in L else
                   {k for k in self.params if sym[k] in f[i].free_symbols | init[i].free_symbols})
               for i in range(n)}
        coupled = {i: [j for j in range(n) if j != i and sp.diff(f[i], xs[j]) != 0]
                   for i in range(n)}
        changed = True
        while changed:
            changed = False
            for i in range(n):
                if i in L:
                    continue
                new = set().union(dep[i], *(dep[j] for j in coupled[i]))
                if new != dep[i]:
                    dep[i], changed = new, True
        self.pairs = [(i, k) for i in sorted(needed) if i not in L for k in self.params
                      if k in dep[i]]
        copies = {(c, a): sp.Symbol(f"_X_{c}_{a}", real=True)
                  for c in range(len(self.copied)) for a in L}
        deltas = [sp.Symbol(f"_D_{c}", real=True) for c in range(len(self.copied))]
        S = {pk: sp.Symbol(f"_S_{pk[0]}_{pk[1]}", real=True) for pk in self.pairs}

        def sens(j: int, k: str):
            if j in L:
                if k not in self.copied:
                    return sp.Integer(0)
                c = self.copied.index(k)
                return (copies[c, j] - xs[j]) / deltas[c]
            return S.get((j, k), sp.Integer(0))

        dS = [sum((sp.diff(f[i], xs[j]) * sens(j, k) for j in [i, *coupled[i]]),
                  sp.Integer(0)) + sp.diff(f[i], sym[k]) for i, k in self.pairs]
        exprs = f + [sp.Integer(0)] * len(copies) + dS
        states = xs + list(copies.values()) + list(S.values())
        args = pars + covs + deltas
        self.kernel = load_kernel(kernel_source(exprs, states, args))
        self.n_states = n
        self.linear = np.array(L + [n + i for i in range(len(copies))], dtype=np.int64)
        width = max(len(self.copied), 1)
        self.dup = np.full((len(states), width), -1, dtype=np.int64)
        for (c, a), i in zip(copies, range(n, n + len(copies)), strict=True):
            self.dup[a, c] = i
        lam = dict(modules="numpy", cse=True)
        self._init = sp.lambdify(pars + covs, init, **lam)
        self._dinit = sp.lambdify(pars + covs, [sp.diff(init[i], sym[k]) for i, k in self.pairs],
                                  **lam)
        self._copies = list(copies)
        self._param_order = list(m.parameters) + list(m.covariates)
        self._pair_index = {pk: n + len(copies) + q for q, pk in enumerate(self.pairs)}
        self.outputs: dict[str, tuple] = {}
        K = [sym[k] for k in self.params]
        for name in outputs:
            o = m.outputs[name]
            h = sp.Matrix([o.expr])
            self.outputs[name] = (
                sp.lambdify([*pars, *covs, *xs, TIME], o.expr, **lam),
                sp.lambdify([*pars, *covs, *xs, TIME], list(h.jacobian(sp.Matrix(xs))), **lam),
                sp.lambdify([*pars, *covs, *xs, TIME],
                            list(h.jacobian(sp.Matrix(K))) if K else [], **lam))

    def initial(self, args: list[np.ndarray], steps: list[np.ndarray]) -> np.ndarray:
        """Initial augmented states per subject, (n_sub, states)."""
        n_sub = len(args[0]) if args else 1
        cols = [np.broadcast_to(np.asarray(v, dtype=float), (n_sub,)) for v in self._init(*args)]
        names = list(self._param_order)
        for c, a in self._copies:
            k = self.copied[c]
            bumped = list(args)
            bumped[names.index(k)] = args[names.index(k)] + steps[c]
            cols.append(np.broadcast_to(np.asarray(self._init(*bumped)[a], dtype=float),
                                        (n_sub,)))
        cols += [np.broadcast_to(np.asarray(v, dtype=float), (n_sub,))
                 for v in (self._dinit(*args) if self.pairs else [])]
        return np.stack(cols, axis=1)

    def sensitivities(self, amounts: np.ndarray, steps: list[np.ndarray]) -> np.ndarray:
        """∂x/∂p at each output row, (rows, model states, params)."""
        n = self.n_states
        out = np.zeros((amounts.shape[0], n, len(self.params)))
        for q, (c, a) in enumerate(self._copies):
            k = self.params.index(self.copied[c])
            out[:, a, k] = (amounts[:, n + q] - amounts[:, a]) / steps[c]
        for (i, k), col in self._pair_index.items():
            out[:, i, self.params.index(k)] = amounts[:, col]
        return out


def _stack(prop, C: int) -> SimpleNamespace:
    """Block-diagonal closed form (lam, P, base, modes) of C copies of the linear part whose
    closed forms ``prop`` holds as C consecutive groups of subjects."""
    n_all, M = prop.lam.shape
    n, nL = n_all // C, prop.P.shape[-1]
    lam = np.concatenate([prop.lam[c * n:(c + 1) * n] for c in range(C)], axis=1)
    P = np.zeros((n, M * C, nL * C, nL * C))
    for c in range(C):
        P[:, c * M:(c + 1) * M, c * nL:(c + 1) * nL, c * nL:(c + 1) * nL] = \
            prop.P[c * n:(c + 1) * n]
    base = np.concatenate([prop.base[c * n:(c + 1) * n] for c in range(C)], axis=1)
    modes = np.array([[c * M, (c + 1) * M] for c in range(C) for _ in range(nL)],
                     dtype=np.int64)
    return SimpleNamespace(lam=lam, P=P, base=base, modes=modes)
