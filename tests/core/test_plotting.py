"""Saving a run's plots leaves the caller's matplotlib alone: its backend (a notebook's
inline one) and its open figures."""

import matplotlib
import pytest

from difftilt.core.plotting import plot_training

plt = pytest.importorskip("matplotlib.pyplot")

HISTORY = [{"stage": stage, "iteration": i, "reward": 0.1 * i, "kl": 0.01 * i}
           for stage in ("transitions", "initial") for i in range(5)]


def test_a_saved_plot_keeps_the_callers_backend_and_open_figures(tmp_path):
    before = matplotlib.get_backend()
    plt.switch_backend("svg")  # any backend but Agg, as a notebook's inline one
    try:
        mine = plt.figure()
        path = plot_training(HISTORY, tmp_path / "training.png", title="t")
        assert path.read_bytes().startswith(b"\x89PNG")
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == [mine.number]  # not closed, and no figure of the plot's left open
    finally:
        plt.close("all")
        plt.switch_backend(before)
