"""How good are the embedded sequence models? Samples against their training distributions.

* Ehrlich(20, 32, 2, 4, seed 0): the feasible fraction of the pretrained model's samples
  (its corpus is 100% feasible) and the pretrained level of the score (mean and max).
* TFBind8: the model was trained on the lower half of the table; its samples should look
  like that half: the fraction inside it, score quantiles, per-position letter frequencies.
  With ``--tfbind8-holdout F`` it also retrains the embedded model's config on all but a
  random fraction ``F`` of the half and compares the held-out 8-mers with the fitted ones
  (NELBO, and how often samples land on each per 8-mer): equal figures mean the model
  learned what generalizes within the half, not which 8-mers it saw.

Usage::

    python -m difftilt.benchmarks.sequences_pretrained            # 1,000 Ehrlich and 10,000 TFBind8 samples
    python -m difftilt.benchmarks.sequences_pretrained --only ehrlich --ehrlich-model benchmarks/models/ehrlich-20-64-4-4
    python -m difftilt.benchmarks.sequences_pretrained --only tfbind8 --tfbind8-holdout 0.1   # + ~20 min of training

With ``--only`` and no ``--out``, the part run replaces its entries in the committed
``benchmarks/results/sequences_pretrained.json`` and the other part's are kept (it used to
be overwritten with the one part). Options and paths are checked before any sampling.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from difftilt.core.errors import CheckpointError, ConfigError
from difftilt.plugins.sequences.mdlm import MaskedDiffusionProcess, masked_diffusion_loss
from difftilt.plugins.sequences.pretrain import train_masked_diffusion
from difftilt.plugins.sequences import EhrlichFunction, TFBind8, load_ehrlich, load_pretrained, load_tfbind8

from .common import check_output, main_exit, positive_int

DEFAULT_OUT = "benchmarks/results/sequences_pretrained.json"
#: The entries of the results file each ``--only`` part writes.
PARTS = {"ehrlich": ("ehrlich",), "tfbind8": ("tfbind8", "tfbind8_holdout", "tfbind8_learnable")}


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
        check_ehrlich_model(model)
        process, spec = load_pretrained(model), json.loads((Path(model) / "process.json").read_text())["data"]
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


def check_ehrlich_model(model: str) -> None:
    """Refuse, before any work, a ``--ehrlich-model`` that is not a model folder made by
    ``difftilt pretrain`` on an Ehrlich corpus."""
    info = Path(model) / "process.json"
    if not info.is_file():
        raise CheckpointError(f"--ehrlich-model {model}: not a pretrained model folder (no process.json; "
                              "make one with difftilt pretrain)")
    try:
        data = json.loads(info.read_text()).get("data") or {}
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointError(f"--ehrlich-model {model}: unreadable process.json ({err})") from None
    if data.get("name") != "ehrlich":
        raise ConfigError(f"{model} was not pretrained on an Ehrlich corpus (data: {data.get('name')})")


def holdout_fraction(text: str) -> float:
    """``--tfbind8-holdout``: a fraction in (0, 1), checked when parsed rather than after the sampling."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {value:g}")
    return value


def merged_results(results: dict, out: str | None, only: str | None) -> tuple[Path, dict]:
    """Where to write ``results``, and what: with ``--only`` and no ``--out``, the committed
    file's entries with this part's replaced (the other part's kept); else ``results`` at
    ``out`` (default :data:`DEFAULT_OUT`)."""
    if out is not None or only is None:
        return Path(out or DEFAULT_OUT), results
    path = Path(DEFAULT_OUT)
    kept = {}
    if path.is_file():
        try:
            kept = json.loads(path.read_text())
        except ValueError as err:
            raise ConfigError(f"{path} is not JSON ({err}); give --out to write the {only} part elsewhere") from None
    return path, {**{k: v for k, v in kept.items() if k not in PARTS[only]}, **results}


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


def tfbind8_holdout_report(fraction: float, n: int, seed: int, train: dict | None = None,
                           progress: bool = True, nelbo_repeats: int = 20) -> dict:
    """Retrain the embedded TFBind8 model's config on the lower half less a random ``fraction``
    of it, then compare the held-out 8-mers with the fitted ones.

    A model that learned which 8-mers it saw gives the held-out ones a higher NELBO and
    samples them less often (per 8-mer) than the fitted ones; a model that learned only what
    generalizes within the half treats them alike. ``train`` overrides the embedded model's
    training settings (tests use a tiny one); ``nelbo_repeats``: Monte Carlo draws of the
    NELBO per 8-mer.
    """
    if not 0 < fraction < 1:
        raise SystemExit(f"--tfbind8-holdout must be in (0, 1), got {fraction}")
    info = load_tfbind8().pretrained_info
    table = TFBind8()
    half = table.offline_dataset()
    perm = torch.randperm(half.shape[0], generator=torch.Generator().manual_seed(seed))
    n_held = round(fraction * half.shape[0])
    held, fit = half[perm[:n_held]], half[perm[n_held:]]
    settings = {**info["train"], **(train or {})}
    net, _ = train_masked_diffusion(fit, 4, progress=progress, **settings)
    process = MaskedDiffusionProcess(net, **info["process"])
    upper = table.from_index(torch.tensor(sorted(set(range(4**8)) - set(table.index(half).tolist()))))
    parts = {"fit": fit, "held_out": held, "upper": upper}
    nelbo = {name: _nelbo(process, data, seed, nelbo_repeats) for name, data in parts.items()}
    drawn = table.index(_sample(process, n, seed))
    share = {name: float(torch.isin(drawn, table.index(data)).float().mean()) for name, data in parts.items()}
    # samples per 8-mer of the part, relative to the fitted part's: 1 = alike
    ratio = (share["held_out"] / held.shape[0]) / max(share["fit"] / fit.shape[0], 1e-12)
    out = {"fraction": fraction, "fitted": int(fit.shape[0]), "held_out": int(held.shape[0]), "train": settings,
           "nelbo": nelbo, "sample_share": share, "held_out_per_8mer_vs_fitted": ratio, "samples": n}
    print(f"\nTFBind8: the embedded model's config retrained on {fit.shape[0]} of the half's 8-mers, "
          f"{held.shape[0]} held out (seed {seed}), {n} samples")
    print(f"  NELBO, nats per sequence   fitted {nelbo['fit']:.3f}   held out {nelbo['held_out']:.3f}   "
          f"upper half {nelbo['upper']:.3f}")
    print(f"  samples landing on         fitted {share['fit']:.4f}   held out {share['held_out']:.4f}   "
          f"upper half {share['upper']:.4f}")
    print(f"  per 8-mer, held out / fitted  {ratio:.3f}   (1: the held-out 8-mers are drawn as often as the fitted ones)")
    return out


def tfbind8_learnable_reference(seed: int, folds: int = 5, epochs: int = 25, hidden: int = 256) -> dict:
    """How well can any model learn the lower half from examples? A reference for the
    TFBind8 model's figures.

    An MLP on the one-hot 8-mer learns ``P(x in the half | x)`` from all 65,536 8-mers,
    cross-fitted: each 8-mer's probability comes from the fit on the folds without it, so
    it never saw whether that 8-mer is in the half. The law ``q(x) ∝ P(in half | x)`` is
    then what a model that generalizes (and memorizes nothing) could reach: its mass on the
    half and its NLL on the half. The uniform law on the half (NLL ``log 32,768``) needs
    each 8-mer's membership by heart.
    """
    table = TFBind8()
    every = table.from_index(torch.arange(4**8))
    inside = (table(every) <= float(table(table.offline_dataset()).max())).float()
    x = torch.nn.functional.one_hot(every, 4).float().reshape(every.shape[0], -1)
    g = torch.Generator().manual_seed(seed)
    parts = torch.randperm(x.shape[0], generator=g).chunk(folds)
    prob = torch.empty(x.shape[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for k, held in enumerate(parts):
            fit = torch.cat([p for j, p in enumerate(parts) if j != k])
            net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(),
                                      torch.nn.Linear(hidden, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1))
            opt = torch.optim.Adam(net.parameters(), lr=1e-3)
            for _ in range(epochs):
                for batch in fit[torch.randperm(fit.shape[0], generator=g)].split(256):
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x[batch]).squeeze(-1),
                                                                                inside[batch])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            with torch.no_grad():
                prob[held] = torch.sigmoid(net(x[held]).squeeze(-1))
    q = prob / prob.sum()
    out = {"folds": folds, "epochs": epochs, "hidden": hidden,
           "accuracy": float(((prob > 0.5).float() == inside).float().mean()),
           "mass_on_half": float((q * inside).sum()),
           "nll_half": float(-torch.log(q[inside.bool()]).mean()),
           "entropy_uniform_half": math.log(int(inside.sum()))}
    print(f"\nTFBind8: what a model can learn of the half from examples (an MLP's P(in half | 8-mer), "
          f"cross-fitted on {folds} folds)")
    print(f"  membership accuracy         {out['accuracy']:.3f}   (8-mers it was not fitted on)")
    print(f"  the law q ∝ P(in half | x)  mass on the half {out['mass_on_half']:.4f}   NLL on the half "
          f"{out['nll_half']:.3f} nats   (uniform over the half: {out['entropy_uniform_half']:.3f})")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m difftilt.benchmarks.sequences_pretrained",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--ehrlich-samples", type=positive_int, default=1000)
    parser.add_argument("--tfbind8-samples", type=positive_int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ehrlich-model", default=None,
                        help="an Ehrlich model folder made by difftilt pretrain (default: the embedded one)")
    parser.add_argument("--only", choices=list(PARTS),
                        help="run one part; without --out its entries replace theirs in " + DEFAULT_OUT
                             + " and the other part's are kept")
    parser.add_argument("--tfbind8-holdout", type=holdout_fraction, default=None, metavar="F",
                        help="also retrain the TFBind8 model's config with a fraction F (in (0, 1)) of the half "
                             "held out, and fit the learnable reference (~25 min more on one core)")
    parser.add_argument("--out", default=None,
                        help=f"write the results as JSON here (default: {DEFAULT_OUT}, merged with --only)")
    args = parser.parse_args(argv)
    # checked before the sampling (and the holdout's ~25 minutes of training)
    if args.only == "ehrlich" and args.tfbind8_holdout is not None:
        raise ConfigError("--tfbind8-holdout is part of the tfbind8 report; drop --only ehrlich")
    if args.ehrlich_model is not None and args.only in (None, "ehrlich"):
        check_ehrlich_model(args.ehrlich_model)
    check_output(args.out or DEFAULT_OUT, "--out")
    merged_results({}, args.out, args.only)  # a committed file that cannot be merged into: now
    results = {}
    if args.only in (None, "ehrlich"):
        results["ehrlich"] = ehrlich_report(args.ehrlich_samples, args.seed, args.ehrlich_model)
    if args.only in (None, "tfbind8"):
        results["tfbind8"] = tfbind8_report(args.tfbind8_samples, args.seed)
        if args.tfbind8_holdout is not None:
            results["tfbind8_holdout"] = tfbind8_holdout_report(args.tfbind8_holdout, args.tfbind8_samples, args.seed,
                                                                progress=sys.stderr.isatty())
            results["tfbind8_learnable"] = tfbind8_learnable_reference(args.seed)
    out, written = merged_results(results, args.out, args.only)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(written, indent=2) + "\n")
    kept = sorted(set(written) - set(results))
    print(f"\nwrote {out}" + (f" (kept its {', '.join(kept)} entries)" if kept else ""))
    return 0

if __name__ == "__main__":
    raise SystemExit(main_exit(main))
