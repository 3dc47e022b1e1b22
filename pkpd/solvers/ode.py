"""Reference solver: scipy ``solve_ivp`` through the same event table, one subject at a time.

Every fast path is tested against this. Steady state is found the way NONMEM does for
general ODE models: repeat dosing cycles from the current amounts until they stop changing.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.integrate import solve_ivp

from ..events import BOLUS, RATE, RESET, SS_BOLUS, SS_CONSTANT, SS_INFUSION, STEADY, EventTable

__all__ = ["solve_reference"]


def solve_reference(
    rhs: Callable[[int, float, np.ndarray, np.ndarray], np.ndarray],
    events: EventTable,
    x0: np.ndarray,
    out_subject: np.ndarray,
    out_time: np.ndarray,
    out_event: np.ndarray,
    *,
    rtol: float = 1e-10,
    atol: float = 1e-12,
    method: str = "LSODA",
) -> np.ndarray:
    """Amounts (n_out, n) at the requested outputs.

    ``rhs(s, t, x, r)`` is dx/dt of subject s with input rates r (mg/h per state);
    ``out_event`` is, for each output, the index of the last event processed before it.
    """
    n = x0.shape[1]
    out = np.empty((len(out_time), n))
    order = np.lexsort((out_time, out_event))
    o_ev, o_t = out_event[order], out_time[order]
    opts = dict(rtol=rtol, atol=atol, method=method)
    bounds = np.searchsorted(events.subject, np.arange(x0.shape[0] + 1))
    oi = 0
    for s in range(x0.shape[0]):
        x = x0[s].copy()
        r = np.zeros(n)
        t = None
        for e in range(bounds[s], bounds[s + 1]):
            te = events.time[e]
            if t is not None and events.kind[e] != RESET:
                x = _integrate(rhs, s, x, r, t, te, opts)
            t = te
            kind = events.kind[e]
            c = events.cmt[e]
            if kind == RESET:
                x, r = x0[s].copy(), np.zeros(n)
            elif kind == BOLUS:
                x[c] += events.value[e]
            elif kind == RATE:
                r[c] += events.value[e]
            elif kind == STEADY:
                row = events.ss_row[e]
                mode = events.ss_mode[row]
                x, on = _steady_state(rhs, s, events, row, c, x if mode == 2 else x0[s], n,
                                      opts)
                if mode == 1:
                    r = np.zeros(n)
                r[c] += on * events.ss_rate[row]
            # outputs that see this event and not the next one
            while oi < len(o_ev) and o_ev[oi] == e:
                out[order[oi]] = _integrate(rhs, s, x, r, t, o_t[oi], opts)
                oi += 1
    return out


def _integrate(rhs, s, x, r, t0, t1, opts) -> np.ndarray:
    if t1 - t0 <= 1e-12 * max(1.0, abs(t1)):  # round-off sliver (LSODA rejects it)
        return x.copy()
    sol = solve_ivp(lambda t, y: rhs(s, t, y, r), (t0, t1), x, **opts)
    if not sol.success:
        raise RuntimeError(f"solve_ivp failed for subject {s}: {sol.message}")
    return sol.y[:, -1]


def _steady_state(rhs, s, ev: EventTable, e: int, c: int, start: np.ndarray, n: int, opts,
                  max_cycles: int = 5000, tol: float = 1e-11) -> tuple[np.ndarray, int]:
    """Amounts at the SS record's time (phase 0), by repeating dosing cycles to convergence.

    Mode 2 (SS=2) iterates from the current amounts, i.e. adds the steady state of the new
    doses to what is there (exact for linear systems). Returns the amounts and the number of
    infusions still running at phase 0.
    """
    typ = ev.ss_type[e]  # e: row of the steady-state fields
    ii, lag, dur = ev.ss_ii[e], ev.ss_lag[e], ev.ss_dur[e]
    rate_vec = np.zeros(n)
    rate_vec[c] = ev.ss_rate[e]
    if typ == SS_CONSTANT:
        x = start.copy()
        tau = 24.0
        for _ in range(max_cycles):
            new = _integrate(rhs, s, x, rate_vec, 0.0, tau, opts)
            if np.allclose(new, x, rtol=tol, atol=1e-14):
                return new, 0
            x = new
        raise RuntimeError(f"steady state not reached for subject {s}")
    phase = lag % ii
    if typ == SS_BOLUS:
        pieces = [(0.0, phase, 0), (phase, ii, 0)] if phase > 0 else [(0.0, ii, 0)]
    else:
        cuts = {0.0, ii}
        for m in range(-int(np.ceil((dur + lag) / ii)) - 2, 2):
            for p in (lag + m * ii, lag + dur + m * ii):
                if 0 < p < ii:
                    cuts.add(p)
        cuts = sorted(cuts)
        pieces = []
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            mid = 0.5 * (a + b)
            count = int(np.floor((mid - lag) / ii) - np.floor((mid - lag - dur) / ii))
            pieces.append((a, b, count))
    x = np.zeros(n)
    for _ in range(max_cycles):
        y = x.copy()
        for a, b, count in pieces:
            if typ == SS_BOLUS and a == phase:  # the bolus of this cycle
                y[c] += ev.ss_amt[e]
            y = _integrate(rhs, s, y, count * rate_vec if typ != SS_BOLUS else 0 * rate_vec,
                           a, b, opts)
        if np.allclose(y, x, rtol=tol, atol=1e-14):
            break
        x = y
    else:
        raise RuntimeError(f"steady state not reached for subject {s}")
    # infusions of earlier cycles still running at phase 0 (their ends are in the event table)
    on = int(ev.ss_k1[e] - ev.ss_k0[e]) if typ == SS_INFUSION else 0
    if ev.ss_mode[e] == 2:
        return start + y, on
    return y, on
