"""SEIKO: feedback-efficient online fine-tuning, and its baselines, in one harness.

Uehara et al., ICML 2024 (arXiv 2402.16359). For rounds ``i = 1..R`` with budgets ``B_i``:

1. sample ``B_i`` designs from the current model ``Q_{i-1}`` and ask the oracle (every
   design is stored before it is asked, every answer as soon as it arrives);
2. fit a reward model with uncertainty on all feasible answers;
3. fine-tune ``Q_i`` from ``Q_{i-1}`` on the optimistic reward with
   ``KL(Q_i || Q_{i-1})`` -- the KL to the *previous* model -- using the ELEGANT solver.

Methods (each runs in its own sub-folder with its own store and full budget):

==============  =============================================================================
``ucb``         SEIKO with a last-layer UCB reward model, ``mean + beta * width``
``bootstrap``   SEIKO with a bootstrap ensemble, max over heads (or ``mean + beta * std``)
``thompson``    SEIKO with one posterior draw per round (ensemble head)
``greedy``      SEIKO's loop with the ensemble mean (no optimism)
``nonadaptive`` the whole budget from the pretrained model at once, one fit, one fine-tune
``ppo``         online PPO with KL to the pretrained model, the oracle as the reward
``guidance``    no fine-tuning: the learned reward's gradient tilts sampling each round
``best_of_n``   the whole budget from the pretrained model, keep the best
==============  =============================================================================

Resuming: a round's designs are a deterministic function of the previous round's
checkpoint and the seed, so a resumed run regenerates them, checks them against the
stored ones, reuses every stored answer, asks only what was still ``pending``, and
ends with the same number of oracle calls and the same results as an uninterrupted run.
A run the oracle stopped with an error (``on_error: raise``) also asks again the batch it
failed on, which never got an answer: fix the oracle, then resume.
"""

from __future__ import annotations

import copy
import csv
import datetime as _dt
import io
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn

from .checkpoint import load_finetuned, save_model
from .config import atomic_write_text, field_differences, load_yaml, validate_kwargs
from .errors import AwaitingAnswers, CheckpointError, ConfigError, InputDataError
from .finetune import Finetuner, check_finetune_options, estimate_path_kl, keeps_rng_states
from .oracle import Oracle, OracleAnswer
from .plotting import new_figure, save_figure
from .plugins import Domain, load_plugin
from .process import ControlledProcess, Process, ResidualControlProcess, freeze, transitions_of
from .reward import Reward, RewardOutput
from .reward_models import (REWARD_MODELS, AcquisitionReward, Flatten, Greedy, MaxOverHeads, RewardModel, Thompson,
                            UCB, make_reward_model)
from .rollout import step_generator
from .run import RunFolder, read_config, read_jsonl, saved_config
from .store import COUNTED, STATUSES, SQLiteFeedbackStore
from .strategies import PolicyGradient, UpdateContext

__all__ = ["METHODS", "OnlineRunConfig", "config_differences", "run_online", "round_line", "RoundLines", "time_left",
           "duration", "OracleSpec", "PPOSpec", "RewardGradientControl", "unique_batch", "design_key",
           "design_keys", "read_rows", "read_results", "plot_results"]

METHODS = ("ucb", "bootstrap", "thompson", "greedy", "nonadaptive", "ppo", "guidance", "best_of_n", "ga", "hill_climb")
#: Model-free baselines: they edit queried designs with the domain's mutation/crossover.
EVOLUTION = ("ga", "hill_climb")
SEIKO_FAMILY = ("ucb", "bootstrap", "thompson", "greedy", "nonadaptive")


def OracleSpec(reward: dict | str, noise_std: float = 0.0, batch_size: int = 64, retries: int = 2,
               timeout: float | None = None, on_error: Literal["raise", "skip"] = "raise"):
    """The ``oracle:`` section of an online config.

    Args:
        reward: the plugin reward used as ground truth, ``{name: ..., **kwargs}``.
        noise_std: std of observation noise added to each answer.
        batch_size: designs per call of the ground truth.
        retries: extra attempts of a failing batch.
        timeout: seconds allowed per call, > 0 (``None``: no limit).
        on_error: ``raise`` (record and stop) or ``skip`` (record and go on).
    """
    # checked here, before a run folder exists, rather than by the Oracle once one does
    if not batch_size >= 1:
        raise ConfigError(f"oracle.batch_size must be >= 1, got {batch_size}")
    if not retries >= 0:
        raise ConfigError(f"oracle.retries must be >= 0, got {retries}")
    if not noise_std >= 0:
        raise ConfigError(f"oracle.noise_std must be >= 0, got {noise_std}")
    if timeout is not None and not timeout > 0:  # 0 or less would fail every batch
        raise ConfigError(f"oracle.timeout: seconds > 0, or null for no limit, got {timeout}")
    return dict(reward=reward, noise_std=noise_std, batch_size=batch_size, retries=retries, timeout=timeout,
                on_error=on_error)


def PPOSpec(batch_size: int = 32, epochs: int = 1, minibatches: int = 1, clip_range: float = 0.2, lr: float = 3e-3,
            infeasible_value: float = 0.0):
    """The ``ppo:`` section: online PPO + KL (the oracle is queried for every sample).

    Args:
        batch_size: oracle queries per PPO update.
        epochs: PPO epochs per update.
        minibatches: minibatches per epoch.
        clip_range: PPO clip.
        lr: Adam learning rate (reset each round).
        infeasible_value: reward given to infeasible designs.
    """
    return dict(batch_size=batch_size, epochs=epochs, minibatches=minibatches, clip_range=clip_range, lr=lr,
                infeasible_value=infeasible_value)


def EvolutionSpec(survival: float = 0.2, mutation_rate: float | None = None, crossover_rate: float = 0.5,
                  mutations: int = 1):
    """The ``evolution:`` section: the model-free baselines ``ga`` and ``hill_climb``.

    Both start from pretrained samples (round 0, like every method) and then only edit
    designs already answered by the oracle.

    * ``ga`` (as holo-bench's): the best ``survival`` fraction of the feasible designs
      asked so far are the parents (elitism: they compete again every round); each child
      is a uniform crossover of two random parents (with probability ``crossover_rate``)
      then a mutation of each position with probability ``mutation_rate``.
    * ``hill_climb``: every proposal is the best design so far with ``mutations`` random
      positions changed; the best moves as soon as a proposal beats it.

    Args:
        survival: parent fraction of the feasible answered designs (``ga``).
        mutation_rate: per-position mutation probability (``ga``); default ``1 / L``.
        crossover_rate: probability that a child is a crossover (``ga``).
        mutations: positions changed per proposal (``hill_climb``).
    """
    if not 0 < survival <= 1 or not 0 <= crossover_rate <= 1 or mutations < 1:
        raise ConfigError("evolution: survival in (0, 1], crossover_rate in [0, 1], mutations >= 1")
    if mutation_rate is not None and not 0 <= mutation_rate <= 1:
        raise ConfigError(f"evolution.mutation_rate must be in [0, 1], got {mutation_rate}")
    return dict(survival=survival, mutation_rate=mutation_rate, crossover_rate=crossover_rate, mutations=mutations)


@dataclass
class OnlineRunConfig:
    """The YAML config of ``difftilt online``.

    Attributes:
        plugin: the domain plugin.
        oracle: the ground truth and how it is asked (see :func:`OracleSpec`).
        process: the plugin's pretrained chain (default: its first).
        methods: one method or a list, from :data:`METHODS`; each gets the full budget.
        schedule: oracle queries per round, e.g. ``[64, 128, 256, 512]``.
        alpha: KL weight, one for all rounds or one per round.
        beta: optimism of UCB (and of the bootstrap with ``optimism: mean_std``).
        optimism: bootstrap acquisition: ``max`` over heads, or ``mean_std``.
        reward_model: options of the reward models (ensemble: ``num_heads``, ``hidden``,
            ``depth``, ``epochs``, ...; UCB: ``lambda_``, ...).
        features: options of the plugin's featurizer, the reward models' input (its
            ``Domain.featurizer`` keywords; sequences: ``reverse_complement``). A
            featurizer with a ``canonical`` form also decides which designs are one
            design for ``unique_designs`` (both strands of a DNA duplex).
        finetune: Finetuner fields used in every round.
        guidance_scale: strength of reward-gradient guidance (``guidance`` method).
        ppo: options of the ``ppo`` method (see :func:`PPOSpec`).
        evolution: options of ``ga`` and ``hill_climb`` (see :func:`EvolutionSpec`).
        fit_infeasible: fit the reward models on infeasible answers too, at the ground
            truth's ``infeasible_value`` (they then learn where designs fail, instead of
            seeing feasible designs only).
        unique_designs: never spend a query on a design this method has already asked
            about (earlier in the run or earlier in the batch): draw more samples (or
            proposals), up to 32 batches while each still brings at least 1% of a
            batch as new designs, and complete it as ``fill`` says if still short (see
            :func:`unique_batch`). Turn it off when the oracle is noisy and repeats
            are wanted.
        fill: what completes a batch when the proposals run dry (a collapsed model,
            a hill climber whose neighbours are all asked): ``edits``, the nearest
            designs not yet asked (1, 2, then 3 positions of the proposals changed, by
            the plugin's ``mutate``), then repeats; ``best_edits`` (the default), the
            same for methods without a reward model, and for those with one (from
            their second round) edits of the proposals and of the best answers so far
            (as many as the batch), the ones the last fitted acquisition rates highest
            among up to 32 batches of them rather than the first drawn: a local search
            on the acquisition where the model has no new design to offer; or
            ``repeats`` only. A repeat of a noise-free oracle teaches nothing. Plugins
            without ``mutate`` get repeats.
        edit_share: share of each round (from the second, for methods with a reward model)
            given to the edits of the best answers so far that the last fitted acquisition
            rates highest (1, then 2, then 3 positions changed, as ``fill: best_edits``
            picks them), the rest sampled from the model: a local search on the acquisition
            beside the tilted model, for a model that has collapsed onto one level of the
            reward but still varies what does not matter (it never runs dry, so ``fill``
            never acts). ``0`` (the default) is SEIKO's rule: every query a sample of the
            model. Below 1.
        eval_samples: samples of each round's model scored with the ground truth outside
            the budget (a simulation-only diagnostic; ``0`` to skip, which an oracle that is
            a real experiment, ``simulated = False``, requires).
        stop_at: stop a method once an answer's observed value reaches this (a known
            maximum, or the level a hit must meet) and leave the rest of its budget
            unspent; ``None``: spend the whole budget. The round whose answers reach
            it does not fine-tune a model for a next round.
        seed: seeds everything.
        output_dir: parent folder of run folders.
        name: run folder name.
    """

    plugin: str
    oracle: dict
    process: dict | str | None = None
    methods: str | list[str] = "ucb"
    schedule: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    alpha: float | list[float] = 1.0
    beta: float = 1.0
    optimism: Literal["max", "mean_std"] = "max"
    reward_model: dict = field(default_factory=dict)
    features: dict = field(default_factory=dict)
    finetune: dict = field(default_factory=dict)
    guidance_scale: float = 1.0
    ppo: dict = field(default_factory=dict)
    evolution: dict = field(default_factory=dict)
    fit_infeasible: bool = False
    unique_designs: bool = True
    fill: Literal["edits", "best_edits", "repeats"] = "best_edits"
    edit_share: float = 0.0
    eval_samples: int = 256
    stop_at: float | None = None
    seed: int = 0
    output_dir: str = "runs"
    name: str | None = None


_FT_SKIP = ("reference", "reward", "policy", "value_net", "initial_policy", "loggers", "on_metrics", "seed", "alpha")
#: The methods that fit a reward model (``ucb`` its own kind, the others an ensemble).
_FITS_REWARD_MODEL = (*SEIKO_FAMILY, "guidance")


def _reward_model_kind(method: str) -> str:
    """The reward-model kind a method fits (:data:`~.reward_models.REWARD_MODELS`)."""
    return "ucb" if method == "ucb" else "ensemble"


def _validate(raw: dict) -> OnlineRunConfig:
    cfg = OnlineRunConfig(**validate_kwargs(OnlineRunConfig, raw, "config"))
    cfg.methods = [cfg.methods] if isinstance(cfg.methods, str) else list(cfg.methods)
    for m in cfg.methods:
        if m not in METHODS:
            raise ConfigError(f"config.methods: unknown method '{m}' (known: {', '.join(METHODS)})")
    if len(set(cfg.methods)) != len(cfg.methods):
        raise ConfigError("config.methods: each method may appear once")
    if not 0.0 <= cfg.edit_share < 1.0:
        raise ConfigError(f"config.edit_share: a share of each round in [0, 1), got {cfg.edit_share}")
    if not cfg.schedule or any(b < 1 for b in cfg.schedule):
        raise ConfigError("config.schedule: a non-empty list of positive query counts")
    alphas = cfg.alpha if isinstance(cfg.alpha, list) else [cfg.alpha] * len(cfg.schedule)
    if len(alphas) != len(cfg.schedule) or any(a < 0 for a in alphas):
        raise ConfigError("config.alpha: one number >= 0, or one per round of the schedule")
    cfg.oracle = OracleSpec(**validate_kwargs(OracleSpec, cfg.oracle, "oracle"))
    cfg.ppo = PPOSpec(**validate_kwargs(PPOSpec, cfg.ppo, "ppo"))
    cfg.evolution = EvolutionSpec(**validate_kwargs(EvolutionSpec, cfg.evolution, "evolution"))
    check_finetune_options(cfg.finetune, "finetune", skip=_FT_SKIP)
    # Every kind, whatever the methods: a typo is caught before any run, not once a round's
    # answers are in (or never, for methods without a reward model). The kinds the methods
    # fit come first, so that an error lists the fields of the model the user has in mind.
    used = {_reward_model_kind(m) for m in cfg.methods if m in _FITS_REWARD_MODEL}
    for kind in sorted(REWARD_MODELS, key=lambda k: k not in used):
        validate_kwargs(REWARD_MODELS[kind], _model_options(kind, cfg.reward_model), "reward_model",
                        skip=("featurizer", "in_dim"))
    return cfg


_RUN_PLACE = ("output_dir", "name")  # where a run folder is, not what it ran


def config_differences(config: dict | str | os.PathLike, other: dict | str | os.PathLike) -> list[str]:
    """The fields in which two online configs differ once validated, sections to one level
    (``["alpha", "finetune.lr"]``); ``output_dir`` and ``name`` are not compared."""
    a, b = (asdict(_validate(read_config(c))) for c in (config, other))
    return field_differences(a, b, skip=_RUN_PLACE)


# --------------------------------------------------------------------------- guidance


class RewardGradientControl(nn.Module):
    """Reward guidance as a tilt: ``h(mu, t) = scale * grad r_hat(mu)``.

    Used with ``ResidualControlProcess(..., control_input="mean")`` it adds
    ``std_k^2 * scale * grad r_hat(mu_p(x_k))`` to each Gaussian step's mean: the first-order
    optimal control if the soft value were the learned reward itself (``scale = 1 / alpha``).

    Args:
        reward: a differentiable reward (e.g. an :class:`AcquisitionReward`).
        scale: guidance strength.
    """

    def __init__(self, reward: Reward, scale: float = 1.0):
        super().__init__()
        self.reward = reward
        self.scale = float(scale)

    def forward(self, mean: Tensor, t: float) -> Tensor:
        with torch.enable_grad():
            m = mean.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.reward(m).value.sum(), m)
        return self.scale * g


# --------------------------------------------------------------------------- metrics


def round_line(row: dict, rounds: int, left_seconds: float | None = None) -> str:
    """A finished round's row in one line, for a long run's progress:
    ``ucb round 3/8: 750 queries, best 0.3281, top-10 0.2750 (412 s)``, with the round's
    edits or repeats when it had any (``..., 97 edits (63 s)``: its model or proposals ran
    dry, or ``edit_share``), and the method's time left when given (``(412 s, about 34 min
    left)``; :class:`RoundLines` estimates it)."""
    fills = "".join(f", {row[key]:,} {word}" for key, word in (("edited", "edits"), ("repeated", "repeats"))
                    if row.get(key))
    left = f", about {duration(left_seconds)} left" if left_seconds and left_seconds >= 1 else ""  # not "0 s left"
    line = (f"{row['method']} round {row['round'] + 1}/{rounds}: {row['queries_used']:,} queries, "
            f"best {row['best_true']:.4f}, top-10 {row['top10_true']:.4f}{fills} ({row['seconds']:.0f} s{left})")
    return f"{line}; {row['stopped']}" if "stopped" in row else line


def time_left(rows: list[dict], budget: int) -> float | None:
    """Seconds a method still needs for the rest of its ``budget`` at the median pace (seconds
    per query) of its rounds so far, which a round that waited out a stop does not sway;
    ``None`` before its first round and once it is done (budget spent, or stopped at ``stop_at``)."""
    if not rows or "stopped" in rows[-1] or not 0 < rows[-1]["queries_used"] < budget:
        return None
    used = [0] + [r["queries_used"] for r in rows]
    paces = [r["seconds"] / (b - a) for r, a, b in zip(rows, used, used[1:]) if b > a]
    return statistics.median(paces) * (budget - used[-1]) if paces else None


def duration(seconds: float) -> str:
    """``45 s``, ``34 min``, ``2.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"


class RoundLines:
    """:func:`round_line` with each method's time left: its rounds still to run at the median
    time of those it finished in this process (a round that stopped the method has none)."""

    def __init__(self):
        self._seconds: dict[str, list[float]] = {}

    def __call__(self, row: dict, rounds: int) -> str:
        done = self._seconds.setdefault(row["method"], [])
        done.append(row["seconds"])
        left = rounds - row["round"] - 1
        going = left > 0 and "stopped" not in row
        return round_line(row, rounds, statistics.median(done) * left if going else None)


def _top_mean(values: list[float], k: int = 10) -> float:
    if not values:
        return float("nan")
    top = sorted(values, reverse=True)[:k]
    return sum(top) / len(top)


# --------------------------------------------------------------------------- one method


class _MethodRun:
    """One method's run in ``<run>/<method>/``: store, oracle, rounds, checkpoints."""

    def __init__(self, cfg: OnlineRunConfig, method: str, domain: Domain, pretrained: Process, truth: Reward,
                 featurizer: nn.Module, folder: Path, progress: bool,
                 on_round: Callable[[dict, int], None] | None = None):
        self.cfg, self.method, self.domain = cfg, method, domain
        self.pretrained, self.truth, self.progress, self.on_round = pretrained, truth, progress, on_round
        self.folder = folder
        self.acquisition: AcquisitionReward | None = None  # the last round's fitted reward model, if any
        folder.mkdir(parents=True, exist_ok=True)
        self.store = SQLiteFeedbackStore(folder / "feedback.sqlite")
        o = cfg.oracle
        self.oracle = Oracle(truth, budget=sum(cfg.schedule), store=self.store, batch_size=o["batch_size"],
                             noise_std=o["noise_std"], retries=o["retries"], timeout=o["timeout"],
                             on_error=o["on_error"], event_shape=tuple(pretrained.event_shape), seed=cfg.seed)
        self.featurizer = featurizer
        self.key = design_keys(featurizer)
        with torch.no_grad():
            self.phi_dim = int(self.featurizer(pretrained.initial(1)).shape[-1])
        self.alphas = cfg.alpha if isinstance(cfg.alpha, list) else [cfg.alpha] * len(cfg.schedule)
        self.schedule = [sum(cfg.schedule)] if method in ("nonadaptive", "best_of_n") else list(cfg.schedule)
        # the last fitted acquisition ranks edits (kept with each round's checkpoint)
        self._ranks_edits = cfg.fill == "best_edits" or cfg.edit_share > 0

    # ------------------------------------------------------------------ persistence
    @property
    def state_path(self) -> Path:
        return self.folder / "state.json"

    def state(self) -> dict:
        return json.loads(self.state_path.read_text()) if self.state_path.is_file() else {"rounds_done": 0}

    def _save_state(self, **kw) -> None:
        atomic_write_text(self.state_path, json.dumps({**self.state(), **kw}) + "\n")

    def rows(self) -> list[dict]:
        return read_rows(self.folder)

    def _append_row(self, row: dict) -> None:
        with open(self.folder / "rounds.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def alpha(self, i: int) -> float:
        """Round ``i``'s KL weight (the last one for rounds past the config's list)."""
        return self.alphas[min(i, len(self.alphas) - 1)]

    def _checkpoint(self, i: int) -> Path:
        return self.folder / "checkpoints" / f"round_{i}"

    def _round_seed(self, i: int, salt: int = 0) -> int:
        return (self.cfg.seed * 1_000_003 + (i + 1) * 7_919 + salt * 104_729 + METHODS.index(self.method)) & (2**62 - 1)

    # ------------------------------------------------------------------ asking
    def _ask(self, x: Tensor, round: int, tag: str) -> OracleAnswer:
        """Ask about ``x``, or -- when resuming -- reuse what the store already holds for ``tag``."""
        stored = [r for r in self.store.records(round=round) if r.tag == tag]
        if not stored:
            return self.oracle.query(x, round, tag)
        if len(stored) != x.shape[0] or not torch.allclose(torch.stack([r.design for r in stored]).float(),
                                                           x.detach().cpu().float(), atol=1e-5, rtol=1e-4):
            raise InputDataError(
                f"cannot resume {self.method} round {round}: the regenerated designs differ from the stored ones "
                "(was the config or the code changed?)"
            )
        # With on_error: raise, a batch recorded failed by its call stopped the run unanswered:
        # asked again now (with skip, a failure is the answer the run went on with).
        retry = self.cfg.oracle["on_error"] == "raise"
        if any(r.status == "pending" or (retry and r.status == "failed") for r in stored):
            self.oracle.answer_pending(round=round, failed=retry)
        return self.oracle.answers([r.id for r in stored])

    # ------------------------------------------------------------------ models
    def _acquisition(self, method: str):
        if method == "ucb":
            return UCB(self.cfg.beta)
        if method == "bootstrap":
            return MaxOverHeads() if self.cfg.optimism == "max" else UCB(self.cfg.beta)
        if method == "thompson":
            return Thompson()
        return Greedy()

    def _reward_model(self) -> RewardModel:
        kind = _reward_model_kind(self.method)
        options = _model_options(kind, dict(self.cfg.reward_model))
        return make_reward_model(kind, self.featurizer, self.phi_dim, **options)

    def _acquisition_reward(self, model: RewardModel, i: int) -> AcquisitionReward:
        acq = self._acquisition(self.method)
        acq.prepare(model, torch.Generator().manual_seed(self._round_seed(i, 2)))
        return AcquisitionReward(model, acq, name=f"{self.method} reward model")

    def _fit_reward(self, i: int) -> AcquisitionReward:
        """Round ``i``'s reward model, fit on the answers of rounds ``0..i``, with its acquisition."""
        x, y = self.store.training_data(self.truth.infeasible_value if self.cfg.fit_infeasible else None,
                                        before_round=i + 1)
        if x.shape[0] < 2:
            raise InputDataError(f"{self.method} round {i}: fewer than 2 feasible answers to fit a reward model on")
        model = self._reward_model()
        model.fit(x.to(torch.float32), y, seed=self._round_seed(i, 1))
        self.acquisition = self._acquisition_reward(model, i)
        return self.acquisition

    def _finetune(self, i: int, prev: Process, reward: Reward, alpha: float | None = None) -> Process:
        """Fine-tune from ``prev`` (frozen) with KL to it (weight ``alpha``, by default round
        ``i``'s); the new policy starts as a copy."""
        policy = initial_policy = None
        prev_trans = transitions_of(prev)
        if prev_trans is not self.pretrained and isinstance(prev_trans, ResidualControlProcess):
            control = copy.deepcopy(prev_trans.control).requires_grad_(True)
            policy = ResidualControlProcess(self.pretrained, control, prev_trans.control_input)
        elif prev_trans is not self.pretrained:  # a trained full copy (e.g. a fine-tuned denoiser)
            policy = copy.deepcopy(prev_trans).requires_grad_(True)
        else:
            policy = self.domain.make_policy(self.pretrained)
        if hasattr(prev, "initial_chain") and isinstance(prev.initial_chain, ResidualControlProcess):
            aux = prev.initial_chain
            initial_policy = ResidualControlProcess(aux.base, copy.deepcopy(aux.control).requires_grad_(True),
                                                    aux.control_input)
        alpha = self.alpha(i) if alpha is None else alpha
        progress = self.progress and self.cfg.finetune.get("progress", True)  # --no-progress wins over the config
        ft = Finetuner(freeze(prev), reward, alpha=alpha, policy=policy,
                       initial_policy=initial_policy, value_net=self.domain.make_value_net(self.pretrained),
                       seed=self._round_seed(i, 3), **{**self.cfg.finetune, "progress": progress})
        return ft.fit().model

    def _load(self, i: int) -> Process:
        path = self._checkpoint(i) / _REWARD_MODEL_FILE
        if self._ranks_edits and path.is_file():  # it ranks round i + 1's edits
            from safetensors.torch import load_file

            self.acquisition = self._acquisition_reward(self._reward_model().load_fitted(load_file(str(path))), i)
        return load_finetuned(self._checkpoint(i), pretrained=self.pretrained).model

    def _save(self, i: int, model: Process) -> None:
        folder = self._checkpoint(i)
        if self._ranks_edits and self.acquisition is not None:
            # before the model (whose index is written last): a round's checkpoint is complete or absent
            from safetensors.torch import save_file

            folder.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().contiguous().cpu() for k, v in self.acquisition.model.state_dict().items()}
            save_file(state, str(folder / f".{_REWARD_MODEL_FILE}.tmp"))
            os.replace(folder / f".{_REWARD_MODEL_FILE}.tmp", folder / _REWARD_MODEL_FILE)
        save_model(model, self.pretrained, folder, plugin=self.cfg.plugin,
                   process=self.process_spec, extra={"method": self.method, "round": i})

    # ------------------------------------------------------------------ rounds
    def run(self, process_spec: dict) -> list[dict]:
        self.process_spec = process_spec
        done = self.state()["rounds_done"]
        if (self.folder / "rounds.jsonl").is_file():  # resumed: the finished rounds' rows, whole, and no more
            # (a crash after a round's row, or half of it, and before its state runs that round again)
            rows = self.rows()[:done]
            atomic_write_text(self.folder / "rounds.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        # A resumed run stops where the original did. A round that reached the target but
        # has no row yet (a crash between its answers and its row) is run again: it re-asks
        # its designs, finds them answered, and writes its row.
        stopped = self._target_reached(before_round=done)
        model = None if stopped else self._restore(done)
        ppo = _PPO(self) if self.method == "ppo" else None
        for i in range(done, len(self.schedule)):
            if stopped:
                break
            t0 = time.time()
            self.repeated = self.edited = 0  # this round's repeats and edits (see _fresh)
            if ppo is not None:
                model = ppo.round(i, model)  # asks and updates in one
            elif self.method in EVOLUTION and i > 0:
                self._ask(self._evolve(i), i, tag=f"round{i}")
            else:
                gen = step_generator(self._round_seed(i), -9, model.device)
                self._ask(self._fresh(i, lambda n: model.sample(n, generator=gen)), i, tag=f"round{i}")
            stopped = self._target_reached()
            # Once an answer meets the target no later round needs a model: skip the update
            # (the round's row then describes the model that proposed it).
            if ppo is None and not stopped:
                model = self._update(i, model)  # the model itself for ga / hill_climb
            if not stopped and self.method not in ("guidance", "best_of_n", *EVOLUTION):
                self._save(i, model)
            row = self._metrics(i, model, time.time() - t0)
            if stopped:
                row["stopped"] = f"an answer reached stop_at {self.cfg.stop_at:g}"
            self._append_row(row)
            self._write_designs()
            self._save_state(rounds_done=i + 1)
            if self.on_round is not None:
                self.on_round(row, len(self.schedule))
        self._save_state(complete=True)
        return self.rows()

    def _write_designs(self) -> None:
        """``designs.csv``: every design asked so far, in the order asked, with what the oracle
        said (written after each round, from the store; for domains whose designs are text)."""
        records = self.store.records(status=tuple(s for s in STATUSES if s != "pending"))
        if not records:
            return
        text = self.domain.decode(torch.stack([r.design for r in records]), process=self.pretrained)
        if not all(isinstance(t, str) for t in text):
            return
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["query", "round", "status", "value", "true_value", "error", "design"])
        for r, t in zip(records, text):
            writer.writerow([r.id, r.round, r.status, "" if r.value is None else repr(r.value),
                             "" if r.true_value is None else repr(r.true_value), r.error or "", t])
        atomic_write_text(self.folder / "designs.csv", out.getvalue())

    def _target_reached(self, before_round: int | None = None) -> bool:
        """Whether an answered design's observed value (in a round before ``before_round``)
        has reached ``stop_at``."""
        target = self.cfg.stop_at
        return target is not None and any(r.value is not None and r.value >= target
                                          and (before_round is None or r.round < before_round)
                                          for r in self.store.records(status=("answered",)))

    def _fresh(self, i: int, propose: Callable[[int], Tensor]) -> Tensor:
        """Round ``i``'s ``schedule[i]`` designs from ``propose(n)``: with ``unique_designs``,
        none asked in an earlier round and none twice (see :func:`unique_batch`); the last
        ``edit_share`` of them the acquisition's favourite edits of the best answers."""
        n = self.schedule[i]
        if not self.cfg.unique_designs:
            return propose(n)
        taken = {self.key(r.design) for r in self.store.records() if r.round < i}
        mutates = _mutates(self.domain)
        g = torch.Generator().manual_seed(self._round_seed(i, 7))
        mutate = lambda x, k: self.domain.mutate(x, generator=g, count=k, process=self.pretrained)  # noqa: E731
        best = rank = None
        if mutates and self.acquisition is not None and self._ranks_edits:
            # the acquisition fit on the answers before this round ranks edits of the best answers
            acquisition = self.acquisition
            rank = lambda x: acquisition(x.to(torch.float32)).value  # noqa: E731
            answered, values = self.store.training_data(before_round=i)
            if answered.shape[0]:
                best = answered[torch.argsort(values, descending=True, stable=True)[:n]].to(torch.float32)
        edit = None
        if self.cfg.fill != "repeats" and mutates:
            edit = mutate
            if self.cfg.fill == "best_edits" and best is not None:  # edits of the proposals and of the best
                edit = lambda x, k: mutate(torch.cat([x, best.to(x)]), k)  # noqa: E731
        shared = int(self.cfg.edit_share * n) if best is not None else 0
        local = ranked_edits(best, shared, taken, mutate, key=self.key, rank=rank) if shared else []
        x, self.repeated, self.edited = unique_batch(propose, n - len(local), taken, edit=edit, key=self.key,
                                                     rank=rank if self.cfg.fill == "best_edits" else None)
        if local:
            x = torch.cat([x, torch.stack(local).to(x)])
            self.edited += len(local)
        return x

    def _evolve(self, i: int) -> Tensor:
        """This round's proposals of ``ga`` / ``hill_climb``, from the designs answered before it."""
        x, y = self.store.training_data(before_round=i)
        opts = self.cfg.evolution
        g = torch.Generator().manual_seed(self._round_seed(i, 6))
        if x.shape[0] == 0:
            raise InputDataError(f"{self.method}: no feasible design answered before round {i}; nothing to evolve")
        order = torch.argsort(y, descending=True, stable=True)
        if self.method == "hill_climb":
            best = x[order[:1]]
            return self._fresh(i, lambda n: self.domain.mutate(best.expand(n, *x.shape[1:]), generator=g,
                                                                count=opts["mutations"], process=self.pretrained))
        parents = x[order[: max(2, math.ceil(opts["survival"] * x.shape[0]))]]

        def children(n: int) -> Tensor:
            a = parents[torch.randint(parents.shape[0], (n,), generator=g)]
            b = parents[torch.randint(parents.shape[0], (n,), generator=g)]
            cross = torch.rand(n, generator=g) < opts["crossover_rate"]
            crossed = self.domain.crossover(a, b, generator=g, process=self.pretrained)
            kids = torch.where(cross.view(-1, *[1] * (x.dim() - 1)), crossed, a)
            return self.domain.mutate(kids, generator=g, rate=opts["mutation_rate"], process=self.pretrained)

        return self._fresh(i, children)

    def _update(self, i: int, model: Process) -> Process:
        if self.method in EVOLUTION:
            return model
        if self.method == "best_of_n":
            return model
        reward = self._fit_reward(i)
        if self.method == "guidance":
            return ResidualControlProcess(self.pretrained, RewardGradientControl(reward, self.cfg.guidance_scale), "mean")
        return self._finetune(i, model, reward)

    def _restore(self, done: int) -> Process:
        """The model after ``done`` rounds (rebuilt from checkpoints or, for guidance, from data)."""
        if done == 0 or self.method in ("best_of_n", *EVOLUTION):
            return self.pretrained
        if self.method == "guidance":
            return self._update(done - 1, self.pretrained)
        if self.method == "ppo":
            return _PPO.load(self, done - 1)
        return self._load(done - 1)

    # ------------------------------------------------------------------ metrics
    @torch.no_grad()
    def _metrics(self, i: int, model: Process, seconds: float) -> dict:
        answered = self.store.records(status=("answered",))
        # each distinct design once: a repeated query does not make a second top-10 design
        true_vals = list({design_key(r.design): r.true_value for r in answered if r.true_value is not None}.values())
        this = self.store.records(round=i, status=COUNTED)
        row: dict[str, Any] = {
            "method": self.method,
            "round": i,
            "queries_used": self.oracle.used,
            "best_true": max(true_vals) if true_vals else float("nan"),
            "top10_true": _top_mean(true_vals),
            "round_feasible": sum(1 for r in this if r.status == "answered") / max(1, len(this)),
            "round_mean_true": _mean([r.true_value for r in this if r.true_value is not None]),
            "failed": self.store.count(("failed",)),
            "repeated": self.repeated,
            "edited": self.edited,
            "seconds": round(seconds, 2),
        }
        n = self.cfg.eval_samples
        if self.method in EVOLUTION:
            # No model to sample: the round's proposals are this method's "samples".
            x = torch.stack([r.design for r in this]).to(torch.float32) if this else None
            if x is not None:
                off = self.truth.infeasible_value
                vals = [r.true_value if r.feasible and r.true_value is not None else off for r in this]
                row.update({"eval_mean_true": _mean(vals), "eval_feasible": row["round_feasible"],
                            "eval_diversity": float(self.domain.diversity(x))})
            return row
        if n > 0:
            row.update(self._true_summary(self._eval_samples(i, model, n)))
        row["kl_to_pretrained"] = self._kl(i, model, self.pretrained) if self.method != "best_of_n" else 0.0
        return row

    # the per-round diagnostics, on their own seeds (retune_round repeats them)
    def _eval_samples(self, i: int, model: Process, n: int) -> Tensor:
        return model.sample(n, generator=step_generator(self._round_seed(i, 4), -8, model.device))

    def _true_summary(self, x: Tensor) -> dict[str, float]:
        """The ground truth on the samples ``x`` (outside the budget: simulated oracles only)."""
        out = self.truth(x)
        v = out.masked(self.truth.infeasible_value)
        return {"eval_mean_true": float(v.mean()), "eval_top10_true": _top_mean(v.tolist()),
                "eval_feasible": float(out.feasible.float().mean()), "eval_diversity": float(self.domain.diversity(x))}

    def _kl(self, i: int, model: Process, reference: Process) -> float:
        return estimate_path_kl(model, reference, n=_KL_SAMPLES, seed=self._round_seed(i, 5))["total"]


_KL_SAMPLES = 256  # samples of the per-round KL-to-pretrained diagnostic
_REWARD_MODEL_FILE = "reward_model.safetensors"  # in a round's checkpoint, with fill: best_edits


def unique_batch(propose: Callable[[int], Tensor], n: int, taken: set[bytes], max_draws: int = 32,
                 min_new_fraction: float = 0.01, edit: Callable[[Tensor, int], Tensor] | None = None,
                 max_edits: int = 3, key: Callable[[Tensor], bytes] | None = None,
                 rank: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, int, int]:
    """``n`` designs from ``propose(n)`` that are not in ``taken`` and not repeated.

    Designs in ``taken`` (their ``key``, default :func:`design_key`), or already kept, are dropped and
    ``propose`` is called again, until ``n`` are kept, or a draw brings fewer than
    ``min_new_fraction * n`` new ones (a collapsed model: each further draw would cost a
    whole batch of sampling for a handful of designs), or after ``max_draws`` draws.

    If still short and ``edit`` is given, the rest are the nearest designs not yet asked:
    ``edit(x, k)`` changes ``k`` positions of each of the last draw's designs ``x`` (the
    proposer's most likely designs, as often as it proposes them), for ``k = 1, 2, ...,
    max_edits``, each ``k`` drawn again while a draw brings at least ``min_new_fraction * n``
    new ones. With ``rank`` (``(m, *event_shape) -> (m,)`` scores, e.g. the acquisition),
    each ``k``'s edits are first pooled over those draws, and the best-scoring of the
    pool fill the batch instead of the first drawn. Only then are repeats used: the last
    draw's first designs fill the batch.

    Deterministic given ``propose``, ``edit`` and ``rank``, so a resumed round regenerates
    the same designs. ``taken`` is updated.

    Returns:
        ``(designs, repeated, edited)``: ``(n, *event_shape)``, how many of them are
        repeats and how many are edits (they come after the proposals, repeats last).
    """
    min_new = max(1, math.ceil(min_new_fraction * n))
    key = key or design_key
    keep: list[Tensor] = []
    for draw in range(max_draws):
        x = propose(n)
        got = _take(x, keep, n, taken, key)
        if len(keep) == n:
            return torch.stack(keep), 0, 0
        if draw and got < min_new:
            break
    proposed = len(keep)
    if edit is not None:
        keep.extend(ranked_edits(x, n - len(keep), taken, edit, max_draws=max_draws, max_edits=max_edits,
                                 min_new=min_new, key=key, rank=rank))
    if len(keep) == n:
        return torch.stack(keep), 0, n - proposed
    repeated = n - len(keep)
    return (torch.cat([torch.stack(keep), x[:repeated]]) if keep else x), repeated, len(keep) - proposed


def ranked_edits(x: Tensor, n: int, taken: set[bytes], edit: Callable[[Tensor, int], Tensor], max_draws: int = 32,
                 max_edits: int = 3, min_new: int = 1, key: Callable[[Tensor], bytes] | None = None,
                 rank: Callable[[Tensor], Tensor] | None = None) -> list[Tensor]:
    """Up to ``n`` edits of ``x`` not in ``taken`` (which is updated), nearest first.

    ``edit(x, k)`` changes ``k`` positions of each design of ``x``, for ``k = 1, 2, ...,
    max_edits``; each ``k`` is drawn again (at most ``max_draws`` times) while a draw brings
    at least ``min_new`` designs not yet taken. Without ``rank`` the first drawn are kept;
    with ``rank`` (``(m, *event_shape) -> (m,)`` scores, e.g. the acquisition) each ``k``'s
    edits are pooled over its draws and the best-scoring kept (those not kept are released
    from ``taken``). Fewer than ``n`` when the edits run out.
    """
    key = key or design_key
    keep: list[Tensor] = []
    for k in range(1, max_edits + 1):
        if len(keep) >= n:
            break
        pool: list[Tensor] = []  # with rank: this k's unasked edits, the best of which are kept
        into, limit = (keep, n) if rank is None else (pool, math.inf)
        for _ in range(max_draws):
            got = _take(edit(x, k), into, limit, taken, key)
            if len(keep) == n or got < min_new:
                break
        if pool:
            with torch.no_grad():
                scores = rank(torch.stack(pool)).reshape(-1)
            order = torch.argsort(scores, descending=True, stable=True).tolist()
            need = n - len(keep)
            keep.extend(pool[j] for j in order[:need])
            for j in order[need:]:  # not asked after all: free for a later draw or round
                taken.discard(key(pool[j]))
    return keep


def _take(rows: Tensor, into: list[Tensor], limit: float, taken: set[bytes], key: Callable[[Tensor], bytes]) -> int:
    """Append the rows of ``rows`` not in ``taken`` to ``into`` (and their keys to ``taken``)
    until ``into`` holds ``limit``; returns how many were appended."""
    before = len(into)
    for row in rows:
        k = key(row)
        if k not in taken:
            taken.add(k)
            into.append(row)
            if len(into) == limit:
                break
    return len(into) - before


def _mutates(domain: Domain) -> bool:
    """Whether the plugin implements ``mutate`` (the GA, the hill climber and ``fill: edits`` use it)."""
    return type(domain).mutate is not Domain.mutate


def design_key(design: Tensor) -> bytes:
    """Exact identity of a design (one-hot sequences, graphs; continuous designs never repeat)."""
    return design.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()


def design_keys(featurizer: nn.Module) -> Callable[[Tensor], bytes]:
    """The identity of designs for the no-repeat rule: :func:`design_key`, of the featurizer's
    ``canonical`` form where it has one (designs it declares one, e.g. both strands of a
    DNA duplex, are one design: a query on the second would be a repeat)."""
    canonical = getattr(featurizer, "canonical", None)
    return design_key if canonical is None else (lambda d: design_key(canonical(d[None])[0]))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _model_options(kind: str, opts: dict) -> dict:
    """Drop the options that belong to the other reward-model kind."""
    ensemble_only = {"num_heads", "bootstrap"}
    ucb_only = {"lambda_"}
    drop = ucb_only if kind == "ensemble" else ensemble_only
    return {k: v for k, v in opts.items() if k not in drop}


class _OracleReward(Reward):
    """The oracle as a (non-differentiable) reward for online PPO; every call is a query."""

    def __init__(self, run: _MethodRun, infeasible_value: float):
        super().__init__()
        self.run, self.infeasible_value = run, infeasible_value
        self.round, self.tag = 0, ""

    @property
    def name(self) -> str:
        return "oracle"

    def evaluate(self, x: Tensor) -> RewardOutput:
        ans = self.run._ask(x, self.round, self.tag)
        ok = torch.tensor([s == "answered" for s in ans.status])
        value = torch.where(ok, ans.value, torch.full_like(ans.value, self.infeasible_value))
        return RewardOutput(value.to(x.device), ok.to(x.device))


class _PPO:
    """Online PPO with KL to the pretrained model; the oracle is queried for every sample."""

    def __init__(self, run: _MethodRun):
        self.run = run
        spec = run.cfg.ppo
        self.spec = spec
        self.strategy = PolicyGradient(epochs=spec["epochs"], minibatches=spec["minibatches"],
                                       clip_range=spec["clip_range"])
        self.reward = _OracleReward(run, spec["infeasible_value"])

    @staticmethod
    def load(run: _MethodRun, i: int) -> Process:
        return load_finetuned(run._checkpoint(i), pretrained=run.pretrained).model

    def round(self, i: int, model: Process) -> Process:
        run = self.run
        if model is run.pretrained:
            from .finetune import default_policy

            policy = default_policy(run.pretrained)
        else:
            prev = transitions_of(model)
            policy = ResidualControlProcess(run.pretrained, copy.deepcopy(prev.control).requires_grad_(True),
                                            prev.control_input)
        cp = ControlledProcess(run.pretrained, policy)
        params = cp.trainable_parameters()
        opt = torch.optim.Adam(params, lr=self.spec["lr"])  # reset each round (exact replay on resume)

        def step() -> float:
            norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(norm)

        alpha = run.alpha(i)
        budget, bs = run.schedule[i], self.spec["batch_size"]
        for j, start in enumerate(range(0, budget, bs)):
            n = min(bs, budget - start)
            seed = run._round_seed(i, 100 + j)
            x0 = cp.initial(n, generator=step_generator(seed, -1, cp.device))
            self.reward.round, self.reward.tag = i, f"round{i}-update{j}"
            ctx = UpdateContext(cp, self.reward, alpha, x0, seed, lambda loss: loss.backward(), step)
            self.strategy.update(ctx)
        return cp


# --------------------------------------------------------------------------- the run


#: Seconds: a run redraws its plot after a round at most this often (and once at its end).
PLOT_EVERY = 60.0


def read_rows(folder: str | os.PathLike) -> list[dict]:
    """A method's rows so far, one per finished round, from ``<run>/<method>/rounds.jsonl``
    (each written as its round ends; ``results.json`` holds the same rows once the run is done).
    A last line that is not whole (being written now, or cut by a crash) is left out."""
    return read_jsonl(Path(folder) / "rounds.jsonl")


def read_results(run_dir: str | os.PathLike) -> dict:
    """An online run's rounds so far, in ``results.json``'s form (``{"methods": {method: rows},
    "schedule": [...]}``, every method of its config, ``[]`` for one not begun): a run still
    going, stopped, or done.

    Raises:
        CheckpointError: ``run_dir`` is not an online run folder.
    """
    path = Path(run_dir)
    cfg = saved_config(path)
    if cfg is None or "oracle" not in cfg:
        raise CheckpointError(f"{path} is not a difftilt online run folder (no online config.yaml)")
    methods = cfg.get("methods") or []
    return {"methods": {m: read_rows(path / m) for m in methods}, "schedule": cfg.get("schedule")}


def plot_results(results: dict, path: str | os.PathLike) -> Path:
    """``reward_vs_queries.png``: per method, the top-10 true reward found, the model's mean true
    reward and its feasible fraction against the oracle queries used (``results`` as in
    ``results.json``; a star where a method stopped at ``stop_at``)."""
    keys = [("top10_true", "top-10 true reward of queried designs"), ("eval_mean_true", "mean true reward of model samples"),
            ("eval_feasible", "feasible fraction of model samples")]
    fig, axes = new_figure(1, len(keys), figsize=(5 * len(keys), 3.6))
    for ax, (key, title) in zip(axes, keys):
        for method, rows in results["methods"].items():
            xs = [r["queries_used"] for r in rows if key in r]
            ys = [r[key] for r in rows if key in r]
            if xs:
                line, = ax.plot(xs, ys, marker="o", label=method)
                if "stopped" in rows[-1] and key in rows[-1]:  # stop_at reached: a star where it stopped
                    ax.plot(xs[-1:], ys[-1:], marker="*", markersize=15, color=line.get_color(), linestyle="none",
                            label=f"{method} stopped (stop_at)" if ax is axes[0] else None)
        ax.set_xlabel("oracle queries used")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:  # nothing yet while the first round's answers are out
        axes[0].legend(fontsize=8)
    return save_figure(fig, path)


def _setup(cfg: OnlineRunConfig) -> tuple[Domain, Process, Reward, nn.Module, dict]:
    """The plugin, the frozen pretrained model, the ground truth, the reward models'
    featurizer and the process spec of a validated config."""
    domain = load_plugin(cfg.plugin)
    needs_mutation = [m for m in cfg.methods if m in EVOLUTION]
    if needs_mutation and not _mutates(domain):
        raise ConfigError(f"config.methods: {', '.join(needs_mutation)} need a mutation operator, "
                          f"which plugin '{cfg.plugin}' does not provide")
    pretrained = freeze(domain.make_process(cfg.process))
    truth = domain.make_reward(cfg.oracle["reward"], pretrained)
    options = validate_kwargs(domain.featurizer, cfg.features, "features", skip=("reference",))
    featurizer = domain.featurizer(pretrained, **options) or Flatten(tuple(pretrained.event_shape))
    kinds = sorted({_reward_model_kind(m) for m in cfg.methods if m in _FITS_REWARD_MODEL})
    if kinds:
        # Built once and dropped, so that a bad value (num_heads: 1) stops the run before its
        # folder exists, not after the first round's queries; on a forked RNG, so that the
        # run's random stream is the one it always was.
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            phi_dim = int(featurizer(pretrained.initial(1)).shape[-1])
            for kind in kinds:
                make_reward_model(kind, featurizer, phi_dim, **_model_options(kind, cfg.reward_model))
    process_spec = cfg.process if isinstance(cfg.process, dict) else {"name": cfg.process or next(iter(domain.processes))}
    return domain, pretrained, truth, featurizer, process_spec


@keeps_rng_states  # the run seeds torch's global state; the caller's is given back
def run_online(config: dict | str | os.PathLike | None = None, *, resume: str | os.PathLike | None = None,
               overrides: list[str] | None = None, output_dir: str | None = None, name: str | None = None,
               progress: bool = True, on_round: Callable[[dict, int], None] | None = None,
               on_start: Callable[[Path], None] | None = None) -> RunFolder:
    """Run (or resume) ``difftilt online``; returns the run folder.

    It seeds torch with the config's ``seed`` and gives the caller's random states back after.

    Args:
        config: YAML path or mapping (with ``resume``: optional, must match the run's).
        resume: an existing run folder to continue.
        overrides: ``key.sub=value`` strings.
        output_dir: overrides ``config.output_dir``.
        name: overrides ``config.name``.
        progress: show fine-tuning progress bars.
        on_round: called as each round ends with its row (as in ``results.json``) and the
            method's number of rounds; :func:`round_line` makes a line of them.
        on_start: called with the run folder once it is made (or, resumed, locked), before the
            first question: where to follow the run (``difftilt show``) and resume it.
    """
    if resume is None:
        return _run_online(config, None, overrides, output_dir, name, progress, on_round, on_start)
    run = RunFolder.to_resume(resume, "online", output_dir=output_dir, name=name)
    if isinstance(config, (str, os.PathLike)):
        config = Path(config).resolve()  # given from here; the run goes on where it was started
    with run.in_start_directory():
        return _run_online(config, run, overrides, output_dir, name, progress, on_round, on_start)


def _run_online(config: dict | str | os.PathLike | None, run: RunFolder | None, overrides: list[str] | None,
                output_dir: str | None, name: str | None, progress: bool,
                on_round: Callable[[dict, int], None] | None, on_start: Callable[[Path], None] | None) -> RunFolder:
    """:func:`run_online` in a new run folder (``run`` None) or, resumed, in ``run``."""
    if run is not None:
        saved = load_yaml(run.path / "config.yaml")
        cfg = _validate(saved)
        if config is not None:
            differ = config_differences(read_config(config, overrides), saved)
            if differ:
                raise ConfigError(f"the config differs from the one {run.path} was started with "
                                  f"({', '.join(differ)}); resume it unchanged")
    else:
        if config is None:
            raise ConfigError("give a config file (or --resume RUN_DIR)")
        cfg = _validate(read_config(config, overrides))
        if output_dir is not None:
            cfg.output_dir = str(output_dir)
        if name is not None:
            cfg.name = name

    torch.manual_seed(cfg.seed)
    domain, pretrained, truth, featurizer, process_spec = _setup(cfg)
    if cfg.eval_samples > 0 and not truth.simulated:
        raise ConfigError(f"eval_samples: the oracle '{truth.name}' is a real experiment, and eval_samples would "
                          f"score {cfg.eval_samples} of each round's model samples with it outside the budget; "
                          "set eval_samples: 0")

    if run is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        run = RunFolder.create(cfg.output_dir, cfg.name or f"online-{cfg.plugin}-{stamp}")
        run.write_config({**asdict(cfg), "methods": cfg.methods})
    lock = run.lock()
    run.set_running()
    if on_start is not None:
        on_start(run.path)
    results: dict = {"methods": {}, "schedule": cfg.schedule}
    waiting: dict[str, AwaitingAnswers] = {}
    plotted = [time.monotonic()]

    def round_ended(row: dict, rounds: int) -> None:  # a long run's plot is there to look at while it runs
        if time.monotonic() - plotted[0] >= PLOT_EVERY:
            plot_results(read_results(run.path), run.path / "reward_vs_queries.png")
            plotted[0] = time.monotonic()
        if on_round is not None:
            on_round(row, rounds)

    try:
        for method in cfg.methods:
            mrun = _MethodRun(cfg, method, domain, pretrained, truth, featurizer, run.path / method, progress,
                              round_ended)
            try:
                results["methods"][method] = mrun.run(process_spec)
            except AwaitingAnswers as err:  # its round is out for measurement: the other methods go on
                waiting[method] = err
                results["methods"][method] = mrun.rows()
            finally:
                mrun.store.close()
            run.write_json("results.json", results)
        plot_results(results, run.path / "reward_vs_queries.png")
        run.write_json("results.json", results)
        if waiting:
            count = sum(err.count for err in waiting.values())
            reason = next(iter(waiting.values())).reason
            message = (f"{count} designs ({', '.join(f'{m} {e.count}' for m, e in waiting.items())}) await the "
                       f"oracle's answers: {reason}; then continue with: difftilt online --resume {run.path}")
            run.set_status("waiting", error=message)
            err = AwaitingAnswers(message, count=count, reason=reason)
            err.run = run.path
            raise err
        run.set_status("complete")
    except AwaitingAnswers:
        raise
    except (KeyboardInterrupt, SystemExit) as err:
        # Ctrl-C, or SIGTERM (which Lightning turns into a SystemExit during fine-tuning):
        # the run was stopped, not broken, and --resume (or a benchmark's reuse) continues it
        run.set_status("interrupted", error=f"stopped ({type(err).__name__}); continue with --resume")
        err.run = run.path  # for the command's line saying how to continue
        raise
    except BaseException as err:
        run.set_status("failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        lock.close()
    return run
