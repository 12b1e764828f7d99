"""How fast a SEIKO round's two heavy parts run on each device: fine-tuning and drawing.

A SEIKO-UCB round on a sequences task spends most of its time fine-tuning (straight-through
backprop through every step of the masked-diffusion chain, with the KL to the round's
start) and the rest mostly drawing designs from the models. This builds the first round of
a benchmark task's SEIKO-UCB arm as the online loop does (the task's config: its
``finetune`` section, its reward model fit on ``--answers`` samples of the pretrained
model scored by the simulated oracle, UCB on top) and times, on each device and precision
asked for:

- one fine-tuning update: the median time between two updates' metrics over ``--updates``
  updates, after ``--warmup`` updates (a fit's start: Lightning's Trainer, CUDA's first
  kernels);
- drawing ``--samples`` designs from the pretrained model on that device: the best of
  ``--repeats`` draws after one to warm up.

The CPU runs with the thread count it is given (``--threads``; the benchmark tables ran one
thread per run). ``--profile N`` prints the N operations of each fit that take the most CPU
time (on a GPU: whether the update waits on kernel launches or on arithmetic). Set
``finetune.accelerator: gpu`` in a config to fine-tune on a GPU; the online loop then
draws on the CPU (Lightning moves the model back after each fit).

Usage::

    python -m difftilt.benchmarks.finetune_speed --task ehrlich-20-64-4-4 --devices cpu cuda \\
        --precision 32-true bf16-mixed --threads 16 --out benchmarks/results/finetune_speed.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from difftilt.core.finetune import Finetuner
from difftilt.core.online import _model_options, _setup, _validate
from difftilt.core.process import freeze
from difftilt.core.reward_models import UCB, AcquisitionReward, make_reward_model

from .common import check_output, main_exit, positive_int
from .sequences import TASKS, _pretrained_process, arm_config


def round_parts(task: str, answers: int, models: Path):
    """The pretrained model, the round's reward (UCB on a reward model fit on ``answers``
    of its samples) and the arm's validated config, built as the online loop's first round."""
    cfg = _validate(arm_config(task, "ucb", 0, [answers], _pretrained_process(task, models)))
    _, pretrained, truth, featurizer, _ = _setup(cfg)
    with torch.no_grad():
        x = pretrained.sample(answers, generator=torch.Generator().manual_seed(0))
        y = truth(x).masked(truth.infeasible_value)  # as fit_infeasible fits infeasible answers
        phi_dim = int(featurizer(x[:1]).shape[-1])
    model = make_reward_model("ucb", featurizer, phi_dim, **_model_options("ucb", cfg.reward_model))
    model.fit(x.to(torch.float32), y.double(), seed=0)
    acquisition = UCB(cfg.beta)
    acquisition.prepare(model, torch.Generator().manual_seed(0))
    return pretrained, AcquisitionReward(model, acquisition, name="ucb reward model"), cfg


def update_seconds(pretrained, reward, cfg, device: str, precision: str, updates: int, warmup: int,
                   profile: int = 0) -> float:
    """The median seconds between two fine-tuning updates on ``device``, over ``updates``
    updates after ``warmup`` (a fit's start, Lightning's and CUDA's first kernels, left out);
    ``profile``: print that many of the fit's operations, by their own CPU time."""
    accelerator = "gpu" if device == "cuda" else "cpu"
    alpha = cfg.alpha[0] if isinstance(cfg.alpha, list) else cfg.alpha
    stamps: list[float] = []  # each update's metrics are read off the device, so each stamp follows its update
    ft = Finetuner(freeze(pretrained), reward, alpha=alpha, policy=copy.deepcopy(pretrained).requires_grad_(True),
                   seed=0, on_metrics=lambda row: stamps.append(time.perf_counter()),
                   **{**cfg.finetune, "iterations": warmup + updates, "accelerator": accelerator,
                      "precision": precision, "progress": False})
    with contextlib.ExitStack() as stack:
        if profile:  # torch's profiler, over the whole fit: where a device's update spends its time
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            prof = stack.enter_context(torch.profiler.profile(activities=activities))
        ft.fit()
    if profile:
        print(f"\nprofile, {device} {precision}, {warmup + updates} updates:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=profile))
    return statistics.median(b - a for a, b in zip(stamps[warmup - 1:], stamps[warmup:]))


def draw_seconds(pretrained, device: str, samples: int, repeats: int) -> float:
    """Seconds to draw ``samples`` designs from the pretrained model on ``device``."""
    model = copy.deepcopy(pretrained).to(device)
    best = float("inf")
    with torch.no_grad():
        for i in range(repeats + 1):  # the first draw warms up
            start = time.perf_counter()
            model.sample(samples, generator=torch.Generator(device).manual_seed(i))
            if device == "cuda":
                torch.cuda.synchronize()
            if i:
                best = min(best, time.perf_counter() - start)
    return best


def table(rows: list[dict]) -> str:
    """Per device and precision: seconds per update and per draw, and the speed-up over the first row."""
    head = f"{'device':<28} {'precision':<11} {'s / update':>10} {'speed-up':>9} {'s / draw':>9} {'speed-up':>9}"
    lines = [head]
    base = rows[0]
    for r in rows:
        draw = "-" if r["draw_seconds"] is None else f"{r['draw_seconds']:9.3f}"
        draw_x = "-" if r["draw_seconds"] is None else f"{base['draw_seconds'] / r['draw_seconds']:8.1f}x"
        lines.append(f"{r['device_name']:<28} {r['precision']:<11} {r['update_seconds']:10.3f} "
                     f"{base['update_seconds'] / r['update_seconds']:8.1f}x {draw:>9} {draw_x:>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m difftilt.benchmarks.finetune_speed",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="ehrlich-20-64-4-4", choices=list(TASKS))
    parser.add_argument("--devices", nargs="+", default=None, choices=["cpu", "cuda"],
                        help="default: cpu, and cuda when there is a GPU")
    parser.add_argument("--precision", nargs="+", default=["32-true"],
                        help="Lightning precisions to time on the GPU (the CPU runs 32-true)")
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--updates", type=positive_int, default=5, help="timed updates per fit")
    parser.add_argument("--warmup", type=positive_int, default=2, help="updates before the timed ones")
    parser.add_argument("--repeats", type=positive_int, default=2, help="timed draws")
    parser.add_argument("--answers", type=positive_int, default=250, help="answers the reward model is fit on")
    parser.add_argument("--samples", type=positive_int, default=256, help="designs per timed draw")
    parser.add_argument("--models", default="runs/seq/models",
                        help="where a task without a committed model is pretrained once")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the N operations of each fit that take the most CPU time (torch's profiler)")
    parser.add_argument("--out", default=None, help="a JSON file for the figures")
    args = parser.parse_args(argv)
    out = check_output(args.out, "--out", {"json"}) if args.out else None
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--devices cuda: torch sees no CUDA GPU here")
    if args.threads:
        torch.set_num_threads(args.threads)

    pretrained, reward, cfg = round_parts(args.task, args.answers, Path(args.models))
    rows, failed = [], []
    for device in devices:
        name = (f"cpu, {torch.get_num_threads()} thread(s)" if device == "cpu"
                else torch.cuda.get_device_name())
        for precision in (["32-true"] if device == "cpu" else args.precision):
            try:
                row = {"device": device, "device_name": name, "precision": precision,
                       "update_seconds": update_seconds(pretrained, reward, cfg, device, precision, args.updates,
                                                        args.warmup, args.profile),
                       "draw_seconds": draw_seconds(pretrained, device, args.samples, args.repeats)
                       if precision == "32-true" else None}
            except Exception as err:  # one setting the device refuses (a precision, say) ends only its row
                failed.append(f"{name}, {precision}: {type(err).__name__}: {err}")
                print(f"failed: {failed[-1]}", flush=True)
                continue
            rows.append(row)
            print(table(rows).splitlines()[-1], flush=True)
    print(f"\n{args.task}: one SEIKO-UCB round's fine-tuning update (batch {cfg.finetune['batch_size']}, "
          f"{cfg.finetune['strategy']}) and a draw of {args.samples} designs")
    print(table(rows) if rows else "no setting ran")
    for line in failed:
        print(f"failed: {line}")
    if out is not None:
        out.write_text(json.dumps({"task": args.task, "updates": args.updates, "warmup": args.warmup,
                                   "repeats": args.repeats, "samples": args.samples, "finetune": cfg.finetune,
                                   "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                                   "rows": rows, "failed": failed}, indent=1))
        print(f"results: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main_exit(main))
