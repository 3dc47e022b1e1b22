"""Trial endpoints from simulated trajectories: events from cumulative hazards, IMWG
biochemical progression, Kaplan–Meier estimates and binomial confidence intervals.

All functions are vectorised over patients: trajectories are (n_patients, n_times) arrays
on a shared time grid.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import norm

__all__ = ["background_mortality_hazard", "event_times", "imwg_progression", "kaplan_meier",
           "wilson_ci"]


def event_times(times: np.ndarray, cumhaz: np.ndarray,
                rng: np.random.Generator | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First-event times from cumulative hazards H (n, T) by inverse CDF.

    The event happens when H reaches E = −log(U), U ~ Uniform(0, 1) (``rng`` or the U values
    given); the time is interpolated linearly in H between grid times. Returns (time, event):
    patients whose H never reaches E are censored at the last time (event 0).
    """
    times = np.asarray(times, dtype=float)
    H = np.asarray(cumhaz, dtype=float)
    u = rng.random(H.shape[0]) if isinstance(rng, np.random.Generator) else np.asarray(rng)
    target = -np.log(u)
    reached = H >= target[:, None]
    event = reached.any(axis=1)
    j = np.where(event, reached.argmax(axis=1), len(times) - 1)
    jm = np.maximum(j - 1, 0)
    rows = np.arange(H.shape[0])
    h0, h1 = H[rows, jm], H[rows, j]
    frac = np.where(h1 > h0, (target - h0) / np.where(h1 > h0, h1 - h0, 1.0), 1.0)
    t = np.where(j > 0, times[jm] + np.clip(frac, 0, 1) * (times[j] - times[jm]), times[0])
    return np.where(event, t, times[-1]), event.astype(int)


def imwg_progression(times: np.ndarray, mspike: np.ndarray, *, rise: float = 0.25,
                     absolute: float = 0.5, absolute_high: float = 1.0,
                     high_nadir: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    """IMWG biochemical progression on assessment times (domain.md §4.6).

    Progression at an assessment when M-spike ≥ (1 + rise)·nadir and ≥ nadir + absolute
    (+ absolute_high when the nadir is ≥ high_nadir g/dL), the nadir being the lowest earlier
    value (baseline included), confirmed at the next assessment. Returns (time, event): the
    time of the first of the two assessments, or the last time with event 0.
    """
    M = np.asarray(mspike, dtype=float)
    times = np.asarray(times, dtype=float)
    if M.shape[1] < 3:  # a rise needs a later assessment and its confirmation
        return np.full(M.shape[0], times[-1]), np.zeros(M.shape[0], dtype=int)
    nadir = np.minimum.accumulate(M, axis=1)
    prev_nadir = np.concatenate([M[:, :1], nadir[:, :-1]], axis=1)
    need = np.where(prev_nadir >= high_nadir, absolute_high, absolute)
    up = (M >= (1 + rise) * prev_nadir) & (M >= prev_nadir + need)
    up[:, 0] = False
    # confirmation: the next assessment also meets the criterion against the same nadir
    confirmed = up[:, :-1] & (M[:, 1:] >= (1 + rise) * prev_nadir[:, :-1]) & (
        M[:, 1:] >= prev_nadir[:, :-1] + need[:, :-1])
    event = confirmed.any(axis=1)
    j = confirmed.argmax(axis=1)
    return np.where(event, times[j], times[-1]), event.astype(int)


def kaplan_meier(time: np.ndarray, event: np.ndarray) -> pd.DataFrame:
    """Kaplan–Meier survival with Greenwood 95 % CI (log-log), one row per event time.

    Columns: TIME, AT_RISK, EVENTS, SURVIVAL, LOWER, UPPER; the first row is time 0.
    """
    time, event = np.asarray(time, dtype=float), np.asarray(event, dtype=int)
    order = np.lexsort((-event, time))
    time, event = time[order], event[order]
    uniq, d = np.unique(time[event == 1], return_counts=True)
    d = d.astype(float)
    at_risk = len(time) - np.searchsorted(time, uniq, side="left")
    surv = np.cumprod(1 - d / at_risk)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = np.cumsum(d / (at_risk * (at_risk - d)))
        se_loglog = np.sqrt(var) / np.abs(np.log(surv))
        z = norm.ppf(0.975)
        lower = surv ** np.exp(z * se_loglog)
        upper = surv ** np.exp(-z * se_loglog)
    lower = np.where(surv > 0, lower, 0.0)
    upper = np.where(surv > 0, upper, 0.0)
    return pd.DataFrame({
        "TIME": np.r_[0.0, uniq], "AT_RISK": np.r_[len(time), at_risk],
        "EVENTS": np.r_[0, d].astype(int), "SURVIVAL": np.r_[1.0, surv],
        "LOWER": np.r_[1.0, np.nan_to_num(lower, nan=1.0)],
        "UPPER": np.r_[1.0, np.nan_to_num(upper, nan=1.0)],
    })


def wilson_ci(k: np.ndarray | int, n: np.ndarray | int,
              level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval for a proportion k/n."""
    k, n = np.asarray(k, dtype=float), np.asarray(n, dtype=float)
    z = norm.ppf(0.5 + level / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def background_mortality_hazard(age: np.ndarray, sex: np.ndarray) -> np.ndarray:
    """All-cause mortality hazard (per year) by age (years) and sex (0 male, 1 female).

    Gompertz μ(x) = a·exp(b·(x − 65)) with b = 0.085 /year (mortality doubling every
    ≈ 8 years) and a = 0.015 /year for men, 0.010 /year for women at 65: an approximation of
    recent US period life tables (assumption; not in domain.md).
    """
    a = np.where(np.asarray(sex) == 1, 0.010, 0.015)
    return a * np.exp(0.085 * (np.asarray(age, dtype=float) - 65.0))
