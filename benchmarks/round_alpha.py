"""How far one SEIKO round moves its model at each alpha: a round of a run, re-tuned.

alpha is the price of a nat of KL in reward units, and what it buys depends on the task:
on Ehrlich(20, 32, 4, 4) a round at alpha 0.0035 raised the model's mean score from about
0.03 to 0.052 for 2.5 nats, on (20, 64, 4, 4) from 0.035 to 0.041 for 1 nat. This re-runs one
round's fine-tuning of a finished run (its reward model refit on the same answers, the
run's settings and seeds) at each alpha and prints, per alpha, the KL to the round's
starting model and to the pretrained one, the acquisition's mean over the new model's
samples and, for a simulated oracle (outside any budget), their true mean, top-10,
feasible fraction and diversity. The run's own alpha repeats the run's round (its
``eval_mean_true`` and ``kl_to_pretrained``) on the same machine and thread count.

With ``--tilt-samples N`` it also says how close the fine-tuning came to the round's own
target, the tilt ``p_start * exp(acquisition / alpha)``: it weights N samples of the
starting model by ``exp(acquisition / alpha)`` (self-normalized importance sampling) and
prints the target's objective ``J* = alpha * log E[exp(acquisition / alpha)]``, KL and true
mean beside the fine-tuned model's ``J = acquisition mean - alpha * KL``, and the share of
the gain from the starting model's ``J`` that the fine-tuning reached. With few effective
samples (ESS) the target's figures are biased low. ``--finetune KEY=VALUE`` changes the
run's fine-tuning settings for the re-tune (more updates, another learning rate, policy
gradient instead of backprop), to see whether another solver gets closer.

Usage::

    python -m difftilt.benchmarks.round_alpha runs/seq/ehrlich-20-64-4-4/ucb-seed1 --method ucb --round 0 \\
        --alphas 0.0001 0.001 0.002 0.0035 --out round_alpha.json
    python -m difftilt.benchmarks.round_alpha runs/seq/ehrlich-20-32-4-4/ucb-seed1 --alphas 0.0035 --tilt-samples 4096 \\
        --finetune iterations=240
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from difftilt.core.config import load_yaml
from difftilt.core.online_diagnostics import retune_round

from .common import check_online_run, check_output, main_exit, yaml_setting

_COLUMNS = [("alpha", "alpha"), ("kl_to_start", "KL to start"), ("kl_to_pretrained", "KL to pretrained"),
            ("acquisition_mean", "acquisition"), ("mean_true", "true mean"), ("top10_true", "true top-10"),
            ("feasible", "feasible"), ("diversity", "diversity"), ("objective", "J"),
            ("tilt_objective", "exact J"), ("solver_share", "share of gain"), ("tilt_kl", "exact KL"),
            ("tilt_mean_true", "exact true mean"), ("tilt_ess", "ESS"), ("seconds", "seconds")]


def table(rows: list[dict], run_alpha: float | None = None) -> str:
    """The rows as a fixed-width table; the run's own alpha is marked with ``*``."""
    cols = [(k, title) for k, title in _COLUMNS if any(k in r for r in rows)]
    lines = ["  ".join(f"{title:>16}" for _, title in cols)]
    for r in rows:
        cells = []
        for k, _ in cols:
            v = r.get(k)
            cell = "-" if v is None else (f"{v:g}" if k == "alpha" else f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}")
            if k == "alpha" and run_alpha is not None and abs(v - run_alpha) <= 1e-12 * max(1.0, run_alpha):
                cell += " *"
            cells.append(f"{cell:>16}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m difftilt.benchmarks.round_alpha", description=__doc__.split("\n")[0])
    ap.add_argument("run", help="an online run folder (difftilt online, or a benchmark arm under --runs)")
    ap.add_argument("--method", default="ucb", help="which of its methods (default: ucb)")
    ap.add_argument("--round", type=int, default=0, help="which finished round (default: 0)")
    ap.add_argument("--alphas", type=float, nargs="+", required=True, help="the KL weights to try")
    ap.add_argument("--samples", type=int, default=None,
                    help="samples per model, >= 2 (default: the run's eval_samples, else 256)")
    ap.add_argument("--tilt-samples", type=int, default=0,
                    help="also estimate the round's exact target from this many samples of its starting model "
                         "(e.g. 4096): its objective J*, KL and true mean, and the share of J*'s gain the "
                         "fine-tuning reached")
    ap.add_argument("--finetune", metavar="KEY=VALUE", action="append", default=[], type=yaml_setting,
                    help="change one of the run's finetune fields for these fine-tunes (a YAML value, e.g. "
                         "iterations=240 or 'strategy={name: policy_gradient}'); repeatable")
    ap.add_argument("--reward-model", metavar="KEY=VALUE", action="append", default=[], type=yaml_setting,
                    help="change one of the run's reward_model fields for the refit (a YAML value, e.g. "
                         "clip_features=true); repeatable")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    # checked before the fine-tunes (minutes each), not when the rows are written
    if args.samples is not None and args.samples < 2:  # 0 used to mean the run's eval_samples, silently
        ap.error(f"--samples must be >= 2 (leave it out for the run's eval_samples), got {args.samples}")
    if args.out is not None:
        check_output(args.out, "--out")
    check_online_run(args.run)
    rows = retune_round(args.run, args.method, args.round, args.alphas, samples=args.samples,
                        progress=sys.stderr.isatty(),  # no progress bars in a log file
                        tilt_samples=args.tilt_samples, finetune=dict(args.finetune),
                        reward_model=dict(args.reward_model))
    alpha = load_yaml(Path(args.run) / "config.yaml")["alpha"]
    run_alpha = alpha[min(args.round, len(alpha) - 1)] if isinstance(alpha, list) else alpha
    if args.finetune or args.reward_model:  # another solver or reward model: no row repeats the run's round
        changed = "".join(f", {part}.{k}={v}" for part, settings in (("finetune", args.finetune),
                                                                     ("reward_model", args.reward_model))
                          for k, v in settings)
        print(f"{args.run}: {args.method} round {args.round} re-tuned{changed} (the run's alpha: {run_alpha:g})")
        print(table(rows))
    else:
        print(f"{args.run}: {args.method} round {args.round} re-tuned (the run's alpha: {run_alpha:g}, marked *)")
        print(table(rows, run_alpha))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"run": str(args.run), "method": args.method, "round": args.round,
                                        "run_alpha": run_alpha, "finetune": dict(args.finetune),
                                        "reward_model": dict(args.reward_model), "rows": rows},
                                       indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_exit(main))
