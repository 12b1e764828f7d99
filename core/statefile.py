"""Training-state files: what a stopped pretraining or fine-tuning continues from.

A state is a ``torch.save``-able dict of tensors and plain values. It is written to a
temporary file that is then moved into place, so a crash at any moment leaves the last
whole state, and read back on the CPU with ``weights_only`` (no code runs on loading).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, ConfigError

__all__ = ["write_state", "load_state"]


def write_state(path: str | os.PathLike, state: dict) -> None:
    """Save ``state`` at ``path`` atomically (its folder is made if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash while writing leaves the previous state


def load_state(path: str | os.PathLike, what: str, missing: str, advice: str = "") -> Any:
    """The state saved at ``path``, on the CPU.

    Args:
        what: the kind of state, for the message (``"fine-tuning state"``).
        missing: the message when there is no such file.
        advice: appended to the message of an unreadable file (``"; delete it to start over"``).

    Raises:
        ConfigError: there is no such file (``missing``).
        CheckpointError: the file is torn or not a torch file.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(missing) from None
    except Exception as e:  # noqa: BLE001 - a torn or foreign file
        first = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path} is not a readable {what} ({type(e).__name__}: {first}){advice}") from None
