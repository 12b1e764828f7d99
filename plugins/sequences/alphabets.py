"""The sequence alphabets and how token ids become strings."""

from __future__ import annotations

from torch import Tensor

__all__ = ["PROTEIN", "DNA", "default_alphabet", "to_strings", "token_ids", "well_padded", "sequence_lengths"]

#: The 20 standard amino acids (token ``i`` is ``PROTEIN[i]``).
PROTEIN = "ACDEFGHIKLMNPQRSTVWY"
#: Nucleotides, in design-bench's order.
DNA = "ACGT"


def default_alphabet(vocab_size: int) -> str:
    """The letters of a ``vocab_size``-token model without its own alphabet: proteins for 20,
    DNA for 4, otherwise ``A, B, C, ...``."""
    return {20: PROTEIN, 4: DNA}.get(vocab_size) or "".join(chr(65 + i) for i in range(vocab_size))


def to_strings(ids: list[list[int]], letters: str, pad: str | None = None) -> list[str]:
    """Token ids (``len(letters)`` is the mask) as strings, ``?`` for a masked position;
    with a padding letter ``pad``, its trailing run is cut off (a pad inside stays)."""
    table = letters + "?"
    strings = ["".join(table[i] for i in row) for row in ids]
    return [s.rstrip(pad) for s in strings] if pad else strings


def sequence_lengths(ids: Tensor, pad_id: int) -> Tensor:
    """``(b,)``: how many letters each row of token ids ``(b, L)`` has before its first pad."""
    return (ids == pad_id).long().cummax(-1).values.eq(0).sum(-1)


def well_padded(ids: Tensor, pad_id: int) -> Tensor:
    """Whether each row of token ids ``(b, L)`` is a sequence of at least one letter followed
    only by padding (``pad_id``): no letter after a pad, and not all pads ``(b,)``."""
    is_pad = ids == pad_id
    seen_pad = is_pad.cummax(-1).values  # a pad at or before each position
    return ~(seen_pad & ~is_pad).any(-1) & ~is_pad[..., 0]


def token_ids(x: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """Token ids ``(b, L)`` of one-hot states ``(b, L, V + 1)`` (a masked position read as
    letter ``V - 1``) and whether each sequence still has a masked position ``(b,)``."""
    ids = x.detach().argmax(-1)
    return ids.clamp(max=vocab - 1), (ids >= vocab).any(-1)
