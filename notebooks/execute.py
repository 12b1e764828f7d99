"""Run notebooks top to bottom at full size and save them with their outputs.

    python notebooks/execute.py notebooks/*.ipynb        (or: make notebooks)

Needs nbclient and ipykernel (``make notebooks`` installs them into the venv). A progress
bar's many redraws are kept as its last state, and cell timestamps are dropped, so that a
re-run changes only what the notebook printed and drew.
"""

from __future__ import annotations

import sys
import time

import nbformat
from nbclient import NotebookClient


# tqdm's warning, in a kernel without ipywidgets, that it draws its bars as text
_NO_WIDGETS = "TqdmWarning: IProgress not found"


def _last_redraw(text: str) -> str:
    """Each line as a terminal would show it: what follows its last carriage return."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def tidy(nb: nbformat.NotebookNode) -> None:
    """Merge each cell's consecutive stream outputs, keep progress bars' last redraw, drop
    empty streams, tqdm's warning that there are no widgets, and execution timestamps."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.metadata.pop("execution", None)
        merged: list = []
        for out in cell.outputs:
            last = merged[-1] if merged else None
            if out.output_type == "stream" and last is not None and last.output_type == "stream" \
                    and last.name == out.name:
                last.text += out.text
            else:
                merged.append(out)
        for out in merged:
            if out.output_type == "stream":
                lines = _last_redraw(out.text).split("\n")
                out.text = "\n".join([line for line in lines[:-1] if line.strip()] + lines[-1:])
        cell.outputs = [o for o in merged if not (o.output_type == "stream" and not o.text.strip())
                        and not (o.output_type == "stream" and o.name == "stderr" and _NO_WIDGETS in o.text)]


def execute(path: str) -> float:
    nb = nbformat.read(path, as_version=4)
    nbformat.validator.normalize(nb)
    start = time.time()
    NotebookClient(nb, timeout=3600, kernel_name="python3").execute()
    tidy(nb)
    nbformat.write(nb, path)
    return time.time() - start


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(f"{arg}: {execute(arg):.0f} s", flush=True)
