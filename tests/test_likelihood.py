"""The closed-form likelihood graph (pkpd.likelihood) predicts what the simulator and the scipy
reference predict, under NONMEM's event semantics, and is differentiable."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytensor
import pytensor.tensor as pt
import pytest

from pkpd import load_model, parse_model, read_nonmem, simulate
from pkpd.likelihood import LikelihoodError, LinearPredictor
from pkpd.model import MODELS_DIR

# 2-cmt oral with a lag time and bioavailability that are estimated parameters (so the
# graph, not the data, moves the dose times and amounts)
LAGGED = (MODELS_DIR / "pk_2cmt_oral.toml").read_text().replace(
    'name = "pk_2cmt_oral"', 'name = "pk_2cmt_oral_lag"'
).replace(
    "[compartments]",
    'TLAG = { value = 0.4, unit = "h", iiv_cv = 20 }\n'
    'BIO = { value = 0.7, unit = "-" }\n\n[compartments]',
) + '\n[dosing]\nALAG1 = "TLAG"\nF1 = "BIO"\n'


def _multi_dose() -> pd.DataFrame:
    """Three subjects: oral q12h with ADDL, an IV infusion into CENTRAL, SS=1 and SS=2 doses,
    an EVID 4 reset with time restarting, observations at dose times (file order)."""
    rows = []

    def rec(i, t, evid=0, amt=0.0, cmt=2, rate=0.0, ii=0.0, addl=0, ss=0):
        rows.append(dict(ID=i, TIME=t, EVID=evid, AMT=amt, CMT=cmt, RATE=rate, II=ii,
                         ADDL=addl, SS=ss, MDV=int(evid != 0), DV=0.0))

    rec(1, 0, 1, 100, 1, ii=12, addl=5)
    for t in (0, 0.25, 0.5, 1, 2, 4, 12, 12.3, 24, 36.5, 60, 72, 80, 96):
        rec(1, t)
    rec(2, 0, 1, 50, 1, ss=1, ii=12)
    rec(2, 0)
    rec(2, 3, 1, 200, 2, rate=100)  # 2 h infusion into CENTRAL
    for t in (3, 4, 5, 6, 12):
        rec(2, t)
    rec(2, 12, 1, 80, 1, ss=2, ii=12, addl=2)
    for t in (12, 13, 20, 30, 50):
        rec(2, t)
    rec(3, 0, 1, 120, 2, rate=20, ss=1, ii=8)  # SS infusion of 6 h every 8 h
    for t in (0, 1, 5, 7, 9):
        rec(3, t)
    rec(3, 0, 4, 100, 1)  # reset and dose; time restarts
    for t in (0.5, 1, 3, 10):
        rec(3, t)
    return pd.DataFrame(rows)


def test_nmtests_conformance_all_29_scenarios(nmtests_dir):
    """Every scenario of NONMEM's dosing suite (lag, F, modeled rate/duration, SS, ADDL,
    resets) equals the closed-form simulator to 1e-10 and NONMEM's own CP to 1e-4."""
    m = load_model("nmtests_1001")
    ds = read_nonmem(nmtests_dir / "1001.csv")
    lp = LinearPredictor(m, ds, rows=np.arange(len(ds)))
    cp = lp.compile()(lp.individual_typical())["CP"]
    sim = simulate(m, ds)["CP"].to_numpy()
    np.testing.assert_allclose(cp, sim, rtol=1e-10, atol=1e-9)
    nm = pd.read_csv(nmtests_dir / "1001-nm.csv")["CP"].to_numpy()
    evid = ds.data["EVID"].to_numpy()
    keep = (evid == 0) & (np.abs(nm) > 1e-6)
    assert np.max(np.abs(cp[keep] - nm[keep]) / np.abs(nm[keep])) < 1e-4


@pytest.mark.parametrize("model", ["pk_2cmt_oral", "lagged"])
def test_multi_dose_matches_simulator_and_ode_reference(model):
    m = parse_model(LAGGED, "lagged.toml") if model == "lagged" else load_model(model)
    df = _multi_dose()
    lp = LinearPredictor(m, df)
    rng = np.random.default_rng(4)
    eta = {k: rng.normal(0, 0.3, lp.n_subjects) for k in m.parameters}
    ind = {k: v * np.exp(eta[k]) for k, v in lp.individual_typical().items()}
    cp = lp.compile()(ind)["CP"]
    obs = lp.rows
    sim = simulate(m, df, eta=eta)["CP"].to_numpy()[obs]
    ref = simulate(m, df, eta=eta, method="ode")["CP"].to_numpy()[obs]
    np.testing.assert_allclose(cp, sim, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(cp, ref, rtol=1e-6, atol=1e-9)
    assert np.all(cp[df["TIME"].to_numpy()[obs] > 0.5] > 0)


@pytest.mark.slow
def test_gradient_matches_finite_differences():
    """d(Σ log CP)/d(log θ) from the graph equals central finite differences (lag and F are
    parameters, so dose timing is differentiated too)."""
    m = parse_model(LAGGED, "lagged.toml")
    df = _multi_dose()
    lp = LinearPredictor(m, df)
    names = list(m.parameters)
    x = pt.vector("logtheta")
    tv = lp.individual_typical()
    params = {k: pt.as_tensor_variable(tv[k]) * pt.exp(x[i]) for i, k in enumerate(names)}
    cp = lp.predict(params)["CP"]
    t = df["TIME"].to_numpy()[lp.rows]
    f_expr = pt.log(cp[t > 0.5]).sum()  # away from the lagged dose instants
    f = pytensor.function([x], f_expr)
    g = pytensor.function([x], pytensor.grad(f_expr, x))
    x0 = np.array([0.1, -0.2, 0.05, 0.1, -0.1, 0.2, -0.3])
    h = 1e-5
    fd = np.array([(f(x0 + h * e) - f(x0 - h * e)) / (2 * h) for e in np.eye(len(x0))])
    np.testing.assert_allclose(g(x0), fd, rtol=1e-5, atol=1e-6)
    assert np.all(np.abs(fd) > 1e-3)  # every parameter matters here


def test_selinexor_covariates_in_the_graph():
    """Covariate model (WT, SEX) and the ng/mL output scale: typical values equal simulate."""
    m = load_model("selinexor_pk")
    df = pd.DataFrame({"ID": [1, 1, 1, 2, 2, 2], "TIME": [0, 2, 30] * 2,
                       "EVID": [1, 0, 0] * 2, "AMT": [80, 0, 0] * 2, "CMT": [1, 2, 2] * 2,
                       "II": [48, 0, 0] * 2, "ADDL": [3, 0, 0] * 2,
                       "WT": [50.0] * 3 + [95.0] * 3, "SEX": [1] * 3 + [0] * 3})
    lp = LinearPredictor(m, df)
    cp = lp.compile()(lp.individual_typical())["CP"]
    np.testing.assert_allclose(cp, simulate(m, df)["CP"].to_numpy()[lp.rows], rtol=1e-10)
    assert 100 < cp[0] < 2000  # ng/mL two hours after 80 mg


def test_nonlinear_model_is_refused():
    with pytest.raises(LikelihoodError, match="linear"):
        LinearPredictor(load_model("selinexor_xpo1"), _multi_dose())


def test_entrywise_covariants_equal_the_shared_kernel():
    """The likelihood's elementwise P_i[a, c] equals Sylvester's formula of the simulator."""
    from pkpd.likelihood import _covariant_entries
    from pkpd.solvers.linear import block_eigenvalues, covariants

    m = load_model("pk_3cmt_oral")
    import sympy as sp

    vals = {"CL": 5.0, "V2": 20.0, "Q3": 10.0, "V3": 40.0, "Q4": 2.0, "V4": 100.0, "KA": 1.0}
    A = np.array(m.linear.A.subs({sp.Symbol(k, real=True): v for k, v in vals.items()})
                 .tolist(), dtype=float)[None]
    lam = block_eigenvalues(A, m.linear.blocks)
    P = covariants(A, lam)[0]
    Al = [[A[0, i, j] for j in range(4)] for i in range(4)]
    for a in range(4):
        for c in range(4):
            got = _covariant_entries(Al, list(lam[0]), a, c)
            np.testing.assert_allclose(np.array(got, dtype=float), P[:, a, c], rtol=1e-10,
                                       atol=1e-14)
