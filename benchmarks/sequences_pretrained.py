"""How good are the embedded sequence models? Samples against their training distributions.

* Ehrlich(20, 32, 2, 4, seed 0): the feasible fraction of the pretrained model's samples
  (its corpus is 100% feasible) and the pretrained level of the score (mean and max).
* TFBind8: the model was trained on the lower half of the table; its samples should look
  like that half: the fraction inside it, score quantiles, per-position letter frequencies.

Usage::

    python -m difftilt.benchmarks.sequences_pretrained            # 1,000 Ehrlich and 10,000 TFBind8 samples
    python -m difftilt.benchmarks.sequences_pretrained --only ehrlich --ehrlich-model benchmarks/models/ehrlich-20-64-4-4
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from difftilt.plugins.sequences.mdlm import masked_diffusion_loss
from difftilt.plugins.sequences import EhrlichFunction, TFBind8, load_ehrlich, load_pretrained, load_tfbind8


def _sample(process, n: int, seed: int, batch: int = 500) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([process.tokens(process.sample(min(batch, n - i), generator=g)) for i in range(0, n, batch)])


@torch.no_grad()
def _nelbo(process, tokens: torch.Tensor, seed: int, repeats: int = 20) -> float:
    """MDLM's bound on ``-log p(x)`` in nats per sequence, averaged over ``tokens`` (Monte Carlo in t)."""
    g = torch.Generator().manual_seed(seed)
    vals = [masked_diffusion_loss(process.denoiser, tokens[i:i + 4096], process.schedule, generator=g).item()
            * min(4096, tokens.shape[0] - i) for _ in range(repeats) for i in range(0, tokens.shape[0], 4096)]
    return sum(vals) / (repeats * tokens.shape[0]) * tokens.shape[1]


def ehrlich_report(n: int, seed: int, model: str | None = None) -> dict:
    """The embedded default, or the Ehrlich model pretrained in folder ``model`` (its
    ``process.json`` names the instance)."""
    if model is None:
        process, spec = load_ehrlich(), {"num_states": 20, "length": 32, "num_motifs": 2, "motif_length": 4, "seed": 0}
    else:
        process, spec = load_pretrained(model), json.loads((Path(model) / "process.json").read_text())["data"]
        if spec.get("name") != "ehrlich":
            raise SystemExit(f"{model} was not pretrained on an Ehrlich corpus (data: {spec.get('name')})")
    args = [spec[k] for k in ("num_states", "length", "num_motifs", "motif_length")]
    f = EhrlichFunction(*args, seed=spec["seed"])
    ids = _sample(process, n, seed)
    masked = (ids >= process.vocab_size).any(-1)
    value, feasible = f(ids.clamp(max=process.vocab_size - 1))
    feasible &= ~masked
    corpus = f.sample_feasible(n, generator=torch.Generator().manual_seed(seed + 1))
    cv, _ = f(corpus)
    out = {"samples": n, "feasible": float(feasible.float().mean()), "score_mean": float(value.mean()),
           "score_max": float(value.max()), "corpus_score_mean": float(cv.mean()), "corpus_score_max": float(cv.max()),
           "num_steps": process.num_steps}
    out["instance"] = {**dict(zip(("num_states", "length", "num_motifs", "motif_length"), args)), "seed": spec["seed"]}
    print(f"\nEhrlich({', '.join(map(str, args))}, seed {spec['seed']}) pretrained model"
          f"{'' if model is None else ' in ' + model}, {n} samples, K = {process.num_steps}")
    print(f"  feasible fraction       {out['feasible']:.4f}   (corpus: 1.0000)")
    print(f"  score mean / max        {out['score_mean']:.4f} / {out['score_max']:.4f}   "
          f"(corpus: {out['corpus_score_mean']:.4f} / {out['corpus_score_max']:.4f})")
    return out


def tfbind8_report(n: int, seed: int) -> dict:
    process = load_tfbind8()
    table = TFBind8()
    ids = _sample(process, n, seed)
    train = table.offline_dataset()
    s, st = table(ids), table(train)
    threshold = float(st.max())
    freq = torch.nn.functional.one_hot(ids, 4).float().mean(0)
    freq_t = torch.nn.functional.one_hot(train, 4).float().mean(0)
    qs = torch.tensor([0.1, 0.5, 0.9])
    # What matching the half means, in numbers: a model of independent positions with the
    # half's letter frequencies lands inside it this often; the perfect model always does.
    g = torch.Generator().manual_seed(seed + 2)
    indep = torch.stack([torch.multinomial(freq_t[l], n, replacement=True, generator=g) for l in range(8)], 1)
    upper = table.from_index(torch.tensor(sorted(set(range(4**8)) - set(table.index(train).tolist()))))
    nelbo = {name: _nelbo(process, data, seed) for name, data in (("train", train), ("upper", upper))}
    out = {"samples": n, "inside_training_half": float((s <= threshold).float().mean()),
           "independent_sites_inside": float((table(indep) <= threshold).float().mean()),
           "nelbo_train_half": nelbo["train"], "nelbo_upper_half": nelbo["upper"],
           "entropy_uniform_half": math.log(train.shape[0]),
           "distinct": int(torch.unique(ids, dim=0).shape[0]),
           "score_quantiles": torch.quantile(s, qs).tolist(), "train_score_quantiles": torch.quantile(st, qs).tolist(),
           "score_max": float(s.max()), "letter_tv_max": float(0.5 * (freq - freq_t).abs().sum(-1).max())}
    print(f"\nTFBind8 pretrained model (trained on the lower half, {train.shape[0]} 8-mers), {n} samples")
    print(f"  inside the training half   {out['inside_training_half']:.4f}   (a model of independent positions "
          f"with the half's letter frequencies: {out['independent_sites_inside']:.4f}; a perfect model: 1)")
    print(f"  NELBO, nats per sequence   training half {out['nelbo_train_half']:.3f}   upper half "
          f"{out['nelbo_upper_half']:.3f}   (uniform over the half: {out['entropy_uniform_half']:.3f})")
    print(f"  distinct sequences         {out['distinct']}")
    print("  score 10/50/90% quantiles  " + " / ".join(f"{v:.3f}" for v in out["score_quantiles"])
          + "   (training half: " + " / ".join(f"{v:.3f}" for v in out["train_score_quantiles"]) + ")")
    print(f"  best sample score          {out['score_max']:.3f}")
    print(f"  per-position letter frequencies: largest total variation to the training half {out['letter_tv_max']:.4f}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m difftilt.benchmarks.sequences_pretrained",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--ehrlich-samples", type=int, default=1000)
    parser.add_argument("--tfbind8-samples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ehrlich-model", default=None,
                        help="an Ehrlich model folder made by difftilt pretrain (default: the embedded one)")
    parser.add_argument("--only", choices=["ehrlich", "tfbind8"])
    parser.add_argument("--out", default="benchmarks/results/sequences_pretrained.json")
    args = parser.parse_args(argv)
    results = {}
    if args.only in (None, "ehrlich"):
        results["ehrlich"] = ehrlich_report(args.ehrlich_samples, args.seed, args.ehrlich_model)
    if args.only in (None, "tfbind8"):
        results["tfbind8"] = tfbind8_report(args.tfbind8_samples, args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
