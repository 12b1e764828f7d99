"""The sequence alphabets and how token ids become strings."""

from __future__ import annotations

from torch import Tensor

__all__ = ["PROTEIN", "DNA", "default_alphabet", "to_strings", "token_ids", "well_padded", "sequence_lengths",
           "NotUTF8", "utf8_text"]

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


class NotUTF8(ValueError):
    """A file's bytes are not UTF-8 text: its line ``line`` (from 1) holds ``byte``."""

    def __init__(self, line: int, byte: int):
        super().__init__(f"line {line}: byte {byte:#04x} is not UTF-8 text")
        self.line, self.byte = line, byte


def utf8_text(data: bytes) -> str:
    """A user's file (sequences, a lab's measurements) as text: UTF-8, a leading byte-order
    mark (Excel's "CSV UTF-8") dropped; :class:`NotUTF8` names the line of the first byte
    that is not UTF-8 (an export in a computer's code page: µ as 0xb5)."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NotUTF8(data.count(b"\n", 0, e.start) + 1, data[e.start]) from None
