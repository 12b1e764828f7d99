"""Every arm of the sequences benchmark on one page: the best true score each found by a
budget, per seed, read from the committed result files (nothing is run).

The arms were run at different times into different files (``benchmarks/results/
sequences_*.json``, each made by ``python -m difftilt.benchmarks.sequences``); ``SOURCES``
lists, per task, the file each arm's committed row comes from (seeds 0-2). It prints one
table per budget (mean best over seeds, and the seeds that found the maximum 1.0): the
issue's (2,000 calls on Ehrlich, 1,000 on TFBind8), then 5,000 calls, for the arms that
ran that far. It draws one panel per task and budget: a dot per seed, a bar for the mean,
and the hill climber's mean as a dashed line, the bar SEIKO-UCB has to clear.

Usage::

    python -m difftilt.benchmarks.sequences_summary     # -> benchmarks/results/sequences_summary.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from importlib import resources
from pathlib import Path

from difftilt.core.errors import CheckpointError
from difftilt.core.plotting import new_figure, save_figure

from .common import check_output, main_exit, plot_suffixes

#: Per task, ``(arm, result file)`` in the order drawn: the committed table each arm's seeds
#: 0-2 are read from (a file's other rows, re-runs of arms listed elsewhere, are not read).
#: An arm listed again takes from the later file only the budgets the earlier ones lack.
SOURCES = {
    "ehrlich-20-32-2-4": [("ucb", "sequences_ehrlich-20-32-2-4.json"),
                          ("bootstrap", "sequences_ehrlich-20-32-2-4_bootstrap.json"),
                          ("greedy", "sequences_ehrlich-20-32-2-4_greedy.json"),
                          ("nonadaptive", "sequences_ehrlich-20-32-2-4_nonadaptive.json"),
                          ("ga", "sequences_ehrlich-20-32-2-4.json"),
                          ("hill_climb", "sequences_ehrlich-20-32-2-4.json"),
                          ("ucb", "sequences_ehrlich-20-32-2-4_5000.json"),
                          ("nonadaptive", "sequences_ehrlich-20-32-2-4_nonadaptive_5000.json"),
                          ("ga", "sequences_ehrlich-20-32-2-4_5000.json"),
                          ("hill_climb", "sequences_ehrlich-20-32-2-4_5000.json")],
    "ehrlich-20-32-4-4": [("ucb", "sequences_ehrlich-20-32-4-4.json"),
                          ("ucb_clip", "sequences_ehrlich-20-32-4-4_ucb_clip.json"),
                          ("bootstrap", "sequences_ehrlich-20-32-4-4_arms.json"),
                          ("greedy", "sequences_ehrlich-20-32-4-4_arms.json"),
                          ("nonadaptive", "sequences_ehrlich-20-32-4-4_arms.json"),
                          ("ga", "sequences_ehrlich-20-32-4-4.json"),
                          ("hill_climb", "sequences_ehrlich-20-32-4-4.json"),
                          ("nonadaptive", "sequences_ehrlich-20-32-4-4_nonadaptive_5000.json")],
    "ehrlich-20-64-4-4": [("ucb", "sequences_ehrlich-20-64-4-4.json"),
                          ("ucb_edits", "sequences_ehrlich-20-64-4-4_ucb_edits.json"),
                          ("ucb_clip", "sequences_ehrlich-20-64-4-4_ucb_clip.json"),
                          ("bootstrap", "sequences_ehrlich-20-64-4-4_bootstrap.json"),
                          ("greedy", "sequences_ehrlich-20-64-4-4_greedy.json"),
                          ("nonadaptive", "sequences_ehrlich-20-64-4-4_nonadaptive.json"),
                          ("ga", "sequences_ehrlich-20-64-4-4.json"),
                          ("hill_climb", "sequences_ehrlich-20-64-4-4.json"),
                          ("greedy", "sequences_ehrlich-20-64-4-4_greedy_5000.json")],
    "tfbind8": [("ucb", "sequences_tfbind8.json"),
                ("ucb_edits", "sequences_tfbind8.json"),
                ("bootstrap", "sequences_tfbind8_arms.json"),
                ("greedy", "sequences_tfbind8_arms.json"),
                ("nonadaptive", "sequences_tfbind8_arms.json"),
                ("ga", "sequences_tfbind8.json"),
                ("hill_climb", "sequences_tfbind8.json"),
                ("ucb", "sequences_tfbind8_5000.json"),
                ("bootstrap", "sequences_tfbind8_arms_5000.json"),
                ("greedy", "sequences_tfbind8_arms_5000.json"),
                ("nonadaptive", "sequences_tfbind8_arms_5000.json"),
                ("ga", "sequences_tfbind8_5000.json"),
                ("hill_climb", "sequences_tfbind8_5000.json")],
}
#: The arms' order in the table.
ORDER = ["ucb", "ucb_edits", "ucb_clip", "bootstrap", "greedy", "nonadaptive", "ga", "hill_climb"]
#: The budgets each task is compared at, one table each: the issue's (2,000 calls on Ehrlich,
#: 1,000 on TFBind8), then 5,000 calls.
BUDGETS = [{"ehrlich-20-32-2-4": 2000, "ehrlich-20-32-4-4": 2000, "ehrlich-20-64-4-4": 2000, "tfbind8": 1000},
           {task: 5000 for task in SOURCES}]


def read_arms(results: Path, sources: dict = SOURCES) -> dict[str, dict[str, dict[int, list[float]]]]:
    """``{task: {arm: {calls: [best per seed]}}}`` from the result files in ``results``."""
    out: dict = {}
    cache: dict[str, dict] = {}
    for task, arms in sources.items():
        for arm, name in arms:
            if name not in cache:
                path = results / name
                if not path.is_file():
                    raise CheckpointError(f"{path}: no such result file (python -m difftilt.benchmarks.sequences "
                                          "makes them; the committed ones are in the repository's "
                                          "benchmarks/results: give --results)")
                cache[name] = json.loads(path.read_text())["results"]
            seeds = cache[name].get(task, {}).get(arm)
            if not seeds:
                raise CheckpointError(f"{results / name} has no {arm} on {task}")
            calls = sorted({int(c) for s in seeds for c in s["curve"]})
            curve = out.setdefault(task, {}).setdefault(arm, {})
            for c in calls:
                curve.setdefault(c, [s["curve"][str(c)]["best"] for s in seeds if str(c) in s["curve"]])
    return out


def table(arms: dict, budgets: dict[str, int] = BUDGETS[0]) -> list[str]:
    """One line per arm that reached one of the budgets: its mean best at each task's budget
    and the seeds at 1.0."""
    tasks = list(arms)
    labels = [a for a in ORDER if any(budgets[t] in arms[t].get(a, {}) for t in tasks)]
    head = "".join(f"{f'{t} @{budgets[t]:,}':>26}" for t in tasks)
    lines = [f"{'arm':<12}{head}"]
    for label in labels:
        cells = ""
        for task in tasks:
            best = arms[task].get(label, {}).get(budgets[task])
            cell = "-" if not best else (f"{statistics.mean(best):.3f} "
                                         f"({sum(v >= 1.0 - 1e-9 for v in best)}/{len(best)} at 1.0)")
            cells += f"{cell:>26}"
        lines.append(f"{label:<12}{cells}")
    return lines


def plot(arms: dict, path: Path, budgets: list[dict[str, int]] = BUDGETS) -> Path:
    """One row of panels per budget, one panel per task."""
    fig, axes = new_figure(len(budgets), len(arms), figsize=(3.6 * len(arms), 3.9 * len(budgets)), squeeze=False)
    for ax, (by_budget, (task, by_arm)) in zip(axes.flat, [(b, item) for b in budgets for item in arms.items()]):
        budget = by_budget[task]
        labels = [a for a in ORDER if budget in by_arm.get(a, {})]
        for x, label in enumerate(labels):
            best = by_arm[label][budget]
            color = "C0" if label.startswith("ucb") else ("C2" if label == "hill_climb" else "0.55")
            ax.bar(x, statistics.mean(best), color=color, alpha=0.35, width=0.7)
            spread = [x + 0.18 * (i - (len(best) - 1) / 2) for i in range(len(best))]  # seeds side by side
            ax.scatter(spread, best, color=color, s=14, zorder=3)
        if "hill_climb" in labels:
            ax.axhline(statistics.mean(by_arm["hill_climb"][budget]), color="C2", ls="--", lw=1)
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
        ax.set_title(f"{task}, {budget:,} calls", fontsize=9)
        ax.set_ylim(0 if task.startswith("ehrlich") else 0.9, 1.02)
    for row in axes:
        row[0].set_ylabel("best true score (dots: seeds 0-2;\nbar: mean; dashed: hill climber)")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m difftilt.benchmarks.sequences_summary",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(resources.files("difftilt.benchmarks") / "results"),
                        help="the folder of the result files (default: the committed ones)")
    parser.add_argument("--plot", default="benchmarks/results/sequences_summary.png")
    args = parser.parse_args(argv)
    out = check_output(args.plot, "--plot", plot_suffixes())
    arms = read_arms(Path(args.results))
    print("best true score found, mean over seeds 0-2 (seeds that found the maximum, 1.0)")
    for budgets in BUDGETS:
        print("\n" + "\n".join(table(arms, budgets)))
    print(f"\nplot: {plot(arms, out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_exit(main))
