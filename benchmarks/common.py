"""Helpers shared by the online benchmarks: mean ± std cells and reusable run folders."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from difftilt.core.errors import DifftiltError
from difftilt.core.online import run_online
from difftilt.core.run import RunFolder

__all__ = ["fmt", "run_or_reuse"]


def fmt(values: list[float]) -> str:
    """``mean ± std`` of ``values`` (``-`` when empty)."""
    if not values:
        return "-"
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    spec = ".3f" if max(abs(m), s) < 1000 else ".2g"
    return f"{m:{spec}} ± {s:{spec}}"


def run_or_reuse(cfg: dict, path: Path) -> list[dict]:
    """Run one arm (one method, one seed) and return its per-round rows, or reuse it from
    ``--runs``: a complete run folder is read back and an interrupted one resumed, so a
    benchmark stopped half-way loses no finished arm.

    An arm that fails (without a KL term the fine-tuned sampler can run off to infinity,
    and the reward model then sees non-finite designs) returns the rounds it finished and
    a last row ``{"failed_round": i, "error": ...}``.
    """
    method = cfg["methods"][0]
    status = path / "status.json"
    state = json.loads(status.read_text()).get("state") if status.is_file() else None
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
