"""SMM M-spike model (models/smm_mspike.toml): natural growth, baselines, the IgG elimination
limit, dose effect, solver agreement and the sFLC quasi-steady state."""

from __future__ import annotations

import numpy as np
import pytest

from pkpd.model import load_model
from pkpd.simulation import simulate_regimen

WEEK = 168.0
YEAR = 52 * WEEK  # the regimen grid is weekly; "1 year" here is 52 weeks = 364 days
KEL_IGG = np.log(2) / (21 * 24.0)  # IgG t½ 21 days, per hour


@pytest.fixture(scope="module")
def model():
    return load_model("smm_mspike")


@pytest.fixture(scope="module")
def weeks_2y():
    return np.arange(0.0, 2 * YEAR + 1, WEEK)


@pytest.fixture(scope="module")
def untreated(model, weeks_2y):
    return simulate_regimen(model, "none", weeks_2y, method="rk")


@pytest.fixture(scope="module")
def one_year(model, untreated):
    t = np.arange(0.0, YEAR + 1, WEEK)
    out = {reg: simulate_regimen(model, reg, t, method="rk") for reg in ("40 mg QW", "100 mg QW")}
    out["none"] = {k: v[:, : len(t)] for k, v in untreated.items()}
    return out


def test_loads_nonlinear_with_outputs(model):
    assert model.linear is None
    assert {"CP", "XPO1_INH", "MSPIKE", "SFLC", "BMPC"} <= set(model.outputs)
    assert model.covariates["MSPIKE0"].default == 2.0
    assert model.covariates["SFLC0"].default == 10.0
    assert model.covariates["BMPC0"].default == 20.0
    # own states use CMT >= 6 (selinexor_xpo1 uses 1-5); doses still go to the PK depot
    assert model.default_dose_cmt == 1
    for p in ("KG", "KKILL", "FRES"):
        par = model.parameters[p]
        assert par.assumption and par.lower <= par.value <= par.upper


def test_untreated_growth_is_exponential(model, untreated, weeks_2y):
    kg = model.parameters["KG"].value
    assert kg * 24 * 365.25 == pytest.approx(0.07, rel=1e-3)  # typical: doubling in 10 years
    growth = np.exp(kg * weeks_2y)
    np.testing.assert_allclose(untreated["MSPIKE"][0], 2.0 * growth, rtol=1e-5)
    # sFLC (t½ 3 h) is the stiff state: the explicit solver meets rtol 1e-5 per step, ~4e-5 here
    np.testing.assert_allclose(untreated["SFLC"][0], 10.0 * growth, rtol=1e-4)
    np.testing.assert_allclose(untreated["TUMOR"][0], growth, rtol=1e-6)
    bmpc = 100 * growth / (growth + 80 / 20)
    np.testing.assert_allclose(untreated["BMPC"][0], bmpc, rtol=1e-6)
    # real numbers: +7.2 % at 52 weeks, +14.97 % at 104 weeks (typical patient)
    assert untreated["MSPIKE"][0][52] == pytest.approx(2.0 * 1.072248, rel=1e-5)
    assert untreated["MSPIKE"][0][104] == pytest.approx(2.0 * 1.149715, rel=1e-5)
    assert np.all(untreated["XPO1_INH"] == 0) and np.all(untreated["CP"] == 0)


def test_baselines_at_time_zero_and_mspike0_scales(model):
    t = np.arange(0.0, 4 * WEEK + 1, 24.0)
    cov = {"MSPIKE0": [2.0, 4.0], "SFLC0": [10.0, 25.0], "BMPC0": [20.0, 45.0]}
    r = simulate_regimen(model, "100 mg QW", t, n=2, iiv=False, covariates=cov, method="rk")
    for k in ("MSPIKE", "SFLC", "BMPC"):
        assert r[k][:, 0] == pytest.approx(cov[k + "0"], rel=1e-12)
    # M-spike is linear in its baseline: doubling MSPIKE0 doubles it at every time
    np.testing.assert_allclose(r["MSPIKE"][1], 2.0 * r["MSPIKE"][0], rtol=1e-6)
    np.testing.assert_allclose(r["SFLC"][1], 2.5 * r["SFLC"][0], rtol=1e-6)
    assert r["MSPIKE"][0][-1] < 2.0  # treatment has started to lower it


def test_igg_elimination_limits_mspike_decline(model):
    """Production ≥ 0, so dM/dt ≥ −KEL·M: never faster than IgG elimination (t½ 21 d)."""
    t = np.arange(0.0, 12 * WEEK + 1, 24.0)
    r = simulate_regimen(model, "100 mg QW", t, method="rk",
                         params={"KKILL": 10.0, "FRES": 1e-6})  # 40 000 × typical kill
    m = r["MSPIKE"][0]
    limit = 2.0 * np.exp(-KEL_IGG * t)
    assert np.all(m >= limit * (1 - 1e-6))
    # also between consecutive days, not only from baseline
    assert np.all(m[1:] / m[:-1] >= np.exp(-KEL_IGG * 24.0) * (1 - 1e-6))
    # the limit is (almost) reached: the kill empties the sensitive clone within a day
    assert m[-1] / limit[-1] == pytest.approx(1.0, abs=0.01)
    assert r["TUMOR"][0][7] < 1e-4


def test_treatment_lowers_mspike_with_dose(one_year):
    m1 = {reg: r["MSPIKE"][0][-1] for reg, r in one_year.items()}
    assert m1["none"] == pytest.approx(2.0 * 1.072248, rel=1e-5)
    assert m1["100 mg QW"] < m1["none"]
    assert m1["100 mg QW"] <= m1["40 mg QW"] < m1["none"]
    # calibration as shipped (typical patient, 52 weeks): 40 mg QW −51 %, 100 mg QW −54 %
    assert m1["40 mg QW"] / 2.0 - 1 == pytest.approx(-0.506, abs=0.01)
    assert m1["100 mg QW"] / 2.0 - 1 == pytest.approx(-0.539, abs=0.01)
    # marrow plasma cells and sFLC fall with the burden
    assert one_year["100 mg QW"]["BMPC"][0][-1] < 20.0 < one_year["none"]["BMPC"][0][-1]
    assert one_year["100 mg QW"]["SFLC"][0][-1] < 10.0


def test_rk_matches_ode_reference_12_weeks(model):
    t = np.arange(0.0, 12 * WEEK + 1, 24.0)
    fast = simulate_regimen(model, "80 mg BIW for 12 weeks", t, method="rk")
    ref = simulate_regimen(model, "80 mg BIW for 12 weeks", t, method="ode")
    for k in ("XPO1_INH", "TUMOR", "MSPIKE", "SFLC", "BMPC"):
        err = np.max(np.abs(fast[k] - ref[k]) / np.abs(ref[k]).max())
        assert err <= 0.01, k
        assert err < 1e-4, k  # the actual agreement is much tighter than the 1 % goal


def test_sflc_tracks_tumour_within_hours(model):
    """sFLC t½ 3 h: after a fast burden drop sFLC follows within hours, M-spike takes weeks."""
    t = np.arange(0.0, 72.0 + 1, 1.0)
    r = simulate_regimen(model, "100 mg QW", t, method="rk", params={"KKILL": 1.0})
    tumour, sflc, m = r["TUMOR"][0], r["SFLC"][0], r["MSPIKE"][0]
    assert tumour[-1] < 0.2  # burden fell > 80 % in 3 days
    # the sensitive clone is gone within ~1 day; sFLC then relaxes onto SFLC0 · TUMOR with
    # t½ 3 h: 6 % above it at 24 h, < 1 % from 36 h (four half-lives later)
    assert sflc[24] / (10.0 * tumour[24]) < 1.1
    late = t >= 36
    np.testing.assert_allclose(sflc[late], 10.0 * tumour[late], rtol=0.01)
    assert m[-1] > 2.0 * np.exp(-KEL_IGG * 72) * (1 - 1e-6)  # M-spike ≥ IgG limit (−9 %)
    assert m[-1] > 1.8
    # untreated-style tracking under typical kill: sFLC/tumour within 0.1 % of SFLC0 daily
    t2 = np.arange(0.0, 8 * WEEK + 1, 24.0)
    r2 = simulate_regimen(model, "100 mg QW", t2, method="rk")
    np.testing.assert_allclose(r2["SFLC"][0], 10.0 * r2["TUMOR"][0], rtol=1e-3)
