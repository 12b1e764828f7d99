"""Gaussian mixtures in R^d with everything in closed form.

A mixture pushed through a variance-preserving forward process stays a mixture
(``noised``), so its score is exact at every noise level; tilting it by a linear or
concave quadratic reward gives another mixture (``tilt_linear``, ``tilt_quadratic``),
so the fine-tuning target ``p* ∝ p_pre exp(r / alpha)`` is known exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from difftilt.core.errors import ConfigError, ShapeError

__all__ = ["GaussianMixture", "sliced_w2_to_mixture"]

_DTYPE = torch.float64


@dataclass
class GaussianMixture:
    """``sum_i w_i N(m_i, C_i)``.

    Attributes:
        weights: ``(M,)`` positive, summing to one.
        means: ``(M, d)``.
        covs: ``(M, d, d)`` symmetric positive definite.
    """

    weights: Tensor
    means: Tensor
    covs: Tensor

    def __post_init__(self):
        self.weights = torch.as_tensor(self.weights, dtype=_DTYPE)
        self.means = torch.as_tensor(self.means, dtype=_DTYPE)
        self.covs = torch.as_tensor(self.covs, dtype=_DTYPE)
        M = self.weights.shape[0] if self.weights.dim() == 1 else -1
        if self.weights.dim() != 1 or M < 1:
            raise ConfigError("mixture weights must be a non-empty list of numbers")
        if self.means.dim() != 2 or self.means.shape[0] != M:
            raise ConfigError(f"mixture means must be {M} points of equal dimension, got shape {tuple(self.means.shape)}")
        d = self.means.shape[1]
        if self.covs.shape != (M, d, d):
            raise ConfigError(f"mixture covariances must have shape ({M}, {d}, {d}), got {tuple(self.covs.shape)}")
        if not torch.all(torch.isfinite(self.weights)) or torch.any(self.weights <= 0):
            raise ConfigError("mixture weights must be positive")
        if abs(float(self.weights.sum()) - 1.0) > 1e-6:
            raise ConfigError(f"mixture weights must sum to 1, got {float(self.weights.sum()):.6g}")
        if not torch.allclose(self.covs, self.covs.transpose(-1, -2)):
            raise ConfigError("mixture covariances must be symmetric")
        try:
            self._chol = torch.linalg.cholesky(self.covs)
        except RuntimeError:
            raise ConfigError("mixture covariances must be positive definite") from None

    # ------------------------------------------------------------------ construction
    @classmethod
    def isotropic(cls, weights, means, stds) -> "GaussianMixture":
        """Components ``N(m_i, s_i^2 I)``; ``stds`` a number or one per component."""
        means = torch.as_tensor(means, dtype=_DTYPE)
        if means.dim() != 2:
            raise ConfigError("mixture means must be a list of points")
        M, d = means.shape
        stds = torch.as_tensor(stds, dtype=_DTYPE).expand(M).clone()
        if torch.any(stds <= 0):
            raise ConfigError("mixture stds must be positive")
        covs = stds[:, None, None] ** 2 * torch.eye(d, dtype=_DTYPE)
        return cls(torch.as_tensor(weights, dtype=_DTYPE), means, covs)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    # ------------------------------------------------------------------ moments
    def mean(self) -> Tensor:
        """``(d,)``."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """``(d, d)``: within-component plus between-component covariance."""
        mu = self.mean()
        dm = self.means - mu
        return torch.einsum("m,mij->ij", self.weights, self.covs) + torch.einsum("m,mi,mj->ij", self.weights, dm, dm)

    def std(self) -> Tensor:
        """Per-coordinate standard deviation, ``(d,)``."""
        return self.covariance().diagonal().sqrt()

    # ------------------------------------------------------------------ densities
    def component_log_prob(self, x: Tensor) -> Tensor:
        """``log w_i + log N(x; m_i, C_i)`` for ``x``: ``(n, d)``; returns ``(n, M)``."""
        x = x.to(_DTYPE)
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ShapeError(f"expected points of shape (n, {self.dim}), got {tuple(x.shape)}")
        diff = x[:, None, :] - self.means[None]  # (n, M, d)
        z = torch.linalg.solve_triangular(self._chol[None], diff[..., None], upper=False).squeeze(-1)
        logdet = 2 * torch.log(self._chol.diagonal(dim1=-2, dim2=-1)).sum(-1)  # (M,)
        return torch.log(self.weights) - 0.5 * (z * z).sum(-1) - 0.5 * logdet - 0.5 * self.dim * math.log(2 * math.pi)

    def log_prob(self, x: Tensor) -> Tensor:
        """``(n,)``."""
        return torch.logsumexp(self.component_log_prob(x), dim=-1)

    def responsibilities(self, x: Tensor) -> Tensor:
        """Posterior component probabilities ``(n, M)``."""
        return torch.softmax(self.component_log_prob(x), dim=-1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``(n, d)`` exact samples."""
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=_DTYPE)
        return self.means[idx] + (self._chol[idx] @ eps[..., None]).squeeze(-1)

    # ------------------------------------------------------------------ transforms
    def noised(self, abar: float) -> "GaussianMixture":
        """Law of ``sqrt(abar) X + sqrt(1 - abar) eps`` for ``X`` from this mixture."""
        eye = torch.eye(self.dim, dtype=_DTYPE)
        return GaussianMixture(self.weights, math.sqrt(abar) * self.means, abar * self.covs + (1 - abar) * eye)

    def tilt_linear(self, c: Tensor, alpha: float) -> "GaussianMixture":
        """``∝ p(x) exp(<c, x> / alpha)``: means ``m + C c / alpha``, weights
        ``∝ w exp(<c, m> / alpha + c^T C c / (2 alpha^2))``."""
        c = torch.as_tensor(c, dtype=_DTYPE)
        Cc = torch.einsum("mij,j->mi", self.covs, c)
        logw = torch.log(self.weights) + self.means @ c / alpha + (Cc @ c) / (2 * alpha**2)
        return _from_log_weights(logw, self.means + Cc / alpha, self.covs)

    def tilt_quadratic(self, precision: Tensor, center: Tensor, alpha: float) -> "GaussianMixture":
        """``∝ p(x) exp(-(x - x0)^T A (x - x0) / (2 alpha))`` for positive semi-definite ``A``."""
        A = torch.as_tensor(precision, dtype=_DTYPE) / alpha
        x0 = torch.as_tensor(center, dtype=_DTYPE)
        Cinv = torch.linalg.inv(self.covs)
        Lam = Cinv + A  # (M, d, d) posterior precision
        Sigma = torch.linalg.inv(Lam)
        h = torch.einsum("mij,mj->mi", Cinv, self.means) + A @ x0
        m_new = torch.einsum("mij,mj->mi", Sigma, h)
        quad = (
            torch.einsum("mi,mij,mj->m", self.means, Cinv, self.means)
            + x0 @ A @ x0
            - torch.einsum("mi,mij,mj->m", m_new, Lam, m_new)
        )
        logw = torch.log(self.weights) + 0.5 * (torch.logdet(Sigma) - torch.logdet(self.covs)) - 0.5 * quad
        Sigma = 0.5 * (Sigma + Sigma.transpose(-1, -2))
        return _from_log_weights(logw, m_new, Sigma)

    def project(self, theta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """1-D mixtures along unit directions ``theta``: ``(P, d)`` -> weights ``(M,)``,
        means ``(P, M)``, stds ``(P, M)``."""
        theta = theta.to(_DTYPE)
        means = theta @ self.means.T
        var = torch.einsum("pi,mij,pj->pm", theta, self.covs, theta)
        return self.weights, means, var.sqrt()

    def to_spec(self) -> dict:
        """JSON-able ``{"weights", "means", "covs"}``."""
        return {"weights": self.weights.tolist(), "means": self.means.tolist(), "covs": self.covs.tolist()}


def _mixture_quantiles(weights: Tensor, means: Tensor, stds: Tensor, levels: Tensor, iters: int = 60) -> Tensor:
    """Quantiles of 1-D mixtures by bisection. ``means``/``stds``: ``(P, M)``; ``levels``:
    ``(J,)``; returns ``(P, J)``."""
    lo = (means - 12 * stds).min(-1).values[:, None].expand(-1, levels.numel()).clone()
    hi = (means + 12 * stds).max(-1).values[:, None].expand(-1, levels.numel()).clone()
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        z = (mid[..., None] - means[:, None, :]) / stds[:, None, :]  # (P, J, M)
        cdf = (weights * 0.5 * torch.erfc(-z / math.sqrt(2))).sum(-1)
        below = cdf < levels
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


def sliced_w2_to_mixture(x: Tensor, mixture: GaussianMixture, num_projections: int = 128, seed: int = 0,
                         max_levels: int = 4096) -> float:
    """Sliced 2-Wasserstein distance between samples ``x`` ``(n, d)`` and an exact mixture.

    Each projection compares the empirical quantile function of the projected samples
    with the mixture's exact projected quantile function (no second sample, so the only
    noise floor is that of ``x``).
    """
    x = x.to(_DTYPE)
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(num_projections, mixture.dim, generator=g, dtype=_DTYPE)
    theta = theta / theta.norm(dim=1, keepdim=True)
    n = x.shape[0]
    J = min(n, max_levels)
    levels = (torch.arange(J, dtype=_DTYPE) + 0.5) / J
    proj = (x @ theta.T).sort(0).values  # (n, P)
    emp = proj[(levels * n).long().clamp(max=n - 1)].T  # (P, J)
    w, mu, sd = mixture.project(theta)
    exact = _mixture_quantiles(w, mu, sd, levels)
    return float(((emp - exact) ** 2).mean().sqrt())


def _from_log_weights(logw: Tensor, means: Tensor, covs: Tensor) -> "GaussianMixture":
    """A mixture from unnormalized log-weights. A strong tilt (a small alpha) can leave a
    component's weight below float64's smallest number: it is dropped (its mass is 0 to
    machine precision) rather than kept at weight 0, which a mixture refuses."""
    w = torch.softmax(logw, 0)
    keep = w > 0
    return GaussianMixture(w[keep] / w[keep].sum(), means[keep], covs[keep])
