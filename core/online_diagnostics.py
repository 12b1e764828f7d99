"""Reading a finished (or interrupted) SEIKO run again: how well each round's reward model
ranked the next round's answers (:func:`reward_model_ranks`), and what one round's
fine-tuning does at other alphas, solver settings or reward models, against the round's
exact target (:func:`retune_round`). Both rebuild a method from its run folder (its config,
store and round checkpoints, with the run's seeds) and only read the folder; the
benchmarks ``reward_model_rank`` and ``round_alpha`` print them.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
from torch import Tensor

from .config import load_yaml
from .errors import CheckpointError, ConfigError, ShapeError
from .finetune import check_finetune_options, estimate_tilt
from .online import _FT_SKIP, SEIKO_FAMILY, _MethodRun, _setup, _validate
from .rollout import step_generator

__all__ = ["reward_model_ranks", "retune_round", "spearman"]


def _open_seiko_run(run_dir: str | os.PathLike, method: str, what: str, progress: bool = False,
                    changes: dict[str, dict] | None = None) -> "_MethodRun":
    """A finished (or interrupted) run's SEIKO-family method, rebuilt from its folder to be
    read: its config with ``changes`` (``{"finetune": {...}}`` / ``{"reward_model": {...}}``,
    each updating that section, checked), its store and its checkpoints."""
    folder = Path(run_dir)
    if not (folder / "config.yaml").is_file():
        raise CheckpointError(f"{folder} is not an online run folder (no config.yaml)")
    cfg = _validate(load_yaml(folder / "config.yaml"))
    if method not in cfg.methods:
        raise ConfigError(f"{folder} has no method '{method}' (it ran {', '.join(cfg.methods)})")
    if method not in SEIKO_FAMILY:
        raise ConfigError(f"{what} needs a method that fits a reward model and fine-tunes "
                          f"({', '.join(SEIKO_FAMILY)}), not '{method}'")
    changes = changes or {}
    if changes.get("finetune"):
        cfg.finetune = {**cfg.finetune, **changes["finetune"]}
        check_finetune_options(cfg.finetune, "finetune", skip=_FT_SKIP)
    if changes.get("reward_model"):
        cfg.reward_model = {**cfg.reward_model, **changes["reward_model"]}
    if not (folder / method / "state.json").is_file():
        raise CheckpointError(f"{folder / method} has no finished round")
    domain, pretrained, truth, featurizer, _ = _setup(cfg)
    mrun = _MethodRun(cfg, method, domain, pretrained, truth, featurizer, folder / method, progress)
    if changes.get("reward_model"):
        try:
            mrun._reward_model()  # its options checked before any work
        except Exception:
            mrun.store.close()
            raise
    return mrun


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two 1-d tensors (ties get their mean rank)."""
    if a.dim() != 1 or a.shape != b.shape or a.numel() < 2:
        raise ShapeError(f"spearman needs two 1-d tensors of the same length >= 2, got {tuple(a.shape)} and {tuple(b.shape)}")

    def ranks(v: Tensor) -> Tensor:
        v = v.double()
        less = (v[None, :] < v[:, None]).sum(1).double()
        equal = (v[None, :] == v[:, None]).sum(1).double()
        return less + (equal + 1) / 2

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else float("nan")


def reward_model_ranks(run_dir: str | os.PathLike, method: str = "ucb",
                       reward_model: dict | None = None) -> list[dict]:
    """How well each round's reward model ranked the next round's answers, in a finished run.

    For each finished round ``k >= 1`` it refits the reward model round ``k - 1`` fit (the
    answers of rounds ``0..k-1``, the run's settings and seed, ``reward_model`` changes
    applied) and scores it on round ``k``'s answers -- the designs it was then used to
    choose, answered after the fit -- by the Spearman correlation of its posterior mean and
    of its acquisition with the observed values, and by the observed mean of the 10
    answers it ranks highest. Infeasible answers count at the oracle's infeasible value
    when the run fits on them (``fit_infeasible``), as in the run. The folder is only read.

    Returns:
        One dict per round ``k``: ``round``, ``train`` and ``test`` (answers fit on and
        scored), ``test_mean`` and ``test_best`` (observed), ``rho_mean``,
        ``rho_acquisition``, ``top10_by_mean`` and ``top10`` (the observed top-10 mean).
    """
    mrun = _open_seiko_run(run_dir, method, "reward_model_ranks", changes={"reward_model": reward_model or {}})
    try:
        infeasible = mrun.truth.infeasible_value if mrun.cfg.fit_infeasible else None
        done = mrun.state()["rounds_done"]
        rows = []
        n_next = mrun.store.training_data(infeasible, before_round=1)[1].numel()
        for k in range(1, done):
            # answers come in id order, round by round: round k's follow the first n_train
            x_all, y_all = mrun.store.training_data(infeasible, before_round=k + 1)
            n_train, n_next = n_next, y_all.numel()
            x, y = x_all[n_train:].to(torch.float32), y_all[n_train:].double()
            if y.numel() < 2:
                continue
            acquisition = mrun._fit_reward(k - 1)
            with torch.no_grad():
                mean = acquisition.model.posterior(x).mean.double()
                acq = acquisition(x).masked(acquisition.infeasible_value).double()
            top = min(10, y.numel())
            rows.append({"round": k, "train": n_train, "test": int(y.numel()), "test_mean": float(y.mean()),
                         "test_best": float(y.max()), "rho_mean": spearman(mean, y), "rho_acquisition": spearman(acq, y),
                         "top10_by_mean": float(y[mean.argsort(descending=True)[:top]].mean()),
                         "top10": float(y.sort(descending=True).values[:top].mean())})
        return rows
    finally:
        mrun.store.close()


def retune_round(run_dir: str | os.PathLike, method: str, round_index: int, alphas: list[float],
                 samples: int | None = None, progress: bool = False, tilt_samples: int = 0,
                 finetune: dict | None = None, reward_model: dict | None = None) -> list[dict]:
    """Round ``round_index`` of a finished (or interrupted) run's fine-tuning again, at other alphas.

    How far one round's tilt moves the model is what alpha sets, and it is hard to guess
    in reward units. This refits the round's reward model (the same answers and seed as the
    run), fine-tunes from the model the round started from (the pretrained one for round 0)
    with the run's settings and seed but each ``alpha``, and describes each result: its KL
    to that starting model and to the pretrained one, the acquisition's mean over its
    samples, and -- for a simulated oracle, outside any budget -- the ground truth's mean,
    feasible fraction and diversity. The samples and the KL estimate use the run's
    diagnostic seeds, so at the run's own alpha the row repeats the run's
    (``eval_mean_true``, ``kl_to_pretrained``) on the same machine and thread count. The run
    folder is only read.

    Args:
        run_dir: an online run folder.
        method: one of its SEIKO-family methods (``ucb``, ``bootstrap``, ``thompson``,
            ``greedy``, ``nonadaptive``).
        round_index: a round it has finished.
        alphas: the KL weights to try.
        samples: samples of each fine-tuned model (default: the run's ``eval_samples``, else 256).
        progress: show fine-tuning progress bars.
        tilt_samples: if positive, also estimate from this many samples of the starting
            model what the round's exact target ``p_start * exp(acquisition / alpha)`` would
            reach (:func:`~difftilt.core.finetune.estimate_tilt`), to compare with what the
            fine-tuning reached.
        finetune: changes to the run's ``finetune`` fields for these fine-tunes (e.g.
            ``{"iterations": 240}`` or ``{"strategy": {"name": "policy_gradient"}}``), to
            see whether another solver setting gets closer to the target.
        reward_model: changes to the run's ``reward_model`` fields for the refit (e.g.
            ``{"clip_features": True}``), to see how another reward model moves the round.

    Returns:
        One dict per alpha: ``alpha``, ``kl_to_start``, ``kl_to_pretrained``,
        ``acquisition_mean``, ``objective`` (``acquisition_mean - alpha * kl_to_start``),
        ``seconds`` and, for a simulated oracle, ``mean_true``, ``top10_true``,
        ``feasible``, ``diversity``. With ``tilt_samples``: ``start_objective`` (the
        acquisition's mean over the starting model's samples), the exact target's
        ``tilt_objective``, ``tilt_kl``, ``tilt_acquisition``, ``tilt_ess``, ``solver_share``
        (``(objective - start_objective) / (tilt_objective - start_objective)``: the share of
        the reachable gain the fine-tuning got; ``None`` when there is none) and, for a
        simulated oracle, ``tilt_mean_true``.
    """
    if not alphas or any(not math.isfinite(a) or a <= 0 for a in alphas):
        raise ConfigError(f"alphas: one or more positive numbers, got {alphas}")
    if tilt_samples < 0:
        raise ConfigError(f"tilt_samples must be >= 0, got {tilt_samples}")
    mrun = _open_seiko_run(run_dir, method, "retune_round", progress,
                           {"finetune": finetune or {}, "reward_model": reward_model or {}})
    folder, cfg, pretrained, truth = Path(run_dir), mrun.cfg, mrun.pretrained, mrun.truth
    try:
        done = mrun.state()["rounds_done"]
        if not 0 <= round_index < done:
            raise ConfigError(f"{folder / method} has finished rounds 0..{done - 1}; round {round_index} is not one")
        start = mrun._restore(round_index)
        acquisition = mrun._fit_reward(round_index)
        n = samples or cfg.eval_samples or 256

        def acquire(x: Tensor) -> Tensor:
            return acquisition(x).masked(acquisition.infeasible_value).double()

        if tilt_samples:
            with torch.no_grad():
                gen = step_generator(mrun._round_seed(round_index, 8), -8, start.device)
                xs = torch.cat([start.sample(min(512, tilt_samples - k), generator=gen)
                                for k in range(0, tilt_samples, 512)])
                start_values = acquire(xs)
                true_values = truth(xs).masked(truth.infeasible_value).double() if truth.simulated else None
        rows = []
        for alpha in alphas:
            t0 = time.time()
            model = mrun._finetune(round_index, start, acquisition, alpha=float(alpha))
            with torch.no_grad():
                x = mrun._eval_samples(round_index, model, n)
                kl_start = mrun._kl(round_index, model, start)
                acq_mean = float(acquire(x).mean())
                row = {"alpha": float(alpha), "kl_to_start": kl_start,
                       # round 0 starts at the pretrained model: the same estimate
                       "kl_to_pretrained": kl_start if start is pretrained else mrun._kl(round_index, model, pretrained),
                       "acquisition_mean": acq_mean, "objective": acq_mean - float(alpha) * kl_start}
                if truth.simulated:
                    row.update({k.removeprefix("eval_"): v for k, v in mrun._true_summary(x).items()})
                if tilt_samples:
                    tilt = estimate_tilt(start_values, float(alpha),
                                         others=None if true_values is None else {"mean_true": true_values})
                    base = float(start_values.mean())
                    gain = tilt["objective"] - base
                    row.update({"start_objective": base, "tilt_objective": tilt["objective"], "tilt_kl": tilt["kl"],
                                "tilt_acquisition": tilt["reward"], "tilt_ess": tilt["ess"],
                                "solver_share": (row["objective"] - base) / gain if gain > 0 else None})
                    if true_values is not None:
                        row["tilt_mean_true"] = tilt["mean_true"]
            row["seconds"] = round(time.time() - t0, 2)
            rows.append(row)
        return rows
    finally:
        mrun.store.close()
