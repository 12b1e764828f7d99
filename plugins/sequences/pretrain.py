"""Pretraining a masked-diffusion model on a corpus of sequences, and loading it back.

A pretrained model folder holds ``denoiser.json`` + ``denoiser.safetensors`` (the
network, :class:`~difftilt.core.config.ConfigMixin` layout) and ``process.json`` (the
chain's settings, the data it was trained on, the seed, the final loss and the command
that reproduces it). Nothing is pickled.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from difftilt.core.config import atomic_write_text
from difftilt.core.errors import CheckpointError, ConfigError

from .mdlm import MaskedDiffusionProcess, SequenceDenoiser, masked_diffusion_loss

__all__ = ["train_masked_diffusion", "save_pretrained", "load_pretrained"]

PROCESS_FILE = "process.json"
FORMAT = "difftilt.masked_diffusion/1"


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
    progress: bool = True,
) -> tuple[SequenceDenoiser, list[float]]:
    """Fit a :class:`SequenceDenoiser` to ``tokens`` ``(n, L)`` with MDLM's bound.

    AdamW with linear warm-up then cosine decay, gradient norm clipped at 1. Returns
    the denoiser (eval mode) and the loss every 50 steps (nats per position).

    ``neighbor_init``: with ``neighbor_bias``, ``"counts"`` starts the output bias and the
    neighbour tables at the corpus's letter and pair statistics
    (:meth:`SequenceDenoiser.init_from_counts`), ``"zeros"`` at zero.
    """
    if neighbor_init not in ("counts", "zeros"):
        raise ConfigError(f"neighbor_init must be 'counts' or 'zeros', got {neighbor_init!r}")
    if tokens.dim() != 2 or tokens.shape[0] < 2:
        raise ConfigError(f"pretraining data must be (n >= 2, length) token ids, got shape {tuple(tokens.shape)}")
    if int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size:
        raise ConfigError(f"pretraining tokens must be in [0, {vocab_size}), got [{int(tokens.min())}, {int(tokens.max())}]")
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
    net.train()
    losses, running = [], 0.0
    bar = tqdm(range(steps), desc="pretrain", disable=not progress, dynamic_ncols=True)
    for i in bar:
        idx = torch.randint(tokens.shape[0], (batch_size,), generator=g)
        loss = masked_diffusion_loss(net, tokens[idx], schedule, generator=g)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretraining loss is {loss.item()} at step {i}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        running += loss.item()
        if (i + 1) % 50 == 0:
            losses.append(running / 50)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            running = 0.0
    net.eval()
    return net, losses


def save_pretrained(process: MaskedDiffusionProcess, directory: str | os.PathLike, *, data: dict, train: dict,
                    losses: list[float], command: str | None = None) -> Path:
    """Write a pretrained model folder (see the module docstring)."""
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
