"""Pretraining a masked-diffusion model on a corpus of sequences, and loading it back.

A pretrained model folder holds ``denoiser.json`` + ``denoiser.safetensors`` (the
network, :class:`~difftilt.core.config.ConfigMixin` layout) and ``process.json`` (the
chain's settings, the data it was trained on, the seed, the final loss and the command
that reproduces it). Nothing in it is pickled. While a pretraining runs, the folder also
holds its state for ``--resume`` (:data:`STATE_FILE`, ``torch.save``, read back with
``weights_only``), removed once the model is written.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import inspect
import json
import math
import os
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from difftilt.core.config import atomic_write_text, check_count, check_rate
from difftilt.core.errors import CheckpointError, ConfigError, TrainingDivergedError
from difftilt.core.finetune import bar_interval
from difftilt.core.statefile import load_state, write_state

from .mdlm import MaskedDiffusionProcess, SequenceDenoiser, masked_diffusion_loss

__all__ = ["train_masked_diffusion", "TrainingLog", "save_pretrained", "load_pretrained", "plot_pretraining"]

PROCESS_FILE = "process.json"
FORMAT = "difftilt.masked_diffusion/1"


LOG_EVERY = 50  # steps per logged loss
STATE_FILE = "pretrain_state.pt"  # an unfinished pretraining's state, in the model folder
VAL_MAX = 1024  # held-out sequences the validation loss reads


@dataclass
class TrainingLog:
    """The losses of a pretraining, one per :data:`LOG_EVERY` steps (nats per position):
    ``losses``, the training loss averaged over those steps, and ``val_losses``, MDLM's
    bound on the held-out sequences at the same steps (empty without ``val_fraction``;
    the same masks each time, so the curve moves only with the model)."""

    losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    val_sequences: int = 0


def split_validation(tokens: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, held out)``: a random ``val_fraction`` of the sequences held out (its own
    generator, so the training draws are the same for any fraction's training set)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"train.val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(val_fraction * tokens.shape[0]))
    if val_fraction > 0 and (n_val < 1 or tokens.shape[0] - n_val < 2):
        raise ConfigError(f"train.val_fraction {val_fraction} of {tokens.shape[0]} sequences leaves "
                          f"{n_val} to hold out and {tokens.shape[0] - n_val} to train on (need >= 1 and >= 2)")
    if n_val == 0:
        return tokens, tokens[:0]
    perm = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(seed + 7919))
    return tokens[perm[n_val:]], tokens[perm[:n_val]]


def train_masked_diffusion(
    tokens: torch.Tensor,
    vocab_size: int,
    *,
    dim: int = 128,
    depth: int = 3,
    heads: int = 4,
    time_conditioning: bool = False,
    neighbor_bias: bool = True,
    neighbor_init: str = "counts",
    schedule: str = "linear",
    steps: int = 3000,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    warmup: int = 100,
    seed: int = 0,
    val_fraction: float = 0.0,
    save_every: int = 250,
    state_file: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> tuple[SequenceDenoiser, TrainingLog]:
    """Fit a :class:`SequenceDenoiser` to ``tokens`` ``(n, L)`` with MDLM's bound.

    AdamW with linear warm-up then cosine decay, gradient norm clipped at 1. Returns
    the denoiser (eval mode) and its :class:`TrainingLog`.

    ``neighbor_init``: with ``neighbor_bias``, ``"counts"`` starts the output bias and the
    neighbour tables at the corpus's letter and pair statistics
    (:meth:`SequenceDenoiser.init_from_counts`), ``"zeros"`` at zero.

    ``val_fraction``: hold out that share of the sequences (:func:`split_validation`) and
    log the bound on (up to 1,024 of) them: a loss that falls on the training sequences
    and rises on the held-out ones is a model memorizing a small corpus.

    ``state_file``: every ``save_every`` steps, the whole training state (weights, AdamW's
    moments, the schedule, the random generator, the losses) is written there, so that a
    run stopped at any moment continues with ``resume=True`` from the last save and ends
    with the same weights as one never stopped. ``resume`` refuses a state made with other
    settings or another corpus. ``command``, the command that runs this training, is kept
    in the state, for :func:`describe_pretraining` to say how to continue it.
    """
    if neighbor_init not in ("counts", "zeros"):
        raise ConfigError(f"neighbor_init must be 'counts' or 'zeros', got {neighbor_init!r}")
    if tokens.dim() != 2 or tokens.shape[0] < 2:
        raise ConfigError(f"pretraining data must be (n >= 2, length) token ids, got shape {tuple(tokens.shape)}")
    if int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size:
        raise ConfigError(f"pretraining tokens must be in [0, {vocab_size}), got [{int(tokens.min())}, {int(tokens.max())}]")
    for name, value, low in (("steps", steps, 1), ("batch_size", batch_size, 1), ("save_every", save_every, 1),
                             ("warmup", warmup, 0)):
        check_count("train", name, value, low)
    check_rate("train", "lr", lr, positive=True)
    check_rate("train", "weight_decay", weight_decay, positive=False)
    if resume and state_file is None:
        raise ConfigError("resume needs the state_file to continue from")
    settings = {"vocab_size": vocab_size, "dim": dim, "depth": depth, "heads": heads,
                "time_conditioning": time_conditioning, "neighbor_bias": neighbor_bias,
                "neighbor_init": neighbor_init, "schedule": schedule, "steps": steps, "batch_size": batch_size,
                "lr": lr, "weight_decay": weight_decay, "warmup": warmup, "seed": seed,
                "val_fraction": val_fraction, "data_sha256": _digest(tokens)}
    tokens, val = split_validation(tokens, val_fraction, seed)
    val = val[:VAL_MAX]
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = SequenceDenoiser(vocab_size, tokens.shape[1], dim, depth, heads, time_conditioning,
                               neighbor_bias=neighbor_bias)
        if neighbor_bias and neighbor_init == "counts":
            net.init_from_counts(tokens)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / max(warmup, 1)) * 0.5 * (1 + math.cos(math.pi * min(i / steps, 1.0))))
    log, running, start = TrainingLog(val_sequences=int(val.shape[0])), 0.0, 0
    if resume:
        state = read_state(state_file)
        differ = sorted(k for k in settings.keys() | state["settings"].keys()
                        if settings.get(k) != state["settings"].get(k))
        if differ:
            raise ConfigError(f"{state_file} was made with other settings or data ({', '.join(differ)} differ); "
                              f"delete it to start over")
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        g.set_state(state["generator"])
        log = TrainingLog(**state["log"])
        running, start = state["running"], state["step"]
    net.train()
    bar = tqdm(range(start, steps), desc="pretrain", disable=not progress, dynamic_ncols=True,
               initial=start, total=steps, mininterval=bar_interval())
    for i in bar:
        idx = torch.randint(tokens.shape[0], (batch_size,), generator=g)
        loss = masked_diffusion_loss(net, tokens[idx], schedule, generator=g)
        if not torch.isfinite(loss):
            raise TrainingDivergedError(f"the pretraining loss is {loss.item()} at step {i}: training diverged; "
                                        f"lower train.lr (now {lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        running += loss.item()
        if (i + 1) % LOG_EVERY == 0:
            log.losses.append(running / LOG_EVERY)
            running = 0.0
            if val.shape[0]:
                log.val_losses.append(_held_out_loss(net, val, schedule, seed))
            shown = {"loss": f"{log.losses[-1]:.4f}", **({"val": f"{log.val_losses[-1]:.4f}"} if val.shape[0] else {})}
            bar.set_postfix(shown, refresh=False)  # at the bar's next redraw
        if state_file is not None and (i + 1) % save_every == 0 and i + 1 < steps:
            write_state(state_file, {"settings": settings, "step": i + 1, "net": net.state_dict(),
                                     "opt": opt.state_dict(), "sched": sched.state_dict(),
                                     "generator": g.get_state(), "log": asdict(log), "running": running,
                                     "command": command})
    net.eval()
    return net, log


def _digest(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()
                          + repr(tuple(tokens.shape)).encode()).hexdigest()


@torch.no_grad()
def _held_out_loss(net: SequenceDenoiser, val: torch.Tensor, schedule: str, seed: int) -> float:
    was_training = net.training
    net.eval()
    loss = masked_diffusion_loss(net, val, schedule, generator=torch.Generator().manual_seed(seed + 1))
    net.train(was_training)
    return float(loss)


def describe_pretraining(folder: str | os.PathLike) -> list[str] | None:
    """Where a model folder's pretraining stands, in lines (``difftilt show``): an unfinished
    one's last saved step, losses and the command that continues it, or a finished model's
    steps, final losses and the command that made it; ``None`` for a folder it did not write."""
    folder = Path(folder)
    state, info = folder / STATE_FILE, folder / PROCESS_FILE
    if state.is_file():
        saved = read_state(state)
        steps, log = saved["settings"]["steps"], TrainingLog(**saved["log"])
        when = _dt.datetime.fromtimestamp(state.stat().st_mtime).isoformat(timespec="seconds")
        command = saved.get("command") or "difftilt pretrain CONFIG"
        return [f"pretraining, unfinished: its state at step {saved['step']:,} of {steps:,} was saved {when} "
                "(it goes on from there if it is still running)", f"model folder: {folder}",
                _losses_line(log.losses, log.val_losses),
                f"if it has stopped, continue it with: {command} --resume"]
    if not info.is_file():
        return None
    made = json.loads(info.read_text())
    if made.get("format") != FORMAT:
        return None
    losses, val = made.get("losses", []), made.get("val_losses", [])
    train, data = made.get("train") or {}, made.get("data") or {}
    steps = train.get("steps", inspect.signature(train_masked_diffusion).parameters["steps"].default)
    used = data.get("num_sequences_used")
    lines = [f"pretrained model: {steps:,} steps on {f'{used:,}' if isinstance(used, int) else '?'} sequences "
             f"({data.get('name', '?')})",
             f"model folder: {folder}", _losses_line(losses, val), f"made by: {made.get('command', '?')}"]
    if (folder / "training.png").is_file():
        lines.append(f"loss curve: {folder / 'training.png'}")
    return lines


def _losses_line(losses: list[float], val_losses: list[float]) -> str:
    if not losses:
        return f"no loss logged yet (one every {LOG_EVERY} steps)"
    return (f"loss {losses[-1]:.4f} (first logged {losses[0]:.4f})"
            + (f", held-out {val_losses[-1]:.4f} (first {val_losses[0]:.4f})" if val_losses else ""))


def read_state(path: str | os.PathLike) -> dict:
    """An unfinished pretraining's state (:func:`train_masked_diffusion`'s ``state_file``)."""
    return load_state(path, "pretraining state", f"nothing to resume: no unfinished pretraining at {path}",
                      "; delete it to start over")


def save_pretrained(process: MaskedDiffusionProcess, directory: str | os.PathLike, *, data: dict, train: dict,
                    losses: list[float], command: str | None = None, val_losses: list[float] | None = None) -> Path:
    """Write a pretrained model folder (see the module docstring); ``losses`` and
    ``val_losses`` are the :class:`TrainingLog`'s."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    process.denoiser.save_pretrained(directory, "denoiser")
    info = {
        "format": FORMAT,
        "process": process.spec(),
        "data": data,
        "train": train,
        "final_loss": losses[-1] if losses else None,
        "losses": [round(v, 5) for v in losses],
        **({"final_val_loss": val_losses[-1], "val_losses": [round(v, 5) for v in val_losses]} if val_losses else {}),
        "log_every": LOG_EVERY,
        "command": command or shlex.join(sys.orig_argv),
        "torch": torch.__version__,
    }
    atomic_write_text(directory / PROCESS_FILE, json.dumps(info, indent=2) + "\n")
    return directory


def load_pretrained(directory: str | os.PathLike, num_steps: int | None = None,
                    sampler: str | None = None) -> MaskedDiffusionProcess:
    """Rebuild a :class:`MaskedDiffusionProcess` from a folder written by :func:`save_pretrained`.

    Args:
        num_steps: override the number of reverse steps (the denoiser does not depend on it).
        sampler: override the sampler (``"ancestral"`` or ``"first_hit"``).
    """
    directory = Path(directory)
    path = directory / PROCESS_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a pretrained masked-diffusion folder (no {PROCESS_FILE})")
    info = json.loads(path.read_text())
    spec = dict(info["process"])
    if sampler is not None:
        spec["sampler"] = sampler
    if num_steps is not None or spec.get("sampler") == "first_hit":
        spec["num_steps"] = num_steps
    denoiser = SequenceDenoiser.from_pretrained(directory, "denoiser").eval()
    process = MaskedDiffusionProcess(denoiser, **spec)
    process.pretrained_info = info
    return process


def is_pretrained_folder(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a model :func:`save_pretrained` wrote (its ``process.json``
    names this format)."""
    try:
        info = json.loads((Path(directory) / PROCESS_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("format") == FORMAT


def plot_pretraining(log: TrainingLog, path: str | os.PathLike, title: str = "") -> Path:
    """The training (and held-out) loss against steps, saved as PNG."""
    from difftilt.core.plotting import new_figure, save_figure

    fig, ax = new_figure(figsize=(6, 3.6))
    steps = [LOG_EVERY * (i + 1) for i in range(len(log.losses))]
    ax.plot(steps, log.losses, color="C0", lw=1.4, label="training sequences")
    if log.val_losses:
        ax.plot(steps[: len(log.val_losses)], log.val_losses, color="C3", lw=1.4,
                label=f"held out ({log.val_sequences:,} sequences)")
    ax.set_xlabel("step")
    ax.set_ylabel("MDLM bound (nats per position)")
    ax.grid(alpha=0.3)
    if log.losses:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path)
