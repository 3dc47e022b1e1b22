"""Virtual SMM population: IMWG 2020 risk-group shares, risk scores, filters, seeds."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import fsolve
from scipy.stats import norm

from pkpd import population as P


def _shares(p: float, rho: float) -> tuple[float, float, float]:
    """Share with 0 / 1 / ≥2 factors for three equicorrelated latent Gaussians (quadrature)."""
    f = np.linspace(-8, 8, 4001)
    w = norm.pdf(f)
    w /= w.sum()
    q = 1 - norm.cdf((norm.ppf(1 - p) - np.sqrt(rho) * f) / np.sqrt(1 - rho))
    p0, p1 = np.sum(w * (1 - q) ** 3), np.sum(w * 3 * q * (1 - q) ** 2)
    return p0, p1, 1 - p0 - p1


def test_copula_constants_solve_the_published_shares():
    p, rho = fsolve(lambda v: np.subtract(_shares(*v)[:2], [0.38, 0.33]), [0.3, 0.3])
    assert p == pytest.approx(P._PREVALENCE, abs=5e-4)
    assert rho == pytest.approx(P._RHO, abs=5e-4)
    np.testing.assert_allclose(_shares(P._PREVALENCE, P._RHO), [0.38, 0.33, 0.29], atol=1e-3)


def test_simulated_shares_match_imwg_2020():
    pop = P.smm_population(40_000, seed=11)
    shares = pop["RISK"].value_counts(normalize=True)
    # Monte Carlo SE of a share ≈ sqrt(0.25/40000) = 0.0025: 1.5 points is 6 SE
    for group, target in P.SHARES_IMWG_2020.items():
        assert shares[group] == pytest.approx(target, abs=0.015)
    for col, cut in (("MSPIKE0", 2.0), ("FLCR", 20.0), ("BMPC0", 20.0)):
        assert (pop[col] > cut).mean() == pytest.approx(P._PREVALENCE, abs=0.015)
    assert pop["BMPC0"].between(10, 59).all()
    assert (pop["SFLC0"] > 0).all() and pop["AGE"].between(35, 90).all()


def test_risk_filter_seed_and_columns():
    a = P.smm_population(500, risk="intermediate,high", seed=3)
    b = P.smm_population(500, risk=["intermediate", "high"], seed=3)
    assert a.equals(b)
    assert set(a["RISK"]) == {"intermediate", "high"} and a["ID"].tolist() == list(range(1, 501))
    assert list(a.columns) == ["ID", "AGE", "SEX", "WT", "MSPIKE0", "FLCR", "SFLC0", "BMPC0",
                               "HRFISH", "MAYO_FACTORS", "RISK", "IMWG_SCORE"]
    assert not P.smm_population(500, seed=4).equals(P.smm_population(500, seed=3))


@pytest.mark.parametrize("flcr, m, bmpc, fish, expected", [
    (5, 1.0, 12, 0, 0),       # all lowest bands
    (15, 2.0, 18, 0, 2 + 3 + 2),
    (30, 3.5, 25, 1, 3 + 4 + 3 + 2),
    (60, 1.2, 45, 0, 5 + 0 + 6),
    (40, 1.5, 40, 1, 3 + 0 + 5 + 2),  # band edges: 40 → 3, 1.5 → 0, 40 % → 5
])
def test_imwg_score_table(flcr, m, bmpc, fish, expected):
    assert P.imwg_score(flcr, m, bmpc, fish) == expected


def test_mayo_factors_and_groups():
    f = P.mayo_factors([1.0, 2.5, 2.5, 3.0], [10, 10, 25, 30], [15, 15, 15, 30])
    assert f.tolist() == [0, 1, 2, 3]
    assert P.risk_group(f).tolist() == ["low", "intermediate", "high", "high"]


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 0}, "n must be a positive integer, got 0"),
    ({"n": -5}, "n must be a positive integer, got -5"),
    ({"n": 10, "risk": "medium"}, "unknown risk group 'medium' (expected low, intermediate, "
                                  "high)"),
])
def test_bad_requests(kwargs, message):
    with pytest.raises(P.PopulationError) as err:
        P.smm_population(**kwargs)
    assert str(err.value) == message
