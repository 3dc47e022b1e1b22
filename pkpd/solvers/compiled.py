"""Error-controlled solution of nonlinear models, compiled: one adaptive Dormand–Prince 5(4)
integration per subject, in machine code (numba), subjects in parallel.

The right-hand side is generated from the model file's sympy equations (common
subexpressions shared) and compiled once per model; the integrator loops over each subject's
events and outputs, so each subject takes the steps its own dynamics need (small after a dose,
large between doses) instead of the smallest step of all subjects.

States of the model's linear part (:attr:`pkpd.model.Model.linear_part`, typically the PK
compartments) are not integrated: they follow their closed form (modal amounts, the shared
kernels of :mod:`pkpd.solvers.linear`), which removes the stiffness of fast absorption and
distribution from the error-controlled part.

Supports what regimens and ordinary datasets need: bolus and infusion doses, lag, F, ADDL,
EVID 2/3/4 without time running backwards; outputs see the events up to their record.
Steady-state records raise :class:`Unsupported`: they need the reference solver
(``pkpd.solvers.ode``), which ``pkpd.simulation`` then uses.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import numba
import numpy as np
import sympy as sp
from sympy.printing.pycode import PythonCodePrinter

from ..events import BOLUS, RATE, RESET, STEADY, EventTable

__all__ = ["Unsupported", "assignments", "compiled_rhs", "integrate_events", "kernel_source",
           "load_kernel"]


class Unsupported(ValueError):
    """The event table needs the reference solver (steady state, time running backwards)."""


_KERNEL = '''
import math
import numpy as np
from numba import njit, prange

@njit(cache=True)
def rhs(t, x, p, r, dx):
{body}

# Dormand–Prince 5(4) (scipy RK45's pair)
A21 = 1 / 5
A31, A32 = 3 / 40, 9 / 40
A41, A42, A43 = 44 / 45, -56 / 15, 32 / 9
A51, A52, A53, A54 = 19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729
A61, A62, A63, A64, A65 = 9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656
B1, B3, B4, B5, B6 = 35 / 384, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84
E1, E3, E4, E5, E6, E7 = (-71 / 57600, 71 / 16695, -71 / 1920, 17253 / 339200, -22 / 525,
                          1 / 40)


C = (0.2, 0.3, 0.8, 8.0 / 9.0, 1.0)  # stage times after the first, as fractions of h


@njit(cache=True)
def _factors(lam, h, ex, ph):
    """e^{λ·c·h} and ∫_0^{c·h} e^{λs} ds for every mode and stage time c (c = 2/10, 3/10,
    8/10, 8/9, 1: powers of e^{λh/10} and one more exponential)."""
    for i in range(lam.shape[0]):
        q = math.exp(lam[i] * h / 10.0)
        q2 = q * q
        q3 = q2 * q
        q8 = q2 * q3 * q3
        ex[0, i] = q2
        ex[1, i] = q3
        ex[2, i] = q8
        ex[3, i] = math.exp(lam[i] * h * (8.0 / 9.0))
        ex[4, i] = q8 * q2
        for j in range(5):
            tau = C[j] * h
            z = lam[i] * tau
            ph[j, i] = (ex[j, i] - 1.0) / lam[i] if abs(z) > 1e-5 else tau * (
                1.0 + z * (0.5 + z / 6.0))


@njit(cache=True)
def _exact(j, L, ex, ph, v, w, x, mr):
    """Write the exact states at stage time c_j into x (modal amounts v and input rates w,
    each (modes, nL), at the start of the step); linear state a has modes mr[a, 0]…mr[a, 1]
    (all of them, or its block of a block-diagonal system)."""
    for a in range(L.shape[0]):
        val = 0.0
        for i in range(mr[a, 0], mr[a, 1]):
            val += ex[j, i] * v[i, a] + ph[j, i] * w[i, a]
        x[L[a]] = val


@njit(cache=True)
def _modal(x, r, L, P, cL, v, w):
    """Modal amounts v = P_i·x_L and input rates w = P_i·(r_L + c_L)."""
    nL = L.shape[0]
    for i in range(P.shape[0]):
        for a in range(nL):
            sv = 0.0
            sw = 0.0
            for b in range(nL):
                sv += P[i, a, b] * x[L[b]]
                sw += P[i, a, b] * (r[L[b]] + cL[b])
            v[i, a] = sv
            w[i, a] = sw


@njit(cache=True)
def _first_step(t, x, p, r, rtol, atol, span, f0, f1, xt):
    """Hairer's starting step."""
    n = x.shape[0]
    rhs(t, x, p, r, f0)
    d0 = 0.0
    d1 = 0.0
    for i in range(n):
        sc = atol + rtol * abs(x[i])
        d0 += (x[i] / sc) ** 2
        d1 += (f0[i] / sc) ** 2
    d0 = math.sqrt(d0 / n)
    d1 = math.sqrt(d1 / n)
    h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
    h0 = min(h0, span)
    for i in range(n):
        xt[i] = x[i] + h0 * f0[i]
    rhs(t + h0, xt, p, r, f1)
    d2 = 0.0
    for i in range(n):
        sc = atol + rtol * abs(x[i])
        d2 += ((f1[i] - f0[i]) / sc) ** 2
    d2 = math.sqrt(d2 / n) / h0
    big = max(d1, d2)
    h1 = max(1e-6, h0 * 1e-3) if big <= 1e-15 else (0.01 / big) ** 0.2
    return min(100.0 * h0, h1, span)


@njit(cache=True)
def _advance(t, target, h, x, p, r, rtol, atol, k, xt, xn, free, L, lam, v, w, ex, ph, mr):
    """Integrate x from t to target in place, states ``L`` exactly (their modal amounts v
    move along); returns (steps, next h)."""
    n = x.shape[0]
    n_free = 0
    for i in range(n):
        n_free += free[i]
    steps = 0
    rhs(t, x, p, r, k[0])
    while t < target:
        if h > target - t:
            h = target - t
        _factors(lam, h, ex, ph)
        for i in range(n):
            xt[i] = x[i] + h * A21 * k[0, i]
        _exact(0, L, ex, ph, v, w, xt, mr)
        rhs(t + C[0] * h, xt, p, r, k[1])
        for i in range(n):
            xt[i] = x[i] + h * (A31 * k[0, i] + A32 * k[1, i])
        _exact(1, L, ex, ph, v, w, xt, mr)
        rhs(t + C[1] * h, xt, p, r, k[2])
        for i in range(n):
            xt[i] = x[i] + h * (A41 * k[0, i] + A42 * k[1, i] + A43 * k[2, i])
        _exact(2, L, ex, ph, v, w, xt, mr)
        rhs(t + C[2] * h, xt, p, r, k[3])
        for i in range(n):
            xt[i] = x[i] + h * (A51 * k[0, i] + A52 * k[1, i] + A53 * k[2, i]
                                + A54 * k[3, i])
        _exact(3, L, ex, ph, v, w, xt, mr)
        rhs(t + C[3] * h, xt, p, r, k[4])
        for i in range(n):
            xt[i] = x[i] + h * (A61 * k[0, i] + A62 * k[1, i] + A63 * k[2, i]
                                + A64 * k[3, i] + A65 * k[4, i])
        _exact(4, L, ex, ph, v, w, xt, mr)
        rhs(t + h, xt, p, r, k[5])
        for i in range(n):
            xn[i] = x[i] + h * (B1 * k[0, i] + B3 * k[2, i] + B4 * k[3, i] + B5 * k[4, i]
                                + B6 * k[5, i])
        _exact(4, L, ex, ph, v, w, xn, mr)
        rhs(t + h, xn, p, r, k[6])
        err = 0.0
        for i in range(n):
            e = h * (E1 * k[0, i] + E3 * k[2, i] + E4 * k[3, i] + E5 * k[4, i]
                     + E6 * k[5, i] + E7 * k[6, i])
            sc = atol + rtol * max(abs(x[i]), abs(xn[i]))
            err += free[i] * (e / sc) ** 2
        err = math.sqrt(err / max(n_free, 1))
        if not math.isfinite(err):
            return -1, h
        if err > 1.0:
            h *= max(0.2, 0.9 * err ** -0.2)
            continue
        t_new = t + h
        if target - t_new <= 1e-12 * max(1.0, abs(target)):
            t_new = target
        for i in range(n):
            x[i] = xn[i]
            k[0, i] = k[6, i]  # first same as last
        for a in range(L.shape[0]):
            for i in range(mr[a, 0], mr[a, 1]):
                v[i, a] = ex[4, i] * v[i, a] + ph[4, i] * w[i, a]
        t = t_new
        steps += 1
        h *= min(10.0, 0.9 * err ** -0.2) if err > 0 else 10.0
    return steps, h


@njit(cache=True)
def _subject(s, ev_bounds, ev_time, ev_kind, ev_cmt, ev_value, out_bounds, out_time,
             out_event, x0, p, L, lam, P, cL, mr, dup, n_ctrl, rtol, atol, out):
    """Integrate subject s through its events, filling its rows of ``out``; returns the
    number of steps (−1 on a non-finite state). A dose into state c also enters the states
    ``dup[c]`` (≥ 0; copies of c); only states below ``n_ctrl`` enter the error test."""
    n = x0.shape[1]
    steps = 0
    x = x0[s].copy()
    r = np.zeros(n)
    k = np.empty((7, n))
    xt = np.empty(n)
    xn = np.empty(n)
    f1 = np.empty(n)
    free = np.ones(n)
    for i in range(n_ctrl, n):
        free[i] = 0.0
    for a in range(L.shape[0]):
        free[L[a]] = 0.0
    m_modes = lam.shape[1]
    v = np.zeros((m_modes, L.shape[0]))
    w = np.zeros((m_modes, L.shape[0]))
    ex = np.empty((5, m_modes))
    ph = np.empty((5, m_modes))
    e0 = ev_bounds[s]
    e1 = ev_bounds[s + 1]
    o0 = out_bounds[s]
    o1 = out_bounds[s + 1]
    t = ev_time[e0] if e1 > e0 else out_time[o0]
    if o1 > o0 and out_time[o0] < t:
        t = out_time[o0]
    h = -1.0
    o = o0
    failed = False
    _modal(x, r, L, P[s], cL[s], v, w)
    for e in range(e0 - 1, e1):
        if e >= e0:  # integrate to the event, then apply it
            te = ev_time[e]
            if te > t:
                if h <= 0:
                    h = _first_step(t, x, p[s], r, rtol, atol, te - t, k[0], f1, xt)
                m, h = _advance(t, te, h, x, p[s], r, rtol, atol, k, xt, xn, free, L,
                                lam[s], v, w, ex, ph, mr)
                if m < 0:
                    failed = True
                    break
                steps += m
                t = te
            kind = ev_kind[e]
            if kind == {RESET}:
                for i in range(n):
                    x[i] = x0[s, i]
                    r[i] = 0.0
                h = -1.0
            elif kind == {BOLUS}:
                x[ev_cmt[e]] += ev_value[e]
                for j in range(dup.shape[1]):
                    if dup[ev_cmt[e], j] >= 0:
                        x[dup[ev_cmt[e], j]] += ev_value[e]
                h = -1.0
            elif kind == {RATE}:
                r[ev_cmt[e]] += ev_value[e]
                for j in range(dup.shape[1]):
                    if dup[ev_cmt[e], j] >= 0:
                        r[dup[ev_cmt[e], j]] += ev_value[e]
                h = -1.0
            if kind == {RESET} or kind == {BOLUS} or kind == {RATE}:
                _modal(x, r, L, P[s], cL[s], v, w)
        while o < o1 and out_event[o] == e:  # outputs that see events up to e
            to = out_time[o]
            if to > t:
                if h <= 0:
                    h = _first_step(t, x, p[s], r, rtol, atol, to - t, k[0], f1, xt)
                m, h = _advance(t, to, h, x, p[s], r, rtol, atol, k, xt, xn, free, L,
                                lam[s], v, w, ex, ph, mr)
                if m < 0:
                    failed = True
                    break
                steps += m
                t = to
            for i in range(n):
                out[o, i] = x[i]
            o += 1
        if failed:
            return -1
    return steps



@njit(cache=True, nogil=True)
def integrate(ev_bounds, ev_time, ev_kind, ev_cmt, ev_value, out_bounds, out_time,
              out_event, x0, p, L, lam, P, cL, mr, dup, n_ctrl, rtol, atol, out):
    """Amounts at every output (rows of ``out``); returns steps taken per subject (−1 on a
    non-finite state)."""
    steps = np.zeros(x0.shape[0], dtype=np.int64)
    for s in range(x0.shape[0]):
        steps[s] = _subject(s, ev_bounds, ev_time, ev_kind, ev_cmt, ev_value, out_bounds,
                            out_time, out_event, x0, p, L, lam, P, cL, mr, dup, n_ctrl, rtol,
                            atol, out)
    return steps


# The serial driver is kept separate (not prange under parallel=False): compiling the
# parallel variant costs seconds, and numba's on-disk cache keys one function per flag set.
@njit(cache=True, parallel=True)
def integrate_parallel(ev_bounds, ev_time, ev_kind, ev_cmt, ev_value, out_bounds, out_time,
                       out_event, x0, p, L, lam, P, cL, mr, dup, n_ctrl, rtol, atol, out):
    """:func:`integrate` with subjects spread over threads."""
    steps = np.zeros(x0.shape[0], dtype=np.int64)
    for s in prange(x0.shape[0]):
        steps[s] = _subject(s, ev_bounds, ev_time, ev_kind, ev_cmt, ev_value, out_bounds,
                            out_time, out_event, x0, p, L, lam, P, cL, mr, dup, n_ctrl, rtol,
                            atol, out)
    return steps
'''


class _Printer(PythonCodePrinter):
    """Scalar Python (math module) that numba compiles."""

    def _print_Symbol(self, expr):  # noqa: N802 (sympy's printer API)
        return self._names.get(expr, super()._print_Symbol(expr))


def _source(model) -> str:
    return kernel_source([model.odes[s] for s in model.states], model.state_symbols,
                         [sp.Symbol(k, real=True) for k in (*model.parameters,
                                                            *model.covariates)])


def assignments(exprs, names: dict, line, printer: PythonCodePrinter | None = None) -> list[str]:
    """Body lines of a generated numba function: the common subexpressions of ``exprs``
    (sympy), then ``line(i, code of exprs[i])`` for each; ``names`` maps symbols to code."""
    temps, reduced = sp.cse(list(exprs), symbols=sp.numbered_symbols("_c"))
    printer = printer or _Printer({"fully_qualified_modules": True})
    names = dict(names)
    printer._names = names
    lines = []
    for sym, e in temps:
        lines.append(f"    {sym} = {printer.doprint(e)}")
        names[sym] = str(sym)
    return lines + [f"    {line(i, printer.doprint(e))}" for i, e in enumerate(reduced)]


def kernel_source(exprs, states, args) -> str:
    """Source of a kernel module for dx/dt = exprs(states, args, t) (sympy expressions)."""
    names: dict[sp.Symbol, str] = {}
    for i, x in enumerate(states):
        names[x] = f"x[{i}]"
    for i, a in enumerate(args):
        names[a] = f"p[{i}]"
    names[sp.Symbol("t", real=True)] = "t"
    lines = assignments(exprs, names, lambda i, e: f"dx[{i}] = {e} + r[{i}]")
    body = "\n".join(lines) if lines else "    pass"
    return _KERNEL.replace("{body}", body).replace("{RESET}", str(RESET)).replace(
        "{BOLUS}", str(BOLUS)).replace("{RATE}", str(RATE))


_MODULES: dict[str, object] = {}
PARALLEL_FROM = 200  # subjects: below this, threads cost more than they save (and compiling)


def _cache_dir() -> Path:
    root = os.environ.get("PKPD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "pkpd")
    path = Path(root) / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def compiled_rhs(model):
    """The compiled kernel module of ``model`` (generated source cached on disk by content,
    so numba's own cache makes later processes start without compiling)."""
    src = model._compiled.get("numba kernel source")
    if src is None:
        src = model._compiled["numba kernel source"] = _source(model)
    return load_kernel(src)


def load_kernel(src: str):
    """Import (compiling on first use) the kernel module of generated source ``src``."""
    key = hashlib.sha256((src + numba.__version__).encode()).hexdigest()[:20]
    mod = _MODULES.get(key)
    if mod is not None:
        return mod
    name = f"pkpd_kernel_{key}"
    try:
        folder = _cache_dir()
        path = folder / f"{name}.py"
        if not path.exists() or path.read_text() != src:
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
            with os.fdopen(fd, "w") as fh:
                fh.write(src)
            os.replace(tmp, path)
    except OSError:  # read-only home: compile in memory every time
        folder = Path(tempfile.mkdtemp(prefix="pkpd_kernels_"))
        path = folder / f"{name}.py"
        path.write_text(src)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    _MODULES[key] = mod
    return mod


def integrate_events(model, ev: EventTable, x0: np.ndarray, p: np.ndarray,
                     out_subject: np.ndarray, out_time: np.ndarray, out_event: np.ndarray,
                     *, exact=None, rtol: float = 1e-6, atol: float = 1e-9, kernel=None,
                     linear: np.ndarray | None = None, dup: np.ndarray | None = None,
                     n_ctrl: int | None = None) -> np.ndarray:
    """Amounts (n_out, S) at outputs given by subject, time and the index of the last event
    processed before each. ``x0`` (n_sub, S) initial amounts (restored by resets), ``p``
    (n_sub, n_parameters + n_covariates) in the model's order. ``exact``: the closed form of
    the model's :attr:`~pkpd.model.Model.linear_part` for these subjects (a
    :class:`~pkpd.solvers.linear.Spectral`, or anything with its ``lam``, ``P`` and ``base``
    (constant inputs, (n_sub, nL)), optionally ``modes`` (nL, 2): the range of modes of each
    state); those states are then solved exactly.

    For augmented systems (:mod:`pkpd.sensitivity`): ``kernel`` another compiled system whose
    first states are the model's; ``linear`` the indices of the exactly solved states (default:
    the model's linear part); ``dup`` (S, k) states that receive a copy of every dose into a
    state (−1: none); ``n_ctrl`` only states below it enter the error test (default all)."""
    n_sub, n_states = x0.shape
    if np.any(ev.kind == STEADY):
        raise Unsupported("steady-state records need the reference ODE solver")
    back = np.diff(ev.time) < 0
    back &= ev.subject[1:] == ev.subject[:-1]
    if back.any():
        raise Unsupported("time runs backwards after a reset: use the reference ODE solver")
    mod = compiled_rhs(model) if kernel is None else kernel
    order = np.lexsort((out_time, out_event, out_subject))
    ev_bounds = np.searchsorted(ev.subject, np.arange(n_sub + 1))
    out_bounds = np.searchsorted(out_subject[order], np.arange(n_sub + 1))
    out = np.empty((len(order), n_states))
    if exact is None:
        L = np.zeros(0, dtype=np.int64)
        lam, P, base = np.zeros((n_sub, 0)), np.zeros((n_sub, 0, 0, 0)), np.zeros((n_sub, 0))
    else:
        L = np.asarray(model.linear_part[0] if linear is None else linear, dtype=np.int64)
        lam, P, base = exact.lam, exact.P, exact.base
    mr = getattr(exact, "modes", None)
    if mr is None:
        mr = np.zeros((len(L), 2), dtype=np.int64)
        mr[:, 1] = lam.shape[1]
    dup = np.full((n_states, 0), -1, dtype=np.int64) if dup is None else np.asarray(
        dup, dtype=np.int64)
    run = mod.integrate_parallel if n_sub >= PARALLEL_FROM and numba.get_num_threads() > 1 \
        else mod.integrate
    steps = run(ev_bounds, ev.time.astype(float), ev.kind.astype(np.int64),
                ev.cmt.astype(np.int64), ev.value.astype(float), out_bounds,
                out_time[order].astype(float), out_event[order].astype(np.int64),
                np.ascontiguousarray(x0, dtype=float), np.ascontiguousarray(p, dtype=float), L,
                np.ascontiguousarray(lam, dtype=float), np.ascontiguousarray(P, dtype=float),
                np.ascontiguousarray(base, dtype=float), np.asarray(mr, dtype=np.int64), dup,
                int(n_states if n_ctrl is None else n_ctrl), float(rtol), float(atol), out)
    integrate_events.steps = steps  # per subject, for diagnostics and benchmarks
    if np.any(steps < 0):
        s = int(np.flatnonzero(steps < 0)[0])
        raise FloatingPointError(f"non-finite amounts for subject index {s}")
    res = np.empty_like(out)
    res[order] = out
    return res
