"""Rewards with an analytic tilted target on Gaussian mixtures."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from difftilt.core.errors import ConfigError, ShapeError
from difftilt.core.reward import Reward, RewardOutput

from .mixture import GaussianMixture

__all__ = ["LinearReward", "QuadraticReward", "BumpsReward"]


class _AnalyticReward(Reward):
    differentiable = True
    dim: int

    def _check(self, x: Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ShapeError(f"{self.name} expects points of shape (b, {self.dim}), got {tuple(x.shape)}")

    def tilt(self, mixture: GaussianMixture, alpha: float) -> GaussianMixture:
        """The exact ``∝ mixture(x) exp(r(x) / alpha)``."""
        raise NotImplementedError


class LinearReward(_AnalyticReward):
    """``r(x) = <c, x> + b``. Tilts each component's mean by ``C c / alpha`` and reweights.

    Args:
        weights: the direction ``c`` (its length is the dimension).
        bias: the offset ``b`` (it does not change the tilted law).
    """

    def __init__(self, weights: list[float], bias: float = 0.0):
        super().__init__()
        if len(weights) == 0:
            raise ConfigError("reward.weights must not be empty")
        self.register_buffer("c", torch.tensor(weights, dtype=torch.float32))
        self.c64 = torch.tensor(weights, dtype=torch.float64)
        self.bias = float(bias)
        self.dim = len(weights)

    @property
    def name(self) -> str:
        return "linear"

    def evaluate(self, x: Tensor) -> Tensor:
        self._check(x)
        return x @ self.c.to(x.dtype) + self.bias

    def tilt(self, mixture: GaussianMixture, alpha: float) -> GaussianMixture:
        if mixture.dim != self.dim:
            raise ConfigError(f"reward dimension {self.dim} does not match the mixture's {mixture.dim}")
        return mixture.tilt_linear(self.c64, alpha)


class QuadraticReward(_AnalyticReward):
    """``r(x) = -(x - x0)^T A (x - x0) / 2``, a concave bowl around ``x0``.

    Args:
        center: ``x0``.
        precision: ``A``: a number (``A = a I``), one number per coordinate (diagonal), or a
            full symmetric positive semi-definite matrix.
    """

    def __init__(self, center: list[float], precision: float | list[float] | list[list[float]] = 1.0):
        super().__init__()
        d = len(center)
        if d == 0:
            raise ConfigError("reward.center must not be empty")
        A = torch.as_tensor(precision, dtype=torch.float64)
        if A.dim() == 0:
            A = A * torch.eye(d, dtype=torch.float64)
        elif A.dim() == 1:
            A = torch.diag(A)
        if A.shape != (d, d):
            raise ConfigError(f"reward.precision must be a number, {d} numbers or a {d}x{d} matrix")
        if not torch.allclose(A, A.T) or torch.linalg.eigvalsh(A).min() < -1e-10:
            raise ConfigError("reward.precision must be symmetric positive semi-definite")
        self.A64 = A
        self.x064 = torch.tensor(center, dtype=torch.float64)
        self.register_buffer("A", A.to(torch.float32))
        self.register_buffer("x0", self.x064.to(torch.float32))
        self.dim = d

    @property
    def name(self) -> str:
        return "quadratic"

    def evaluate(self, x: Tensor) -> Tensor:
        self._check(x)
        diff = x - self.x0.to(x.dtype)
        return -0.5 * ((diff @ self.A.to(x.dtype)) * diff).sum(-1)

    def tilt(self, mixture: GaussianMixture, alpha: float) -> GaussianMixture:
        if mixture.dim != self.dim:
            raise ConfigError(f"reward dimension {self.dim} does not match the mixture's {mixture.dim}")
        return mixture.tilt_quadratic(self.A64, self.x064, alpha)


class BumpsReward(Reward):
    """A sum of Gaussian bumps, feasible only where the pretrained model has mass.

    ``r(x) = sum_j h_j exp(-||x - c_j||^2 / (2 w_j^2))``. A design is infeasible when the
    pretrained law's log-density there is below ``feasible_logpdf`` -- the toy stand-in
    for "a sequence that does not fold" or "a molecule that is not valid": optimizing the
    learned reward off the pretrained manifold is punished by infeasibility, which is what
    the KL term guards against. Not differentiable on purpose: it plays a black-box oracle.

    Args:
        centers: bump centres ``c_j``.
        heights: bump heights ``h_j``.
        widths: bump widths ``w_j`` (one number or one per bump).
        feasible_logpdf: log-density threshold of feasibility (``null``: always feasible).
        delay: seconds slept per call (a simulated assay's latency).
        flaky: probability that a call raises (a simulated flaky assay; seeded, so reproducible).
        process: the pretrained chain (supplied by the plugin).
    """

    differentiable = False

    def __init__(self, centers: list[list[float]], heights: list[float], widths: float | list[float] = 0.5,
                 feasible_logpdf: float | None = -7.0, delay: float = 0.0, flaky: float = 0.0, process=None):
        super().__init__()
        c = torch.tensor(centers, dtype=torch.float32)
        if c.dim() != 2 or len(heights) != c.shape[0]:
            raise ConfigError("reward.centers must be a list of points and reward.heights one number per centre")
        w = torch.as_tensor(widths, dtype=torch.float32).expand(c.shape[0]).clone()
        if torch.any(w <= 0):
            raise ConfigError("reward.widths must be positive")
        self.register_buffer("centers", c)
        self.register_buffer("heights", torch.tensor(heights, dtype=torch.float32))
        self.register_buffer("widths", w)
        self.dim = c.shape[1]
        self.delay = float(delay)
        if not 0.0 <= flaky <= 1.0:
            raise ConfigError("reward.flaky must be a probability")
        self.flaky = float(flaky)
        self._calls = torch.Generator().manual_seed(12345)
        self.feasible_logpdf = feasible_logpdf
        self.law = process.terminal_law() if (process is not None and feasible_logpdf is not None) else None

    @property
    def name(self) -> str:
        return "bumps"

    def evaluate(self, x: Tensor) -> RewardOutput:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ShapeError(f"bumps expects points of shape (b, {self.dim}), got {tuple(x.shape)}")
        if self.delay:
            time.sleep(self.delay)
        if self.flaky and float(torch.rand((), generator=self._calls)) < self.flaky:
            raise RuntimeError("simulated assay failure")
        d2 = ((x[:, None, :] - self.centers[None]) ** 2).sum(-1)  # (b, J)
        value = (self.heights * torch.exp(-d2 / (2 * self.widths**2))).sum(-1)
        if self.law is None:
            return RewardOutput(value, torch.ones_like(value, dtype=torch.bool))
        feasible = self.law.log_prob(x.detach().double()) >= self.feasible_logpdf
        return RewardOutput(value, feasible.to(value.device))
