"""Optimizers of the entropy-regularized objective, behind one interface.

``J(Q) = E_Q[r(x_K)] - alpha * sum_k E_Q[KL(q_k(.|x_k) || p_k(.|x_k))]``

A :class:`Strategy` performs one update of the policy from one batch of initial
states and reports the per-trajectory return ``r(x_K) - alpha * sum_k KL_k`` (which
ELEGANT regresses its value network on). It talks to the outside world through an
:class:`UpdateContext`, so it runs the same under Lightning (``manual_backward``, DDP)
and in a plain loop.

* :class:`DirectBackprop` -- reparameterized gradient through the sampled chain
  (differentiable rewards), with DRaFT-K truncation and gradient checkpointing.
* :class:`PolicyGradient` -- score-function gradient for black-box rewards with the KL
  as a per-step cost (DPOK) and the clipped importance ratio of PPO/DDPO.
* :class:`PathCrossEntropy` -- weighted maximum likelihood of the policy's own paths,
  weighted toward ``J``'s optimal path law (path integral cross-entropy): no reward
  gradient, no backprop through the chain.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .errors import ConfigError
from .process import ControlledProcess
from .reward import Reward
from .rollout import differentiable_rollout, sample_trajectories, step_generator

__all__ = ["UpdateContext", "UpdateOutput", "Strategy", "DirectBackprop", "PolicyGradient", "PathCrossEntropy",
           "make_strategy"]


@dataclass
class UpdateContext:
    """Everything a strategy needs for one update.

    Attributes:
        process: the controlled chain (trainable policy, frozen reference).
        reward: the reward (validated on every call).
        alpha: KL weight.
        x0: ``(b, *event_shape)`` initial states for this update.
        seed: seeds this update's noise.
        backward: accumulates gradients of a scalar loss (``loss.backward`` or Lightning's
            ``manual_backward``).
        optimizer_step: clips gradients, steps the optimizer, zeroes gradients; returns
            the gradient norm before clipping.
    """

    process: ControlledProcess
    reward: Reward
    alpha: float
    x0: Tensor
    seed: int
    backward: Callable[[Tensor], None]
    optimizer_step: Callable[[], float]


@dataclass
class UpdateOutput:
    """What an update reports.

    Attributes:
        x0: ``(b, *event_shape)`` the initial states used (detached).
        returns: ``(b,)`` ``r(x_K) - alpha * sum_k KL_k`` per trajectory (detached).
        metrics: scalar summaries (reward, kl, objective, feasible, grad_norm, ...).
    """

    x0: Tensor
    returns: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


class Strategy(ABC):
    """One way of improving the policy on ``J``."""

    #: Whether the strategy needs ``reward.differentiable``.
    requires_differentiable_reward: bool = False
    #: Whether the strategy needs ``alpha > 0``.
    requires_positive_alpha: bool = False

    @abstractmethod
    def update(self, ctx: UpdateContext) -> UpdateOutput:
        """Sample from the policy, compute the loss, and step the optimizer (possibly
        several times). Returns the trajectories' returns and metrics."""


def _summaries(reward: Tensor, path_kl: Tensor, objective: Tensor, feasible: Tensor) -> dict[str, float]:
    reward, path_kl, objective = reward.detach(), path_kl.detach(), objective.detach()
    return {
        "reward": float(reward.mean()),
        "kl": float(path_kl.mean()),
        "objective": float(objective.mean()),
        "feasible": float(feasible.float().mean()),
    }


class DirectBackprop(Strategy):
    """Maximize ``J`` by differentiating through the sampled chain.

    Gaussian steps are reparameterized; categorical steps use the straight-through
    Gumbel-softmax (as DRAKES does). The KL term is exact per step.

    Args:
        grad_steps: ``T``, truncate the gradient to the last ``T`` steps (DRaFT-K,
            AlignProp). ``None``: all ``K`` steps.
        checkpoint: gradient checkpointing per step (memory grows with ``K`` only by
            one state per step; each step's forward runs twice).
    """

    requires_differentiable_reward = True

    def __init__(self, grad_steps: int | None = None, checkpoint: bool = True):
        if grad_steps is not None and grad_steps < 1:
            raise ConfigError("strategy.grad_steps must be >= 1 (or null for all steps)")
        self.grad_steps = grad_steps
        self.checkpoint = checkpoint

    def update(self, ctx: UpdateContext) -> UpdateOutput:
        x, path_kl = differentiable_rollout(
            ctx.process, ctx.x0, seed=ctx.seed, grad_steps=self.grad_steps, checkpoint=self.checkpoint
        )
        out = ctx.reward(x)
        r = out.masked(ctx.reward.infeasible_value)
        objective = r - ctx.alpha * path_kl
        ctx.backward(-objective.mean())
        grad_norm = ctx.optimizer_step()
        metrics = _summaries(r, path_kl, objective, out.feasible)
        metrics["grad_norm"] = grad_norm
        return UpdateOutput(ctx.x0.detach(), objective.detach(), metrics)


def _sampled_paths(ctx: UpdateContext, ref_log_prob: bool = False) -> tuple:
    """Paths sampled from the policy without gradients, for the strategies that only evaluate
    the reward: ``(trajectory, reward output, masked reward, path KL, objective)``."""
    traj = sample_trajectories(ctx.process, x0=ctx.x0, seed=ctx.seed, kl=True, log_prob=True, states=True,
                               ref_log_prob=ref_log_prob)
    with torch.no_grad():
        out = ctx.reward(traj.x)
    r = out.masked(ctx.reward.infeasible_value)
    path_kl = traj.kl.sum(1)
    return traj, out, r, path_kl, r - ctx.alpha * path_kl


class PolicyGradient(Strategy):
    """Policy gradient for black-box rewards, the KL as a per-step cost.

    The exact gradient of ``J`` is
    ``E[sum_k grad log q_k(x_{k+1}|x_k) * A_k] - alpha * E[sum_k grad KL_k(x_k)]`` with the
    cost-to-go ``G_k = r(x_K) - alpha * sum_{j>k} KL_j`` (later KL terms depend on the action at
    step ``k``) and ``A_k = G_k - mean_batch(G_k)``. The first term is optimized through
    PPO's clipped ratio (DDPO), the second directly (DPOK). With one epoch and one
    minibatch the ratio is 1 and the update is the unbiased gradient of ``J``.

    Args:
        epochs: passes over each sampled batch.
        minibatches: minibatches per pass (one optimizer step each).
        clip_range: PPO clip ``epsilon`` on the ratio ``q_new / q_old``.
        normalize_advantages: divide advantages by their batch std (as DDPO does). This
            rescales the reward against the KL term, so it is off by default.
    """

    requires_differentiable_reward = False

    def __init__(self, epochs: int = 1, minibatches: int = 1, clip_range: float = 0.2,
                 normalize_advantages: bool = False):
        if epochs < 1 or minibatches < 1:
            raise ConfigError("strategy.epochs and strategy.minibatches must be >= 1")
        if clip_range <= 0:
            raise ConfigError("strategy.clip_range must be positive")
        self.epochs = epochs
        self.minibatches = minibatches
        self.clip_range = clip_range
        self.normalize_advantages = normalize_advantages

    @staticmethod
    def advantages(reward: Tensor, kl: Tensor, alpha: float, normalize: bool = False) -> Tensor:
        """``A_k`` from final rewards ``(b,)`` and per-step KL ``(b, K)``; returns ``(b, K)``."""
        future_kl = kl.flip(1).cumsum(1).flip(1) - kl  # sum_{j > k} KL_j
        G = reward[:, None] - alpha * future_kl
        A = G - G.mean(0, keepdim=True)
        if normalize:
            A = A / (G.std(0, keepdim=True) + 1e-8)
        return A

    def update(self, ctx: UpdateContext) -> UpdateOutput:
        proc = ctx.process
        traj, out, r, path_kl, objective = _sampled_paths(ctx)
        adv = self.advantages(r, traj.kl, ctx.alpha, self.normalize_advantages)
        b, K = adv.shape
        mb_size = math.ceil(b / self.minibatches)
        gen = step_generator(ctx.seed, -2, "cpu")
        clipped = total = 0
        grad_norms = []
        for _ in range(self.epochs):
            perm = torch.randperm(b, generator=gen).to(ctx.x0.device)
            for start in range(0, b, mb_size):
                idx = perm[start:start + mb_size]
                for k in range(K):
                    q, p = proc.step_pair(traj.states[k][idx], k)
                    log_q = q.log_prob(traj.states[k + 1][idx])
                    ratio = torch.exp(log_q - traj.log_prob[idx, k])
                    a = adv[idx, k]
                    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - self.clip_range, 1 + self.clip_range) * a)
                    # Sum over steps (J sums them), mean over the minibatch.
                    loss_k = -surrogate.mean() + ctx.alpha * q.kl(p).mean()
                    ctx.backward(loss_k)  # per step: memory does not grow with K
                    with torch.no_grad():
                        clipped += int(((ratio - 1).abs() > self.clip_range).sum())
                        total += idx.numel()
                grad_norms.append(ctx.optimizer_step())
        metrics = _summaries(r, path_kl, objective, out.feasible)
        metrics["grad_norm"] = float(sum(grad_norms) / len(grad_norms))
        metrics["clip_fraction"] = clipped / max(total, 1)
        return UpdateOutput(ctx.x0.detach(), objective.detach(), metrics)


class PathCrossEntropy(Strategy):
    """Path integral cross-entropy (Kappen & Ruiz 2016): fit the policy to ``J``'s optimal
    path law by weighted maximum likelihood of its own samples.

    ``J``'s maximizer over path laws is ``Q*(tau) ∝ P(tau) exp(r(x_K) / alpha)``, whose end
    law is the tilt ``p*(x) ∝ p(x) exp(r(x) / alpha)``. This strategy lowers the cross-entropy
    ``-E_{Q*}[log Q(tau)]`` (``KL(Q* || Q)`` up to a constant), estimated by importance
    sampling from the current policy: for paths ``tau_i ~ Q``,
    ``w_i ∝ exp(r_i / alpha) P(tau_i) / Q(tau_i)``, normalized over the batch (the path
    likelihood ratio is exact: the sum of the steps' log-probability differences), and the
    loss is ``-sum_i w_i log Q(tau_i)``. The reward is only evaluated, never differentiated,
    and each step's log-probability is differentiated at the sampled states, so memory does
    not grow with ``K``. At ``Q = Q*`` the weights are equal and the expected gradient is
    zero, whatever the batch size. The weights' effective sample size ``1 / sum_i w_i^2`` is
    reported as ``ess``: near 1 the update fits little more than the batch's best path,
    near the batch size ``Q`` is close to ``Q*``.

    The weights do not depend on the policy being trained, only on the one that sampled the
    paths, so one batch serves several updates (``reuse``): weighted maximum likelihood on
    a fixed sample. Sampling a batch costs two chains' forward passes per step, far more than
    the gradient on a few resampled paths, so reuse is cheap; but with a small ``ess`` the
    reused updates fit the batch's few heavy paths (on an Ehrlich round, ``reuse: 10`` took
    the model to KL 15 where the target has 3.7: benchmarks/sequences.md).

    Args:
        resample: take the gradient on this many paths drawn with probabilities ``w`` (with
            replacement; a path drawn ``m`` times counts ``m`` times but is evaluated once)
            instead of on every path with its weight. Cheaper when few weights count, which
            is the rule far from ``Q*``. ``None``: every path.
        reuse: updates per sampled batch (a fresh batch every ``reuse`` updates; each update
            resamples from it anew). The metrics of an update are its batch's.
    """

    requires_differentiable_reward = False
    requires_positive_alpha = True

    def __init__(self, resample: int | None = None, reuse: int = 1):
        if resample is not None and resample < 1:
            raise ConfigError("strategy.resample must be >= 1 (or null for every path)")
        if reuse < 1:
            raise ConfigError("strategy.reuse must be >= 1")
        if reuse > 1 and resample is None:
            raise ConfigError("strategy.reuse > 1 needs resample: with every path at its weight, each reuse "
                              "would repeat the same gradient")
        self.resample = resample
        self.reuse = reuse
        self._batch: tuple | None = None  # (process, updates served, traj, w, UpdateOutput)

    @staticmethod
    def weights(reward: Tensor, log_q: Tensor, log_p: Tensor, alpha: float) -> Tensor:
        """Normalized ``w_i ∝ exp(r_i / alpha) P(tau_i) / Q(tau_i)`` from final rewards ``(b,)``
        and the paths' per-step log-probabilities under ``Q`` and ``P`` ``(b, K)``."""
        if not alpha > 0:
            raise ConfigError(f"strategy 'cross_entropy' needs alpha > 0 (its target is exp(r / alpha)), got {alpha}")
        return torch.softmax(reward / alpha + (log_p - log_q).sum(1), dim=0)

    def _sample(self, ctx: UpdateContext) -> tuple:
        traj, out, r, path_kl, objective = _sampled_paths(ctx, ref_log_prob=True)
        w = self.weights(r, traj.log_prob, traj.ref_log_prob, ctx.alpha)
        metrics = _summaries(r, path_kl, objective, out.feasible)
        metrics["ess"] = float(1.0 / (w ** 2).sum())
        return traj, w, UpdateOutput(ctx.x0.detach(), objective.detach(), metrics)

    def update(self, ctx: UpdateContext) -> UpdateOutput:
        proc = ctx.process
        held = self._batch
        if held is None or held[0] is not proc or held[1] >= self.reuse:
            held = (proc, 0, *self._sample(ctx))
        _, served, traj, w, batch_out = held
        self._batch = (proc, served + 1, traj, w, batch_out)
        if self.resample is None:
            idx, coef = torch.arange(w.numel(), device=w.device), w
        else:
            gen = step_generator(ctx.seed, -2, "cpu")  # this update's seed: each reuse draws anew
            draws = torch.multinomial(w.cpu(), self.resample, replacement=True, generator=gen)
            idx, counts = torch.unique(draws, return_counts=True)
            idx, coef = idx.to(w.device), (counts.to(w) / self.resample).to(w.device)
        for k in range(proc.num_steps):
            log_q = proc.step(traj.states[k][idx], k).log_prob(traj.states[k + 1][idx])
            ctx.backward(-(coef * log_q).sum())  # per step: memory does not grow with K
        metrics = {**batch_out.metrics, "grad_norm": ctx.optimizer_step()}
        return UpdateOutput(batch_out.x0, batch_out.returns, metrics)


STRATEGIES: dict[str, type[Strategy]] = {"backprop": DirectBackprop, "policy_gradient": PolicyGradient,
                                         "cross_entropy": PathCrossEntropy}


def make_strategy(spec: "str | dict | Strategy", where: str = "strategy") -> Strategy:
    """Build a strategy from a name (``"backprop"``, ``"policy_gradient"``, ``"cross_entropy"``), a mapping
    ``{"name": ..., **options}``, or pass an instance through."""
    from .config import validate_kwargs

    if isinstance(spec, Strategy):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(f"{where}: expected a strategy name or a mapping with 'name'")
    options = dict(spec)
    name = options.pop("name")
    if name not in STRATEGIES:
        raise ConfigError(f"{where}.name: unknown strategy '{name}' (known: {', '.join(STRATEGIES)})")
    cls = STRATEGIES[name]
    return cls(**validate_kwargs(cls, options, where))
