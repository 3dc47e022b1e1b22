"""SMM progression hazards: calibration to IMWG 2020 untreated 2-year rates."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import brentq

from pkpd import load_model
from pkpd.population import PROGRESSION_2Y_IMWG_2020
from pkpd.simulation import simulate_regimen

T2Y = 2 * 365 * 24.0


def _expected_lambda(m, p: float) -> float:
    """LAMBDA solving E_KG[1 − exp(−LAMBDA·I(KG))] = p, KG log-normal (Gauss–Hermite)."""
    kg, gamma = m.theta["KG"], m.theta["GAMMA_B"]
    x, w = np.polynomial.hermite_e.hermegauss(40)
    kgs = kg * np.exp(np.sqrt(m.parameters["KG"].omega2) * x)
    with np.errstate(over="ignore"):  # the outermost nodes (weights < 1e-30) overflow to inf
        integral = np.expm1(gamma * kgs * T2Y) / (gamma * kgs)  # ∫ exp(γ·KG·t) dt, 2 years
    return brentq(lambda lam: (w * -np.expm1(-lam * integral)).sum() / w.sum() - p,
                  1e-9, 1e-3, xtol=1e-16)


def test_lambda_values_are_the_population_calibration():
    m = load_model("smm_progression")
    for group, name in (("low", "LAMBDA_LOW"), ("intermediate", "LAMBDA_INT"),
                        ("high", "LAMBDA_HIGH")):
        expected = _expected_lambda(m, PROGRESSION_2Y_IMWG_2020[group])
        assert m.theta[name] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("factors, group", [(0, "low"), (1, "intermediate"), (2, "high"),
                                            (3, "high")])
def test_untreated_two_year_progression(factors, group):
    """Mean individual 2-year probability over 4,000 simulated patients (IIV on KG) equals
    the IMWG 2020 rate; the Monte Carlo SE of that mean is < 0.1 points (P varies by < 3
    points between patients), so ± 0.4 points is > 4 SE."""
    m = load_model("smm_progression")
    t = np.arange(0.0, T2Y + 1, 24 * 28.0)
    p = simulate_regimen(m, "none", t, n=4000, seed=1,
                         covariates={"MAYO_FACTORS": factors})["P_PROG"]
    assert np.all(p[:, 0] == 0.0) and np.all(np.diff(p, axis=1) > 0)
    assert p[:, -1].mean() == pytest.approx(PROGRESSION_2Y_IMWG_2020[group], abs=0.004)
    assert p[:, -1].std() / np.sqrt(len(p)) < 0.001


def test_treatment_lowers_progression_through_burden():
    m = load_model("smm_progression")
    t = np.arange(0.0, 24 * 7 * 26 + 1, 24 * 7.0)
    untreated = simulate_regimen(m, "none", t, covariates={"MAYO_FACTORS": 2})
    treated = simulate_regimen(m, "100 mg QW", t, covariates={"MAYO_FACTORS": 2})
    assert treated["P_PROG"][0, -1] < untreated["P_PROG"][0, -1]
    # the hazard ratio at 26 weeks equals the burden ratio (GAMMA_B = 1)
    burden = simulate_regimen(m, "100 mg QW", t, covariates={"MAYO_FACTORS": 2})["TUMOR"][0]
    h_t = -np.log1p(-treated["P_PROG"][0])
    h_u = -np.log1p(-untreated["P_PROG"][0])
    ratio = np.diff(h_t)[-1] / np.diff(h_u)[-1]
    growth = np.exp(m.theta["KG"] * t[-2:]).mean()
    assert ratio == pytest.approx(burden[-2:].mean() / growth, rel=0.02)
