"""How much of a fine-tuned masked diffusion's KL is spent on reveal orders, not designs.

A first-hitting chain makes a sequence along one of ``L!`` paths (one per reveal order).
The fine-tuning's KL is the paths' KL, which bounds the designs' KL from above; the two are
equal only when every order gives a design the same likelihood, as the conditionals of one
joint law would. This samples designs from a fine-tuned model ``q`` and from the model it
started from ``p``, and prints for each set:

* ``path log q/p``: the mean log-ratio along the sampled paths themselves (for ``q``'s
  samples, the path KL the fine-tuning paid);
* ``design log q/p``: the mean of ``log q(x) - log p(x)``, each likelihood estimated over
  the same ``--orders`` random reveal orders
  (:func:`~difftilt.plugins.sequences.mdlm.log_likelihood`; for ``q``'s samples, an estimate
  of the designs' KL, biased by the finite number of orders);
* ``order std q`` / ``order std p``: the standard deviation across orders of each model's
  log-likelihood of a design, the models' inconsistency.

Usage::

    python -m difftilt.benchmarks.order_consistency runs/seq/ehrlich-20-32-4-4/ucb-seed1/ucb/checkpoints/round_0 \\
        --samples 256 --orders 16 --out order_consistency.json

``--start`` names the model the round started from (default: the pretrained model,
round 0's start): a fine-tuned checkpoint folder (an earlier round's) or a pretrained model
folder written by ``difftilt pretrain``. The two models must make sequences of the same
length over the same alphabet.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from difftilt.core.checkpoint import load_finetuned, load_model_folder
from difftilt.core.errors import CheckpointError, ConfigError
from difftilt.core.rollout import sample_trajectories
from difftilt.plugins.sequences.mdlm import order_log_likelihoods, revealed_order

from .common import check_output, main_exit


def load_start(path: Path):
    """The model ``--start`` names: a fine-tuned or a pretrained model folder, as ``difftilt
    sample`` reads them (:func:`~difftilt.core.checkpoint.load_model_folder`)."""
    try:
        return load_model_folder(path)[0]
    except CheckpointError as err:
        raise CheckpointError(f"--start {err}") from None


def check_same_kind(q, p, model: Path, start: Path) -> None:
    """Refuse two models whose designs differ in shape (another length or alphabet): their
    likelihoods of one design cannot be compared."""
    if tuple(q.event_shape) != tuple(p.event_shape):
        raise ConfigError(f"the two models do not match: {model} makes designs of shape {tuple(q.event_shape)}, "
                          f"--start {start} of shape {tuple(p.event_shape)} (another length or alphabet)")


@torch.no_grad()
def consistency(q, p, samples: int, orders: int, seed: int = 0) -> list[dict]:
    """One row for ``q``'s samples and one for ``p``'s (see the module docstring)."""
    rows = []
    for name, model in (("q (fine-tuned)", q), ("p (start)", p)):
        traj = sample_trajectories(model, samples, seed=seed, kl=False, states=True)
        tokens = traj.x.argmax(-1)
        own = revealed_order(traj.states)[:, None]
        path = order_log_likelihoods(q, tokens, own)[:, 0] - order_log_likelihoods(p, tokens, own)[:, 0]
        g = torch.Generator().manual_seed(seed + 1)
        perms = torch.argsort(torch.rand(samples, orders, tokens.shape[1], generator=g), dim=-1)
        llq, llp = order_log_likelihoods(q, tokens, perms), order_log_likelihoods(p, tokens, perms)
        design = torch.logsumexp(llq, 1) - torch.logsumexp(llp, 1)  # the same orders: the log m's cancel
        se = lambda v: float(v.std()) / samples ** 0.5  # noqa: E731
        rows.append({"samples_of": name, "path_log_ratio": float(path.mean()), "path_log_ratio_se": se(path),
                     "design_log_ratio": float(design.mean()), "design_log_ratio_se": se(design),
                     "order_std_q": float(llq.std(1).mean()), "order_std_p": float(llp.std(1).mean())})
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'samples of':<16}{'path log q/p':>18}{'design log q/p':>18}{'order std q':>14}{'order std p':>14}"]
    for r in rows:
        lines.append(f"{r['samples_of']:<16}{r['path_log_ratio']:>10.3f} ± {r['path_log_ratio_se']:.3f}"
                     f"{r['design_log_ratio']:>10.3f} ± {r['design_log_ratio_se']:.3f}"
                     f"{r['order_std_q']:>14.3f}{r['order_std_p']:>14.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m difftilt.benchmarks.order_consistency",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path, help="a fine-tuned checkpoint folder (e.g. a SEIKO round's)")
    ap.add_argument("--start", type=Path, default=None,
                    help="the model it was fine-tuned from: a fine-tuned checkpoint folder or a pretrained "
                         "model folder (default: its pretrained model)")
    ap.add_argument("--samples", type=int, default=256, help="designs sampled from each model (default 256)")
    ap.add_argument("--orders", type=int, default=16, help="random reveal orders per design (default 16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.samples < 2 or args.orders < 2:
        ap.error("--samples and --orders must be >= 2")
    if args.out is not None:
        check_output(args.out, "--out")
    loaded = load_finetuned(args.model)
    q = loaded.model
    p = loaded.transitions.reference if args.start is None else load_start(args.start)
    if args.start is not None:
        check_same_kind(q, p, args.model, args.start)
    rows = consistency(q, p, args.samples, args.orders, args.seed)
    print(f"{args.model} against {args.start or 'its pretrained model'}: {args.samples} designs each, "
          f"{args.orders} reveal orders")
    print(table(rows))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": str(args.model), "start": str(args.start), "samples": args.samples,
                                        "orders": args.orders, "seed": args.seed, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_exit(main))
