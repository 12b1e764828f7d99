"""Sequences benchmark: SEIKO against model-free optimizers on Ehrlich functions and TFBind8.

Every method gets the same oracle budget, spent in the same rounds, from the same
pretrained model's first round of samples:

* tasks: Ehrlich (20, 32, 2, 4) and (20, 32, 4, 4) -- both the embedded default model:
  an Ehrlich pretraining corpus is the feasible-sequence model, which depends on
  ``(num_states, length, seed)`` only, so ``difftilt pretrain`` makes the same model for
  both --, (20, 64, 4, 4) -- its own model, the default's settings but 2,000 steps,
  committed under ``benchmarks/models`` (pretrained into ``<runs>/models`` on first use
  if that folder is missing) --, and TFBind8 (embedded default);
* methods: SEIKO-UCB, SEIKO-UCB with a quarter of each round given to its acquisition's
  favourite edits of the best answers (``ucb_edits``: ``edit_share: 0.25``), SEIKO-bootstrap,
  greedy, non-adaptive, GA, hill climber (and, when asked for, ``ucb_clip``: SEIKO-UCB with
  its reward model's features clamped to the data's range);
* budget: up to 5,000 oracle calls, in each task's rounds: the rounds of its online
  config (``configs/online_ehrlich.yaml``: 250 each; ``online_tfbind8.yaml``: 100 each)
  repeated up to the budget. The four-motif tasks' scores are about three times smaller,
  so they tilt with alpha 0.0035 instead of the config's 0.01 (see ``TASKS``).

For each task and method it prints, as mean ± std over seeds, the best and the top-10
mean true score among the distinct designs asked after 500 / 1,000 / 2,000 / 5,000 calls
and after the budget when it is not one of them (``checkpoints_for``; read from each run's
feedback store in the order the designs were asked), the feasible fraction and Hamming
diversity of the final model's samples (of the last round's designs for the GA and the
hill climber), and on how many seeds the task's maximum (1.0) was found by each budget.
It plots the best score after each round against calls.

Usage::

    python -m difftilt.benchmarks.sequences --runs runs/seq                    # everything
    python -m difftilt.benchmarks.sequences --runs runs/seq --jobs 8           # ... 8 arms at a time
    python -m difftilt.benchmarks.sequences --tasks ehrlich-20-32-2-4 tfbind8 --budget 2000 --runs runs/seq
    python -m difftilt.benchmarks.sequences --tasks tfbind8 --methods ucb --budget 1000 --first-seed 3 --seeds 12 \
        --set fill=edits --runs runs/seq-random-edits                           # held-out seeds, an ablation

Run folders under ``--runs`` are reused: a finished arm is read back, an interrupted
one resumed. The options, every arm's config (with ``--set``) and the output paths are
checked before the first arm runs; if every arm fails, nothing is written and the exit
status is 2.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import statistics
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from difftilt.core.config import load_yaml
from difftilt.core.errors import ConfigError, DifftiltError, stopped_by_sigterm
from difftilt.core.plotting import new_figure, save_figure
from difftilt.core.online import METHODS, _validate, design_key
from difftilt.core.plugins import load_plugin
from difftilt.core.run import read_config
from difftilt.core.store import COUNTED, SQLiteFeedbackStore

from .common import check_folder, check_output, fmt, main_exit, plot_suffixes, positive_int, run_arms, run_or_reuse

CHECKPOINTS = [500, 1000, 2000, 5000]
# Arms that are a method with a config change, each in its own run folders: SEIKO-UCB with a
# quarter of each round (from the second) given to the edits of the best answers that its
# acquisition rates highest (``edit_share``), beside the tilted model's samples.
VARIANTS = {"ucb_edits": ("ucb", {"edit_share": 0.25}),
            "ucb_clip": ("ucb", {"reward_model": {"clip_features": True}})}
DEFAULT_METHODS = ["ucb", "ucb_edits", "bootstrap", "greedy", "nonadaptive", "ga", "hill_climb"]


def _ehrlich(num_states: int, length: int, num_motifs: int, motif_length: int) -> dict:
    return {"name": "ehrlich", "num_states": num_states, "length": length, "num_motifs": num_motifs,
            "motif_length": motif_length, "seed": 0}


# "rounds" / "set" / "pretrain": a task's own rounds, online-config overrides (a mapping updates
# the config's section) and pretraining ("train") overrides, where they differ from its config's.
# The (20, 32, 2, 4) table was made before fill: best_edits, with random edits of a dry round's
# proposals (only SEIKO-UCB on (20, 32, 2, 4) ran dry, and only after it had found 1.0).
# The GA and the hill climber fit no acquisition, so for them best_edits is edits.
_RANDOM_EDITS = {"fill": "edits"}
TASKS = {
    "ehrlich-20-32-2-4": {"config": "online_ehrlich.yaml", "reward": _ehrlich(20, 32, 2, 4), "process": "ehrlich",
                          "set": _RANDOM_EDITS},
    # same transition matrix, hence the same corpus and pretrained model, as (20, 32, 2, 4).
    # alpha by the rule of (20, 64, 4, 4) below: the first round's answers' standard deviation
    # is 0.023 here (250 samples of the model, seeds 0-2: 0.024 / 0.022 / 0.021), so 0.0035.
    "ehrlich-20-32-4-4": {"config": "online_ehrlich.yaml", "reward": _ehrlich(20, 32, 4, 4), "process": "ehrlich",
                          "set": {"alpha": 0.0035}},
    # its own model (committed, see committed_model); 2,000 steps (the default's 5,000 take an hour on
    # one core here; the default's loss had levelled off by step 2,000). alpha is in reward
    # units: the default's 0.01 times the ratio of the first round's answers' standard
    # deviations here and on (20, 32, 2, 4), 0.022 / 0.062. At 0.01 (and batch 32) the model
    # hardly moved (KL 0.25 nats after round 0, 23 after eight).
    "ehrlich-20-64-4-4": {"config": "online_ehrlich.yaml", "reward": _ehrlich(20, 64, 4, 4), "process": None,
                          "pretrain": {"steps": 2000}, "set": {"alpha": 0.0035}},
    "tfbind8": {"config": "online_tfbind8.yaml", "reward": {"name": "tfbind8"}, "process": "tfbind8"},
}


def _configs_dir() -> Path:
    return Path(str(resources.files("difftilt.plugins.sequences") / "configs"))


def schedule_for(budget: int, rounds: list[int]) -> list[int]:
    """``rounds`` cut at ``budget`` calls; the last round is repeated if they fall short."""
    if not rounds or min(rounds) < 1:
        raise ValueError(f"rounds must be positive sizes, got {rounds}")
    out, used = [], 0
    while used < budget:
        out.append(min(rounds[min(len(out), len(rounds) - 1)], budget - used))
        used += out[-1]
    return out


def committed_model(task: str) -> Path:
    """Where a task's committed pretrained model lives (``benchmarks/models/<task>``)."""
    return Path(str(resources.files("difftilt.benchmarks") / "models" / task))


def pretrain_config(task: str) -> dict:
    """The pretraining config of a task without an embedded default: the default's
    (``pretrain_ehrlich.yaml``) with the task's function and its ``pretrain`` overrides."""
    spec = TASKS[task]
    cfg = load_yaml(_configs_dir() / "pretrain_ehrlich.yaml")
    r = spec["reward"]
    cfg["data"] = {**cfg["data"], **{k: r[k] for k in ("num_states", "length", "num_motifs", "motif_length", "seed")}}
    cfg["train"] = {**cfg["train"], **spec.get("pretrain", {})}
    return cfg


def _pretrained_process(task: str, models: Path) -> dict | str:
    """The task's pretrained model: the embedded default, the committed model
    (:func:`committed_model`), or else one pretrained into ``models`` once."""
    spec = TASKS[task]
    if spec["process"] is not None:
        return spec["process"]
    folder = committed_model(task)
    if not (folder / "process.json").is_file():
        folder = models / task
    if not (folder / "process.json").is_file():
        print(f"pretraining the {task} model into {folder} (once) ...", flush=True)
        command = shlex.join(["python", "-m", "difftilt.benchmarks.sequences", "--tasks", task, "--runs",
                              str(models.parent)])
        load_plugin("sequences").pretrain(pretrain_config(task), progress=True, output=str(folder), command=command)
    return {"name": "pretrained", "path": str(folder)}


def arm_config(task: str, label: str, seed: int, schedule: list[int], process: dict | str,
               overrides: list[str] = (), base: dict | None = None) -> dict:
    """The online config of one arm: the task's config (``base``, else read from its file)
    with the task's and the variant's changes, then ``overrides`` (``key=value`` strings)."""
    spec = TASKS[task]
    method, change = VARIANTS.get(label, (label, {}))
    base = base if base is not None else load_yaml(_configs_dir() / spec["config"])
    cfg = {**base, "process": process, "methods": [method], "seed": seed, "schedule": schedule,
           "stop_at": None,  # every arm spends the whole budget
           "oracle": {**base["oracle"], "reward": spec["reward"]}}
    for key, value in {**spec.get("set", {}), **change}.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    return read_config(cfg, list(overrides))


# What the benchmark sets in every arm, and the flag that changes it: a --set of one of these
# was applied after them, so (say) --set seed=3 made three identical arms labelled seeds 0, 1, 2.
CONTROLLED = {"seed": "--first-seed / --seeds", "methods": "--methods", "schedule": "--budget",
              "stop_at": "nothing (every arm spends the whole budget)", "process": "--tasks (each task has its model)",
              "oracle.reward": "--tasks (each task is its reward)"}


def check_overrides(overrides: list[str]) -> None:
    """Refuse a ``--set`` of a field the benchmark controls (:data:`CONTROLLED`), or of a
    part of one (``oracle.reward.seed``), or a setting without ``=``."""
    for item in overrides:
        key, sep, _ = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        for field_ in CONTROLLED:
            if field_.startswith(key + "."):  # --set oracle={...} would replace oracle.reward
                raise ConfigError(f"--set {key}: the benchmark sets {field_} in every arm; set {key}'s other "
                                  f"fields one by one ({key}.KEY=VALUE)")
            if key == field_ or key.startswith(field_ + "."):
                raise ConfigError(f"--set {key}: the benchmark sets {field_} in every arm; use {CONTROLLED[field_]}")


def checkpoints_for(budget: int) -> list[int]:
    """The table's columns: :data:`CHECKPOINTS` up to ``budget``, and ``budget`` itself when it
    is not one of them (a budget under 500 had no score column at all)."""
    return sorted({*(c for c in CHECKPOINTS if c <= budget), budget})


def check_arms(tasks: list[str], labels: list[str], first_seed: int, budget: int, overrides: list[str]) -> None:
    """Build every task's and method's arm config (with its first seed) and validate it as the
    online loop will, before any arm runs: a bad ``--set`` (an unknown field, a wrong value)
    is then one error, not every arm marked FAILED and an empty table written over the results."""
    check_overrides(overrides)
    for task in tasks:
        spec = TASKS[task]
        base = load_yaml(_configs_dir() / spec["config"])
        schedule = schedule_for(budget, spec.get("rounds", base["schedule"]))
        # the model is not needed to check a config (and may be pretrained only later)
        process = spec["process"] or {"name": "pretrained", "path": str(committed_model(task))}
        for label in labels:
            try:
                _validate(arm_config(task, label, first_seed, schedule, process, overrides, base=base))
            except ConfigError as err:
                raise ConfigError(f"{task} {label}: {err}" + (" (given with --set)" if overrides else "")) from None


def store_curve(folder: Path, checkpoints: list[int]) -> dict[int, dict]:
    """Best and top-10 true score among the distinct designs in the first ``c`` calls, for each
    checkpoint ``c``."""
    with SQLiteFeedbackStore(folder / "feedback.sqlite", readonly=True) as store:
        records = store.records(status=COUNTED)  # every call spent, in the order asked
    first = {}  # each distinct design once (a repeated query is not a second design)
    for n, r in enumerate(records):
        first.setdefault(design_key(r.design), (n, r))
    out = {}
    for c in checkpoints:
        if c > len(records):
            continue
        vals = sorted((r.true_value for n, r in first.values() if n < c and r.feasible and r.true_value is not None),
                      reverse=True)
        out[c] = {"best": vals[0] if vals else 0.0, "top10": statistics.fmean(vals[:10]) if vals else 0.0}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m difftilt.benchmarks.sequences", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=[*METHODS, *VARIANTS],
                        help="methods, and variants: "
                        + "; ".join(f"{k}: {m} with {c}" for k, (m, c) in VARIANTS.items()))
    parser.add_argument("--seeds", type=positive_int, default=3, help="how many seeds")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="online-config override for every arm, e.g. fill=edits (use another --runs); "
                        "not of what the benchmark sets: " + ", ".join(CONTROLLED))
    parser.add_argument("--budget", type=positive_int, default=5000,
                        help="oracle calls per run (rounds cut here); the scores are read after "
                        + " / ".join(map(str, CHECKPOINTS))
                        + " calls up to it, and after it when it is not one of them")
    parser.add_argument("--runs", default=None,
                        help="keep run folders (and pretrained task models) here; finished arms are reused "
                        "(default: a new temporary folder, printed at the start)")
    parser.add_argument("--jobs", type=positive_int, default=1,
                        help="arms run at once, each in a process of its own on one thread, as the committed "
                        "tables were made (default 1: one after another, in this process, on its threads)")
    parser.add_argument("--out", default="benchmarks/results/sequences.json", help="the tables as JSON")
    parser.add_argument("--plot", default="benchmarks/results/sequences.png",
                        help="the best score after each round against calls (.png, .pdf, .svg)")
    args = parser.parse_args(argv)
    args.methods = list(dict.fromkeys(args.methods))  # each arm once

    # everything that can be checked is checked before the first arm (a run takes hours)
    check_arms(args.tasks, args.methods, args.first_seed, args.budget, args.set)
    out = check_output(args.out, "--out")
    plot = check_output(args.plot, "--plot", plot_suffixes())
    if args.runs:
        runs = check_folder(args.runs, "--runs")
    else:
        runs = Path(tempfile.mkdtemp(prefix="difftilt-seq-"))
        print(f"run folders: {runs} (temporary; give it as --runs to reuse the finished arms)", flush=True)
    checkpoints = checkpoints_for(args.budget)
    schedules: dict[str, list[int]] = {}
    plan = []  # every arm, in the table's order: (task, label, seed, config, run folder)
    for task in args.tasks:  # the task models first: pretrained here (on first use) before any arm runs
        spec = TASKS[task]
        base = load_yaml(_configs_dir() / spec["config"])
        process = _pretrained_process(task, runs / "models")
        schedule = schedules[task] = schedule_for(args.budget, spec.get("rounds", base["schedule"]))
        plan += [(task, label, seed, arm_config(task, label, seed, schedule, process, args.set, base=base),
                  runs / task / f"{label}-seed{seed}")
                 for label in args.methods for seed in range(args.first_seed, args.first_seed + args.seeds)]
    try:
        if args.jobs > 1:
            run_arms([(cfg, path, _arm_label(task, label, seed)) for task, label, seed, cfg, path in plan], args.jobs)
        results = run_plan(plan, args.budget, checkpoints, schedules)
    except (KeyboardInterrupt, SystemExit) as stop:  # a Ctrl-C, or a SIGTERM (main_exit's Terminated)
        sigterm = isinstance(stop, SystemExit)
        if sigterm and not stopped_by_sigterm(stop):
            raise
        print(f"{'terminated (SIGTERM)' if sigterm else 'stopped'}; the same command goes on from there: finished "
              f"arms are read back, interrupted ones resumed (run folders: {runs})", file=sys.stderr)
        return 143 if sigterm else 130
    _print_tables(results, checkpoints, schedules, args.seeds)
    if all_failed(results):  # a table of failures must not replace committed results
        raise DifftiltError(f"every arm failed; nothing written to {args.out} or {args.plot} "
                            f"(run folders: {runs})")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"schedules": schedules, "checkpoints": checkpoints, "results": results},
                              indent=1, default=str) + "\n")
    _plot(results, checkpoints, plot)
    print(f"results: {args.out}\nplot: {args.plot}\nrun folders: {runs}")
    return 0


def run_plan(plan: list[tuple], budget: int, checkpoints: list[int], schedules: dict[str, list[int]]) -> dict:
    """Run each arm of ``plan`` in turn (or read it back: :func:`run_or_reuse`) and read its
    scores after each checkpoint and round from its feedback store: ``{task: {label: [arm
    per seed]}}``, a line per arm as it is read."""
    t0 = time.time()
    results: dict = {}
    for task, label, seed, cfg, path in plan:
        method = cfg["methods"][0]  # a variant's method
        rows = run_or_reuse(cfg, path, _arm_label(task, label, seed))
        failed = rows.pop() if rows and "failed_round" in rows[-1] else None
        # a reused run with a larger budget is described as it stood at this budget
        within = [r for r in rows if r["queries_used"] <= budget]
        ends = list(itertools.accumulate(schedules[task]))  # after each round, for the plot
        read = store_curve(path / method, sorted({*checkpoints, *ends})) if rows else {}
        arm = {"seed": seed, "curve": {c: read[c] for c in checkpoints if c in read},
               "rounds": {c: read[c] for c in ends if c in read},
               "last": within[-1] if within else {}, "failed": failed}
        results.setdefault(task, {}).setdefault(label, []).append(arm)
        best = {c: round(v["best"], 3) for c, v in arm["curve"].items()}
        print(f"  {task} {label:<12} seed {seed}: best {best}"
              + (f"  FAILED in round {failed['failed_round']}: {failed['error']}" if failed else "")
              + f"  ({time.time() - t0:.0f} s)", flush=True)
    return results


def _arm_label(task: str, label: str, seed: int) -> str:
    return f"{task} {label} seed {seed}, "


def all_failed(results: dict) -> bool:
    """Whether every arm of every task and method failed (and there is no arm at all)."""
    arms = [a for methods in results.values() for group in methods.values() for a in group]
    return all(a["failed"] for a in arms)


def _print_tables(results: dict, checkpoints: list[int], schedules: dict[str, list[int]], seeds: int) -> None:
    print(f"\nsequences benchmark: {seeds} seeds; mean ± std over seeds of the best (top-10 mean) true score "
          "among the designs asked so far")
    for task, methods in results.items():
        print(f"\n{task} (rounds {_rounds_text(schedules[task])})")
        head = "".join(f"{f'best @{c}':>16}{f'top-10 @{c}':>16}" for c in checkpoints)
        print(f"{'method':<12}{head}{'feasible':>16}{'diversity':>16}{'reached 1.0':>14}")
        for method, arms in methods.items():
            cells = ""
            for c in checkpoints:
                cells += f"{fmt([a['curve'][c]['best'] for a in arms if c in a['curve']]):>16}"
                cells += f"{fmt([a['curve'][c]['top10'] for a in arms if c in a['curve']]):>16}"
            feas = fmt([a["last"]["eval_feasible"] for a in arms if "eval_feasible" in a["last"]])
            div = fmt([a["last"]["eval_diversity"] for a in arms if "eval_diversity" in a["last"]])
            reached = []
            for c in checkpoints:
                n = sum(1 for a in arms if c in a["curve"] and a["curve"][c]["best"] >= 1.0 - 1e-9)
                reached.append(f"{n}")
            failed = sum(1 for a in arms if a["failed"])
            print(f"{method:<12}{cells}{feas:>16}{div:>16}{'/'.join(reached):>14}"
                  + (f"   failed on {failed}/{len(arms)} seeds" if failed else ""))
    print(f"('reached 1.0': seeds whose best is 1.0 by {' / '.join(map(str, checkpoints))} calls; 'feasible' and "
          "'diversity': the last round's asked designs for GA/hill climber, the final model's samples otherwise)")


def _rounds_text(schedule: list[int]) -> str:
    """``[100, 100, 100]`` -> ``"3 x 100"``; mixed sizes are listed."""
    return f"{len(schedule)} x {schedule[0]}" if len(set(schedule)) == 1 else ", ".join(map(str, schedule))


def _plot(results: dict, checkpoints: list[int], path: Path) -> None:
    from matplotlib.ticker import FuncFormatter

    fig, axes = new_figure(1, len(results), figsize=(4.5 * len(results), 3.8), squeeze=False)
    for ax, (task, methods) in zip(axes[0], results.items()):
        for method, arms in methods.items():
            xs = sorted(set.intersection(*(set(a["rounds"]) for a in arms)))  # rounds every seed finished
            if not xs:
                continue
            per_seed = [[a["rounds"][c]["best"] for a in arms] for c in xs]
            line, = ax.plot(xs, [statistics.fmean(v) for v in per_seed], marker="o", markersize=3, label=method)
            ax.fill_between(xs, [min(v) for v in per_seed], [max(v) for v in per_seed], color=line.get_color(),
                            alpha=0.15, linewidth=0)
        for c in checkpoints:  # the table's columns
            ax.axvline(c, color="0.6", linewidth=0.6, linestyle=":")
        ax.set_xlim(left=0)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.set_xlabel("oracle calls")
        ax.set_ylabel("best true score after each round\n(mean; band: seeds min-max)")
        ax.set_title(task, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main_exit(main))
