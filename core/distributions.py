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
  copied over unchanged;
* :class:`SinglePositionStep` -- one open position is picked (uniformly, or by given
  weights) and only it moves, to a categorical draw: the exact continuous-time reverse
  step of a masked diffusion (unmask one position at a time, the "first-hitting"
  sampler), which never decides two neighbours independently in the same step.

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

__all__ = ["StepDistribution", "GaussianStep", "CategoricalStep", "SinglePositionStep"]


#: A finite "log 0": ``exp()`` of it is exactly 0 in float32, and it keeps KL and its
#: gradient free of ``inf - inf`` where an infinite one would not.
LOG_ZERO = -1.0e4


def _sum_event(t: Tensor) -> Tensor:
    """Sum over every dimension after the first (the batch)."""
    return t.reshape(t.shape[0], -1).sum(-1)


def _gumbel(shape: torch.Size | tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard Gumbel noise of ``shape`` on ``like``'s device and dtype."""
    u = torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype)
    eps = torch.finfo(u.dtype).eps
    return -torch.log(-torch.log(u.clamp(eps, 1.0 - eps)))  # open interval: both logs finite


def _one_hot_draw(z: Tensor, tau: float, relaxed: bool) -> Tensor:
    """One-hot argmax of Gumbel-perturbed logits ``z``; straight-through Gumbel-softmax if ``relaxed``
    (the hard one-hot forward, the gradient of ``softmax(z / tau)`` backward)."""
    hard = torch.nn.functional.one_hot(z.argmax(-1), z.shape[-1]).to(z.dtype)
    if not relaxed:
        return hard
    soft = torch.softmax(z / tau, dim=-1)
    return hard - soft.detach() + soft


def _categorical_kl(log_q: Tensor, log_p: Tensor) -> Tensor:
    """``sum_j q_j (log q_j - log p_j)`` over the last dimension; ``q_j = 0`` contributes 0."""
    return torch.where(log_q.isneginf(), torch.zeros_like(log_q), log_q.exp() * (log_q - log_p)).sum(-1)


def _check_categorical(kind: str, logits: Tensor, current: Tensor, positions: Tensor, name: str, tau: float) -> None:
    """Shape checks shared by the one-hot step kinds: logits ``(b, L, S)``, a matching state,
    a ``(b, L)`` bool position mask and a positive temperature."""
    if logits.dim() != 3:
        raise ShapeError(f"{kind} logits must be (batch, length, states), got {tuple(logits.shape)}")
    if current.shape != logits.shape:
        raise ShapeError(f"current state {tuple(current.shape)} must match logits {tuple(logits.shape)}")
    if positions.shape != logits.shape[:2] or positions.dtype != torch.bool:
        raise ShapeError(f"{name} must be a bool tensor of shape {tuple(logits.shape[:2])}")
    if tau <= 0:
        raise ValueError("tau must be positive")


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


class _OneHotStep(StepDistribution):
    """What the one-hot step kinds share: ``logits`` ``(b, L, S)`` over each position's new
    state, draws by Gumbel-max (straight-through Gumbel-softmax for :meth:`rsample`), and
    the shape checks of states, tilt fields and the other side of a KL."""

    logits: Tensor
    tau: float

    @property
    def batch_size(self) -> int:
        return self.logits.shape[0]

    @property
    def log_probs(self) -> Tensor:
        """Normalized log-probabilities of each position's new state, ``(b, L, S)``."""
        return torch.log_softmax(self.logits, dim=-1)

    @abstractmethod
    def _draw(self, generator: torch.Generator | None, relaxed: bool) -> Tensor:
        """A draw of ``x_{k+1}``: hard one-hot, or straight-through relaxed if ``relaxed``."""

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        with torch.no_grad():
            return self._draw(generator, relaxed=False)

    def rsample(self, generator: torch.Generator | None = None) -> Tensor:
        """Straight-through Gumbel-softmax: a hard one-hot forward, the relaxed gradient backward
        (for a single-position step, the pick itself is not differentiated)."""
        return self._draw(generator, relaxed=True)

    def _check_state(self, x: Tensor, what: str) -> None:
        if x.shape != self.logits.shape:
            raise ShapeError(f"{what} must have shape {tuple(self.logits.shape)}, got {tuple(x.shape)}")

    def _check_other(self, other: StepDistribution) -> None:
        if not isinstance(other, type(self)):
            raise TypeError(f"KL between {type(self).__name__} and {type(other).__name__} is not defined")
        if other.logits.shape != self.logits.shape:
            raise ShapeError(f"KL between steps of shapes {tuple(self.logits.shape)} and {tuple(other.logits.shape)}")


class CategoricalStep(_OneHotStep):
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
        if frozen is None:
            frozen = torch.zeros(logits.shape[:2], dtype=torch.bool, device=logits.device)
        _check_categorical("CategoricalStep", logits, current, frozen, "frozen", tau)
        self.logits = logits
        self.current = current
        self.frozen = frozen
        self.tau = tau

    @property
    def is_deterministic(self) -> bool:
        return bool(self.frozen.all())

    def _draw(self, generator: torch.Generator | None, relaxed: bool) -> Tensor:
        z = self.logits + _gumbel(self.logits.shape, self.logits, generator)
        return torch.where(self.frozen[..., None], self.current, _one_hot_draw(z, self.tau, relaxed))

    def log_prob(self, x: Tensor) -> Tensor:
        self._check_state(x, "log_prob's one-hot states")
        per_pos = (x * self.log_probs).sum(-1)  # (b, L)
        return per_pos.masked_fill(self.frozen, 0.0).sum(-1)

    def kl(self, other: StepDistribution) -> Tensor:
        self._check_other(other)
        if not torch.equal(self.frozen, other.frozen):
            raise ValueError("KL between categorical steps from different states (their frozen positions differ)")
        return _categorical_kl(self.log_probs, other.log_probs).masked_fill(self.frozen, 0.0).sum(-1)

    def tilted(self, h: Tensor) -> "CategoricalStep":
        # Categorical(softmax(l)) * exp(h) is Categorical(softmax(l + h)).
        self._check_state(h, "tilt field")
        return CategoricalStep(self.logits + h, self.current, self.frozen, self.tau)


class SinglePositionStep(_OneHotStep):
    """Move exactly one open position: pick it with probabilities ``w``, then draw its new state.

    The law of ``x_{k+1}`` is the mixture ``sum_l w_l q_l``, where ``q_l`` replaces
    position ``l`` of the current state by a draw from ``softmax(logits[l])`` and keeps
    every other position. Different ``l`` give different next states, so the mixture's
    KL is exact in closed form: ``KL(w || w') + sum_l w_l KL(q_l || q'_l)``, and its
    log-probability is ``log w_l + log q_l(v)`` for the position ``l`` that changed.

    Args:
        logits: ``(b, L, S)`` log-probabilities (unnormalized) of the new state of each
            position if it is the one picked. Give ``-inf``-like logits to states a
            position may not move to (e.g. staying masked).
        current: ``(b, L, S)`` one-hot (or straight-through relaxed) current state.
        open: ``(b, L)`` bool, the positions that may be picked (at least one per sample).
        log_weights: ``(b, L)`` unnormalized log-probabilities of picking each open
            position; uniform over the open positions if ``None``.
        tau: temperature of the straight-through Gumbel-softmax in :meth:`rsample`.
    """

    def __init__(self, logits: Tensor, current: Tensor, open: Tensor, log_weights: Tensor | None = None,
                 tau: float = 1.0):
        _check_categorical("SinglePositionStep", logits, current, open, "open", tau)
        if not bool(open.any(-1).all()):
            raise ValueError("SinglePositionStep needs at least one open position in every sample")
        if log_weights is None:
            log_weights = torch.zeros(open.shape, dtype=logits.dtype, device=logits.device)
        if log_weights.shape != open.shape:
            raise ShapeError(f"log_weights must have shape {tuple(open.shape)}, got {tuple(log_weights.shape)}")
        self.logits, self.current, self.open, self.tau = logits, current, open, tau
        self.log_weights = torch.log_softmax(log_weights.masked_fill(~open, LOG_ZERO), dim=-1)  # closed: log 0

    @property
    def is_deterministic(self) -> bool:
        return False

    def _pick(self, generator: torch.Generator | None) -> Tensor:
        """``(b,)`` index of the picked position (Gumbel-max over the log-weights)."""
        return (self.log_weights + _gumbel(self.open.shape, self.logits, generator)).argmax(-1)

    def _draw(self, generator: torch.Generator | None, relaxed: bool) -> Tensor:
        idx = self._pick(generator)
        logits = self.logits[torch.arange(idx.shape[0], device=idx.device), idx]  # (b, S): the picked position's
        pick = torch.nn.functional.one_hot(idx, self.open.shape[1]).to(self.logits.dtype)  # (b, L)
        new = _one_hot_draw(logits + _gumbel(logits.shape, logits, generator), self.tau, relaxed)
        return self.current + pick[..., None] * (new[:, None, :] - self.current)

    def log_prob(self, x: Tensor) -> Tensor:
        self._check_state(x, "log_prob's one-hot states")
        changed = (x.argmax(-1) != self.current.argmax(-1)) & self.open  # (b, L)
        if not bool((changed.sum(-1) == 1).all()):
            raise ValueError("log_prob of a state that does not differ from the current one at exactly one open position")
        per_pos = (x * self.log_probs).sum(-1) + self.log_weights
        return per_pos.masked_fill(~changed, 0.0).sum(-1)

    def kl(self, other: StepDistribution) -> Tensor:
        self._check_other(other)
        if not torch.equal(self.open, other.open):
            raise ValueError("KL between single-position steps from different states (their open positions differ)")
        per_pos = _categorical_kl(self.log_probs, other.log_probs)
        w_q, w_p = self.log_weights, other.log_weights
        w_term = w_q.exp() * (w_q - w_p) + w_q.exp() * per_pos  # KL of the pick + weighted KL of the draws
        return w_term.masked_fill(~self.open, 0.0).sum(-1)

    def tilted(self, h: Tensor) -> "SinglePositionStep":
        # sum_l w_l q_l(x') exp(<h, x'>): with x' = current except v at l, <h, x'> = <h, current>
        # - h[l, cur_l] + h[l, v]; so q_l's logits move by h[l] and w_l is multiplied by
        # sum_v q_l(v) exp(h[l, v] - h[l, cur_l]).
        self._check_state(h, "tilt field")
        h_cur = (h * self.current).sum(-1)  # (b, L)
        log_z = torch.logsumexp(self.log_probs + h, dim=-1) - h_cur
        return SinglePositionStep(self.logits + h, self.current, self.open, self.log_weights + log_z, self.tau)
