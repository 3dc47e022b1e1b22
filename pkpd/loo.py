"""PSIS-LOO for a fit's diagnostics, robust to observations whose log-likelihood does not vary.

A censored record far below the LLOQ (M3: log Φ(…) rounds to 0.0 in most or all draws), or
any observation the parameters barely move, has importance ratios that are all equal or
nearly so. ArviZ's Pareto smoothing then divides by zero: it returns NaN for that observation
(and so for elpd_loo) when most draws are 0.0 and the others differ slightly (by up to 0.013
in a CI run), and k = ∞ (a "very bad" observation) when none does. Such an observation
needs no smoothing: its ratios lie within a factor e^``flat`` of each other, so plain
importance sampling is exact up to Monte Carlo error (and exactly right for a constant
log-likelihood).
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

__all__ = ["loo"]


def loo(idata, var_name: str | None = None, flat: float = 0.1) -> dict[str, float | int]:
    """elpd_loo, p_loo and the number of Pareto k > 0.7 of ``idata``'s log-likelihood
    (``var_name``, or its only variable): ArviZ's PSIS-LOO, with the observations whose
    log-likelihood spans less than ``flat`` over the draws by plain importance sampling (not
    counted among the large k)."""
    import arviz as az

    res = az.loo(idata, var_name=var_name, pointwise=True)
    ll = idata.log_likelihood
    da = ll[var_name] if var_name is not None else ll[next(iter(ll.data_vars))]
    x = da.values.reshape(da.shape[0] * da.shape[1], -1)  # (draws, observations)
    n = x.shape[0]
    loo_i = np.asarray(res.loo_i.values, float).ravel().copy()
    k = np.asarray(res.pareto_k.values, float).ravel()
    fix = np.ptp(x, axis=0) < flat
    # p(y_i | y_-i) ≈ 1 / mean_s(1 / p(y_i | θ_s)): raw importance sampling
    loo_i[fix] = np.log(n) - logsumexp(-x[:, fix], axis=0)
    lpd_i = logsumexp(x, axis=0) - np.log(n)
    return {"elpd_loo": float(loo_i.sum()), "p_loo": float((lpd_i - loo_i).sum()),
            "pareto_k_over_0.7": int(np.sum(k[~fix] > 0.7))}
