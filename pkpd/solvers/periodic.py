"""Fast solution of a PK-driven model under repeated dosing patterns (e.g. a weekly regimen
with dose modifications), for trial simulation of thousands of patients over years.

The model's states fall into three groups, found from its sympy equations:

* **PK** — the linear part entered by the doses (:attr:`pkpd.model.Model.linear_part`),
  solved in closed form;
* **driven** states — each one's rate depends on PK states and otherwise only on parameters
  and the state itself, linearly (e.g. covalent target binding dB/dt = k(CP)·(1 − B) − k·B,
  cumulative hazards dH/dt = base + slope·CP). Over one step of a dosing pattern their
  solution is an affine map x → α·x + β, and so is their integral, ∫x dt → γ·x + δ;
* **slow** states — the rest (clone burden, M-protein, platelet chain, ...). Their rates
  must be affine in the driven states and in "drivers", the largest sub-expressions that
  depend on PK states only (e.g. 1 − EMAX·CP/(EC50 + CP)).

For one period of a dosing pattern (e.g. 100 mg at 0 h of a 168-h week), following a period
of a given pattern (whose doses' tails still drive it), the maps α, β, γ, δ and the step
means of the drivers are computed per subject on a fine grid (0.2 h after each dose, coarser
later; second order on the grid and on every other point of it, combined by Richardson
extrapolation: fourth order) and kept until that subject's pair of patterns changes. Each
step of the simulation is then a few arithmetic operations per state: the driven states by
their maps, the slow states by one exponential Heun step (ETD2: exact for each state's own
linear rate, the rest linear in time) with the driven states and drivers at their step
means. Since the slow rates are linear in those, the step means carry their whole effect
over the step up to the covariance of the fast drive with the slow states within the step
(second order in its length; a step end 12 h after each dose refines the first day). Transit
chains among the slow states (e.g. the platelet maturation compartments, dT2/dt = k·T1 −
k·T2) are exact in their own linear coupling: their matrix exponential and φ functions are
per-subject constants (:func:`_chains`), so only their input (e.g. k·PROL) is taken linear
in time. With that, 24-h steps (8 per week for a weekly dose, 16 of the former scheme at 12
h) keep the platelet chain within 2 % of the reference (3.4 % before).

A whole course with a per-subject dose rule (hold below a threshold, restart one level
lower) runs in one compiled loop per subject (:meth:`PeriodicSolver.run_ladder`), composing
each subject's maps when its pattern pair changes; :meth:`PeriodicSolver.run` advances one
period for all subjects with patterns chosen by the caller. ``run_ladder`` steps the slow
states in groups that read no other group's states (:func:`_components`: e.g. the platelet
chain; the clone burden with M-protein, sFLC and hazards). Under unchanged maps a group
whose period start repeats the last stepped one's within ``skip_tol`` (relative) is on its
periodic orbit: it is not stepped, its trajectory within the period repeats (e.g. the
platelet chain in 66 % of the weeks at 100 mg QW, 98 % without drug). A group without
drivers whose rates barely change over the period (``whole_tol``; e.g. the burden without
drug) takes one step of the whole period. Driven states that no slow rate, monitor or
accumulated sum reads within the period (e.g. adverse-event hazards) take the period's map.

Assumed, and checked: what is left of a period's doses 1 + ``memory`` periods later is
negligible (below ``carry_tol`` of them; the maps depend on the patterns of this and the
``memory`` previous periods: 1 by default, ``memory=None`` takes 0 to 3 as each subject's
elimination needs: 0, one map per pattern, when a period's doses are gone by its end, as for
selinexor once weekly). Accuracy against the error-controlled reference
(Dormand–Prince at rtol 1e-9) is tested in ``tests/test_periodic.py``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import sympy as sp

from ..model import TIME, Model
from .dose_rule import RULE
from .linear import phi

__all__ = ["LadderResult", "LadderState", "Pattern", "PeriodicSolver", "Unsupported",
           "split"]


class Unsupported(ValueError):
    """The model or pattern does not have the structure this solver needs."""


@dataclass(frozen=True)
class Pattern:
    """Doses (mg) at ``times`` (h from the start of each period); empty for no dose."""

    times: tuple[float, ...] = ()
    amounts: tuple[float, ...] = ()


@dataclass(frozen=True)
class LadderState:
    """Per-subject state of :meth:`PeriodicSolver.run_ladder`'s rule (updated in place)."""

    level: np.ndarray  # index in the ladder
    held: np.ndarray
    stopped: np.ndarray
    first_resume: np.ndarray  # period of the first restart, -1: none
    periods: int  # periods run so far


@dataclass(frozen=True)
class LadderResult:
    """What :meth:`PeriodicSolver.run_ladder` returns (periods of this call)."""

    record: np.ndarray  # (n, periods, len(record)) at each period end
    low: np.ndarray  # (n, periods) lowest monitor value at the period start and samples
    total: np.ndarray  # (n,) sum of ``accumulate`` at the samples
    which: np.ndarray  # (n, periods) pattern followed
    state: LadderState
    skipped: np.ndarray | None = None  # (n, groups) periods each group was not stepped


@dataclass(frozen=True)
class Split:
    pk: tuple[int, ...]
    driven: tuple[int, ...]
    slow: tuple[int, ...]
    drivers: tuple[sp.Expr, ...]  # PK-only sub-expressions the slow rates use
    driver_symbols: tuple[sp.Symbol, ...]
    slow_rates: tuple[sp.Expr, ...]  # with drivers replaced by their symbols


def _has(e: sp.Expr, syms: set) -> bool:
    return bool(e.free_symbols & syms)


def split(model: Model) -> Split:
    """Group the states (see the module docstring); :class:`Unsupported` if the model does not
    fit."""
    part = model.linear_part
    if part is None:
        raise Unsupported(f"{model.name}: no closed-form PK part")
    pk = tuple(part[0])
    xs = model.state_symbols
    pk_syms = {xs[i] for i in pk}
    f = [model.odes[s] for s in model.states]
    if any(TIME in e.free_symbols for e in f):
        raise Unsupported(f"{model.name}: rates depend on time explicitly")
    driven = []
    for i in range(len(xs)):
        if i in pk:
            continue
        others = f[i].free_symbols & (set(xs) - pk_syms - {xs[i]})
        if (not others and _has(f[i], pk_syms)
                and xs[i] not in sp.diff(f[i], xs[i]).free_symbols):
            driven.append(i)
    slow = [i for i in range(len(xs)) if i not in pk and i not in driven]
    fixed = {xs[i] for i in slow} | {xs[i] for i in driven}
    drivers: dict[sp.Expr, sp.Symbol] = {}

    def cut(e: sp.Expr) -> sp.Expr:
        if _has(e, pk_syms) and not _has(e, fixed):
            if e not in drivers:
                drivers[e] = sp.Symbol(f"_D{len(drivers)}", real=True)
            return drivers[e]
        if not e.args:
            return e
        return e.func(*[cut(a) for a in e.args])

    rates = [cut(f[i]) for i in slow]
    dsyms = list(drivers.values())
    label = {d: f"the PK term {e}" for e, d in drivers.items()}
    linear_in = dsyms + [xs[i] for i in driven]
    for i, r in zip(slow, rates, strict=True):
        for u in linear_in:
            du = sp.diff(r, u)
            if any(sp.diff(du, v) != 0 for v in linear_in):
                raise Unsupported(f"{model.name}: the rate of {model.states[i]} is not linear "
                                  f"in {label.get(u, u)} (jointly with the other PK-driven "
                                  "terms and states)")
    return Split(pk, tuple(driven), tuple(slow), tuple(drivers), tuple(dsyms), tuple(rates))


def _grid(dose_times: Sequence[float], edges: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Fine quadrature grid over one period: 0.1 h for 6 h after a dose, then 0.25 h to 12 h,
    0.5 h to 24 h, 1 h to 48 h, 2 h after (each spacing times ``scale``); plus the coarse step
    ends ``edges``."""
    pts = [np.arange(0.0, edges[-1], 2.0 * scale), edges]
    for t in dose_times:
        for a, b, h in ((0, 6, 0.1), (6, 12, 0.25), (12, 24, 0.5), (24, 48, 1.0)):
            pts.append(t + np.arange(a, b, h * scale))
    g = np.unique(np.round(np.concatenate(pts), 9))
    return g[(g >= 0) & (g <= edges[-1])]


_KERNEL = """
import math
import numpy as np
from numba import njit, prange


@njit(cache=True, inline="always", fastmath=True)
def slow_rates(p, x, f, d, a, b, memo):
{body}


NPOW = {NPOW}


@njit(cache=True, inline="always")
def _mpow(x, y, memo, k):
    # _pow remembering its last arguments at call site k: a base that depends only on states
    # whose predictor is their corrected value (e.g. tumour burden) comes back unchanged at
    # the start of the next step; one that moved by a relative r with (|y| + 6)·|r| < 0.05
    # (e.g. a platelet count, or the burden over a day) from the last value by (1 + r)^y to
    # 7 terms (relative error below ((|y| + 6)·|r|)⁷/7! < 1.6e-13); x itself for y = 1
    if y == 1.0:
        return x
    if y == memo[3 * k + 1]:
        x0 = memo[3 * k]
        if x == x0:
            return memo[3 * k + 2]
        r = x / x0 - 1.0
        if abs(r) * (abs(y) + 6.0) < 0.05:
            v = memo[3 * k + 2] * (1.0 + y * r * (1.0 + (y - 1.0) * r / 2.0 * (
                1.0 + (y - 2.0) * r / 3.0 * (1.0 + (y - 3.0) * r / 4.0 * (
                    1.0 + (y - 4.0) * r / 5.0 * (1.0 + (y - 5.0) * r / 6.0))))))
            memo[3 * k] = x
            memo[3 * k + 2] = v
            return v
    v = _pow(x, y)
    memo[3 * k] = x
    memo[3 * k + 1] = y
    memo[3 * k + 2] = v
    return v


@njit(cache=True, inline="always")
def _pow(x, y):
    # x**y for a parameter exponent, which is often 1 (e.g. a hazard proportional to burden)
    if y == 1.0:
        return x
    return x ** y


@njit(cache=True, inline="always")
def _factors(z):
    # e^z, φ1(z) = (e^z − 1)/z, φ2(z) = (e^z − 1 − z)/z² from one expm1 (series near 0)
    if abs(z) < 1e-4:
        return 1.0 + z * (1.0 + 0.5 * z), 1.0 + z * (0.5 + z / 6.0), 0.5 + z / 6.0
    em = math.expm1(z)
    return em + 1.0, em / z, (em - z) / (z * z)


@njit(cache=True, inline="always", fastmath=True)
def driven_rates(p, y, a, c, d):
{driven_body}


@njit(cache=True, fastmath=True, error_model="numpy")
def compose_one(p, lam, unit, t_d, a_d, g, edges, maps, dbar, a, c, d, y, only):
    # one subject: PK amounts on the fine grid g (doses a_d at t_d, modes lam with unit
    # responses unit (modes, pk)); driven states dx/dt = a·x + c there (a, c linear in
    # time between grid points); per coarse step j (g[edges[j]] to g[edges[j + 1]]) the maps
    # x → α·x + β and ∫x dt → γ·x + δ (maps (steps + 1, 4, nd), the last row for the whole
    # period); step means of drivers → dbar; a, c, d, y: scratch (grid, nd), (grid, nd),
    # (grid, nD), (pk,); states with only[q] whose a is 0 (e.g. a cumulative hazard): the
    # whole period's row only (its steps' rows are left as they were)
    nm, npk = unit.shape
    nd = maps.shape[2]
    nD = dbar.shape[1]
    ng = g.shape[0]
    if not np.any(a_d > 0.0):  # no dose drives this period: constant rates, exact maps
        y[:] = 0.0
        driven_rates(p, y, a[0], c[0], d[0])
        for j in range(edges.shape[0] - 1):
            h = g[edges[j + 1]] - g[edges[j]]
            for q in range(nd):
                ez, p1, p2 = _factors(a[0, q] * h)
                maps[j, 0, q] = ez
                maps[j, 1, q] = h * p1 * c[0, q]
                maps[j, 2, q] = h * p1
                maps[j, 3, q] = h * h * p2 * c[0, q]
            for q in range(nD):
                dbar[j, q] = d[0, q]
        _whole_period(g, edges, maps, dbar, np.zeros(nd, np.bool_))
        return
    # modal amplitudes of the PK at g[m]: w_q = Σ_k a_k·e^{λ_q (g[m] − t_k)} over the doses
    # given by then, carried from one grid point to the next (e^{λ_q Δ} kept while Δ repeats)
    w = np.zeros(nm)
    eh = np.ones(nm)
    step = -1.0
    for m in range(ng):
        if m > 0:
            dg = g[m] - g[m - 1]
            if dg != step:
                step = dg
                for q in range(nm):
                    eh[q] = math.exp(lam[q] * dg)
            for q in range(nm):
                w[q] *= eh[q]
        for k in range(t_d.shape[0]):
            if a_d[k] > 0.0:
                dt = g[m] - t_d[k]
                lo = g[m - 1] - t_d[k] if m > 0 else -1.0
                if dt >= 0.0 and lo < 0.0:  # given in (g[m − 1], g[m]] (or before g[0])
                    for q in range(nm):
                        w[q] += a_d[k] * math.exp(lam[q] * dt)
        for r in range(npk):
            acc = 0.0
            for q in range(nm):
                acc += w[q] * unit[q, r]
            y[r] = acc
        driven_rates(p, y, a[m], c[m], d[m])
    flat = only.copy()
    for m in range(ng):
        for q in range(nd):
            if a[m, q] != 0.0:
                flat[q] = False
    steps = edges.shape[0] - 1
    # second-order maps on the grid (stride 1) and on every other point (stride 2), combined
    # by Richardson extrapolation (the scheme is symmetric: its error is even in h)
    m2 = np.empty((steps + 1, 4, nd))
    d2 = np.empty((steps + 1, nD))
    _step_maps(g, edges, a, c, d, maps, dbar, flat, 1)
    _step_maps(g, edges, a, c, d, m2, d2, flat, 2)
    for j in range(steps):
        for q in range(nd):
            if not flat[q]:
                for k in range(4):
                    maps[j, k, q] = (4.0 * maps[j, k, q] - m2[j, k, q]) / 3.0
        for q in range(nD):
            dbar[j, q] = (4.0 * dbar[j, q] - d2[j, q]) / 3.0
    if np.any(flat):  # x + ∫c: β and δ as weighted sums of c over the grid (trapezoids)
        total = g[ng - 1] - g[0]
        b1 = np.zeros(nd)
        b2 = np.zeros(nd)
        e1 = np.zeros(nd)
        e2 = np.zeros(nd)
        _flat_sums(g, c, b1, e1, 1)
        _flat_sums(g, c, b2, e2, 2)
        for q in range(nd):
            if flat[q]:
                maps[steps, 0, q], maps[steps, 1, q] = 1.0, (4.0 * b1[q] - b2[q]) / 3.0
                maps[steps, 2, q], maps[steps, 3, q] = total, (4.0 * e1[q] - e2[q]) / 3.0
    _whole_period(g, edges, maps, dbar, flat)


@njit(cache=True, inline="always", fastmath=True)
def _step_maps(g, edges, a, c, d, maps, dbar, flat, stride):
    # per step j the maps α, β, γ, δ of the states not flat and the means of the drivers,
    # on the grid points lo, lo + stride, ..., hi of the step (a, c linear in between)
    nd = maps.shape[2]
    nD = dbar.shape[1]
    for j in range(edges.shape[0] - 1):
        lo, hi = edges[j], edges[j + 1]
        width = g[hi] - g[lo]
        mj = maps[j]  # α, β, γ, δ: the states' chains of updates interleave (m outer)
        for q in range(nd):
            mj[0, q], mj[1, q], mj[2, q], mj[3, q] = 1.0, 0.0, 0.0, 0.0
        for q in range(nD):
            dbar[j, q] = 0.0
        m = lo
        while m < hi:
            m1 = min(m + stride, hi)
            h = g[m1] - g[m]
            for q in range(nd):
                if flat[q]:
                    continue
                z = 0.5 * (a[m, q] + a[m1, q]) * h
                al, be = mj[0, q], mj[1, q]
                if z == 0.0:  # e.g. a cumulative hazard
                    al1 = al
                    be1 = be + 0.5 * h * (c[m, q] + c[m1, q])
                else:
                    ez, p1, p2 = _factors(z)
                    al1 = ez * al
                    be1 = ez * be + h * (p1 * c[m, q] + p2 * (c[m1, q] - c[m, q]))
                mj[2, q] += 0.5 * h * (al + al1)
                mj[3, q] += 0.5 * h * (be + be1)
                mj[0, q], mj[1, q] = al1, be1
            for q in range(nD):
                dbar[j, q] += 0.5 * h * (d[m, q] + d[m1, q])
            m = m1
        for q in range(nD):
            dbar[j, q] /= width


@njit(cache=True, inline="always", fastmath=True)
def _flat_sums(g, c, bz, dz, stride):
    # x + ∫c over the grid points 0, stride, ..., last: β = ∫c and δ = ∫∫c by trapezoids
    ng = g.shape[0]
    total = g[ng - 1] - g[0]
    m = 0
    while m < ng - 1:
        m1 = min(m + stride, ng - 1)
        h = g[m1] - g[m]
        w = 0.5 * h * (total - 0.5 * (g[m] + g[m1]) + g[0])
        for q in range(bz.shape[0]):
            bz[q] += 0.5 * h * (c[m, q] + c[m1, q])
            dz[q] += w * (c[m, q] + c[m1, q])
        m = m1


@njit(cache=True, inline="always")
def _whole_period(g, edges, maps, dbar, done):
    # row `steps` of maps and dbar: the steps' maps composed over the whole period
    # (x_j = A·x + B at step start j, ∫ = Σ γ_j·x_j + δ_j; not for the states done) and the
    # period means of drivers
    steps = edges.shape[0] - 1
    nd = maps.shape[2]
    total = g[edges[steps]] - g[edges[0]]
    for q in range(nd):
        if done[q]:
            continue
        A, B, G, D = 1.0, 0.0, 0.0, 0.0
        for j in range(steps):
            al, be, ga, de = maps[j, 0, q], maps[j, 1, q], maps[j, 2, q], maps[j, 3, q]
            G += ga * A
            D += ga * B + de
            A, B = al * A, al * B + be
        maps[steps, 0, q], maps[steps, 1, q], maps[steps, 2, q], maps[steps, 3, q] = A, B, G, D
    for q in range(dbar.shape[1]):
        acc = 0.0
        for j in range(steps):
            acc += dbar[j, q] * (g[edges[j + 1]] - g[edges[j]])
        dbar[steps, q] = acc / total


@njit(cache=True, parallel=True)
def compose(p, lam, unit, t_d, a_d, g, edges, maps, dbar):
    # compose_one for every subject i (prange): unit (n, modes, pk), maps (n, steps, 4, nd)
    n, nm, npk = unit.shape
    nd = maps.shape[3]
    nD = dbar.shape[2]
    ng = g.shape[0]
    for i in prange(n):
        compose_one(p[i], lam[i], unit[i], t_d[i], a_d[i], g, edges, maps[i], dbar[i],
                    np.empty((ng, nd)), np.empty((ng, nd)), np.empty((ng, nD)), np.empty(npk),
                    np.zeros(nd, np.bool_))


{advance_one}


@njit(cache=True, parallel=True)
def advance(p, xd, xs, maps, dbar, widths, co, out):
    # one period for every subject i (prange): p (n, P); xd (n, nd); xs (n, ns);
    # maps (n, steps, 4, nd); dbar (n, steps, nD); co (n, steps, K) the step coefficients
    # (see _advance_source); out (n, steps, nd + ns)
    n, nd = xd.shape
    ns = xs.shape[1]
    for i in prange(n):
        advance_one(p[i], xd[i], xs[i], maps[i], dbar[i], widths, co[i], out[i],
                    np.empty(2 * nd + 5 * ns + 3 * NPOW))


@njit(cache=True, parallel=True)
def ladder(p, lam, unit, pat_t, pat_a, period, g, edges, widths, co, xd, xs, maps, dbar,
           loaded, prev, mem, levels, off, level, held, stopped,
           mon, samples, hold_below, resume_at, rec_cols, acc_col, n_periods,
           rec, low, acc, which, first_resume, period0, outs, last, group, stepd,
           skip_tol, skipped, ctol):
    # n_periods periods for every subject i (prange), the pattern of each chosen by the
    # hold-and-reduce rule (see PeriodicSolver.run_ladder); state arrays updated in place.
    # A group of slow states (group: id per slow state) is not stepped in a period whose maps
    # are those of the last period and whose start differs from the last stepped period's
    # start (last) by at most skip_tol relatively: its trajectory repeats (outs keeps it)
    n, nd = xd.shape
    ns = xs.shape[1]
    nm, npk = unit.shape[1], unit.shape[2]
    nD = dbar.shape[2]
    ng = g.shape[0]
    U, W = pat_t.shape
    steps = widths.shape[0]
    for i in prange(n):
        out = outs[i]
        buf = np.empty(2 * nd + 5 * ns + 3 * NPOW)
        fs = np.empty((steps, nd))
        sk = np.zeros(skipped.shape[1], np.bool_)
        only = np.logical_not(stepd)
        ga = np.empty((ng, nd))
        gc = np.empty((ng, nd))
        gd = np.empty((ng, nD))
        y = np.empty(npk)
        M = prev.shape[1]
        t_d = np.zeros((M + 1) * W)
        a_d = np.zeros((M + 1) * W)
        for w in range(n_periods):
            dosing = not held[i] and not stopped[i]
            u = levels[level[i]] if dosing else off
            code = u  # the patterns of this and the subject's mem[i] previous periods
            base = U
            for k in range(mem[i]):
                code += (prev[i, k] + 1) * base
                base *= U + 1
            if code != loaded[i]:
                for k in range(W):
                    t_d[k] = pat_t[u, k]
                    a_d[k] = pat_a[u, k]
                    for r in range(M):
                        v = prev[i, r] if r < mem[i] else -1
                        t_d[(r + 1) * W + k] = pat_t[v, k] - (r + 1) * period if v >= 0 else 0.0
                        a_d[(r + 1) * W + k] = pat_a[v, k] if v >= 0 else 0.0
                compose_one(p[i], lam[i], unit[i], t_d, a_d, g, edges, maps[i], dbar[i],
                            ga, gc, gd, y, only)
                loaded[i] = code
                last[i, :] = np.nan
            for r in range(M - 1, 0, -1):
                prev[i, r] = prev[i, r - 1]
            prev[i, 0] = u
            start = xd[i, mon] if mon < nd else xs[i, mon - nd]
            sk[:] = skip_tol > 0.0
            for q in range(ns):
                if not abs(xs[i, q] - last[i, q]) <= skip_tol * abs(xs[i, q]):
                    sk[group[q]] = False
            for q in range(ns):
                if not sk[group[q]]:
                    last[i, q] = xs[i, q]
            for k in range(sk.shape[0]):
                if sk[k]:
                    skipped[i, k] += 1
            advance_groups(p[i], xd[i], xs[i], maps[i], dbar[i], widths, co[i], out, buf,
                           stepd, sk, fs, ctol, period)
            lo = start
            s = 0.0
            for k in samples:
                lo = min(lo, out[k, mon])
                if acc_col >= 0:
                    s += out[k, acc_col]
            for r in range(rec_cols.shape[0]):
                rec[i, w, r] = out[steps - 1, rec_cols[r]]
            low[i, w] = lo
            acc[i] += s
            which[i, w] = u
            held[i], level[i], resumed, stop = dose_rule(
                dosing, lo, out[steps - 1, mon], held[i], level[i], levels.shape[0],
                hold_below, resume_at)
            if resumed and first_resume[i] < 0:
                first_resume[i] = period0 + w
            if stop:
                stopped[i] = True
"""


def _kernel_source(model: Model, s: Split) -> tuple[str, list[bool]]:
    """Numba source of the slow states' a and b (dx/dt = a·x + b) and the stepping loop;
    and which a are constant (parameters only)."""
    from .compiled import _Printer, assignments

    xs = model.state_symbols
    args = [sp.Symbol(k, real=True) for k in (*model.parameters, *model.covariates)]
    names: dict[sp.Symbol, str] = {a: f"p[{i}]" for i, a in enumerate(args)}
    names.update({xs[i]: f"x[{q}]" for q, i in enumerate(s.slow)})
    names.update({xs[i]: f"f[{q}]" for q, i in enumerate(s.driven)})
    names.update({d: f"d[{q}]" for q, d in enumerate(s.driver_symbols)})
    a_sl, b_sl, const = [], [], []
    variable = {xs[i] for i in (*s.slow, *s.driven)} | set(s.driver_symbols)
    for i, r in zip(s.slow, s.slow_rates, strict=True):
        a = sp.diff(r, xs[i])
        if xs[i] in a.free_symbols:
            a = sp.Integer(0)
        a_sl.append(a)
        b_sl.append(sp.expand(r - a * xs[i]) if a != 0 else r)
        const.append(not (a.free_symbols & variable))

    class _Pow(_Printer):
        def _print_Pow(self, expr, rational=False):  # noqa: N802 (sympy's printer API)
            if expr.exp.is_Symbol:
                return f"_pow({self._print(expr.base)}, {self._print(expr.exp)})"
            return super()._print_Pow(expr, rational=rational)

    class _MPow(_Printer):
        sites = 0

        def _print_Pow(self, expr, rational=False):  # noqa: N802 (sympy's printer API)
            if expr.exp.is_Symbol:
                self.sites += 1
                return (f"_mpow({self._print(expr.base)}, {self._print(expr.exp)}, memo, "
                        f"{self.sites - 1})")
            return super()._print_Pow(expr, rational=rational)

    m = len(a_sl)
    mpow = _MPow({"fully_qualified_modules": True})
    lines = assignments([*a_sl, *b_sl], names,
                        lambda q, e: f"{'a' if q < m else 'b'}[{q % m}] = {e}", mpow)
    groups = _components([xs[i] for i in s.slow], a_sl, b_sl)
    parts = []  # the same rates for each group alone (own memo sites)
    sub = _MPow({"fully_qualified_modules": True})
    for qs in groups:
        parts.append(assignments([*(a_sl[q] for q in qs), *(b_sl[q] for q in qs)], names,
                                 lambda k, e, qs=qs: f"{'a' if k < len(qs) else 'b'}"
                                 f"[{qs[k % len(qs)]}] = {e}", sub))
    # groups that may be stepped once per period (see _advance_source)
    drv, dri, slw = {xs[i] for i in s.driven}, set(s.driver_symbols), {xs[i] for i in s.slow}
    whole = [all(not ((a_sl[q].free_symbols | b_sl[q].free_symbols) & dri)
                 and not (b_sl[q].free_symbols & drv)
                 and not (a_sl[q].free_symbols & drv and a_sl[q].free_symbols & slw)
                 for q in qs) for qs in groups]
    # their own rates that vary with the driven states (checked over the period's steps)
    owns = []
    for k, qs in enumerate(groups):
        vary = [q for q in qs if a_sl[q].free_symbols & drv] if whole[k] else []
        owns.append(vary)
        src_own = assignments([a_sl[q] for q in vary], names,
                              lambda j, e, vary=vary: f"a[{vary[j]}] = {e}", sub)
        parts[k] = (parts[k], src_own)
    # driven states a slow rate reads within the period (the others: period maps)
    read = set().union(*(a_sl[q].free_symbols | b_sl[q].free_symbols for q in range(m)))
    reads = [xs[i] in read for i in s.driven]
    # driven: dx/dt = a(PK)·x + c(PK); and the drivers, functions of the PK amounts y
    a_dr, c_dr = [], []
    for i in s.driven:
        e = model.odes[model.states[i]]
        a = sp.diff(e, xs[i])
        a_dr.append(a)
        c_dr.append(sp.expand(e - a * xs[i]))
    names = {a: f"p[{i}]" for i, a in enumerate(args)}
    names.update({xs[i]: f"y[{q}]" for q, i in enumerate(s.pk)})
    nd = len(a_dr)
    driven = assignments([*a_dr, *c_dr, *s.drivers], names,
                         lambda q, e: (f"a[{q}]" if q < nd else f"c[{q - nd}]" if q < 2 * nd
                                       else f"d[{q - 2 * nd}]") + f" = {e}",
                         _Pow({"fully_qualified_modules": True}))
    src = _KERNEL.replace("{body}", "\n".join(lines) or "    pass")
    src = src.replace("{NPOW}", str(max(1, mpow.sites, sub.sites))) + RULE
    chains = _chains([xs[i] for i in s.slow], a_sl, b_sl, const, variable)
    printer = _Pow({"fully_qualified_modules": True})
    pnames = {a: f"pi[{i}]" for i, a in enumerate(args)}
    slow_syms = {xs[i] for i in s.slow}
    printer._names = pnames
    adv, table = _advance_source(a_sl, b_sl, const, chains, slow_syms, printer.doprint,
                                 groups, whole, owns, [body for body, _ in parts],
                                 [own for _, own in parts])
    src = src.replace("{advance_one}", adv)
    src = src.replace("{driven_body}", "\n".join(driven) or "    pass")
    return src, const, chains, table, groups, reads, whole


def _components(x: list[sp.Symbol], a: list[sp.Expr], b: list[sp.Expr]) -> list[list[int]]:
    """The slow states in groups that read no slow state of another group (connected
    components of "rate reads state"), e.g. the platelet chain apart from the clone burden,
    M-protein and hazards: under a repeated dosing pattern a group may settle into a periodic
    orbit alone (:meth:`PeriodicSolver.run_ladder` then stops stepping it)."""
    group = list(range(len(x)))

    def root(q: int) -> int:
        while group[q] != q:
            q = group[q]
        return q

    for q in range(len(x)):
        for r in range(len(x)):
            if r != q and x[r] in (a[q].free_symbols | b[q].free_symbols):
                group[root(q)] = root(r)
    out: dict[int, list[int]] = {}
    for q in range(len(x)):
        out.setdefault(root(q), []).append(q)
    return sorted(out.values())


def _advance_source(a: list[sp.Expr], b: list[sp.Expr], const: list[bool],
                    chains: list[list[tuple[int, sp.Expr | None]]], slow_syms: set,
                    code, groups: list[list[int]], whole: list[bool],
                    owns: list[list[int]], bodies: list[list[str]],
                    own_bodies: list[list[str]]) -> tuple[str, list[tuple]]:
    """Numba source of one period of one subject (exponential Heun steps, written out per
    slow state with what its structure allows: a = 0, b = 0, a independent of the slow states
    (then the predictor's factors are exact for the corrector), transit chains): all slow
    states together (``advance_one``), or group by group (``groups``, see
    :func:`_components`), each group skippable, and those marked ``whole`` in one step of the
    whole period where that is accurate (``advance_groups``): no driver in their rates and
    the driven states only in an own rate a free of slow states (x·e^{∫a} is then exact with
    the period means of the driven states; e.g. an XPO1-driven clone kill, not the platelet
    proliferation, which follows the concentration); and the layout of the
    per-subject step coefficients ``co`` (steps, K) it reads: ("ex"|"p1h"|"p2h", q) = e^{ah},
    h·φ1(ah), h·φ2(ah) of a constant a; ("E"|"F1"|"F2", chain, r, s) = entries of e^{Mh},
    h·φ1(Mh), h·φ2(Mh) of a chain."""
    table: list[tuple] = []

    def slot(key: tuple) -> str:
        table.append(key)
        return f"c[{len(table) - 1}]"

    links = []
    pred: dict[int, list[str]] = {}
    corr: dict[int, list[str]] = {}
    member = {q: (c, r) for c, ch in enumerate(chains) for r, (q, _) in enumerate(ch)}
    for c, ch in enumerate(chains):
        for r, (_, rate) in enumerate(ch):
            if rate is not None:
                links.append(f"    k{c}_{r} = {code(rate)}")
    for q in range(len(a)):
        pr, co = pred[q], corr[q] = [], []
        if q in member:
            c, r = member[q]
            ch = chains[c]
            prev = f" - k{c}_{r} * xs[{ch[r - 1][0]}]" if r else ""
            pr.append(f"u0_{q} = b0[{q}]{prev}")
            terms = [f"{slot(('E', c, r, s_))} * xs[{ch[s_][0]}] + "
                     f"{slot(('F1', c, r, s_))} * u0_{ch[s_][0]}" for s_ in range(r + 1)]
            pr.append(f"pred[{q}] = " + " + ".join(terms))
            prev = f" - k{c}_{r} * pred[{ch[r - 1][0]}]" if r else ""
            co.append(f"v_{q} = b1[{q}]{prev} - u0_{q}")
            terms = [f"{slot(('F2', c, r, s_))} * v_{ch[s_][0]}" for s_ in range(r + 1)]
            co.append(f"xs[{q}] = pred[{q}] + " + " + ".join(terms))
        elif const[q] and a[q] == 0:
            pr.append(f"pred[{q}] = xs[{q}] + h * b0[{q}]")
            co.append(f"xs[{q}] = xs[{q}] + 0.5 * h * (b0[{q}] + b1[{q}])")
        elif const[q] and b[q] == 0:
            e = slot(("ex", q))
            pr.append(f"pred[{q}] = {e} * xs[{q}]")
            co.append(f"xs[{q}] = {e} * xs[{q}]")
        elif const[q]:
            e, p1, p2 = slot(("ex", q)), slot(("p1h", q)), slot(("p2h", q))
            pr.append(f"pred[{q}] = {e} * xs[{q}] + {p1} * b0[{q}]")
            co.append(f"xs[{q}] = {e} * xs[{q}] + {p1} * b0[{q}] + {p2} * (b1[{q}] - "
                      f"b0[{q}])")
        elif not (a[q].free_symbols & slow_syms) and b[q] == 0:  # a0 = a1
            pr.append(f"e_{q} = math.exp(a0[{q}] * h)")
            pr.append(f"pred[{q}] = e_{q} * xs[{q}]")
            co.append(f"xs[{q}] = e_{q} * xs[{q}]")
        elif not (a[q].free_symbols & slow_syms):
            pr.append(f"ez_{q}, p1_{q}, p2_{q} = _factors(a0[{q}] * h)")
            pr.append(f"pred[{q}] = ez_{q} * xs[{q}] + h * p1_{q} * b0[{q}]")
            co.append(f"xs[{q}] = ez_{q} * xs[{q}] + h * (p1_{q} * b0[{q}] + p2_{q} * "
                      f"(b1[{q}] - b0[{q}]))")
        elif b[q] == 0:
            pr.append(f"pred[{q}] = math.exp(a0[{q}] * h) * xs[{q}]")
            co.append(f"xs[{q}] = math.exp(0.5 * (a0[{q}] + a1[{q}]) * h) * xs[{q}]")
        else:
            pr.append(f"ez, p1, p2 = _factors(a0[{q}] * h)")
            pr.append(f"pred[{q}] = ez * xs[{q}] + h * p1 * b0[{q}]")
            co.append(f"ez, p1, p2 = _factors(0.5 * (a0[{q}] + a1[{q}]) * h)")
            co.append(f"xs[{q}] = ez * xs[{q}] + h * (p1 * b0[{q}] + p2 * (b1[{q}] - "
                      f"b0[{q}]))")

    def lines(qs, part: dict, ind: str) -> str:
        return "\n".join(ind + ln for q in qs for ln in part[q]) or ind + "pass"

    every = range(len(a))
    src = _ADVANCE.replace("{scratch}", _SCRATCH)
    src = src.replace("{links}", "\n".join(links) or "    pass")
    src = src.replace("{pred}", lines(every, pred, " " * 8))
    src = src.replace("{corr}", lines(every, corr, " " * 8))

    def scalar(template: str, k: int, qs: list[int], ind: int) -> str:
        # a group's step in local scalars (states, predictor, rates), the rates' lines
        # inlined twice: not rate functions writing to slices of one scratch buffer, which
        # cost 12-21 % more time per patient-week for the same numbers
        return (template.replace("{k}", str(k))
                .replace("{load}", "\n".join(f"        xs_{q} = xs[{q}]" for q in qs))
                .replace("{rates0}", _scalar_rates(bodies[k], "xs", "0", " " * (ind - 4)))
                .replace("{rates1}", _scalar_rates(bodies[k], "xp", "1", " " * (ind - 4)))
                .replace("{pred}", _scalar_steps(lines(qs, pred, " " * ind)))
                .replace("{corr}", _scalar_steps(lines(qs, corr, " " * ind))))

    blocks = []
    for k, qs in enumerate(groups):
        if whole[k]:
            blocks.append(scalar(_GROUP_WHOLE, k, qs, 8)
                .replace("{vary}", "\n".join(
                    ["    f = fbar", "    d = db[steps]",
                     _scalar_rates(own_bodies[k], "xs", "0", "")]
                    + [f"    dv_{q} = 0.0" for q in owns[k]]
                    + ["    for j in range(steps):", "        f = fs[j]", "        d = db[j]",
                       _scalar_rates(own_bodies[k], "xs", "1", " " * 4)]
                    + [f"        dv_{q} += (a1_{q} - a0_{q}) * widths[j]\n"
                       f"        ok = ok and abs(dv_{q}) <= ctol[{k}] * ctol[{k}]"
                       for q in owns[k]]) if owns[k] else "")
                .replace("{check}", "\n".join(
                    f"        ok = ok and abs(b1_{q} - b0_{q}) <= ctol[{k}] * max(abs(b0_{q}), "
                    f"abs(b1_{q})) and abs(a1_{q} - a0_{q}) * h <= ctol[{k}]" for q in qs))
                .replace("{end}", "\n".join(f"            xs[{q}] = xs_{q}\n"
                                             f"            out[steps - 1, nd + {q}] = xs_{q}"
                                             for q in qs)))
        blocks.append(scalar(_GROUP_STEPS, k, qs, 12)
            .replace("{out}", "\n".join(f"            out[j, nd + {q}] = xs_{q}" for q in qs))
            .replace("{store}", "\n".join(f"        xs[{q}] = xs_{q}" for q in qs))
            .replace("{cond}", f"not skip[{k}] and not whole_{k}" if whole[k]
                     else f"not skip[{k}]"))
    return src.replace("{groups}", "".join(blocks)), table


# one exponential Heun step of the whole period for a group (period means of the driven
# states and drivers), taken if the exponent ∫a of each own rate a that varies with the
# driven states stays within ctol² of linear in time over the period's steps, and kept if
# the rates changed by at most ctol relatively over the period (the local error of the step
# is then ≈ ctol²/12 of the period's change); else undone
_GROUP_WHOLE = """
    whole_{k} = False
    ok = True
{vary}
    if not skip[{k}] and ctol[{k}] > 0.0 and ok:
        h = period
        f = fbar
        d = db[steps]
        c = co[steps]
{load}
{rates0}
{pred}
{rates1}
{corr}
{check}
        if ok:
            whole_{k} = True
{end}"""


_GROUP_STEPS = """
    if {cond}:
{load}
        for j in range(steps):
            h = widths[j]
            f = fs[j]
            d = db[j]
            c = co[j]
{rates0}
{pred}
{rates1}
{corr}
{out}
{store}"""


def _scalar_rates(body: list[str], x: str, stage: str, indent: str) -> str:
    """A group's generated rate lines (``x[q]``, ``a[q] =``, ``b[q] =``, parameters ``p``)
    on local scalars: the slow states ``{x}_q``, the rates ``a{stage}_q``, ``b{stage}_q``,
    parameters ``pi``."""
    out = []
    for ln in body:
        ln = re.sub(r"(?<![\w.])x\[(\d+)\]", rf"{x}_\1", ln)
        ln = re.sub(r"(?<![\w.])([ab])\[(\d+)\] =", rf"\g<1>{stage}_\2 =", ln)
        out.append(indent + re.sub(r"(?<![\w.])p\[", "pi[", ln))
    return "\n".join(out)


def _scalar_steps(text: str) -> str:
    """Generated stepping lines (``xs[q]``, ``pred[q]``, ``a0[q]``, ...) on the local scalars
    ``xs_q``, ``xp_q``, ``a0_q``, ..."""
    return re.sub(r"(?<![\w.])(xs|pred|a0|b0|a1|b1)\[(\d+)\]",
                  lambda mt: f"{'xp' if mt[1] == 'pred' else mt[1]}_{mt[2]}", text)


# advance_one's scratch slices of buf: own rates and sources at the step start and at the
# predictor, the predictor, the power memo (advance_groups keeps all but the memo in locals)
_SCRATCH = """    a0 = buf[nd:nd + ns]
    b0 = buf[nd + ns:nd + 2 * ns]
    a1 = buf[nd + 2 * ns:nd + 3 * ns]
    b1 = buf[nd + 3 * ns:nd + 4 * ns]
    pred = buf[nd + 4 * ns:nd + 5 * ns]
    memo = buf[nd + 5 * ns:nd + 5 * ns + 3 * NPOW]"""

_ADVANCE = """@njit(cache=True, inline="always")
def advance_one(pi, xd, xs, mp, db, widths, co, out, buf):
    # one period of one subject (generated by _advance_source): xd (nd,), xs (ns,) updated in
    # place; mp (steps + 1, 4, nd) = α, β, γ, δ of this period's steps (and of the whole
    # period); db (steps + 1, nD); co (steps + 1, K); out (steps, nd + ns); buf scratch
    # (2·nd + 5·ns + 3·NPOW)
    nd = xd.shape[0]
    ns = xs.shape[0]
    f = buf[:nd]
{scratch}
    memo[:] = np.nan
{links}
    for j in range(widths.shape[0]):
        h = widths[j]
        ih = 1.0 / h
        for q in range(nd):
            x0 = xd[q]
            f[q] = (mp[j, 2, q] * x0 + mp[j, 3, q]) * ih
            xd[q] = mp[j, 0, q] * x0 + mp[j, 1, q]
            out[j, q] = xd[q]
        d = db[j]
        c = co[j]
        slow_rates(pi, xs, f, d, a0, b0, memo)
{pred}
        slow_rates(pi, pred, f, d, a1, b1, memo)
{corr}
        for q in range(ns):
            out[j, nd + q] = xs[q]


@njit(cache=True, inline="always")
def advance_groups(pi, xd, xs, mp, db, widths, co, out, buf, stepd, skip, fs, ctol, period):
    # the same period group by group (groups of slow states that read no other group's
    # states); a group with skip[k] is not stepped (its trajectory repeats that of the last
    # period: out keeps it); the driven states with stepd False by their period maps (out:
    # their period end only); fs (steps, nd) scratch: the driven states' step means; a group
    # with ctol[k] > 0 (and marked whole by _advance_source) in one step of the period where
    # accurate
    nd = xd.shape[0]
    ns = xs.shape[0]
    steps = widths.shape[0]
    memo = buf[nd + 5 * ns:nd + 5 * ns + 3 * NPOW]  # the same slice as advance_one's
    fbar = buf[:nd]
    memo[:] = np.nan
{links}
    for q in range(nd):  # each driven state through the steps (stepd) or by its period map
        x0 = xd[q]
        if stepd[q]:
            v = 0.0
            for j in range(steps):
                y0 = mp[j, 2, q] * x0 + mp[j, 3, q]
                v += y0
                fs[j, q] = y0 * (1.0 / widths[j])
                x0 = mp[j, 0, q] * x0 + mp[j, 1, q]
                out[j, q] = x0
            fbar[q] = v / period
        else:
            fbar[q] = (mp[steps, 2, q] * x0 + mp[steps, 3, q]) / period
            x0 = mp[steps, 0, q] * x0 + mp[steps, 1, q]
            out[steps - 1, q] = x0
        xd[q] = x0
{groups}"""


def _chains(x: list[sp.Symbol], a: list[sp.Expr], b: list[sp.Expr], const: list[bool],
            variable: set) -> list[list[tuple[int, sp.Expr]]]:
    """Transit chains among the slow states dx/dt = a·x + b: states with the same constant
    own rate a, each fed by the previous one at a constant rate c (b = c·x_prev + rest, e.g.
    dT2/dt = k·T1 − k·T2). Their coupling is then solved exactly in each step: with
    M = a·I + L (L nilpotent, the link rates), f(M·h) = Σ_m f⁽ᵐ⁾(a·h)/m!·(L·h)^m for e^{Mh},
    φ1 and φ2, the rest of their rates linear in time as for the other states. Returns each
    chain as [(slow index, link rate from the previous member; None for the first)]."""
    edges: dict[int, list[tuple[int, sp.Expr]]] = {}  # member → [(feeding member, rate)]
    for q in range(len(x)):
        for r in range(len(x)):
            if q == r or not (const[q] and const[r]) or a[q] == 0:
                continue
            if sp.simplify(a[q] - a[r]) != 0:
                continue
            c = sp.diff(b[q], x[r])
            if c != 0 and not (c.free_symbols & variable):
                edges.setdefault(q, []).append((r, c))
    feeds: dict[int, list[int]] = {}
    for q, e in edges.items():
        for r, _ in e:
            feeds.setdefault(r, []).append(q)
    link = {q: e[0] for q, e in edges.items() if len(e) == 1 and len(feeds[e[0][0]]) == 1}
    nxt = {r: q for q, (r, _) in link.items()}
    out = []
    for head in range(len(x)):
        if head in nxt and head not in link:
            chain: list[tuple[int, sp.Expr | None]] = [(head, None)]
            while chain[-1][0] in nxt:
                q = nxt[chain[-1][0]]
                chain.append((q, link[q][1]))
            out.append(chain)
    return out


def _dd_exp(z: np.ndarray, k: int, m: int) -> np.ndarray:
    """φ_k⁽ᵐ⁾(z)/m! (φ_0 = exp): the divided difference of exp at 0 (k times) and z (m + 1
    times); by its Taylor series for |z| < 1, else by the divided-difference recursion."""
    z = np.asarray(z, float)
    small = np.abs(z) < 1.0
    zs = np.where(small, z, 0.0)
    ser = np.zeros_like(z)
    term_z = np.ones_like(z)
    for j in range(30):  # Σ_j C(j + m, m) z^j / (j + m + k)!
        ser += term_z * math.comb(j + m, m) / math.factorial(j + m + k)
        term_z = term_z * zs
    zl = np.where(small, 1.0, z)
    # D[p][q] = exp[0^p, z^q]: D[0][q] = e^z/(q−1)!, D[p][0] = 1/(p−1)!
    ez = np.exp(zl)
    D = {(0, q): ez / math.factorial(q - 1) for q in range(1, m + 2)}
    D.update({(p, 0): np.full_like(z, 1.0 / math.factorial(p - 1)) for p in range(1, k + 1)})
    for p in range(1, k + 1):
        for q in range(1, m + 2):
            D[p, q] = (D[p - 1, q] - D[p, q - 1]) / zl
    big = D[k, m + 1] if k else ez / math.factorial(m)
    return np.where(small, ser, big)


class PeriodicSolver:
    """Subjects of one model (individual parameters and covariates, one value per subject)
    stepped through periods of ``period`` h, each subject following one of ``patterns`` in
    each period (:meth:`run`).

    Coarse steps are ``step`` h (default 24), shorter after each dose of any pattern (ends at
    ``refine`` h after it, default 12), where the drive changes fastest; amounts are returned
    at the ends of those steps (:attr:`times`, h from the period start). (The defaults were
    12 h refined at 2 and 6 h before transit chains were solved exactly.) ``grid_scale``
    multiplies the spacing of the maps' quadrature grid (:func:`_grid`; default 2: 0.2 h
    after a dose, with Richardson extrapolation XPO1 binding within 2.2e-4 of the reference
    against 8.6e-4 with the second-order maps on the grid of 0.1 h). ``skip_tol``
    (relative, default 1e-6) and ``whole_tol`` (default 0.01: the step's error ≈ 1e-5 of the
    period's change) apply to :meth:`run_ladder`.
    """

    def __init__(self, model: Model, individual: Mapping[str, np.ndarray],
                 covariates: Mapping[str, np.ndarray], patterns: Sequence[Pattern], *,
                 period: float = 168.0, step: float = 24.0,
                 refine: Sequence[float] = (12.0,), carry_tol: float = 1e-4,
                 memory: int | None = 1, skip_tol: float = 1e-6, whole_tol: float = 0.01,
                 grid_scale: float = 2.0):
        from ..simulation import _exact_part, _parameter_table, _per_subject

        if step <= 0 or period <= 0:
            raise ValueError(f"period ({period} h) and step ({step} h) must be positive")
        self.model, self.period, self.carry_tol = model, period, carry_tol
        self.skip_tol, self.whole_tol = float(skip_tol), float(whole_tol)
        self.patterns = tuple(patterns)
        for p in self.patterns:
            if len(p.times) != len(p.amounts) or any(not 0 <= t < period for t in p.times):
                raise ValueError(f"pattern {p}: one amount per dose time, times in "
                                 f"[0, {period:g}) h")
        marks = [np.arange(step, period, step), [period]]
        marks += [np.asarray(t) + np.asarray(refine, float)
                  for p in self.patterns for t in p.times]
        g = np.unique(np.round(np.concatenate(marks), 9))
        self.times = g[(g > 0) & (g <= period)]  # coarse step ends, h
        cache = model._compiled
        if "periodic split" not in cache:
            cache["periodic split"] = split(model)  # Unsupported is raised here, not cached
        self.sp = cache["periodic split"]
        n = len(next(iter(individual.values())))
        self.n = n
        store = cache.setdefault("periodic setup", {})  # recent subjects' set-up (arrays
        # only read), e.g. for the arms of a trial: the same subjects under other patterns
        key = _subjects_key(individual, covariates, n)
        setup = store.get(key)
        if setup is None:
            prop = _exact_part(model, individual, covariates, n)
            if prop is None:
                raise Unsupported(f"{model.name}: the PK part has no well-conditioned closed "
                                  "form")
            x0 = _per_subject(model, [c.init for c in model.compartments], individual,
                              covariates, n)
            setup = _remember(store, key, (prop, x0, _parameter_table(
                model, individual, covariates, n)))
        self.prop, x0, table_ = setup
        self._xd = np.ascontiguousarray(x0[:, list(self.sp.driven)])  # (n, driven)
        self._xs = np.ascontiguousarray(x0[:, list(self.sp.slow)])  # (n, slow)
        self.table = table_.T  # (P, n)
        self.dose_state = model.cmt_numbers[model.default_dose_cmt]
        if model.dosing:
            raise Unsupported(f"{model.name}: F, lag or modelled rates of doses")
        s = self.sp
        # slow: dx/dt = a·x + b (a, b of slow states, driven states, drivers), compiled
        from .compiled import load_kernel

        if "periodic kernel" not in cache:
            cache["periodic kernel"] = _kernel_source(model, s)
        src, const, chains, table, group, reads, whole = cache["periodic kernel"]
        self._kernel = load_kernel(src)
        self._const = np.array(const, dtype=np.bool_)
        # run_ladder's groups of slow states (names), stepped or skipped apart
        self.groups: list[list[str]] = [[self.model.states[s.slow[q]] for q in qs]
                                        for qs in group]
        self._group = np.zeros(len(s.slow), np.int64)  # group of each slow state
        for k, qs in enumerate(group):
            self._group[qs] = k
        self._reads = np.array(reads, dtype=np.bool_)  # driven states a slow rate reads
        self._whole = np.array(whole, dtype=np.bool_)  # groups steppable once per period
        widths = np.diff(np.r_[0.0, self.times])
        self._widths = widths
        # per step and (last row) for the whole period
        ckey = (key, np.r_[widths, period].tobytes())
        self._co = store.get(ckey)
        if self._co is None:
            self._co = _remember(store, ckey, _coefficients(
                model, individual, covariates, s, const, chains, table, np.r_[widths, period],
                n))
        # each subject's maps of its current (previous, this) pattern pair, per step and
        # (last row) for the whole period
        self._maps_all = np.full((n, len(widths) + 1, 4, len(s.driven)), np.nan)
        self._dbar_all = np.full((n, len(widths) + 1, len(s.drivers)), np.nan)
        # run_ladder's values at the step ends of each subject's last period, and each slow
        # state's start of the last period it was stepped (NaN: none with the loaded maps)
        self._out = np.full((n, len(widths), len(s.driven) + len(s.slow)), np.nan)
        self._last = np.full((n, len(s.slow)), np.nan)
        self._loaded = np.full(n, -1, np.int64)  # pair code of the maps in place
        self._missing = np.zeros(len(s.driven), np.bool_)  # driven states whose steps' maps
        # may be missing from the maps in place (run_ladder composes their period map only)
        self.memory = 3 if memory is None else int(memory)
        if self.memory < 1:
            raise ValueError(f"memory must be at least 1, got {memory}")
        self._mem = np.full(n, self.memory, np.int64)  # per subject (memory=None: as needed)
        self._p = np.ascontiguousarray(self.table.T)
        self._g = _grid([t for p in self.patterns for t in p.times], np.r_[0.0, self.times],
                        grid_scale)
        self._edges = np.searchsorted(self._g, np.r_[0.0, self.times])
        P = self.prop.P  # (n, m, pk, pk)
        self._unit = np.ascontiguousarray(P[:, :, :, s.pk.index(self.dose_state)])  # unit dose
        if memory is None:  # as many earlier periods as each subject needs (0-3)
            for k in (2, 1, 0):
                trial = self._mem.copy()
                self._mem[:] = k
                ok = self.independent()
                self._mem = np.where(ok, k, trial)
            self.memory = int(self._mem.max(initial=1))
        self._prev = np.full((n, self.memory), -1, np.int64)  # patterns of the previous
        # periods, the last first (-1: none)

    # -- precomputation per pattern ------------------------------------------------------
    def _doses(self, prev: np.ndarray, index: np.ndarray,
               mem: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Dose times and amounts per subject (k, (1 + memory)·D): this period's pattern
        ``index``, then those of the previous periods ``prev`` (k, memory), the last first
        (-1: none), at t − period, t − 2·period, ... (the first ``mem`` of them, per
        subject)."""
        width = max(1, max(len(p.times) for p in self.patterns))
        prev = np.asarray(prev).reshape(len(index), -1)
        if mem is not None:
            prev = np.where(np.arange(prev.shape[1]) < np.asarray(mem)[:, None], prev, -1)
        t_d = np.zeros((len(index), (1 + self.memory) * width))
        a_d = np.zeros_like(t_d)
        for u, p in enumerate(self.patterns):
            k = len(p.times)
            rows = index == u
            t_d[rows, :k], a_d[rows, :k] = p.times, p.amounts
            for r in range(prev.shape[1]):
                rows = prev[:, r] == u
                at = (r + 1) * width
                t_d[rows, at:at + k] = np.asarray(p.times) - (r + 1) * self.period
                a_d[rows, at:at + k] = p.amounts
        return t_d, a_d

    def _carry(self, t_d: np.ndarray, a_d: np.ndarray, sub: np.ndarray) -> np.ndarray:
        """Per subject ``sub``: the fraction of this period's doses (the first of the
        1 + memory blocks of t_d, a_d) left in the PK compartments 1 + (the subject's) memory
        periods on."""
        width = t_d.shape[1] // (1 + self.memory)
        lam = self.prop.lam[sub]
        unit = self._unit[sub]
        horizon = (1 + self._mem[sub])[:, None, None] * self.period
        e_end = np.exp(lam[:, None, :] * (horizon - t_d[:, :width, None]))  # (k, D, m)
        left = np.einsum("ndm,nmk->nk", e_end * a_d[:, :width, None], unit)
        total = a_d[:, :width].sum(axis=1)
        return np.abs(left).sum(axis=1) / np.where(total > 0, total, 1.0)

    def _check_carry(self, t_d: np.ndarray, a_d: np.ndarray, sub: np.ndarray) -> None:
        """What is left 1 + memory periods on is neglected: check it is negligible."""
        carry = self._carry(t_d, a_d, sub)
        if carry.max(initial=0.0) > self.carry_tol:
            raise Unsupported(f"{carry.max():.1e} of the doses of a {self.period:g}-h period "
                              f"is left in the PK compartments {1 + self.memory} periods "
                              f"later (above {self.carry_tol:g}): periods are not independent")

    def independent(self, patterns: Sequence[int] | None = None) -> np.ndarray:
        """Per subject: True where what is left of each of ``patterns``' doses (default:
        all) 1 + memory periods on is below ``carry_tol`` (the solver's assumption; for the other
        subjects :meth:`run` and :meth:`run_ladder` raise :class:`Unsupported`)."""
        n = self.n
        worst = np.zeros(n)
        for u in range(len(self.patterns)) if patterns is None else patterns:
            t_d, a_d = self._doses(np.full((n, self.memory), -1), np.full(n, int(u)))
            worst = np.maximum(worst, self._carry(t_d, a_d, np.arange(n)))
        return worst <= self.carry_tol

    def _load(self, prev: np.ndarray, index: np.ndarray, sub: np.ndarray) -> None:
        """Put in place, for subjects ``sub``, the (α, β, γ, δ) of the driven states and the
        step means of the drivers over one period of pattern ``index`` (one per subject) that
        follows a period of pattern ``prev`` (-1: none), whose doses still drive it."""
        s = self.sp
        t_d, a_d = self._doses(prev, index)
        self._check_carry(t_d, a_d, sub)
        maps = np.empty((len(sub), len(self.times) + 1, 4, len(s.driven)))
        dbar = np.empty((len(sub), len(self.times) + 1, len(s.drivers)))
        self._kernel.compose(self._p[sub], np.ascontiguousarray(self.prop.lam[sub]),
                             self._unit[sub], t_d, a_d, self._g, self._edges, maps, dbar)
        self._maps_all[sub] = maps
        self._dbar_all[sub] = dbar

    # -- stepping ------------------------------------------------------------------------
    def run(self, which: np.ndarray) -> np.ndarray:
        """Advance one period, subject i following ``patterns[which[i]]``. Returns the amounts
        of the driven and slow states (:attr:`columns`) at :attr:`times`, (n, steps,
        columns)."""
        s, n = self.sp, self.n
        which = np.asarray(which, dtype=np.int64)
        if which.shape != (n,) or which.min(initial=0) < 0 or which.max(initial=0) >= len(
                self.patterns):
            raise ValueError(f"which: one pattern index per subject (0-{len(self.patterns) - 1})")
        U = len(self.patterns)
        prev = np.where(np.arange(self.memory) < self._mem[:, None], self._prev, -1)
        code = which + U * ((prev + 1) * (U + 1) ** np.arange(self.memory)).sum(axis=1)
        if self._missing.any():  # maps composed by run_ladder: all steps needed here
            self._loaded[:] = -1
            self._missing[:] = False
        stale = np.flatnonzero(code != self._loaded)
        if len(stale):
            self._load(prev[stale], which[stale], stale)
        self._loaded = code
        self._last[:] = np.nan  # run_ladder's record of the last period is stale
        self._prev = np.column_stack([which, self._prev[:, :-1]])
        res = np.empty((n, len(self.times), len(s.driven) + len(s.slow)))
        self._kernel.advance(self._p, self._xd, self._xs, self._maps_all, self._dbar_all,
                             self._widths, self._co, res)
        return res

    def run_ladder(self, ladder: Sequence[int], periods: int, *, off: int, monitor: str,
                   samples: Sequence[float], hold_below: float, resume_at: float,
                   record: Sequence[str] = (), accumulate: str | None = None,
                   state: LadderState | None = None) -> LadderResult:
        """Advance ``periods`` periods with a per-subject hold-and-reduce rule (e.g. a label's
        dose modification), all in one compiled loop per subject.

        Each subject starts on pattern ``ladder[0]``. After each period, ``low`` = the lowest
        value of state ``monitor`` at the period start and at ``samples`` (h from the period
        start, step ends in :attr:`times`): a dosing subject with ``low < hold_below`` is held
        (pattern ``off``) from the next period; a held subject whose ``monitor`` at the period
        end is ``>= resume_at`` restarts on the next pattern of ``ladder`` (after the last
        one: stopped, pattern ``off`` for good). The same as :meth:`run` period by period
        with ``which`` chosen that way. ``state`` carries the rule's per-subject state across
        calls (so a course can be run in parts, e.g. to report progress): pass the previous
        result's ``state``.

        Returns the values of ``record`` states at each period end, ``low`` per period, the
        sum of ``accumulate`` at the ``samples`` over all periods, the pattern of each period
        and the period (counted from the first call) of each subject's first restart (-1:
        none), and per subject and group of slow states (:attr:`groups`) the periods it was
        not stepped (``skip_tol``, see the module docstring; 0 steps every period, and
        ``whole_tol`` 0 every step).
        """
        n = self.n
        col = self.columns
        for k in (monitor, *record, *([accumulate] if accumulate else [])):
            if k not in col:
                raise ValueError(f"{k}: not a driven or slow state of {self.model.name}")
        idx = np.searchsorted(self.times, samples)
        if len(samples) and (idx.max() >= len(self.times)
                             or not np.allclose(self.times[idx], samples)):
            raise ValueError(f"samples {list(samples)} must be step ends ({self.times})")
        levels = np.asarray(ladder, dtype=np.int64)
        used = {int(off), *levels.tolist()}
        if min(used) < 0 or max(used) >= len(self.patterns):
            raise ValueError(f"ladder and off: pattern indices (0-{len(self.patterns) - 1})")
        if state is None:
            state = LadderState(np.zeros(n, np.int64), np.zeros(n, np.bool_),
                                np.full(n, len(levels) == 0), np.full(n, -1, np.int64), 0)
            # every used pattern, for every subject: do the doses die out?
            for u in used:
                t_d, a_d = self._doses(np.full((n, self.memory), -1), np.full(n, u))
                self._check_carry(t_d, a_d, np.arange(n))
        width = max(1, max(len(p.times) for p in self.patterns))
        pat_t = np.zeros((len(self.patterns), width))
        pat_a = np.zeros_like(pat_t)
        for u, p in enumerate(self.patterns):
            pat_t[u, :len(p.times)], pat_a[u, :len(p.times)] = p.times, p.amounts
        rec = np.empty((n, periods, len(record)))
        low = np.empty((n, periods))
        acc = np.zeros(n)
        which = np.empty((n, periods), np.int64)
        rec_cols = np.array([col[k] for k in record], dtype=np.int64)
        nd = len(self.sp.driven)
        # driven states stepped within the period: those the slow rates read, the monitor
        # and the accumulated one (the others by their period maps)
        need = [col[monitor], *([col[accumulate]] if accumulate else [])]
        stepd = self._reads.copy()
        stepd[[c for c in need if c < nd]] = True
        skipped = np.zeros((n, len(self.groups)), np.int64)
        if (self._missing & stepd).any():  # maps in place lack steps needed now
            self._loaded[:] = -1
        self._missing = ~stepd
        # groups stepped once per period where accurate: not the monitor's or the
        # accumulated state's (needed at the samples)
        ctol = np.where(self._whole, self.whole_tol, 0.0)
        for c in need:
            if c >= nd:
                ctol[self._group[c - nd]] = 0.0
        self._kernel.ladder(
            self._p, np.ascontiguousarray(self.prop.lam), self._unit, pat_t, pat_a,
            float(self.period), self._g, self._edges, self._widths, self._co, self._xd,
            self._xs, self._maps_all, self._dbar_all, self._loaded, self._prev, self._mem,
            levels if len(levels) else np.zeros(1, np.int64),
            int(off), state.level, state.held, state.stopped, int(col[monitor]),
            idx.astype(np.int64), float(hold_below), float(resume_at), rec_cols,
            int(col[accumulate]) if accumulate else -1, int(periods), rec, low, acc, which,
            state.first_resume, int(state.periods), self._out, self._last, self._group, stepd,
            self.skip_tol, skipped, ctol)
        state = dataclasses.replace(state, periods=state.periods + periods)
        return LadderResult(rec, low, acc, which, state, skipped)

    @property
    def columns(self) -> dict[str, int]:
        """State name → column of :meth:`run`'s result."""
        return {self.model.states[i]: c for c, i in enumerate((*self.sp.driven, *self.sp.slow))}

    @property
    def x(self) -> np.ndarray:
        """Current amounts (S, n); the PK rows are not tracked (NaN)."""
        out = np.full((self.model.n_states, self.n), np.nan)
        out[list(self.sp.driven)] = self._xd.T
        out[list(self.sp.slow)] = self._xs.T
        return out


def _subjects_key(individual, covariates, n: int) -> tuple:
    """A key of the subjects' values (a digest of the arrays' bytes)."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for d in (individual, covariates):
        for k in sorted(d):
            v = np.ascontiguousarray(np.broadcast_to(np.asarray(d[k], float), (n,)))
            h.update(k.encode() + b"=" + v.tobytes())
    return (n, h.hexdigest())


def _remember(store: dict, key, value):
    """Keep ``value`` in ``store`` (the last 4 only: a trial's subjects and 2-3 step
    layouts) and return it."""
    while len(store) >= 4:
        store.pop(next(iter(store)))
    store[key] = value
    return value


def _coefficients(model: Model, individual, covariates, s: Split, const: list[bool],
                  chains: list, table: list[tuple], widths: np.ndarray, n: int) -> np.ndarray:
    """Per-subject step coefficients (n, steps, K) of the generated stepping (layout
    ``table``, see _advance_source)."""
    xs = model.state_symbols

    def value(e: sp.Expr) -> np.ndarray:
        return np.broadcast_to(np.asarray(model.compile(e)(individual, covariates), float),
                               (n,))

    own = {}  # constant own rates a, (n,)
    for q in np.flatnonzero(const):
        i = s.slow[q]
        a = sp.diff(s.slow_rates[q], xs[i])
        own[q] = np.zeros(n) if xs[i] in a.free_symbols else value(a)
    links = {}  # chain → (n, L): link rates into each member (0 for the first)
    for c, chain in enumerate(chains):
        links[c] = np.column_stack([np.zeros(n) if rate is None else value(rate)
                                    for _, rate in chain])
    w, back = np.unique(widths, return_inverse=True)  # a few distinct step widths
    co = np.empty((n, len(w), len(table)))
    dd: dict[tuple, np.ndarray] = {}
    for k, key in enumerate(table):
        if key[0] in ("ex", "p1h", "p2h"):
            z = own[key[1]][:, None] * w[None, :]
            co[:, :, k] = (np.exp(z) if key[0] == "ex" else w * (
                phi(z, 1.0) if key[0] == "p1h" else _phi2(z)))
        else:  # f(Mh)[r, s] = f⁽ʳ⁻ˢ⁾(ah)/(r − s)!·h^(r−s)·Π links s+1..r, times h for φ1, φ2
            kind, c, r, s_ = key
            order = {"E": 0, "F1": 1, "F2": 2}[kind]
            if (c, order, r - s_) not in dd:
                z = own[chains[c][0][0]][:, None] * w[None, :]
                dd[c, order, r - s_] = _dd_exp(z, order, r - s_) * w ** (r - s_) * (
                    w if order else 1.0)
            path = np.prod(links[c][:, s_ + 1:r + 1], axis=1)
            co[:, :, k] = dd[c, order, r - s_] * path[:, None]
    return np.ascontiguousarray(co[:, back])


def _phi2(z):
    """(e^z − 1 − z)/z², 1/2 at z = 0."""
    safe = np.where(np.abs(z) > 1e-4, z, 1.0)
    return np.where(np.abs(z) > 1e-4, (np.expm1(safe) - safe) / safe ** 2, 0.5 + z / 6.0)
