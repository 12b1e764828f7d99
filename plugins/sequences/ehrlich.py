r"""Ehrlich functions: closed-form, feasibility-constrained test functions for sequence design.

Ehrlich functions (Stanton et al., 2024, "Closed-Form Test Functions for Biophysical
Sequence Optimization Algorithms", arXiv:2407.00236) are black boxes over sequences
``x`` in ``V^L`` (``V = {0, ..., v - 1}``, ``v = num_states``, ``L = length``) that keep
the geometry of biophysical design problems -- a sparse feasible set and epistatic
(non-additive) interactions between positions -- while having a known optimum. This
module follows the reference implementation in ``prescient-design/holo-bench``
(``holo.test_functions.closed_form.Ehrlich``), draw for draw.

**Feasibility.** An instance owns an ergodic transition matrix ``A`` (``v x v``, rows
sum to 1). It is a softmax of Gaussian logits (temperature 0.5) masked by a banded
0/1 pattern -- ``2 b + 1`` nonzeros per row with wrap-around, ``b = floor(0.4 v)`` --
whose rows are randomly permuted; the diagonal is always kept (a state may repeat).
The chain is irreducible and, having a positive diagonal, aperiodic. A sequence is
*feasible* iff every transition has nonzero probability,

.. math:: \text{feasible}(x) \iff A[x_{l-1}, x_l] > 0 \quad \forall\, l = 1, \dots, L-1,

i.e. iff it has nonzero likelihood under the discrete Markov process (DMP) with the
uniform initial distribution ``initial_dist`` and transition matrix ``A``. Sampling
the DMP from its stationary distribution (:meth:`EhrlichFunction.sample_feasible`)
gives feasible sequences -- a natural "pretraining corpus".

**Motifs and spacings.** ``c = num_motifs`` motifs ``a^(i)`` of length
``k = motif_length`` are drawn as *one* DMP trajectory of length ``c k`` (started from
the stationary distribution) cut into ``c`` chunks, so every motif and every junction
between consecutive motifs is a feasible path. Each motif has offsets
``s^(i) = (0, s_2, ..., s_k)``, strictly increasing: with ``slack = L - c k``, the
``k - 1`` gaps are ``1 + floor(floor(slack / c) * w_j)`` for ``w`` a uniform draw
normalized onto the simplex, so ``s_k <= L // c - 1`` and the ``c`` spaced motifs fit
one after another in a sequence of length ``L``.

**Objective.** The quality of motif ``i`` is the best fraction of its elements present
at the spaced offsets, quantized to ``q = quantization`` levels (``1 <= q <= k``,
default ``k``):

.. math::

    h_i(x) = \max_{l} \frac{1}{q} \Big\lfloor \frac{q}{k}
             \sum_{j=1}^{k} \mathbb{1}[x_{l + s^{(i)}_j} = a^{(i)}_j] \Big\rfloor ,
    \qquad l = 0, \dots, L - 1 - s^{(i)}_k,

and the value is the product ``f(x) = prod_i h_i(x)`` in ``[0, 1]`` for feasible ``x``.
``f(x) = 1`` iff every motif is fully present; with ``q < k`` partial motifs are
rounded down, so the landscape has plateaus. holo-bench returns ``-inf`` for infeasible
sequences; here they get value 0 and ``feasible = False``.

An instance is a pure function of ``(num_states, length, num_motifs, motif_length,
quantization, seed)``: everything random is drawn on the CPU from
``torch.Generator().manual_seed(seed)`` in float32, in holo-bench's order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from difftilt.core.errors import ConfigError, ShapeError, InputDataError

__all__ = ["EhrlichFunction"]

_SOFTMAX_TEMP = 0.5  # holo-bench's temperature for the transition logits
_BAND_FRACTION = 0.4  # holo-bench's bandwidth, as a fraction of num_states
_MAX_MATRIX_DRAWS = 100  # redraws allowed when a draw is not irreducible (tiny num_states)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"Ehrlich {name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ConfigError(f"Ehrlich {name} must be >= {minimum}, got {value}")
    return value


def _banded_mask(num_states: int, bandwidth: int) -> Tensor:
    """``(v, v)`` bool: row ``i`` is True at columns ``i - b, ..., i + b`` (mod ``v``)."""
    idx = torch.arange(num_states)
    diff = (idx[None, :] - idx[:, None]) % num_states
    return (diff <= bandwidth) | (diff >= num_states - bandwidth)


def _is_irreducible(transition_matrix: Tensor) -> bool:
    """Whether every state reaches every other (exact, on the 0/1 support).

    With a positive diagonal the support of ``A^n`` grows with ``n``, so repeated squaring
    until ``n >= v - 1`` decides irreducibility (and, with the diagonal, primitivity --
    holo-bench checks ``A^m > 0`` for Wielandt's ``m = (v - 1)^2 + 1`` instead).
    """
    v = transition_matrix.shape[0]
    reach = (transition_matrix > 0) | torch.eye(v, dtype=torch.bool)
    reach = reach.to(torch.float64)
    steps = 1
    while steps < v - 1:
        reach = ((reach @ reach) > 0).to(torch.float64)
        steps *= 2
    return bool((reach > 0).all())


def _sample_transition_matrix(num_states: int, generator: torch.Generator) -> Tensor:
    """Banded, row-permuted, softmax-weighted ergodic transition matrix, ``(v, v)`` float32."""
    bandwidth = int(num_states * _BAND_FRACTION)
    band = _banded_mask(num_states, bandwidth)
    for _ in range(_MAX_MATRIX_DRAWS):
        logits = torch.randn(num_states, num_states, generator=generator, dtype=torch.float32)
        dense = (logits / _SOFTMAX_TEMP).softmax(dim=-1)
        mask = band[torch.randperm(num_states, generator=generator)]
        mask = mask | torch.eye(num_states, dtype=torch.bool)  # repeats always possible
        matrix = torch.where(mask, dense, torch.zeros_like(dense))
        matrix = matrix / matrix.sum(dim=-1, keepdim=True)
        # holo-bench raises here; a redraw only changes instances holo-bench refuses
        # (num_states <= 2 with an unlucky permutation).
        if _is_irreducible(matrix):
            return matrix
    raise ConfigError(  # pragma: no cover - needs ~100 reducible draws in a row
        f"Ehrlich: no ergodic transition matrix over {num_states} states after "
        f"{_MAX_MATRIX_DRAWS} draws; use more states or another seed"
    )


def _stationary_dist(transition_matrix: Tensor) -> Tensor:
    """``pi`` with ``pi A = pi``, ``sum(pi) = 1``: ``(v,)`` float32 (solved in float64)."""
    v = transition_matrix.shape[0]
    a = transition_matrix.to(torch.float64)
    system = torch.cat([(torch.eye(v, dtype=torch.float64) - a).T, torch.ones(1, v, dtype=torch.float64)])
    rhs = torch.zeros(v + 1, 1, dtype=torch.float64)
    rhs[-1] = 1.0
    pi = torch.linalg.lstsq(system, rhs).solution.squeeze(-1).clamp_min(0.0)
    return (pi / pi.sum()).to(torch.float32)


def _sample_chain(
    start_dist: Tensor, transition_matrix: Tensor, n: int, length: int, generator: torch.Generator | None
) -> Tensor:
    """``n`` DMP trajectories ``(n, length)`` long, on the device of ``start_dist``."""
    out = torch.empty(n, length, dtype=torch.long, device=start_dist.device)
    out[:, 0] = torch.multinomial(start_dist, n, replacement=True, generator=generator)
    for t in range(1, length):
        out[:, t] = torch.multinomial(transition_matrix[out[:, t - 1]], 1, generator=generator).squeeze(-1)
    return out


class EhrlichFunction:
    """One Ehrlich function instance (see the module docstring for the definition).

    Args:
        num_states: alphabet size ``v >= 2``; tokens are ``0, ..., v - 1``.
        length: sequence length ``L``.
        num_motifs: number of motifs ``c >= 1``.
        motif_length: elements per motif ``k >= 1``; needs ``c * k <= L``.
        quantization: levels ``q`` of the per-motif quality, ``1 <= q <= k``
            (``None``: ``k``, no rounding).
        seed: seeds the CPU ``torch.Generator`` that draws the instance.

    Attributes:
        transition_matrix: ``(v, v)`` float32, rows sum to 1; its support is the
            feasibility constraint.
        initial_dist: ``(v,)`` float32, uniform (holo-bench's: any first state is feasible).
        stationary_dist: ``(v,)`` float32, the stationary law of ``transition_matrix``;
            starts the DMP in :meth:`sample_feasible` and in the motif draw.
        motifs: ``(c, k)`` long.
        spacings: ``(c, k)`` long offsets, ``spacings[:, 0] == 0``, strictly increasing,
            ``spacings[:, -1] <= L // c - 1``.
        optimal_value: 1.0.

    Raises:
        ConfigError: a parameter of the wrong type or out of range, or motifs that
            cannot fit (``c * k > L``).
    """

    optimal_value = 1.0

    def __init__(
        self,
        num_states: int,
        length: int,
        num_motifs: int,
        motif_length: int,
        quantization: int | None = None,
        seed: int = 0,
    ) -> None:
        self.num_states = _check_int("num_states", num_states, 2)
        self.length = _check_int("length", length, 1)
        self.num_motifs = _check_int("num_motifs", num_motifs, 1)
        self.motif_length = _check_int("motif_length", motif_length, 1)
        if num_motifs * motif_length > length:
            raise ConfigError(
                f"Ehrlich: {num_motifs} motifs of length {motif_length} need "
                f"num_motifs * motif_length = {num_motifs * motif_length} positions, "
                f"more than the sequence length {length}"
            )
        if quantization is None:
            quantization = motif_length
        _check_int("quantization", quantization, 1)
        if quantization > motif_length:
            raise ConfigError(
                f"Ehrlich quantization must be in [1, motif_length = {motif_length}], got {quantization}"
            )
        self.quantization = quantization
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ConfigError(f"Ehrlich seed must be an int in [0, 2**63), got {seed!r}")
        self.seed = seed

        gen = torch.Generator().manual_seed(seed)
        self.initial_dist = torch.full((num_states,), 1.0 / num_states)
        self.transition_matrix = _sample_transition_matrix(num_states, gen)
        self.stationary_dist = _stationary_dist(self.transition_matrix)

        # One feasible trajectory of c * k states, cut into c motifs: each motif, and
        # each junction motif i -> motif i + 1, is then a feasible path.
        chain = _sample_chain(self.stationary_dist, self.transition_matrix, 1, num_motifs * motif_length, gen)
        self.motifs = chain.reshape(num_motifs, motif_length)

        # Gaps 1 + floor(budget * w), w on the simplex: the spaced motifs together span
        # at most c * (k + budget) <= L positions.
        budget = (length - num_motifs * motif_length) // num_motifs
        spacings = torch.zeros(num_motifs, motif_length, dtype=torch.long)
        for i in range(num_motifs):
            weights = torch.rand(motif_length - 1, generator=gen)
            weights = weights / weights.sum()
            gaps = 1 + (budget * weights).floor().to(torch.long)
            spacings[i, 1:] = gaps.cumsum(0)
        self.spacings = spacings
        self._device_cache: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ helpers
    def _on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """``(transition_matrix, motifs, spacings)`` on ``device`` (cached)."""
        if device not in self._device_cache:
            self._device_cache[device] = (
                self.transition_matrix.to(device),
                self.motifs.to(device),
                self.spacings.to(device),
            )
        return self._device_cache[device]

    def _check_seqs(self, seqs: Tensor) -> Tensor:
        if not isinstance(seqs, Tensor):
            raise ShapeError(f"Ehrlich expects a torch.Tensor of tokens, got {type(seqs).__name__}")
        if seqs.dtype == torch.bool or seqs.dtype.is_floating_point or seqs.dtype.is_complex:
            raise ShapeError(f"Ehrlich expects integer tokens, got dtype {seqs.dtype}")
        if seqs.dim() != 2 or seqs.shape[1] != self.length:
            raise ShapeError(
                f"Ehrlich expects sequences of shape (batch, {self.length}), got {tuple(seqs.shape)}"
            )
        if seqs.numel() > 0:
            lo, hi = int(seqs.min()), int(seqs.max())
            if lo < 0 or hi >= self.num_states:
                raise InputDataError(
                    f"Ehrlich tokens must be in [0, {self.num_states}), got values in [{lo}, {hi}]"
                )
        return seqs.long()

    # --------------------------------------------------------------- objective
    def is_feasible(self, seqs: Tensor) -> Tensor:
        """Whether each sequence has only nonzero-probability transitions.

        Args:
            seqs: ``(b, L)`` integer tokens in ``[0, v)``.

        Returns:
            ``(b,)`` bool.
        """
        seqs = self._check_seqs(seqs)
        matrix, _, _ = self._on(seqs.device)
        return (matrix[seqs[:, :-1], seqs[:, 1:]] > 0).all(dim=1)

    def motif_presence(self, seqs: Tensor) -> Tensor:
        """Quantized quality ``h_i(x)`` of every motif (feasibility is not checked).

        Args:
            seqs: ``(b, L)`` integer tokens in ``[0, v)``.

        Returns:
            ``(b, c)`` float32 in ``{0, 1/q, ..., 1}``.
        """
        seqs = self._check_seqs(seqs)
        _, motifs, spacings = self._on(seqs.device)
        k, q = self.motif_length, self.quantization
        out = torch.empty(seqs.shape[0], self.num_motifs, dtype=torch.float32, device=seqs.device)
        for i in range(self.num_motifs):
            span = int(spacings[i, -1])
            starts = torch.arange(self.length - span, device=seqs.device)
            windows = seqs[:, starts[:, None] + spacings[i][None, :]]  # (b, positions, k)
            best = (windows == motifs[i]).sum(dim=-1).amax(dim=-1)  # (b,) matches, best position
            out[:, i] = torch.div(best * q, k, rounding_mode="floor").float() / q
        return out

    def __call__(self, seqs: Tensor) -> tuple[Tensor, Tensor]:
        """Ehrlich value and feasibility.

        Args:
            seqs: ``(b, L)`` integer tokens in ``[0, v)``.

        Returns:
            ``(value, feasible)``: ``(b,)`` float32 in ``[0, 1]`` (the product of the motif
            qualities; 0 where infeasible) and ``(b,)`` bool.
        """
        feasible = self.is_feasible(seqs)
        value = self.motif_presence(seqs).prod(dim=-1)
        return torch.where(feasible, value, torch.zeros_like(value)), feasible

    # ---------------------------------------------------------------- samplers
    def sample_feasible(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Sequences from the DMP started at its stationary law (all feasible).

        Args:
            n: number of sequences (``>= 0``).
            generator: source of randomness; sampling runs on its device. ``None``: the
                global torch RNG, on the CPU.

        Returns:
            ``(n, L)`` long.
        """
        _check_int("sample count n", n, 0)
        device = generator.device if generator is not None else torch.device("cpu")
        if n == 0:
            return torch.empty(0, self.length, dtype=torch.long, device=device)
        start = self.stationary_dist.to(device)
        matrix, _, _ = self._on(device)
        return _sample_chain(start, matrix, n, self.length, generator)

    def optimal_solution(self) -> Tensor:
        """A feasible sequence of value 1, built as in holo-bench.

        The motifs are written one after another, each element at its offset; the
        positions between two offsets repeat the previous element (self-transitions are
        always allowed), and the tail after the last motif repeats its last element.

        Returns:
            ``(L,)`` long.
        """
        soln = torch.empty(self.length, dtype=torch.long)
        pos = 0
        for motif, offsets in zip(self.motifs, self.spacings):
            span = int(offsets[-1]) + 1
            # element j fills [offsets[j], offsets[j + 1]) relative to the motif start
            counts = torch.diff(offsets, append=torch.tensor([span]))
            soln[pos : pos + span] = motif.repeat_interleave(counts)
            pos += span
        soln[pos:] = soln[pos - 1]
        value, feasible = self(soln[None])
        if not (bool(feasible[0]) and float(value[0]) == self.optimal_value):  # pragma: no cover
            raise RuntimeError("Ehrlich: the constructed optimal solution does not score 1 (a bug)")
        return soln

    # ------------------------------------------------------------------ config
    def config(self) -> dict:
        """The six constructor arguments, ``quantization`` resolved.

        ``EhrlichFunction(**f.config())`` rebuilds an identical instance.
        """
        return {
            "num_states": self.num_states,
            "length": self.length,
            "num_motifs": self.num_motifs,
            "motif_length": self.motif_length,
            "quantization": self.quantization,
            "seed": self.seed,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.config().items())
        return f"EhrlichFunction({args})"
