"""Plots of a run's metrics (matplotlib, imported only when a plot is drawn).

Figures are drawn on their own canvas, not through pyplot: drawing one never changes the
caller's matplotlib backend nor touches its open figures (a notebook's inline plots keep
working after a run has saved its PNGs).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["plot_training", "new_figure", "save_figure"]


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or y.size < window:
        return y
    kernel = np.ones(window) / window
    pad = np.concatenate([np.full(window - 1, y[0]), y])
    return np.convolve(pad, kernel, mode="valid")


def plot_training(history: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Reward and KL against updates, one row per fine-tuning stage; saved as PNG.

    Args:
        history: per-update metrics dicts with ``stage``, ``iteration``, ``reward``, ``kl``.
        path: output file.
        title: figure title.
    """
    stages = [s for s in dict.fromkeys(r["stage"] for r in history)]
    fig, axes = new_figure(len(stages) or 1, 2, figsize=(10, 2.8 * max(1, len(stages))), squeeze=False)
    for row, stage in enumerate(stages):
        rows = [r for r in history if r["stage"] == stage]
        it = np.array([r.get("iteration", i) for i, r in enumerate(rows)], dtype=float)
        for col, key, label in ((0, "reward", "reward of samples" if stage != "initial" else "value v(x0) of samples"),
                                (1, "kl", "path KL to reference")):
            ax = axes[row][col]
            y = np.array([r.get(key, np.nan) for r in rows], dtype=float)
            if np.all(np.isnan(y)):
                ax.set_visible(False)
                continue
            window = max(1, len(y) // 50)
            ax.plot(it, y, color="0.8", lw=0.8)
            ax.plot(it, _smooth(y, window), color="C0" if col == 0 else "C3", lw=1.6)
            ax.set_title(f"{stage}: {label}", fontsize=10)
            ax.set_xlabel("update")
            ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **subplots):
    """``(figure, axes)`` as ``plt.subplots`` makes them, but on the figure's own canvas:
    pyplot, its backend and its open figures are left alone. Save it with :func:`save_figure`."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **subplots)


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Lay out, write atomically (a crash never leaves half a PNG), create the folder."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)
    return path
