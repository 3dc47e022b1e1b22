"""Error-controlled solution of nonlinear models, vectorised over subjects.

Dormand–Prince 5(4) (the pair of scipy's ``RK45``) with one adaptive step shared by all
subjects: the step is accepted when the scaled error of every subject is ≤ 1 (RMS over
states, ``atol + rtol·|x|``), so each subject meets the tolerance. Steps stop at every event
time (doses, infusion starts and ends); outputs between events come from the method's
4th-order dense output. All arrays are state-major, (n_states, n_subjects).

Supports what regimens and ordinary datasets need: bolus and infusion doses, lag, F, ADDL,
EVID 2/3/4 without time running backwards. Steady-state records (SS) need the reference
solver (``pkpd.solvers.ode``), which ``pkpd.simulation`` then uses.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..events import BOLUS, RATE, RESET, STEADY, EventTable

__all__ = ["Unsupported", "march"]

# Dormand–Prince 5(4) tableau and dense-output polynomial (as in scipy's RK45)
_C = np.array([0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1])
_A = [
    [],
    [1 / 5],
    [3 / 40, 9 / 40],
    [44 / 45, -56 / 15, 32 / 9],
    [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
    [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
]
_B = np.array([35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84])
_E = np.array([-71 / 57600, 0, 71 / 16695, -71 / 1920, 17253 / 339200, -22 / 525, 1 / 40])
_P = np.array([
    [1, -8048581381 / 2820520608, 8663915743 / 2820520608, -12715105075 / 11282082432],
    [0, 0, 0, 0],
    [0, 131558114200 / 32700410799, -68118460800 / 10900136933,
     87487479700 / 32700410799],
    [0, -1754552775 / 470086768, 14199869525 / 1410260304, -10690763975 / 1880347072],
    [0, 127303824393 / 49829197408, -318862633887 / 49829197408,
     701980252875 / 199316789632],
    [0, -282668133 / 205662961, 2019193451 / 616988883, -1453857185 / 822651844],
    [0, 40617522 / 29380423, -110615467 / 29380423, 69997945 / 29380423],
])


class Unsupported(ValueError):
    """The event table needs the reference solver (steady state, time running backwards)."""


Rhs = Callable[[float, np.ndarray, np.ndarray], np.ndarray]  # (t, x (n,S), r (n,S)) → (n,S)


def march(rhs: Rhs, ev: EventTable, x0: np.ndarray, *, grid: np.ndarray | None = None,
          out_subject: np.ndarray | None = None, out_time: np.ndarray | None = None,
          out_event: np.ndarray | None = None, rtol: float = 1e-6, atol: float = 1e-9,
          progress: Callable[[float], None] | None = None) -> np.ndarray:
    """Amounts at the outputs: (n, len(grid), S) on a shared ``grid``, else (n, n_out) for
    outputs given by subject, time and the index of the last event processed before each.

    ``x0`` (S, n) are the initial amounts (also restored by resets).
    """
    n_sub, n = x0.shape
    if np.any(ev.kind == STEADY):
        raise Unsupported("steady-state records need the reference ODE solver")
    back = np.diff(ev.time) < 0
    back &= ev.subject[1:] == ev.subject[:-1]
    if back.any():
        raise Unsupported("time runs backwards after a reset: use the reference ODE solver")
    x = np.ascontiguousarray(x0.T, dtype=float)  # (n, S)
    r = np.zeros((n, n_sub))
    x0t = x.copy()
    # rank of each event among its subject's events at the same time
    same = np.r_[False, (ev.subject[1:] == ev.subject[:-1]) & (ev.time[1:] == ev.time[:-1])]
    run_start = np.maximum.accumulate(np.where(~same, np.arange(len(ev)), 0))
    rank = np.arange(len(ev)) - run_start
    stops = np.unique(ev.time)
    if grid is not None:
        grid = np.asarray(grid, dtype=float)
        out = np.empty((n, len(grid), n_sub))
        stops = np.unique(np.r_[stops, grid[-1]])
        gpos = 0  # next grid index to fill
    else:
        out = np.empty((n, len(out_time)))
        stops = np.unique(np.r_[stops, out_time.max(initial=stops[0])])
        # outputs strictly between stops use dense output; those at a stop are set there
        at_stop = np.isin(out_time, stops)
        inner = np.flatnonzero(~at_stop)
        inner = inner[np.argsort(out_time[inner], kind="stable")]
        ipos = 0
        stop_outputs = np.flatnonzero(at_stop)
        stop_outputs = stop_outputs[np.lexsort((out_event[stop_outputs],
                                                out_time[stop_outputs]))]
        spos = 0
    ev_order = np.argsort(ev.time, kind="stable")
    ev_times_sorted = ev.time[ev_order]
    t = float(stops[0])
    h = None
    for ts in stops:
        ts = float(ts)
        # integrate every subject from t to ts -------------------------------------------
        while t < ts:
            if h is None:
                h = _initial_step(rhs, t, x, r, rtol, atol, ts - t)
            h = min(h, ts - t)
            k, x_new, err = _step(rhs, t, x, r, h)
            scale = atol + rtol * np.maximum(np.abs(x), np.abs(x_new))
            err_norm = float(np.sqrt(np.mean((err / scale) ** 2, axis=0)).max(initial=0.0))
            if not np.isfinite(err_norm):
                raise FloatingPointError(f"non-finite amounts at t = {t:g}")
            if err_norm > 1.0:
                h *= max(0.2, 0.9 * err_norm ** -0.2)
                continue
            t_new = t + h if ts - (t + h) > 1e-12 * max(1.0, abs(ts)) else ts
            # dense output at the outputs strictly inside (t, t_new)
            if grid is not None:
                hi = np.searchsorted(grid, t_new, side="left")
                if hi > gpos:
                    theta = (grid[gpos:hi] - t) / h
                    out[:, gpos:hi, :] = _dense(x, k, h, theta)
                    gpos = hi
            else:
                hi = ipos
                while hi < len(inner) and out_time[inner[hi]] < t_new:
                    hi += 1
                if hi > ipos:
                    sel = inner[ipos:hi]
                    theta = (out_time[sel] - t) / h
                    s = out_subject[sel]
                    out[:, sel] = _dense_points(x[:, s], k[:, :, s], h, theta)
                    ipos = hi
            x, t = x_new, t_new
            h *= min(10.0, 0.9 * err_norm ** -0.2) if err_norm > 0 else 10.0
            if progress is not None:
                progress(t)
        # events at ts, rank by rank, with outputs that come between them -----------------
        a = np.searchsorted(ev_times_sorted, ts, side="left")
        b = np.searchsorted(ev_times_sorted, ts, side="right")
        here = ev_order[a:b]
        if grid is None:
            s_hi = spos
            while s_hi < len(stop_outputs) and out_time[stop_outputs[s_hi]] == ts:
                s_hi += 1
            outs_here = stop_outputs[spos:s_hi]
            spos = s_hi
            first_here = np.full(n_sub, np.iinfo(np.int64).max)
            np.minimum.at(first_here, ev.subject[here], here)
            pre = outs_here[out_event[outs_here] < first_here[out_subject[outs_here]]]
            out[:, pre] = x[:, out_subject[pre]]
        for rk in range(int(rank[here].max(initial=-1)) + 1):
            e = here[rank[here] == rk]
            _apply(ev, e, x, r, x0t)
            if grid is None:
                done = outs_here[np.isin(out_event[outs_here], e)]
                out[:, done] = x[:, out_subject[done]]
        if grid is not None:
            while gpos < len(grid) and grid[gpos] == ts:
                out[:, gpos, :] = x
                gpos += 1
    return out


def _apply(ev: EventTable, e: np.ndarray, x: np.ndarray, r: np.ndarray, x0: np.ndarray) -> None:
    s, c, kind, v = ev.subject[e], ev.cmt[e], ev.kind[e], ev.value[e]
    m = kind == RESET
    x[:, s[m]] = x0[:, s[m]]
    r[:, s[m]] = 0.0
    m = kind == BOLUS
    np.add.at(x, (c[m], s[m]), v[m])
    m = kind == RATE
    np.add.at(r, (c[m], s[m]), v[m])


def _step(rhs: Rhs, t: float, x: np.ndarray, r: np.ndarray,
          h: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k = np.empty((7, *x.shape))
    k[0] = rhs(t, x, r)
    for i in range(1, 6):
        dx = sum(a * k[j] for j, a in enumerate(_A[i]) if a != 0.0)
        k[i] = rhs(t + _C[i] * h, x + h * dx, r)
    x_new = x + h * np.tensordot(_B, k[:6], axes=1)
    k[6] = rhs(t + h, x_new, r)
    err = h * np.tensordot(_E, k, axes=1)
    return k, x_new, err


def _dense(x: np.ndarray, k: np.ndarray, h: float, theta: np.ndarray) -> np.ndarray:
    """(n, len(theta), S) states at t + θh from a step's stages k (7, n, S)."""
    powers = np.cumprod(np.repeat(theta[None, :], 4, axis=0), axis=0)  # θ, θ², θ³, θ⁴
    Q = _P @ powers  # (7, T)
    return x[:, None, :] + h * np.einsum("kns,kt->nts", k, Q)


def _dense_points(x: np.ndarray, k: np.ndarray, h: float, theta: np.ndarray) -> np.ndarray:
    """(n, m) states of m (subject, time) points; x (n, m), k (7, n, m), theta (m,)."""
    powers = np.cumprod(np.repeat(theta[None, :], 4, axis=0), axis=0)
    Q = _P @ powers  # (7, m)
    return x + h * np.einsum("knm,km->nm", k, Q)


def _initial_step(rhs: Rhs, t: float, x: np.ndarray, r: np.ndarray, rtol: float, atol: float,
                  span: float) -> float:
    """Hairer's starting step, shared by all subjects."""
    f0 = rhs(t, x, r)
    scale = atol + rtol * np.abs(x)
    d0 = float(np.sqrt(np.mean((x / scale) ** 2)))
    d1 = float(np.sqrt(np.mean((f0 / scale) ** 2)))
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h0 = min(h0, span)
    f1 = rhs(t + h0, x + h0 * f0, r)
    d2 = float(np.sqrt(np.mean(((f1 - f0) / scale) ** 2))) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** 0.2
    return min(100 * h0, h1, span)
