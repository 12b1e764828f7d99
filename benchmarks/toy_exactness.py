"""Toy exactness benchmark: does fine-tuning reach the exact tilted target?

On the analytic toy domain the target of entropy-regularized fine-tuning,
``p* ∝ p_pre exp(r / alpha)``, is a known Gaussian mixture. For 2-D mixtures with a
linear and a quadratic reward and several ``alpha`` this prints, per arm,

* ``no KL``       -- reward maximization (``alpha = 0``), the same number of updates;
* ``drift-only``  -- transitions fine-tuned, initial law kept at ``N(0, I)``;
* ``ELEGANT``     -- transitions and the learned initial law (the full method);

the sliced 2-Wasserstein distance to the exact ``p*``, the largest error of the sample
mean (in units of the pretrained law's std per coordinate), the largest error of the
component weights, the mean reward (beside ``E_{p*}[r]``) and the path KL to the
pretrained model. Drift-only and ELEGANT share step 1 (ELEGANT's value regression does
not touch the control), so the drift-only arm is the same run sampled from ``N(0, I)``.

A second table measures the backprop optimizer: peak tensor memory of one fine-tuning
step at ``K = 25, 50, 100, 200`` with and without gradient checkpointing (from the
profiler's allocation records), and the time of one fine-tuning step relative to
sampling the same batch without gradients.

Usage::

    python -m difftilt.benchmarks.toy_exactness            # everything (about an hour on 2 CPU cores)
    python -m difftilt.benchmarks.toy_exactness --quick    # one reward, one alpha, fewer updates
    python -m difftilt.benchmarks.toy_exactness --only memory
    python -m difftilt.benchmarks.toy_exactness --config my_case.yaml   # your own mixture/reward/alphas

A custom case file has the keys ``process`` (toy ``mixture`` fields), ``rewards`` (a list
of reward specs), ``alphas`` and optionally ``finetune`` (Finetuner fields).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from difftilt.core import (ControlledProcess, DirectBackprop, Finetuner, RewardError, estimate_kl,
                           sample_trajectories)
from difftilt.core.config import load_yaml
from difftilt.core.finetune import default_policy
from difftilt.core.plotting import new_figure, save_figure
from difftilt.core.rollout import step_generator
from difftilt.core.strategies import UpdateContext
from difftilt.plugins.toy import LinearReward, exactness_metrics, make_mixture_process
from difftilt.plugins.toy.domain import ToyDomain

DEFAULT_CASE = {
    "process": {"name": "mixture", "num_steps": 100, "eta": 0.3},
    "rewards": [
        {"name": "linear", "weights": [1.0, 0.5]},
        {"name": "quadratic", "center": [1.0, 1.5], "precision": 1.0},
    ],
    "alphas": [0.5, 1.0, 2.0],
    "finetune": {"iterations": 1000},
}

QUICK_FINETUNE = {"iterations": 400, "value_refit_iterations": 150, "initial_iterations": 200}


# --------------------------------------------------------------------------- exactness


def _fit_no_kl(process, reward, seed: int, progress: bool, ft_opts: dict, samples: int):
    """Reward maximization without KL (``alpha = 0``), same optimizer settings.

    For an unbounded reward its optimum is at infinity: the learned control feeds back on
    the state and the chain eventually overflows, which the reward check stops. The policy
    is snapshot every 20 updates; after a divergence the last snapshot whose samples are
    all finite is reported, and the note says so.
    """
    snaps: list[tuple[int, dict]] = []
    holder: dict = {}

    def keep(row: dict) -> None:
        if row["stage"] == "transitions" and row["iteration"] % 20 == 0:
            snaps.append((row["iteration"], copy.deepcopy(holder["ft"].policy.state_dict())))
            del snaps[:-8]

    ft = Finetuner(process, reward, alpha=0.0, learn_initial=False, seed=seed, progress=progress, on_metrics=keep,
                   **ft_opts)
    holder["ft"] = ft
    try:
        result = ft.fit()
        return result, result.sample(samples, seed=seed + 1), ""
    except RewardError:
        diverged_at = ft.history[-1]["iteration"] + 1 if ft.history else 0
    for it, state in reversed(snaps):
        ft.policy.load_state_dict(state)
        result = ft.result()
        x = result.sample(samples, seed=seed + 1)
        if torch.isfinite(x).all() and torch.isfinite(reward.evaluate(x)).all():
            return result, x, f"diverged (overflow) at update {diverged_at}; shown at update {it}"
    raise RuntimeError("the no-KL arm diverged before its first snapshot")



def _arm_row(name: str, x: torch.Tensor, process, reward, alpha: float, kl: float | None, seconds: float | None) -> dict:
    m = exactness_metrics(x, process, reward, alpha)
    return {
        "arm": name,
        "sw2": m["sw2"],
        "mean_error": m["mean_error"],
        "weight_error": m["weight_error"],
        "reward_mean": float(reward(x).value.double().mean()),
        "target_reward": m["target_reward"],
        "kl": kl,
        "seconds": seconds,
        "weights": m["sample_weights"],
        "target_weights": m["target_weights"],
    }


def run_exactness(case: dict, samples: int, seed: int, progress: bool) -> tuple[list[dict], dict]:
    """Rows of the exactness table, and per (reward, alpha) the samples of each arm (for the plot)."""
    domain = ToyDomain()
    process = domain.make_process(case["process"])
    ft_opts = dict(case.get("finetune", {}))
    rows = []
    shown: dict = {}
    for reward_spec in case["rewards"]:
        reward = domain.make_reward(reward_spec, process)
        x_pre = process.sample(samples, generator=step_generator(seed, -7))
        t0 = time.time()
        nokl_res, x_nokl, nokl_note = _fit_no_kl(process, reward, seed, progress, ft_opts, samples)
        nokl_time = time.time() - t0
        if nokl_note:
            print(f"  no KL ({reward_spec['name']}): {nokl_note}")
        nokl_kl = estimate_kl(nokl_res, 4096, seed=seed)["total"]
        for alpha in case["alphas"]:
            t0 = time.time()
            ft = Finetuner(process, reward, alpha=alpha, learn_initial=True, seed=seed, progress=progress, **ft_opts)
            res = ft.fit()
            seconds = time.time() - t0
            # drift-only: the same transitions, started from the pretrained initial law
            drift = sample_trajectories(res.transitions, samples, seed=seed + 2, kl=True)
            kl_full = estimate_kl(res, 4096, seed=seed)
            x_full = res.sample(samples, seed=seed + 3)
            label = f"{reward_spec['name']}"
            shown[(label, alpha)] = {
                "reward": reward, "arms": {"pretrained": x_pre, "no KL": x_nokl, "drift-only": drift.x, "ELEGANT": x_full}
            }
            x_exact = reward.tilt(process.terminal_law(), alpha).sample(samples, torch.Generator().manual_seed(seed))
            for row in (
                _arm_row("exact p* (floor)", x_exact.float(), process, reward, alpha, None, None),
                _arm_row("pretrained", x_pre, process, reward, alpha, 0.0, None),
                _arm_row("no KL" + ("*" if nokl_note else ""), x_nokl, process, reward, alpha, nokl_kl, nokl_time),
                _arm_row("drift-only", drift.x, process, reward, alpha, float(drift.kl.sum(1).mean()), None),
                _arm_row("ELEGANT", x_full, process, reward, alpha, kl_full["total"], seconds),
            ):
                rows.append({"reward": label, "alpha": alpha, **row})
            _print_exactness([r for r in rows if r["reward"] == label and r["alpha"] == alpha], header=not rows[:-5])
    return rows, {"process": process, "cases": shown}


def _fmt(v, spec):
    """Right-aligned ``spec`` format; "-" for missing values, scientific for huge ones (a
    diverged arm), so columns stay aligned."""
    width = int(spec.split(".")[0])
    if v is None:
        return "-".rjust(width)
    if abs(v) >= 1e4:
        return format(v, f"{width}.2e")
    return format(v, spec)


def _print_exactness(rows: list[dict], header: bool = True) -> None:
    if header:
        print(f"{'reward':<10}{'alpha':>6}  {'arm':<16}{'SW2 to p*':>10}{'mean err':>10}{'weight err':>11}"
              f"{'E[r]':>9}{'E_p*[r]':>9}{'path KL':>9}{'time s':>8}")
    for r in rows:
        print(f"{r['reward']:<10}{r['alpha']:>6g}  {r['arm']:<16}{_fmt(r['sw2'], '10.4f')}{_fmt(r['mean_error'], '10.4f')}"
              f"{_fmt(r['weight_error'], '11.4f')}{_fmt(r['reward_mean'], '9.3f')}{_fmt(r['target_reward'], '9.3f')}"
              f"{_fmt(r['kl'], '9.3f')}{_fmt(r['seconds'], '8.0f')}", flush=True)


def summarize_ratios(rows: list[dict]) -> list[dict]:
    """Drift-only SW2 over ELEGANT SW2 per (reward, alpha)."""
    out = []
    for key in dict.fromkeys((r["reward"], r["alpha"]) for r in rows):
        arms = {r["arm"]: r for r in rows if (r["reward"], r["alpha"]) == key}
        out.append({"reward": key[0], "alpha": key[1],
                    "drift_over_elegant_sw2": arms["drift-only"]["sw2"] / arms["ELEGANT"]["sw2"],
                    "elegant_mean_error": arms["ELEGANT"]["mean_error"],
                    "elegant_weight_error": arms["ELEGANT"]["weight_error"]})
    return out


# --------------------------------------------------------------------------- memory and speed

_MEMORY_PROBE = r"""
import json, sys, torch
from torch.profiler import profile, ProfilerActivity
from difftilt.core import ControlledProcess, differentiable_rollout
from difftilt.core.finetune import default_policy
from difftilt.plugins.toy import make_mixture_process, LinearReward
torch.set_num_threads(1)
K, ckpt, B = int(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
proc = make_mixture_process(num_steps=K)
reward = LinearReward([1.0, 0.5])
cp = ControlledProcess(proc, default_policy(proc))
x0 = torch.randn(B, 2)
def step():
    x, kl = differentiable_rollout(cp, x0, seed=0, checkpoint=ckpt)
    (-(reward(x).value - kl).mean()).backward()
step()  # warm-up: gradients and caches exist from here on
with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    step()
# Allocations are attributed to the op that made them, frees outside ops are [memory]
# events: the running sum of self memory in time order is the live tensor memory.
live = peak = 0
for e in sorted(prof.events(), key=lambda e: e.time_range.start):
    live += e.self_cpu_memory_usage
    peak = max(peak, live)
print(json.dumps({"peak_bytes": peak}))
"""


def _probe_memory(K: int, ckpt: bool, batch: int) -> int:
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(K), "1" if ckpt else "0", str(batch)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def run_memory(steps: list[int], batch: int) -> list[dict]:
    rows = []
    state = batch * 2 * 4  # one state: batch x 2 float32
    print(f"\npeak tensor memory of one fine-tuning step (batch {batch}, one state = {state / 1024:.1f} KiB)")
    print(f"{'K':>5}{'checkpointed MiB':>18}{'plain MiB':>12}{'ckpt growth vs K=' + str(steps[0]):>24}"
          f"{'K stored states':>17}{'growth/states':>15}")
    base = None
    for K in steps:
        ck, plain = _probe_memory(K, True, batch), _probe_memory(K, False, batch)
        if base is None:
            base = ck
        growth, allowance = ck - base, (K - steps[0]) * state
        ratio = growth / allowance if allowance else float("nan")
        rows.append({"K": K, "checkpointed_bytes": ck, "plain_bytes": plain, "growth_bytes": growth,
                     "stored_states_bytes": allowance, "growth_over_states": ratio})
        print(f"{K:>5}{ck / 2**20:>18.3f}{plain / 2**20:>12.2f}{growth / 2**10:>21.1f} KiB"
              f"{allowance / 2**10:>13.1f} KiB{ratio:>15.3f}", flush=True)
    return rows


def run_speed(K: int, batch: int, repeats: int) -> dict:
    """Median time of one fine-tuning update (rollout, reward, backward, optimizer step)
    over the median time of sampling the same batch without gradients; interleaved runs."""
    process = make_mixture_process(num_steps=K)
    reward = LinearReward([1.0, 0.5])
    cp = ControlledProcess(process, default_policy(process))
    opt = torch.optim.Adam(cp.trainable_parameters(), lr=1e-4)
    x0 = torch.randn(batch, 2)

    def opt_step():
        opt.step()
        opt.zero_grad(set_to_none=True)
        return 0.0

    def update(ckpt: bool):
        ctx = UpdateContext(cp, reward, 1.0, x0, 0, lambda loss: loss.backward(), opt_step)
        DirectBackprop(checkpoint=ckpt).update(ctx)

    def sample():
        with torch.no_grad():
            sample_trajectories(cp, x0=x0, seed=0, kl=False)

    jobs = {"sample": sample, "update_ckpt": lambda: update(True), "update_plain": lambda: update(False)}
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for fn in jobs.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in jobs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"K": K, "batch": batch, "sample_s": med["sample"], "update_ckpt_s": med["update_ckpt"],
           "update_plain_s": med["update_plain"], "ratio_ckpt": med["update_ckpt"] / med["sample"],
           "ratio_plain": med["update_plain"] / med["sample"]}
    print(f"\none fine-tuning update vs sampling the same batch without gradients (K {K}, batch {batch}, "
          f"median of {repeats} interleaved runs, {torch.get_num_threads()} threads)")
    print(f"  sampling            {med['sample'] * 1e3:8.1f} ms")
    print(f"  update, checkpoint  {med['update_ckpt'] * 1e3:8.1f} ms   ratio {out['ratio_ckpt']:.2f}")
    print(f"  update, plain       {med['update_plain'] * 1e3:8.1f} ms   ratio {out['ratio_plain']:.2f}")
    return out


# --------------------------------------------------------------------------- plot


def plot_samples(shown: dict, rows: list[dict], path: Path, per_arm: int = 1500) -> Path:
    """One row per (reward, alpha): each arm's samples over the exact p* density."""
    process, cases = shown["process"], shown["cases"]
    arms = ["pretrained", "no KL", "drift-only", "ELEGANT"]  # (the no-KL row may carry a '*')
    fig, axes = new_figure(len(cases), 4, figsize=(13, 3.1 * len(cases)), squeeze=False)
    for i, ((label, alpha), case) in enumerate(cases.items()):
        target = case["reward"].tilt(process.terminal_law(), alpha)
        lo, hi = target.means.min(0).values - 2.5, target.means.max(0).values + 2.5
        gx, gy = torch.meshgrid(torch.linspace(float(lo[0]), float(hi[0]), 160, dtype=torch.float64),
                                torch.linspace(float(lo[1]), float(hi[1]), 160, dtype=torch.float64), indexing="xy")
        dens = target.log_prob(torch.stack([gx.flatten(), gy.flatten()], -1)).exp().reshape(gx.shape)
        for j, arm in enumerate(arms):
            ax = axes[i][j]
            x = case["arms"][arm][:per_arm].double()
            ax.contour(gx, gy, dens, levels=6, colors="C3", linewidths=0.8)
            ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.35, color="C0")
            sw2 = next(r["sw2"] for r in rows if (r["reward"], r["alpha"]) == (label, alpha) and r["arm"].startswith(arm))
            ax.set_title(f"{arm}  (SW2 {sw2:.3f})", fontsize=9)
            ax.set_xlim(float(lo[0]), float(hi[0]))
            ax.set_ylim(float(lo[1]), float(hi[1]))
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(f"{label}, alpha = {alpha:g}")
    fig.suptitle("samples (blue) against the exact tilted target p* (red contours)")
    return save_figure(fig, path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m difftilt.benchmarks.toy_exactness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="linear reward, alpha 1, fewer updates")
    parser.add_argument("--only", choices=["exactness", "memory", "speed"], action="append",
                        help="run only these parts (repeatable)")
    parser.add_argument("--config", help="YAML case file: process, rewards, alphas, finetune")
    parser.add_argument("--samples", type=int, default=100_000, help="samples per arm for the distances")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-batch", type=int, default=4096)
    parser.add_argument("--speed-repeats", type=int, default=15)
    parser.add_argument("--speed-batch", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--progress", action="store_true", help="show training progress bars")
    parser.add_argument("--out", default=None, help="write all results as JSON here")
    parser.add_argument("--plot", default="benchmarks/results/toy_exactness.png", help="where to save the sample plot")
    parser.add_argument("--print", dest="reprint", metavar="JSON", help="print the tables of a saved --out file and exit")
    args = parser.parse_args(argv)
    if args.reprint:
        saved = json.loads(Path(args.reprint).read_text())
        rows = saved.get("exactness", [])
        for i, key in enumerate(dict.fromkeys((r["reward"], r["alpha"]) for r in rows)):
            _print_exactness([r for r in rows if (r["reward"], r["alpha"]) == key], header=i == 0)
        for r in saved.get("ratios", []):
            print(f"  {r['reward']:<10} alpha {r['alpha']:<4g} drift-only / ELEGANT = {r['drift_over_elegant_sw2']:.2f}"
                  f"   mean err {r['elegant_mean_error']:.4f}   weight err {r['elegant_weight_error']:.4f}")
        return 0
    parts = set(args.only or ["exactness", "memory", "speed"])

    case = dict(DEFAULT_CASE)
    if args.config:
        case.update(load_yaml(args.config))
    if args.quick:
        case["rewards"], case["alphas"] = case["rewards"][:1], [1.0]
        case["finetune"] = {**QUICK_FINETUNE, **case.get("finetune", {})}
    results: dict = {"case": case}
    if "exactness" in parts:
        print(f"exactness against the exact tilted target p* ({args.samples} samples per arm; "
              f"process {case['process']})")
        rows, shown = run_exactness(case, args.samples, args.seed, args.progress)
        results["exactness"] = rows
        print(f"\nplot: {plot_samples(shown, rows, Path(args.plot))}")
        results["ratios"] = summarize_ratios(rows)
        print("\nELEGANT vs drift-only (SW2 ratio; ELEGANT's mean and weight errors):")
        for r in results["ratios"]:
            print(f"  {r['reward']:<10} alpha {r['alpha']:<4g} drift-only / ELEGANT = {r['drift_over_elegant_sw2']:.2f}"
                  f"   mean err {r['elegant_mean_error']:.4f}   weight err {r['elegant_weight_error']:.4f}")
    if "memory" in parts:
        results["memory"] = run_memory([25, 50, 100, 200], args.memory_batch)
    if "speed" in parts:
        results["speed"] = [run_speed(100, b, args.speed_repeats) for b in args.speed_batch]
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
