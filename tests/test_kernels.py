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
    """KA 41/h with a 0.003/h deep compartment: Sylvester's product formula would lose ~8
    digits (Σ P_i = I only to 4e-9), so auto switches to expm, which keeps mass balance."""
    from pkpd.solvers.linear import Spectral, distinct, make_propagator

    CL, V2, Q3, V3, Q4, V4, KA = 1.0, np.exp(2.0), 25.0, np.exp(2.0), 1.0, np.exp(5.0), 41.43
    A = np.zeros((5, 5))  # 3-cmt oral plus an accumulating ELIM state
    A[0, 0], A[1, 0] = -KA, KA
    A[1, 1], A[1, 2], A[1, 3] = -(CL + Q3 + Q4) / V2, Q3 / V3, Q4 / V4
    A[2, 1], A[2, 2], A[3, 1], A[3, 3], A[4, 1] = Q3 / V2, -Q3 / V3, Q4 / V2, -Q4 / V4, CL / V2
    blocks = [(0,), (1, 2, 3), (4,)]
    P = covariants(A[None], distinct(block_eigenvalues(A[None], blocks)))[0]
    assert np.abs(P.sum(axis=0) - np.eye(5)).max() > 1e-10
    assert not Spectral.well_conditioned(A[None], blocks)
    prop = make_propagator(A[None], blocks)
    assert prop.method == "matrix-exponential"
    M, _ = prop.transition(np.array([5.0]), np.array([0]))
    assert M[0].sum(axis=0) == pytest.approx(np.ones(5), abs=1e-13)  # columns conserve mass
