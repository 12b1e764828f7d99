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
import io
import math
import numbers
import os
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from difftilt.core.errors import AwaitingAnswers, ConfigError, RewardError
from difftilt.core.process import Process
from difftilt.core.reward import Reward, RewardOutput

from .alphabets import NotUTF8, default_alphabet, to_strings, token_ids, utf8_text, well_padded
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
    from the working directory (a resumed run works in the one it was started from). A file it cannot read
    (not UTF-8 text, a quote left open, a missing column, a value that is not a finite
    number) also leaves the designs waiting, with the line to fix, rather than record them
    as failed: a typo must not cost a measurement, nor budget.

    The file is UTF-8, with or without the byte-order mark that Excel's "CSV UTF-8" puts
    first. ``letters``, the model's alphabet, says whether case matters: with letters all in
    one case (``ACGT``), a sequence typed as ``acgt`` is that design, as a person means it;
    with both cases (or no alphabet given) it is another sequence, and the message that
    the designs wait names the lines that differ from a waiting design only in case.
    """

    INFEASIBLE = "infeasible"

    def __init__(self, path: str | Path, letters: str | None = None):
        self.path = Path(path).expanduser()
        self.letters = letters

    def __str__(self) -> str:
        return f"lab:{self.path}"

    def read(self) -> dict[str, float | None | str]:
        """``sequence -> value``: a number, ``None`` (infeasible) or ``""`` (not measured yet);
        with an alphabet in one case, the sequences are in its case, as the designs are."""
        return {seq: value for seq, (value, _, _) in self._read(_case_fold(self.letters))[0].items()}

    def _read(self, fold: Callable[[str], str] | None) -> tuple[dict[str, tuple[float | None | str, int, str]], str]:
        """The file's sequences (through ``fold``) as ``sequence -> (value, line, as typed)``,
        from the line that gives the value (else the first that lists it), and its text."""
        if not self.path.is_file():
            return {}, ""
        try:  # a byte-order mark is dropped: a header '\ufeffsequence' would be no column
            text = utf8_text(self.path.read_bytes())
        except NotUTF8 as e:
            raise AwaitingAnswers(f"{self.path} {e}; save the file as 'CSV UTF-8' (in Excel: Save As, CSV UTF-8)"
                                  ) from None
        if not text.strip():
            return {}, text  # an empty file, as if there were none: it gets its header
        # strict: a quote left open is an error (else csv reads the rest of the file as its field)
        reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
        known: dict[str, tuple[float | None | str, int, str]] = {}
        try:
            reader.fieldnames = [name.strip() for name in reader.fieldnames or ()]
            if not {"sequence", "value"} <= set(reader.fieldnames):
                raise AwaitingAnswers(f"{self.path}: needs the columns 'sequence' and 'value', has "
                                      f"{', '.join(reader.fieldnames) or 'none'}")
            for row in reader:
                line = reader.line_num  # the file's line, blank lines counted
                typed, text_value = (row["sequence"] or "").strip(), (row["value"] or "").strip()
                seq, value = fold(typed) if fold else typed, self._value(text_value, line)
                if seq in known:
                    before = known[seq][0]
                    if before != value and "" not in (before, value):
                        raise AwaitingAnswers(f"{self.path} line {line}: {typed} is listed again with another "
                                              f"value ({text_value!r} after {before!r})")
                    if value == "" or before != "":
                        continue
                known[seq] = (value, line, typed)
        except csv.Error as e:  # a quote left open, say: named at the line where its row starts
            line = _row_start(text, reader.line_num)
            if str(e) == "unexpected end of data":  # the file ended inside quotes
                raise AwaitingAnswers(f"{self.path} line {line}: a quote opened in this row is never closed, so the "
                                      "rest of the file would read as one field; close or delete it") from None
            raise AwaitingAnswers(f"{self.path} line {line}: {e}") from None
        return known, text

    def _value(self, text: str, line: int) -> float | None | str:
        if text == "":
            return ""  # not measured yet
        if text.lower() == self.INFEASIBLE:
            return None
        try:
            value = float(text)
        except ValueError:
            raise AwaitingAnswers(f"{self.path} line {line}: value {text!r} is neither a number nor "
                                  f"'{self.INFEASIBLE}'") from None
        if not math.isfinite(value):  # float() reads 'nan' and 'inf', which no assay measures
            raise AwaitingAnswers(f"{self.path} line {line}: value {text!r} is not a finite number; a value must "
                                  f"be a finite number or '{self.INFEASIBLE}'")
        return value

    def __call__(self, sequences: list[str]) -> list[float | None]:
        fold = _case_fold(self.letters)
        known, text = self._read(fold)
        key = fold or (lambda s: s)
        waiting = [s for s in dict.fromkeys(sequences) if known.get(key(s), ("",))[0] == ""]
        if not waiting:
            return [known[key(s)][0] for s in sequences]
        new = list(dict.fromkeys(key(s) for s in waiting if key(s) not in known))
        if new:
            header = not text.strip()  # no file, or an empty one: written anew, with the header
            self.path.parent.mkdir(parents=True, exist_ok=True)
            end = "\r\n" if "\r\n" in text else "\n"  # as the file ends its lines (Excel: CRLF)
            with open(self.path, "w" if header else "a", encoding="utf-8", newline="") as f:
                if not header and not text.endswith(("\n", "\r")):
                    f.write(end)
                writer = csv.writer(f, lineterminator=end)
                if header:
                    writer.writerow(["sequence", "value"])
                writer.writerows([s, ""] for s in new)
        raise AwaitingAnswers(f"fill in their value (a number, or '{self.INFEASIBLE}') in {self.path.absolute()}"
                              f"{self._case_hint(waiting, known) if fold is None else ''}", count=len(waiting))

    def _case_hint(self, waiting: list[str], known: dict[str, tuple[float | None | str, int, str]]) -> str:
        """Where case matters: the lines whose sequence is a waiting design's in another case
        (typed as a person reads it), which otherwise wait with no word why."""
        designs = {s.casefold(): s for s in waiting}
        near = sorted((line, typed, designs[typed.casefold()]) for seq, (_, line, typed) in known.items()
                      if typed.casefold() in designs and typed != designs[typed.casefold()])
        if not near:
            return ""
        lines = ", ".join(f"line {line} lists {typed!r} for the design {design!r}" for line, typed, design in near[:3])
        more = f" (and {len(near) - 3} lines more)" if len(near) > 3 else ""
        why = f"the alphabet {self.letters!r} tells" if self.letters else "with no alphabet given, the file tells"
        return f"; {lines}{more}: {why} upper from lower case, so write a sequence as its design is written"


def lab(file: str, letters: str | None = None, process: Process | None = None) -> FunctionReward:
    """The ``lab`` reward: a :class:`MeasurementFile` as the oracle (a real experiment), with
    the alphabet the reward decodes designs with, which says whether the file's case matters."""
    sheet = MeasurementFile(file)
    # checked before any run folder is made: a file that cannot be written would fail the first round
    folder = next(p for p in (sheet.path, *sheet.path.absolute().parents) if p.exists())
    if sheet.path.is_dir():
        raise ConfigError(f"oracle.reward.file {file} is a folder; name a CSV file (e.g. {file}/measurements.csv)")
    if folder == sheet.path and not os.access(folder, os.R_OK | os.W_OK):
        raise ConfigError(f"oracle.reward.file {file}: cannot read and write it")
    if folder != sheet.path and (not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK)):
        raise ConfigError(f"oracle.reward.file {file}: cannot make it ({folder} is not a writable folder)")
    reward = FunctionReward(sheet, letters=letters, process=process)
    sheet.letters = reward.letters  # checked against the model's alphabet by the reward
    return reward


def _row_start(text: str, done: int) -> int:
    """The line of ``text`` where the row after line ``done`` starts (blank lines skipped, as
    csv skips them)."""
    lines = io.StringIO(text, newline="").readlines()  # split as csv reads them
    line = done + 1
    while line < len(lines) and lines[line - 1] in ("\n", "\r\n", "\r"):
        line += 1
    return line


def _case_fold(letters: str | None) -> Callable[[str], str] | None:
    """``str.upper`` (or ``str.lower``) for an alphabet whose letters are all in that case, so
    that it cannot tell ``a`` from ``A``; ``None`` where case matters, or the alphabet is not known."""
    if not letters:
        return None
    cased = [c for c in letters if c.upper() != c.lower()]
    if all(c == c.upper() for c in cased):
        return str.upper
    if all(c == c.lower() for c in cased):
        return str.lower
    return None


def _is_scalar_tensor(a) -> bool:
    return hasattr(a, "shape") and hasattr(a, "__float__") and tuple(a.shape) == ()
