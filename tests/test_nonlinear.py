"""Compiled Dormand–Prince path for nonlinear models (PK in closed form) against the scipy
reference; the linear part and segment-wise simulation (Course)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pkpd.model import load_model, parse_model
from pkpd.simulation import simulate, simulate_regimen
from pkpd.solvers.compiled import Unsupported

MM = """
[model]
name = "mm_1cmt"
[parameters]
VMAX = { value = 10.0, unit = "mg/h", iiv_cv = 30 }
KM   = { value = 2.0, unit = "mg/L" }
V    = { value = 20.0, unit = "L", iiv_cv = 20 }
KA   = { value = 1.2, unit = "1/h" }
[compartments]
DEPOT = { cmt = 1 }
CENTRAL = { cmt = 2 }
[odes]
DEPOT = "-KA*DEPOT"
CENTRAL = "KA*DEPOT - VMAX*(CENTRAL/V)/(KM + CENTRAL/V)"
[outputs]
CP = { expr = "CENTRAL/V", unit = "mg/L" }
"""


def test_xpo1_regimens_match_reference():
    m = load_model("selinexor_xpo1")
    assert m.linear is None
    t = np.arange(0.0, 24 * 14 + 1, 2.0)
    for regimen in ("40 mg QW", "80 mg BIW"):
        fast = simulate_regimen(m, regimen, t, method="rk")
        ref = simulate_regimen(m, regimen, t, method="ode")
        for k in ("CP", "XPO1_INH"):
            # rtol 1e-5 per step; accumulated error over 14 days stays far below the 1 % goal
            assert np.max(np.abs(fast[k] - ref[k])) / np.max(np.abs(ref[k])) < 2e-5


def test_population_with_iiv_matches_reference_per_subject():
    m = parse_model(MM, "mm.toml")
    t = np.arange(0.0, 72.1, 0.5)
    fast = simulate_regimen(m, "100 mg Q12H for 4 doses", t, n=6, seed=3, method="rk")["CP"]
    ref = simulate_regimen(m, "100 mg Q12H for 4 doses", t, n=6, seed=3, method="ode")["CP"]
    np.testing.assert_allclose(fast, ref, rtol=1e-4, atol=1e-6 * ref.max())


def test_records_with_infusion_lag_reset_and_same_time_observations():
    m = parse_model(MM + '\n[dosing]\nALAG1 = "0.5"\n', "mm.toml")
    df = pd.DataFrame({
        "ID":   [1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2],
        "TIME": [0, 1, 3, 3, 3, 8, 12, 0, 2, 2, 10],
        "EVID": [1, 0, 0, 1, 0, 3, 0, 1, 0, 0, 0],
        "AMT":  [50, 0, 0, 40, 0, 0, 0, 80, 0, 0, 0],
        "CMT":  [1, 2, 2, 2, 2, 0, 2, 2, 2, 2, 2],
        "RATE": [0, 0, 0, 20, 0, 0, 0, 0, 0, 0, 0],
    })
    fast = simulate(m, df, method="rk")["CP"].to_numpy()
    ref = simulate(m, df, method="ode")["CP"].to_numpy()
    np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-9)
    # observation before the infusion record at t=3 equals the one after it (infusion starts)
    assert fast[2] == pytest.approx(fast[4], rel=1e-12)


def test_steady_state_falls_back_to_reference():
    m = parse_model(MM, "mm.toml")
    df = pd.DataFrame({"ID": [1, 1], "TIME": [0, 6], "EVID": [1, 0], "AMT": [50, 0],
                       "CMT": [1, 2], "II": [12, 0], "SS": [1, 0]})
    with pytest.raises(Unsupported):
        simulate(m, df, method="rk")
    auto = simulate(m, df)["CP"].to_numpy()
    ref = simulate(m, df, method="ode")["CP"].to_numpy()
    np.testing.assert_allclose(auto, ref, rtol=1e-12)


@pytest.mark.parametrize("name", ["selinexor_pk", "selinexor_xpo1"])
def test_simulation_in_segments_continues_exactly(name):
    """Two weeks at once == week 1, then week 2 started from week 1's final amounts."""
    from pkpd.simulation import individual_parameters, simulate_records

    m = load_model(name)
    n = 3
    ind = individual_parameters(m, {"WT": np.full(n, 70.0), "SEX": np.zeros(n)},
                                eta={"CL": np.array([0.0, 0.2, -0.2])}).params

    def records(times):
        df = pd.DataFrame([(s, t) for s in range(n) for t in times], columns=["S", "TIME"])
        df = df.assign(EVID=1, AMT=60.0, CMT=1, RATE=0.0, II=0.0, ADDL=0.0, SS=0.0, WT=70.0,
                       SEX=0.0)
        return df, df["S"].to_numpy()

    grid = np.arange(0, 336.1, 6.0)
    whole, _, _ = simulate_records(m, *records([0.0, 168.0]), n, grid=grid, individual=ind,
                                   all_states=True)
    first, _, _ = simulate_records(m, *records([0.0]), n, grid=grid[grid <= 168],
                                   individual=ind, all_states=True)
    second, _, _ = simulate_records(m, *records([168.0]), n, grid=grid[grid >= 168],
                                    individual=ind, all_states=True, x_start=first[:, -1, :].T)
    # exact for the closed form; within the solver tolerance for Dormand–Prince
    tol = 1e-12 if m.linear is not None else 1e-6
    assert np.max(np.abs(whole[:, grid >= 168, :] - second)) <= tol * np.max(np.abs(whole))


def test_linear_part_is_the_dosed_lti_subsystem():
    smm = load_model("selinexor_smm")
    assert [smm.states[i] for i in smm.linear_part[0]] == ["DEPOT", "CENTRAL", "PERIPHERAL"]
    lin = smm.linear_part[1]
    assert lin.A.shape == (3, 3) and all(e == 0 for e in lin.c)
    # depot → central is nonlinear-free but central has Michaelis–Menten elimination: only
    # the depot is linear and closed, and it is the dose compartment
    mm = parse_model(MM)
    assert [mm.states[i] for i in mm.linear_part[0]] == ["DEPOT"]
    assert load_model("pk_2cmt_oral").linear_part is None  # fully linear: no "part"


def test_closed_form_part_equals_integrating_everything():
    """The compiled solver with the PK in closed form and with every state integrated give
    the same amounts (both at rtol 1e-8)."""
    from pkpd.simulation import Course, individual_parameters, sample_etas

    m = load_model("selinexor_smm")
    n = 5
    covs = {c: np.full(n, v.default) for c, v in m.covariates.items()}
    ind = individual_parameters(m, covs, eta=sample_etas(m, n, np.random.default_rng(3)))
    runs = []
    for exact in (True, False):
        course = Course(m, ind.params, covs, rtol=1e-8, atol=1e-11)
        if not exact:
            course.exact = None
        runs.append(np.concatenate([
            course.run(w * 168.0, w * 168.0 + np.arange(0.0, 169.0, 6.0), np.arange(n),
                       np.full(n, w * 168.0), np.full(n, 80.0)) for w in range(3)], axis=1))
    scale = np.abs(runs[1]).max(axis=(1, 2), keepdims=True) + 1e-300
    assert np.max(np.abs(runs[0] - runs[1]) / scale) < 1e-6


def test_course_in_weekly_segments_equals_one_simulation():
    """Week-by-week segments (the trial's dose decisions) reproduce one continuous run."""
    from pkpd.simulation import Course, individual_parameters

    m = load_model("selinexor_smm")
    n = 3
    covs = {c: np.full(n, v.default) for c, v in m.covariates.items()}
    covs["PLT0"] = np.array([150.0, 250.0, 300.0])
    course = Course(m, individual_parameters(m, covs).params, covs, rtol=1e-7, atol=1e-10)
    weeks = [course.run(w * 168.0, w * 168.0 + np.arange(0.0, 169.0, 24.0), np.arange(n),
                        np.full(n, w * 168.0), np.full(n, 100.0)) for w in range(4)]
    t = np.arange(0.0, 4 * 168.0 + 1, 24.0)
    one = simulate_regimen(m, "100 mg QW", t, n=n, iiv=False, covariates=covs, method="rk")
    plt = np.concatenate([w[m.states.index("CIRC"), 1:] for w in weeks], axis=0).T
    np.testing.assert_allclose(plt, one["PLT"][:, 1:], rtol=1e-5)
    mprot = np.concatenate([w[m.states.index("MPROT"), 1:] for w in weeks], axis=0).T
    np.testing.assert_allclose(mprot, one["MSPIKE"][:, 1:], rtol=1e-6)
