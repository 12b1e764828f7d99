"""Helpers shared by the online benchmarks: mean ± std cells and reusable run folders."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

from difftilt.core.config import load_yaml, parse_yaml
from difftilt.core.errors import ConfigError, DifftiltError, stopped_by_sigterm, terminated_on_sigterm
from difftilt.core.online import EVOLUTION, RoundLines, config_differences, read_rows, run_online
from difftilt.core.run import RunFolder, run_kind

__all__ = ["check_folder", "check_online_run", "check_output", "fmt", "main_exit", "positive_int", "run_or_reuse",
           "yaml_setting"]


def fmt(values: list[float]) -> str:
    """``mean ± std`` of ``values`` (``-`` when empty)."""
    if not values:
        return "-"
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    spec = ".3f" if max(abs(m), s) < 1000 else ".2g"
    return f"{m:{spec}} ± {s:{spec}}"


def yaml_setting(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with a YAML value: an argparse ``type`` for options such as ``--finetune``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), parse_yaml(value)  # 1e-3 read as a number, as in --set


def positive_int(text: str) -> int:
    """An integer >= 1: an argparse ``type`` for counts such as ``--budget`` and ``--seeds``
    (a run of 0 calls or 0 seeds has no table to print, and used to fail only after the work)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _blocking_ancestor(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` when it is a file (so nothing can be made under it)."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_output(path: str | os.PathLike, option: str, suffixes: set[str] | None = None) -> Path:
    """``path`` as a file a benchmark can write when it has finished; a :class:`ConfigError`
    now otherwise (a folder, a path under a file, a suffix not in ``suffixes``), not a
    traceback after hours of runs."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{option} {path} is a folder: give a file path")
    blocker = _blocking_ancestor(p)
    if blocker is not None:
        raise ConfigError(f"{option} {path}: {blocker} is a file, not a folder")
    if suffixes is not None and p.suffix.lower().lstrip(".") not in suffixes:
        raise ConfigError(f"{option} {path}: its suffix names the format to write, one of "
                          f"{', '.join('.' + s for s in sorted(suffixes))}")
    return p


def plot_suffixes() -> set[str]:
    """The file suffixes matplotlib can save a figure as (png, pdf, svg, ...)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return set(FigureCanvasBase.get_supported_filetypes())


def check_folder(path: str | os.PathLike, option: str) -> Path:
    """``path`` as a folder that exists or can be made (not a file, nor under one)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{option} {path} is a file, not a folder")
    blocker = _blocking_ancestor(p)
    if blocker is not None:
        raise ConfigError(f"{option} {path}: {blocker} is a file, not a folder")
    return p


def check_online_run(folder: str | os.PathLike) -> None:
    """Refuse a ``difftilt finetune`` run folder where an online run folder is needed: read as
    an online config, its config would only say "config: unknown field 'reward'". A folder
    with no readable config is left to the online reader, which says so."""
    if run_kind(folder) == "finetune":
        raise ConfigError(f"{folder} is a finetune run folder (difftilt finetune), not an online run folder "
                          "(difftilt online, or a benchmark arm under --runs)")


def main_exit(main) -> int:
    """``main()``'s exit status, with SIGTERM raising :class:`~difftilt.core.errors.Terminated`
    while it runs: a difftilt error (a bad option, a run folder that does not match) ends with
    one line and status 2 instead of a traceback, a Ctrl-C with status 130 and a SIGTERM
    (``kill``, a scheduler's time limit) with 143, the run it stopped marked interrupted."""
    try:
        with terminated_on_sigterm():
            return main()
    except DifftiltError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as err:
        if stopped_by_sigterm(err):
            print("terminated (SIGTERM)", file=sys.stderr)
            return 143
        raise


def run_or_reuse(cfg: dict, path: Path, label: str = "") -> list[dict]:
    """Run one arm (one method, one seed) and return its per-round rows, or reuse it from
    ``--runs``: a complete run folder is read back and an interrupted one resumed, so a
    benchmark stopped half-way loses no finished arm. A folder made with another config is
    refused with a :class:`ConfigError` naming the fields. Each round that ends here prints
    a line, after ``label`` (an arm takes up to hours).

    An arm that fails (without a KL term the fine-tuned sampler can run off to infinity,
    and the reward model then sees non-finite designs) returns the rounds it finished and
    a last row ``{"failed_round": i, "error": ...}``.
    """
    line = RoundLines()

    def report(row: dict, rounds: int) -> None:
        print(f"  {label}{line(row, rounds)}", flush=True)

    method = cfg["methods"][0]
    status = RunFolder(path).status()
    state = status.get("state")
    if state is not None:
        _check_same_arm(cfg, path, complete=state == "complete")
    try:
        if state == "complete":
            return RunFolder(path).read_json("results.json")["methods"][method]
        if state == "failed":
            raise DifftiltError(status.get("error", "failed"))
        if state is not None:
            run = run_online(cfg, resume=str(path), progress=False, on_round=report)
        else:
            run = run_online(cfg, output_dir=str(path.parent), name=path.name, progress=False, on_round=report)
        return run.read_json("results.json")["methods"][method]
    except DifftiltError as err:
        rows = read_rows(path / method)
        return rows + [{"failed_round": len(rows), "error": str(err)}]


def run_arms(arms: list[tuple[dict, Path, str]], jobs: int) -> None:
    """Run the arms (``(config, run folder, label)``) that are not complete, ``jobs`` at a
    time, each in a process of its own on one thread, as the committed tables were made (the
    results depend on the thread count, not on the load). The caller then reads them back
    with :func:`run_or_reuse`, as a run one after another reads finished arms back; an arm
    whose process died without a word is resumed there, in the caller's process."""
    import multiprocessing
    from multiprocessing.connection import wait

    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch threads forked
    waiting = [arm for arm in arms if RunFolder(arm[1]).status().get("state") != "complete"]
    running: list = []
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                cfg, path, label = waiting.pop(0)
                child = spawn.Process(target=_run_arm, args=(cfg, path, label), name=str(path))
                child.start()
                running.append(child)
            wait([child.sentinel for child in running])
            running = [child for child in running if child.is_alive()]
    except (KeyboardInterrupt, SystemExit) as stop:
        # A terminal's Ctrl-C reaches the arms too, as a scheduler's SIGTERM does; a SIGTERM sent to
        # this process alone is passed on. Each arm then marks its run interrupted and ends.
        if isinstance(stop, SystemExit):
            for child in running:
                child.terminate()
        for child in running:
            child.join(timeout=60)
            if child.is_alive():  # a Ctrl-C that reached this process only
                child.terminate()
                child.join(timeout=60)
        raise


def _run_arm(cfg: dict, path: Path, label: str) -> None:
    """One arm in a process of its own (:func:`run_arms`); a Ctrl-C or a SIGTERM ends it quietly,
    its run marked interrupted."""
    import torch

    torch.set_num_threads(1)
    try:
        with terminated_on_sigterm():
            run_or_reuse(cfg, path, label)
    except KeyboardInterrupt:
        sys.exit(130)
    except SystemExit as stop:
        sys.exit(143 if stopped_by_sigterm(stop) else stop.code)


def _check_same_arm(cfg: dict, path: Path, *, complete: bool) -> None:
    """Refuse to reuse a run folder made with another config (say, before a task's settings
    changed). A complete run with more rounds is fine: it is read at this budget."""
    saved = load_yaml(path / "config.yaml")
    differ = config_differences(_resolved(cfg), _resolved(saved))
    if complete and "schedule" in differ and saved["schedule"][: len(cfg["schedule"])] == list(cfg["schedule"]):
        differ.remove("schedule")
    if differ:
        raise ConfigError(f"{path} was run with another config ({', '.join(differ)}): give another --runs, "
                          "or delete that folder")


def _resolved(cfg: dict) -> dict:
    """``cfg`` with what does not change an arm made equal: the model path resolved, and
    for the GA and the hill climber (no acquisition to rank edits) best_edits is edits."""
    process = cfg.get("process")
    if isinstance(process, dict) and "path" in process:
        cfg = {**cfg, "process": {**process, "path": os.path.realpath(process["path"])}}
    if all(m in EVOLUTION for m in cfg["methods"]) and cfg.get("fill", "best_edits") == "best_edits":
        cfg = {**cfg, "fill": "edits"}
    return cfg
