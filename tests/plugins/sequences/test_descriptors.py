"""Biopython protein descriptors as rewards and constraints."""

import pytest
import torch

pytest.importorskip("Bio")

from Bio.SeqUtils.ProtParam import ProteinAnalysis  # noqa: E402

from difftilt.core.errors import ConfigError, InputDataError  # noqa: E402
from difftilt.core.reward import WeightedSumReward  # noqa: E402
from difftilt.plugins.sequences import PROTEIN, EhrlichFunction, EhrlichReward  # noqa: E402
from difftilt.plugins.sequences.descriptors import DescriptorConstraint, ProteinDescriptor  # noqa: E402

SEQS = ["ACDEFGHIKLMNPQRSTVWY", "MKWVTFISLLFLFSSAYSRG"]  # all letters; a signal-peptide-like stretch


def _one_hot(seqs):
    ids = torch.tensor([[PROTEIN.index(c) for c in s] for s in seqs])
    return torch.nn.functional.one_hot(ids, 21).float()


def _bio(seq, descriptor, ph=7.0):
    a = ProteinAnalysis(seq)
    return {"hydrophobicity": a.gravy(), "charge": a.charge_at_pH(ph), "instability": a.instability_index()}[descriptor]


@pytest.mark.parametrize("descriptor", ["hydrophobicity", "charge", "instability"])
def test_values_are_biopythons(descriptor):
    out = ProteinDescriptor(descriptor, ph=6.0)(_one_hot(SEQS))
    assert not ProteinDescriptor.differentiable and out.feasible.all() and out.value.shape == (2,)
    for value, seq in zip(out.value.tolist(), SEQS):
        assert value == pytest.approx(_bio(seq, descriptor, ph=6.0), rel=1e-6)


def test_known_gravy_of_the_twenty_letters():
    # Kyte-Doolittle hydropathies of the 20 amino acids average to -0.49.
    assert ProteinDescriptor("hydrophobicity")(_one_hot(SEQS[:1])).value.item() == pytest.approx(-0.49, abs=1e-6)


def test_target_form_and_masked_designs():
    x = _one_hot(SEQS)
    out = ProteinDescriptor("instability", target=40.0)(x)
    expected = [-abs(_bio(s, "instability") - 40.0) for s in SEQS]
    assert out.value.tolist() == pytest.approx(expected, rel=1e-6)
    x[1, 3] = 0.0
    x[1, 3, 20] = 1.0  # a position still masked
    for reward in (ProteinDescriptor("charge"), DescriptorConstraint("charge", low=-100, high=100)):
        assert reward(x).feasible.tolist() == [True, False]


def test_constraint_is_feasible_inside_the_bounds():
    x = _one_hot(SEQS)
    gravy = [_bio(s, "hydrophobicity") for s in SEQS]  # -0.49 and about 1.0
    out = DescriptorConstraint("hydrophobicity", low=0.0)(x)
    assert out.value.tolist() == [0.0, 0.0] and out.feasible.tolist() == [g >= 0.0 for g in gravy] == [False, True]
    with pytest.raises(ConfigError):
        DescriptorConstraint("charge")
    with pytest.raises(ConfigError):
        DescriptorConstraint("charge", low=2.0, high=1.0)


def test_composes_with_other_rewards():
    x = _one_hot(SEQS)
    total = ProteinDescriptor("hydrophobicity") + 0.1 * ProteinDescriptor("charge", target=0.0)
    assert isinstance(total, WeightedSumReward) and not total.differentiable
    expected = [_bio(s, "hydrophobicity") - 0.1 * abs(_bio(s, "charge")) for s in SEQS]
    assert total(x).value.tolist() == pytest.approx(expected, rel=1e-6)

    best = EhrlichFunction(20, 32, 2, 4, seed=0).optimal_solution()[None]
    design = torch.nn.functional.one_hot(best, 21).float()
    seq = "".join(PROTEIN[i] for i in best[0].tolist())
    combo = EhrlichReward(20, 32, 2, 4, seed=0) + 0.1 * ProteinDescriptor("hydrophobicity", target=0.0)
    out = combo(design)
    assert out.feasible.item() and out.value.item() == pytest.approx(1.0 - 0.1 * abs(_bio(seq, "hydrophobicity")))
    too_tight = EhrlichReward(20, 32, 2, 4, seed=0) + DescriptorConstraint("charge", low=1e3)
    assert not too_tight(design).feasible.item()


def test_bad_options_and_inputs():
    with pytest.raises(ConfigError, match="unknown protein descriptor"):
        ProteinDescriptor("aromaticity")
    with pytest.raises(ConfigError):
        ProteinDescriptor("charge", letters="ACGU")
    with pytest.raises(InputDataError):
        ProteinDescriptor("charge")(torch.zeros(2, 5, 4))


def _process(alphabet, pad=None):
    from difftilt.plugins.sequences.mdlm import MaskedDiffusionProcess, SequenceDenoiser

    return MaskedDiffusionProcess(SequenceDenoiser(len(alphabet), 6, dim=8, depth=0, heads=1), alphabet=alphabet,
                                  pad=pad)


def test_designs_are_read_in_the_process_s_alphabet():
    """A model whose letters are in textbook order is scored on its own letters, not PROTEIN's."""
    textbook = "ARNDCQEGHILKMFPSTWYV"
    process = _process(textbook)
    x = torch.nn.functional.one_hot(torch.full((1, 6), textbook.index("K")), 21).float()
    for reward in (ProteinDescriptor("charge", process=process), DescriptorConstraint("charge", low=5.0,
                                                                                      process=process)):
        assert reward.letters == textbook
    assert ProteinDescriptor("charge", process=process)(x).value.item() == pytest.approx(_bio("KKKKKK", "charge"))
    assert DescriptorConstraint("charge", low=5.0, process=process)(x).feasible.item()
    with pytest.raises(ConfigError, match=f"'{PROTEIN}' are not the process's alphabet '{textbook}'"):
        ProteinDescriptor("charge", letters=PROTEIN, process=process)
    assert ProteinDescriptor("charge", letters=textbook, process=process).letters == textbook
    assert ProteinDescriptor("charge").letters == PROTEIN  # no process: the standard order


@pytest.mark.parametrize("alphabet,letters", [("ACGT", None), ("ACGT", "ACGT"), ("ACGU-", None)])
def test_a_nucleotide_model_is_not_scored_as_a_protein(alphabet, letters):
    process = _process(alphabet, pad="-" if alphabet.endswith("-") else None)
    for cls, kw in ((ProteinDescriptor, {}), (DescriptorConstraint, {"low": 0.0})):
        with pytest.raises(ConfigError, match="scores proteins, but the model's alphabet .* looks like nucleotides"):
            cls("charge", letters=letters, process=process, **kw)
    with pytest.raises(ConfigError, match="look"):
        ProteinDescriptor("charge", letters="ACGT")


@pytest.mark.parametrize("low,high", [(float("inf"), None), (None, float("-inf")), (float("-inf"), None),
                                      (float("-inf"), float("inf")), (None, float("inf"))])
def test_impossible_or_empty_bounds_and_bad_ph_are_config_errors(low, high):
    with pytest.raises(ConfigError, match="bounds"):
        DescriptorConstraint("charge", low=low, high=high)
    for ph in (-0.5, 14.5, float("nan")):
        with pytest.raises(ConfigError, match="ph must be between 0 and 14"):
            ProteinDescriptor("charge", ph=ph)


@pytest.mark.parametrize("descriptor", ["hydrophobicity", "charge", "instability"])
def test_protein_descriptor_refuses_empty_and_unknown_letters(descriptor):
    from difftilt.plugins.sequences.descriptors import protein_descriptor

    assert protein_descriptor("MKV", descriptor) == pytest.approx(_bio("MKV", descriptor))
    with pytest.raises(InputDataError, match="empty"):
        protein_descriptor("", descriptor)
    for seq in ("MKXV", "MBV", "MZV", "MUV", "MOV"):
        with pytest.raises(InputDataError, match="outside the 20 standard amino acids"):
            protein_descriptor(seq, descriptor)
    assert ProteinDescriptor(descriptor)(torch.zeros(0, 4, 21)).value.shape == (0,)
