"""PSIS-LOO of a fit's diagnostics (pkpd.loo): equal to ArviZ for observations the parameters
move, and finite (plain importance sampling, exact for a constant column) for censored
records whose log-likelihood is 0.0 in all or most draws, which made ArviZ's elpd_loo NaN in
a CI run (tests/test_fit.py: 3 of 210 records NaN, 3 more with k = ∞)."""

import arviz as az
import numpy as np
from scipy.special import logsumexp

from pkpd.loo import loo


def _idata(ll: np.ndarray):
    return az.from_dict(posterior={"a": np.zeros(ll.shape[:2])},
                        log_likelihood={"obs": ll})


def _normal_ll(rng, chains=2, draws=400, n=30):
    """log N(y_i; μ_s, 1) for posterior draws μ_s ~ N(ȳ, 1/n)."""
    y = rng.standard_normal(n)
    mu = y.mean() + rng.standard_normal((chains, draws, 1)) / np.sqrt(n)
    return -0.5 * (y - mu) ** 2 - 0.5 * np.log(2 * np.pi)


def test_equals_arviz_where_arviz_is_defined():
    ll = _normal_ll(np.random.default_rng(1))
    ref = az.loo(_idata(ll))
    got = loo(_idata(ll))
    assert np.isfinite(ref.elpd_loo)
    np.testing.assert_allclose(got["elpd_loo"], ref.elpd_loo, rtol=1e-12)
    np.testing.assert_allclose(got["p_loo"], ref.p_loo, rtol=1e-10)
    assert got["pareto_k_over_0.7"] == int(np.sum(ref.pareto_k.values > 0.7))


def test_constant_and_nearly_constant_columns():
    rng = np.random.default_rng(2)
    ll = _normal_ll(rng)
    # censored records far below the LLOQ: log Φ = 0.0 in every draw, or in all draws but a
    # few that differ by a rounding error (this one made ArviZ's elpd_loo NaN)
    tied = np.where(rng.uniform(size=ll.shape[:2]) < 0.05, -1e-20, -0.0)
    full = np.concatenate([ll, np.zeros(ll.shape[:2] + (1,)), tied[..., None]], axis=2)
    assert not np.isfinite(az.loo(_idata(full)).elpd_loo)
    got = loo(_idata(full))
    regular = az.loo(_idata(ll))
    flat = tied.reshape(-1)
    raw = np.log(flat.size) - logsumexp(-flat)  # plain importance sampling
    np.testing.assert_allclose(got["elpd_loo"], regular.elpd_loo + 0.0 + raw, rtol=1e-12)
    assert abs(raw) < 1e-12  # log 1, to rounding
    assert got["pareto_k_over_0.7"] == int(np.sum(regular.pareto_k.values > 0.7))
    # p_loo of a constant column is 0; of the tied one ≈ 0
    lpd = logsumexp(flat) - np.log(flat.size)
    np.testing.assert_allclose(got["p_loo"], regular.p_loo + (lpd - raw), rtol=1e-10)
