"""Online toy benchmark: SEIKO against its baselines, same budget, several seeds.

Runs ``plugins/toy/configs/online.yaml`` (a rare high-reward mode, a noisy budgeted oracle,
infeasible designs off the pretrained manifold) for every method and seed, plus SEIKO-UCB
with a ten times weaker KL term and without one (``alpha = 0``), and prints mean ± std over
seeds of

* top-10 and best true reward among the queried designs (what the campaign found),
* mean true reward and feasible fraction of the final model's samples (scored with the
  ground truth outside the budget -- possible only in simulation), and the lowest feasible
  fraction over the rounds,
* diversity of those samples and the path KL of the final model to the pretrained one.

Usage::

    python -m difftilt.benchmarks.online_toy --methods ucb bootstrap greedy nonadaptive best_of_n \\
        --runs runs/online_toy         # 5 seeds, the table in the README (about 45 min on 2 cores)
    python -m difftilt.benchmarks.online_toy --seeds 2 --methods ucb greedy
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from importlib import resources
from pathlib import Path

from difftilt.core.config import load_yaml
from difftilt.core.plotting import new_figure, save_figure
from difftilt.core.online import METHODS

from .common import fmt, main_exit, positive_int, run_arms, run_or_reuse

COLUMNS = [("top10_true", "top-10 true"), ("best_true", "best true"), ("eval_mean_true", "model mean"),
           ("eval_feasible", "feasible"), ("min_feasible", "min feasible"), ("eval_diversity", "diversity"),
           ("kl_to_pretrained", "KL to pre")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m difftilt.benchmarks.online_toy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--no-kl-arm", action=argparse.BooleanOptionalAction, default=True,
                        help="also run SEIKO-UCB with a ten times weaker KL term and with none (alpha = 0)")
    parser.add_argument("--config", default=None, help="online config (default: the toy online.yaml)")
    parser.add_argument("--runs", default=None,
                        help="keep run folders here; finished arms found there are reused (default: a temporary folder)")
    parser.add_argument("--jobs", type=positive_int, default=1,
                        help="arms run at once, each in a process of its own on one thread (default 1: one after "
                        "another, in this process)")
    parser.add_argument("--out", default="benchmarks/results/online_toy.json")
    parser.add_argument("--plot", default="benchmarks/results/online_toy.png")
    args = parser.parse_args(argv)

    path = args.config or str(resources.files("difftilt.plugins.toy") / "configs" / "online.yaml")
    base = load_yaml(path)
    runs = Path(args.runs) if args.runs else Path(tempfile.mkdtemp(prefix="difftilt-online-"))
    arms = [(m, {"methods": [m]}) for m in args.methods]
    if args.no_kl_arm:
        # A ten times weaker KL term, and none: alpha = 0 has no optimal initial law to
        # learn (it would be a point mass), so that arm is drift only.
        alpha = float(base.get("alpha", 1.0))
        arms.append((f"ucb, alpha {alpha / 10:g}", {"methods": ["ucb"], "alpha": alpha / 10}))
        arms.append(("ucb, no KL", {"methods": ["ucb"], "alpha": 0.0,
                                    "finetune": {**base.get("finetune", {}), "learn_initial": False}}))
    final: dict[str, list[dict]] = {name: [] for name, _ in arms}
    curves: dict[str, list[list[dict]]] = {name: [] for name, _ in arms}
    failures: dict[str, list[dict]] = {name: [] for name, _ in arms}

    def folder(name: str, seed: int) -> Path:
        return runs / f"{name.replace(', ', '-').replace(' ', '')}-seed{seed}"

    plan = [(seed, name, {**base, **change, "seed": seed}, folder(name, seed))
            for seed in range(args.seeds) for name, change in arms]  # seed by seed
    if args.jobs > 1:
        run_arms([(cfg, path, f"seed {seed} {name}, ") for seed, name, cfg, path in plan], args.jobs)
    t0 = time.time()
    for seed, name, cfg, path in plan:
        rows = run_or_reuse(cfg, path, f"seed {seed} {name}, ")  # read back where it is done
        if "failed_round" in rows[-1]:
            failures[name].append({"seed": seed, **rows.pop()})
            print(f"  seed {seed} {name:<16} FAILED in round {failures[name][-1]['failed_round']}: "
                  f"{failures[name][-1]['error']}", flush=True)
            if not rows:
                continue
        rows[-1]["min_feasible"] = min(r.get("eval_feasible", 1.0) for r in rows)
        final[name].append(rows[-1])
        curves[name].append(rows)
        print(f"  seed {seed} {name:<16} top-10 {rows[-1]['top10_true']:.3f}  feasible "
              f"{rows[-1].get('eval_feasible', float('nan')):.3f}  ({time.time() - t0:.0f} s)", flush=True)

    print(f"\nonline toy benchmark: {args.seeds} seeds, budget {sum(base['schedule'])} queries in rounds "
          f"{base['schedule']}, mean ± std over seeds")
    print(f"{'method':<18}" + "".join(f"{label:>18}" for _, label in COLUMNS))
    for name in final:
        cells = "".join(f"{fmt([r[k] for r in final[name] if k in r]):>18}" for k, _ in COLUMNS)
        failed = f"   failed on {len(failures[name])}/{args.seeds} seeds" if failures[name] else ""
        print(f"{name:<18}{cells}{failed}")
    for name, fails in failures.items():
        for f in fails:
            print(f"  {name}, seed {f['seed']}: failed in round {f['failed_round']}: {f['error']}")
    pre = final.get("best_of_n")
    if pre:
        print(f"(pretrained model's feasible fraction: {fmt([r['eval_feasible'] for r in pre])})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": base, "final": final, "curves": curves, "failures": failures}, indent=2) + "\n")
    _plot(curves, Path(args.plot))
    print(f"results: {args.out}\nplot: {args.plot}\nrun folders: {runs}")
    return 0


def _plot(curves: dict[str, list[list[dict]]], path: Path) -> None:
    fig, axes = new_figure(1, 3, figsize=(15, 3.8))
    for ax, (key, title) in zip(axes, [("top10_true", "top-10 true reward of queried designs"),
                                       ("eval_mean_true", "mean true reward of model samples"),
                                       ("eval_feasible", "feasible fraction of model samples")]):
        for name, seeds in curves.items():
            if not seeds:
                continue
            n = min(len(s) for s in seeds)
            xs = [r["queries_used"] for r in seeds[0][:n]]
            ys = [statistics.fmean(s[i][key] for s in seeds) for i in range(len(xs))]
            ax.plot(xs, ys, marker="o", label=name, ls="--" if "no KL" in name else "-")
        if key == "eval_feasible" and curves.get("best_of_n"):
            pre = statistics.fmean(s[0]["eval_feasible"] for s in curves["best_of_n"])
            ax.axhline(pre, color="gray", ls=":", label="pretrained model")
        ax.set_xlabel("oracle queries used")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main_exit(main))
