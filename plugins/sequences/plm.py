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
(token id ``V``) is infeasible.

Differentiable path (``mean_logprob`` on an :class:`esm.ESM2` model): the letters of
``x`` are mapped to ESM's vocabulary with a fixed 0/1 matrix ``(V, n_esm)``, BOS/EOS
one-hots are added, and the token embeddings are ``one_hot @ embed_tokens.weight``;
ESM2's forward pass is then run from these embeddings (embedding scale, token-dropout
rescaling, the transformer layers, final layer norm, LM head), exactly as
``ESM2.forward`` does from token ids. The observed residue's log-probability is read
as ``sum_v one_hot_v * log_softmax(logits)_v``, so a gradient reaches ``x`` both through
the model input and through the read-out. On hard one-hot inputs the value equals the
token-id path.

Weights are read from a local fair-esm checkpoint only (e.g. ``esm2_t6_8M_UR50D.pt`` as
distributed); nothing is ever downloaded. The co-located ``<name>-contact-regression.pt``
is optional: it only serves contact prediction, which this reward does not use.
"""

from __future__ import annotations

import argparse
import pickle
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from difftilt.core.errors import ConfigError, InputDataError, OptionalDependencyError
from difftilt.core.process import Process
from difftilt.core.reward import Reward, RewardOutput

from .alphabets import PROTEIN
from .mdlm import MaskedDiffusionProcess, check_fixed_length

__all__ = ["ESMReward", "load_esm_checkpoint"]


# ESM-2's token-dropout training mask ratio (15% of positions chosen, 80% of those masked).
_MASK_RATIO_TRAIN = 0.15 * 0.8


def _import_esm():
    try:
        import esm
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise OptionalDependencyError("ESMReward needs fair-esm: pip install 'difftilt[sequences]'") from e
    return esm


def _safe_load(path: Path) -> dict:
    """``torch.load`` of a fair-esm file with ``weights_only=True`` (``argparse.Namespace`` allowed:
    fair-esm checkpoints store their config as one). Never unpickles arbitrary objects."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "Unsupported" in ln), lines[0] if lines else type(e).__name__)
        raise ConfigError(f"cannot read ESM weights {path} with torch.load(weights_only=True) ({why}); if you "
                          "trust the file, build the model yourself and pass ESMReward(model=..., alphabet=...)"
                          ) from None
    except (OSError, RuntimeError, EOFError) as e:
        raise ConfigError(f"cannot read ESM weights {path}: {e}") from None


def load_esm_checkpoint(path: str | Path):
    """``(model, alphabet)`` from a local fair-esm checkpoint ``.pt``; never downloads.

    Does what ``esm.pretrained.load_model_and_alphabet_local`` does, with two differences:
    the files are read with ``weights_only=True`` (fair-esm 2.0's own ``torch.load`` fails on
    torch >= 2.6, whose default became ``weights_only=True``, on the ``argparse.Namespace`` in
    the checkpoint), and a missing ``<stem>-contact-regression.pt`` is allowed (fair-esm
    raises; the regression only serves contact prediction). The ESM-2 branch of fair-esm's
    loader is chosen by the file name starting with ``esm2``; a renamed ESM-2 file (one with
    a ``cfg`` entry) is routed there too.
    """
    esm = _import_esm()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ESM weights file not found: {path} (weights are read from a local file and "
                          "never downloaded; get e.g. esm2_t6_8M_UR50D.pt from fair-esm's release)")
    data = _safe_load(path)
    if not isinstance(data, dict) or "model" not in data or not ({"cfg", "args"} & set(data)):
        raise ConfigError(f"{path} is not a fair-esm checkpoint (expected a dict with 'model' and 'cfg' or 'args')")
    name = path.stem
    if "cfg" in data and "args" not in data and not name.startswith("esm2"):
        name = "esm2_" + name
    regression_path = path.with_name(path.stem + "-contact-regression.pt")
    regression = _safe_load(regression_path) if regression_path.is_file() else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Regression weights not found")
        try:
            model, alphabet = esm.pretrained.load_model_and_alphabet_core(name, data, regression)
        except (RuntimeError, ValueError, KeyError, AttributeError) as e:
            raise ConfigError(f"cannot build an ESM model from {path}: {e}") from None
    return model, alphabet


class ESMReward(Reward):
    """ESM-2 log-likelihood of a one-hot design, per residue (see the module docstring).

    Args:
        weights: path of a local fair-esm checkpoint (``esm2_t6_8M_UR50D.pt``, ...).
        model: a ready model instead (e.g. an :class:`esm.ESM2`); ``alphabet`` defaults to
            ``model.alphabet``.
        alphabet: the model's :class:`esm.data.Alphabet`.
        score: ``"mean_logprob"`` (one pass, differentiable) or ``"pseudo_log_likelihood"``.
        letters: the design alphabet; token ``i`` of ``x`` is ``letters[i]``.
        batch_size: rows per ESM forward pass (designs, or masked copies for the PLL).
        process: the chain, to check that it makes sequences over ``len(letters)`` letters.

    ``evaluate(x)``: ``x`` is ``(b, L, len(letters) + 1)``; returns values ``(b,)``.
    """

    differentiable = True

    def __init__(self, weights: str | None = None, model: nn.Module | None = None, alphabet=None,
                 score: Literal["mean_logprob", "pseudo_log_likelihood"] = "mean_logprob",
                 letters: str = PROTEIN, batch_size: int = 32, process: Process | None = None):
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
        if not letters or len(set(letters)) != len(letters):
            raise ConfigError(f"letters must be distinct characters, got '{letters}'")
        unknown = [c for c in letters if c not in alphabet.tok_to_idx]
        if unknown:
            raise ConfigError(f"letters {''.join(unknown)!r} are not in the ESM alphabet")
        check_fixed_length(process, type(self).__name__)
        if isinstance(process, MaskedDiffusionProcess) and process.vocab_size != len(letters):
            raise ConfigError(f"ESMReward reads sequences over {len(letters)} letters, but the process makes "
                              f"{process.vocab_size}")

        self.model = model.eval().requires_grad_(False)
        self.score = score
        self.letters = letters
        self.batch_size = int(batch_size)
        self.differentiable = score == "mean_logprob" and isinstance(model, esm.ESM2)
        self.cls_idx, self.eos_idx, self.mask_idx = alphabet.cls_idx, alphabet.eos_idx, alphabet.mask_idx
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
    def _check(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Token ids ``(b, L)`` (masked positions clamped to a letter) and ``masked`` ``(b,)``."""
        V = len(self.letters)
        if x.ndim != 3 or x.shape[-1] != V + 1 or x.shape[1] < 1:
            raise InputDataError(f"ESMReward expects one-hot sequences (b, L, {V + 1}) over '{self.letters}' + mask, "
                                 f"got shape {tuple(x.shape)}")
        ids = x.argmax(-1)
        return ids.clamp(max=V - 1), (ids >= V).any(-1)

    def _wrap(self, inner: Tensor) -> Tensor:
        """Add BOS/EOS to ESM ids ``(n, L)`` -> ``(n, T)``."""
        n = inner.shape[0]
        parts = []
        if self.prepend_bos:
            parts.append(inner.new_full((n, 1), self.cls_idx))
        parts.append(inner)
        if self.append_eos:
            parts.append(inner.new_full((n, 1), self.eos_idx))
        return torch.cat(parts, 1)

    def esm_tokens(self, ids: Tensor) -> Tensor:
        """ESM token ids ``(b, T)`` (``T = L + bos + eos``) of our token ids ``(b, L)``."""
        return self._wrap(self.esm_ids[ids])

    def _logits_from_embeddings(self, one_hot: Tensor) -> Tensor:
        """ESM2's forward pass from one-hot (or relaxed) ESM tokens ``(n, T, n_esm)`` without
        mask or padding tokens; returns logits ``(n, T, n_esm)``. Mirrors ``ESM2.forward``."""
        m = self.model
        weight = m.embed_tokens.weight
        h = m.embed_scale * (one_hot.to(weight.dtype) @ weight)
        if m.token_dropout:  # no mask tokens: ESM2 rescales by (1 - 0.12) / (1 - 0)
            h = h * (1 - _MASK_RATIO_TRAIN) / 1.0
        h = h.transpose(0, 1)  # (T, n, E); no padding, so ESM2 passes padding_mask=None
        for layer in m.layers:
            h, _ = layer(h, self_attn_padding_mask=None, need_head_weights=False)
        h = m.emb_layer_norm_after(h).transpose(0, 1)
        return m.lm_head(h)

    def _inner(self, T: int) -> slice:
        return slice(int(self.prepend_bos), T - int(self.append_eos))

    # ------------------------------------------------------------------ scores
    def _mean_logprob_tokens(self, ids: Tensor) -> Tensor:
        """``mean_l log p(x_l | x)`` from token ids ``(b, L)`` via ``model(tokens)``; ``(b,)``."""
        tokens = self.esm_tokens(ids)
        out = []
        for chunk in tokens.split(self.batch_size):
            logp = self.model(chunk)["logits"].float().log_softmax(-1)[:, self._inner(chunk.shape[1])]
            out.append(logp.gather(-1, chunk[:, self._inner(chunk.shape[1]), None]).squeeze(-1).mean(-1))
        return torch.cat(out)

    def _mean_logprob_relaxed(self, letters: Tensor) -> Tensor:
        """``mean_l log p(x_l | x)`` from letter one-hots ``(b, L, V)``, differentiable; ``(b,)``."""
        b, L, _ = letters.shape
        one_hot = letters.to(self.to_esm.dtype) @ self.to_esm  # (b, L, n_esm)
        eye = torch.eye(self.n_esm, dtype=one_hot.dtype, device=one_hot.device)
        parts = [one_hot]
        if self.prepend_bos:
            parts.insert(0, eye[self.cls_idx].expand(b, 1, -1))
        if self.append_eos:
            parts.append(eye[self.eos_idx].expand(b, 1, -1))
        full = torch.cat(parts, 1)  # (b, T, n_esm)
        out = []
        for f_chunk, oh_chunk in zip(full.split(self.batch_size), one_hot.split(self.batch_size)):
            logp = self._logits_from_embeddings(f_chunk).float().log_softmax(-1)[:, self._inner(f_chunk.shape[1])]
            out.append((oh_chunk.float() * logp).sum(-1).mean(-1))
        return torch.cat(out)

    def _pseudo_log_likelihood(self, ids: Tensor) -> Tensor:
        """``mean_l log p(x_l | x_{-l})``: the ``b * L`` singly-masked copies, batched; ``(b,)``."""
        b, L = ids.shape
        tokens = self.esm_tokens(ids)  # (b, T)
        offset = int(self.prepend_bos)
        pos = torch.arange(L, device=ids.device)
        copies = tokens[:, None, :].repeat(1, L, 1)  # (b, L, T): copy l has residue l masked
        copies[:, pos, pos + offset] = self.mask_idx
        copies = copies.reshape(b * L, -1)
        where = (pos + offset).repeat(b)  # (b * L,) masked column of each copy
        truth = self.esm_ids[ids].reshape(-1)  # (b * L,)
        out = []
        for c, w, t in zip(copies.split(self.batch_size), where.split(self.batch_size), truth.split(self.batch_size)):
            logits = self.model(c)["logits"]
            at = logits[torch.arange(c.shape[0], device=c.device), w].float().log_softmax(-1)  # (n, n_esm)
            out.append(at.gather(-1, t[:, None]).squeeze(-1))
        return torch.cat(out).reshape(b, L).mean(-1)

    def evaluate(self, x: Tensor) -> RewardOutput:
        ids, masked = self._check(x)
        dev = next(self.model.parameters()).device
        if dev != x.device:
            self.to(x.device)
        if self.score == "pseudo_log_likelihood":
            with torch.no_grad():
                value = self._pseudo_log_likelihood(ids)
        elif self.differentiable:
            value = self._mean_logprob_relaxed(x[..., : len(self.letters)])
        else:
            with torch.no_grad():
                value = self._mean_logprob_tokens(ids)
        dtype = x.dtype if x.is_floating_point() else torch.float32
        return RewardOutput(value.to(dtype), ~masked)
