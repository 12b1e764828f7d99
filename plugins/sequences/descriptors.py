"""Cheap physico-chemical protein descriptors as rewards and constraints (via biopython).

Each descriptor is computed by ``Bio.SeqUtils.ProtParam.ProteinAnalysis`` on the letters
of a one-hot design ``x: (b, L, V + 1)`` (token ``i`` is ``letters[i]``, the last channel
the mask token):

* ``hydrophobicity`` -- the GRAVY score (grand average of hydropathy): the mean
  Kyte-Doolittle hydropathy of the residues (Kyte & Doolittle 1982, "A simple method for
  displaying the hydropathic character of a protein", J. Mol. Biol. 157:105),
  ``ProteinAnalysis.gravy()``. Positive is hydrophobic.
* ``charge`` -- the net charge at pH ``ph`` from the residues' pKa values (Henderson-
  Hasselbalch), ``ProteinAnalysis.charge_at_pH(ph)``.
* ``instability`` -- the instability index (Guruprasad, Reddy & Pandit 1990, "Correlation
  between stability of a protein and its dipeptide composition", Protein Eng. 4:155),
  ``ProteinAnalysis.instability_index()``; above 40 predicts an unstable protein.

:class:`ProteinDescriptor` returns the descriptor, or ``-|descriptor - target|`` with a
``target`` (a soft constraint, 0 at the target). :class:`DescriptorConstraint` is a hard
one: value 0, feasible where the descriptor lies in ``[low, high]``. Neither is
differentiable; both compose with other rewards through ``+`` and ``*``
(e.g. ``EhrlichReward() + 0.1 * ProteinDescriptor("hydrophobicity", target=0.0)``).
A design with a position still masked is infeasible. A model of variable-length proteins
(a padding letter) is scored on each design without its padding, and a design that is not
a sequence (a letter after a pad) is infeasible.

Designs are read in the process's alphabet (``letters=None``, the default; :data:`PROTEIN`
without a process or one without an alphabet): a model pretrained with its letters in
another order (``ARNDCQEGHILKMFPSTWYV``) is scored on its own letters, and an explicit
``letters`` that differs from the model's is refused rather than silently misread. A
nucleotide alphabet (all letters in ``ACGTU``) is refused too: A, C, G and T are amino
acids as well, so a DNA design would otherwise get a protein's score.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from difftilt.core.errors import ConfigError, InputDataError, OptionalDependencyError
from difftilt.core.process import Process
from difftilt.core.reward import Reward, RewardOutput

from .alphabets import PROTEIN, to_strings, well_padded
from .mdlm import MaskedDiffusionProcess

__all__ = ["ProteinDescriptor", "DescriptorConstraint", "protein_descriptor", "protein_letters", "DESCRIPTORS"]

DESCRIPTORS = ("hydrophobicity", "charge", "instability")
_NUCLEOTIDES = "ACGTU"


def protein_letters(process: Process | None, letters: str | None, reader: str) -> tuple[str, str | None]:
    """The letters a protein reward (``reader``) reads designs in, and the process's padding
    letter (``None`` if it has none).

    ``letters=None`` means the process's alphabet without its padding letter, else
    :data:`PROTEIN` (as :class:`FunctionReward` defaults to the model's alphabet): a reward
    that assumed :data:`PROTEIN` would read a model with another letter order as other
    amino acids and score it silently wrong. :class:`ConfigError` for explicit ``letters``
    that are not the process's, for letters that are all nucleotides (A, C, G, T are amino
    acids too, so a DNA model would be scored as a protein), and for a token count that
    is not the process's.
    """
    model = process if isinstance(process, MaskedDiffusionProcess) else None
    pad = model.pad if model is not None else None
    own = None
    if model is not None and model.alphabet is not None:
        own = model.alphabet[:-1] if pad is not None else model.alphabet
    if letters is None:
        letters = own or PROTEIN
    elif own is not None and letters != own:
        without = f" (without its padding letter {pad!r})" if pad is not None else ""
        raise ConfigError(f"{reader}: letters {letters!r} are not the process's alphabet {own!r}{without}; leave "
                          "letters out to read designs in the process's alphabet")
    if not letters or len(set(letters)) != len(letters):
        raise ConfigError(f"letters must be distinct characters, got '{letters}'")
    if set(letters.upper()) <= set(_NUCLEOTIDES):
        whose = "the model's alphabet" if letters == own else "the letters"
        raise ConfigError(f"{reader} scores proteins, but {whose} {letters!r} looks like nucleotides (all in "
                          f"{_NUCLEOTIDES}); score a DNA/RNA model with a nucleotide reward (tfbind8, function)")
    tokens = len(letters) + (pad is not None)
    if model is not None and model.vocab_size != tokens:
        raise ConfigError(f"{reader} reads sequences over {len(letters)} letters, but the process makes "
                          f"{model.vocab_size}")
    return letters, pad


def _analysis(sequence: str):
    try:
        from Bio.SeqUtils.ProtParam import ProteinAnalysis
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise OptionalDependencyError("protein descriptors need biopython: pip install 'difftilt[sequences]'") from e
    return ProteinAnalysis(sequence)


def _check_ph(ph: float) -> float:
    if not 0.0 <= float(ph) <= 14.0:  # NaN fails too
        raise ConfigError(f"ph must be between 0 and 14, got {ph}")
    return float(ph)


def protein_descriptor(sequence: str, descriptor: str, ph: float = 7.0) -> float:
    """One descriptor of one protein sequence (upper-case one-letter codes of the 20 standard
    amino acids).

    :class:`InputDataError` for an empty sequence or other letters (X, B, Z, U, O, lower
    case, ...): biopython divides by the length, and has no values for those letters (a
    ``KeyError`` for some descriptors, a number that silently ignores them for others).
    The rewards never hit either (they score only complete designs over standard letters),
    so no NaN is needed to mark such a sequence.
    """
    if descriptor not in DESCRIPTORS:
        raise ConfigError(f"unknown protein descriptor '{descriptor}'; choose one of {', '.join(DESCRIPTORS)}")
    ph = _check_ph(ph)
    if not sequence:
        raise InputDataError(f"cannot compute the {descriptor} of an empty protein sequence")
    unknown = sorted(set(sequence) - set(PROTEIN))
    if unknown:
        raise InputDataError(f"protein sequence has letters {''.join(unknown)!r} outside the 20 standard amino "
                             f"acids ({PROTEIN}, upper case), for which the {descriptor} is not defined")
    analysis = _analysis(sequence)
    if descriptor == "hydrophobicity":
        return float(analysis.gravy())
    if descriptor == "charge":
        return float(analysis.charge_at_pH(ph))
    if descriptor == "instability":
        return float(analysis.instability_index())


class _DescriptorBase(Reward):
    differentiable = False

    def __init__(self, descriptor: str, ph: float, letters: str | None, process: Process | None):
        super().__init__()
        if descriptor not in DESCRIPTORS:
            raise ConfigError(f"unknown protein descriptor '{descriptor}'; choose one of {', '.join(DESCRIPTORS)}")
        ph = _check_ph(ph)
        letters, self.pad = protein_letters(process, letters, type(self).__name__)
        unknown = sorted(set(letters) - set(PROTEIN))
        if unknown:
            raise ConfigError(f"letters {''.join(unknown)!r} are not standard amino acids ({PROTEIN})")
        if self.pad is not None:  # a model of variable-length proteins: its letters, then its padding letter
            letters += self.pad
        self.descriptor, self.ph, self.letters = descriptor, ph, letters

    def descriptors(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Descriptor values ``(b,)`` (float64, 0 where unscored) and ``unscored`` ``(b,)`` of
        ``x: (b, L, V + 1)``: designs with a position still masked, or, padded, not a sequence
        (letters, then padding only); a padded design is scored without its padding."""
        V = len(self.letters)
        if x.ndim != 3 or x.shape[-1] != V + 1 or x.shape[1] < 1:
            raise InputDataError(f"{type(self).__name__} expects one-hot sequences (b, L, {V + 1}) over "
                                 f"'{self.letters}' + mask, got shape {tuple(x.shape)}")
        ids = x.detach().argmax(-1)
        unscored = (ids >= V).any(-1)
        if self.pad is not None:
            unscored |= ~well_padded(ids, V - 1)
        strings = to_strings(ids.tolist(), self.letters, self.pad)
        values = [0.0 if u else protein_descriptor(s, self.descriptor, self.ph)
                  for s, u in zip(strings, unscored.tolist())]
        return torch.tensor(values, dtype=torch.float64, device=x.device), unscored

    @staticmethod
    def _dtype(x: Tensor) -> torch.dtype:
        return x.dtype if x.is_floating_point() else torch.float32


class ProteinDescriptor(_DescriptorBase):
    """A biopython descriptor of a one-hot protein design, as a reward.

    Args:
        descriptor: ``"hydrophobicity"`` (Kyte-Doolittle GRAVY), ``"charge"`` (net charge at
            ``ph``) or ``"instability"`` (Guruprasad instability index).
        ph: the pH of ``charge``.
        target: if given, the value is ``-|descriptor - target|`` (0 at the target).
        letters: the design alphabet; token ``i`` of ``x`` is ``letters[i]``. By default the
            process's alphabet (without its padding letter), else :data:`PROTEIN`; explicit
            letters must be the process's.
        process: the chain, whose alphabet the designs are read in (a padded model's
            alphabet is ``letters`` and its padding letter, cut off before scoring).

    ``evaluate(x)``: ``x`` is ``(b, L, len(letters) + 1)``; returns values ``(b,)``.
    """

    def __init__(self, descriptor: Literal["hydrophobicity", "charge", "instability"], ph: float = 7.0,
                 target: float | None = None, letters: str | None = None, process: Process | None = None):
        super().__init__(descriptor, ph, letters, process)
        if target is not None and not math.isfinite(float(target)):
            raise ConfigError(f"target must be a finite number, got {target}")
        self.target = None if target is None else float(target)

    @property
    def name(self) -> str:
        return f"ProteinDescriptor[{self.descriptor}]" + ("" if self.target is None else f"->{self.target:g}")

    def evaluate(self, x: Tensor) -> RewardOutput:
        values, masked = self.descriptors(x)
        if self.target is not None:
            values = -(values - self.target).abs()
        return RewardOutput(values.masked_fill(masked, 0.0).to(self._dtype(x)), ~masked)


class DescriptorConstraint(_DescriptorBase):
    """Feasible where a descriptor lies in ``[low, high]`` (value 0): a hard constraint to add
    to another reward, e.g. ``EhrlichReward() + DescriptorConstraint("charge", low=-2, high=2)``.

    Args:
        descriptor, ph, letters, process: as in :class:`ProteinDescriptor`.
        low, high: the bounds (inclusive); one may be omitted. Bounds that no value can meet
            (``low=inf``, ``high=-inf``, ``low > high``) or that every value meets (none
            finite) are refused: the first makes every design infeasible, the second is no
            constraint, and either is a mistake.
    """

    def __init__(self, descriptor: Literal["hydrophobicity", "charge", "instability"], low: float | None = None,
                 high: float | None = None, ph: float = 7.0, letters: str | None = None,
                 process: Process | None = None):
        super().__init__(descriptor, ph, letters, process)
        if low is None and high is None:
            raise ConfigError("DescriptorConstraint needs low, high or both")
        self.low = -math.inf if low is None else float(low)
        self.high = math.inf if high is None else float(high)
        if math.isnan(self.low) or math.isnan(self.high) or self.low > self.high:
            raise ConfigError(f"DescriptorConstraint needs low <= high, got [{low}, {high}]")
        if self.low == math.inf or self.high == -math.inf:
            raise ConfigError(f"DescriptorConstraint's bounds [{low}, {high}] admit no value (low must be below "
                              "inf, high above -inf)")
        if self.low == -math.inf and self.high == math.inf:
            raise ConfigError(f"DescriptorConstraint's bounds [{low}, {high}] admit every value; give a finite "
                              "low or high")

    @property
    def name(self) -> str:
        return f"DescriptorConstraint[{self.low:g} <= {self.descriptor} <= {self.high:g}]"

    def evaluate(self, x: Tensor) -> RewardOutput:
        values, masked = self.descriptors(x)
        inside = (values >= self.low) & (values <= self.high)
        return RewardOutput(torch.zeros(x.shape[0], dtype=self._dtype(x), device=x.device), inside & ~masked)
