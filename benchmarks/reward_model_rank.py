"""How well a run's reward models ranked the designs they chose: each round's, on the next round's answers.

SEIKO's fine-tuning can only be as good as the reward model it tilts toward. For each
finished round ``k >= 1`` of a run this refits the reward model that round ``k - 1`` fit
(the same answers, settings and seed) and scores it on round ``k``'s answers, which it was
used to choose and which came back after the fit: the Spearman correlation of its mean
and of its acquisition (UCB, ...) with the observed values, and the observed mean of the
10 answers its mean ranks highest beside the round's own top 10. ``--reward-model
KEY=VALUE`` changes the run's reward-model settings for the refits (another width, more
epochs) to compare them on the same data. The run folder is only read.

Usage::

    python -m difftilt.benchmarks.reward_model_rank runs/seq/ehrlich-20-64-4-4/ucb-seed0 --out ranks.json
    python -m difftilt.benchmarks.reward_model_rank runs/seq/ehrlich-20-64-4-4/ucb-seed0 --reward-model hidden=32
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from difftilt.core.online_diagnostics import reward_model_ranks

from .common import check_online_run, check_output, main_exit, yaml_setting

_COLUMNS = [("round", "round", "d"), ("train", "fit on", "d"), ("test", "scored on", "d"),
            ("test_mean", "mean", ".3f"), ("test_best", "best", ".3f"), ("rho_mean", "rho(mean)", ".3f"),
            ("rho_acquisition", "rho(acq)", ".3f"), ("top10_by_mean", "its top-10", ".3f"),
            ("top10", "top-10", ".3f")]


def table(rows: list[dict]) -> str:
    """The rows as a fixed-width table, with the mean of the correlations over rounds."""
    lines = ["  ".join(f"{title:>10}" for _, title, _ in _COLUMNS)]
    lines += ["  ".join(f"{r[k]:>10{spec}}" for k, _, spec in _COLUMNS) for r in rows]
    if rows:
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("rho_mean", "rho_acquisition")}
        lines.append(f"mean over {len(rows)} rounds: rho(mean) {mean['rho_mean']:.3f}, "
                     f"rho(acq) {mean['rho_acquisition']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m difftilt.benchmarks.reward_model_rank",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("run", help="an online run folder (difftilt online, or a benchmark arm under --runs)")
    ap.add_argument("--method", default="ucb", help="which of its methods (default: ucb)")
    ap.add_argument("--reward-model", metavar="KEY=VALUE", action="append", default=[], type=yaml_setting,
                    help="change one of the run's reward_model fields for the refits (a YAML value, e.g. "
                         "hidden=32); repeatable")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.out is not None:  # checked before the refits, not when the rows are written
        check_output(args.out, "--out")
    check_online_run(args.run)
    rows = reward_model_ranks(args.run, args.method, reward_model=dict(args.reward_model))
    changed = "".join(f", reward_model.{k}={v}" for k, v in args.reward_model)
    print(f"{args.run}: {args.method}'s reward models on the next round's answers{changed}")
    print(table(rows))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"run": str(args.run), "method": args.method,
                                        "reward_model": dict(args.reward_model), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_exit(main))
