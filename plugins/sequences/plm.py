"""Protein-language-model rewards: the likelihood of a design under ESM-2 (via fair-esm).

ESM-2 (Lin et al. 2023, "Evolutionary-scale prediction of atomic-level protein
structure with a language model", Science 379:1123) is a masked language model over
protein sequences; how likely it finds a sequence is a cheap, widely used proxy for
"looks like a natural protein". :class:`ESMReward` scores a one-hot design
``x: (b, L, V + 1)`` (letter ``i`` is ``letters[i]``, the last channel the mask token) by
one of two per-residue averages over the ``L`` positions:

* ``mean_logprob`` -- one forward pass on the whole sequence,
  ``(1 / L) sum_l log p(x_l | x)``: the log-softmax of ESM's logits over its full
  vocabulary at residue ``l``, read at the observed residue. Cheap (one pass) and
  differentiable in a relaxed (straight-through) one-hot ``x`` (see below).
* ``pseudo_log_likelihood`` -- the pseudo-log-likelihood, each residue masked in turn,
  ``(1 / L) sum_l log p(x_l | x_{-l})``: ``L`` forward passes per design (run as batched
  masked copies, ``batch_size`` rows at a time). The better-calibrated score; not
  differentiable.

Both are ``<= 0``; higher is more natural. A design with a position still masked
(token id ``V``) is infeasible. A model of variable-length proteins (a padding letter) is
read as ESM reads a batch of them: BOS, the design's letters, EOS, then ESM's padding,
which attention ignores; the averages run over the letters, so each design scores what
its unpadded sequence does. A design that is not letters-then-padding is infeasible.

Differentiable path (``mean_logprob`` on an :class:`esm.ESM2` model): the letters of
``x`` are mapped to ESM's vocabulary with a fixed 0/1 matrix ``(V, n_esm)``, BOS/EOS
one-hots are added, and the token embeddings are ``one_hot @ embed_tokens.weight``;
ESM2's forward pass is then run from these embeddings (embedding scale, token-dropout
rescaling, the transformer layers, final layer norm, LM head), exactly as
``ESM2.forward`` does from token ids. The observed residue's log-probability is read
as ``sum_v one_hot_v * log_softmax(logits)_v``, so a gradient reaches ``x`` both through
the model input and through the read-out. On hard one-hot inputs the value equals the
token-id path.

Designs are read in the process's alphabet by default, as the descriptors read them (see
:func:`~difftilt.plugins.sequences.descriptors.protein_letters`): explicit ``letters``
other than the process's, or a nucleotide alphabet, are refused.

Weights are read from a local fair-esm checkpoint only (e.g. ``esm2_t6_8M_UR50D.pt`` as
distributed); nothing is ever downloaded. The co-located ``<name>-contact-regression.pt``
is optional: it only serves contact prediction, which this reward does not use, so one
that cannot be read or does not fit the model is skipped with a warning naming it.
"""

from __future__ import annotations

import argparse
import pickle
import re
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from difftilt.core.errors import ConfigError, InputDataError, OptionalDependencyError
from difftilt.core.process import Process
from difftilt.core.reward import Reward, RewardOutput

from .alphabets import sequence_lengths, well_padded
from .descriptors import protein_letters

__all__ = ["ESMReward", "load_esm_checkpoint"]


# ESM-2's token-dropout training mask ratio (15% of positions chosen, 80% of those masked).
_MASK_RATIO_TRAIN = 0.15 * 0.8


def _import_esm():
    try:
        import esm
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise OptionalDependencyError("ESMReward needs fair-esm: pip install 'difftilt[sequences]'") from e
    return esm


def _safe_load(path: Path, what: str = "ESM weights") -> dict:
    """``torch.load`` of a fair-esm file with ``weights_only=True`` (``argparse.Namespace`` allowed:
    fair-esm checkpoints store their config as one). Never unpickles arbitrary objects.

    Every failure is one :class:`ConfigError` line. Only a pickle that torch's safe unpickler
    refused (an ``Unsupported global``) can be loaded by trusting the file, so only then is
    building the model yourself suggested; any other file (text, FASTA, empty, truncated)
    is simply not a torch checkpoint, whatever torch's internal error (a ``KeyError`` or
    ``IndexError`` on text, an empty ``EOFError`` on an empty file).
    """
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder, not a file (give the .pt checkpoint inside it)")
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    if path.stat().st_size == 0:
        raise ConfigError(f"{what} {path} is not a torch checkpoint (the file is empty)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises whatever its unpickler hits on a file that is not a checkpoint
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        refused = next((ln for ln in lines if "Unsupported global" in ln), None)
        if isinstance(e, pickle.UnpicklingError) and refused is not None:
            why = refused.split(" was not an allowed global")[0].removeprefix("WeightsUnpickler error: ")
            raise ConfigError(f"cannot read {what} {path} with torch.load(weights_only=True) ({why}); if you "
                              "trust the file, build the model yourself and pass ESMReward(model=..., alphabet=...)"
                              ) from None
        detail = next((ln for ln in lines if "Unsupported" in ln), None)
        if detail is None and lines and not isinstance(e, LookupError):  # a KeyError's text is a stray byte
            detail = lines[0]
        why = (f"{detail.removeprefix('WeightsUnpickler error: ')[:120]}" if detail
               else f"torch.load failed with {type(e).__name__}")
        with path.open("rb") as f:
            head = f.read(64)
        if b"\0" not in head:
            try:
                why = f"it is a text file, starting {head.decode().splitlines()[0][:40]!r}"
            except (UnicodeDecodeError, IndexError):
                pass
        raise ConfigError(f"{what} {path} is not a torch checkpoint ({why})") from None


def _first_error(e: Exception) -> str:
    """One line of a model-building error: a ``load_state_dict`` error lists every mismatched
    tensor (dozens of lines for a config that does not fit the weights); keep the first and
    a count."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    details = lines[1:] if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict") else lines
    first, more = details[0], len(details) - 1
    keys = re.fullmatch(r"((?:Missing|Unexpected) key\(s\) in state_dict: )\{(.*)\}\.?", first)
    if keys:  # a set of every missing (or unexpected) tensor name
        names = keys.group(2).split(", ")
        first, more = keys.group(1) + names[0], more + len(names) - 1
    return first + (f" (and {more} more)" if more else "")


def _check_layout(path: Path, data) -> None:
    """:class:`ConfigError` unless ``data`` is laid out as fair-esm's loaders read it, which
    otherwise fail with a bare ``KeyError`` (``'model'``) or ``TypeError``."""
    if not isinstance(data, dict) or "model" not in data or not ({"cfg", "args"} & set(data)):
        raise ConfigError(f"{path} is not a fair-esm checkpoint (expected a dict with 'model' and 'cfg' or 'args')")
    if not isinstance(data["model"], dict):
        raise ConfigError(f"{path}: 'model' must be the weights (a dict of tensors), got "
                          f"{type(data['model']).__name__}")
    if "cfg" in data and "args" not in data:
        cfg = data["cfg"]
        model = cfg.get("model") if isinstance(cfg, dict) else None
        keys = ("encoder_layers", "encoder_embed_dim", "encoder_attention_heads", "token_dropout")
        if model is None:
            raise ConfigError(f"{path}: 'cfg' must be a dict with a 'model' entry (an ESM-2 config), got "
                              f"{cfg!r:.60}")
        missing = [k for k in keys if not hasattr(model, k)]
        if missing:
            raise ConfigError(f"{path}: cfg['model'] lacks {', '.join(missing)} (an ESM-2 config has "
                              f"{', '.join(keys)})")


def load_esm_checkpoint(path: str | Path):
    """``(model, alphabet)`` from a local fair-esm checkpoint ``.pt``; never downloads.

    Does what ``esm.pretrained.load_model_and_alphabet_local`` does, with two differences:
    the files are read with ``weights_only=True`` (fair-esm 2.0's own ``torch.load`` fails on
    torch >= 2.6, whose default became ``weights_only=True``, on the ``argparse.Namespace`` in
    the checkpoint), and a missing ``<stem>-contact-regression.pt`` is allowed (fair-esm
    raises; the regression only serves contact prediction), an unreadable or misfit one
    skipped with a warning that names it. Every failure is one :class:`ConfigError` line. The ESM-2 branch of fair-esm's
    loader is chosen by the file name starting with ``esm2``; a renamed ESM-2 file (one with
    a ``cfg`` entry) is routed there too.
    """
    esm = _import_esm()
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"ESM weights file not found: {path} (weights are read from a local file and "
                          "never downloaded; get e.g. esm2_t6_8M_UR50D.pt from fair-esm's release)")
    data = _safe_load(path)
    _check_layout(path, data)
    name = path.stem
    if "cfg" in data and "args" not in data and not name.startswith("esm2"):
        name = "esm2_" + name
    regression_path = path.with_name(path.stem + "-contact-regression.pt")
    regression = None
    if regression_path.is_file():
        try:
            regression = _safe_load(regression_path, "ESM contact regression")
            if not isinstance(regression, dict) or not isinstance(regression.get("model"), dict):
                raise ConfigError(f"ESM contact regression {regression_path} is not a fair-esm file (no 'model' dict)")
        except ConfigError as e:
            warnings.warn(f"{e}; skipped (it only serves contact prediction)", stacklevel=2)
            regression = None

    def build(regression):
        weights = dict(data, model=dict(data["model"]))  # fair-esm updates it in place with the regression
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Regression weights not found")
            return esm.pretrained.load_model_and_alphabet_core(name, weights, regression)

    try:
        return build(regression)
    except Exception as e:  # fair-esm fails with whatever a wrong config or state dict raises
        if regression is not None:  # the weights may be fine and the optional regression not fit them
            try:
                model, alphabet = build(None)
            except Exception:
                pass
            else:
                warnings.warn(f"ESM contact regression {regression_path} does not fit the model "
                              f"({_first_error(e)}); skipped (it only serves contact prediction)", stacklevel=2)
                return model, alphabet
        raise ConfigError(f"cannot build an ESM model from {path}: {_first_error(e)}") from None


class ESMReward(Reward):
    """ESM-2 log-likelihood of a one-hot design, per residue (see the module docstring).

    Args:
        weights: path of a local fair-esm checkpoint (``esm2_t6_8M_UR50D.pt``, ...).
        model: a ready model instead (e.g. an :class:`esm.ESM2`); ``alphabet`` defaults to
            ``model.alphabet``.
        alphabet: the model's :class:`esm.data.Alphabet`.
        score: ``"mean_logprob"`` (one pass, differentiable) or ``"pseudo_log_likelihood"``.
        letters: the design alphabet; token ``i`` of ``x`` is ``letters[i]``. By default the
            process's alphabet (without its padding letter), else ``PROTEIN``; explicit
            letters must be the process's.
        batch_size: rows per ESM forward pass (designs, or masked copies for the PLL).
        process: the chain, whose alphabet the designs are read in (a padded model's
            alphabet is ``letters`` and its padding letter).

    ``evaluate(x)``: ``x`` is ``(b, L, len(letters) + 1)`` (``+ 2`` padded); returns values ``(b,)``.
    """

    differentiable = True

    def __init__(self, weights: str | None = None, model: nn.Module | None = None, alphabet=None,
                 score: Literal["mean_logprob", "pseudo_log_likelihood"] = "mean_logprob",
                 letters: str | None = None, batch_size: int = 32, process: Process | None = None):
        super().__init__()
        esm = _import_esm()
        if score not in ("mean_logprob", "pseudo_log_likelihood"):
            raise ConfigError(f"unknown ESM score '{score}'; choose 'mean_logprob' or 'pseudo_log_likelihood'")
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if (weights is None) == (model is None):
            raise ConfigError("ESMReward needs exactly one of weights (a local fair-esm .pt file) or model")
        if weights is not None:
            model, alphabet = load_esm_checkpoint(weights)
        alphabet = alphabet if alphabet is not None else getattr(model, "alphabet", None)
        if alphabet is None:
            raise ConfigError("ESMReward got a model but no alphabet (pass alphabet=...)")
        letters, self.pad = protein_letters(process, letters, type(self).__name__)
        unknown = [c for c in letters if c not in alphabet.tok_to_idx]
        if unknown:
            raise ConfigError(f"letters {''.join(unknown)!r} are not in the ESM alphabet")

        self.model = model.eval().requires_grad_(False)
        self.score = score
        self.letters = letters
        self.batch_size = int(batch_size)
        self.differentiable = score == "mean_logprob" and isinstance(model, esm.ESM2)
        self.cls_idx, self.eos_idx, self.mask_idx = alphabet.cls_idx, alphabet.eos_idx, alphabet.mask_idx
        self.padding_idx = alphabet.padding_idx
        self.prepend_bos, self.append_eos = bool(alphabet.prepend_bos), bool(alphabet.append_eos)
        self.n_esm = len(alphabet)
        esm_ids = torch.tensor([alphabet.get_idx(c) for c in letters])
        self.register_buffer("esm_ids", esm_ids, persistent=False)  # (V,)
        to_esm = nn.functional.one_hot(esm_ids, self.n_esm).float()  # (V, n_esm) 0/1: our letter -> ESM token
        self.register_buffer("to_esm", to_esm, persistent=False)

    @property
    def name(self) -> str:
        return f"ESMReward[{self.score}]"

    def train(self, mode: bool = True) -> "ESMReward":
        """The language model stays in eval mode (it is frozen)."""
        super().train(mode)
        self.model.eval()
        return self

    # ------------------------------------------------------------------ helpers
    def _check(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Letter ids ``(b, L)`` (masked positions and padding clamped to a letter), ``unscored``
        ``(b,)`` (a position still masked, or, padded, not letters-then-padding) and each
        design's length ``n`` ``(b,)`` (its letters before the first pad; ``L`` unpadded)."""
        V = len(self.letters) + (self.pad is not None)
        if x.ndim != 3 or x.shape[-1] != V + 1 or x.shape[1] < 1:
            letters = self.letters + (self.pad or "")
            raise InputDataError(f"ESMReward expects one-hot sequences (b, L, {V + 1}) over '{letters}' + mask, "
                                 f"got shape {tuple(x.shape)}")
        ids = x.argmax(-1)
        unscored = (ids >= V).any(-1)
        n = torch.full_like(unscored, x.shape[1], dtype=torch.long)
        if self.pad is not None:
            pad_id = len(self.letters)
            unscored |= ~well_padded(ids, pad_id)
            n = sequence_lengths(ids, pad_id).clamp(min=1)
        return ids.clamp(max=len(self.letters) - 1), unscored, n

    def esm_tokens(self, ids: Tensor, n: Tensor) -> Tensor:
        """ESM token ids ``(b, T)`` (``T = L + bos + eos``) of letter ids ``(b, L)``: BOS, the
        first ``n`` ``(b,)`` letters, EOS, then ESM's padding."""
        b, L = ids.shape
        inner = self.esm_ids[ids].masked_fill(torch.arange(L, device=ids.device) >= n[:, None], self.padding_idx)
        parts = [inner.new_full((b, 1), self.cls_idx)] if self.prepend_bos else []
        tokens = torch.cat([*parts, inner, inner.new_full((b, 1), self.padding_idx)], 1)
        if self.append_eos:
            tokens[torch.arange(b, device=ids.device), n + int(self.prepend_bos)] = self.eos_idx
        return tokens if self.append_eos else tokens[:, :-1]

    def _logits_from_embeddings(self, one_hot: Tensor, padding: Tensor) -> Tensor:
        """ESM2's forward pass from one-hot (or relaxed) ESM tokens ``(n, T, n_esm)`` without
        mask tokens, ``padding`` ``(n, T)`` marking ESM's padding; returns logits
        ``(n, T, n_esm)``. Mirrors ``ESM2.forward``."""
        m = self.model
        weight = m.embed_tokens.weight
        h = m.embed_scale * (one_hot.to(weight.dtype) @ weight)
        if m.token_dropout:  # no mask tokens: ESM2 rescales by (1 - 0.12) / (1 - 0)
            h = h * (1 - _MASK_RATIO_TRAIN) / 1.0
        h = (h * (~padding).unsqueeze(-1).to(h.dtype)).transpose(0, 1)  # (T, n, E)
        mask = padding if padding.any() else None
        for layer in m.layers:
            h, _ = layer(h, self_attn_padding_mask=mask, need_head_weights=False)
        h = m.emb_layer_norm_after(h).transpose(0, 1)
        return m.lm_head(h)

    # ------------------------------------------------------------------ scores
    def _letters(self, ids: Tensor, n: Tensor) -> tuple[slice, Tensor]:
        """The letters' columns of ESM's tokens and which of them hold letters ``(b, L)``."""
        offset = int(self.prepend_bos)
        return slice(offset, offset + ids.shape[1]), torch.arange(ids.shape[1], device=ids.device) < n[:, None]

    def _mean_logprob_tokens(self, ids: Tensor, n: Tensor) -> Tensor:
        """``mean_l log p(x_l | x)`` over each design's ``n`` letters, from letter ids ``(b, L)``
        via ``model(tokens)``; ``(b,)``."""
        tokens = self.esm_tokens(ids, n)
        cols, is_letter = self._letters(ids, n)
        out = []
        for chunk, keep in zip(tokens.split(self.batch_size), is_letter.split(self.batch_size)):
            logp = self.model(chunk)["logits"].float().log_softmax(-1)[:, cols]
            read = logp.gather(-1, chunk[:, cols, None]).squeeze(-1)
            out.append((read * keep).sum(-1) / keep.sum(-1))
        return torch.cat(out)

    def _mean_logprob_relaxed(self, letters: Tensor, ids: Tensor, n: Tensor) -> Tensor:
        """``mean_l log p(x_l | x)`` over each design's ``n`` letters, from letter one-hots
        ``(b, L, V)``, differentiable; ``(b,)``."""
        tokens = self.esm_tokens(ids, n)
        cols, is_letter = self._letters(ids, n)
        one_hot = letters.to(self.to_esm.dtype) @ self.to_esm  # (b, L, n_esm)
        full = nn.functional.one_hot(tokens, self.n_esm).to(one_hot.dtype)  # BOS, EOS and padding: constants
        full = torch.cat([full[:, : cols.start], torch.where(is_letter[..., None], one_hot, full[:, cols]),
                          full[:, cols.stop:]], 1)
        out = []
        for f, oh, t, keep in zip(full.split(self.batch_size), one_hot.split(self.batch_size),
                                  tokens.split(self.batch_size), is_letter.split(self.batch_size)):
            logp = self._logits_from_embeddings(f, t.eq(self.padding_idx)).float().log_softmax(-1)[:, cols]
            out.append(((oh.float() * logp).sum(-1) * keep).sum(-1) / keep.sum(-1))
        return torch.cat(out)

    def _pseudo_log_likelihood(self, ids: Tensor, n: Tensor) -> Tensor:
        """``mean_l log p(x_l | x_{-l})`` over each design's ``n`` letters: one singly-masked
        copy per letter, batched; ``(b,)``."""
        tokens = self.esm_tokens(ids, n)  # (b, T)
        cols, is_letter = self._letters(ids, n)
        row, pos = is_letter.nonzero(as_tuple=True)  # one copy per (design, letter)
        where = pos + cols.start  # the masked column of each copy
        truth = tokens[row, where]
        out = []
        for r, w, t in zip(row.split(self.batch_size), where.split(self.batch_size), truth.split(self.batch_size)):
            copies = tokens[r].clone()
            copies[torch.arange(len(r), device=r.device), w] = self.mask_idx
            logits = self.model(copies)["logits"]
            at = logits[torch.arange(len(r), device=r.device), w].float().log_softmax(-1)  # (m, n_esm)
            out.append(at.gather(-1, t[:, None]).squeeze(-1))
        total = torch.zeros(ids.shape[0], dtype=torch.float32, device=ids.device).index_add_(0, row, torch.cat(out))
        return total / n

    def evaluate(self, x: Tensor) -> RewardOutput:
        ids, unscored, n = self._check(x)
        dtype = x.dtype if x.is_floating_point() else torch.float32
        if x.shape[0] == 0:  # nothing to score (ESM's batched passes would concatenate nothing)
            return RewardOutput(torch.zeros(0, dtype=dtype, device=x.device), ~unscored)
        dev = next(self.model.parameters()).device
        if dev != x.device:
            self.to(x.device)
        if self.score == "pseudo_log_likelihood":
            with torch.no_grad():
                value = self._pseudo_log_likelihood(ids, n)
        elif self.differentiable:
            value = self._mean_logprob_relaxed(x[..., : len(self.letters)], ids, n)
        else:
            with torch.no_grad():
                value = self._mean_logprob_tokens(ids, n)
        return RewardOutput(value.to(dtype), ~unscored)
