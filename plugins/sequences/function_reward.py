"""Your own oracle: a Python function of sequence strings as the reward.

An assay wrapper, a structure predictor's confidence, a docking score: anything that
scores a batch of sequences can be the ground truth of ``difftilt online`` without a
plugin of its own::

    oracle:
      reward: {name: function, target: "my_assay.py:score"}   # or "my_package.assay:score"

``score`` is called with a list of strings (one letter per position, in the model's
alphabet) and returns one number per sequence, or ``None`` for a sequence that has no
score (infeasible: it failed expression, it could not be synthesized). A NaN is recorded
as that design's failure; a list of the wrong length, something not a number, or an
exception fails the batch: it is recorded in the feedback store and reported in one line,
and ``oracle.retries``, ``timeout`` and ``on_error`` apply. A design with a position still masked is infeasible
and never reaches the function. With a model of variable-length sequences (one pretrained
with a padding letter) the strings have their padding cut off, and a design that is not a
sequence (a letter after a pad, or padding only) is infeasible and never reaches it either.

It is taken to be a real experiment: it is only called within the oracle's budget, so an
online config needs ``eval_samples: 0`` (the per-round diagnostic that scores the model's
samples outside the budget), unless the reward says ``cheap: true`` (a simulator).

``target`` is ``module:attribute`` (imported as usual, so the module must be importable)
or ``path/to/file.py:attribute`` (a path relative to the working directory). The function
is found when the reward is built, so a typo fails before any run folder is made.

A lab in the loop, whose answers come days later: ``reward: {name: lab, file:
measurements.csv}`` (:class:`MeasurementFile`). Each round's sequences are appended to the
file with an empty ``value``, and ``difftilt online`` stops (exit status 3) saying so. Fill
in each value (a number, or ``infeasible``), then ``difftilt online --resume RUN`` reads
them and runs the next round, which it appends in turn. A function of your own can do the
same: raise :class:`~difftilt.core.errors.AwaitingAnswers` for a batch that has no results
yet, and it stays pending until the run is resumed.
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import numbers
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from difftilt.core.errors import AwaitingAnswers, ConfigError, RewardError
from difftilt.core.process import Process
from difftilt.core.reward import Reward, RewardOutput

from .alphabets import default_alphabet, to_strings, token_ids, well_padded
from .mdlm import MaskedDiffusionProcess

__all__ = ["FunctionReward", "MeasurementFile", "lab", "load_target"]


def load_target(target: str) -> Callable:
    """The callable named by ``"module:attribute"`` or ``"path/to/file.py:attribute"``."""
    where, sep, attr = str(target).rpartition(":")
    if not sep or not where or not attr:
        raise ConfigError(f"target: expected 'module:function' or 'file.py:function', got {target!r}")
    if where.endswith(".py"):
        path = Path(where).expanduser()
        if not path.is_file():
            raise ConfigError(f"target: no file {str(path)!r} (relative paths are read from {Path.cwd()})")
        name = f"_difftilt_oracle_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # so that pickling and dataclasses inside it work
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise ConfigError(f"target: importing {str(path)!r} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ConfigError(f"target: cannot import module {where!r}: {e}") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise ConfigError(f"target: {where!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ConfigError(f"target: {where}:{attr} is a {type(fn).__name__}, not a function")
    return fn


class FunctionReward(Reward):
    """A user's function of sequence strings as a reward (not differentiable).

    Args:
        target: ``"module:function"`` or ``"file.py:function"`` (or the function itself);
            the function maps a list of ``b`` strings to ``b`` numbers or ``None`` (no
            score: infeasible).
        letters: the alphabet, token ``i`` is ``letters[i]``; by default the model's
            (``process``), else proteins for 20 tokens and DNA for 4.
        cheap: ``False`` (the default): the function is a real experiment, called only
            within the oracle's budget, so the online loop needs ``eval_samples: 0`` (its
            per-round diagnostic scores model samples outside the budget). ``True``: a
            simulator, which the diagnostics may call.
        process: the chain, whose alphabet (and padding letter) decodes the designs.

    ``evaluate(x)``: ``x`` is ``(b, L, V + 1)`` one-hot; returns values ``(b,)`` (float64)
    and feasibility.
    """

    differentiable = False

    def __init__(self, target: str | Callable, letters: str | None = None, cheap: bool = False,
                 process: Process | None = None):
        super().__init__()
        self.target, self.simulated = str(target), bool(cheap)
        self.fn = target if callable(target) else load_target(self.target)
        model = process.alphabet if isinstance(process, MaskedDiffusionProcess) else None
        if letters is not None:
            if not letters or len(set(letters)) != len(letters):
                raise ConfigError(f"letters must be distinct characters, got {letters!r}")
            if isinstance(process, MaskedDiffusionProcess) and len(letters) != process.vocab_size:
                raise ConfigError(f"letters has {len(letters)} characters, but the process makes sequences over "
                                  f"{process.vocab_size} tokens")
        self.letters = letters or model
        self.pad = process.pad if isinstance(process, MaskedDiffusionProcess) else None
        if self.pad is not None and self.pad not in self.letters:
            raise ConfigError(f"letters {self.letters!r} lack the process's padding letter {self.pad!r}")
        if self.letters is None and isinstance(process, MaskedDiffusionProcess):
            self.letters = default_alphabet(process.vocab_size)

    @property
    def name(self) -> str:
        return self.target

    def evaluate(self, x: Tensor) -> RewardOutput:
        if x.ndim != 3 or x.shape[-1] < 2:
            raise RewardError(f"{self.target}: expects one-hot sequences (b, L, V + 1), got shape {tuple(x.shape)}")
        V = x.shape[-1] - 1
        letters = self.letters or default_alphabet(V)
        if len(letters) != V:
            raise RewardError(f"{self.target}: designs have {V} letters, the alphabet {letters!r} has "
                              f"{len(letters)}")
        ids, masked = token_ids(x, V)  # a masked design is not asked, nor one that is not a sequence
        unasked = masked if self.pad is None else masked | ~well_padded(ids, letters.index(self.pad))
        strings = to_strings(ids.tolist(), letters, self.pad)
        rows = [i for i, m in enumerate(unasked.tolist()) if not m]  # the designs the function is asked
        answers = list(self.fn([strings[i] for i in rows])) if rows else []
        if len(answers) != len(rows):
            raise RewardError(f"{self.target} returned {len(answers)} values for {len(rows)} sequences")
        values = torch.zeros(len(strings), dtype=torch.float64)
        feasible = ~unasked.cpu()
        for i, a in zip(rows, answers):
            if a is None:
                feasible[i] = False
            elif (isinstance(a, numbers.Real) and not isinstance(a, bool)) or _is_scalar_tensor(a):
                values[i] = float(a)  # a NaN is the oracle's to record (as failed)
            else:
                raise RewardError(f"{self.target} returned {type(a).__name__} {a!r} for {strings[i]!r}; "
                                  "expected a number or None")
        return RewardOutput(values.to(x.device), feasible.to(x.device))


class MeasurementFile:
    """A lab in the loop through one CSV file with the columns ``sequence`` and ``value``.

    Called with sequences, it returns their values if every one has a value in the file (a
    number, or ``infeasible``: no score), and otherwise appends the ones not yet listed,
    with an empty value, and raises :class:`~difftilt.core.errors.AwaitingAnswers`. Rows
    are only ever appended, so the file can be edited between calls (other columns are
    kept and ignored); a sequence listed twice must have one value. A relative path is read
    from the working directory, so resume a run from where it started. A file it cannot read
    (a missing column, a value that is not a number) also leaves the designs waiting, with
    the line to fix, rather than record them as failed.
    """

    INFEASIBLE = "infeasible"

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()

    def __str__(self) -> str:
        return f"lab:{self.path}"

    def read(self) -> dict[str, float | None | str]:
        """``sequence -> value``: a number, ``None`` (infeasible) or ``""`` (not measured yet)."""
        if not self.path.is_file():
            return {}
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            if not {"sequence", "value"} <= set(reader.fieldnames or ()):
                raise AwaitingAnswers(f"{self.path}: needs the columns 'sequence' and 'value', has "
                                      f"{', '.join(reader.fieldnames or ()) or 'none'}")
            known: dict[str, float | None | str] = {}
            for line, row in enumerate(reader, start=2):
                seq, text = (row["sequence"] or "").strip(), (row["value"] or "").strip()
                value = self._value(text, line)
                if seq in known and known[seq] != value and "" not in (known[seq], value):
                    raise AwaitingAnswers(f"{self.path} line {line}: {seq} is listed again with another value "
                                          f"({text!r} after {known[seq]!r})")
                if value != "" or seq not in known:
                    known[seq] = value
        return known

    def _value(self, text: str, line: int) -> float | None | str:
        if text == "":
            return ""  # not measured yet
        if text.lower() == self.INFEASIBLE:
            return None
        try:
            return float(text)
        except ValueError:
            raise AwaitingAnswers(f"{self.path} line {line}: value {text!r} is neither a number nor "
                                  f"'{self.INFEASIBLE}'") from None

    def __call__(self, sequences: list[str]) -> list[float | None]:
        known = self.read()
        waiting = [s for s in dict.fromkeys(sequences) if known.get(s, "") == ""]
        if not waiting:
            return [known[s] for s in sequences]
        new = [s for s in waiting if s not in known]
        if new:
            header = not self.path.is_file() or self.path.stat().st_size == 0
            new_line = not header and not self.path.read_bytes().endswith(b"\n")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", newline="") as f:
                if new_line:
                    f.write("\n")
                writer = csv.writer(f, lineterminator="\n")
                if header:
                    writer.writerow(["sequence", "value"])
                writer.writerows([s, ""] for s in new)
        raise AwaitingAnswers(f"fill in their value (a number, or '{self.INFEASIBLE}') in {self.path.absolute()}",
                              count=len(waiting))


def lab(file: str, letters: str | None = None, process: Process | None = None) -> FunctionReward:
    """The ``lab`` reward: a :class:`MeasurementFile` as the oracle (a real experiment)."""
    return FunctionReward(MeasurementFile(file), letters=letters, process=process)


def _is_scalar_tensor(a) -> bool:
    return hasattr(a, "shape") and hasattr(a, "__float__") and tuple(a.shape) == ()
