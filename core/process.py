"""Generative Markov chains and their fine-tuned copies.

Notation follows ../shared/DESIGN.md: a chain runs ``x_0 -> x_1 -> ... -> x_K`` from an
initial state (noise, or all-masked tokens) to a sample, with law
``P(x_0:K) = nu_pre(x_0) prod_k p_k(x_{k+1} | x_k)``.

* :class:`Process` -- the interface every domain implements: ``initial()`` and
  ``step(x, k) -> StepDistribution``.
* :class:`ResidualControlProcess` -- a base chain whose every transition is tilted by a
  learned control ``h(x, t)``: the mean of a Gaussian step moves by ``std^2 h``, the
  logits of a categorical step by ``h``. At ``h = 0`` it is the base chain exactly.
* :class:`ControlledProcess` -- a trainable policy ``Q`` beside a frozen reference ``P``;
  ``step_pair`` returns both transitions from the same state (for the KL).
* :class:`BrownianProcess` -- the auxiliary chain of ELEGANT's step 2: Brownian motion
  from 0 on ``[0, 1]`` in ``M`` steps, whose end point is ``N(0, I)``.
* :class:`ChainedProcess` -- a learned initial law (the end of an auxiliary chain)
  followed by a transition chain: how a fully fine-tuned ELEGANT model samples.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from typing import Literal

import torch
from torch import Tensor, nn

from .distributions import StepDistribution, GaussianStep
from .errors import ShapeError

__all__ = [
    "Process",
    "ResidualControlProcess",
    "ControlledProcess",
    "BrownianProcess",
    "ChainedProcess",
    "freeze",
    "transitions_of",
]

InitialKind = Literal["standard_normal", "point", "custom"]


def freeze(module: nn.Module) -> nn.Module:
    """Turn off gradients for every parameter of ``module`` and put it in eval mode."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


class Process(nn.Module, ABC):
    """A generative Markov chain ``x_0 -> ... -> x_K``.

    Subclasses set :attr:`num_steps` (``K``), :attr:`event_shape` (the shape of one
    state) and :attr:`initial_kind`, and implement :meth:`initial` and :meth:`step`.

    ``initial_kind`` tells ELEGANT how to learn a new initial law:
    ``"standard_normal"`` (``nu_pre = N(0, I)``: an auxiliary Brownian chain reaches it),
    ``"point"`` (a fixed state such as all masks: nothing to learn), or ``"custom"``
    (the subclass overrides :meth:`initial_sde`).
    """

    num_steps: int
    event_shape: tuple[int, ...]
    initial_kind: InitialKind = "standard_normal"

    @abstractmethod
    def initial(self, batch_size: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``x_0 ~ nu``: ``(batch_size, *event_shape)``."""

    @abstractmethod
    def step(self, x: Tensor, k: int) -> StepDistribution:
        """The transition ``p_k(. | x_k)`` from states ``x``: ``(b, *event_shape)``."""

    def time(self, k: int) -> float:
        """Progress ``k / K`` in ``[0, 1)``, the time input of control networks."""
        return k / self.num_steps

    @property
    def device(self) -> torch.device:
        """Device of the first parameter or buffer (CPU for a module with neither)."""
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    def check_state(self, x: Tensor, what: str = "x") -> None:
        """Raise :class:`ShapeError` unless ``x`` is ``(b, *event_shape)``."""
        if tuple(x.shape[1:]) != tuple(self.event_shape):
            raise ShapeError(
                f"{what} must have shape (batch, {', '.join(map(str, self.event_shape))}), got {tuple(x.shape)}"
            )

    def initial_sde(self, num_steps: int) -> "Process | None":
        """An auxiliary chain from a fixed point whose end law is this chain's initial law.

        ELEGANT learns the optimal initial law ``nu* ∝ nu * exp(v / alpha)`` as a
        controlled version of this chain. Returns ``None`` when the initial law is a
        point (there is nothing to learn).
        """
        if self.initial_kind == "standard_normal":
            return BrownianProcess(self.event_shape, num_steps)
        if self.initial_kind == "point":
            return None
        raise NotImplementedError(
            f"{type(self).__name__} has a custom initial law; override initial_sde() to learn it"
        )

    @torch.no_grad()
    def sample(
        self,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        x0: Tensor | None = None,
    ) -> Tensor:
        """Run the chain and return ``x_K``: ``(batch_size, *event_shape)``."""
        x = self.initial(batch_size, generator=generator) if x0 is None else x0
        for k in range(self.num_steps):
            x = self.step(x, k).sample(generator)
        return x


class ResidualControlProcess(Process):
    """A base chain with each transition exponentially tilted by a control network.

    ``q_k(x' | x) ∝ p_k(x' | x) exp(<h, x'>)``. For Gaussian steps the mean moves by
    ``std_k^2 h`` (so ``h`` estimates ``grad v_{k+1} / alpha``, free of the step size); for
    categorical steps the logits move by ``h``.

    What the control sees (``control_input``):

    * ``"state"``: ``h = control(x_k, t_k)``.
    * ``"mean"`` (Gaussian steps): ``h = control(mu_p(x_k), t_k)``, the base step's mean.
      The optimal tilt of a Gaussian step with small std is, to first order,
      ``grad v_{k+1}(mu_p(x_k)) / alpha``: it depends on ``x_k`` only through the landing
      point ``mu_p(x_k)``. Given the mean, the network learns only the smooth soft-value
      gradient instead of also re-learning the base network's (often sharp) map
      ``x -> mu_p(x)``.

    Args:
        base: the chain being controlled (usually frozen).
        control: ``nn.Module`` mapping ``(input: (b, *event_shape), t: float) -> (b, *event_shape)``.
            Initialize its last layer at zero so that fine-tuning starts at ``base``.
        control_input: ``"state"`` or ``"mean"``.
    """

    def __init__(self, base: Process, control: nn.Module, control_input: Literal["state", "mean"] = "state"):
        super().__init__()
        if control_input not in ("state", "mean"):
            raise ValueError(f"control_input must be 'state' or 'mean', got {control_input!r}")
        self.base = base
        self.control = control
        self.control_input = control_input
        self.num_steps = base.num_steps
        self.event_shape = tuple(base.event_shape)
        self.initial_kind = base.initial_kind

    def initial(self, batch_size: int, *, generator: torch.Generator | None = None) -> Tensor:
        return self.base.initial(batch_size, generator=generator)

    def time(self, k: int) -> float:
        return self.base.time(k)

    def tilt(self, x: Tensor, k: int, base_step: StepDistribution) -> Tensor:
        """The control field ``h``, shaped like ``x``, for the base transition ``base_step`` from ``x``."""
        if self.control_input == "mean":
            if not isinstance(base_step, GaussianStep):
                raise TypeError("control_input='mean' needs Gaussian steps")
            return self.control(base_step.mean, self.time(k))
        return self.control(x, self.time(k))

    def step(self, x: Tensor, k: int) -> StepDistribution:
        p = self.base.step(x, k)
        return p.tilted(self.tilt(x, k, p))

    def initial_sde(self, num_steps: int) -> Process | None:
        return self.base.initial_sde(num_steps)


def transitions_of(process: Process) -> Process:
    """The chain whose ``step`` a (chained or controlled) process delegates to."""
    while isinstance(process, (ChainedProcess, ControlledProcess)):
        process = process.transitions if isinstance(process, ChainedProcess) else process.policy
    return process


class ControlledProcess(Process):
    """A trainable policy chain ``Q`` beside a frozen reference chain ``P``.

    The objective's KL term compares ``Q``'s and ``P``'s transitions from the same
    states; :meth:`step_pair` returns both, computing a shared base chain once when the
    two are residual controls of the same base (the common case, including SEIKO's
    "KL against last round's model").

    As a process it runs the policy's transitions from the **reference's** initial law:
    ELEGANT learns the transitions with ``x_0 ~ nu_ref`` (step 1) and the initial law
    separately (step 2).

    Args:
        reference: the chain to stay close to. It is frozen here (no gradients, eval mode).
        policy: the trainable chain (same ``num_steps`` and ``event_shape``).
    """

    def __init__(self, reference: Process, policy: Process):
        super().__init__()
        if reference.num_steps != policy.num_steps or tuple(reference.event_shape) != tuple(policy.event_shape):
            raise ShapeError(
                "policy and reference must have the same number of steps and event shape: "
                f"{policy.num_steps} x {policy.event_shape} vs {reference.num_steps} x {reference.event_shape}"
            )
        self.reference = freeze(reference)
        self.policy = policy
        self.num_steps = policy.num_steps
        self.event_shape = tuple(policy.event_shape)
        self.initial_kind = reference.initial_kind

    def train(self, mode: bool = True) -> "ControlledProcess":
        # The reference never leaves eval mode. It is set once, not by ``super().train`` and
        # then again: SEIKO's round-i model is a ControlledProcess whose reference is round
        # i - 1's, and visiting each reference twice made one call 2^i visits (round 19 of
        # an Ehrlich run took 438 s instead of 112).
        self.training = mode
        for child in self.children():
            child.train(mode and child is not self.reference)
        return self

    def initial(self, batch_size: int, *, generator: torch.Generator | None = None) -> Tensor:
        return self.reference.initial(batch_size, generator=generator)

    def time(self, k: int) -> float:
        return self.policy.time(k)

    def step(self, x: Tensor, k: int) -> StepDistribution:
        return self.policy.step(x, k)

    def step_pair(self, x: Tensor, k: int) -> tuple[StepDistribution, StepDistribution]:
        """``(q_k(. | x), p_k(. | x))``: the policy's and the reference's transitions."""
        pol, ref = self.policy, transitions_of(self.reference)
        if isinstance(pol, ResidualControlProcess):
            if pol.base is ref:
                p = ref.step(x, k)
                return p.tilted(pol.tilt(x, k, p)), p
            if isinstance(ref, ResidualControlProcess) and ref.base is pol.base:
                base = pol.base.step(x, k)
                return base.tilted(pol.tilt(x, k, base)), base.tilted(ref.tilt(x, k, base))
        return pol.step(x, k), ref.step(x, k)

    def initial_sde(self, num_steps: int) -> Process | None:
        return self.reference.initial_sde(num_steps)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters of the policy that require gradients."""
        return [p for p in self.policy.parameters() if p.requires_grad]

    def frozen_policy(self) -> Process:
        """A frozen deep copy of the current policy, e.g. the next round's reference."""
        ref = self.reference
        # Share the (frozen) reference instead of copying it along with the policy.
        memo = {id(ref): ref}
        if isinstance(ref, ResidualControlProcess):
            memo[id(ref.base)] = ref.base
        return freeze(copy.deepcopy(self.policy, memo))


class BrownianProcess(Process):
    """Brownian motion from 0 on ``[0, 1]`` in ``M`` Euler steps.

    ``z_{j+1} = z_j + sqrt(1/M) * eps``, so ``z_M ~ N(0, I)`` exactly. Controlled by a
    :class:`ResidualControlProcess`, the step becomes ``z + g dt + sqrt(dt) eps`` with
    ``g = h`` and per-step KL ``||g||^2 dt / 2`` -- the discretization of ELEGANT's
    auxiliary problem ``max E[v(z_1)] - alpha E[int ||g||^2 / 2 ds]``.

    Args:
        event_shape: shape of one state.
        num_steps: number of Euler steps ``M``.
    """

    initial_kind = "point"

    def __init__(self, event_shape: tuple[int, ...], num_steps: int = 50):
        super().__init__()
        if num_steps < 1:
            raise ValueError("num_steps must be >= 1")
        self.event_shape = tuple(event_shape)
        self.num_steps = int(num_steps)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def initial(self, batch_size: int, *, generator: torch.Generator | None = None) -> Tensor:
        return torch.zeros((batch_size, *self.event_shape), device=self._anchor.device, dtype=self._anchor.dtype)

    def step(self, x: Tensor, k: int) -> GaussianStep:
        return GaussianStep(x, math.sqrt(1.0 / self.num_steps))

    def initial_sde(self, num_steps: int) -> None:
        return None


class ChainedProcess(Process):
    """Initial states from the end of an auxiliary chain, then a transition chain.

    This is ELEGANT's step 3: ``x_0 = z_M`` from the learned initial chain, then the
    fine-tuned transitions. Its own :meth:`initial_sde` is the initial chain, so a later
    round of fine-tuning can tilt the initial law further.

    Args:
        transitions: the chain run from ``x_0`` (``num_steps`` and ``event_shape`` are its).
        initial_chain: a chain whose final state is distributed as the initial law.
    """

    initial_kind = "custom"

    def __init__(self, transitions: Process, initial_chain: Process):
        super().__init__()
        if tuple(initial_chain.event_shape) != tuple(transitions.event_shape):
            raise ShapeError("the initial chain must produce states of the transitions' event shape")
        self.transitions = transitions
        self.initial_chain = initial_chain
        self.num_steps = transitions.num_steps
        self.event_shape = tuple(transitions.event_shape)

    def initial(self, batch_size: int, *, generator: torch.Generator | None = None) -> Tensor:
        with torch.no_grad():
            return self.initial_chain.sample(batch_size, generator=generator)

    def time(self, k: int) -> float:
        return self.transitions.time(k)

    def step(self, x: Tensor, k: int) -> StepDistribution:
        return self.transitions.step(x, k)

    def initial_sde(self, num_steps: int) -> Process:
        return self.initial_chain
