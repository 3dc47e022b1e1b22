"""Empirical Bayes estimates (EBE) of each subject's η and the partial centring they imply.

NONMEM's POSTHOC step, done once before sampling: with the population parameters held at
their start values (the model file's), each subject's η is moved to the mode of its
conditional posterior, p(η_i | θ, Ω, y_i) ∝ p(y_i | η_i, θ) · N(η_i; 0, Ω), by Newton steps.
The subjects are independent given the population, so one gradient of the whole log density
per η column gives every subject's Hessian block at once (differences of gradients).

The Laplace SD of η_iP at the mode, as a fraction r of ω_P, says how much subject i's data
inform P: r ≈ 1 prior-dominated, r ≪ 1 data-dominated. The centring weight

    λ_iP = 1 − r²,     u_iP ~ N(λ·m_iP, ω_P^λ),   η_iP = (u_iP − λ·m_iP) · ω_P^(1−λ)

(m the log typical individual value) is the one that makes u a posteriori independent of
the population location and of ω in the normal-normal model (partially non-centred
parameterisation: Papaspiliopoulos, Roberts & Sköld 2003, 2007, Stat Sci 22:59; Gorinova,
Moore & Hoffman 2020, ICML, "variationally inferred parameterisation"): λ = 1 is centred
(u is the individual log parameter), λ = 0 non-centred. Chains then start at the EBE.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["EBE", "ebe"]


@dataclass(frozen=True)
class EBE:
    """Result of :func:`ebe` (arrays are subjects × η parameters)."""

    eta: np.ndarray          # the modes of η
    sd: np.ndarray           # Laplace SD of η at the mode
    lam: np.ndarray          # centring weight 1 − (sd/ω)², in [0, 1]
    iterations: int
    converged: bool
    gradients: int           # log-density gradients used


def ebe(logp_grad: Callable[[np.ndarray], tuple[float, np.ndarray]], x0: np.ndarray,
        block: slice, omega: np.ndarray, lam: np.ndarray, loc: np.ndarray | None = None, *,
        max_iter: int = 30, tol: float = 1e-4, delta: float = 1e-5,
        max_step: float = 1.0) -> EBE:
    """EBE of η by block-Newton on the flat log density ``logp_grad(x) → (value, gradient)``.

    ``x0`` is the flat unconstrained point (population at its start values); ``block`` the
    slice of x holding u (subjects × K, C order) with η = (u − λ·loc)·ω^(1−λ) for the
    ``lam`` the density was built with (``loc``, subjects × K, default 0: m at x0);
    ``omega`` (K,) the IIV SDs at x0. Steps are capped at
    ``max_step`` in u and halved while the log density does not improve.
    """
    S, K = lam.shape
    scale = omega[None, :] ** (1.0 - lam)        # η = (u − shift)·scale
    shift = 0.0 if loc is None else lam * loc
    x = np.array(x0, dtype=float)
    f, g = logp_grad(x)
    n_grad = 1
    if not np.isfinite(f):
        raise ValueError("the log density is not finite at the start point")
    converged = False
    n_it = 0
    while n_it < max_iter:
        n_it += 1
        H, n = _hessian_blocks(logp_grad, x, g, block, S, K, delta)
        n_grad += n
        gu = g[block].reshape(S, K)
        step = _newton_step(H, gu, max_step)
        t = 1.0
        while True:
            xn = x.copy()
            xn[block] += t * step.ravel()
            fn, gn = logp_grad(xn)
            n_grad += 1
            if np.isfinite(fn) and fn >= f - 1e-9 * abs(f):
                break
            t *= 0.5
            if t < 1e-3:  # no step improves the density: stop where we are
                break
        if t < 1e-3:
            converged = bool(np.max(np.abs(g[block])) < tol)
            break
        x, f, g = xn, fn, gn
        if np.max(np.abs(t * step)) < tol:
            converged = True
            break
    H, n = _hessian_blocks(logp_grad, x, g, block, S, K, delta)
    n_grad += n
    cov = np.linalg.inv(_negdef(H))              # of u, per subject
    sd_u = np.sqrt(np.clip(-np.diagonal(cov, axis1=1, axis2=2), 0.0, None))
    sd = sd_u * scale
    u = x[block].reshape(S, K)
    r = sd / omega[None, :]
    return EBE(eta=(u - shift) * scale, sd=sd, lam=np.clip(1.0 - r ** 2, 0.0, 1.0), iterations=n_it,
               converged=converged, gradients=n_grad)


def _hessian_blocks(logp_grad, x, g, block, S, K, delta):
    """Per-subject K × K Hessian blocks in u, from K forward differences of the gradient
    (column k of every subject moved at once: subjects do not interact given θ, Ω)."""
    H = np.empty((S, K, K))
    gu = g[block].reshape(S, K)
    for k in range(K):
        xk = x.copy()
        d = np.zeros((S, K))
        d[:, k] = delta
        xk[block] += d.ravel()
        _, gk = logp_grad(xk)
        H[:, :, k] = (gk[block].reshape(S, K) - gu) / delta
    return 0.5 * (H + np.swapaxes(H, 1, 2)), K


def _negdef(H: np.ndarray, floor: float = 1e-6) -> np.ndarray:
    """The nearest negative definite blocks (eigenvalues ≤ −floor)."""
    w, v = np.linalg.eigh(H)
    w = -np.maximum(np.abs(w), floor)
    return np.einsum("sij,sj,skj->sik", v, w, v)


def _newton_step(H: np.ndarray, g: np.ndarray, max_step: float) -> np.ndarray:
    """−H⁻¹g per subject (H made negative definite), capped at ``max_step`` per entry."""
    step = -np.linalg.solve(_negdef(H), g[..., None])[..., 0]
    big = np.max(np.abs(step), axis=1, keepdims=True)
    return step * np.minimum(1.0, max_step / np.maximum(big, 1e-300))
