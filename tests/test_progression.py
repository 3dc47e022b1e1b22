"""SMM progression hazards: calibration to IMWG 2020 untreated 2-year rates."""

from __future__ import annotations

import numpy as np
import pytest

from pkpd import load_model
from pkpd.population import PROGRESSION_2Y_IMWG_2020
from pkpd.simulation import simulate_regimen

T2Y = 2 * 365 * 24.0


def test_lambda_values_are_the_closed_form_calibration():
    m = load_model("smm_progression")
    kg, gamma = m.theta["KG"], m.theta["GAMMA_B"]
    integral = np.expm1(gamma * kg * T2Y) / (gamma * kg)  # ∫ exp(γ·KG·t) dt over 2 years
    for group, name in (("low", "LAMBDA_LOW"), ("intermediate", "LAMBDA_INT"),
                        ("high", "LAMBDA_HIGH")):
        expected = -np.log1p(-PROGRESSION_2Y_IMWG_2020[group]) / integral
        assert m.theta[name] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("factors, group", [(0, "low"), (1, "intermediate"), (2, "high"),
                                            (3, "high")])
def test_untreated_two_year_progression(factors, group):
    m = load_model("smm_progression")
    t = np.arange(0.0, T2Y + 1, 24 * 28.0)
    p = simulate_regimen(m, "none", t, covariates={"MAYO_FACTORS": factors})["P_PROG"][0]
    assert p[0] == 0.0
    assert p[-1] == pytest.approx(PROGRESSION_2Y_IMWG_2020[group], abs=0.002)
    assert np.all(np.diff(p) > 0)


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
