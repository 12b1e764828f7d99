"""difftilt online: the whole loop, killed with SIGKILL mid-round and resumed."""

import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from difftilt.core.store import COUNTED, SQLiteFeedbackStore

SCHEDULE = [8, 12, 8]
CFG = {
    "plugin": "toy",
    "seed": 3,
    "process": {"name": "mixture", "num_steps": 8},
    "oracle": {"reward": {"name": "bumps", "centers": [[0.0, -3.0], [2.0, 0.3]], "heights": [1.0, 0.6],
                          "widths": 0.5, "delay": 0.4},
               "noise_std": 0.05, "batch_size": 2},
    "methods": ["ucb"],
    "schedule": SCHEDULE,
    "finetune": {"iterations": 3, "batch_size": 32, "value_refit_iterations": 2, "initial_iterations": 2,
                 "initial_steps": 4},
    "reward_model": {"epochs": 5},
    "eval_samples": 16,
}


def _start(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "difftilt", "online", *args, "--no-progress"], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _answered(db: Path) -> dict[int, tuple]:
    if not db.is_file():
        return {}
    with SQLiteFeedbackStore(db, readonly=True) as s:
        return {r.id: (r.status, r.value, r.round) for r in s.records(status=COUNTED)}


@pytest.mark.slow
def test_sigkill_mid_round_then_resume_matches_an_uninterrupted_run(tmp_path):
    cfg = tmp_path / "online.yaml"
    cfg.write_text(yaml.safe_dump(CFG))

    full = _start([str(cfg), "--output-dir", str(tmp_path / "a"), "--name", "run"], tmp_path)
    out, err = full.communicate(timeout=600)
    assert full.returncode == 0, err
    a = tmp_path / "a" / "run"

    killed = _start([str(cfg), "--output-dir", str(tmp_path / "b"), "--name", "run"], tmp_path)
    db = tmp_path / "b" / "run" / "ucb" / "feedback.sqlite"
    deadline = time.time() + 300
    before = {}
    while time.time() < deadline:  # watch the store as a notebook would, then kill mid-round 1
        before = _answered(db)
        in_round_1 = sum(1 for st, _, rnd in before.values() if rnd == 1)
        if 2 <= in_round_1 < SCHEDULE[1]:
            break
        time.sleep(0.05)
    else:
        pytest.fail("never caught the run in the middle of round 1")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    before = _answered(db)  # what was answered at the moment of the kill
    assert 0 < sum(1 for *_, rnd in before.values() if rnd == 1) < SCHEDULE[1]
    status = json.loads((tmp_path / "b" / "run" / "status.json").read_text())
    assert status["state"] == "running"  # killed: it could not mark itself complete

    resumed = _start(["--resume", str(tmp_path / "b" / "run")], tmp_path)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    b = tmp_path / "b" / "run"

    after = _answered(db)
    assert len(after) == len(_answered(a / "ucb" / "feedback.sqlite")) == sum(SCHEDULE)
    for qid, rec in before.items():  # nothing answered was lost, changed or asked again
        assert after[qid] == rec
    with SQLiteFeedbackStore(db, readonly=True) as s:
        assert s.count(("pending",)) == 0
    ra, rb = (json.loads((p / "results.json").read_text())["methods"]["ucb"] for p in (a, b))
    keys = ("queries_used", "best_true", "top10_true", "eval_mean_true", "eval_feasible")
    assert [{k: r[k] for k in keys} for r in ra] == [{k: r[k] for k in keys} for r in rb]
    assert json.loads((b / "status.json").read_text())["state"] == "complete"
    assert (b / "reward_vs_queries.png").is_file()


def test_online_config_errors_are_one_line(tmp_path):
    bad = dict(CFG, methods=["ucb", "sieko"])
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(bad))
    proc = subprocess.run([sys.executable, "-m", "difftilt", "online", str(cfg), "--output-dir", str(tmp_path / "r")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "difftilt: error: config.methods: unknown method 'sieko' (known: ucb, bootstrap, thompson, greedy, "
        "nonadaptive, ppo, guidance, best_of_n, ga, hill_climb)")
    assert not (tmp_path / "r").exists()
    cfg.write_text(yaml.safe_dump(dict(CFG, methods=["ga"])))
    proc = subprocess.run([sys.executable, "-m", "difftilt", "online", str(cfg), "--output-dir", str(tmp_path / "r")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "difftilt: error: config.methods: ga need a mutation operator, which plugin 'toy' does not provide")
    assert not (tmp_path / "r").exists()
    cfg.write_text(yaml.safe_dump(dict(CFG, features={"reverse_complement": True})))
    proc = subprocess.run([sys.executable, "-m", "difftilt", "online", str(cfg), "--output-dir", str(tmp_path / "r")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "difftilt: error: features: unknown field 'reverse_complement' (known fields: none)")
    assert not (tmp_path / "r").exists()


def _tiny(tmp_path, **change):
    cfg = {**CFG, "schedule": [8, 8], **change}
    cfg["oracle"] = {**CFG["oracle"], "reward": {**CFG["oracle"]["reward"], "delay": 0.0}, "batch_size": 8}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_every_method_runs_in_the_same_harness(tmp_path):
    from difftilt.core.online import EVOLUTION, METHODS

    METHODS = [m for m in METHODS if m not in EVOLUTION]  # the toy domain has no mutation operator
    proc = subprocess.run([sys.executable, "-m", "difftilt", "online", str(_tiny(tmp_path, methods=list(METHODS))),
                           "--output-dir", str(tmp_path / "r"), "--name", "all", "--no-progress"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "r" / "all" / "results.json").read_text())
    assert list(results["methods"]) == list(METHODS)
    for method, rows in results["methods"].items():
        assert rows[-1]["queries_used"] == 16, method  # every method spends exactly the budget
        with SQLiteFeedbackStore(tmp_path / "r" / "all" / method / "feedback.sqlite", readonly=True) as s:
            assert s.count(COUNTED) == 16 and s.count(("pending",)) == 0
    assert len(results["methods"]["nonadaptive"]) == 1 and len(results["methods"]["ucb"]) == 2
    run = tmp_path / "r" / "all"
    said = proc.stdout.splitlines()
    assert said[0] == f"running in {run} (follow it from another terminal: difftilt show {run})"  # before round 0
    assert said[1] == f"run folder: {run}"
    for line in said[3:3 + 4]:
        assert line.split()[0] in METHODS


def test_a_failing_oracle_stops_the_run_with_one_line_and_keeps_the_record(tmp_path):
    flaky = {**CFG["oracle"]["reward"], "delay": 0.0, "flaky": 1.0}
    cfg = _tiny(tmp_path)
    raw = yaml.safe_load(cfg.read_text())
    raw["oracle"] = {**raw["oracle"], "reward": flaky, "retries": 1}
    cfg.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "difftilt", "online", str(cfg), "--output-dir", str(tmp_path / "r"),
                           "--name", "bad", "--no-progress"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "\n" not in line and line.startswith("difftilt: error: the oracle failed on a batch of 8 designs after 2 attempts")
    assert "simulated assay failure" in line
    run = tmp_path / "r" / "bad"
    assert json.loads((run / "status.json").read_text())["state"] == "failed"
    with SQLiteFeedbackStore(run / "ucb" / "feedback.sqlite", readonly=True) as s:
        failed = s.records(status=("failed",))
        assert len(failed) == 8 and "simulated assay failure" in failed[0].error


def test_a_run_stopped_by_a_failing_oracle_resumes_from_a_store_written_before_the_failure_column(tmp_path,
                                                                                                   monkeypatch):
    import sqlite3

    from difftilt.core.errors import OracleError
    from difftilt.core.online import run_online
    from difftilt.plugins.toy import BumpsReward

    real = BumpsReward.evaluate
    calls, broken = [], [True]

    def assay(self, x):
        calls.append(x.shape[0])
        if broken[0] and len(calls) == 2:  # round 0's second batch
            raise RuntimeError("plate reader offline")
        return real(self, x)

    monkeypatch.setattr(BumpsReward, "evaluate", assay)
    raw = yaml.safe_load(_tiny(tmp_path).read_text())
    raw = {**raw, "eval_samples": 0, "oracle": {**raw["oracle"], "batch_size": 4, "retries": 0}}
    with pytest.raises(OracleError, match="plate reader offline"):
        run_online(raw, output_dir=str(tmp_path / "r"), name="run", progress=False)
    db = tmp_path / "r" / "run" / "ucb" / "feedback.sqlite"
    with SQLiteFeedbackStore(db, readonly=True) as s:
        assert [r.failure for r in s.records(status=("failed",))] == ["oracle_error"] * 4
    with sqlite3.connect(db) as old:  # the store as written before the column: the error text only
        old.execute("ALTER TABLE queries DROP COLUMN failure")
    old.close()

    broken[0] = False
    calls.clear()
    run_online(resume=str(tmp_path / "r" / "run"), progress=False)
    assert calls == [4, 4, 4]  # the failed batch (known by its "after 1 attempt: ..."), then round 1
    with SQLiteFeedbackStore(db, readonly=True) as s:
        assert s.count(COUNTED) == 16 and s.count(("answered",)) + s.count(("infeasible",)) == 16


def test_unique_batch_skips_asked_designs_and_stops_when_draws_run_dry():
    import torch

    from difftilt.core.online import design_key, unique_batch

    def proposer(*draws):  # each call returns the next of the given draws (one-number designs)
        it = iter(draws)
        return lambda n: torch.tensor(next(it), dtype=torch.float32)[:, None]

    taken = {design_key(torch.tensor([0.0])), design_key(torch.tensor([1.0]))}
    x, repeated, edited = unique_batch(proposer([0, 2, 2, 3, 1], [1, 4, 5, 6, 7]), 5, taken)
    assert x.flatten().tolist() == [2, 3, 4, 5, 6] and repeated == 0 and edited == 0
    assert design_key(torch.tensor([6.0])) in taken and design_key(torch.tensor([7.0])) not in taken
    # draws bring 1, then 2, then 0 new designs: stop, fill with the last draw's first designs
    x, repeated, edited = unique_batch(proposer([0, 8, 8, 8], [9, 9, 10, 8], [10, 9, 8, 0]), 4, taken)
    assert x.flatten().tolist() == [8, 9, 10, 10] and repeated == 1 and edited == 0
    # a collapsed proposer (one new design per draw of 200) is dropped after its second draw,
    # as is one whose second draw brings less than 1% of the batch
    seen = set()
    x, repeated, _ = unique_batch(lambda n: torch.cat([torch.zeros(n - 1, 1), torch.rand(1, 1)]), 200, seen)
    assert repeated == 200 - 3 and len(seen) == 3 and x.shape == (200, 1)
    x, repeated, _ = unique_batch(proposer(list(range(100, 200)), [100] * 99 + [300], list(range(400, 500))), 200, set())
    assert repeated == 99 and x[:101].flatten().tolist() == list(range(100, 200)) + [300]


def test_unique_batch_fills_a_dry_proposer_with_the_nearest_unasked_edits():
    import torch

    from difftilt.core.online import unique_batch

    # designs are integers; an edit of k positions adds 10 ** (k - 1) * (1, 2, 3) to each
    def edit(x, k):
        return (x + 10 ** (k - 1) * torch.arange(1, x.shape[0] + 1).remainder(3).add(1)[:, None]).float()

    calls = []

    def collapsed(n):  # a model that only ever proposes 0 and 5
        calls.append(n)
        return torch.tensor([0.0, 5.0] * (n // 2))[:, None]

    taken: set = set()
    x, repeated, edited = unique_batch(collapsed, 8, taken, edit=edit)
    got = x.flatten().tolist()
    # proposals first (2 new), then single edits of them (1..3 and 6..8: 6 new) fill the batch
    assert got[:2] == [0, 5] and sorted(got[2:]) == [1, 2, 3, 6, 7, 8]
    assert (repeated, edited) == (0, 6) and len(set(got)) == 8 and len(calls) == 2
    # the next round: proposals and single edits are all asked, so two-position edits (+10, +20, +30) come
    x, repeated, edited = unique_batch(collapsed, 4, taken, edit=edit)
    assert sorted(x.flatten().tolist()) == [10, 20, 25, 35] and (repeated, edited) == (0, 4)
    # without an edit operator (or when edits run dry too) the batch is completed with repeats
    x, repeated, edited = unique_batch(collapsed, 4, taken)
    assert (repeated, edited) == (4, 0) and x.flatten().tolist() == [0, 5, 0, 5]
    x, repeated, edited = unique_batch(collapsed, 4, set(taken), edit=lambda x, k: x, max_edits=2)
    assert (repeated, edited) == (4, 0)


def test_unique_batch_with_rank_fills_with_the_best_scoring_edits():
    import torch

    from difftilt.core.online import design_key, unique_batch

    def edit(x, k):  # designs are integers; the k-position edits of 0 are 10 ** (k - 1) * (1..7)
        return (x[:1] + 10 ** (k - 1) * torch.arange(1, 8.0)[:, None]).float()

    def collapsed(n):
        return torch.zeros(n, 1)

    taken = {design_key(torch.tensor([0.0]))}
    # the pooled single edits are 1..7; the score prefers the largest, so 7, 6, 5 are asked, in that order
    x, repeated, edited = unique_batch(collapsed, 3, taken, edit=edit, rank=lambda x: x[:, 0])
    assert x.flatten().tolist() == [7.0, 6.0, 5.0] and (repeated, edited) == (0, 3)
    # the edits not chosen were not asked: they are still free for a later round
    assert design_key(torch.tensor([4.0])) not in taken and design_key(torch.tensor([7.0])) in taken
    x, _, _ = unique_batch(collapsed, 3, taken, edit=edit, rank=lambda x: -x[:, 0])
    assert x.flatten().tolist() == [1.0, 2.0, 3.0]
    # when one k's pool is too small, it is taken whole, then the best of the next k's
    x, _, edited = unique_batch(collapsed, 3, taken, edit=edit, rank=lambda x: x[:, 0])
    assert x.flatten().tolist() == [4.0, 70.0, 60.0] and edited == 3
    # without rank, the first drawn are taken
    x, _, _ = unique_batch(collapsed, 2, taken, edit=edit)
    assert x.flatten().tolist() == [10.0, 20.0]


def test_stop_at_leaves_the_rest_of_the_budget_unspent_and_a_resume_does_not_spend_it(tmp_path):
    from difftilt.core.online import run_online

    raw = yaml.safe_load(_tiny(tmp_path, schedule=[8, 8, 8]).read_text())
    # the first round's best observed answer, from a run without a target
    full = run_online({**raw, "schedule": [8]}, output_dir=str(tmp_path), name="probe", progress=False)
    with SQLiteFeedbackStore(full.path / "ucb" / "feedback.sqlite", readonly=True) as s:
        first_best = max(r.value for r in s.records(status=("answered",)))

    run = run_online({**raw, "stop_at": first_best}, output_dir=str(tmp_path), name="stop", progress=False)
    rows = run.read_json("results.json")["methods"]["ucb"]
    assert len(rows) == 1 and rows[0]["queries_used"] == 8
    assert rows[0]["stopped"] == f"an answer reached stop_at {first_best:g}"
    assert abs(rows[0]["kl_to_pretrained"]) < 1e-6  # no fine-tuning after the answers that reached it
    assert not (run.path / "ucb" / "checkpoints").exists() or not any((run.path / "ucb" / "checkpoints").iterdir())
    run_online(resume=str(run.path), progress=False)  # nothing left to do: it stopped
    with SQLiteFeedbackStore(run.path / "ucb" / "feedback.sqlite", readonly=True) as s:
        assert s.count(COUNTED) == 8
    # a crash after the stopping round's answers but before its row: the resume writes the row
    (run.path / "ucb" / "rounds.jsonl").write_text("")
    (run.path / "ucb" / "state.json").write_text(json.dumps({"rounds_done": 0}) + "\n")
    run_online(resume=str(run.path), progress=False)
    again = run.read_json("results.json")["methods"]["ucb"]
    assert [{**r, "seconds": 0} for r in again] == [{**r, "seconds": 0} for r in rows]
    with SQLiteFeedbackStore(run.path / "ucb" / "feedback.sqlite", readonly=True) as s:
        assert s.count(COUNTED) == 8

    # a target just above what round 0 found lets the run go on
    run = run_online({**raw, "stop_at": first_best + 1e-6}, output_dir=str(tmp_path), name="go", progress=False)
    rows = run.read_json("results.json")["methods"]["ucb"]
    assert len(rows) > 1 and "stopped" not in rows[0]


def test_a_sigterm_during_fine_tuning_leaves_the_run_interrupted_and_resumable(tmp_path, monkeypatch):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from difftilt.benchmarks.common import run_or_reuse
    from difftilt.core.finetune import Finetuner
    from difftilt.core.online import run_online

    raw = yaml.safe_load(_tiny(tmp_path).read_text())
    real_fit = Finetuner.fit

    def stopped(self, *a, **k):  # what Lightning raises when the process gets SIGTERM mid-fit
        raise SIGTERMException()

    monkeypatch.setattr(Finetuner, "fit", stopped)
    with pytest.raises(SystemExit):
        run_online(raw, output_dir=str(tmp_path / "r"), name="run", progress=False)
    status = json.loads((tmp_path / "r" / "run" / "status.json").read_text())
    assert status["state"] == "interrupted" and "SIGTERMException" in status["error"]
    # a benchmark's reuse resumes it (a "failed" run would be reported as failed, not continued)
    monkeypatch.setattr(Finetuner, "fit", real_fit)
    rows = run_or_reuse({**raw, "output_dir": str(tmp_path / "r"), "name": "run"}, tmp_path / "r" / "run")
    assert [r["queries_used"] for r in rows] == [8, 16]
    assert json.loads((tmp_path / "r" / "run" / "status.json").read_text())["state"] == "complete"


def test_config_differences_name_the_fields_and_a_resume_under_another_config_is_refused(tmp_path):
    from difftilt.core.errors import ConfigError
    from difftilt.core.online import config_differences, run_online

    base = _tiny(tmp_path)
    assert config_differences(base, base) == []
    raw = yaml.safe_load(base.read_text())
    other = {**raw, "alpha": 0.25, "finetune": {**raw["finetune"], "iterations": 4}, "output_dir": "x", "name": "y"}
    assert config_differences(other, base) == ["alpha", "finetune.iterations"]  # not where the run is kept
    assert config_differences({**raw, "edit_share": 0.0}, base) == []  # a default written out is no difference
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(base.read_text())
    with pytest.raises(ConfigError, match=r"differs from the one .* started with \(alpha, finetune.iterations\)"):
        run_online(other, resume=run)


def test_retune_round_at_the_runs_alpha_repeats_the_round_and_a_larger_alpha_moves_less(tmp_path):
    from difftilt.benchmarks.round_alpha import main
    from difftilt.core.errors import CheckpointError, ConfigError
    from difftilt.core.online import run_online
    from difftilt.core.online_diagnostics import retune_round

    raw = yaml.safe_load(_tiny(tmp_path, methods=["ucb", "best_of_n"], alpha=0.5, schedule=[8, 8, 8]).read_text())
    run = run_online(raw, output_dir=str(tmp_path), name="run", progress=False).path
    rows = [json.loads(line) for line in (run / "ucb" / "rounds.jsonl").read_text().splitlines()]
    before = sorted(p.name for p in (run / "ucb").rglob("*"))
    for i in (0, 1):  # round 0 starts from the pretrained model, round 1 from round 0's checkpoint
        same, stiff = retune_round(run, "ucb", i, [0.5, 50.0])
        assert same["mean_true"] == pytest.approx(rows[i]["eval_mean_true"], rel=1e-5, abs=1e-7)
        assert same["kl_to_pretrained"] == pytest.approx(rows[i]["kl_to_pretrained"], rel=1e-5, abs=1e-7)
        assert 0.0 <= stiff["kl_to_start"] < same["kl_to_start"]
        assert set(same) >= {"acquisition_mean", "feasible", "diversity", "seconds"}
        if i == 0:  # round 0 starts at the pretrained model
            assert same["kl_to_start"] == pytest.approx(same["kl_to_pretrained"])
        assert same["objective"] == pytest.approx(same["acquisition_mean"] - 0.5 * same["kl_to_start"])
    # the exact target of round 1, estimated from its starting model's samples, beside the fine-tuning
    (tilted,) = retune_round(run, "ucb", 1, [0.5], tilt_samples=600)
    assert {k: v for k, v in tilted.items() if not k.startswith(("tilt_", "start_", "solver_", "seconds"))} == \
        {k: v for k, v in same.items() if k != "seconds"}  # the fine-tuning is the same
    assert tilted["tilt_kl"] > 0 and 1 <= tilted["tilt_ess"] <= 600
    assert tilted["tilt_objective"] >= tilted["start_objective"]
    assert tilted["tilt_acquisition"] - 0.5 * tilted["tilt_kl"] == pytest.approx(tilted["tilt_objective"])
    assert 0.0 <= tilted["tilt_mean_true"] <= 1.5 and tilted["solver_share"] == pytest.approx(
        (tilted["objective"] - tilted["start_objective"]) / (tilted["tilt_objective"] - tilted["start_objective"]))
    (shorter,) = retune_round(run, "ucb", 1, [0.5], finetune={"iterations": 1})  # another solver setting
    assert shorter["kl_to_start"] != pytest.approx(same["kl_to_start"])  # it did fine-tune differently
    (clipped,) = retune_round(run, "ucb", 1, [0.5], reward_model={"clip_features": True})  # another reward model
    assert set(clipped) == set(same) and clipped["kl_to_start"] >= 0
    assert sorted(p.name for p in (run / "ucb").rglob("*")) == before  # the run folder is only read
    with pytest.raises(ConfigError, match="fits a reward model"):
        retune_round(run, "best_of_n", 0, [0.5])
    with pytest.raises(ConfigError, match="round 3 is not one"):
        retune_round(run, "ucb", 3, [0.5])
    with pytest.raises(ConfigError, match="positive"):
        retune_round(run, "ucb", 0, [0.0])
    with pytest.raises(ConfigError, match="tilt_samples must be >= 0"):
        retune_round(run, "ucb", 0, [0.5], tilt_samples=-1)
    with pytest.raises(ConfigError, match="did you mean 'iterations'"):
        retune_round(run, "ucb", 0, [0.5], finetune={"iterationz": 1})
    with pytest.raises(ConfigError, match="did you mean 'clip_features'"):
        retune_round(run, "ucb", 0, [0.5], reward_model={"clip_featurez": True})
    with pytest.raises(ConfigError, match="no method 'greedy'"):
        retune_round(run, "greedy", 0, [0.5])
    with pytest.raises(CheckpointError, match="not an online run folder"):
        retune_round(tmp_path, "ucb", 0, [0.5])
    out = tmp_path / "alpha.json"
    assert main([str(run), "--round", "1", "--alphas", "0.5", "5", "--samples", "8", "--tilt-samples", "64",
                 "--finetune", "lr=1.0e-3", "--reward-model", "clip_features=true", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["reward_model"] == {"clip_features": True}
    assert saved["run_alpha"] == 0.5 and [r["alpha"] for r in saved["rows"]] == [0.5, 5.0]
    assert all("tilt_objective" in r for r in saved["rows"]) and saved["finetune"] == {"lr": 1.0e-3}


def test_spearman_is_the_correlation_of_ranks_with_ties_at_their_mean_rank():
    from difftilt.core.errors import ShapeError
    from difftilt.core.online_diagnostics import spearman

    x = torch.tensor([0.3, 1.0, 2.0, 7.0])
    assert spearman(x, x) == pytest.approx(1.0) and spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(x, x.exp() ** 3) == pytest.approx(1.0)  # any increasing map: ranks only
    # ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4): 4.5 / sqrt(4.5 * 5)
    assert spearman(torch.tensor([1.0, 2.0, 2.0, 3.0]), x) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    assert math.isnan(spearman(torch.ones(3), x[:3]))  # a constant has no ranking
    with pytest.raises(ShapeError):
        spearman(x, x[:3])


def test_reward_model_ranks_refit_each_rounds_model_and_score_it_on_the_next_rounds_answers(tmp_path):
    from difftilt.benchmarks.reward_model_rank import main
    from difftilt.core.errors import ConfigError
    from difftilt.core.online import run_online
    from difftilt.core.online_diagnostics import reward_model_ranks, spearman

    raw = yaml.safe_load(_tiny(tmp_path, methods=["ucb", "best_of_n"], schedule=[8, 8, 8]).read_text())
    run = run_online(raw, output_dir=str(tmp_path), name="run", progress=False).path
    before = sorted(p.name for p in (run / "ucb").rglob("*"))
    rows = reward_model_ranks(run, "ucb")
    assert [(r["round"], r["train"], r["test"]) for r in rows] == [(1, 8, 8), (2, 16, 8)]
    with SQLiteFeedbackStore(run / "ucb" / "feedback.sqlite", readonly=True) as store:
        x, y = store.training_data(before_round=3)
    for r, (lo, hi) in zip(rows, [(8, 16), (16, 24)]):
        test = y[lo:hi].double()
        assert r["test_mean"] == pytest.approx(float(test.mean())) and r["top10"] == pytest.approx(float(test.mean()))
        assert -1.0 <= r["rho_mean"] <= 1.0 and -1.0 <= r["rho_acquisition"] <= 1.0
    # round 1's row is round 0's reward model: the run's settings and seed, fit on round 0's answers
    from difftilt.core.online_diagnostics import _open_seiko_run

    mrun = _open_seiko_run(run, "ucb", "test")
    try:
        model = mrun._reward_model()
        model.fit(x[:8].float(), y[:8], seed=mrun._round_seed(0, 1))
        with torch.no_grad():
            assert rows[0]["rho_mean"] == pytest.approx(spearman(model.posterior(x[8:16].float()).mean, y[8:16]))
    finally:
        mrun.store.close()
    assert reward_model_ranks(run, "ucb") == rows  # deterministic
    other = reward_model_ranks(run, "ucb", reward_model={"epochs": 1})
    assert [r["test_mean"] for r in other] == [r["test_mean"] for r in rows]  # the same answers
    assert [r["rho_mean"] for r in other] != [r["rho_mean"] for r in rows]  # another model
    assert sorted(p.name for p in (run / "ucb").rglob("*")) == before  # the run folder is only read
    with pytest.raises(ConfigError, match="fits a reward model"):
        reward_model_ranks(run, "best_of_n")
    with pytest.raises(ConfigError, match="epochz"):
        reward_model_ranks(run, "ucb", reward_model={"epochz": 1})
    out = tmp_path / "ranks.json"
    assert main([str(run), "--reward-model", "epochs=1", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["reward_model"] == {"epochs": 1} and saved["rows"] == other


def test_each_round_that_ends_is_reported_with_its_row_and_the_command_prints_a_line_for_it(tmp_path, capsys):
    from difftilt.core.cli import main
    from difftilt.core.online import round_line, run_online

    seen = []
    run = run_online(str(_tiny(tmp_path, methods=["ucb", "best_of_n"])), output_dir=str(tmp_path), name="cb",
                     progress=False, on_round=lambda row, rounds: seen.append((row, rounds)))
    results = run.read_json("results.json")["methods"]
    assert seen == [(row, 2) for row in results["ucb"]] + [(row, 1) for row in results["best_of_n"]]
    row = {**results["ucb"][0], "best_true": 0.5, "top10_true": 0.25, "seconds": 12.4, "edited": 0, "repeated": 0}
    assert round_line(row, 2) == "ucb round 1/2: 8 queries, best 0.5000, top-10 0.2500 (12 s)"
    assert round_line({**row, "edited": 1200, "repeated": 3}, 2) == ("ucb round 1/2: 8 queries, best 0.5000, "
                                                                     "top-10 0.2500, 1,200 edits, 3 repeats (12 s)")
    assert round_line({**row, "stopped": "an answer reached stop_at 0.5"}, 2).endswith("(12 s); an answer reached stop_at 0.5")
    for left, said in ((45, "45 s"), (2040, "34 min"), (9000, "2.5 h")):
        assert round_line(row, 2, left).endswith(f"(12 s, about {said} left)")
    assert round_line(row, 2, 0.4).endswith("(12 s)")  # a GA's rounds take no time: no "about 0 s left"

    capsys.readouterr()
    assert main(["online", str(_tiny(tmp_path)), "--output-dir", str(tmp_path), "--name", "cli"]) == 0
    err = capsys.readouterr().err
    said = [l for l in err.splitlines() if l.startswith("ucb round")]
    assert [l.split(":")[0] for l in said] == ["ucb round 1/2", "ucb round 2/2"]
    assert re.search(r"\(\d+ s(, about .+ left)?\)$", said[0]) and said[1].endswith(" s)")  # nothing left after 2/2
    assert main(["online", str(_tiny(tmp_path)), "--output-dir", str(tmp_path), "--name", "quiet", "--no-progress"]) == 0
    assert "round" not in capsys.readouterr().err


def test_a_run_seeds_torch_for_itself_and_gives_the_callers_random_state_back(tmp_path):
    from difftilt.core.online import run_online
    from difftilt.core.run import run_finetune
    from tests.test_cli import TINY

    runs = {"online": lambda: run_online(_tiny(tmp_path, schedule=[8]), output_dir=str(tmp_path), name="o",
                                         progress=False),
            "finetune": lambda: run_finetune(TINY, output_dir=tmp_path, name="f", progress=False)}
    for name, run in runs.items():
        torch.manual_seed(11)
        expected = torch.rand(3)
        torch.manual_seed(11)
        run()
        assert torch.equal(torch.rand(3), expected), name


def test_a_run_redraws_its_plot_as_rounds_end_at_most_every_plot_every_seconds(tmp_path, monkeypatch):
    from difftilt.core import online

    def run(name, every):
        monkeypatch.setattr(online, "PLOT_EVERY", every)
        folder = tmp_path / name
        seen = []  # after each round: is there a plot, and is the run over (results.json)?
        online.run_online(str(_tiny(tmp_path)), output_dir=str(tmp_path), name=name, progress=False,
                          on_round=lambda row, rounds: seen.append(((folder / "reward_vs_queries.png").is_file(),
                                                                    (folder / "results.json").is_file())))
        assert (folder / "reward_vs_queries.png").is_file()  # and always at the end
        return seen

    assert run("each", 0.0) == [(True, False), (True, False)]
    assert run("hourly", 3600.0) == [(False, False), (False, False)]


@pytest.mark.parametrize("cut", [False, True], ids=["row-written", "row-half-written"])
def test_a_crash_between_a_rounds_row_and_its_state_leaves_the_rows_of_a_run_never_stopped(tmp_path, monkeypatch,
                                                                                            cut):
    from difftilt.core import online

    cfg = str(_tiny(tmp_path, schedule=[8, 8, 8]))
    straight = online.run_online(cfg, output_dir=str(tmp_path), name="straight", progress=False)
    rows = straight.read_json("results.json")["methods"]["ucb"]
    save = online._MethodRun._save_state

    def killed(self, **kw):  # the process dies after round 1's row, before its state says so
        if kw.get("rounds_done") == 2:
            raise KeyboardInterrupt
        save(self, **kw)

    monkeypatch.setattr(online._MethodRun, "_save_state", killed)
    with pytest.raises(KeyboardInterrupt):
        online.run_online(cfg, output_dir=str(tmp_path), name="run", progress=False)
    monkeypatch.undo()
    folder = tmp_path / "run" / "ucb"
    written = (folder / "rounds.jsonl").read_text()
    if cut:  # or during that row's write
        written = written[: written.rindex("{") + 30]
        (folder / "rounds.jsonl").write_text(written)
    def timeless(rows):
        return [{**r, "seconds": 0} for r in rows]

    assert timeless(online.read_rows(folder)) == timeless(rows[:1] if cut else rows[:2])  # a half line is left out
    online.run_online(resume=str(tmp_path / "run"), progress=False)
    assert timeless(online.read_rows(folder)) == timeless(rows)  # round 1 ran again, and wrote its row once


@pytest.mark.slow
def test_a_sigterm_outside_fine_tuning_stops_the_run_as_interrupted_and_the_resume_ends_it(tmp_path):
    """``kill`` or a scheduler's time limit while the oracle is asked (not in a Lightning fit,
    which has its own SIGTERM handling): the run says how to continue and ends with status 143."""
    cfg = tmp_path / "online.yaml"
    cfg.write_text(yaml.safe_dump(CFG))  # an oracle that takes 0.4 s a batch of 2
    proc = _start([str(cfg), "--output-dir", str(tmp_path), "--name", "run"], tmp_path)
    db = tmp_path / "run" / "ucb" / "feedback.sqlite"
    deadline = time.time() + 300
    while time.time() < deadline and len(_answered(db)) < 2:  # in round 0's questions
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    run = tmp_path / "run"
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-2:] == [f"online run stopped; continue it with difftilt online --resume {run}",
                                             "difftilt: terminated (SIGTERM)"]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted" and "Terminated" in status["error"]
    assert 2 <= len(_answered(db)) < sum(SCHEDULE)
    resumed = _start(["--resume", str(run)], tmp_path)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert len(_answered(db)) == sum(SCHEDULE)
