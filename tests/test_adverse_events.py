"""Selinexor adverse events (models/selinexor_ae.toml): cumulative hazards linear in exposure.

Calibration targets are for the typical patient (70 kg man, no IIV) after 6 months
(26 weeks). Anchors: pooled label any-grade rates at 80 mg BIW, STORM grade 3-4
hyponatraemia at 80 mg BIW, BOSTON grade 3-4 fatigue at 100 mg QW; nausea and decreased
appetite grade >= 3 at 80 mg BIW are assumptions (see the model file header).
"""

from __future__ import annotations

import numpy as np
import pytest

from pkpd.model import load_model
from pkpd.simulation import simulate_regimen

AES = ("NAUSEA", "FATIGUE", "APPETITE", "HYPONATREMIA")
ENDPOINTS = tuple(f"{ae}{g}" for ae in AES for g in ("", "_G3"))
SIX_MONTHS = 26 * 168.0  # h

# 6-month probabilities (%), typical patient
TARGETS_80_BIW = {
    "NAUSEA": 75.0,  # EU SmPC pooled Sd, n = 214
    "FATIGUE": 66.0,  # same
    "APPETITE": 56.0,  # same
    "HYPONATREMIA": 40.0,  # same
    "NAUSEA_G3": 10.0,  # assumption
    "APPETITE_G3": 5.0,  # assumption
    "HYPONATREMIA_G3": 22.0,  # STORM grade 3-4
}
TARGETS_100_QW = {"FATIGUE_G3": 13.0}  # BOSTON grade 3-4


@pytest.fixture(scope="module")
def model():
    return load_model("selinexor_ae")


@pytest.fixture(scope="module")
def six_months(model):
    """6-month probabilities (%) of the typical patient per regimen."""
    out = {}
    for reg in ("40 mg QW", "60 mg QW", "100 mg QW", "80 mg BIW"):
        sim = simulate_regimen(model, reg, np.array([0.0, SIX_MONTHS]))
        out[reg] = {e: 100 * sim[f"P_{e}"][0, -1] for e in ENDPOINTS}
    return out


def test_loads_linear_closed_form(model):
    lin = model.linear
    assert lin is not None and lin.closed_form
    assert set(model.outputs) == {"CP"} | {f"P_{e}" for e in ENDPOINTS}
    cmts = {c.name: c.cmt for c in model.compartments}
    assert all(cmts[f"H_{e}"] >= 4 for e in ENDPOINTS)


def test_probability_bounds_and_monotone(model):
    t = np.arange(0.0, 4 * 168.0 + 1e-9, 2.0)
    sim = simulate_regimen(model, "80 mg BIW", t)
    for e in ENDPOINTS:
        p = sim[f"P_{e}"][0]
        assert p[0] == 0.0
        assert np.all((p >= 0) & (p <= 1))
        assert np.all(np.diff(p) >= -1e-15), e


def test_no_drug_gives_background_only(model):
    t = np.array([0.0, 24.0, 1000.0, SIX_MONTHS])
    sim = simulate_regimen(model, "none for 26 weeks", t)
    assert np.all(sim["CP"] == 0)
    for e in ENDPOINTS:
        base = model.parameters[f"BASE_{e}"].value
        np.testing.assert_allclose(sim[f"P_{e}"][0], 1 - np.exp(-base * t), rtol=1e-12,
                                   atol=1e-15)
        assert sim[f"P_{e}"][0, -1] < 0.05  # background is small


@pytest.mark.parametrize("endpoint", list(TARGETS_80_BIW))
def test_calibration_80mg_biw(six_months, endpoint):
    assert six_months["80 mg BIW"][endpoint] == pytest.approx(TARGETS_80_BIW[endpoint], abs=2.0)


def test_calibration_boston_fatigue_g3(six_months):
    assert six_months["100 mg QW"]["FATIGUE_G3"] == pytest.approx(
        TARGETS_100_QW["FATIGUE_G3"], abs=2.0)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_lower_dose_intensity_fewer_events(six_months, endpoint):
    p = {reg: v[endpoint] for reg, v in six_months.items()}
    assert p["40 mg QW"] < p["60 mg QW"] < p["100 mg QW"] < p["80 mg BIW"]


@pytest.mark.parametrize("ae", AES)
def test_grade3_not_above_any_grade(model, six_months, ae):
    for v in six_months.values():
        assert v[f"{ae}_G3"] <= v[ae]
    # per unit exposure and in the background, so at every time and dose
    par = model.parameters
    assert par[f"SLOPE_{ae}_G3"].value <= par[f"SLOPE_{ae}"].value
    assert par[f"BASE_{ae}_G3"].value <= par[f"BASE_{ae}"].value


def test_drug_hazard_doubles_with_dose(model):
    """H = BASE·t + SLOPE·AUC(0-t) and AUC is dose-proportional (linear PK)."""
    t = np.array([0.0, 30.0, 200.0, SIX_MONTHS])
    h = {}
    for dose in (40, 80):
        sim = simulate_regimen(model, f"{dose} mg BIW", t)
        h[dose] = {e: -np.log1p(-sim[f"P_{e}"][0]) for e in ENDPOINTS}
    for e in ENDPOINTS:
        base = model.parameters[f"BASE_{e}"].value * t
        drug40, drug80 = h[40][e] - base, h[80][e] - base
        assert np.all(drug40[1:] > 0)
        np.testing.assert_allclose(drug80[1:], 2 * drug40[1:], rtol=1e-9)


def test_drug_hazard_is_slope_times_auc(model):
    """Closed-form check: after one 80 mg dose, H(∞) − BASE·t = SLOPE·dose/CL (ng·h/mL)."""
    t = np.array([0.0, 400.0])
    sim = simulate_regimen(model, "80 mg QD for 1 doses", t)
    auc = 80.0 / model.parameters["CL"].value * 1000.0  # ng·h/mL, exact at t = ∞
    for e in ENDPOINTS:
        drug = -np.log1p(-sim[f"P_{e}"][0, -1]) - model.parameters[f"BASE_{e}"].value * t[-1]
        assert drug == pytest.approx(model.parameters[f"SLOPE_{e}"].value * auc, rel=1e-9)
