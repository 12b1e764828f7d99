"""ELEGANT: entropy-regularized fine-tuning with a learned initial distribution.

Uehara et al. 2024 (arXiv 2402.15194). The maximizer of
``J(Q) = E_Q[r(x_K)] - alpha * KL(Q || P)`` has terminal law
``p*(x) ∝ p_pre(x) exp(r(x) / alpha)``. Learning the transitions alone from the
pretrained initial law ``nu_pre`` does not reach it: the optimal initial law is
``nu*(x_0) ∝ nu_pre(x_0) exp(v*(x_0) / alpha)`` with the soft value ``v*``. So:

1. learn the transitions (the control) from ``x_0 ~ nu_pre`` while a value network
   regresses ``v(x_0)`` on the return ``r(x_K) - alpha * sum_k KL_k``; then refit ``v``
   with the control frozen;
2. learn ``nu*`` as a controlled auxiliary chain from a fixed point whose uncontrolled
   end law is ``nu_pre`` (Brownian motion from 0 for ``nu_pre = N(0, I)``), maximizing
   ``E[v(z_M)] - alpha * KL`` -- the same solver, with ``v`` as the reward;
3. sample by chaining: ``x_0 = z_M``, then the fine-tuned transitions.

``learn_initial=False`` gives the "drift-only" variant (steps 2-3 skipped), which is
what most published fine-tuning methods do.

Given a ``state_file``, :meth:`Finetuner.fit` saves the whole training state there (the
stage and its updates done, the trainable networks, the stage's optimizers and
schedulers, the metrics so far) at its start, every ``save_every`` updates and at the end
of each stage; a fit given that state back (``resume``, :func:`read_state`) ends with the
same weights as one never stopped.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import os
import random
import signal
import sys
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from .config import check_count, check_rate, validate_kwargs
from .distributions import GaussianStep
from .errors import CheckpointError, ConfigError, DeterministicStepError, TrainingDivergedError
from .nets import TimeMLP
from .process import (
    ChainedProcess,
    ControlledProcess,
    Process,
    ResidualControlProcess,
    freeze,
    transitions_of,
)
from .reward import FunctionReward, Reward, RewardOutput
from .rollout import sample_trajectories, step_generator
from .strategies import Strategy, make_strategy
from .statefile import load_state, write_state
from .system import EntropyRegularizedSystem

__all__ = ["Finetuner", "FinetuneResult", "ValueReward", "default_policy", "make_trainer", "fit_interruptibly",
           "check_finetune_options", "estimate_kl", "estimate_path_kl", "tilt_weights", "estimate_tilt",
           "read_state", "STAGES"]

log = logging.getLogger(__name__)


class ValueReward(Reward):
    """A (frozen) value network used as a differentiable reward: ``r(z) = v(z)``.

    Args:
        value_net: maps ``(b, *event_shape) -> (b,)`` (or ``(b, 1)``).
    """

    differentiable = True

    def __init__(self, value_net: nn.Module):
        super().__init__()
        self.value_net = value_net

    @property
    def name(self) -> str:
        return "value"

    def evaluate(self, x: Tensor) -> Tensor:
        return self.value_net(x).reshape(-1)


def default_policy(reference: Process, hidden: int = 64, depth: int = 2,
                   control_input: Literal["auto", "state", "mean"] = "auto") -> ResidualControlProcess:
    """The reference tilted by a :class:`~difftilt.core.nets.TimeMLP` control started at zero.

    ``control_input="mean"`` (Gaussian chains) feeds the control the reference step's mean,
    see :class:`~difftilt.core.process.ResidualControlProcess`; ``"auto"`` picks ``"mean"``
    for Gaussian chains and ``"state"`` otherwise.
    """
    shape = tuple(reference.event_shape)
    if control_input == "auto":
        with torch.no_grad():
            probe = reference.step(reference.initial(1), 0)
        control_input = "mean" if isinstance(probe, GaussianStep) else "state"
    return ResidualControlProcess(reference, TimeMLP(shape, shape, hidden=hidden, depth=depth), control_input)


def default_value_net(reference: Process, hidden: int = 64, depth: int = 2) -> TimeMLP:
    """A :class:`~difftilt.core.nets.TimeMLP` from ``x_0`` to a scalar (time ignored)."""
    return TimeMLP(tuple(reference.event_shape), (), hidden=hidden, depth=depth, time_features=0, zero_init=False)


@contextlib.contextmanager
def quiet_lightning():
    """Silence Lightning's start-up banners and the warnings that do not apply to
    fine-tuning (no dataset workers, chain modules kept in eval mode on purpose)."""
    names = ["lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
            warnings.filterwarnings("ignore", message=".*LitLogger.*")
            warnings.filterwarnings("ignore", message=".*litlogger.*")
            warnings.filterwarnings("ignore", message=".*treespec.*")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


@contextlib.contextmanager
def kept_rng_states():
    """Give the caller's global random states back after the block: Python's, numpy's,
    torch's (the CPU's and each CUDA device's already in use) and Lightning's
    ``PL_GLOBAL_SEED``, so that a fit or a run called from a user's session does not reseed
    their RNGs."""
    env = os.environ.get("PL_GLOBAL_SEED")
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        if env is None:
            os.environ.pop("PL_GLOBAL_SEED", None)
        else:
            os.environ["PL_GLOBAL_SEED"] = env


def keeps_rng_states(fn: Callable) -> Callable:
    """``fn`` run inside :func:`kept_rng_states`."""

    @functools.wraps(fn)
    def kept(*args, **kwargs):
        with kept_rng_states():
            return fn(*args, **kwargs)

    return kept


@contextlib.contextmanager
def seeded_globals(seed: int):
    """Seed the global random states for the block (Lightning's ``seed_everything``:
    anything in a fit that draws from them, such as a user network's dropout, repeats with
    the seed), and give the caller's back after it (:func:`kept_rng_states`)."""
    with kept_rng_states():
        L.seed_everything(seed, verbose=False)
        yield


#: How often a fine-tuning stage's progress bar is redrawn when stderr is not a terminal (a log
#: file, a pipe): about this many times a stage, not once per update.
LOG_BAR_REDRAWS = 10
#: A tqdm bar's ``mininterval`` (seconds) when stderr is not a terminal: a long loop's bar (a
#: pretraining's) then writes a line to the log twice a minute at most.
LOG_BAR_INTERVAL = 30.0


def bar_interval() -> float:
    """``mininterval`` for a tqdm bar on stderr: tqdm's 0.1 s on a terminal,
    :data:`LOG_BAR_INTERVAL` in a log file."""
    return 0.1 if sys.stderr.isatty() else LOG_BAR_INTERVAL


def make_trainer(
    stage: str,
    iterations: int,
    *,
    progress: bool = True,
    accelerator: str = "cpu",
    devices: int | str = 1,
    precision: str = "32-true",
    loggers: list | None = None,
    default_root_dir: str | None = None,
) -> L.Trainer:
    """A Trainer for one fine-tuning stage: one pass of ``iterations`` updates, no
    Lightning checkpoints or summaries, a progress bar named after the stage."""
    callbacks = []
    if progress:
        from lightning.pytorch.callbacks import TQDMProgressBar
        from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

        class _Bar(Tqdm):
            def set_description(self, desc=None, refresh=True):  # the stage's name, never "Epoch 0"
                super().set_description(stage, refresh)

        class _StageBar(TQDMProgressBar):
            def init_train_tqdm(self):  # Lightning's, on stderr: stdout is the command's results
                return _Bar(desc=stage, position=2 * self.process_position, disable=self.is_disabled, leave=True,
                            dynamic_ncols=True, file=sys.stderr, smoothing=0, bar_format=self.BAR_FORMAT)

        redraws = 200 if sys.stderr.isatty() else LOG_BAR_REDRAWS
        callbacks.append(_StageBar(refresh_rate=max(1, iterations // redraws)))
    return L.Trainer(
        max_epochs=1,
        limit_train_batches=iterations,
        accelerator=accelerator,
        devices=devices,
        precision=precision,
        logger=loggers if loggers else False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(50, iterations // 20)),
        callbacks=callbacks,
        default_root_dir=default_root_dir,
    )


class _LastException(L.Callback):
    """Keeps the exception that stopped a fit (Lightning's ``on_exception`` hook)."""

    def __init__(self):
        self.exception: BaseException | None = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.exception = exception


def fit_interruptibly(trainer: L.Trainer, system: L.LightningModule) -> None:
    """``trainer.fit(system)``, with a Ctrl-C that stays a :class:`KeyboardInterrupt`.

    Lightning catches a KeyboardInterrupt inside ``fit``, makes SIGINT ignored (for its
    "graceful shutdown") and calls ``sys.exit(1)``: a command would end with status 1 and
    no word, a run could not record itself interrupted, and a notebook would lose Ctrl-C
    for the rest of its session. Here the interrupt is raised again as what it was, and the
    SIGINT handler in place before the fit is put back, whatever ends the fit. Other
    exits (a SIGTERM's :class:`SystemExit`) pass through unchanged.
    """
    seen = _LastException()
    trainer.callbacks.append(seen)
    handler = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit(system)
    except SystemExit:
        if isinstance(seen.exception, KeyboardInterrupt):
            raise seen.exception from None
        raise
    finally:
        # signal.signal works in the main thread only; None: a handler not set from Python
        if (handler is not None and signal.getsignal(signal.SIGINT) is not handler
                and threading.current_thread() is threading.main_thread()):
            signal.signal(signal.SIGINT, handler)
    if trainer.interrupted:  # a Lightning that stops the fit without raising
        raise KeyboardInterrupt


#: ELEGANT's stages in the order :meth:`Finetuner.fit` runs them (drift-only: the first).
STAGES = ("transitions", "value", "initial")
STATE_FORMAT = "difftilt.finetune_state/1"


class _SaveEvery(L.Callback):
    """Calls ``save(updates done, the system's optimizer state)`` after every ``every``-th update of
    a stage but its last (the stage's end is saved once the stage is reported)."""

    def __init__(self, save: Callable[[int, dict], None], every: int, iterations: int):
        self.save, self.every, self.iterations = save, every, iterations

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        done = int(batch) + 1  # the batch is the iteration number, also in a resumed stage
        if done % self.every == 0 and done < self.iterations:
            self.save(done, pl_module.optimizer_state())


def read_state(path: str | os.PathLike) -> dict:
    """A fine-tuning's saved training state (:meth:`Finetuner.fit`'s ``state_file``), on the CPU.

    Raises:
        ConfigError: there is no such file.
        CheckpointError: the file is not a readable state.
    """
    state = load_state(path, "fine-tuning state", f"nothing to resume: no saved fine-tuning state at {path}")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("stage") not in STAGES:
        raise CheckpointError(f"{path} is not a fine-tuning state (expected format {STATE_FORMAT})")
    return state


def _own_state(module: nn.Module, frozen: nn.Module | None) -> dict[str, Tensor]:
    """``module``'s state dict without the tensors it shares with ``frozen``: the pretrained chain
    that a tilt wraps is not trained, and is not written every few updates."""
    shared = {id(t) for t in frozen.state_dict(keep_vars=True).values()} if frozen is not None else set()
    return {k: t.detach() for k, t in module.state_dict(keep_vars=True).items() if id(t) not in shared}


@dataclass
class FinetuneResult:
    """What :meth:`Finetuner.fit` returns.

    Attributes:
        model: the fine-tuned sampler: a :class:`ChainedProcess` (learned initial law,
            then the learned transitions) or, drift-only, the policy chain itself.
        transitions: the controlled transition chain (policy beside the reference).
        initial: the controlled auxiliary chain for the initial law, or ``None``.
        value_net: the fitted value network ``v(x_0)``, or ``None``.
        alpha: the KL weight.
        history: per-update metrics, each with a ``stage`` key.
    """

    model: Process
    transitions: ControlledProcess
    initial: ControlledProcess | None
    value_net: nn.Module | None
    alpha: float
    history: list[dict] = field(default_factory=list)

    def sample(self, n: int, seed: int = 0) -> Tensor:
        """``n >= 1`` samples ``x_K`` from the fine-tuned model: ``(n, *event_shape)``."""
        check_count("FinetuneResult.sample", "n", n, 1)
        return self.model.sample(n, generator=step_generator(seed, -3, self.model.device))


@torch.no_grad()
def estimate_path_kl(model: Process, reference: Process, n: int = 4096, seed: int = 0) -> dict[str, float]:
    """Monte-Carlo ``KL(model || reference)`` of two chains with the same transitions layout.

    The transitions part compares the two chains' steps along the model's own
    trajectories. If the model's initial law is itself a chain (a learned initial law),
    the initial part is the path KL of that chain against the reference's auxiliary chain
    of the same length -- an upper bound on the initial laws' KL, tight at the optimum.
    Works across rounds: e.g. round 3's model against the pretrained one.
    Returns ``{"initial", "transitions", "total"}``.
    """
    init_kl, x0 = 0.0, None
    if isinstance(model, ChainedProcess):
        aux_ref = reference.initial_sde(model.initial_chain.num_steps)
        if aux_ref is None:
            raise ValueError("the model has a learned initial law but the reference's initial law is a point")
        aux = sample_trajectories(ControlledProcess(aux_ref, model.initial_chain), n, seed=seed, kl=True)
        init_kl, x0 = float(aux.kl.sum(1).mean()), aux.x
    elif model.initial_kind == "custom" or reference.initial_kind == "custom":
        x0 = model.initial(n, generator=step_generator(seed, -1, model.device))
    traj = sample_trajectories(ControlledProcess(reference, transitions_of(model)), n, x0=x0, seed=seed + 1, kl=True)
    trans_kl = float(traj.kl.sum(1).mean())
    return {"initial": init_kl, "transitions": trans_kl, "total": init_kl + trans_kl}


@torch.no_grad()
def estimate_kl(result: FinetuneResult, n: int = 4096, seed: int = 0) -> dict[str, float]:
    """Monte-Carlo path KL of the fine-tuned model to its reference.

    ``KL(Q || P) = KL(nu || nu_pre) + sum_k E_Q[KL_k]``; the first term is estimated by
    the auxiliary chain's path KL (an upper bound, tight at its optimum). Returns
    ``{"initial": ..., "transitions": ..., "total": ...}``.
    """
    init_kl = 0.0
    x0 = None
    if result.initial is not None:
        aux = sample_trajectories(result.initial, n, seed=seed, kl=True)
        init_kl = float(aux.kl.sum(1).mean())
        x0 = aux.x
    traj = sample_trajectories(result.transitions, n, x0=x0, seed=seed + 1, kl=True)
    trans_kl = float(traj.kl.sum(1).mean())
    return {"initial": init_kl, "transitions": trans_kl, "total": init_kl + trans_kl}


def tilt_weights(values: Tensor, alpha: float) -> Tensor:
    """Self-normalized importance weights ``w_i ∝ exp(r_i / alpha)`` of the exact tilt.

    ``values`` are the rewards ``r(x_i)`` of samples ``x_i ~ P``; weighting them by ``w``
    estimates expectations under ``J``'s maximizer ``p*(x) ∝ p(x) exp(r(x) / alpha)``.
    """
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"alpha must be a positive number, got {alpha}")
    if values.ndim != 1 or values.numel() == 0 or not torch.isfinite(values).all():
        raise ValueError("values: a non-empty 1-D tensor of finite rewards")
    return torch.softmax(values.double() / alpha, dim=0)


def estimate_tilt(values: Tensor, alpha: float, others: dict[str, Tensor] | None = None) -> dict[str, float]:
    """What the exact maximizer of ``J`` would reach, from rewards ``values`` of samples of ``P``.

    Self-normalized importance sampling with :func:`tilt_weights`: ``reward`` is
    ``E_{p*}[r]``, ``kl`` is ``KL(p* || P) = E_{p*}[log(w_i n)]``, and ``objective`` is
    ``J* = E_{p*}[r] - alpha * KL(p* || P) = alpha * log E_P[exp(r / alpha)]``, the most any
    fine-tuned chain can reach (its path KL is at least its terminal KL). ``ess`` is the
    effective sample size ``1 / sum_i w_i^2``. Consistent as ``n`` grows; with few effective
    samples (``ess`` a handful) ``kl`` and ``objective`` are biased low, so they are lower
    bounds in practice. Compare a fine-tuned model's ``E_Q[r] - alpha * KL(Q || P)`` with
    ``objective`` to see how far its solver got. ``others`` (name -> per-sample values, e.g.
    a ground truth) adds each one's mean under ``p*`` under its name.
    """
    w = tilt_weights(values, alpha)
    v = values.double()
    n = v.numel()
    log_mean_exp = float(torch.logsumexp(v / alpha, 0)) - math.log(n)
    nz = w > 0
    out = {"reward": float((w * v).sum()), "kl": float((w[nz] * (w[nz].log() + math.log(n))).sum()),
           "objective": alpha * log_mean_exp, "ess": float(1.0 / (w ** 2).sum())}
    for name, other in (others or {}).items():
        if other.shape != v.shape:
            raise ValueError(f"others[{name!r}]: {tuple(other.shape)} values for {n} samples")
        out[name] = float((w * other.double()).sum())
    return out


#: The Finetuner's sizes and counts, each with its least allowed value.
_COUNTS = (("iterations", 1), ("batch_size", 1), ("warmup", 0), ("control_hidden", 1), ("control_depth", 0),
           ("value_refit_iterations", 0), ("value_batch_size", 1), ("initial_steps", 1), ("initial_iterations", 0),
           ("initial_batch_size", 1), ("save_every", 0))
_RATES = ("lr", "value_lr", "initial_lr")
_TRAINER_OPTIONS = ("accelerator", "devices", "precision")
#: The largest seed of a run's config: Lightning's ``seed_everything`` takes numpy's 32-bit seeds.
SEED_MAX = 2**32 - 1


def check_finetune_options(options: Mapping[str, Any], where: str = "finetune", skip: tuple[str, ...] = ()) -> dict:
    """Check fields of :class:`Finetuner` and return them type-checked.

    Types come from the Finetuner's signature (:func:`~difftilt.core.config.validate_kwargs`);
    sizes, counts, learning rates, ``alpha``, ``max_grad_norm`` and ``seed`` are range-checked;
    and ``accelerator``, ``devices`` and ``precision`` go to a Lightning Trainer that is built
    and dropped, so that a setting Lightning refuses, or more than one device, fails here
    rather than once training starts. A run's ``finetune:`` section and the Finetuner's own
    arguments are checked by this one function.

    Args:
        options: field name -> value; fields left out are not checked.
        where: the config path used in error messages, e.g. ``"finetune"``.
        skip: parameters supplied by the caller rather than by the config.

    Raises:
        ConfigError: naming the first bad field.
    """
    opts = validate_kwargs(Finetuner, options, where, skip=skip)
    for name, low in _COUNTS:
        if name in opts:
            check_count(where, name, opts[name], low)
    for name in _RATES:
        if name in opts:
            check_rate(where, name, opts[name], positive=True)
    if "alpha" in opts:
        check_rate(where, "alpha", opts["alpha"], positive=False)
    if opts.get("max_grad_norm") is not None and not opts["max_grad_norm"] > 0:
        # a negative norm flips the clipped gradient's sign (the policy then descends the reward)
        raise ConfigError(f"{where}.max_grad_norm must be a positive number, or null for no clipping, "
                          f"got {opts['max_grad_norm']!r}")
    if "seed" in opts:
        check_count(where, "seed", opts["seed"], 0)
    if any(name in opts for name in _TRAINER_OPTIONS):
        defaults = inspect.signature(Finetuner).parameters
        _check_trainer_options(where, *(opts.get(n, defaults[n].default) for n in _TRAINER_OPTIONS))
    return opts


def _check_trainer_options(where: str, accelerator: str, devices: int | str, precision: str) -> None:
    """Build (and drop) the Trainer that :meth:`Finetuner.fit` would build: Lightning's own
    checks of these settings, before any training. Fine-tuning runs on one device: a
    multi-device (DDP) Trainer would run the whole fit, run folder included, once per device."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        with quiet_lightning():
            trainer = make_trainer("check", 1, progress=False, accelerator=accelerator, devices=devices,
                                   precision=precision)
    except (MisconfigurationException, ValueError, TypeError) as err:
        reason = " ".join(str(err).split())  # one line
        raise ConfigError(f"{where}: Lightning refuses accelerator={accelerator!r}, devices={devices!r}, "
                          f"precision={precision!r}: {reason}") from None
    if trainer.num_devices > 1 or trainer.world_size > 1:
        raise ConfigError(f"{where}.devices: {devices!r} gives {trainer.num_devices} devices, but fine-tuning runs on "
                          "one (multi-device DDP training is not supported); set devices: 1")


class Finetuner:
    """Fine-tune a pretrained chain toward a reward with ELEGANT (or drift-only).

    Every argument after ``reward`` is a field of the ``finetune:`` section of a run's
    YAML config, and is checked as that section is (:func:`check_finetune_options`): a value
    of the wrong type or out of range is a :class:`~difftilt.core.errors.ConfigError` naming
    the argument.

    Args:
        reference: the pretrained chain ``P`` (frozen).
        reward: the reward on final states: a :class:`~difftilt.core.reward.Reward`, or a
            plain function ``f(x) -> (b,)`` values, which is wrapped in a
            :class:`~difftilt.core.reward.FunctionReward` and taken as not differentiable
            (for ``strategy="backprop"``, pass ``FunctionReward(f, differentiable=True)``).
        alpha: KL weight. ``0`` is plain reward maximization (no KL; ``learn_initial`` must
            then be off).
        strategy: ``"backprop"``, ``"policy_gradient"``, ``"cross_entropy"``, a mapping ``{name: ..., **options}``
            or a :class:`~difftilt.core.strategies.Strategy`.
        learn_initial: learn the optimal initial law (full ELEGANT); ``False`` is drift-only.
        iterations: policy updates in step 1.
        batch_size: chains per update in step 1.
        lr: Adam learning rate of the policy. The default suits the default control networks
            (small MLP tilts started at zero); use 1e-4 to 1e-3 when ``policy`` is a full
            copy of a large pretrained network.
        lr_schedule: ``"cosine"`` or ``"constant"``.
        warmup: linear warm-up updates.
        max_grad_norm: gradient clipping of the policy (``None``: off).
        control_hidden: width of the default control network (when ``policy`` is not given).
        control_depth: hidden layers of the default control network.
        control_input: what the default control sees: the state, the reference step's mean
            (Gaussian chains), or ``"auto"`` (the mean where possible).
        value_lr: Adam learning rate of the value network.
        value_refit_iterations: value-only updates with the control frozen after step 1.
        value_batch_size: chains per value-refit update.
        initial_steps: Euler steps ``M`` of the auxiliary chain in step 2.
        initial_iterations: updates in step 2.
        initial_batch_size: chains per update in step 2.
        initial_lr: Adam learning rate in step 2.
        seed: seeds everything in the fit (the same seed gives the same weights); the global random
            states are seeded during :meth:`fit` and the caller's given back after it.
        save_every: updates between saves of the training state, when :meth:`fit` is given a
            ``state_file`` (``0``: only at the fit's start and after each stage); with
            ``cross_entropy``'s ``reuse``, rounded up to a multiple of it.
        accelerator: Lightning accelerator (``"cpu"``, ``"gpu"``, ``"auto"``).
        devices: Lightning devices; they must come to one device (multi-device DDP training is
            not supported).
        precision: Lightning precision (``"32-true"``, ``"bf16-mixed"``, ...).
        progress: show progress bars.
        policy: the trainable chain (default: ``reference`` tilted by a fresh control network).
            Across rounds, pass the previous policy's base tilted by a copy of its control:
            the KL to the previous model then costs one base evaluation per step.
        value_net: ``v(x_0)`` network (default: an MLP on the flattened state).
        initial_policy: the trainable auxiliary chain for the initial law (default: the
            reference's auxiliary chain tilted by a fresh MLP control).
        loggers: Lightning loggers to receive metrics.
        on_metrics: called with each update's metrics dict (with ``stage``).
    """

    def __init__(
        self,
        reference: Process,
        reward: Reward | Callable[[Tensor], Tensor],
        alpha: float = 1.0,
        strategy: str | dict | Strategy = "backprop",
        learn_initial: bool = True,
        iterations: int = 1000,
        batch_size: int = 512,
        lr: float = 1e-2,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        warmup: int = 0,
        max_grad_norm: float | None = 1.0,
        control_hidden: int = 64,
        control_depth: int = 2,
        control_input: Literal["auto", "state", "mean"] = "auto",
        value_lr: float = 1e-3,
        value_refit_iterations: int = 400,
        value_batch_size: int = 1024,
        initial_steps: int = 50,
        initial_iterations: int = 500,
        initial_batch_size: int = 512,
        initial_lr: float = 1e-2,
        seed: int = 0,
        save_every: int = 100,
        accelerator: str = "cpu",
        devices: int | str = 1,
        precision: str = "32-true",
        progress: bool = True,
        policy: Process | None = None,
        value_net: nn.Module | None = None,
        initial_policy: Process | None = None,
        loggers: list | None = None,
        on_metrics: Callable[[dict], None] | None = None,
    ):
        arguments = locals()  # first: just the arguments, checked as a config's finetune: section is
        check_finetune_options({k: v for k, v in arguments.items() if k not in ("self", "reward")}, skip=("reward",))
        wrapped = not isinstance(reward, Reward)
        if wrapped:
            if not callable(reward):
                raise ConfigError(f"finetune.reward: expected a Reward or a function of x, "
                                  f"got {type(reward).__name__} {reward!r}")
            reward = FunctionReward(reward)
        if learn_initial and alpha == 0:
            raise ConfigError(
                "finetune.learn_initial needs alpha > 0: with alpha = 0 the optimal initial law is a point "
                "mass at the value's maximum. Set learn_initial: false for reward maximization without KL."
            )
        self.reference = freeze(reference)
        self.reward = reward
        self.alpha = float(alpha)
        self.strategy = make_strategy(strategy, "finetune.strategy")
        if self.strategy.requires_differentiable_reward and not reward.differentiable:
            raise ConfigError(
                f"strategy '{type(self.strategy).__name__}' needs a differentiable reward and '{reward.name}' is not; "
                "use strategy: policy_gradient"
                + (" (a plain function is taken as not differentiable: pass FunctionReward(f, differentiable=True) "
                   "if it is)" if wrapped else "")
            )
        if self.strategy.requires_positive_alpha and self.alpha == 0:
            raise ConfigError(
                f"strategy '{type(self.strategy).__name__}' fits the tilt p * exp(r / alpha) and needs alpha > 0"
            )
        self.learn_initial = learn_initial
        self.iterations, self.batch_size, self.lr = iterations, batch_size, lr
        self.lr_schedule, self.warmup, self.max_grad_norm = lr_schedule, warmup, max_grad_norm
        self.value_lr, self.value_refit_iterations, self.value_batch_size = value_lr, value_refit_iterations, value_batch_size
        self.initial_steps, self.initial_iterations = initial_steps, initial_iterations
        self.initial_batch_size, self.initial_lr = initial_batch_size, initial_lr
        self.seed, self.save_every = seed, save_every
        self.trainer_kwargs = dict(accelerator=accelerator, devices=devices, precision=precision, progress=progress)
        self.loggers = loggers
        self.on_metrics = on_metrics

        # Default networks are initialized from the seed (not from whatever state the global
        # RNG is in), so the same seed gives the same run; the caller's RNG is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if policy is None:
                policy = default_policy(self.reference, control_hidden, control_depth, control_input)
            self.policy = policy
            self.transitions = ControlledProcess(self.reference, self.policy)
            self.aux_reference = self.reference.initial_sde(initial_steps) if self.learn_initial else None
            if self.learn_initial and self.aux_reference is None:
                log.info("the initial law of %s is a point: ELEGANT's initial-law step is skipped",
                         type(reference).__name__)
            if self.aux_reference is not None:
                if value_net is None:
                    value_net = default_value_net(self.reference, control_hidden, control_depth)
                self.value_net = value_net
                if initial_policy is None:
                    shape = tuple(self.reference.event_shape)
                    control = TimeMLP(shape, shape, control_hidden, control_depth)
                    initial_policy = ResidualControlProcess(self.aux_reference, control)
                self.initial = ControlledProcess(self.aux_reference, initial_policy)
            else:
                self.value_net = None
                self.initial = None
        self._preflight()

    def _preflight(self) -> None:
        """Fail before any training (and before a run folder exists) on problems that
        would otherwise show up mid-run: a deterministic chain under a KL objective, a
        reward that rejects the chain's samples or returns NaN on them."""
        with torch.no_grad():
            gen = step_generator(self.seed, -1, self.reference.device)
            x = self.reference.initial(2, generator=gen)
            if self.alpha > 0 and self.reference.step(x, 0).is_deterministic:
                raise DeterministicStepError(
                    "the reference chain is deterministic (std 0, e.g. DDIM with eta = 0): KL(Q || P) is "
                    "infinite for any change to it, so the KL-regularized objective has no finite value; "
                    "use a stochastic sampler (eta > 0)"
                )
            self.reward(self.reference.sample(2, generator=gen, x0=x))

    # ------------------------------------------------------------------ stages
    def _emit(self, stage: str) -> Callable[[dict], None]:
        history = self.history

        def emit(metrics: dict) -> None:
            row = {"stage": stage, **metrics}
            history.append(row)
            if self.on_metrics is not None:
                self.on_metrics(row)

        return emit

    def _fit(self, system: EntropyRegularizedSystem, stage: str, iterations: int) -> None:
        with quiet_lightning():
            trainer = make_trainer(stage, iterations, loggers=self.loggers, **self.trainer_kwargs)
            if self._state_file is not None and self.save_every:
                # cross_entropy's reuse keeps a batch across updates: save only where none is held
                reuse = getattr(system.strategy, "reuse", 1) if system.train_policy else 1
                every = -(-self.save_every // reuse) * reuse
                trainer.callbacks.append(_SaveEvery(lambda done, opt: self._save(stage, done, opt), every, iterations))
            try:
                fit_interruptibly(trainer, system)
            except TrainingDivergedError as err:
                raise TrainingDivergedError(f"fine-tuning diverged in stage '{stage}': {err}; "
                                            f"{self._divergence_advice(stage, system.diverged)}") from err

    def _divergence_advice(self, stage: str, part: str | None) -> str:
        """The settings to lower when ``part`` (``"policy"`` or ``"value"``) of ``stage`` diverged: the
        stage's policy learning rate, and the value's too when the value network diverged (the returns
        it fits come from the policy)."""
        lr = "initial_lr" if stage == "initial" else "lr"
        names = [f"finetune.{lr} (now {getattr(self, lr):g})"]
        if part == "value":
            names.append(f"finetune.value_lr (now {self.value_lr:g})")
        if self.max_grad_norm is None:
            return f"lower {' or '.join(names)}, or set finetune.max_grad_norm (gradient clipping is off)"
        names.append(f"finetune.max_grad_norm (now {self.max_grad_norm:g})")
        return f"lower {', '.join(names[:-1])} or {names[-1]}"

    def _stage(self, stage: str, iterations: int, system: Callable[..., EntropyRegularizedSystem],
               done: Callable[[str, "Finetuner"], None]) -> None:
        """Fit one stage (``system(start=..., optimizer_state=...)`` makes its system), report it and
        save the state; a stage that had ended before the fit was resumed is skipped."""
        start, saved = 0, None
        resumed = self._resumed
        if resumed is not None and STAGES.index(stage) <= STAGES.index(resumed["stage"]):
            if stage != resumed["stage"] or resumed["iteration"] >= iterations:
                return  # ended (and reported) before the stop
            start, saved = resumed["iteration"], resumed["optimizers"]
        if start < iterations:
            self._fit(system(start=start, optimizer_state=saved), stage, iterations)
        done(stage, self)
        self._save(stage, iterations)

    def _trained(self) -> dict[str, tuple[nn.Module, nn.Module | None]]:
        """The trainable networks by name, each with the frozen chain it wraps (or ``None``)."""
        parts = {"policy": (self.policy, self.reference), "value_net": (self.value_net, None),
                 "initial": (self.initial.policy if self.initial is not None else None, self.aux_reference)}
        return {name: part for name, part in parts.items() if part[0] is not None}

    def _save(self, stage: str, iteration: int, optimizers: dict | None = None) -> None:
        """Write the training state after ``iteration`` updates of ``stage`` to the state file, if any."""
        if self._state_file is None:
            return
        write_state(self._state_file, {
            "format": STATE_FORMAT, "stage": stage, "iteration": iteration,
            "modules": {name: _own_state(module, frozen) for name, (module, frozen) in self._trained().items()},
            "optimizers": optimizers, "history": self.history,
        })

    def _restore(self, state: dict) -> None:
        """Load a saved state's networks and metrics (the optimizers wait for their stage)."""
        parts = self._trained()
        if set(state["modules"]) != set(parts):
            raise CheckpointError(f"the saved state holds the networks {sorted(state['modules'])}, this fine-tuning "
                                  f"trains {sorted(parts)}: it was saved with other settings")
        for name, (module, frozen) in parts.items():
            saved = state["modules"][name]
            try:
                if set(saved) != set(_own_state(module, frozen)):
                    raise RuntimeError
                module.load_state_dict({**module.state_dict(), **saved})  # the frozen chain's own, then the saved
            except RuntimeError:  # other names or shapes
                raise CheckpointError(f"the saved state's {name} does not fit this fine-tuning's network: it was "
                                      "saved with other settings") from None
        self.history = list(state["history"])

    def fit(self, stages: Callable[[str, "Finetuner"], None] | None = None, *,
            state_file: str | os.PathLike | None = None, resume: dict | None = None) -> FinetuneResult:
        """Run ELEGANT's steps (or drift-only) and return the fine-tuned model.

        Args:
            stages: called as ``stages(name, self)`` after each stage finishes (the CLI
                saves a checkpoint there); a resumed fit does not call it again for the
                stages that had ended before the stop.
            state_file: where to save the training state: at the start, every ``save_every``
                updates and after each stage (once ``stages`` returned), written to a
                temporary file and moved into place, so a crash leaves the previous state.
                It holds ``stage`` and ``iteration`` (its updates done), ``modules`` (the
                state dicts of ``policy``, ``value_net`` and ``initial`` -- the trainable
                networks, without the frozen chain a tilt wraps), ``optimizers`` (the
                stage's optimizers' and schedulers' state dicts; ``None`` at a stage's
                start or end) and ``history`` (the metrics so far).
            resume: a state read back from ``state_file`` (:func:`read_state`), saved by a fit
                with the same settings: the stages it had ended are skipped, the stopped one
                continues from the saved update with the saved optimizers, and the fit ends
                with the same weights as one never stopped (each update draws from its own
                seed, not from a global random state).
        """
        self.history: list[dict] = []
        self._state_file = Path(state_file) if state_file is not None else None
        self._resumed = resume
        done = stages or (lambda name, ft: None)
        # Lightning takes numpy's 32-bit seeds; a larger one (the online loop's per-round seeds) is folded
        with seeded_globals(self.seed % (SEED_MAX + 1)):
            return self._stages(done, resume)

    def _stages(self, done: Callable[[str, "Finetuner"], None], resume: dict | None) -> FinetuneResult:
        if resume is not None:
            self._restore(resume)
        else:
            self._save("transitions", 0)

        # Step 1: transitions (and the value regression if the initial law is learned).
        self._stage("transitions", self.iterations, lambda **resumed: EntropyRegularizedSystem(
            self.transitions, self.reward, self.strategy, self.alpha, batch_size=self.batch_size,
            iterations=self.iterations, lr=self.lr, lr_schedule=self.lr_schedule, warmup=self.warmup,
            max_grad_norm=self.max_grad_norm, value_net=self.value_net, value_lr=self.value_lr,
            seed=self.seed, on_metrics=self._emit("transitions"), **resumed,
        ), done)

        if self.initial is not None:
            # Step 1b: the return's conditional mean is v*(x_0) only at the optimal control:
            # refit v on fresh trajectories of the final, frozen control.
            self._stage("value", self.value_refit_iterations, lambda **resumed: EntropyRegularizedSystem(
                self.transitions, self.reward, self.strategy, self.alpha, batch_size=self.value_batch_size,
                iterations=self.value_refit_iterations, lr_schedule=self.lr_schedule, value_net=self.value_net,
                value_lr=self.value_lr, train_policy=False, seed=self.seed + 1, on_metrics=self._emit("value"),
                **resumed,
            ), done)

            # Step 2: the initial law nu* ∝ nu_pre exp(v / alpha) as a controlled auxiliary chain.
            value_reward = ValueReward(freeze(self.value_net))
            self._stage("initial", self.initial_iterations, lambda **resumed: EntropyRegularizedSystem(
                self.initial, value_reward, make_strategy("backprop"), self.alpha,
                batch_size=self.initial_batch_size, iterations=self.initial_iterations, lr=self.initial_lr,
                lr_schedule=self.lr_schedule, max_grad_norm=self.max_grad_norm, seed=self.seed + 2,
                on_metrics=self._emit("initial"), **resumed,
            ), done)

        return self.result()

    def result(self) -> FinetuneResult:
        """The model as trained so far (step 3: chain the learned initial law, if any;
        drift-only, the learned transitions from the reference's initial law)."""
        if self.initial is not None:
            model: Process = ChainedProcess(self.transitions.policy, self.initial.policy)
        else:
            model = self.transitions
        return FinetuneResult(
            model=model, transitions=self.transitions, initial=self.initial, value_net=self.value_net,
            alpha=self.alpha, history=list(getattr(self, "history", [])),
        )


def reward_summary(out: RewardOutput, infeasible_value: float) -> dict[str, float]:
    """Mean, std and max of a reward over a sample, with the feasible fraction."""
    v = out.masked(infeasible_value)
    return {
        "reward_mean": float(v.mean()),
        "reward_std": float(v.std()) if v.numel() > 1 else 0.0,
        "reward_max": float(v.max()),
        "feasible": float(out.feasible.float().mean()),
    }
