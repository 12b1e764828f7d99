"""Masked (absorbing-state) discrete diffusion over sequences, MDLM-style.

Forward process: each position of a clean sequence ``x`` is independently replaced by
the mask token with probability ``1 - a(t)``; ``a(0) = 1`` (clean), ``a(1) = 0`` (all
masks). Reverse step from time ``t`` to ``s < t`` (Sahoo et al. 2024, "Simple and
Effective Masked Diffusion Language Models", with the SUBS parameterization):

* an unmasked position is kept (carry-over unmasking: it is *frozen*);
* a masked position stays masked with probability ``(1 - a_s) / (1 - a_t)`` and is
  otherwise unmasked to token ``v`` with probability ``(a_s - a_t) / (1 - a_t) *
  p_theta(v | x_t)``, where the denoiser never predicts the mask (zero-masking).

States are one-hot tensors ``(b, L, V + 1)``, the last channel being the mask, so one
reverse step is the core's :class:`~difftilt.core.distributions.CategoricalStep` and
everything the core does for categorical chains applies: the exact per-position KL
between a fine-tuned and a reference step (``(a_s - a_t)/(1 - a_t)`` times the KL of
the two denoisers at each masked position), log-probabilities for policy gradients,
and straight-through Gumbel-softmax samples for reward backpropagation (DRAKES). The
denoiser reads the one-hot state through a matrix product, so it is differentiable in
a relaxed state.

Two samplers run this reverse process (``sampler=``):

* ``"ancestral"`` -- ``K`` steps on a time grid; each step unmasks every masked position
  independently with the probability above, so neighbours can be decided in the same
  step without seeing each other. Each step is a :class:`CategoricalStep`.
* ``"first_hit"`` -- the exact continuous-time chain (Zheng et al. 2024, "Masked
  diffusion models are secretly time-agnostic masked models"): all masked positions
  share one hazard rate, so the next position to unmask is uniform over the masked
  ones, and it takes its token from ``p_theta(. | x_t)``. ``K = L`` steps of one
  position each, a :class:`SinglePositionStep` (exact KL: the mean over masked
  positions of the two denoisers' KL). No two positions are ever decided blindly of
  each other, which is what keeps hard constraints between neighbours (e.g. Ehrlich
  feasibility) intact, and it costs ``L`` denoiser calls however fine ``K`` would be.

Pretraining minimizes MDLM's continuous-time bound: for ``t ~ U(0, 1)`` and ``x_t`` the
masked sequence, ``-a'(t) / (1 - a(t)) * sum_{masked l} log p_theta(x_l | x_t)``
(``1 / t`` times the masked cross-entropy for the linear schedule ``a = 1 - t``).
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import torch
from torch import Tensor, nn

from difftilt.core.config import ConfigMixin
from difftilt.core.distributions import LOG_ZERO, CategoricalStep, SinglePositionStep
from difftilt.core.errors import ConfigError, ShapeError, InputDataError
from difftilt.core.process import Process

from .alphabets import default_alphabet, to_strings, well_padded

__all__ = ["SequenceDenoiser", "MaskedDiffusionProcess", "masked_diffusion_loss", "alpha_schedule", "schedule_time",
           "order_log_likelihoods", "log_likelihood", "revealed_order"]



def alpha_schedule(t: Tensor, schedule: str) -> tuple[Tensor, Tensor]:
    """``(a(t), -a'(t))`` for the masking schedule; ``1 - a(t)`` is the masking probability.

    ``"linear"``: ``a = 1 - t`` (MDLM's default for text). ``"cosine"``: ``a = cos(pi t / 2)``
    (unmasks fewer tokens early, more late).
    """
    if schedule == "linear":
        return 1.0 - t, torch.ones_like(t)
    if schedule == "cosine":
        return torch.cos(0.5 * math.pi * t), 0.5 * math.pi * torch.sin(0.5 * math.pi * t)
    raise ConfigError(f"schedule must be 'linear' or 'cosine', got '{schedule}'")


def schedule_time(masked: Tensor, schedule: str) -> Tensor:
    """The time ``t`` at which the masking probability ``1 - a(t)`` is ``masked`` (the
    inverse of :func:`alpha_schedule`)."""
    if schedule == "linear":
        return masked.clone()
    if schedule == "cosine":
        return torch.arccos((1.0 - masked).clamp(0.0, 1.0)) * (2.0 / math.pi)
    raise ConfigError(f"schedule must be 'linear' or 'cosine', got '{schedule}'")


class _Block(nn.Module):
    """Pre-norm transformer layer whose attention adds a learned bias per head and offset."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, h: Tensor, bias: Tensor) -> Tensor:
        b, L, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # Written out rather than scaled_dot_product_attention: with a float bias the
        # fused CPU kernel falls back to a path about twice as slow at these sizes.
        scores = (q * (d // self.heads) ** -0.5) @ k.transpose(-2, -1) + bias
        weights = nn.functional.dropout(scores.softmax(-1), self.dropout, self.training)
        h = h + self.proj((weights @ v).transpose(1, 2).reshape(b, L, d))
        return h + self.mlp(self.norm2(h))


class SequenceDenoiser(ConfigMixin, nn.Module):
    """A small bidirectional transformer: ``(x_t one-hot, t) -> logits over the V tokens``.

    Positions enter twice: a learned embedding per position, and a learned attention
    bias per head and relative offset (as in T5). The relative bias lets what is
    learned about neighbours at one place apply everywhere (a local constraint such as
    a banned transition is one rule, not ``L`` of them), which makes pretraining much
    more sample-efficient.

    With ``neighbor_bias``, the logits at each position also get a learned term per letter
    of its left and right neighbours (``W_left[x_{l-1}] + W_right[x_{l+1}]``, the mask
    being a letter of its own): a pairwise potential, so that a neighbour pair never
    seen in the data (a banned transition) can be driven to a very low probability by
    one table entry instead of through the whole network.

    Args:
        vocab_size: ``V``, the number of tokens (the mask is an extra input channel).
        length: ``L``, the sequence length.
        dim: model width.
        depth: number of transformer layers.
        heads: attention heads.
        time_conditioning: add an embedding of ``t`` (MDLM finds it unnecessary for
            masked diffusion: the number of masks already tells the time).
        dropout: dropout in the transformer layers (pretraining only).
        neighbor_bias: add the neighbour-letter tables to the logits.
    """

    def __init__(self, vocab_size: int, length: int, dim: int = 128, depth: int = 3, heads: int = 4,
                 time_conditioning: bool = False, dropout: float = 0.0, neighbor_bias: bool = False):
        super().__init__()
        self.register_to_config(vocab_size=vocab_size, length=length, dim=dim, depth=depth, heads=heads,
                                time_conditioning=time_conditioning, dropout=dropout, neighbor_bias=neighbor_bias)
        if vocab_size < 2 or length < 1:
            raise ConfigError(f"denoiser needs vocab_size >= 2 and length >= 1, got {vocab_size} and {length}")
        if dim % heads:
            raise ConfigError(f"denoiser dim ({dim}) must be divisible by heads ({heads})")
        self.vocab_size, self.length = int(vocab_size), int(length)
        self.embed = nn.Parameter(torch.randn(vocab_size + 1, dim) * dim**-0.5)
        self.pos = nn.Parameter(torch.randn(length, dim) * 0.02)
        self.rel = nn.Parameter(torch.zeros(heads, 2 * length - 1))  # bias of offset j - i at index j - i + L - 1
        offsets = torch.arange(length)[None, :] - torch.arange(length)[:, None] + length - 1
        self.register_buffer("offsets", offsets, persistent=False)
        self.time = nn.Linear(16, dim) if time_conditioning else None
        self.blocks = nn.ModuleList(_Block(dim, heads, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab_size)
        if neighbor_bias:
            self.left = nn.Parameter(torch.zeros(vocab_size + 1, vocab_size))
            self.right = nn.Parameter(torch.zeros(vocab_size + 1, vocab_size))
        self.neighbor_bias = neighbor_bias

    @torch.no_grad()
    def init_from_counts(self, tokens: Tensor, smoothing: float = 0.5) -> None:
        """Start the output bias and the neighbour tables at the corpus's letter statistics.

        The bias becomes ``log P(v)`` and the tables the pointwise mutual information of
        a letter with its left and right neighbour, ``log P(v | left = u) - log P(v)``
        (pooled over positions, ``smoothing`` added to every pair count), so that before
        any training a masked position between two known letters already gets their
        naive-Bayes combination. A neighbour pair absent from the corpus starts near
        ``log(smoothing / count(u))`` instead of at 0: cross-entropy pushes a never-seen
        letter's logit down only logarithmically in the number of steps, and from 0 it
        does not get low enough for a banned transition to stay rare over ``L`` steps.
        """
        if not self.neighbor_bias:
            raise ConfigError("init_from_counts needs a denoiser with neighbor_bias=True")
        V = self.vocab_size
        if tokens.dim() != 2 or tokens.shape[1] != self.length or int(tokens.min()) < 0 or int(tokens.max()) >= V:
            raise ShapeError(f"init_from_counts needs (n, {self.length}) token ids in [0, {V})")
        if smoothing <= 0:
            raise ConfigError(f"smoothing must be > 0, got {smoothing}")
        tokens = tokens.long().cpu()
        unigram = torch.bincount(tokens.reshape(-1), minlength=V).double() + smoothing
        log_p = torch.log(unigram / unigram.sum())
        pairs = torch.bincount((tokens[:, :-1] * V + tokens[:, 1:]).reshape(-1), minlength=V * V)
        pairs = pairs.double().view(V, V) + smoothing  # [left letter, right letter]
        cond_right = torch.log(pairs / pairs.sum(1, keepdim=True))  # log P(right = v | left = u)
        cond_left = torch.log(pairs / pairs.sum(0, keepdim=True)).T  # log P(left = v | right = u)
        self.out.bias.copy_(log_p.float())
        self.left.zero_()
        self.right.zero_()
        self.left[:V] = (cond_right - log_p).float()
        self.right[:V] = (cond_left - log_p).float()

    def forward(self, x: Tensor, t: float | Tensor = 0.0) -> Tensor:
        """``x``: ``(b, L, V + 1)`` one-hot (or relaxed); ``t``: float or ``(b,)``. Returns ``(b, L, V)`` logits."""
        h = x @ self.embed + self.pos
        if self.time is not None:
            tt = torch.as_tensor(t, dtype=h.dtype, device=h.device).reshape(-1, 1)
            freqs = math.pi * 2.0 ** torch.arange(8, dtype=h.dtype, device=h.device)
            h = h + self.time(torch.cat([torch.sin(tt * freqs), torch.cos(tt * freqs)], -1))[:, None, :]
        bias = self.rel[:, self.offsets].to(h.dtype)  # (heads, L, L), broadcast over the batch
        for block in self.blocks:
            h = block(h, bias)
        logits = self.out(self.norm(h))
        if self.neighbor_bias:  # x @ table reads a relaxed state too; the ends have no neighbour
            pad = nn.functional.pad
            logits = logits + pad(x[:, :-1] @ self.left, (0, 0, 1, 0)) + pad(x[:, 1:] @ self.right, (0, 0, 0, 1))
        return logits


class MaskedDiffusionProcess(Process):
    """The K-step reverse chain of a masked diffusion, from all masks to a sequence.

    Args:
        denoiser: maps ``(x_t, t)`` to token logits ``(b, L, V)``.
        num_steps: ``K`` for the ancestral sampler (default 64); step ``k`` goes from ``t = 1 - k/K``
            to ``1 - (k+1)/K``. More steps unmask fewer positions at once (fewer
            conflicts between neighbours). The first-hitting sampler always takes
            ``K = L`` (``num_steps`` must be ``L`` or ``None``).
        schedule: masking schedule (see :func:`alpha_schedule`).
        alphabet: the token letters (``len == V``), used to decode; optional.
        sampler: ``"ancestral"`` or ``"first_hit"`` (see the module docstring).
        pad: the last letter of ``alphabet``, which pads sequences shorter than ``L`` at their end
            (a model of variable-length sequences, made by the ``file`` corpus's ``pad``);
            :meth:`decode` cuts it off, and a design with a letter after a pad is not a
            sequence (:meth:`well_formed`). Each step lets a masked position take only what
            keeps the design a sequence (:func:`padding_rule`), so the first-hitting chain
            draws only sequences. ``None``: every sequence has length ``L``.
    """

    initial_kind = "point"

    def __init__(self, denoiser: SequenceDenoiser, num_steps: int | None = None,
                 schedule: Literal["linear", "cosine"] = "linear", alphabet: str | None = None,
                 sampler: Literal["ancestral", "first_hit"] = "ancestral", pad: str | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.vocab_size, self.length = denoiser.vocab_size, denoiser.length
        if sampler not in ("ancestral", "first_hit"):
            raise ConfigError(f"process.sampler must be 'ancestral' or 'first_hit', got '{sampler}'")
        if sampler == "first_hit":
            if num_steps not in (None, self.length):
                raise ConfigError(f"the first_hit sampler unmasks one position per step, so num_steps is the length "
                                  f"{self.length}; got num_steps={num_steps} (leave it out)")
            num_steps = self.length
        elif num_steps is None:
            num_steps = 64
        if num_steps < 1:
            raise ConfigError(f"process.num_steps must be >= 1, got {num_steps}")
        self.sampler = sampler
        if alphabet is not None and len(alphabet) != self.vocab_size:
            raise ConfigError(f"alphabet has {len(alphabet)} letters but the denoiser has {self.vocab_size} tokens")
        self.alphabet = alphabet
        if pad is not None and (alphabet is None or len(pad) != 1 or pad not in alphabet):
            raise ConfigError(f"pad must be one letter of the alphabet {alphabet!r}, got {pad!r}")
        if pad is not None and alphabet[-1] != pad:
            # the padding rule, mutations and decoding take the pad to be the last token
            raise ConfigError(f"pad must be the last letter of the alphabet (e.g. 'ACGT-' with pad '-'), got pad "
                              f"{pad!r} in {alphabet!r}")
        self.pad = pad
        self.mask_index = self.vocab_size
        self.num_steps = int(num_steps)
        self.schedule = schedule
        self.event_shape = (self.length, self.vocab_size + 1)
        t = torch.linspace(1.0, 0.0, self.num_steps + 1, dtype=torch.float64)
        if sampler == "first_hit":
            # step k starts with L - k of L positions masked: the time whose masking
            # probability 1 - a(t) is (L - k) / L (what a time-conditioned denoiser was trained on)
            t = schedule_time(1.0 - torch.arange(self.num_steps + 1, dtype=torch.float64) / self.num_steps, schedule)
        a, _ = alpha_schedule(t, schedule)
        a_t, a_s = a[:-1], a[1:]
        p_unmask = (a_s - a_t) / (1.0 - a_t)
        p_stay = (1.0 - a_s) / (1.0 - a_t)
        log_stay = torch.where(p_stay > 0, torch.log(p_stay.clamp_min(1e-300)), torch.full_like(p_stay, LOG_ZERO))
        self.register_buffer("log_unmask", torch.log(p_unmask).float(), persistent=False)
        self.register_buffer("log_stay", log_stay.float(), persistent=False)
        self.register_buffer("times", t.float(), persistent=False)

    def spec(self) -> dict:
        """The process's own settings (the denoiser has its own config)."""
        spec = {"num_steps": self.num_steps, "schedule": self.schedule, "alphabet": self.alphabet,
                "sampler": self.sampler}
        return {**spec, "pad": self.pad} if self.pad is not None else spec

    # ------------------------------------------------------------------ states
    def initial(self, batch_size: int, *, generator: torch.Generator | None = None) -> Tensor:
        x = torch.zeros(batch_size, *self.event_shape, device=self.device)
        x[..., self.mask_index] = 1.0
        return x

    def time(self, k: int) -> float:
        return k / self.num_steps

    def one_hot(self, tokens: Tensor) -> Tensor:
        """``(b, L)`` token ids (the mask is ``V``) -> ``(b, L, V + 1)`` one-hot states."""
        self.check_tokens(tokens, allow_mask=True)
        return nn.functional.one_hot(tokens.long(), self.vocab_size + 1).float()

    def check_tokens(self, tokens: Tensor, allow_mask: bool = False) -> None:
        """Raise :class:`ShapeError` for a wrong length or ids outside the alphabet."""
        if tokens.dim() != 2 or tokens.shape[1] != self.length:
            raise ShapeError(f"sequences must be (batch, {self.length}) token ids, got shape {tuple(tokens.shape)}")
        hi = self.vocab_size + (1 if allow_mask else 0)
        bad = (tokens < 0) | (tokens >= hi)
        if bad.any():
            i, j = (int(v) for v in bad.nonzero()[0])
            raise InputDataError(f"token id {int(tokens[i, j])} at sequence {i}, position {j} is outside the alphabet "
                             f"(ids 0..{hi - 1})")

    def tokens(self, x: Tensor) -> Tensor:
        """``(b, L, V + 1)`` states -> ``(b, L)`` token ids (``V`` where still masked)."""
        return x.argmax(-1)

    def decode(self, x: Tensor) -> list[str]:
        """Final states as strings (``?`` for a position still masked; trailing padding cut off)."""
        return to_strings(self.tokens(x).tolist(), self.alphabet or default_alphabet(self.vocab_size), self.pad)

    def well_formed(self, x: Tensor) -> Tensor:
        """``(b,)``: whether each state is a sequence, i.e. has no letter after a pad and is not
        all padding (always true without ``pad``; masked positions count as letters)."""
        if self.pad is None:
            return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        return well_padded(self.tokens(x), self.alphabet.index(self.pad))

    # ------------------------------------------------------------------ chain
    def step(self, x: Tensor, k: int) -> CategoricalStep | SinglePositionStep:
        masked = x[..., self.mask_index] > 0.5  # (b, L); exact on straight-through states
        logits = self.denoiser(x, float(self.times[k]))
        if self.pad is not None:
            allowed = padding_rule(self.tokens(x), masked, self.alphabet.index(self.pad))
            logits = logits.masked_fill(~allowed, LOG_ZERO)
        logp = torch.log_softmax(logits, dim=-1)  # (b, L, V)
        if self.sampler == "first_hit":
            never_mask = torch.full_like(logp[..., :1], LOG_ZERO)
            return SinglePositionStep(torch.cat([logp, never_mask], dim=-1), x, open=masked)
        stay = self.log_stay[k].expand(*logp.shape[:2], 1)
        logits = torch.cat([logp + self.log_unmask[k], stay], dim=-1)
        return CategoricalStep(logits, x, frozen=~masked)


def padding_rule(tokens: Tensor, masked: Tensor, pad_id: int) -> Tensor:
    """``(b, L, V)``: the tokens each position may take so that a sequence stays letters, then
    padding: only the pad after a pad; no pad before a letter, or at the first position
    (a sequence has at least one letter). Read from the positions already unmasked
    (``~masked``; ``tokens`` ``(b, L)``, ``V = pad_id + 1`` letters with the pad last)."""
    is_pad = ~masked & (tokens == pad_id)
    is_letter = ~masked & (tokens != pad_id)
    pad_before = is_pad.cummax(-1).values.roll(1, -1)  # a pad at some j < i
    pad_before[:, 0] = False
    letter_after = is_letter.flip(-1).cummax(-1).values.flip(-1).roll(-1, -1)  # a letter at some j > i
    letter_after[:, -1] = False
    no_pad = letter_after.clone()
    no_pad[:, 0] = True
    is_pad_token = torch.arange(pad_id + 1, device=tokens.device) == pad_id  # (V,)
    allowed = torch.where(no_pad[..., None], ~is_pad_token, True)
    return torch.where(pad_before[..., None], is_pad_token, allowed)


def masked_diffusion_loss(denoiser: SequenceDenoiser, tokens: Tensor, schedule: str = "linear",
                          generator: torch.Generator | None = None) -> Tensor:
    """MDLM's continuous-time negative ELBO per position, averaged over the batch.

    Args:
        tokens: ``(b, L)`` clean token ids in ``[0, V)``.

    Uses low-discrepancy times (one stratum per sample) for a lower-variance estimate.
    """
    b, L = tokens.shape
    V = denoiser.vocab_size
    u = (torch.rand((), generator=generator, device=tokens.device) + torch.arange(b, device=tokens.device) / b) % 1.0
    t = u.clamp(1e-4, 1.0)
    a, neg_da = alpha_schedule(t, schedule)
    masked = torch.rand((b, L), generator=generator, device=tokens.device) < (1.0 - a)[:, None]
    xt = torch.where(masked, torch.full_like(tokens, V), tokens)
    logits = denoiser(nn.functional.one_hot(xt, V + 1).float(), t)
    nll = nn.functional.cross_entropy(logits.reshape(b * L, V), tokens.reshape(-1), reduction="none").reshape(b, L)
    weight = neg_da / (1.0 - a)
    return ((nll * masked).sum(-1) * weight).mean() / L


def revealed_order(states: list[Tensor]) -> Tensor:
    """``(b, L)``: the position each step of first-hitting paths ``[x_0, ..., x_L]`` revealed
    (``sample_trajectories(..., states=True).states``), an order for :func:`order_log_likelihoods`."""
    return torch.stack([(b.argmax(-1) != a.argmax(-1)).float().argmax(-1) for a, b in zip(states, states[1:])], 1)


@torch.no_grad()
def order_log_likelihoods(process: Process, tokens: Tensor, orders: Tensor, chunk: int = 1024) -> Tensor:
    """``log(L! * P(x revealed in order sigma))`` for each sequence and each reveal order.

    A first-hitting chain makes a sequence ``x`` along one of ``L!`` paths, one per order in
    which its positions are revealed, so ``p(x) = sum_sigma P(path_sigma) = E_sigma[L! *
    P(path_sigma)]`` for ``sigma`` uniform over the orders: the exponential of each value
    returned is an unbiased estimate of ``p(x)``, and their mean over all ``L!`` orders is
    exact (also for a chain with learned position weights: ``P(path)`` includes the picks). A model whose conditionals were one joint law's would give every order the same
    value; how much they differ across orders is how inconsistent the denoiser is.

    Args:
        process: a first-hitting chain over one-hot states ``(L, V + 1)``, the mask last
            (a ``MaskedDiffusionProcess(sampler="first_hit")`` or a fine-tuned copy of one).
        tokens: ``(b, L)`` token ids in ``[0, V)``.
        orders: ``(b, m, L)``: for each sequence, ``m`` permutations of the positions
            (``orders[i, j, k]`` is the position revealed at step ``k``).
        chunk: chains run at once (memory).

    Returns:
        ``(b, m)`` log-likelihoods.
    """
    length, channels = process.event_shape
    vocab = channels - 1
    if tokens.dim() != 2 or tokens.shape[1] != length:
        raise ShapeError(f"sequences must be (batch, {length}) token ids, got shape {tuple(tokens.shape)}")
    if bool(((tokens < 0) | (tokens >= vocab)).any()):
        raise InputDataError(f"token ids must be in 0..{vocab - 1} (no masks)")
    b = tokens.shape[0]
    if orders.dim() != 3 or orders.shape[0] != b or orders.shape[2] != length:
        raise ShapeError(f"orders must be (batch {b}, m, length {length}), got shape {tuple(orders.shape)}")
    if not bool((orders.sort(-1).values == torch.arange(length, device=orders.device)).all()):
        raise InputDataError("each order must be a permutation of the positions 0..L-1")
    m = orders.shape[1]
    flat = tokens.repeat_interleave(m, 0)
    rank = torch.argsort(orders.reshape(b * m, length), dim=1)  # the step at which each position opens
    out = torch.cat([_path_log_likelihood(process, flat[i:i + chunk].to(process.device),
                                          rank[i:i + chunk].to(process.device), vocab)
                     for i in range(0, b * m, chunk)])
    return (out + math.lgamma(length + 1)).view(b, m)


def _path_log_likelihood(process: Process, tokens: Tensor, rank: Tensor, vocab: int) -> Tensor:
    """``log P(path)`` of each sequence revealed in the order whose step per position is ``rank``."""
    masks = torch.full_like(tokens, vocab)
    state = nn.functional.one_hot(masks, vocab + 1).float()
    total = torch.zeros(tokens.shape[0], dtype=torch.float64, device=tokens.device)
    for k in range(tokens.shape[1]):
        step = process.step(state, k)
        if not isinstance(step, SinglePositionStep):
            raise ConfigError(f"likelihoods over reveal orders need a first-hitting chain (sampler: first_hit); "
                              f"this process's steps are {type(step).__name__}")
        nxt = nn.functional.one_hot(torch.where(rank <= k, tokens, masks), vocab + 1).float()
        total += step.log_prob(nxt).double()
        state = nxt
    return total.cpu()


MAX_ALL_ORDERS = 40_320  # 8!: orders="all" for up to 8 positions


def log_likelihood(process: Process, tokens: Tensor, orders: int | Literal["all"] = 16,
                   generator: torch.Generator | None = None) -> Tensor:
    """``log p(x)`` under a first-hitting chain, estimated from ``orders`` random reveal
    orders per sequence (see :func:`order_log_likelihoods`): ``log mean_sigma L! P(path_sigma)``.

    The mean inside the log is unbiased for ``p(x)``, so the estimate is biased low (by
    Jensen) and tightens as ``orders`` grows; differences between two models' estimates on
    the same sequences and orders estimate their log-likelihood ratio. ``orders="all"``
    sums over every one of the ``L!`` orders: the exact ``log p(x)``, for ``L <= 8``
    (TFBind8's 8-mers: 40,320 orders). Costs ``L * orders`` denoiser calls per sequence.
    Returns ``(b,)`` float64.
    """
    length = process.event_shape[0]
    b = tokens.shape[0]
    if orders == "all":
        if math.factorial(length) > MAX_ALL_ORDERS:
            raise ConfigError(f"orders='all' sums over the {length}! = {math.factorial(length):,} reveal orders of "
                              f"{length} positions; it is for up to 8 positions (pass a number of random orders)")
        every = torch.tensor(list(itertools.permutations(range(length))), dtype=torch.long)
        ll = order_log_likelihoods(process, tokens, every.expand(b, *every.shape))
        return torch.logsumexp(ll, 1) - math.lgamma(length + 1)
    if isinstance(orders, bool) or not isinstance(orders, int) or orders < 1:
        raise ConfigError(f"orders must be a number >= 1 or 'all', got {orders!r}")
    perms = torch.argsort(torch.rand(b, orders, length, generator=generator), dim=-1)
    ll = order_log_likelihoods(process, tokens, perms)
    return torch.logsumexp(ll, 1) - math.log(orders)
