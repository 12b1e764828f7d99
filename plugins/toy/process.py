"""A pretrained diffusion whose score is exact: a Gaussian mixture through a VP process.

The forward process is variance preserving, ``x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps``,
so every marginal is a Gaussian mixture and the score is exact. The reverse chain is
DDIM with stochasticity ``eta`` (``eta = 1`` is DDPM ancestral sampling, ``eta = 0`` the
deterministic probability-flow sampler, which has no finite KL and is refused by
KL-regularized fine-tuning). All ``eta`` share the same marginals in the limit of many
steps, but with ``eta < 1`` the start ``x_0`` keeps information about the sample
``x_K`` -- the regime where learning the initial law (ELEGANT) matters.

The chain ends at ``t_min > 0``, so its last step is stochastic and its exact terminal
law is the forward marginal at ``t_min`` (:meth:`MixtureDiffusionProcess.terminal_law`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from difftilt.core.distributions import GaussianStep
from difftilt.core.errors import ConfigError
from difftilt.core.process import Process

from .mixture import GaussianMixture

__all__ = ["MixtureDiffusionProcess", "vp_schedule"]

ABAR_MIN = 1e-5


def vp_schedule(num_steps: int, schedule: str = "cosine", t_min: float = 1e-3) -> Tensor:
    """``abar`` at ``K + 1`` times from ``t = 1`` (noise, index 0) down to ``t_min`` (index K).

    ``"cosine"``: Nichol & Dhariwal's ``cos^2((t + s) / (1 + s) * pi / 2)``, ``s = 0.008``.
    ``"linear"``: DDPM's ``beta`` from 1e-4 to 2e-2, ``abar(t) = exp(-int beta)``.
    Clamped to ``[1e-5, 1]`` so the first step stays finite.
    """
    t = torch.linspace(1.0, t_min, num_steps + 1, dtype=torch.float64)
    if schedule == "cosine":
        s = 0.008
        f = lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        abar = f(t) / f(torch.zeros((), dtype=torch.float64))
    elif schedule == "linear":
        b0, b1 = 0.1, 20.0  # continuous-time beta(t) = b0 + (b1 - b0) t
        abar = torch.exp(-(b0 * t + 0.5 * (b1 - b0) * t**2))
    else:
        raise ConfigError(f"process.schedule must be 'cosine' or 'linear', got '{schedule}'")
    return abar.clamp(ABAR_MIN, 1.0)


class MixtureDiffusionProcess(Process):
    """DDIM(eta) reverse chain with the exact score of a Gaussian mixture.

    Step ``k`` goes from ``abar_k`` to ``abar_{k+1}`` (increasing) with
    ``x0_hat = (x + (1 - a_t) score) / sqrt(a_t)``, ``eps_hat = -sqrt(1 - a_t) score`` and
    ``x' ~ N(sqrt(a_s) x0_hat + sqrt(1 - a_s - sigma^2) eps_hat, sigma^2 I)``,
    ``sigma = eta sqrt((1 - a_s)/(1 - a_t)) sqrt(1 - a_t/a_s)`` (Song et al. 2021, eq. 16;
    ``a_t -> alpha_t``, ``a_s -> alpha_{t-1}``).

    Args:
        mixture: the data distribution.
        num_steps: ``K``.
        eta: DDIM stochasticity in ``[0, 1]``.
        schedule: ``"cosine"`` or ``"linear"`` (see :func:`vp_schedule`).
        t_min: final diffusion time (``> 0``).
    """

    initial_kind = "standard_normal"

    def __init__(self, mixture: GaussianMixture, num_steps: int = 100, eta: float = 0.3,
                 schedule: Literal["cosine", "linear"] = "cosine", t_min: float = 1e-3):
        super().__init__()
        if num_steps < 1:
            raise ConfigError(f"process.num_steps must be >= 1, got {num_steps}")
        if not 0.0 <= eta <= 1.0:
            raise ConfigError(f"process.eta must be in [0, 1], got {eta}")
        if not 0.0 < t_min < 1.0:
            raise ConfigError(f"process.t_min must be in (0, 1), got {t_min}")
        self.mixture = mixture
        self.num_steps = int(num_steps)
        self.event_shape = (mixture.dim,)
        self.eta = float(eta)
        self.schedule = schedule
        self.t_min = float(t_min)

        abar = vp_schedule(num_steps, schedule, t_min)
        self._abar_end = float(abar[-1])
        a_t, a_s = abar[:-1], abar[1:]
        sigma = eta * torch.sqrt((1 - a_s) / (1 - a_t)) * torch.sqrt((1 - a_t / a_s).clamp(min=0))
        dir_coef = torch.sqrt((1 - a_s - sigma**2).clamp(min=0))
        # mean = c_x * x + c_score * score(x)
        c_x = torch.sqrt(a_s / a_t)
        c_score = torch.sqrt(a_s) * (1 - a_t) / torch.sqrt(a_t) - dir_coef * torch.sqrt(1 - a_t)
        d = mixture.dim
        eye = torch.eye(d, dtype=torch.float64)
        comp_means = torch.sqrt(a_t)[:, None, None] * mixture.means[None]  # (K, M, d)
        comp_covs = a_t[:, None, None, None] * mixture.covs[None] + (1 - a_t)[:, None, None, None] * eye
        comp_prec = torch.linalg.inv(comp_covs)  # (K, M, d, d)
        log_norm = torch.log(mixture.weights)[None] - 0.5 * torch.logdet(comp_covs)  # (K, M)
        # Isotropic components stay isotropic under noising: then C^-1 is a scalar per
        # component and the score needs no matrix products.
        scal = mixture.covs.diagonal(dim1=-2, dim2=-1)[:, :1]  # (M, 1)
        self.isotropic = bool(torch.allclose(mixture.covs, scal[..., None] * eye))
        f32 = torch.float32
        self.register_buffer("comp_prec_iso", comp_prec[..., 0, 0].to(f32))  # (K, M), used if isotropic
        self.register_buffer("abar", abar.to(f32))
        self.register_buffer("sigma", sigma.to(f32))
        self.register_buffer("c_x", c_x.to(f32))
        self.register_buffer("c_score", c_score.to(f32))
        self.register_buffer("comp_means", comp_means.to(f32))
        self.register_buffer("comp_prec", comp_prec.to(f32))
        self.register_buffer("log_norm", log_norm.to(f32))

    def initial(self, batch_size: int, *, generator: torch.Generator | None = None) -> Tensor:
        return torch.randn(batch_size, *self.event_shape, generator=generator, device=self.abar.device)

    def score(self, x: Tensor, k: int) -> Tensor:
        """Exact ``grad log p_t(x)`` at the noise level of step ``k``: ``(b, d)``."""
        diff = x[:, None, :] - self.comp_means[k]  # (b, M, d)
        if self.isotropic:
            pdiff = diff * self.comp_prec_iso[k][:, None]  # C^-1 (x - m)
        else:
            pdiff = torch.einsum("mij,bmj->bmi", self.comp_prec[k], diff)
        logits = self.log_norm[k] - 0.5 * (diff * pdiff).sum(-1)  # (b, M)
        resp = torch.softmax(logits, dim=-1)
        return -(resp[..., None] * pdiff).sum(1)

    def step(self, x: Tensor, k: int) -> GaussianStep:
        mean = self.c_x[k] * x + self.c_score[k] * self.score(x, k)
        return GaussianStep(mean, self.sigma[k])

    def terminal_law(self) -> GaussianMixture:
        """The exact law the chain targets at its end: the forward marginal at ``t_min``."""
        return self.mixture.noised(self._abar_end)
