"""Exact propagators for linear time-invariant compartment systems dx/dt = A·x + r.

Two propagators share one interface, vectorised over subjects (leading axis):

* :class:`Spectral` — the closed form. Eigenvalues come from closed formulas per strongly
  connected block of A (1×1, quadratic for 2×2, trigonometric cubic for 3×3: the standard
  1-, 2- and 3-compartment solutions with or without a depot), and
  e^{A·t} = Σ_i e^{λ_i t} P_i with the Frobenius covariants P_i = Π_{j≠i}(A − λ_j I)/(λ_i − λ_j)
  (Sylvester's formula). This is the polyexponential solution of NONMEM's ADVAN1-4/11/12.
* :class:`Expm` — the matrix exponential (scipy) for any other linear system, including
  defective ones (equal transit rates).

The kernels ``block_eigenvalues``, ``covariants``, ``phi`` take the array module ``xp`` (numpy
here, ``pytensor.tensor`` for the likelihood), so simulation and likelihood share them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.linalg

__all__ = ["Expm", "Spectral", "block_eigenvalues", "covariants", "distinct", "phi",
           "make_propagator", "separate"]


def block_eigenvalues(A, blocks: Sequence[Sequence[int]], xp=np):
    """Eigenvalues of A (…, n, n), one per state, ordered as the states of ``blocks``.

    A is block-triangular in the order of ``blocks`` (strongly connected components), so its
    eigenvalues are those of the diagonal blocks, each of size ≤ 3 (closed forms).
    """
    lam = [None] * sum(len(b) for b in blocks)
    for b in blocks:
        if len(b) == 1:
            (i,) = b
            lam[i] = A[..., i, i]
        elif len(b) == 2:
            i, j = b
            a, bb, c, d = A[..., i, i], A[..., i, j], A[..., j, i], A[..., j, j]
            half_tr = 0.5 * (a + d)
            root = xp.sqrt(0.25 * (a - d) ** 2 + bb * c)
            # the numerically stable pair: the smaller root from the product of roots
            big = half_tr - root  # most negative
            det = a * d - bb * c
            lam[i], lam[j] = big, det / big
        elif len(b) == 3:
            i, j, k = b
            B = [[A[..., p, q] for q in b] for p in b]
            tr = B[0][0] + B[1][1] + B[2][2]
            minors = (B[0][0] * B[1][1] - B[0][1] * B[1][0] + B[0][0] * B[2][2]
                      - B[0][2] * B[2][0] + B[1][1] * B[2][2] - B[1][2] * B[2][1])
            det = (B[0][0] * (B[1][1] * B[2][2] - B[1][2] * B[2][1])
                   - B[0][1] * (B[1][0] * B[2][2] - B[1][2] * B[2][0])
                   + B[0][2] * (B[1][0] * B[2][1] - B[1][1] * B[2][0]))
            # λ³ + a2 λ² + a1 λ + a0 = 0 with a2 = −tr, a1 = minors, a0 = −det
            a2, a1, a0 = -tr, minors, -det
            q = (a2 * a2 - 3.0 * a1) / 9.0
            r = (2.0 * a2 ** 3 - 9.0 * a2 * a1 + 27.0 * a0) / 54.0
            sq = xp.sqrt(xp.maximum(q, 1e-300))
            cos_arg = xp.clip(r / (sq * sq * sq), -1.0, 1.0)
            theta = xp.arccos(cos_arg)
            roots = [-2.0 * sq * xp.cos((theta + shift) / 3.0) - a2 / 3.0
                     for shift in (0.0, 2.0 * np.pi, -2.0 * np.pi)]
            # arccos near ±1 (close roots) loses half the digits: two Newton steps on the
            # characteristic polynomial restore full precision
            for _ in range(2):
                roots = [x - (((x + a2) * x + a1) * x + a0)
                         / xp.where(xp.abs(d := (3.0 * x + 2.0 * a2) * x + a1) > 0, d, 1.0)
                         for x in roots]
            lam[i], lam[j], lam[k] = roots
        else:
            raise ValueError(f"block of {len(b)} states has no closed-form eigenvalues")
    return xp.stack(lam, axis=-1)


def covariants(A, lam, xp=np, n: int | None = None, m: int | None = None):
    """Frobenius covariants P (…, m, n, n): P[..., i, :, :] = Π_{j≠i}(A − λ_j I)/(λ_i − λ_j)
    over the m distinct eigenvalues λ (Sylvester's formula; A must be diagonalisable).

    ``n`` (states) and ``m`` (eigenvalues) are needed when shapes are symbolic (PyTensor).
    """
    n = int(A.shape[-1]) if n is None else n
    m = int(lam.shape[-1]) if m is None else m
    eye = xp.eye(n)
    out = []
    for i in range(m):
        P = None
        for j in range(m):
            if j == i:
                continue
            factor = (A - lam[..., j, None, None] * eye) / (lam[..., i] - lam[..., j])[..., None,
                                                                                       None]
            P = factor if P is None else P @ factor
        out.append(eye + 0.0 * A if P is None else P)
    return xp.stack(out, axis=-3)


_MIN_GAP = 1e-7


def separate(A: np.ndarray, blocks: Sequence[Sequence[int]]) -> np.ndarray:
    """Nudge single-state blocks (depots) whose rate is within 1e-7 (relative) of another
    eigenvalue of the same subject, so that KA ≈ K does not break Sylvester's formula: the
    rate moves by 2e-7 relative, so concentrations change by about 2e-7·k·t (NONMEM's ADVAN2
    divides by KA − K there).
    Subjects away from coincidence are untouched."""
    singles = [b[0] for b in blocks if len(b) == 1]
    if not singles:
        return A
    with np.errstate(all="ignore"):
        lam = block_eigenvalues(A, blocks)
    out = A
    for i in singles:
        others = np.delete(lam, i, axis=-1)
        scale = np.maximum(np.abs(lam).max(axis=-1), 1e-300)
        gap = np.abs(others - lam[:, i, None]).min(axis=-1, initial=np.inf)
        near = (gap < _MIN_GAP * scale) & (lam[:, i] != 0)
        if near.any():
            out = out.copy() if out is A else out
            out[near, i, i] *= 1.0 + 2 * _MIN_GAP
            with np.errstate(all="ignore"):
                lam = block_eigenvalues(out, blocks)
    return out


def distinct(lam: np.ndarray) -> np.ndarray:
    """Drop eigenvalue columns equal, for every subject, to an earlier column.

    Repeats arise structurally, e.g. several accumulator states (cumulative hazards,
    eliminated amount) each giving λ = 0. Sylvester's formula over the distinct values is exact
    when A is diagonalisable, which :meth:`Spectral.well_conditioned` checks.
    """
    keep = [i for i in range(lam.shape[-1])
            if not any(np.array_equal(lam[..., i], lam[..., j]) for j in range(i))]
    return lam[..., keep]


def phi(lam, dt, xp=np):
    """∫_0^dt e^{λ s} ds = expm1(λ·dt)/λ, equal to dt at λ = 0."""
    z = lam * dt
    safe = xp.where(xp.abs(lam) > 0, lam, 1.0)
    return xp.where(xp.abs(z) > 1e-12, xp.expm1(z) / safe, dt * (1.0 + 0.5 * z))


class Spectral:
    """Closed-form propagator (numpy). ``A`` has shape (S, n, n)."""

    method = "closed-form"

    def __init__(self, A: np.ndarray, blocks: Sequence[Sequence[int]]):
        self.A = separate(A, blocks)
        self.lam = distinct(block_eigenvalues(self.A, blocks))
        self.P = covariants(self.A, self.lam)

    @staticmethod
    def well_conditioned(A: np.ndarray, blocks: Sequence[Sequence[int]]) -> bool:
        """False when eigenvalues are wrong, complex, repeated or nearly so (use
        :class:`Expm`)."""
        with np.errstate(all="ignore"):
            A = separate(A, blocks)
            lam = distinct(block_eigenvalues(A, blocks))
            if not np.all(np.isfinite(lam)):
                return False
            # complex pairs appear as clipped arccos/negative discriminants: check residual
            m = lam.shape[-1]
            scale = np.maximum(np.abs(lam).max(axis=-1), 1e-300)
            gaps = np.abs(lam[:, :, None] - lam[:, None, :]) + np.eye(m) * scale[:, None, None]
            if np.any(gaps.min(axis=(1, 2)) < 1e-6 * scale):
                return False
            # A·P_i = λ_i·P_i holds only if λ_i is an eigenvalue (Σ λ_i P_i = A holds for any
            # distinct λ_i, so it would not catch a wrong closed form)
            P = covariants(A, lam)
            resid = np.einsum("sab,sibc->siac", A, P) - lam[:, :, None, None] * P
            scale_a = np.maximum(np.abs(A).max(axis=(1, 2)), 1e-300)
            size = np.maximum(np.abs(P).max(axis=(2, 3)), 1.0)
            err = (np.abs(resid).max(axis=(2, 3)) / (scale_a[:, None] * size)).max(axis=1)
            # Σ P_i = I: the product formula loses digits when the rates span orders of
            # magnitude (e.g. KA 40/h with a 0.003/h deep compartment); then use expm
            identity = np.abs(P.sum(axis=1) - np.eye(A.shape[-1])).max(axis=(1, 2))
            return bool(np.all(err < 1e-9) and np.all(identity < 1e-9))

    # coordinates used while stepping through events: modal amounts P_i·x, shape (k, n, n)
    def coords(self, x: np.ndarray, sidx: np.ndarray) -> np.ndarray:
        return np.einsum("kiab,kb->kia", self.P[sidx], x)

    @staticmethod
    def amounts(y: np.ndarray) -> np.ndarray:
        out = y[:, 0].copy()
        for i in range(1, y.shape[1]):  # explicit adds: faster than a middle-axis sum
            out += y[:, i]
        return out

    def unit(self, sidx: np.ndarray, cmt: np.ndarray) -> np.ndarray:
        """Coordinates of one unit of amount in state ``cmt``."""
        return self.P[sidx, :, :, cmt]

    def advance(self, y: np.ndarray, yr: np.ndarray | None, dt: np.ndarray,
                sidx: np.ndarray) -> np.ndarray:
        """Modal amounts after dt with constant modal input rates yr (None: no input)."""
        lam = self.lam[sidx]
        out = np.exp(lam * dt[:, None])[..., None] * y
        if yr is not None:
            out += phi(lam, dt[:, None])[..., None] * yr
        return out

    def transition(self, dt: np.ndarray, sidx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """e^{A·dt} and ∫_0^dt e^{A s} ds for subjects ``sidx`` (each (k, n, n))."""
        lam = self.lam[sidx]
        P = self.P[sidx]
        E = np.exp(lam * dt[:, None])
        F = phi(lam, dt[:, None])
        return np.einsum("ki,kiab->kab", E, P), np.einsum("ki,kiab->kab", F, P)

    def geometric(self, tau: np.ndarray, sidx: np.ndarray) -> np.ndarray:
        """Σ_{k≥0} e^{A·k·τ} = (I − e^{A·τ})^{-1}."""
        w = -1.0 / np.expm1(self.lam[sidx] * tau[:, None])
        return np.einsum("ki,kiab->kab", w, self.P[sidx])

    def neg_inverse(self, sidx: np.ndarray) -> np.ndarray:
        """−A^{-1} = ∫_0^∞ e^{A s} ds (steady state of a constant input)."""
        return np.einsum("ki,kiab->kab", -1.0 / self.lam[sidx], self.P[sidx])


class Expm:
    """Matrix-exponential propagator for any linear system (numpy/scipy)."""

    method = "matrix-exponential"

    def __init__(self, A: np.ndarray):
        self.A = A
        self.n = A.shape[-1]

    def transition(self, dt: np.ndarray, sidx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = self.n
        k = len(sidx)
        aug = np.zeros((k, 2 * n, 2 * n))
        aug[:, :n, :n] = self.A[sidx] * dt[:, None, None]
        aug[:, :n, n:] = np.eye(n) * dt[:, None, None]
        E = scipy.linalg.expm(aug) if k else aug
        return E[:, :n, :n], E[:, :n, n:]

    @staticmethod
    def coords(x: np.ndarray, sidx: np.ndarray) -> np.ndarray:
        return np.array(x, dtype=float)

    @staticmethod
    def amounts(x: np.ndarray) -> np.ndarray:
        return x

    def unit(self, sidx: np.ndarray, cmt: np.ndarray) -> np.ndarray:
        return np.eye(self.n)[cmt]

    def advance(self, x: np.ndarray, r: np.ndarray | None, dt: np.ndarray,
                sidx: np.ndarray) -> np.ndarray:
        M, N = self.transition(dt, sidx)
        out = np.einsum("kab,kb->ka", M, x)
        if r is not None:
            out += np.einsum("kab,kb->ka", N, r)
        return out

    def geometric(self, tau: np.ndarray, sidx: np.ndarray) -> np.ndarray:
        M, _ = self.transition(tau, sidx)
        return np.linalg.inv(np.eye(self.n) - M)

    def neg_inverse(self, sidx: np.ndarray) -> np.ndarray:
        return -np.linalg.inv(self.A[sidx])


def make_propagator(A: np.ndarray, blocks: Sequence[Sequence[int]] | None,
                    method: str = "auto") -> Spectral | Expm:
    """Closed form when the structure allows it and eigenvalues are real and distinct."""
    closed = blocks is not None and all(len(b) <= 3 for b in blocks)
    if method == "expm" or not closed:
        if method == "closed-form":
            raise ValueError("closed-form solution needs linear blocks of at most 3 states")
        return Expm(A)
    if method == "closed-form" or Spectral.well_conditioned(A, blocks):
        return Spectral(A, blocks)
    return Expm(A)
