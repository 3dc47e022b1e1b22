"""Empirical Bayes estimates and partial centring (pkpd.ebe): closed forms of the
normal-normal model, and the λ-parameterised population model's log density."""

from __future__ import annotations

import numpy as np
import pytest

from pkpd.ebe import ebe


def _normal_normal(n_obs, ybar, sigma, omega, lam0, loc):
    """Subjects × 2 parameters, y_ijk ~ N(η_ij, σ), η_ij ~ N(0, ω_j); flat x = [a, u]
    with an unrelated population coordinate a, η = (u − λ0·loc)·ω^(1−λ0)."""
    S, K = ybar.shape
    scale = omega[None, :] ** (1 - lam0)

    def logp_grad(x):
        a, u = x[0], x[1:].reshape(S, K)
        v = u - lam0 * loc
        eta = v * scale
        lp = -0.5 * a ** 2 - 0.5 * np.sum(n_obs * (ybar - eta) ** 2 / sigma ** 2) \
            - 0.5 * np.sum(v ** 2 / omega[None, :] ** (2 * lam0))
        g_u = n_obs * (ybar - eta) / sigma ** 2 * scale - v / omega[None, :] ** (2 * lam0)
        return lp, np.r_[-a, g_u.ravel()]

    return logp_grad


def test_ebe_is_the_conditional_mode_and_laplace_sd_of_the_normal_model():
    rng = np.random.default_rng(1)
    S = 7
    n_obs = np.c_[rng.integers(1, 30, S), np.zeros(S, int) + 1]  # rich and sparse
    n_obs[0, 1] = 0                                             # one η without data
    ybar = rng.normal(0, 1, (S, 2))
    sigma, omega = 0.5, np.array([0.8, 0.3])
    lam0 = rng.uniform(0, 1, (S, 2))
    loc = rng.normal(-3, 2, (S, 2))  # location centring: u starts far from its mode
    res = ebe(_normal_normal(n_obs, ybar, sigma, omega, lam0, loc),
              np.r_[0.3, np.zeros(2 * S)], slice(1, 1 + 2 * S), omega, lam0, loc)
    prec = n_obs / sigma ** 2 + 1 / omega[None, :] ** 2
    np.testing.assert_allclose(res.eta, n_obs * ybar / sigma ** 2 / prec, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(res.sd, 1 / np.sqrt(prec), rtol=1e-4)
    np.testing.assert_allclose(res.lam, 1 - 1 / (prec * omega[None, :] ** 2), atol=1e-4)
    assert res.converged and res.lam[0, 1] == pytest.approx(0.0, abs=1e-6)
    assert res.lam[:, 0].min() > 0.8  # ≥ 1 observation at σ = 0.5 against ω = 0.8


def test_partial_centring_is_the_same_posterior_up_to_the_jacobian():
    """u ~ N(λ·m, ω^λ), η = (u − λ·m)·ω^(1−λ) with m = log of the typical value (no
    covariates here: log θ): against the non-centred z = η/ω the log density differs by
    −λ·log ω per (subject, parameter) and η is the same."""
    from test_fit import _data

    from pkpd import load_model
    from pkpd.fitting import Endpoint, FitSpecError, build

    m, df = load_model("pk_1cmt_oral"), _data(4)
    ep = [Endpoint("CP")]
    nc = build(m, df, ep).pm_model
    lam = {"KA": np.array([0.0, 0.3, 0.9, 1.0]), "CL": 0.5}
    part = build(m, df, ep, centred=lam).pm_model
    names = list(nc.coords["eta_param"])
    L = np.zeros((4, len(names)))
    for k, v in lam.items():
        L[:, names.index(k)] = v
    rng = np.random.default_rng(0)
    p = {k: np.asarray(v) + 0.1 * rng.standard_normal(np.shape(v))
         for k, v in nc.initial_point().items()}
    om = np.exp(p["omega_log__"])
    q = {k: v for k, v in p.items() if k != "z"}
    loc = np.array([p[f"log_{k}"] for k in names])[None, :]
    q["eta_u"] = p["z"] * om / om ** (1 - L) + L * loc
    lp_nc, lp_part = nc.compile_logp()(p), part.compile_logp()(q)
    assert lp_part == pytest.approx(lp_nc - np.sum(L * np.log(om)), rel=1e-10)
    (eta,) = part.replace_rvs_by_values([part["eta"]])
    eta = part.compile_fn(eta, inputs=part.value_vars, on_unused_input="ignore")(q)
    np.testing.assert_allclose(eta, p["z"] * om, rtol=1e-12)
    with pytest.raises(FitSpecError, match=r"centred.KA: λ must be in \[0, 1\]"):
        build(m, df, ep, centred={"KA": 1.5})
    with pytest.raises(FitSpecError, match="centred: VV not a parameter with IIV"):
        build(m, df, ep, centred={"VV": 1.0})
    with pytest.raises(FitSpecError, match="iiv = 'diagonal'"):
        build(m, df, ep, centred="auto", iiv="block")


def test_ebe_stops_when_no_step_improves_the_density():
    """A density that is −∞ off the start (with a non-zero gradient): the EBE stays at the
    start, reports no convergence and does not spend its iterations retrying."""
    def logp_grad(x):
        return (0.0 if np.all(x == 0) else -np.inf), np.ones_like(x)

    res = ebe(logp_grad, np.zeros(4), slice(0, 4), np.array([0.5, 0.5]), np.zeros((2, 2)))
    assert not res.converged and res.iterations == 1
    np.testing.assert_array_equal(res.eta, 0.0)
    assert res.gradients < 20
