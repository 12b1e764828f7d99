"""Rewards: a value and a feasibility flag per design.

A :class:`Reward` maps a batch of final states ``x_K`` to a :class:`RewardOutput`.
Subclasses implement :meth:`Reward.evaluate`; calling the reward validates the result
(shape ``(b,)``, finite on feasible designs) so that a NaN from user code stops a run
with one clear message instead of silently poisoning the optimizer.

Infeasible designs (an invalid molecule, a sequence outside the feasible set) carry
no reward; objectives replace their value by :attr:`Reward.infeasible_value`.

Rewards compose: ``r1 + r2``, ``2.0 * r``, ``r1 - 0.5 * r2`` give a
:class:`WeightedSumReward`, feasible where every part is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from .errors import RewardError, ShapeError

__all__ = ["RewardOutput", "Reward", "FunctionReward", "WeightedSumReward"]


@dataclass
class RewardOutput:
    """What a reward returns for ``b`` designs.

    Attributes:
        value: ``(b,)`` float. Meaningful where ``feasible``; elsewhere ignored.
        feasible: ``(b,)`` bool.
    """

    value: Tensor
    feasible: Tensor

    def masked(self, infeasible_value: float) -> Tensor:
        """``value`` with infeasible entries replaced by ``infeasible_value``, ``(b,)``."""
        return torch.where(self.feasible, self.value, torch.full_like(self.value, infeasible_value))


class Reward(nn.Module):
    """Base class: implement :meth:`evaluate`; call the instance to get a validated output.

    Attributes:
        differentiable: whether ``value`` is differentiable in ``x`` (direct reward
            backpropagation needs it; policy gradients do not).
        infeasible_value: the value objectives use for infeasible designs.
        simulated: whether it may be evaluated outside an oracle's budget, as the online
            loop's per-round diagnostics do (``eval_samples``); a reward that is a real
            experiment sets it ``False``.
        name: a short name used in messages and logs.
    """

    differentiable: bool = False
    infeasible_value: float = 0.0
    simulated: bool = True

    @property
    def name(self) -> str:
        return type(self).__name__

    def evaluate(self, x: Tensor) -> RewardOutput | Tensor:
        """Score ``x``: ``(b, *event_shape)``. Return a :class:`RewardOutput`, or a ``(b,)``
        tensor of values when every design is feasible."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> RewardOutput:
        """Evaluate and validate. Raises :class:`RewardError` on a bad result."""
        out = self.evaluate(x)
        if isinstance(out, Tensor):
            out = RewardOutput(out, torch.ones(out.shape[:1], dtype=torch.bool, device=out.device))
        b = x.shape[0]
        if out.value.shape != (b,):
            raise RewardError(f"reward '{self.name}' returned values of shape {tuple(out.value.shape)}, expected ({b},)")
        if out.feasible.shape != (b,):
            raise RewardError(
                f"reward '{self.name}' returned feasibility of shape {tuple(out.feasible.shape)}, expected ({b},)"
            )
        feasible = out.feasible.to(torch.bool)
        bad = feasible & ~torch.isfinite(out.value.detach())
        if bool(bad.any()):
            idx = torch.nonzero(bad).flatten()
            kind = "NaN" if torch.isnan(out.value.detach()[idx[0]]) else "inf"
            raise RewardError(
                f"reward '{self.name}' returned {kind} for {idx.numel()} of {b} feasible designs "
                f"(first at index {int(idx[0])})"
            )
        return RewardOutput(out.value, feasible)

    # ------------------------------------------------------------------ algebra
    def __add__(self, other: "Reward") -> "WeightedSumReward":
        return WeightedSumReward([(1.0, self), (1.0, other)])

    def __sub__(self, other: "Reward") -> "WeightedSumReward":
        return WeightedSumReward([(1.0, self), (-1.0, other)])

    def __mul__(self, scale: float) -> "WeightedSumReward":
        return WeightedSumReward([(float(scale), self)])

    __rmul__ = __mul__


class FunctionReward(Reward):
    """Wrap a plain function ``f(x) -> (b,) values`` (or a :class:`RewardOutput`).

    Args:
        fn: the function.
        differentiable: whether ``fn`` is differentiable in ``x``.
        name: name for messages.
        infeasible_value: value used for infeasible designs.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor | RewardOutput], differentiable: bool = False,
                 name: str | None = None, infeasible_value: float = 0.0):
        super().__init__()
        self.fn = fn
        self.differentiable = differentiable
        self.infeasible_value = infeasible_value
        self._name = name or getattr(fn, "__name__", "function")

    @property
    def name(self) -> str:
        return self._name

    def evaluate(self, x: Tensor) -> RewardOutput | Tensor:
        return self.fn(x)


class WeightedSumReward(Reward):
    """``sum_i w_i r_i(x)``, feasible where every term is feasible.

    Args:
        terms: ``(weight, reward)`` pairs.
    """

    def __init__(self, terms: list[tuple[float, Reward]]):
        super().__init__()
        flat: list[tuple[float, Reward]] = []
        for w, r in terms:
            if isinstance(r, WeightedSumReward):
                flat += [(w * w2, r2) for w2, r2 in zip(r.weights, r.parts)]
            elif isinstance(r, Reward):
                flat.append((float(w), r))
            else:
                raise TypeError(f"cannot combine a Reward with {type(r).__name__}")
        if not flat:
            raise ShapeError("a weighted sum needs at least one reward")
        self.weights = [w for w, _ in flat]
        self.parts = nn.ModuleList([r for _, r in flat])
        self.differentiable = all(r.differentiable for r in self.parts)
        self.simulated = all(r.simulated for r in self.parts)
        self.infeasible_value = sum(w * r.infeasible_value for w, r in flat)

    @property
    def name(self) -> str:
        return " + ".join(f"{w:g}*{r.name}" for w, r in zip(self.weights, self.parts))

    def evaluate(self, x: Tensor) -> RewardOutput:
        outs = [r(x) for r in self.parts]
        value = sum(w * o.value for w, o in zip(self.weights, outs))
        feasible = outs[0].feasible
        for o in outs[1:]:
            feasible = feasible & o.feasible
        return RewardOutput(value, feasible)
