"""The sequences domain: masked discrete diffusion over proteins and DNA, as a difftilt plugin.

Processes (``process: {name: ...}``):

* ``ehrlich`` -- the default model, pretrained on the feasible-sequence model of
  Ehrlich(num_states=20, length=32, num_motifs=2, motif_length=4, seed=0);
* ``tfbind8`` -- the default model, pretrained on the lower half of TFBind8;

(both read from ``checkpoints/<name>/``, written by ``difftilt pretrain
configs/pretrain_<name>.yaml``; a missing one is a clear error naming that command);
* ``pretrained`` -- any folder written by ``difftilt pretrain``.

Rewards (``reward: {name: ...}``): ``ehrlich`` (an Ehrlich function instance, feasibility
included), ``tfbind8`` (exact table lookup), ``esm`` (ESM-2 mean log-probability or
pseudo-log-likelihood, weights from a local file), ``protein_descriptor`` and
``descriptor_constraint`` (biopython hydrophobicity, charge, instability), ``function``
(your own function of sequence strings) and ``lab`` (a lab in the loop through a CSV file
of sequences and measured values). All read the final one-hot states; a position still
masked makes a design infeasible.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor, nn

from difftilt.core.errors import ConfigError
from difftilt.core.plugins import Domain
from difftilt.core.process import Process
from difftilt.core.reward import Reward, RewardOutput

from .alphabets import DNA, PROTEIN, default_alphabet, sequence_lengths, to_strings, token_ids
from .descriptors import DescriptorConstraint, ProteinDescriptor
from .ehrlich import EhrlichFunction
from .function_reward import FunctionReward, lab
from .mdlm import MaskedDiffusionProcess
from .plm import ESMReward
from .pretrain import is_pretrained_folder, load_pretrained
from .tfbind8 import TFBind8

__all__ = ["SequencesDomain", "EhrlichReward", "TFBind8Reward", "OneHotFeatures", "BothStrands", "PROTEIN", "DNA",
           "checkpoint_path", "load_ehrlich", "load_tfbind8", "load_from_path", "hamming_diversity"]



def checkpoint_path(name: str) -> Path:
    """Folder of a committed pretrained model, e.g. ``"ehrlich-20-32-2-4"``."""
    path = Path(str(resources.files("difftilt.plugins.sequences") / "checkpoints" / name))
    if not (path / "process.json").is_file():
        raise ConfigError(f"no committed pretrained model '{name}' (looked in {path}); "
                          "make it with: difftilt pretrain plugins/sequences/configs/pretrain_<name>.yaml")
    return path


def load_ehrlich(num_steps: int | None = None) -> MaskedDiffusionProcess:
    """The default Ehrlich(20, 32, 2, 4, seed 0) model (committed checkpoint)."""
    return load_pretrained(checkpoint_path("ehrlich-20-32-2-4"), num_steps)


def load_tfbind8(num_steps: int | None = None) -> MaskedDiffusionProcess:
    """The default TFBind8 model, pretrained on the table's lower half (committed checkpoint)."""
    return load_pretrained(checkpoint_path("tfbind8"), num_steps)


def load_from_path(path: str, num_steps: int | None = None, sampler: str | None = None) -> MaskedDiffusionProcess:
    """A model folder written by ``difftilt pretrain`` (``sampler``: ``ancestral`` or
    ``first_hit`` instead of the saved one)."""
    return load_pretrained(path, num_steps, sampler)


def _check_process(process: Process | None, length: int, vocab: int, what: str) -> None:
    if isinstance(process, MaskedDiffusionProcess) and (process.length, process.vocab_size) != (length, vocab):
        raise ConfigError(f"{what} scores sequences of length {length} over {vocab} letters, but the process makes "
                          f"length {process.length} over {process.vocab_size}")


class EhrlichReward(Reward):
    """An Ehrlich function (Stanton et al. 2024) on the chain's one-hot final states.

    Infeasible designs (a banned transition, or a position left masked) have no reward.
    """

    def __init__(self, num_states: int = 20, length: int = 32, num_motifs: int = 2, motif_length: int = 4,
                 quantization: int | None = None, seed: int = 0, process: Process | None = None):
        super().__init__()
        self.function = EhrlichFunction(num_states, length, num_motifs, motif_length, quantization, seed)
        _check_process(process, length, num_states, f"Ehrlich{(num_states, length, num_motifs, motif_length)}")

    def evaluate(self, x: Tensor) -> RewardOutput:
        ids, masked = token_ids(x, self.function.num_states)
        value, feasible = self.function(ids)
        return RewardOutput(value.to(x.dtype), feasible & ~masked)


class TFBind8Reward(Reward):
    """Normalized TFBind8 binding score (exact lookup; 1.0 is the table's optimum)."""

    def __init__(self, table: str = "SIX6_REF_R1", process: Process | None = None):
        super().__init__()
        self.table = TFBind8(table)
        _check_process(process, 8, 4, "TFBind8")

    def evaluate(self, x: Tensor) -> RewardOutput:
        ids, masked = token_ids(x, 4)
        return RewardOutput(self.table(ids).to(x.dtype), ~masked)


class OneHotFeatures(nn.Module):
    """``phi(x)``: the flattened letters of the one-hot state (the mask channel dropped),
    followed by the spaced letter-pair counts ``n(a, b, d) = sum_i x[i, a] x[i + d, b]``
    for gaps ``d = 1..max_gap`` (gapped k-mer composition, as in gkm-SVM), then the
    contiguous k-mer counts ``n(w) = sum_i prod_j x[i + j, w_j]`` for ``k = 3..max_kmer``.

    The counts do not depend on where in the sequence a pair or a word sits, so a reward
    model on them can learn "letters a and b at distance d score" or "the word GATA
    scores" from a few hundred answers -- the shape of Ehrlich motifs and of binding
    sites -- where the flattened one-hot alone would have to learn it once per position.
    Polynomial in ``x``, so differentiable in a relaxed (straight-through) state: reward
    models on it pass gradients back to the chain.

    Args:
        vocab_size: ``V``.
        max_gap: largest gap ``d`` (``0``: no pair counts).
        max_kmer: longest contiguous word counted (``V ** k`` features each; ``< 3``: none).
    """

    def __init__(self, vocab_size: int, max_gap: int = 0, max_kmer: int = 0):
        super().__init__()
        if max_gap < 0 or max_kmer < 0:
            raise ConfigError(f"max_gap and max_kmer must be >= 0, got {max_gap} and {max_kmer}")
        self.vocab_size, self.max_gap, self.max_kmer = vocab_size, max_gap, max_kmer

    def forward(self, x: Tensor) -> Tensor:
        letters = x[..., : self.vocab_size]
        b, L, _ = letters.shape
        feats = [letters.reshape(b, -1)]
        for d in range(1, min(self.max_gap, L - 1) + 1):
            feats.append(torch.einsum("bia,bic->bac", letters[:, :-d], letters[:, d:]).reshape(b, -1))
        for k in range(3, min(self.max_kmer, L) + 1):
            words = letters[:, : L - k + 1]  # (b, start, V ** j): the words of length j + 1 so far
            for j in range(1, k):
                words = (words[..., :, None] * letters[:, j : L - k + 1 + j, None, :]).reshape(b, L - k + 1, -1)
            feats.append(words.sum(1))
        return torch.cat(feats, dim=-1)


_COMPLEMENTS = {"A": "TU", "C": "G", "G": "C", "T": "A", "U": "A"}


def complement_order(letters: str) -> list[int]:
    """Each token's Watson-Crick complement in a nucleotide alphabet (``ACGT``: ``[3, 2, 1, 0]``;
    ``U`` for ``T`` in RNA); a clear error for any other alphabet."""
    index = {ch: i for i, ch in enumerate(letters.upper())}
    out = []
    for ch in letters.upper():
        comps = [index[c] for c in _COMPLEMENTS.get(ch, "") if c in index]
        if len(comps) != 1:
            raise ConfigError(f"reverse complement needs a nucleotide alphabet (A, C, G and T or U, each with "
                              f"one complement), got {letters!r}")
        out.append(comps[0])
    return out


class BothStrands(nn.Module):
    """``phi(x) + phi(rc(x))``: features of a DNA design read on both strands.

    ``rc`` reverses the positions and swaps each letter for its complement (the mask
    channel stays). A double-stranded binding site is the same molecule read from either
    end, so its score -- TFBind8's included, which gives both strands one value -- cannot
    tell ``x`` from ``rc(x)``; a reward model on these features cannot either, so each
    answer also teaches it the other strand's score. With :class:`OneHotFeatures` inside,
    the counts become counts over both strands (as gkm-SVM merges a k-mer with its
    reverse complement). Differentiable, like ``phi``. Its :meth:`canonical` makes the two
    strands one design for the online loop's no-repeat rule.

    Args:
        features: ``phi``.
        complement: token ``i``'s complement (see :func:`complement_order`).
    """

    def __init__(self, features: nn.Module, complement: list[int]):
        super().__init__()
        self.features = features
        self.register_buffer("order", torch.tensor([*complement, len(complement)]), persistent=False)  # mask stays

    def reverse_complement(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.order.numel():
            raise ConfigError(f"BothStrands: states have {x.shape[-1]} channels, the alphabet "
                              f"{self.order.numel() - 1} letters and the mask")
        return x[..., self.order].flip(-2)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x) + self.features(self.reverse_complement(x))

    def canonical(self, x: Tensor) -> Tensor:
        """One strand of each design, the same for ``x`` and ``rc(x)``: the one whose token
        ids come first in lexicographic order. The online loop keys designs by it, so it
        never spends a query on the other strand of a design it has asked about."""
        rc = self.reverse_complement(x)
        a, b = x.argmax(-1), rc.argmax(-1)
        differs = a != b
        first = differs.float().argmax(-1, keepdim=True)  # first position where the strands differ
        use_rc = differs.any(-1) & (b.gather(-1, first) < a.gather(-1, first)).squeeze(-1)
        return torch.where(use_rc.view(-1, *[1] * (x.dim() - 1)), rc, x)


def hamming_diversity(x: Tensor, max_samples: int = 512) -> float:
    """Mean pairwise Hamming distance between (up to 512) sequences, as a fraction of the length."""
    ids = x.detach().argmax(-1)[:max_samples]
    n = ids.shape[0]
    if n < 2:
        return 0.0
    same = (ids[:, None, :] == ids[None, :, :]).float().mean(-1)
    return float((1.0 - same).sum() / (n * (n - 1)))


def _pad_id(process: Process | None) -> int | None:
    """The padding letter's token id of a padded sequence model, else ``None``."""
    if isinstance(process, MaskedDiffusionProcess) and process.pad is not None:
        return process.alphabet.index(process.pad)
    return None


def _cut_at_first_pad(ids: Tensor, pad: int) -> Tensor:
    """Token ids ``(b, L)`` with every position after a row's first pad made a pad: the
    sequence the row starts with."""
    return ids.masked_fill((ids == pad).cummax(-1).values, pad)


class SequencesDomain(Domain):
    """Masked discrete diffusion over biological sequences (proteins, DNA)."""

    name = "sequences"
    description = "masked discrete diffusion over proteins/DNA (Ehrlich, TFBind8, ESM-2, your own function)"
    processes = {"ehrlich": load_ehrlich, "tfbind8": load_tfbind8, "pretrained": load_from_path}
    rewards = {"ehrlich": EhrlichReward, "tfbind8": TFBind8Reward, "esm": ESMReward,
               "protein_descriptor": ProteinDescriptor, "descriptor_constraint": DescriptorConstraint,
               "function": FunctionReward, "lab": lab}

    def make_policy(self, reference: Process, hidden: int = 64, depth: int = 2) -> Process | None:
        """Fine-tune a full copy of the denoiser (as DRAKES does)."""
        if isinstance(reference, MaskedDiffusionProcess):
            return copy.deepcopy(reference).requires_grad_(True).train(False)
        return None

    def mutate(self, x: Tensor, *, generator: torch.Generator, rate: float | None = None,
               count: int | None = None, process: Process | None = None) -> Tensor:
        """Point mutations of one-hot sequences ``(b, L, V + 1)``: each position redrawn with
        probability ``rate`` (default ``1 / L``), or exactly ``count`` distinct positions per
        sequence, always to a different letter (never the mask). With a padded ``process``
        the sites are a design's letters and its end (if shorter than the model's length),
        and an edit at a letter is, with equal odds, another letter there, its deletion, or
        a new letter inserted before it (not the same letter again; a full design loses its
        last letter); at the end, a letter appended. The rate's default is one over the
        sites; the result is letters then padding, never empty, and one edit always changes
        a design."""
        pad = _pad_id(process)
        if pad is not None:
            return self._mutate_padded(x, generator, rate, count, pad)
        b, L, S = x.shape
        V = S - 1
        if count is not None:
            scores = torch.rand(b, L, generator=generator)
            chosen = torch.zeros(b, L, dtype=torch.bool)
            chosen.scatter_(1, scores.argsort(1)[:, : min(count, L)], True)
        else:
            chosen = torch.rand(b, L, generator=generator) < (1.0 / L if rate is None else rate)
        ids = x.argmax(-1)
        shift = torch.randint(1, V, (b, L), generator=generator)  # a different letter: (id + shift) mod V
        new = torch.where(chosen, (ids.clamp(max=V - 1) + shift) % V, ids)
        return nn.functional.one_hot(new, S).to(x.dtype)

    @staticmethod
    def _mutate_padded(x: Tensor, generator: torch.Generator, rate: float | None, count: int | None,
                       pad: int) -> Tensor:
        b, L, S = x.shape
        ids = x.argmax(-1).clamp(max=pad).cpu()
        n = sequence_lengths(ids, pad)[:, None]
        pos = torch.arange(L)
        site = pos <= n  # the letters and, if there is room, the end
        if count is not None:
            scores = torch.rand(b, L, generator=generator).masked_fill(~site, 2.0)
            chosen = torch.zeros(b, L, dtype=torch.bool)
            chosen.scatter_(1, scores.argsort(1)[:, : min(count, L)], True)
            chosen &= site
        else:
            p = 1.0 / site.sum(-1, keepdim=True) if rate is None else torch.full((b, 1), float(rate))
            chosen = (torch.rand(b, L, generator=generator) < p) & site
        letters = pad  # the pad is the last letter: ids 0..pad-1 are the sequence letters
        kind = torch.randint(0, 3, (b, L), generator=generator)  # at a letter: 0 another letter, 1 deleted, 2 insertion
        other = (ids.clamp(max=letters - 1) + torch.randint(1, letters, (b, L), generator=generator)) % letters
        any_letter = torch.randint(0, letters, (b, L), generator=generator)
        is_letter = pos < n
        deleted = chosen & is_letter & (kind == 1)
        empty = deleted.sum(-1, keepdim=True) == n  # every letter deleted: those edits are substitutions
        deleted &= ~empty
        inserted = chosen & ((pos == n) | (kind == 2))
        substituted = chosen & is_letter & ~deleted & ~inserted
        kept = is_letter & ~deleted
        # before a letter the new one differs from it, so one edit always changes the design
        new_letter = torch.where(is_letter, other, any_letter)
        letter = torch.where(substituted, other, ids)
        # each position emits its inserted letter (if any), then its own letter (if kept)
        emitted = inserted.long() + kept.long()
        start = emitted.cumsum(-1) - emitted
        out = torch.full((b, 2 * L + 1), pad, dtype=ids.dtype)  # column 2L takes what is not emitted
        out.scatter_(1, torch.where(inserted, start, 2 * L), new_letter)
        out.scatter_(1, torch.where(kept, start + inserted.long(), 2 * L), letter)
        out = out[:, :L]  # an insertion into a full design drops its last letter
        return nn.functional.one_hot(out, S).to(x)

    def crossover(self, a: Tensor, b: Tensor, *, generator: torch.Generator, process: Process | None = None) -> Tensor:
        """Uniform crossover; with a padded ``process`` each child ends at its first pad."""
        child = super().crossover(a, b, generator=generator)
        pad = _pad_id(process)
        if pad is None:
            return child
        return nn.functional.one_hot(_cut_at_first_pad(child.argmax(-1), pad), child.shape[-1]).to(child)

    def featurizer(self, reference: Process, reverse_complement: bool = False) -> nn.Module | None:
        """:class:`OneHotFeatures` with gaps up to 16 and contiguous words up to 4 letters where
        there are few of them (DNA: 64 + 256); ``reverse_complement``: read on both strands
        (:class:`BothStrands`; nucleotide alphabets only)."""
        if not isinstance(reference, MaskedDiffusionProcess):
            if reverse_complement:
                raise ConfigError("features.reverse_complement needs a masked-diffusion sequence model")
            return None
        kmer = max((k for k in (3, 4) if reference.vocab_size**k <= 1024), default=0)
        phi = OneHotFeatures(reference.vocab_size, max_gap=min(16, reference.length - 1), max_kmer=kmer)
        if reverse_complement:
            if reference.pad is not None:  # the other strand of a shorter design would start with padding
                raise ConfigError(f"features.reverse_complement reads designs of one length; this model pads "
                                  f"shorter ones with {reference.pad!r} (its alphabet {reference.alphabet!r})")
            letters = reference.alphabet or default_alphabet(reference.vocab_size)
            phi = BothStrands(phi, complement_order(letters))
        return phi

    def decode(self, x: Tensor, process: Process | None = None) -> list[str]:
        """Sequences as strings, in ``process``'s alphabet with its padding cut off when it is a
        sequence model; otherwise in the default alphabet of the states' size."""
        if isinstance(process, MaskedDiffusionProcess):
            return process.decode(x)
        return to_strings(x.argmax(-1).tolist(), default_alphabet(x.shape[-1] - 1))

    def diversity(self, x: Tensor) -> float:
        return hamming_diversity(x)

    def evaluate(self, x: Tensor, *, process: Process, reward: Reward, alpha: float) -> dict[str, float]:
        out = reward(x)
        return {"feasible": float(out.feasible.float().mean()), "hamming_diversity": hamming_diversity(x)}

    # ------------------------------------------------------------------ pretraining
    def pretrain(self, config: dict, progress: bool = True, output: str | None = None,
                 command: str | None = None, resume: bool = False) -> Path:
        from .pretrain_cli import pretrain_from_config

        return pretrain_from_config(config, progress=progress, output=output, command=command, resume=resume)

    def describe_folder(self, path) -> list[str] | None:
        from .pretrain import describe_pretraining

        return describe_pretraining(path)

    def load_folder(self, path) -> MaskedDiffusionProcess | None:
        """A model folder written by ``difftilt pretrain`` (e.g. ``checkpoints/tfbind8``)."""
        return load_pretrained(path) if is_pretrained_folder(path) else None
