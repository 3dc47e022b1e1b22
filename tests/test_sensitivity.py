"""Forward sensitivities of nonlinear models (the nonlinear likelihood): predictions equal the
simulator, Jacobians equal finite differences, the PyTensor gradient equals the Jacobian."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytensor
import pytensor.tensor as pt
import pytest

from pkpd import load_model, simulate
from pkpd.likelihood import LinearPredictor
from pkpd.sensitivity import NonlinearPredictor, SensitivityError, predictor


@pytest.fixture(scope="module")
def xpo1_data():
    rows = []
    for i, dose in ((1, 40.0), (2, 80.0), (3, 100.0)):
        rows += [dict(ID=i, TIME=t, EVID=1, AMT=dose, CMT=1, WT=60.0 + 10 * i)
                 for t in (0.0, 168.0)]
        rows += [dict(ID=i, TIME=t, EVID=0, AMT=0.0, CMT=2, WT=60.0 + 10 * i)
                 for t in (1.0, 4.0, 24.0, 72.0, 170.0, 200.0, 300.0)]
    return pd.DataFrame(rows).sort_values(["ID", "TIME", "EVID"], ascending=[True, True, False],
                                          kind="stable").reset_index(drop=True)


@pytest.fixture(scope="module")
def xpo1_pred(xpo1_data):
    return NonlinearPredictor(load_model("selinexor_xpo1"), xpo1_data)


def test_predictions_equal_the_simulator(xpo1_data, xpo1_pred):
    m = xpo1_pred.model
    theta = xpo1_pred.individual_typical()
    vals, _ = xpo1_pred.evaluate(theta, ["CP", "XPO1_INH"])
    ref = simulate(m, xpo1_data, method="ode")[xpo1_data["EVID"] == 0]
    np.testing.assert_allclose(vals["CP"], ref["CP"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(vals["XPO1_INH"], ref["XPO1_INH"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["CL", "V2", "KA", "KINACT", "KI", "KDEG", "KOFF"])
def test_jacobian_equals_central_differences(xpo1_pred, name):
    names = list(xpo1_pred.model.parameters)
    theta = xpo1_pred.individual_typical()
    theta["KINACT"] = theta["KINACT"] * np.array([0.8, 1.0, 1.3])
    _, jac = xpo1_pred.evaluate(theta, ["XPO1_INH"])
    rel = 1e-5
    up, down = dict(theta), dict(theta)
    up[name] = theta[name] * (1 + rel)
    down[name] = theta[name] * (1 - rel)
    fd = (xpo1_pred.evaluate(up, ["XPO1_INH"])[0]["XPO1_INH"]
          - xpo1_pred.evaluate(down, ["XPO1_INH"])[0]["XPO1_INH"]) / (
        2 * rel * theta[name][xpo1_pred.out_subject])
    an = jac["XPO1_INH"][:, names.index(name)]
    assert np.abs(an).max() > 0
    # the integration tolerance (rtol 1e-6) bounds the agreement
    assert np.max(np.abs(fd - an)) / np.abs(an).max() < 1e-4


def test_pytensor_gradient_sums_the_jacobian_per_subject(xpo1_pred):
    names = list(xpo1_pred.model.parameters)
    theta = xpo1_pred.individual_typical()
    P = {k: pt.dvector(k) for k in names}
    y = xpo1_pred.predict(P, ["XPO1_INH"])["XPO1_INH"]
    cost = (y ** 2).sum()
    f = pytensor.function([P[k] for k in names], [cost, pytensor.grad(cost, P["KDEG"])],
                          on_unused_input="ignore")
    c, g = f(*[theta[k] for k in names])
    vals, jac = xpo1_pred.evaluate(theta, ["XPO1_INH"])
    expected = np.zeros(3)
    np.add.at(expected, xpo1_pred.out_subject,
              2 * vals["XPO1_INH"] * jac["XPO1_INH"][:, names.index("KDEG")])
    assert c == pytest.approx((vals["XPO1_INH"] ** 2).sum(), rel=1e-12)
    np.testing.assert_allclose(g, expected, rtol=1e-10)


def test_predictor_chooses_closed_form_for_linear_models(xpo1_data):
    assert isinstance(predictor(load_model("pk_2cmt_oral"), xpo1_data.drop(columns="WT")),
                      LinearPredictor)
    assert isinstance(predictor(load_model("selinexor_xpo1"), xpo1_data), NonlinearPredictor)


def test_steady_state_records_are_refused(xpo1_data):
    ss = xpo1_data.assign(SS=0.0, II=0.0)
    ss.loc[0, ["SS", "II"]] = [1.0, 168.0]
    with pytest.raises(SensitivityError, match="steady-state"):
        NonlinearPredictor(load_model("selinexor_xpo1"), ss)


def test_predictor_survives_pickling(xpo1_pred):
    """PyMC's multiprocess sampler pickles the model graph, Op and predictor included."""
    import pickle

    theta = xpo1_pred.individual_typical()
    copy = pickle.loads(pickle.dumps(xpo1_pred))
    a = xpo1_pred.evaluate(theta, ["XPO1_INH"])[0]["XPO1_INH"]
    b = copy.evaluate(theta, ["XPO1_INH"])[0]["XPO1_INH"]
    np.testing.assert_array_equal(a, b)
