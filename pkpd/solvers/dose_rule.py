"""The hold-and-reduce dose rule of a course (e.g. selinexor's label: hold at grade-4
platelets, restart one level lower once recovered), written once: its source is part of the
periodic solver's generated kernel (:meth:`pkpd.solvers.periodic.PeriodicSolver.run_ladder`)
and compiled on its own for the ODE engine's weekly loop (:func:`apply`)."""

from __future__ import annotations

import numpy as np

# one subject after one period: ``dosing`` (neither held nor stopped during it), ``low`` the
# lowest monitored value over it, ``end`` its value at the period end; returns the new held
# and level, whether the subject restarts (one level lower) and whether it stops (no level
# left)
RULE = '''
@njit(cache=True, inline="always")
def dose_rule(dosing, low, end, held, level, n_levels, hold_below, resume_at):
    # hold from the next period if dosing and low < hold_below; a held subject whose end
    # value is >= resume_at restarts one level lower (stopped when none is left)
    if dosing and low < hold_below:
        return True, level, False, False
    if held and end >= resume_at:
        return False, level + 1, True, level + 1 >= n_levels
    return held, level, False, False
'''

_ARRAYS = '''
import numpy as np
from numba import njit
''' + RULE + '''

@njit(cache=True)
def apply_all(dosing, low, end, held, level, n_levels, hold_below, resume_at, resumed,
              stopped):
    for i in range(held.shape[0]):
        h, v, r, s = dose_rule(dosing[i], low[i], end[i], held[i], level[i], n_levels,
                               hold_below, resume_at)
        held[i] = h
        level[i] = v
        resumed[i] = r
        stopped[i] = stopped[i] or s
'''


def apply(low: np.ndarray, end: np.ndarray, held: np.ndarray, level: np.ndarray,
          stopped: np.ndarray, n_levels: int, hold_below: float,
          resume_at: float) -> np.ndarray:
    """The rule for every subject after one period (``held``, ``level`` (int64) and
    ``stopped`` updated in place); returns who restarts one level lower."""
    from .compiled import load_kernel

    dosing = ~held & ~stopped
    resumed = np.zeros(len(held), np.bool_)
    load_kernel(_ARRAYS).apply_all(dosing, np.asarray(low, float), np.asarray(end, float), held,
                               level, int(n_levels), float(hold_below), float(resume_at),
                               resumed, stopped)
    return resumed
