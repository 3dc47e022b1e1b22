"""The closed-form kernels are written once against an array module: numpy and PyTensor
must give the same numbers (the likelihood will use the PyTensor build)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import expm

from pkpd.model import load_model
from pkpd.solvers.linear import block_eigenvalues, covariants, phi


def _A(model_name: str, values: dict[str, float]) -> tuple[np.ndarray, tuple]:
    m = load_model(model_name)
    lin = m.linear
    subs = {__import__("sympy").Symbol(k, real=True): v for k, v in values.items()}
    return np.array(lin.A.subs(subs).tolist(), dtype=float), lin.blocks


CASES = {
    "pk_1cmt_oral": {"CL": 3.0, "V": 40.0, "KA": 1.3},
    "pk_2cmt_iv": {"CL": 5.0, "V1": 20.0, "Q": 10.0, "V2": 60.0},
    "pk_2cmt_oral": {"CL": 16.0, "V2": 63.0, "Q": 11.0, "V3": 56.0, "KA": 1.0},
    "pk_3cmt_oral": {"CL": 5.0, "V2": 20.0, "Q3": 10.0, "V3": 40.0, "Q4": 2.0, "V4": 100.0,
                     "KA": 1.0},
}


@pytest.mark.parametrize("name", CASES)
def test_sylvester_formula_equals_expm(name):
    A, blocks = _A(name, CASES[name])
    lam = block_eigenvalues(A[None], blocks)[0]
    np.testing.assert_allclose(np.sort(lam), np.sort(np.linalg.eigvals(A).real), rtol=1e-12)
    P = covariants(A[None], lam[None])[0]
    for t in (0.1, 1.0, 7.5, 48.0):
        E = np.einsum("i,iab->ab", np.exp(lam * t), P)
        np.testing.assert_allclose(E, expm(A * t), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(P.sum(axis=0), np.eye(len(A)), atol=1e-12)


def test_phi_limit_at_zero_eigenvalue():
    lam = np.array([0.0, -1e-14, -0.5])
    np.testing.assert_allclose(phi(lam, 2.0), [2.0, 2.0, (1 - np.exp(-1.0)) / 0.5], rtol=1e-12)


@pytest.mark.parametrize("name", ["pk_2cmt_oral", "pk_3cmt_oral"])
def test_pytensor_build_matches_numpy(name):
    pytensor = pytest.importorskip("pytensor")
    import pytensor.tensor as pt

    A, blocks = _A(name, CASES[name])
    batch = np.stack([A, A * 1.7, A * 0.3])
    At = pt.tensor3("A")
    lam_t = block_eigenvalues(At, blocks, xp=pt)
    P_t = covariants(At, lam_t, xp=pt, n=len(A), m=len(A))
    phi_t = phi(lam_t, 3.0, xp=pt)
    f = pytensor.function([At], [lam_t, P_t, phi_t])
    lam, P, ph = f(batch)
    np.testing.assert_allclose(lam, block_eigenvalues(batch, blocks), rtol=1e-12)
    np.testing.assert_allclose(P, covariants(batch, lam), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ph, phi(lam, 3.0), rtol=1e-12)
    # and it is differentiable: d(sum λ)/dA = trace derivative = identity on the diagonal
    g = pytensor.function([At], pytensor.grad(lam_t.sum(), At))(batch)
    np.testing.assert_allclose(g, np.broadcast_to(np.eye(len(A)), batch.shape), atol=1e-8)


@pytest.mark.parametrize("name", CASES)
def test_standard_models_take_the_closed_form(name):
    """A wrong closed form must not hide behind the matrix-exponential fallback."""
    from pkpd.solvers.linear import make_propagator

    A, blocks = _A(name, CASES[name])
    assert make_propagator(np.stack([A, 2 * A]), blocks).method == "closed-form"


def test_stiff_rates_fall_back_to_matrix_exponential():
    """KA 200/h with a 0.0025/h deep compartment: Sylvester's product formula would lose ~8
    digits (Σ P_i = I only to 8e-8), so auto switches to expm, which keeps mass balance.
    Milder stiffness (KA 41/h, V4 148 L: 5e-10) stays on the closed form."""
    from pkpd.solvers.linear import Spectral, distinct, make_propagator

    def system(ka: float, v4: float) -> np.ndarray:
        cl, v2, q3, v3, q4 = 1.0, np.exp(2.0), 25.0, np.exp(2.0), 1.0
        A = np.zeros((5, 5))  # 3-cmt oral plus an accumulating ELIM state
        A[0, 0], A[1, 0] = -ka, ka
        A[1, 1], A[1, 2], A[1, 3] = -(cl + q3 + q4) / v2, q3 / v3, q4 / v4
        A[2, 1], A[2, 2], A[3, 1] = q3 / v2, -q3 / v3, q4 / v2
        A[3, 3], A[4, 1] = -q4 / v4, cl / v2
        return A[None]

    blocks = [(0,), (1, 2, 3), (4,)]
    stiff, mild = system(200.0, np.exp(6.0)), system(41.43, np.exp(5.0))
    P = covariants(stiff, distinct(block_eigenvalues(stiff, blocks)))[0]
    assert np.abs(P.sum(axis=0) - np.eye(5)).max() > 1e-9
    assert not Spectral.well_conditioned(stiff, blocks)
    assert Spectral.well_conditioned(mild, blocks)
    prop = make_propagator(stiff, blocks)
    assert prop.method == "matrix-exponential"
    M, _ = prop.transition(np.array([5.0]), np.array([0]))
    assert M[0].sum(axis=0) == pytest.approx(np.ones(5), abs=1e-13)  # columns conserve mass


@pytest.mark.parametrize("ka", [0.1, 0.1 * (1 + 3e-8), 0.1 * (1 + 1e-5)])
def test_ka_equal_or_close_to_k_matches_reference(ka):
    """KA = CL/V (a double eigenvalue) and near it: no blow-up, 1e-6 agreement with solve_ivp."""
    import pandas as pd

    from pkpd.simulation import simulate

    m = load_model("pk_1cmt_oral")
    df = pd.DataFrame({"ID": 1, "TIME": [0, 1, 2, 5, 10, 48], "EVID": [1, 0, 0, 0, 0, 0],
                       "AMT": [100, 0, 0, 0, 0, 0], "CMT": [1, 2, 2, 2, 2, 2]})
    p = {"CL": 5.0, "V": 50.0, "KA": ka}
    fast = simulate(m, df, params=p)["CP"].to_numpy()[1:]
    ref = simulate(m, df, params=p, method="ode")["CP"].to_numpy()[1:]
    np.testing.assert_allclose(fast, ref, rtol=1e-6)
