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
from .mdlm import MaskedDiffusionProcess, padding_letter

__all__ = ["ProteinDescriptor", "DescriptorConstraint", "protein_descriptor", "DESCRIPTORS"]

DESCRIPTORS = ("hydrophobicity", "charge", "instability")


def _analysis(sequence: str):
    try:
        from Bio.SeqUtils.ProtParam import ProteinAnalysis
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise OptionalDependencyError("protein descriptors need biopython: pip install 'difftilt[sequences]'") from e
    return ProteinAnalysis(sequence)


def protein_descriptor(sequence: str, descriptor: str, ph: float = 7.0) -> float:
    """One descriptor of one protein sequence (upper-case one-letter codes)."""
    analysis = _analysis(sequence)
    if descriptor == "hydrophobicity":
        return float(analysis.gravy())
    if descriptor == "charge":
        return float(analysis.charge_at_pH(ph))
    if descriptor == "instability":
        return float(analysis.instability_index())
    raise ConfigError(f"unknown protein descriptor '{descriptor}'; choose one of {', '.join(DESCRIPTORS)}")


class _DescriptorBase(Reward):
    differentiable = False

    def __init__(self, descriptor: str, ph: float, letters: str, process: Process | None):
        super().__init__()
        if descriptor not in DESCRIPTORS:
            raise ConfigError(f"unknown protein descriptor '{descriptor}'; choose one of {', '.join(DESCRIPTORS)}")
        if not math.isfinite(float(ph)):
            raise ConfigError(f"ph must be a finite number, got {ph}")
        if not letters or len(set(letters)) != len(letters):
            raise ConfigError(f"letters must be distinct characters, got '{letters}'")
        unknown = sorted(set(letters) - set(PROTEIN))
        if unknown:
            raise ConfigError(f"letters {''.join(unknown)!r} are not standard amino acids ({PROTEIN})")
        self.pad = padding_letter(process, letters, type(self).__name__)
        if self.pad is not None:  # a model of variable-length proteins: its letters, then its padding letter
            letters += self.pad
        if isinstance(process, MaskedDiffusionProcess) and process.vocab_size != len(letters):
            raise ConfigError(f"{type(self).__name__} reads sequences over {len(letters)} letters, but the process "
                              f"makes {process.vocab_size}")
        self.descriptor, self.ph, self.letters = descriptor, float(ph), letters

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
        letters: the design alphabet; token ``i`` of ``x`` is ``letters[i]``.
        process: the chain, to check that it makes sequences over ``letters`` (a padded
            model's alphabet is ``letters`` and its padding letter, cut off before scoring).

    ``evaluate(x)``: ``x`` is ``(b, L, len(letters) + 1)``; returns values ``(b,)``.
    """

    def __init__(self, descriptor: Literal["hydrophobicity", "charge", "instability"], ph: float = 7.0,
                 target: float | None = None, letters: str = PROTEIN, process: Process | None = None):
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
        low, high: the bounds (inclusive); one may be omitted.
    """

    def __init__(self, descriptor: Literal["hydrophobicity", "charge", "instability"], low: float | None = None,
                 high: float | None = None, ph: float = 7.0, letters: str = PROTEIN,
                 process: Process | None = None):
        super().__init__(descriptor, ph, letters, process)
        if low is None and high is None:
            raise ConfigError("DescriptorConstraint needs low, high or both")
        self.low = -math.inf if low is None else float(low)
        self.high = math.inf if high is None else float(high)
        if math.isnan(self.low) or math.isnan(self.high) or self.low > self.high:
            raise ConfigError(f"DescriptorConstraint needs low <= high, got [{low}, {high}]")

    @property
    def name(self) -> str:
        return f"DescriptorConstraint[{self.low:g} <= {self.descriptor} <= {self.high:g}]"

    def evaluate(self, x: Tensor) -> RewardOutput:
        values, masked = self.descriptors(x)
        inside = (values >= self.low) & (values <= self.high)
        return RewardOutput(torch.zeros(x.shape[0], dtype=self._dtype(x), device=x.device), inside & ~masked)
