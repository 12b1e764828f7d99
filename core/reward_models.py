"""Reward models with uncertainty, and the acquisitions SEIKO fine-tunes on.

A :class:`RewardModel` is fit on the feedback store's (design, observed value) pairs
over a domain featurizer ``phi(x)`` and exposes ``posterior(x) -> Posterior(mean, std)``,
differentiable in ``x`` so that backprop fine-tuning can climb it. Acquisitions read
only the posterior (BoTorch's model / posterior / acquisition split):

* :class:`UCB` -- ``mean + beta * std``;
* :class:`MaxOverHeads` -- the largest ensemble member (SEIKO's bootstrap optimism);
* :class:`Greedy` -- the mean;
* :class:`Thompson` -- one posterior draw per round (one head, or one weight sample).

Two models:

* :class:`EnsembleRewardModel` -- ``M`` MLP heads trained on bootstrap resamples,
  vectorized: all heads run as batched matrix products, and resampling is a per-head
  weight on each data point, so neither fitting nor prediction loops over heads or samples.
* :class:`LastLayerUCBRewardModel` -- an MLP ``f(x) = w^T psi(x)`` whose posterior std is
  ``sqrt(psi^T (Sigma + lambda I)^-1 psi)`` with the **uncentred** ``Sigma = sum_i psi_i psi_i^T``
  over the data (not a covariance: the bonus must shrink as data accumulates).

Targets are standardized for fitting; means and stds are reported in reward units.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .config import ConfigMixin, check_count, check_rate
from .errors import ConfigError, ShapeError
from .reward import Reward

__all__ = [
    "Posterior",
    "RewardModel",
    "EnsembleRewardModel",
    "LastLayerUCBRewardModel",
    "REWARD_MODELS",
    "BatchedMLP",
    "Acquisition",
    "UCB",
    "MaxOverHeads",
    "Greedy",
    "Thompson",
    "AcquisitionReward",
    "Flatten",
]


@dataclass
class Posterior:
    """Predictive distribution of the reward at ``b`` designs.

    Attributes:
        mean: ``(b,)``.
        std: ``(b,)``.
        members: ``(M, b)`` ensemble members, when the model is an ensemble.
    """

    mean: Tensor
    std: Tensor
    members: Tensor | None = None


class Flatten(ConfigMixin, nn.Module):
    """The default featurizer: ``phi(x) = flatten(x)``.

    Args:
        in_shape: shape of one design.
    """

    def __init__(self, in_shape: tuple[int, ...] | list[int]):
        super().__init__()
        self.register_to_config(in_shape=list(in_shape))
        self.out_dim = math.prod(in_shape)

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1)


class BatchedMLP(nn.Module):
    """``M`` independent MLPs evaluated together: ``(b, d) -> (M, b)``.

    Weights are stored as ``(M, in, out)`` and applied with ``baddbmm``.

    Args:
        num_models: ``M``.
        in_dim: input width.
        hidden: hidden width.
        depth: hidden layers (0: linear models).
    """

    def __init__(self, num_models: int, in_dim: int, hidden: int = 64, depth: int = 2):
        super().__init__()
        dims = [in_dim] + [hidden] * depth + [1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            w = torch.empty(num_models, d_in, d_out)
            bound = 1.0 / math.sqrt(d_in)
            nn.init.uniform_(w, -bound, bound)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(num_models, 1, d_out)))
        self.num_models = num_models

    def features(self, x: Tensor) -> Tensor:
        """Last hidden layer, ``(M, b, hidden)`` (the input itself when ``depth = 0``)."""
        h = x.unsqueeze(0).expand(self.num_models, *x.shape)  # (M, b, d)
        for w, b in zip(list(self.weights)[:-1], list(self.biases)[:-1]):
            h = torch.nn.functional.silu(torch.baddbmm(b, h, w))
        return h

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x)
        return torch.baddbmm(self.biases[-1], h, self.weights[-1]).squeeze(-1)  # (M, b)


class RewardModel(nn.Module, ABC):
    """A reward model with uncertainty over features ``phi(x)``.

    Args:
        featurizer: differentiable ``phi``: ``(b, *event_shape) -> (b, d)``.
        standardize_features: standardize ``phi`` with the data's mean and std.
        clip_features: clamp each feature of a design to the range it spans in the data the
            model was fit on. Without it, a design far outside the data in some feature (a
            homopolymer's letter-pair count of 63 where the data's are 0 to 12) gets whatever
            the network extrapolates, and an unbounded UCB width: a fine-tuned model can
            chase that width instead of the reward (see ``benchmarks/sequences.md``). With
            it, such a design is valued as the nearest point of the data's box, and the
            fine-tuning gets no gradient pushing that feature further out.
    """

    def __init__(self, featurizer: nn.Module, standardize_features: bool = True, clip_features: bool = False):
        super().__init__()
        self.featurizer = featurizer
        self.standardize_features = standardize_features
        self.clip_features = clip_features
        self.register_buffer("y_mean", torch.zeros(()))
        self.register_buffer("y_std", torch.ones(()))
        self.register_buffer("phi_mean", torch.zeros(0))
        self.register_buffer("phi_std", torch.ones(0))
        self.register_buffer("phi_low", torch.zeros(0))  # the data's range (standardized): clip_features
        self.register_buffer("phi_high", torch.zeros(0))
        self.fitted = False

    def _phi(self, x: Tensor) -> Tensor:
        phi = self.featurizer(x)
        if phi.dim() != 2:
            raise ShapeError(f"the featurizer must return (b, d), got {tuple(phi.shape)}")
        phi = (phi - self.phi_mean) / self.phi_std
        if self.clip_features and self.phi_low.numel():
            phi = torch.clamp(phi, min=self.phi_low, max=self.phi_high)
        return phi

    def _standardize(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if x.shape[0] != y.shape[0] or y.dim() != 1:
            raise ShapeError(f"fit needs designs (n, ...) and values (n,), got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.shape[0] < 2:
            raise ValueError("a reward model needs at least 2 feasible answered designs")
        with torch.no_grad():
            phi = self.featurizer(x).float()
            if self.standardize_features:
                # A feature constant in the data carries no scale: leave it unscaled rather
                # than divide by ~0 (a design that varies it would land at ~1e6).
                std = phi.std(0)
                self.phi_mean, self.phi_std = phi.mean(0), torch.where(std > 1e-6, std, torch.ones_like(std))
            else:
                self.phi_mean, self.phi_std = torch.zeros_like(phi[0]), torch.ones_like(phi[0])
            self.y_mean = y.float().mean()
            self.y_std = y.float().std().clamp_min(1e-6)
            phi = (phi - self.phi_mean) / self.phi_std
            self.phi_low, self.phi_high = phi.min(0).values, phi.max(0).values
            return phi, (y.float() - self.y_mean) / self.y_std

    def load_fitted(self, state: dict[str, Tensor]) -> "RewardModel":
        """Restore a fitted model from its ``state_dict()`` (the feature statistics, empty
        before a fit, take their sizes from it; a model saved before the feature range was
        kept restores with none, and so is not clipped)."""
        state = {"phi_low": torch.zeros(0), "phi_high": torch.zeros(0), **state}
        for name in ("phi_mean", "phi_std", "phi_low", "phi_high"):
            setattr(self, name, torch.empty_like(state[name]))
        self.load_state_dict(state)
        self.fitted = True
        return self

    @abstractmethod
    def fit(self, x: Tensor, y: Tensor, seed: int = 0) -> dict[str, float]:
        """Fit on designs ``x`` ``(n, *event_shape)`` and observed values ``y`` ``(n,)``."""

    @abstractmethod
    def posterior(self, x: Tensor) -> Posterior:
        """The predictive distribution at ``x`` (differentiable in ``x``)."""

    @abstractmethod
    def sample_function(self, generator: torch.Generator):
        """One posterior draw, as a function ``x -> (b,)`` (Thompson sampling)."""


def _check_options(hidden: int, depth: int, epochs: int, batch_size: int, lr: float, weight_decay: float) -> None:
    """The reward model's sizes and optimizer settings, checked when it is built (an online
    run builds one before its folder exists), not when its first fit fails on them."""
    for name, value, low in (("hidden", hidden, 1), ("depth", depth, 0), ("epochs", epochs, 1),
                             ("batch_size", batch_size, 1)):
        check_count("reward_model", name, value, low)
    check_rate("reward_model", "lr", lr, positive=True)
    check_rate("reward_model", "weight_decay", weight_decay, positive=False)


def _adam_fit(params, loss_fn, n: int, epochs: int, batch_size: int, lr: float, weight_decay: float,
              generator: torch.Generator) -> float:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    last = float("nan")
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            loss = loss_fn(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last = float(loss.detach())
    return last


class EnsembleRewardModel(RewardModel):
    """``M`` MLP heads on bootstrap resamples of the data (vectorized).

    Args:
        featurizer: ``phi``.
        in_dim: width of ``phi(x)``.
        num_heads: ``M``.
        hidden: hidden width of each head.
        depth: hidden layers of each head.
        bootstrap: resample the data per head (otherwise heads differ only by initialization).
        epochs: passes over the data per fit.
        batch_size: minibatch size.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        standardize_features: standardize each feature with the data's mean and std
            (``False`` for features already on a unit scale, such as sparse counts).
        clip_features: clamp each feature to the range it spans in the data
            (:class:`RewardModel`).
    """

    def __init__(self, featurizer: nn.Module, in_dim: int, num_heads: int = 8, hidden: int = 64, depth: int = 2,
                 bootstrap: bool = True, epochs: int = 200, batch_size: int = 256, lr: float = 3e-3,
                 weight_decay: float = 1e-4, standardize_features: bool = True, clip_features: bool = False):
        super().__init__(featurizer, standardize_features, clip_features)
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 2:
            raise ConfigError(f"reward_model.num_heads must be a whole number >= 2 for an ensemble, got {num_heads!r}")
        _check_options(hidden, depth, epochs, batch_size, lr, weight_decay)
        self.heads = BatchedMLP(num_heads, in_dim, hidden, depth)
        self.num_heads, self.bootstrap = num_heads, bootstrap
        self.epochs, self.batch_size, self.lr, self.weight_decay = epochs, batch_size, lr, weight_decay

    def fit(self, x: Tensor, y: Tensor, seed: int = 0) -> dict[str, float]:
        phi, yz = self._standardize(x, y)
        n = phi.shape[0]
        g = torch.Generator().manual_seed(seed)
        for w, b in zip(self.heads.weights, self.heads.biases):  # fresh heads each fit
            bound = 1.0 / math.sqrt(w.shape[1])
            with torch.no_grad():
                w.copy_(torch.rand(w.shape, generator=g) * 2 * bound - bound)
                b.zero_()
        if self.bootstrap:  # counts of each point in each head's resample: (M, n)
            counts = torch.stack([torch.bincount(torch.randint(n, (n,), generator=g), minlength=n)
                                  for _ in range(self.num_heads)]).float()
        else:
            counts = torch.ones(self.num_heads, n)

        def loss_fn(idx: Tensor) -> Tensor:
            pred = self.heads(phi[idx])  # (M, b)
            w = counts[:, idx]
            return ((pred - yz[idx]) ** 2 * w).sum() / w.sum().clamp_min(1.0)

        loss = _adam_fit(self.heads.parameters(), loss_fn, n, self.epochs, self.batch_size, self.lr,
                         self.weight_decay, g)
        self.fitted = True
        return {"fit_loss": loss, "num_data": n}

    def members(self, x: Tensor) -> Tensor:
        """Each head's prediction in reward units: ``(M, b)``."""
        return self.heads(self._phi(x)) * self.y_std + self.y_mean

    def posterior(self, x: Tensor) -> Posterior:
        m = self.members(x)
        return Posterior(mean=m.mean(0), std=m.std(0, correction=0), members=m)

    def sample_function(self, generator: torch.Generator):
        head = int(torch.randint(self.num_heads, (1,), generator=generator))
        return lambda x: self.members(x)[head]


class LastLayerUCBRewardModel(RewardModel):
    """An MLP whose last layer carries a linear-bandit confidence width.

    ``f(x) = w^T psi(x)`` with ``psi`` the last hidden layer (and a constant). After the
    fit, ``Sigma = sum_i psi_i psi_i^T`` over the data -- uncentred, so it only grows -- and
    ``std(x) = y_std * sqrt(psi(x)^T (Sigma + lambda I)^{-1} psi(x))``: SEIKO's bonus
    ``beta * sqrt(phi^T (Sigma + lambda I)^{-1} phi)`` in reward units once ``UCB(beta)`` is
    applied. With ``depth = 0``, ``psi`` is ``phi`` itself (a linear bandit).

    Args:
        featurizer: ``phi``.
        in_dim: width of ``phi(x)``.
        hidden: hidden width.
        depth: hidden layers (0: linear in ``phi``).
        lambda_: ridge ``lambda``.
        epochs: passes over the data per fit.
        batch_size: minibatch size.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        standardize_features: standardize each feature with the data's mean and std
            (``False`` for features already on a unit scale, such as sparse counts).
        clip_features: clamp each feature to the range it spans in the data
            (:class:`RewardModel`).
    """

    def __init__(self, featurizer: nn.Module, in_dim: int, hidden: int = 64, depth: int = 2, lambda_: float = 1.0,
                 epochs: int = 200, batch_size: int = 256, lr: float = 3e-3, weight_decay: float = 1e-4,
                 standardize_features: bool = True, clip_features: bool = False):
        super().__init__(featurizer, standardize_features, clip_features)
        if lambda_ <= 0:
            raise ConfigError("reward_model.lambda_ must be positive")
        _check_options(hidden, depth, epochs, batch_size, lr, weight_decay)
        self.net = BatchedMLP(1, in_dim, hidden, depth)
        self.lambda_ = lambda_
        self.epochs, self.batch_size, self.lr, self.weight_decay = epochs, batch_size, lr, weight_decay
        width = (hidden if depth > 0 else in_dim) + 1
        self.register_buffer("sigma_inv", torch.eye(width) / lambda_)  # (Sigma + lambda I)^-1
        self.register_buffer("num_data", torch.zeros((), dtype=torch.long))

    def _psi(self, phi: Tensor) -> Tensor:
        h = self.net.features(phi)[0]  # (b, hidden)
        return torch.cat([h, torch.ones_like(h[:, :1])], dim=-1)

    def fit(self, x: Tensor, y: Tensor, seed: int = 0) -> dict[str, float]:
        phi, yz = self._standardize(x, y)
        g = torch.Generator().manual_seed(seed)
        for w, b in zip(self.net.weights, self.net.biases):
            bound = 1.0 / math.sqrt(w.shape[1])
            with torch.no_grad():
                w.copy_(torch.rand(w.shape, generator=g) * 2 * bound - bound)
                b.zero_()
        loss = _adam_fit(self.net.parameters(), lambda idx: ((self.net(phi[idx])[0] - yz[idx]) ** 2).mean(),
                         phi.shape[0], self.epochs, self.batch_size, self.lr, self.weight_decay, g)
        self.update_confidence(x)
        self.fitted = True
        return {"fit_loss": loss, "num_data": phi.shape[0]}

    @torch.no_grad()
    def update_confidence(self, x: Tensor) -> None:
        """Recompute ``(Sigma + lambda I)^{-1}`` from designs ``x`` (features fixed)."""
        psi = self._psi(self._phi(x)).double()
        sigma = psi.T @ psi + self.lambda_ * torch.eye(psi.shape[1], dtype=torch.float64)
        self.sigma_inv = torch.linalg.inv(sigma).float()
        self.num_data = torch.tensor(x.shape[0])

    def posterior(self, x: Tensor) -> Posterior:
        phi = self._phi(x)
        mean = self.net(phi)[0] * self.y_std + self.y_mean
        psi = self._psi(phi)
        width = ((psi @ self.sigma_inv) * psi).sum(-1).clamp_min(1e-12).sqrt()
        return Posterior(mean=mean, std=width * self.y_std)

    def sample_function(self, generator: torch.Generator):
        # w ~ N(w_hat, (Sigma + lambda I)^-1) on the last layer (standardized units)
        w_hat = torch.cat([self.net.weights[-1][0, :, 0], self.net.biases[-1][0, 0]]).detach()
        chol = torch.linalg.cholesky(self.sigma_inv.double()).float()
        w = w_hat + chol @ torch.randn(w_hat.shape, generator=generator)
        return lambda x: (self._psi(self._phi(x)) @ w) * self.y_std + self.y_mean


# --------------------------------------------------------------------------- acquisitions


class Acquisition(ABC):
    """Turns a reward model into the (optimistic) reward to fine-tune on."""

    def prepare(self, model: RewardModel, generator: torch.Generator) -> None:
        """Called once per round after the model is fit (Thompson draws here)."""

    def value(self, model: RewardModel, x: Tensor) -> Tensor:
        """The acquisition value at ``x``: ``(b,)``."""
        return self.from_posterior(model.posterior(x))

    def from_posterior(self, posterior: Posterior) -> Tensor:
        raise NotImplementedError


class UCB(Acquisition):
    """``mean + beta * std``.

    Args:
        beta: optimism.
    """

    def __init__(self, beta: float = 1.0):
        self.beta = beta

    def from_posterior(self, posterior: Posterior) -> Tensor:
        return posterior.mean + self.beta * posterior.std


class MaxOverHeads(Acquisition):
    """The largest ensemble member at each design (SEIKO's bootstrap choice)."""

    def from_posterior(self, posterior: Posterior) -> Tensor:
        if posterior.members is None:
            raise ConfigError("max-over-heads optimism needs an ensemble reward model")
        return posterior.members.max(0).values


class Greedy(Acquisition):
    """The posterior mean: no optimism."""

    def from_posterior(self, posterior: Posterior) -> Tensor:
        return posterior.mean


class Thompson(Acquisition):
    """One posterior draw per round: a random head, or a last-layer weight sample."""

    def __init__(self):
        self._fn = None

    def prepare(self, model: RewardModel, generator: torch.Generator) -> None:
        self._fn = model.sample_function(generator)

    def value(self, model: RewardModel, x: Tensor) -> Tensor:
        if self._fn is None:
            raise RuntimeError("Thompson.prepare() must be called after the model is fit")
        return self._fn(x)


class AcquisitionReward(Reward):
    """A fitted reward model plus an acquisition, as a differentiable reward.

    Args:
        model: the fitted reward model (its parameters are frozen here).
        acquisition: how to turn its posterior into a value.
        name: name in logs.
    """

    differentiable = True

    def __init__(self, model: RewardModel, acquisition: Acquisition, name: str = "acquisition"):
        super().__init__()
        self.model = model
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.acquisition = acquisition
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    def evaluate(self, x: Tensor) -> Tensor:
        return self.acquisition.value(self.model, x)


#: The reward-model kinds by name (:func:`make_reward_model`).
REWARD_MODELS = {"ensemble": EnsembleRewardModel, "ucb": LastLayerUCBRewardModel}


def make_reward_model(kind: Literal["ensemble", "ucb"], featurizer: nn.Module, in_dim: int, **options) -> RewardModel:
    """Build a reward model by name (``"ensemble"`` or ``"ucb"``) with validated options."""
    from .config import validate_kwargs

    if kind not in REWARD_MODELS:
        raise ConfigError(f"reward_model.kind: unknown '{kind}' (known: {', '.join(REWARD_MODELS)})")
    cls = REWARD_MODELS[kind]
    return cls(featurizer, in_dim, **validate_kwargs(cls, options, "reward_model", skip=("featurizer", "in_dim")))
