"""The toy domain: the analytic Gaussian-mixture diffusion, as a difftilt plugin.

This file is the template for writing a plugin (see the README, "Writing a plugin"):
subclass :class:`~difftilt.core.plugins.Domain`, register factories for processes and
rewards (their signatures are the config schema), optionally add evaluation, and
declare the class under the ``difftilt.plugins`` entry-point group.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from difftilt.core.plugins import Domain
from difftilt.core.process import Process
from difftilt.core.reward import Reward

from .mixture import GaussianMixture, sliced_w2_to_mixture
from .process import MixtureDiffusionProcess
from .rewards import BumpsReward, LinearReward, QuadraticReward

__all__ = ["ToyDomain", "make_mixture_process", "exactness_metrics", "DEFAULT_MIXTURE"]

#: The default 2-D mixture: three well separated, unequal components.
DEFAULT_MIXTURE = {
    "weights": [0.5, 0.3, 0.2],
    "means": [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]],
    "stds": 0.5,
}


def make_mixture_process(
    weights: list[float] = DEFAULT_MIXTURE["weights"],
    means: list[list[float]] = DEFAULT_MIXTURE["means"],
    stds: float | list[float] | None = None,
    covs: list[list[list[float]]] | None = None,
    num_steps: int = 100,
    eta: float = 0.3,
    schedule: Literal["cosine", "linear"] = "cosine",
    t_min: float = 1e-3,
) -> MixtureDiffusionProcess:
    """The pretrained chain of a Gaussian mixture (the default is a 3-component 2-D one).

    Args:
        weights: component weights (positive, summing to 1).
        means: component means, one point each.
        stds: isotropic component stds (one number, or one per component). Default 0.5.
        covs: full component covariances instead of ``stds``.
        num_steps: ``K``.
        eta: DDIM stochasticity (1: DDPM; 0: deterministic, refused by KL fine-tuning). The
            default 0.3 keeps enough of ``x_0`` in ``x_K`` that fixing the initial law at
            ``N(0, I)`` visibly misses ``p*`` -- the regime ELEGANT is for. At ``eta = 1`` the
            initial noise carries almost no information and drift-only is nearly exact.
        schedule: ``"cosine"`` or ``"linear"``.
        t_min: final diffusion time.
    """
    if covs is not None:
        mixture = GaussianMixture(weights, means, covs)
    else:
        mixture = GaussianMixture.isotropic(weights, means, 0.5 if stds is None else stds)
    return MixtureDiffusionProcess(mixture, num_steps=num_steps, eta=eta, schedule=schedule, t_min=t_min)


def exactness_metrics(x: Tensor, process: MixtureDiffusionProcess, reward: Reward, alpha: float) -> dict[str, float]:
    """Compare samples ``x`` ``(n, d)`` with the exact tilted target ``p* ∝ p_pre exp(r / alpha)``.

    Returns ``sw2`` (sliced 2-Wasserstein to ``p*``), ``mean_error`` (largest per-coordinate
    ``|mean(x) - mean(p*)|`` in units of the pretrained law's std), ``weight_error``
    (largest ``|mean responsibility - w*|`` over components, responsibilities under
    ``p*``), ``target_reward`` (``E_{p*}[r]`` by exact sampling) and the target's means
    and weights. Empty if the reward has no analytic tilt or ``alpha <= 0``.
    """
    if alpha <= 0 or not hasattr(reward, "tilt"):
        return {}
    base = process.terminal_law()
    target = reward.tilt(base, alpha)
    x64 = x.detach().cpu().to(torch.float64)
    scale = base.std()
    mean_err = ((x64.mean(0) - target.mean()).abs() / scale).max()
    weights = target.responsibilities(x64).mean(0)
    exact = target.sample(100_000, torch.Generator().manual_seed(1234))
    with torch.no_grad():
        target_reward = reward(exact.to(torch.float32)).value.double().mean()
    return {
        "sw2": sliced_w2_to_mixture(x64, target),
        "mean_error": float(mean_err),
        "weight_error": float((weights - target.weights).abs().max()),
        "target_reward": float(target_reward),
        "target_mean": target.mean().tolist(),
        "target_weights": target.weights.tolist(),
        "sample_weights": weights.tolist(),
    }


class ToyDomain(Domain):
    """Gaussian-mixture diffusion with the exact score, and rewards with exact tilts."""

    name = "toy"
    description = "analytic Gaussian-mixture diffusion (exact score, exact tilted target p*)"
    processes = {"mixture": make_mixture_process}
    rewards = {"linear": LinearReward, "quadratic": QuadraticReward, "bumps": BumpsReward}

    def evaluate(self, x: Tensor, *, process: Process, reward: Reward, alpha: float) -> dict:
        if not isinstance(process, MixtureDiffusionProcess):
            return {}
        return exactness_metrics(x, process, reward, alpha)
