"""The Lightning system that optimizes the entropy-regularized objective.

:class:`EntropyRegularizedSystem` receives the chain, the reward and the strategy as
constructor arguments (Lightning's "separate systems from models"), so moving
fine-tuning to a GPU or to mixed precision is a Trainer flag. It uses manual
optimization because a strategy may take several optimizer steps per sampled batch
(PPO epochs and minibatches).

With a ``value_net`` it also regresses ``v(x_0)`` on the per-trajectory return
``r(x_K) - alpha * sum_k KL_k`` -- ELEGANT's step 1. With ``train_policy=False`` it only
samples from the (frozen) policy and fits the value, which is how the value is refined
once the control has converged (the return's conditional mean is the soft value
``v*(x_0)`` only at the optimal control).

Every update checks that training has not diverged: a sample of the chain, a return
(the objective's terms), a value, or a parameter that is NaN or infinite stops the fit
with a :class:`~difftilt.core.errors.TrainingDivergedError` naming the update. Samples
are checked before the reward sees them, so a reward that returns NaN on finite samples
is still the reward's :class:`~difftilt.core.errors.RewardError`, as is one whose values
are too large to square (whose value regression would overflow).
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .errors import RewardError, TrainingDivergedError
from .process import ControlledProcess
from .reward import Reward, RewardOutput
from .rollout import sample_trajectories, step_generator
from .strategies import Strategy, UpdateContext

__all__ = ["EntropyRegularizedSystem", "iteration_loader"]


def iteration_loader(iterations: int, start: int = 0) -> DataLoader:
    """A loader yielding the iteration numbers ``start, ..., iterations - 1``: one per update
    (there is no dataset). A resumed stage starts at the updates it had done."""
    return DataLoader(range(start, iterations), batch_size=None, shuffle=False)


def _not_finite(t: Tensor) -> str | None:
    """``"NaN"`` or ``"inf"`` if ``t`` holds one (NaN first), else ``None``."""
    t = t.detach()
    if not t.is_floating_point() or bool(torch.isfinite(t).all()):
        return None
    return "NaN" if bool(torch.isnan(t).any()) else "inf"


class _CheckedReward(Reward):
    """``reward`` as training sees it. ``check(x)`` runs on the samples first: samples that
    hold NaN or inf come from a diverged chain, and the reward is not to be blamed for what
    it returns on them. Values whose squares overflow (``|r| > 1.8e19`` in float32) are the
    reward's :class:`RewardError`: the value regression and the advantages square them."""

    def __init__(self, reward: Reward, check: Callable[[Tensor], None]):
        super().__init__()
        self.inner, self.check = reward, check
        self.differentiable, self.infeasible_value = reward.differentiable, reward.infeasible_value
        self.simulated = reward.simulated

    @property
    def name(self) -> str:
        return self.inner.name

    def forward(self, x: Tensor) -> RewardOutput:
        self.check(x)
        out = self.inner(x)
        value = out.value.detach()
        if value.is_floating_point():
            huge = out.feasible & (value.abs() > math.sqrt(torch.finfo(value.dtype).max))
            if bool(huge.any()):
                raise RewardError(
                    f"reward '{self.name}' returned values too large to train on for {int(huge.sum())} of "
                    f"{value.numel()} feasible designs (up to {float(value[huge].abs().max()):.3g}: their squares "
                    f"overflow {value.dtype}); scale the reward down")
        return out


def _lr_lambda(schedule: str, iterations: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, iterations - warmup))
        return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


class EntropyRegularizedSystem(L.LightningModule):
    """Fine-tunes ``process.policy`` to maximize ``E[r(x_K)] - alpha * KL(Q || P)``.

    Args:
        process: the controlled chain; its trainable policy parameters are optimized.
        reward: the reward on final states.
        strategy: how to compute updates (:class:`~difftilt.core.strategies.DirectBackprop`,
            :class:`~difftilt.core.strategies.PolicyGradient`, ...).
        alpha: KL weight (``>= 0``).
        batch_size: chains per update.
        iterations: number of updates (sets the learning-rate schedule's length).
        lr: Adam learning rate of the policy.
        lr_schedule: ``"cosine"`` (decay to 2% of ``lr``) or ``"constant"``.
        warmup: linear warm-up updates.
        max_grad_norm: clip the policy's gradient norm (``None``: no clipping).
        value_net: if given, ``v(x_0) -> (b,)`` regressed on returns.
        value_lr: Adam learning rate of the value network.
        train_policy: if ``False``, the policy is frozen and only the value is fitted.
        seed: seeds initial states and noise (combined with the rank and the iteration number).
        on_metrics: called with each update's metrics (a dict of floats).
        start: updates already done (a stopped stage continued): the fit runs iterations
            ``start, ..., iterations - 1``, each seeded as in an uninterrupted fit.
        optimizer_state: the stopped stage's :meth:`optimizer_state`, loaded into the new
            optimizers and schedulers (with ``start``, the stage continues exactly).

    Attributes:
        diverged: ``"policy"`` or ``"value"`` once a :class:`TrainingDivergedError` was
            raised (which network's learning rate to blame), else ``None``.
    """

    def __init__(
        self,
        process: ControlledProcess,
        reward: Reward,
        strategy: Strategy,
        alpha: float,
        batch_size: int = 256,
        iterations: int = 1000,
        lr: float = 1e-3,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        warmup: int = 0,
        max_grad_norm: float | None = 1.0,
        value_net: nn.Module | None = None,
        value_lr: float = 1e-3,
        train_policy: bool = True,
        seed: int = 0,
        on_metrics: Callable[[dict], None] | None = None,
        start: int = 0,
        optimizer_state: dict | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.process = process
        self.reward = reward
        self.strategy = strategy
        self.alpha = float(alpha)
        self.batch_size = int(batch_size)
        self.iterations = int(iterations)
        self.lr = lr
        self.lr_schedule = lr_schedule
        self.warmup = warmup
        self.max_grad_norm = max_grad_norm
        self.value_net = value_net
        self.value_lr = value_lr
        self.train_policy = train_policy
        self.seed = int(seed)
        self.on_metrics = on_metrics
        self.start = int(start)
        self.saved_optimizer_state = optimizer_state
        self.history: list[dict] = []
        self.diverged: str | None = None

    # ------------------------------------------------------------------ setup
    def train(self, mode: bool = True) -> "EntropyRegularizedSystem":
        super().train(mode)
        # Dropout and the like stay off in the chain: a checkpointed step is recomputed
        # in the backward pass and must see the same function.
        self.process.eval()
        return self

    def configure_optimizers(self):
        optimizers, schedulers = [], []
        if self.train_policy:
            params = self.process.trainable_parameters()
            if not params:
                raise ValueError("the policy has no trainable parameters")
            opt = torch.optim.Adam(params, lr=self.lr)
            optimizers.append(opt)
            schedulers.append(torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(self.lr_schedule, self.iterations, self.warmup)))
        if self.value_net is not None:
            vopt = torch.optim.Adam(self.value_net.parameters(), lr=self.value_lr)
            optimizers.append(vopt)
            schedulers.append(torch.optim.lr_scheduler.LambdaLR(vopt, _lr_lambda(self.lr_schedule, self.iterations, 0)))
        saved = self.saved_optimizer_state
        if saved is not None:  # after the schedulers are made: making one sets the learning rate
            for obj, state in zip(optimizers + schedulers, saved["optimizers"] + saved["schedulers"], strict=True):
                obj.load_state_dict(state)
        return optimizers, schedulers

    def optimizer_state(self) -> dict:
        """``{"optimizers": [...], "schedulers": [...]}``: the state dicts of the fit's optimizers
        and learning-rate schedulers (what ``optimizer_state`` takes back)."""
        return {"optimizers": [opt.state_dict() for opt in self.trainer.optimizers],
                "schedulers": [c.scheduler.state_dict() for c in self.trainer.lr_scheduler_configs]}

    def _check_finite(self, part: str, what: str, values: list[Tensor], iteration: int) -> None:
        """Raise :class:`TrainingDivergedError` if one of ``values`` holds NaN or inf (one
        device sync when none does)."""
        flags = [torch.isfinite(t.detach()).all() for t in values if t.is_floating_point()]
        if not flags or bool(torch.stack(flags).all()):
            return
        kinds = {_not_finite(t) for t in values}
        self.diverged = part
        raise TrainingDivergedError(f"{'NaN' if 'NaN' in kinds else 'inf'} in {what} at iteration {iteration}")

    def _update_seed(self, iteration: int) -> int:
        return (self.seed * 1_000_003 + self.global_rank * 7_919 + int(iteration)) & ((1 << 62) - 1)

    # ------------------------------------------------------------------ step
    def _policy_optimizer_step(self, opt) -> Callable[[], float]:
        params = self.process.trainable_parameters()

        def step() -> float:
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm if self.max_grad_norm else float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(norm)

        return step

    def training_step(self, batch, batch_idx: int) -> None:
        # the batch is the iteration number: batch_idx restarts at 0 in a resumed stage
        iteration = int(batch)
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        scheds = self.lr_schedulers()
        scheds = scheds if isinstance(scheds, list) else ([scheds] if scheds is not None else [])
        seed = self._update_seed(iteration)
        x0 = self.process.initial(self.batch_size, generator=step_generator(seed, -1, self.process.device))
        reward = _CheckedReward(self.reward,
                                lambda x: self._check_finite("policy", "the chain's samples", [x], iteration))

        if self.train_policy:
            ctx = UpdateContext(
                process=self.process, reward=reward, alpha=self.alpha, x0=x0, seed=seed,
                backward=self.manual_backward, optimizer_step=self._policy_optimizer_step(opts[0]),
            )
            out = self.strategy.update(ctx)
            x0, returns, metrics = out.x0, out.returns, dict(out.metrics)
            self._check_finite("policy", "the returns (reward - alpha * KL)", [returns], iteration)
            self._check_finite("policy", "the policy's parameters", self.process.trainable_parameters(), iteration)
        else:
            traj = sample_trajectories(self.process, x0=x0, seed=seed, kl=True)
            with torch.no_grad():
                res = reward(traj.x)
            r = res.masked(self.reward.infeasible_value)
            path_kl = traj.kl.sum(1)
            returns = r - self.alpha * path_kl
            self._check_finite("policy", "the returns (reward - alpha * KL)", [returns], iteration)
            metrics = {"reward": float(r.mean()), "kl": float(path_kl.mean()),
                       "objective": float(returns.mean()), "feasible": float(res.feasible.float().mean())}

        if self.value_net is not None:
            vopt = opts[-1]
            v = self.value_net(x0).reshape(-1)
            # v and the returns are checked, not their squared error: that of finite but huge
            # returns (a reward of scale 1e38) overflows, and is not the value's divergence
            self._check_finite("value", "the value network's outputs", [v], iteration)
            value_loss = torch.mean((v - returns) ** 2)
            self.manual_backward(value_loss)
            vopt.step()
            vopt.zero_grad(set_to_none=True)
            self._check_finite("value", "the value network's parameters", list(self.value_net.parameters()),
                               iteration)
            metrics["value_loss"] = float(value_loss.detach())
        for s in scheds:
            s.step()

        metrics["iteration"] = iteration
        self.history.append(metrics)
        if self.on_metrics is not None:
            self.on_metrics(metrics)
        shown = {k: metrics[k] for k in ("reward", "kl", "value_loss") if k in metrics}
        self.log_dict(shown, prog_bar=True, on_step=True, on_epoch=False, batch_size=self.batch_size)
        rest = {k: v for k, v in metrics.items() if k not in shown and k != "iteration"}
        if rest:
            self.log_dict(rest, prog_bar=False, on_step=True, on_epoch=False, batch_size=self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return iteration_loader(self.iterations, self.start)
