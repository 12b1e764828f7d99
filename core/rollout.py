"""Running chains: plain sampling with per-step KL and log-probabilities, and the
differentiable rollout used by direct reward backpropagation.

Noise is drawn per step from a generator seeded by ``(seed, k)``. Re-running a step
therefore reproduces its noise exactly, which is what lets gradient checkpointing
recompute a step in the backward pass without storing the noise or stashing the
global RNG state: with checkpointing, the memory kept per step is the step's input
state only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .process import ControlledProcess, Process

__all__ = ["Trajectory", "step_generator", "sample_trajectories", "differentiable_rollout"]

_MASK63 = (1 << 63) - 1


def step_generator(seed: int, k: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for step ``k`` of the rollout seeded by ``seed`` (deterministic, cheap)."""
    g = torch.Generator(device=device)
    # splitmix-style mixing so nearby (seed, k) pairs give unrelated streams
    z = (seed * 0x9E3779B97F4A7C15 + (k + 1) * 0xBF58476D1CE4E5B9) & _MASK63
    z ^= z >> 31
    g.manual_seed(z & _MASK63)
    return g


@dataclass
class Trajectory:
    """A batch of sampled chains.

    Attributes:
        x0: ``(b, *event_shape)`` initial states.
        x: ``(b, *event_shape)`` final states ``x_K``.
        kl: ``(b, K)`` per-step ``KL(q_k || p_k)`` at the visited states (``None`` if not asked).
        log_prob: ``(b, K)`` log-probability of each taken transition under the sampling chain.
        states: ``[x_0, ..., x_K]`` if asked.
        ref_log_prob: ``(b, K)`` log-probability of each taken transition under the reference
            (a :class:`ControlledProcess`'s; ``None`` if not asked).
    """

    x0: Tensor
    x: Tensor
    kl: Tensor | None = None
    log_prob: Tensor | None = None
    states: list[Tensor] | None = None
    ref_log_prob: Tensor | None = None


@torch.no_grad()
def sample_trajectories(
    process: Process,
    batch_size: int | None = None,
    *,
    x0: Tensor | None = None,
    seed: int = 0,
    kl: bool = True,
    log_prob: bool = False,
    states: bool = False,
    ref_log_prob: bool = False,
) -> Trajectory:
    """Sample chains without gradients.

    Args:
        process: the chain. For a :class:`ControlledProcess` the policy is sampled and
            ``kl`` compares it with the reference; for a plain process ``kl`` is skipped.
        batch_size: number of chains (ignored when ``x0`` is given).
        x0: ``(b, *event_shape)`` initial states; drawn from ``process.initial`` if ``None``.
        seed: seeds the initial draw and every step's noise.
        kl: record per-step KL to the reference.
        log_prob: record the log-probability of each transition taken.
        states: keep every intermediate state.
        ref_log_prob: record the log-probability of each transition taken under the
            reference of a :class:`ControlledProcess` (with ``log_prob``, the path's
            likelihood ratio to the reference).
    """
    device = process.device
    if x0 is None:
        if batch_size is None:
            raise ValueError("give batch_size or x0")
        x0 = process.initial(batch_size, generator=step_generator(seed, -1, device))
    process.check_state(x0, "x0")
    want_kl = kl and isinstance(process, ControlledProcess)
    if ref_log_prob and not isinstance(process, ControlledProcess):
        raise TypeError(f"ref_log_prob needs a ControlledProcess, got {type(process).__name__}")
    x = x0
    kls, lps, rlps, xs = [], [], [], [x0] if states else None
    for k in range(process.num_steps):
        if want_kl or ref_log_prob:
            q, p = process.step_pair(x, k)
        else:
            q = process.step(x, k)
        if want_kl:
            kls.append(q.kl(p))
        x_next = q.sample(step_generator(seed, k, device))
        if log_prob:
            lps.append(q.log_prob(x_next))
        if ref_log_prob:
            rlps.append(p.log_prob(x_next))
        x = x_next
        if xs is not None:
            xs.append(x)
    return Trajectory(
        x0=x0,
        x=x,
        kl=torch.stack(kls, 1) if want_kl else None,
        log_prob=torch.stack(lps, 1) if log_prob else None,
        states=xs,
        ref_log_prob=torch.stack(rlps, 1) if ref_log_prob else None,
    )


def _grad_step(process: ControlledProcess, x: Tensor, k: int, seed: int) -> tuple[Tensor, Tensor]:
    q, p = process.step_pair(x, k)
    return q.rsample(step_generator(seed, k, x.device)), q.kl(p)


class _CheckpointedStep(torch.autograd.Function):
    """One chain step whose activations are recomputed in the backward pass.

    Forward runs the step without building a graph and saves only the input state; the
    trainable parameters are passed as inputs so their gradients route through autograd
    as usual. Cheaper than ``torch.utils.checkpoint`` on chains of many small steps
    (no per-operation saved-tensor hooks), and exact because the step's noise comes
    from a seeded generator.
    """

    @staticmethod
    def forward(ctx, process, k, seed, x, *params):
        ctx.process, ctx.k, ctx.seed, ctx.params = process, k, seed, params
        ctx.save_for_backward(x)
        with torch.no_grad():
            return _grad_step(process, x, k, seed)

    @staticmethod
    def backward(ctx, grad_x_next, grad_kl):
        (x,) = ctx.saved_tensors
        x = x.detach().requires_grad_(ctx.needs_input_grad[3])
        params = [p for p, need in zip(ctx.params, ctx.needs_input_grad[4:]) if need]
        with torch.enable_grad():
            x_next, kl = _grad_step(ctx.process, x, ctx.k, ctx.seed)
        outs, grads = [], []
        for out, g in ((x_next, grad_x_next), (kl, grad_kl)):
            if g is not None and out.requires_grad:
                outs.append(out)
                grads.append(g)
        wrt = ([x] if x.requires_grad else []) + params
        got = list(torch.autograd.grad(outs, wrt, grads, allow_unused=True)) if outs and wrt else [None] * len(wrt)
        grad_x = got.pop(0) if x.requires_grad else None
        it = iter(got)
        grad_params = [next(it) if need else None for need in ctx.needs_input_grad[4:]]
        return (None, None, None, grad_x, *grad_params)


def differentiable_rollout(
    process: ControlledProcess,
    x0: Tensor,
    *,
    seed: int,
    grad_steps: int | None = None,
    checkpoint: bool = True,
    per_step_kl: bool = False,
) -> tuple[Tensor, Tensor]:
    """Reparameterized rollout of the policy, differentiable in its parameters.

    Args:
        process: the controlled chain (policy and frozen reference).
        x0: ``(b, *event_shape)`` initial states (treated as constants).
        seed: seeds each step's noise (see :func:`step_generator`).
        grad_steps: ``T``; gradients flow through the states of the last ``T`` steps only
            (DRaFT-K / AlignProp truncation). Earlier steps still contribute the direct
            gradient of their KL term at their (constant) states. ``None`` means ``K``.
        checkpoint: recompute each step in the backward pass instead of storing its
            activations, so memory grows with ``K`` only by one state per step.
        per_step_kl: return the per-step KL ``(b, K)`` (detached) instead of the path KL.

    Returns:
        ``(x_K, kl)``: final states ``(b, *event_shape)`` and the differentiable path KL
        ``sum_k KL_k`` ``(b,)`` -- or, with ``per_step_kl``, the per-step values ``(b, K)``
        (a record for inspection, without gradient).
    """
    K = process.num_steps
    T = K if grad_steps is None else max(0, min(int(grad_steps), K))
    x = x0.detach()
    path_kl = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    record = []
    use_ckpt = checkpoint and torch.is_grad_enabled()
    params = process.trainable_parameters() if use_ckpt else []
    for k in range(K):
        if use_ckpt:
            x_next, kl_k = _CheckpointedStep.apply(process, k, seed, x, *params)
        else:
            x_next, kl_k = _grad_step(process, x, k, seed)
        x = x_next.detach() if k < K - T else x_next
        # A running sum: additions save nothing for backward, so no per-step KL is kept alive.
        path_kl = path_kl + kl_k
        if per_step_kl:
            record.append(kl_k.detach())
    return x, (torch.stack(record, 1) if per_step_kl else path_kl)
