"""One transition of a generative chain: the law of ``x_{k+1}`` given ``x_k``.

A :class:`~difftilt.core.process.Process` returns a :class:`StepDistribution` from
``step(x, k)``. It carries what every objective needs: sampling (plain and
reparameterized), log-probabilities for policy gradients, and the exact KL
divergence between two transitions from the same state, summed over all event
dimensions (never averaged: averaging silently rescales ``alpha``).

Two kinds cover the domains difftilt supports:

* :class:`GaussianStep` -- ``N(mean, std^2 I)`` with one std per sample or per batch
  (DDPM, DDIM with ``eta > 0``, Euler--Maruyama steps of a reverse SDE);
* :class:`CategoricalStep` -- independent categoricals per position, with positions
  that are already decided ("frozen", e.g. unmasked tokens of a masked diffusion)
  copied over unchanged.

Both expose :meth:`StepDistribution.tilted`, the exponential tilt
``p(x') exp(<h, x'>) / Z``. It is the form the optimal entropy-regularized control
takes to first order (``h = grad v / alpha``), and it stays in the family: a
Gaussian's mean moves by ``std^2 h``, a categorical's logits move by ``h``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from .errors import DeterministicStepError, ShapeError

__all__ = ["StepDistribution", "GaussianStep", "CategoricalStep"]


def _sum_event(t: Tensor) -> Tensor:
    """Sum over every dimension after the first (the batch)."""
    return t.reshape(t.shape[0], -1).sum(-1)


class StepDistribution(ABC):
    """Law of ``x_{k+1}`` given ``x_k``, for a batch of ``b`` states.

    Every method that returns a per-sample quantity returns shape ``(b,)``, summed
    over the event dimensions.
    """

    @property
    @abstractmethod
    def batch_size(self) -> int:
        """Number of states ``b`` in the batch."""

    @property
    @abstractmethod
    def is_deterministic(self) -> bool:
        """Whether the transition puts all its mass on one point (no finite KL)."""

    @abstractmethod
    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``x_{k+1}`` without gradient: ``(b, *event_shape)``."""

    @abstractmethod
    def rsample(self, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``x_{k+1}`` differentiably in the distribution's parameters."""

    @abstractmethod
    def log_prob(self, x: Tensor) -> Tensor:
        """``log q(x | x_k)`` summed over event dimensions, ``(b,)``."""

    @abstractmethod
    def kl(self, other: "StepDistribution") -> Tensor:
        """Exact ``KL(self || other)`` per sample, summed over event dimensions, ``(b,)``."""

    @abstractmethod
    def tilted(self, h: Tensor) -> "StepDistribution":
        """The tilt ``p(x') exp(<h, x'>) / Z`` for a field ``h`` shaped like a state."""


class GaussianStep(StepDistribution):
    """``x_{k+1} ~ N(mean, std^2 I)``.

    Args:
        mean: ``(b, *event_shape)`` float tensor.
        std: a float, a 0-d tensor, or a tensor broadcastable to ``mean`` (e.g.
            ``(b, 1, ...)`` for one std per sample). Must be ``>= 0``; a zero std is a
            deterministic step, which can be sampled but has no finite KL.
    """

    def __init__(self, mean: Tensor, std: float | Tensor):
        if mean.dim() < 2:
            raise ShapeError(f"GaussianStep mean must be (batch, *event_shape), got shape {tuple(mean.shape)}")
        std_t = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
        try:
            torch.broadcast_shapes(std_t.shape, mean.shape)
        except RuntimeError as err:
            raise ShapeError(f"std of shape {tuple(std_t.shape)} does not broadcast to mean {tuple(mean.shape)}") from err
        if torch.any(std_t < 0):
            raise ShapeError("GaussianStep std must be non-negative")
        self.mean = mean
        self.std = std_t
        self._deterministic = bool(torch.any(std_t == 0))

    @classmethod
    def _unchecked(cls, mean: Tensor, std: Tensor, deterministic: bool) -> "GaussianStep":
        # Internal fast path for derived steps (tilts) whose std was validated already.
        step = cls.__new__(cls)
        step.mean, step.std, step._deterministic = mean, std, deterministic
        return step

    @property
    def batch_size(self) -> int:
        return self.mean.shape[0]

    @property
    def is_deterministic(self) -> bool:
        return self._deterministic

    def _noise(self, generator: torch.Generator | None) -> Tensor:
        return torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        with torch.no_grad():
            return self.mean + self.std * self._noise(generator)

    def rsample(self, generator: torch.Generator | None = None) -> Tensor:
        return self.mean + self.std * self._noise(generator)

    def _require_stochastic(self, what: str) -> None:
        if self.is_deterministic:
            raise DeterministicStepError(
                f"{what} of a deterministic Gaussian step (std = 0, e.g. DDIM with eta = 0) is undefined: "
                "the KL between two different deterministic samplers is infinite. Use a stochastic sampler (eta > 0)."
            )

    def log_prob(self, x: Tensor) -> Tensor:
        self._require_stochastic("the log-probability")
        if x.shape != self.mean.shape:
            raise ShapeError(f"log_prob expects shape {tuple(self.mean.shape)}, got {tuple(x.shape)}")
        z = (x - self.mean) / self.std
        log_std = torch.log(self.std).expand_as(self.mean)
        d = self.mean[0].numel()
        return -0.5 * _sum_event(z * z) - _sum_event(log_std) - 0.5 * d * math.log(2 * math.pi)

    def kl(self, other: StepDistribution) -> Tensor:
        if not isinstance(other, GaussianStep):
            raise TypeError(f"KL between GaussianStep and {type(other).__name__} is not defined")
        if other.mean.shape != self.mean.shape:
            raise ShapeError(f"KL between steps of shapes {tuple(self.mean.shape)} and {tuple(other.mean.shape)}")
        self._require_stochastic("the KL divergence")
        other._require_stochastic("the KL divergence")
        diff = self.mean - other.mean
        if self.std is other.std or torch.equal(self.std, other.std):
            # Shared std s_k (the usual case): ||mu_q - mu_p||^2 / (2 s_k^2), summed.
            # (z * z, not z ** 2: pow's backward is several times slower on CPU.)
            z = diff / self.std
            return 0.5 * _sum_event(z * z)
        ratio2 = (self.std / other.std) * (self.std / other.std)
        z = diff / other.std
        per_dim = 0.5 * (ratio2 + z * z - 1.0 - torch.log(ratio2))
        return _sum_event(per_dim.expand_as(self.mean))

    def tilted(self, h: Tensor) -> "GaussianStep":
        # N(m, s^2) * exp(<h, x>) is N(m + s^2 h, s^2).
        if h.shape != self.mean.shape:
            raise ShapeError(f"tilt field must have shape {tuple(self.mean.shape)}, got {tuple(h.shape)}")
        return GaussianStep._unchecked(self.mean + (self.std * self.std) * h, self.std, self._deterministic)


class CategoricalStep(StepDistribution):
    """Independent categorical transitions per position, states as one-hot vectors.

    Args:
        logits: ``(b, L, S)`` unnormalized log-probabilities over ``S`` states
            (tokens, and the mask state for masked diffusion) at each of ``L`` positions.
        current: ``(b, L, S)`` one-hot (or straight-through relaxed) current state ``x_k``.
        frozen: ``(b, L)`` bool, positions that copy ``current`` unchanged (already
            unmasked tokens). They contribute zero KL and zero log-probability.
        tau: temperature of the straight-through Gumbel-softmax in :meth:`rsample`.
    """

    def __init__(self, logits: Tensor, current: Tensor, frozen: Tensor | None = None, tau: float = 1.0):
        if logits.dim() != 3:
            raise ShapeError(f"CategoricalStep logits must be (batch, length, states), got {tuple(logits.shape)}")
        if current.shape != logits.shape:
            raise ShapeError(f"current state {tuple(current.shape)} must match logits {tuple(logits.shape)}")
        if frozen is None:
            frozen = torch.zeros(logits.shape[:2], dtype=torch.bool, device=logits.device)
        if frozen.shape != logits.shape[:2] or frozen.dtype != torch.bool:
            raise ShapeError(f"frozen must be a bool tensor of shape {tuple(logits.shape[:2])}")
        if tau <= 0:
            raise ValueError("tau must be positive")
        self.logits = logits
        self.current = current
        self.frozen = frozen
        self.tau = tau

    @property
    def batch_size(self) -> int:
        return self.logits.shape[0]

    @property
    def is_deterministic(self) -> bool:
        return bool(self.frozen.all())

    @property
    def log_probs(self) -> Tensor:
        """Normalized log-probabilities, ``(b, L, S)``."""
        return torch.log_softmax(self.logits, dim=-1)

    def _gumbel(self, generator: torch.Generator | None) -> Tensor:
        u = torch.rand(self.logits.shape, generator=generator, device=self.logits.device, dtype=self.logits.dtype)
        eps = torch.finfo(u.dtype).eps
        u = u.clamp(eps, 1.0 - eps)  # open interval: both logs finite
        return -torch.log(-torch.log(u))

    def _keep_frozen(self, x_new: Tensor) -> Tensor:
        return torch.where(self.frozen[..., None], self.current, x_new)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        with torch.no_grad():
            idx = (self.logits + self._gumbel(generator)).argmax(-1)
            hard = torch.nn.functional.one_hot(idx, self.logits.shape[-1]).to(self.logits.dtype)
            return self._keep_frozen(hard)

    def rsample(self, generator: torch.Generator | None = None) -> Tensor:
        """Straight-through Gumbel-softmax: a hard one-hot forward, the relaxed gradient backward."""
        soft = torch.softmax((self.logits + self._gumbel(generator)) / self.tau, dim=-1)
        hard = torch.nn.functional.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
        return self._keep_frozen(hard - soft.detach() + soft)

    def log_prob(self, x: Tensor) -> Tensor:
        if x.shape != self.logits.shape:
            raise ShapeError(f"log_prob expects one-hot states of shape {tuple(self.logits.shape)}, got {tuple(x.shape)}")
        per_pos = (x * self.log_probs).sum(-1)  # (b, L)
        return per_pos.masked_fill(self.frozen, 0.0).sum(-1)

    def kl(self, other: StepDistribution) -> Tensor:
        if not isinstance(other, CategoricalStep):
            raise TypeError(f"KL between CategoricalStep and {type(other).__name__} is not defined")
        if other.logits.shape != self.logits.shape:
            raise ShapeError(f"KL between steps of shapes {tuple(self.logits.shape)} and {tuple(other.logits.shape)}")
        if not torch.equal(self.frozen, other.frozen):
            raise ValueError("KL between categorical steps from different states (their frozen positions differ)")
        log_q, log_p = self.log_probs, other.log_probs
        # sum_j q_j (log q_j - log p_j); xlogy-style guard so q_j = 0 contributes 0.
        per_pos = torch.where(log_q.isneginf(), torch.zeros_like(log_q), log_q.exp() * (log_q - log_p)).sum(-1)
        return per_pos.masked_fill(self.frozen, 0.0).sum(-1)

    def tilted(self, h: Tensor) -> "CategoricalStep":
        # Categorical(softmax(l)) * exp(h) is Categorical(softmax(l + h)).
        if h.shape != self.logits.shape:
            raise ShapeError(f"tilt field must have shape {tuple(self.logits.shape)}, got {tuple(h.shape)}")
        return CategoricalStep(self.logits + h, self.current, self.frozen, self.tau)
