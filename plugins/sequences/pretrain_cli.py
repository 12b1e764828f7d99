"""``difftilt pretrain`` for the sequences domain: data sources and the config schema.

A pretraining config (YAML)::

    plugin: sequences
    output: plugins/sequences/checkpoints/ehrlich-20-32-2-4   # model folder to write
    data:                      # where the corpus comes from (all ship with the package)
      name: ehrlich            # ehrlich | tfbind8 | file
      ...                      # the source's options (below)
    model: {dim: 128, depth: 3, heads: 4}          # SequenceDenoiser options
    process: {num_steps: 64, schedule: linear}     # the reverse chain's settings
    train: {steps: 3000, batch_size: 256, lr: 1e-3, seed: 0}
    # also: val_fraction (hold out that share, log its loss), save_every (steps between
    # saves of the training state, for --resume)

Data sources:

* ``ehrlich``: ``num_sequences`` draws of the Ehrlich instance's feasible-sequence model
  (its Markov chain), with ``num_states, length, num_motifs, motif_length, quantization,
  seed``; data seed ``data_seed``.
* ``tfbind8``: the lower half of the TFBind8 table (design-bench's offline set), ``table``.
* ``file``: one sequence per line, or FASTA (each record's lines joined), over ``alphabet``
  (upper case; the file is read in upper case), all of the same length; or, with ``pad`` (a character outside ``alphabet``, e.g. ``"-"``), of
  any lengths: each is padded at its end with ``pad`` to the longest one's length
  (``length``, if given, longer sequences are an error), and the model learns where its
  sequences end. ``pad`` becomes the alphabet's last letter and the process's padding letter
  (decoded designs have it cut off; a function reward is asked only well-formed ones).
  Each reverse step lets a position take only what keeps the sequence letters-then-padding
  (:func:`~.mdlm.padding_rule`), so the first-hitting chain, which decides one position
  at a time, draws only well-formed designs; it is the padded model's sampler unless
  ``process`` names a ``sampler`` or ``num_steps``. The ancestral chain can still unmask a
  pad and a letter after it in one step.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

from difftilt.core.config import validate_kwargs
from difftilt.core.errors import ConfigError, InputDataError, Terminated

from .alphabets import DNA, PROTEIN, NotUTF8, default_alphabet, utf8_text
from .ehrlich import EhrlichFunction
from .mdlm import MaskedDiffusionProcess, SequenceDenoiser
from .pretrain import STATE_FILE, plot_pretraining, read_state, save_pretrained, train_masked_diffusion
from .tfbind8 import TFBind8

__all__ = ["pretrain_from_config", "ehrlich_corpus", "tfbind8_corpus", "file_corpus", "encode_strings"]


def encode_strings(lines: list[str], alphabet: str, pad: str | None = None,
                   length: int | None = None, where: list[str] | None = None) -> torch.Tensor:
    """Strings over ``alphabet`` -> ``(n, L)`` token ids, with a clear error naming the first
    bad letter or length. Without ``pad`` all must have one length; with ``pad`` (a letter of
    ``alphabet`` that no string uses) each is padded at its end to ``length`` (default: the
    longest string's). ``where``: each string's place in its file, for the errors."""
    lookup = {c: i for i, c in enumerate(alphabet)}
    if not lines:
        raise InputDataError("no sequences given")
    if pad is None:
        L = len(lines[0])
    else:
        L = max(len(s) for s in lines) if length is None else int(length)
        if L < 1:
            raise InputDataError(f"length must be >= 1, got {L}")
    out = torch.empty(len(lines), L, dtype=torch.long)
    for n, s in enumerate(lines):
        name = f"sequence {n}" + (f" ({where[n]})" if where else "")
        if pad is None:
            if len(s) != L:
                raise InputDataError(f"{name} has length {len(s)}, expected {L} (all sequences must have one "
                                     "length, or give a padding letter)")
        else:
            if not 1 <= len(s) <= L:
                raise InputDataError(f"{name} has length {len(s)}, expected 1 to {L}")
            if pad in s:
                raise InputDataError(f"{name} contains the padding letter {pad!r} at position {s.index(pad)}")
            s += pad * (L - len(s))
        for j, c in enumerate(s):
            if c not in lookup:
                raise InputDataError(f"{name} has letter {c!r} at position {j}, outside the alphabet {alphabet!r}")
            out[n, j] = lookup[c]
    return out


def ehrlich_corpus(num_states: int = 20, length: int = 32, num_motifs: int = 2, motif_length: int = 4,
                   quantization: int | None = None, seed: int = 0, num_sequences: int = 50_000,
                   data_seed: int = 0) -> tuple[torch.Tensor, str, None]:
    f = EhrlichFunction(num_states, length, num_motifs, motif_length, quantization, seed)
    tokens = f.sample_feasible(num_sequences, generator=torch.Generator().manual_seed(data_seed))
    return tokens, default_alphabet(num_states), None


def tfbind8_corpus(table: str = "SIX6_REF_R1") -> tuple[torch.Tensor, str, None]:
    return TFBind8(table).offline_dataset(), DNA, None


def file_corpus(path: str, alphabet: str = PROTEIN, pad: str | None = None,
                length: int | None = None) -> tuple[torch.Tensor, str, str | None]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"data.path: no file {p}")
    if not isinstance(alphabet, str) or not alphabet:
        raise ConfigError(f"data.alphabet must be a string of letters, got {alphabet!r}")
    alphabet = alphabet.upper()  # the file is read in upper case
    twice = sorted({c for c in alphabet if alphabet.count(c) > 1})
    if twice:
        raise ConfigError(f"data.alphabet {alphabet!r} has {', '.join(map(repr, twice))} more than once")
    if pad is not None and (not isinstance(pad, str) or len(pad) != 1 or pad.upper() in alphabet
                            or pad in "?>" or pad.isspace()):
        raise ConfigError(f"data.pad must be one character outside the alphabet {alphabet!r} (not '?', which shows "
                          f"a masked position, '>' or a space), got {pad!r}")
    if length is not None and pad is None:
        raise ConfigError("data.length pads sequences to a length: it needs data.pad")
    seqs, where = read_sequences(p)
    letters = alphabet if pad is None else alphabet + pad
    tokens = encode_strings(seqs, letters, pad, length, where)
    used = set("".join(seqs))
    if alphabet == PROTEIN and (used <= set("ACGT") or used <= set("ACGU")):
        warnings.warn(f"{p}: data.alphabet is the 20 amino acids (the default), but the file uses only "
                      f"{''.join(sorted(used))}: for nucleotides, set data.alphabet (e.g. ACGT)", UserWarning,
                      stacklevel=2)
    return tokens, letters, pad


def read_sequences(path: Path) -> tuple[list[str], list[str]]:
    """The sequences of a text file, upper-cased, and where each starts (``line N of
    NAME``): one per line, or FASTA (a ``>`` header, then the record's sequence over one
    line or several, which are joined). Blank lines are skipped; a byte-order mark and
    Windows line ends are read as nothing."""
    try:
        text = utf8_text(path.read_bytes())
    except NotUTF8 as e:
        raise InputDataError(f"{path}: line {e.line} is not UTF-8 text (byte 0x{e.byte:02x}); save the file "
                             f"as UTF-8 or plain ASCII") from None
    lines = [ln.strip() for ln in text.splitlines()]
    fasta = any(ln.startswith(">") for ln in lines)
    seqs: list[str] = []
    where: list[str] = []
    joining = False
    for n, ln in enumerate(lines, 1):
        if ln.startswith(">"):
            joining = False
        elif ln:
            if fasta and joining:
                seqs[-1] += ln.upper()
            else:
                seqs.append(ln.upper())
                where.append(f"line {n} of {path.name}")
                joining = fasta
    return seqs, where


def _check_writable_folder(out: Path) -> None:
    """A model folder that cannot be written is an error before the training, not after it."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} is a file, not a model folder")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output {out}: cannot make the model folder there ({existing} is not a writable folder)")


SOURCES = {"ehrlich": ehrlich_corpus, "tfbind8": tfbind8_corpus, "file": file_corpus}


def pretrain_from_config(config: dict, progress: bool = True, output: str | None = None,
                         command: str | None = None, resume: bool = False) -> Path:
    """Train a masked-diffusion model as ``config`` says and write its folder; returns the folder.

    ``command`` is recorded in ``process.json`` as the command that made the model (by
    default, by :func:`save_pretrained`, this process's own command line). While it trains,
    the folder holds its state (:data:`~.pretrain.STATE_FILE`, every ``train.save_every``
    steps); a pretraining stopped at any moment continues with ``resume=True``
    (``difftilt pretrain CONFIG --resume``) and ends with the same model. The finished
    folder also holds ``training.png``, the loss (and held-out loss) against steps."""
    known = {"plugin", "output", "data", "model", "process", "train"}
    unknown = set(config) - known
    if unknown:
        raise ConfigError(f"unknown pretraining config field(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    out = output or config.get("output")
    if not out:
        raise ConfigError("pretraining config needs 'output' (the model folder to write), or pass --out")
    data = dict(config.get("data") or {})
    name = data.pop("name", None)
    if name not in SOURCES:
        raise ConfigError(f"data.name must be one of {', '.join(SOURCES)}, got {name!r}")
    # Every source returns its corpus, the alphabet it is written in (all letters, used or not)
    # and its padding letter (None: all sequences have one length).
    tokens, alphabet, pad = SOURCES[name](**validate_kwargs(SOURCES[name], data, "data"))
    model = dict(config.get("model") or {})
    train = dict(config.get("train") or {})
    proc = dict(config.get("process") or {})
    options = validate_kwargs(train_masked_diffusion, {**model, **train}, "model/train",
                              skip=("tokens", "vocab_size", "progress", "state_file", "resume", "command"))
    proc_opts = validate_kwargs(MaskedDiffusionProcess, proc, "process", skip=("denoiser", "alphabet", "pad"))
    proc_opts["pad"] = pad
    if pad is not None and "sampler" not in proc_opts and "num_steps" not in proc_opts:
        proc_opts["sampler"] = "first_hit"  # the chain that keeps every design letters, then padding
    # Check the chain's settings on a throwaway denoiser before spending the training time.
    MaskedDiffusionProcess(SequenceDenoiser(len(alphabet), tokens.shape[1], dim=8, depth=0, heads=1),
                           alphabet=alphabet, **proc_opts)
    _check_writable_folder(Path(out))
    state_file = Path(out) / STATE_FILE
    if not resume and state_file.exists():
        state = read_state(state_file)
        raise ConfigError(f"{out} holds an unfinished pretraining (step {state['step']:,} of "
                          f"{state['settings']['steps']:,}); continue it with --resume, or delete {state_file} "
                          f"to start over")
    try:
        net, log = train_masked_diffusion(tokens, len(alphabet), progress=progress, state_file=state_file,
                                          resume=resume, command=command, **options)
    except (KeyboardInterrupt, Terminated):  # Ctrl-C, or the command's SIGTERM
        if state_file.is_file():
            step = read_state(state_file)["step"]
            print(f"pretraining stopped; its state at step {step:,} is in {state_file}: continue it with "
                  f"{command or 'difftilt pretrain CONFIG'} --resume", file=sys.stderr)
        raise
    process = MaskedDiffusionProcess(net, alphabet=alphabet, **proc_opts)
    folder = save_pretrained(process, out, data={"name": name, **data, "num_sequences_used": int(tokens.shape[0])},
                             train={**model, **train}, losses=log.losses, val_losses=log.val_losses,
                             command=command)
    plot_pretraining(log, folder / "training.png", title=f"{name} corpus, {tokens.shape[0]:,} sequences")
    state_file.unlink(missing_ok=True)
    return folder
