"""Predictions of PK-driven nonlinear models under regular dosing as ONE PyTensor graph.

For the likelihood of models such as PK → covalent XPO1 binding → M-spike over years of
weekly dosing, without an ODE solver in the sampler. The model's states are grouped as in
:func:`pkpd.solvers.periodic.split`: PK (closed form), **driven** states (rate affine in
themselves with PK-dependent coefficients, e.g. dB/dt = k(CP)·(1 − B) − k_out·B) and **slow**
states. Each subject's doses must repeat with a period P (e.g. 40 mg every 168 h; any
pattern of bolus doses within the period, e.g. days 1 and 3 every week), observations must
fall within the dosing periods, and the slow states must form a chain that is solved
exactly or nearly so:

    dX_i/dt = c_i·X_i + s_i,

c_i affine in the driven states and "drivers" (PK-only terms such as CP/(EC50 + CP)) with
parameter coefficients, s_i a function of the slow states before X_i only (e.g. clone
dSENS/dt = (KG − KKILL·B)·SENS, M-protein dM/dt = KSYN·(SENS + RES) − KEL·M).

How it is computed (every step below is elementwise over subjects, cumulative sums and a
log-depth prefix composition of affine maps, so the graph has no loop over time and NUTS
gets exact gradients):

1. **PK** on a fine grid within the period (0.1 h for 6 h after each dose, then coarser; see
   :func:`pkpd.solvers.periodic._grid`; twice as coarse when no observed output needs a
   driven state itself, only the slow chain its integrals), in closed form from the
   period's own doses (what is left of earlier periods' doses is below ``carry_tol``, see
   below). At the observation records the PK is exact (every earlier dose, as geometric
   sums over the periods).
2. **Driven states** over each fine step with their coefficients at the step midpoint: the
   exact solution x → e^{z}·x + α·h·φ₁(z), z = β·h, and its integral over the step, both
   affine in the state at the period start. Composed over the period (prefix scan), one
   period is an affine map x → A·x + b, so the state at the start of period n is a geometric
   sum in closed form, and so is its running integral.
3. **Slow states** on a coarse grid (``step`` h, default 84 h, plus the times within the
   period of the observations that need them): one exponential step per interval, exact
   for c_i given the exact integrals of the driven states and drivers from 2., with s_i
   linear in time between grid points (exact when s_i ≡ 0, as for a clone under kill).
   The log multiplier ∫c_i from the first dose is in closed form (c_i is affine in the
   running integrals of 2.), so a link without source is x0·e^{∫c}, and one with a source
   is one prefix sum weighted by e^{−∫c} (M-protein: |c|·span ≈ 24 over 2 years) or, where
   those weights could overflow (sFLC, t½ 3 h), the prefix composition of affine maps.

Assumed and checked at the model file's typical values: what is left of a dose in the PK
compartments one period later is below ``carry_tol`` (1e-4; for selinexor once weekly it is
about 1e-7), so the drive of the driven states is the same in every period to that order.
Accuracy against the error-controlled reference (Dormand–Prince via :func:`pkpd.simulate`
with ``method="ode"``) is tested in
``tests/test_periodic_likelihood.py``. :class:`pkpd.solvers.periodic.Unsupported` is raised
for models and data sets outside this structure; :func:`pkpd.sensitivity.predictor` then
uses the compiled forward sensitivities instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytensor.tensor as pt
import sympy as sp

from .dataset import Dataset
from .events import BOLUS
from .likelihood import (
    LinearPredictor,
    SubjectParameters,
    _covariant_entries,
    _id,
    layout_events,
    subject_layout,
    to_pytensor,
)
from .model import TIME, Model
from .solvers.linear import block_eigenvalues
from .solvers.periodic import Unsupported, _grid, split

__all__ = ["PeriodicPredictor", "affine_scan", "phi1", "phi2", "prefix_sum"]


# ------------------------------------------------------------------------------- kernels
def phi1(z, xp=pt):
    """(e^z − 1)/z, 1 at z = 0 (numpy or PyTensor via ``xp``)."""
    big = xp.abs(z) > 1e-8
    safe = xp.where(big, z, 1.0)
    return xp.where(big, xp.expm1(safe) / safe, 1.0 + 0.5 * z)


def phi2(z, xp=pt):
    """(e^z − 1 − z)/z², 1/2 at z = 0."""
    big = xp.abs(z) > 1e-3
    safe = xp.where(big, z, 1.0)
    return xp.where(big, (xp.expm1(safe) - safe) / safe ** 2, 0.5 + z / 6.0 + z * z / 24.0)


def affine_scan(A, b, n: int, xp=pt):
    """Inclusive prefix composition along the last axis (length ``n``) of the affine maps
    x → A_j·x + b_j: returns (P_j, Q_j) with x_{j+1} = P_j·x_0 + Q_j. Log-depth
    (Hillis–Steele), so the graph has ⌈log₂ n⌉ elementwise stages and no loop."""
    s = 1
    while s < n:
        lead = A[..., :s]
        A_prev = xp.concatenate([xp.ones_like(lead), A[..., :-s]], axis=-1)
        b_prev = xp.concatenate([xp.zeros_like(lead), b[..., :-s]], axis=-1)
        b = A * b_prev + b
        A = A * A_prev
        s *= 2
    return A, b


def prefix_sum(x, n: int, xp=pt):
    """Inclusive cumulative sum along the last axis (length ``n``), log-depth like
    :func:`affine_scan` (XLA's CPU cumsum, used by the JAX backend, is quadratic in n)."""
    s = 1
    while s < n:
        x = x + xp.concatenate([xp.zeros_like(x[..., :s]), x[..., :-s]], axis=-1)
        s *= 2
    return x


# ------------------------------------------------------------------------------- structure
@dataclass(frozen=True)
class _Slow:
    index: int                 # model state index
    c: sp.Expr                 # own rate coefficient (drivers/driven states as symbols)
    s: sp.Expr                 # source (earlier slow states, parameters)


def _fast(model: Model, sp_split) -> set:
    """Symbols of the PK-driven terms: the drivers and the driven states."""
    xs = model.state_symbols
    return set(sp_split.driver_symbols) | {xs[i] for i in sp_split.driven}


def _chain(model: Model, sp_split) -> list[_Slow]:
    """The slow states as a chain dX/dt = c·X + s in solving order (see the module
    docstring); :class:`Unsupported` otherwise."""
    xs = model.state_symbols
    slow_syms = {xs[i] for i in sp_split.slow}
    fast = _fast(model, sp_split)
    parts = {}
    for i, r in zip(sp_split.slow, sp_split.slow_rates, strict=True):
        x = xs[i]
        c = sp.expand(sp.diff(r, x))
        if c.free_symbols & slow_syms:
            raise Unsupported(f"{model.name}: the rate of {model.states[i]} is not linear in "
                              f"{model.states[i]} with a coefficient free of slow states")
        s = sp.simplify(r - c * x)
        if s.free_symbols & fast or x in s.free_symbols:
            raise Unsupported(f"{model.name}: the rate of {model.states[i]} has a source term "
                              "that depends on PK-driven terms")
        parts[i] = _Slow(i, c, s)
    order: list[_Slow] = []
    done: set = set()
    while len(order) < len(parts):
        ready = [p for i, p in parts.items() if i not in done
                 and (p.s.free_symbols & slow_syms) <= {xs[j] for j in done}]
        if not ready:
            raise Unsupported(f"{model.name}: the slow states are coupled both ways (not a "
                              "chain)")
        for p in ready:
            order.append(p)
            done.add(p.index)
    return order


def _pattern(t: np.ndarray, a: np.ndarray, c: np.ndarray) -> tuple[int, float | None]:
    """Smallest q such that the dose sequence repeats every q doses with a constant period P
    (the same amounts and compartments; the last period may stop early): (q, P), or
    (len(t), None) if it never does."""
    m = len(t)
    for q in range(1, m):
        P = t[q] - t[0]
        if (P > 0 and np.allclose(t[q:] - t[:-q], P, rtol=0, atol=1e-6)
                and np.array_equal(a[q:], a[:-q]) and np.array_equal(c[q:], c[:-q])
                and t[q - 1] - t[0] < P):
            return q, float(P)
    return m, None


# ------------------------------------------------------------------------------- predictor
class PeriodicPredictor(SubjectParameters):
    """Outputs of a PK-driven nonlinear model at chosen records of a NONMEM data set in which
    each subject's bolus doses repeat with a period (see the module docstring).

    Same interface as :class:`pkpd.likelihood.LinearPredictor`: parameters per subject
    (vectors of length ``n_subjects``, subjects in order of first appearance of ID);
    :meth:`predict` returns PyTensor vectors at ``rows`` (default: every EVID 0 record).
    ``output_rows`` (output name → rows where it is used; default: every output at every row)
    saves grid points: outputs that need driven or slow states are exact only at their
    rows (elsewhere they take the states of the grid point before); if none of them needs a
    driven state (e.g. M-spike and PK observed, XPO1 not), the fine grid is twice as coarse
    (``grid_scale`` 2). ``step`` (h) is the
    longest step of the slow states.
    """

    compile = LinearPredictor.compile

    def __init__(self, model: Model, data: Dataset | pd.DataFrame,
                 rows: np.ndarray | Sequence[int] | None = None, *,
                 output_rows: Mapping[str, Sequence[int]] | None = None, step: float = 84.0,
                 carry_tol: float = 1e-4):
        if model.dosing:
            raise Unsupported(f"{model.name}: F, lag or modelled rates of doses")
        self.model = model
        self.split = split(model)
        self.chain = _chain(model, self.split)
        ds, first, subject, S, self.subject_ids, col = subject_layout(data, model)
        self.dataset, self.n_subjects = ds, S
        df = ds.data
        evid = col["EVID"].astype(int)
        where = ds.source
        if np.any((evid == 3) | (evid == 4)):
            raise Unsupported(f"{where}: resets (EVID 3/4)")
        dose = (evid == 1) & (col["AMT"] != 0)
        if np.any(dose & (col["RATE"] != 0)):
            raise Unsupported(f"{where}: infusions (RATE ≠ 0)")
        if np.any(dose & (col["SS"] > 0)):
            raise Unsupported(f"{where}: steady-state dose records (SS)")
        rows = np.flatnonzero(evid == 0) if rows is None else np.asarray(rows, dtype=int)
        self.rows = rows
        used = set().union(*(e.free_symbols for e in model.odes.values()),
                           *(c.init.free_symbols for c in model.compartments))
        for k in model.covariates:
            if sp.Symbol(k, real=True) in used:
                v = df[k].to_numpy(dtype=float)
                if np.any(v != v[first][subject]):
                    raise Unsupported(f"{where}: covariate {k} changes within a subject")
        self._cov_sub = {k: df[k].to_numpy(dtype=float)[first] for k in model.covariates}
        self._cov_rec = {k: df[k].to_numpy(dtype=float)[rows] for k in model.covariates}
        pk = self.split.pk
        c_no = col["CMT"].astype(int)
        c_no = np.where(c_no == 0, model.default_dose_cmt, c_no)
        st = np.array([model.cmt_numbers.get(int(x), -1) for x in c_no])
        if np.any(dose & ~np.isin(st, pk)):
            raise Unsupported(f"{where}: doses into a compartment outside the PK part")

        # dose instances (ADDL copies expanded, NONMEM order), per subject ---------------
        time = col["TIME"]
        row_t, row_sub = time[rows], subject[rows]
        ev = layout_events(model, subject, col)
        last = np.array([max(row_t[row_sub == s_].max(initial=-np.inf),
                             time[subject == s_].max()) for s_ in range(S)])
        keep = (ev.kind == BOLUS) & (ev.value != 0) & (ev.time <= last[ev.subject] + 1e-9)
        # (time, amount, state, slot: the records from slot on see the dose)
        inst: list[list[tuple[float, float, int, int]]] = [[] for _ in range(S)]
        for s_, *e in zip(ev.subject[keep], ev.time[keep], ev.value[keep], ev.cmt[keep],
                          ev.slot[keep], strict=True):
            inst[s_].append(tuple(e))
        sub_first_t = time[first]
        periods, offsets, t0s, counts = [], [], [], []
        for s_ in range(S):
            lst = inst[s_]
            t_end = max(row_t[row_sub == s_].max(initial=sub_first_t[s_]), sub_first_t[s_])
            if lst:
                t = np.array([x[0] for x in lst])
                a = np.array([x[1] for x in lst])
                c = np.array([x[2] for x in lst])
                t0 = t[0]
                if sub_first_t[s_] < t0 - 1e-9:
                    raise Unsupported(f"{where}: ID {_id(self.subject_ids[s_])} has records before "
                                      "its first dose")
                q, P = _pattern(t, a, c)
                if q > 8:
                    raise Unsupported(f"{where}: ID {_id(self.subject_ids[s_])}: the doses do not "
                                      "repeat with a constant period (in patterns of ≤ 8)")
                if P is None:  # a few doses without repetition: one period spanning it all
                    q, P = len(t), max(t_end - t0, t[-1] - t0 + 1.0)
                n_per = -(-len(t) // q)
                if len(t) % q and t0 + (n_per - 1) * P + t[len(t) % q] - t0 <= t_end:
                    raise Unsupported(f"{where}: ID {_id(self.subject_ids[s_])}: the last dosing "
                                      "period stops early")
                if t_end > t0 + n_per * P + 1e-6:
                    raise Unsupported(f"{where}: ID {_id(self.subject_ids[s_])} has records after "
                                      "its last dosing period")
                periods.append(P)
                offsets.append((t[:q] - t0, a[:q], c[:q]))
                counts.append(n_per)
            else:
                t0 = sub_first_t[s_]
                periods.append(max(t_end - t0, 1.0))
                offsets.append((np.zeros(0), np.zeros(0), np.zeros(0, int)))
                counts.append(1)
            t0s.append(t0)
        self._P = np.array(periods)
        self._N = np.array(counts)
        t0s = np.array(t0s)
        self._check_carry(carry_tol)
        self._weighted = self._weighted_links()

        # per-subject grids within the period, padded to common lengths -------------------
        exact = np.ones(len(rows), bool)
        grid_scale = 1.0
        if output_rows is not None:
            pk_syms = {model.state_symbols[i] for i in pk}
            state_rows = [r for k, rr in output_rows.items()
                          if model.outputs[k].expr.free_symbols
                          & (set(model.state_symbols) - pk_syms) for r in rr]
            exact = np.isin(rows, state_rows)
            driven_syms = {model.state_symbols[i] for i in self.split.driven}
            if not any(len(rr) and model.outputs[k].expr.free_symbols & driven_syms
                       for k, rr in output_rows.items()):
                # the driven states enter only through their integrals over the coarse
                # steps (the slow chain), which the midpoint maps get right on a grid twice
                # as coarse (M-spike within 6e-4 of the reference either way, 2 years of
                # weekly dosing); their values at records need the finer grid
                grid_scale = 2.0
        self.grid_scale = grid_scale
        rel = row_t - t0s[row_sub]
        n_row = np.floor(rel / self._P[row_sub] + 1e-9).astype(int)
        tau = np.round(rel - n_row * self._P[row_sub], 9)
        wrap = tau >= self._P[row_sub] - 1e-9
        n_row, tau = np.where(wrap, n_row + 1, n_row), np.where(wrap, 0.0, tau)
        coarse, fine = [], []
        for s_ in range(S):
            P = self._P[s_]
            cs = np.unique(np.round(np.r_[0.0, np.arange(step, P - 1e-9, step),
                                          tau[(row_sub == s_) & exact]], 9))
            coarse.append(cs)
            fine.append(_grid(list(offsets[s_][0]), np.r_[cs, P], grid_scale))
        G = max(len(c) for c in coarse)
        K = max(len(f) for f in fine) - 1
        Nmax = int(self._N.max())
        self._G, self._K, self._Nmax = G, K, Nmax
        cpad = np.array([np.r_[c, np.full(G - len(c), c[-1])] for c in coarse])  # (S, G)
        fpad = np.array([np.r_[f, np.full(K + 1 - len(f), f[-1])] for f in fine])  # (S, K+1)
        self._h = np.diff(fpad, axis=1)  # (S, K), 0 on padding
        self._mid = 0.5 * (fpad[:, 1:] + fpad[:, :-1])
        self._ci = np.array([np.searchsorted(f, c) for f, c in zip(fpad, cpad, strict=True)])
        # coarse times of the slow chain, (S, Nmax·G + 1), from each subject's first dose
        tc = (np.arange(Nmax)[None, :, None] * self._P[:, None, None] + cpad[:, None, :])
        tc = np.concatenate([tc.reshape(S, Nmax * G), (Nmax * self._P)[:, None]], axis=1)
        self._hc = np.diff(tc, axis=1)
        g_row = np.array([int(np.searchsorted(coarse[s_], tau[j] + 1e-9, side="right")) - 1
                          for j, s_ in enumerate(row_sub)], dtype=int)
        self._row_index = np.where(n_row >= Nmax, Nmax * G, n_row * G + g_row)
        self.out_subject, self.out_time = row_sub, row_t
        # pattern doses within the period (S, Q), amount 0 on padding
        Q = max(max(len(o[0]) for o in offsets), 1)
        self._pt = np.zeros((S, Q))
        self._pa = np.zeros((S, Q))
        self._ps = np.full((S, Q), pk[0])
        for s_, (t, a, c) in enumerate(offsets):
            self._pt[s_, :len(t)], self._pa[s_, :len(t)], self._ps[s_, :len(t)] = t, a, c
        # the PK at the output records (NONMEM order: a dose at the record's time counts if
        # its record comes first): per pattern dose, how many of its repeats the record has
        # seen and how long ago the latest was; the repeats are a geometric sum
        self._row_cnt = np.zeros((len(rows), Q))
        self._row_lag = np.zeros((len(rows), Q))
        for s_, lst in enumerate(inst):
            here = np.flatnonzero(row_sub == s_)
            if not lst or not len(here):
                continue
            q = len(offsets[s_][0])
            t = np.array([x[0] for x in lst])
            r = np.array([x[3] for x in lst])
            delta = row_t[here, None] - t[None, :]
            on = (delta > 1e-12) | ((np.abs(delta) <= 1e-12) & (rows[here, None] >= r[None, :]))
            pos = np.arange(len(t)) % q
            for j in range(q):
                m = on & (pos == j)[None, :]
                self._row_cnt[here, j] = m.sum(axis=1)
                self._row_lag[here, j] = np.where(m, delta, np.inf).min(axis=1, initial=np.inf)
        self._row_lag[self._row_cnt == 0] = 0.0

    def _check_carry(self, tol: float) -> None:
        """What is left of a dose one period later, at the model's typical values."""
        idx, lin = self.model.linear_part
        typ = self.individual_typical()
        A = np.zeros((self.n_subjects, len(idx), len(idx)))
        for i in range(len(idx)):
            for j in range(len(idx)):
                if lin.A[i, j] != 0:
                    A[:, i, j] = self.model.compile(lin.A[i, j])(typ, self._cov_sub)
        slowest = np.linalg.eigvals(A).real.max(axis=1)
        left = np.exp(slowest * self._P)
        bad = (self._N > 1) & (left > tol)
        if np.any(bad):
            j = int(np.flatnonzero(bad)[0])
            raise Unsupported(f"{left[j]:.1e} of a dose is left in the PK compartments one "
                              f"{self._P[j]:g}-h period later (above {tol:g}; ID "
                              f"{_id(self.subject_ids[j])}): periods are not independent")

    def _weighted_links(self, reach: float = 30.0) -> frozenset[int]:
        """Chain links with a source whose rate coefficient is a constant c (no drivers or
        driven states in it, e.g. M-protein elimination −KELM) and |c|·(time span of the
        subject's data) ≤ ``reach`` at the typical values: these are solved by one prefix
        sum weighted by e^{−c·t} instead of the affine scan (the weights stay below e^{300},
        far from overflow, even at ten times the typical |c|)."""
        fast = _fast(self.model, self.split)
        typ = self.individual_typical()
        span = self._N * self._P
        out = set()
        for part in self.chain:
            if part.s == 0 or part.c.free_symbols & fast:
                continue
            c = np.abs(np.broadcast_to(self.model.compile(part.c)(typ, self._cov_sub),
                                       span.shape))
            if np.all(c * span <= reach):
                out.add(part.index)
        return frozenset(out)

    # -- graph -------------------------------------------------------------------------
    def predict(self, params: Mapping[str, object], outputs: Sequence[str] | None = None
                ) -> dict[str, pt.TensorVariable]:
        """Model outputs at the output rows, given individual parameters (each a vector of
        length ``n_subjects`` or a scalar)."""
        model, s = self.model, self.split
        S, K, G, Nmax = self.n_subjects, self._K, self._G, self._Nmax
        xs = model.state_symbols
        par = {k: pt.as_tensor_variable(params[k]) * pt.ones(S) for k in model.parameters}
        env_s = {sp.Symbol(k, real=True): v for k, v in par.items()}
        env_s.update({sp.Symbol(k, real=True): pt.as_tensor_variable(v)
                      for k, v in self._cov_sub.items()})
        col = {k: v[:, None] for k, v in env_s.items()}  # (S, 1) against (S, ·)

        # PK: eigenvalues and covariant weights of the closed form ------------------------
        idx, lin = model.linear_part
        n = len(idx)
        zero = pt.zeros(S)
        entries = [[to_pytensor(lin.A[i, j], env_s) * pt.ones(S) if lin.A[i, j] != 0 else 0.0
                    for j in range(n)] for i in range(n)]
        Am = pt.stack([pt.stack([zero if isinstance(x, float) else x for x in row], axis=-1)
                       for row in entries], axis=-2)
        lam = block_eigenvalues(Am, lin.blocks, xp=pt)  # (S, n)
        lam_list = [lam[:, i] for i in range(n)]
        # only what the requested outputs need (e.g. not sFLC when fitting the M-spike)
        names = list(model.outputs) if outputs is None else list(outputs)
        need = set().union(*(model.outputs[k].expr.free_symbols for k in names))
        for part in reversed(self.chain):
            if xs[part.index] in need:
                need |= part.c.free_symbols | part.s.free_symbols
        chain = [p for p in self.chain if xs[p.index] in need]
        driven = [i for i in s.driven if xs[i] in need]
        drivers = [(d, e) for d, e in zip(s.driver_symbols, s.drivers, strict=True) if d in need]
        need_pk = set().union(*(model.odes[model.states[i]].free_symbols for i in driven),
                              *(e.free_symbols for _, e in drivers))
        w = {}  # (a, dose state) → (S, n)
        dose_states = [int(c) for c in np.unique(self._ps)]
        for a in range(n):
            for c in dose_states:
                w[a, c] = pt.stack([x * pt.ones(S) for x in _covariant_entries(
                    entries, lam_list, a, idx.index(int(c)))], axis=-1)

        # PK at the fine midpoints over one period, from that period's doses (what is left
        # of earlier periods' is below carry_tol, checked at build), (S, K)
        pk_needed = [a for a in range(n) if xs[idx[a]] in need_pk]
        lag = self._mid[:, :, None] - self._pt[:, None, :]  # (S, K, Q)
        on = lag > 0
        e = pt.exp(lam[:, None, None, :] * np.where(on, lag, 0.0)[..., None])  # (S, K, Q, n)
        pk_fine = {}
        for a in pk_needed:
            acc = 0.0
            for c in dose_states:
                m = (self._ps[:, None, :] == c) & on
                if m.any():
                    acc = acc + ((pt.switch(m[..., None], e, 0.0)
                                  * w[a, c][:, None, None, :]).sum(-1)
                                 * self._pa[:, None, :]).sum(-1)
            pk_fine[xs[idx[a]]] = acc * pt.ones((S, K))
        h = self._h
        ci = self._ci
        rows_s = np.arange(S)[:, None]

        def at_coarse(y):
            """(S, K+1) → at the coarse offsets (S, G) and the period end (S,)."""
            return y[rows_s, ci], y[:, -1]

        # driven states over one period, then over the periods ---------------------------
        driven_coarse, driven_cum = {}, {}
        zeros = pt.zeros((S, 1))
        for i in driven:
            x = xs[i]
            f = model.odes[model.states[i]]
            env = {**col, **pk_fine}
            alpha = to_pytensor(f.subs(x, 0), env) * pt.ones((S, K))
            z = to_pytensor(sp.diff(f, x), env) * h
            p1 = phi1(z)
            Pf, Qf = affine_scan(pt.exp(z), alpha * h * p1, K)
            Pf = pt.concatenate([zeros + 1.0, Pf], axis=-1)  # x(τ_j) = P·x(0) + Q
            Qf = pt.concatenate([zeros, Qf], axis=-1)
            Uf = pt.concatenate([zeros, prefix_sum(Pf[..., :-1] * h * p1, K)], axis=-1)
            Vf = pt.concatenate([zeros, prefix_sum(Qf[..., :-1] * h * p1 + alpha * h * h
                                                   * phi2(z), K)], axis=-1)
            (Pc, Pe), (Qc, Qe), (Uc, Ue), (Vc, Ve) = map(at_coarse, (Pf, Qf, Uf, Vf))
            L1 = z.sum(axis=-1)  # log of the period's multiplier
            x0 = to_pytensor(model.compartments[i].init, env_s) * pt.ones(S)
            pw = pt.exp(L1[:, None] * np.arange(Nmax)[None, :])  # A1^k, (S, Nmax)
            gs = pt.concatenate([pt.zeros((S, 1)), prefix_sum(pw, Nmax)[:, :-1]], axis=1)
            x1 = Pe * x0 + Qe
            starts = pt.concatenate([x0[:, None], pw * x1[:, None] + gs * Qe[:, None]],
                                    axis=1)  # x at the start of periods 0…Nmax, (S, Nmax+1)
            whole = Ue[:, None] * starts[:, :Nmax] + Ve[:, None]  # ∫ over each period
            cw = pt.concatenate([pt.zeros((S, 1)), prefix_sum(whole, Nmax)], axis=1)
            xs_n = starts[:, :Nmax, None]
            val = Pc[:, None, :] * xs_n + Qc[:, None, :]
            cum = Uc[:, None, :] * xs_n + Vc[:, None, :] + cw[:, :Nmax, None]
            driven_coarse[x] = pt.concatenate([val.reshape((S, Nmax * G)),
                                               starts[:, Nmax:]], axis=1)
            driven_cum[x] = pt.concatenate([cum.reshape((S, Nmax * G)), cw[:, Nmax:]], axis=1)

        # drivers: running integrals at the coarse points --------------------------------
        nn = np.arange(Nmax)[None, :, None]
        for dsym, expr in drivers:
            val = to_pytensor(expr, {**col, **pk_fine}) * pt.ones((S, K))
            C, E = at_coarse(pt.concatenate([zeros, prefix_sum(val * h, K)], axis=-1))
            cum = nn * E[:, None, None] + C[:, None, :]
            driven_cum[dsym] = pt.concatenate([cum.reshape((S, Nmax * G)),
                                               (Nmax * E)[:, None]], axis=1)

        # slow chain on the coarse grid: the log multiplier from the start, Z_j = ∫c, is in
        # closed form (c is affine in the drivers and driven states, whose running integrals
        # are known), so a chain link without source is x0·e^Z and one with a source is an
        # affine recursion, x_{j+1} = e^{z_j}·x_j + b_j with z_j = Z_{j+1} − Z_j
        T = Nmax * G
        hc = self._hc
        elapsed = np.concatenate([np.zeros((S, 1)), np.cumsum(hc, axis=1)], axis=1)
        slow_vals = {}
        for part in chain:
            c_e = part.c
            fast = [u for u in driven_cum if u in c_e.free_symbols]
            Z = to_pytensor(c_e.subs({u: 0 for u in fast}), col) * elapsed
            for u in fast:
                Z = Z + to_pytensor(sp.diff(c_e, u), col) * driven_cum[u]
            x0 = to_pytensor(model.compartments[part.index].init, env_s) * pt.ones(S)
            if part.s == 0:
                vals = x0[:, None] * pt.exp(Z)
            else:
                src = to_pytensor(part.s, {**col, **slow_vals}) * pt.ones((S, T + 1))
                z = Z[:, 1:] - Z[:, :-1]
                p1, p2 = phi1(z), phi2(z)
                b = hc * (src[:, :-1] * (p1 - p2) + src[:, 1:] * p2)
                if part.index in self._weighted:
                    # x_n = e^{Z_n}·(x0 + Σ_{j<n} e^{−Z_{j+1}}·b_j): one prefix sum; |Z| is
                    # bounded at build time (_weighted), so e^{−Z} cannot overflow
                    acc = prefix_sum(pt.exp(-Z[:, 1:]) * b, T)
                    vals = pt.exp(Z) * pt.concatenate([x0[:, None], x0[:, None] + acc], axis=1)
                else:
                    Pc, Qc = affine_scan(pt.exp(z), b, T)
                    vals = pt.concatenate([x0[:, None], Pc * x0[:, None] + Qc], axis=1)
            slow_vals[xs[part.index]] = vals

        # outputs at the rows -------------------------------------------------------------
        sub = self.out_subject
        flat = sub * (T + 1) + self._row_index
        env = {k: v[sub] for k, v in env_s.items() if k.name in model.parameters}
        env.update({sp.Symbol(k, real=True): pt.as_tensor_variable(v)
                    for k, v in self._cov_rec.items()})
        for x, v in {**driven_coarse, **slow_vals}.items():
            env[x] = v.reshape((S * (T + 1),))[flat]
        pk_out = [a for a in range(n) if xs[idx[a]] in need]
        if pk_out:
            lam_r = lam[sub][:, None, :]  # (R, 1, n)
            P_r = self._P[sub][:, None, None]
            geo = pt.expm1(lam_r * P_r * self._row_cnt[..., None]) / pt.expm1(lam_r * P_r)
            e = pt.exp(lam_r * self._row_lag[..., None]) * geo  # (R, Q, n)
            amt = self._pa[sub] * (self._row_cnt > 0)
            for a in pk_out:
                acc = 0.0
                for c in dose_states:
                    m = self._ps[sub] == c
                    if m.any():
                        acc = acc + ((e * w[a, c][sub][:, None, :]).sum(-1)
                                     * np.where(m, amt, 0.0)).sum(-1)
                env[xs[idx[a]]] = acc * pt.ones(len(sub))
        env[TIME] = pt.as_tensor_variable(self.out_time)
        return {k: to_pytensor(model.outputs[k].expr, env) * pt.ones(len(sub)) for k in names}
