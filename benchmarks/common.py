"""Helpers shared by the online benchmarks: mean ± std cells and reusable run folders."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from difftilt.core.config import load_yaml, parse_yaml
from difftilt.core.errors import ConfigError, DifftiltError
from difftilt.core.online import EVOLUTION, config_differences, run_online
from difftilt.core.run import RunFolder

__all__ = ["fmt", "main_exit", "run_or_reuse", "yaml_setting"]


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


def main_exit(main) -> int:
    """``main()``'s exit status; a difftilt error (a bad option, a run folder that does not
    match) ends with one line and status 2 instead of a traceback."""
    try:
        return main()
    except DifftiltError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run_or_reuse(cfg: dict, path: Path) -> list[dict]:
    """Run one arm (one method, one seed) and return its per-round rows, or reuse it from
    ``--runs``: a complete run folder is read back and an interrupted one resumed, so a
    benchmark stopped half-way loses no finished arm. A folder made with another config is
    refused with a :class:`ConfigError` naming the fields.

    An arm that fails (without a KL term the fine-tuned sampler can run off to infinity,
    and the reward model then sees non-finite designs) returns the rounds it finished and
    a last row ``{"failed_round": i, "error": ...}``.
    """
    method = cfg["methods"][0]
    status = path / "status.json"
    state = json.loads(status.read_text()).get("state") if status.is_file() else None
    if state is not None:
        _check_same_arm(cfg, path, complete=state == "complete")
    try:
        if state == "complete":
            return RunFolder(path).read_json("results.json")["methods"][method]
        if state == "failed":
            raise DifftiltError(json.loads(status.read_text()).get("error", "failed"))
        if state is not None:
            run = run_online(cfg, resume=str(path), progress=False)
        else:
            run = run_online(cfg, output_dir=str(path.parent), name=path.name, progress=False)
        return run.read_json("results.json")["methods"][method]
    except DifftiltError as err:
        rounds = path / method / "rounds.jsonl"
        rows = [json.loads(line) for line in rounds.read_text().splitlines() if line.strip()] if rounds.is_file() else []
        return rows + [{"failed_round": len(rows), "error": str(err)}]


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
