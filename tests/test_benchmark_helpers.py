"""The sequences benchmark's bookkeeping: rounds cut at the budget, best-so-far read in asking order."""

import copy

import pytest
import torch

from difftilt.benchmarks.order_consistency import consistency
from difftilt.benchmarks.sequences import TASKS, arm_config, schedule_for, store_curve
from difftilt.core import ControlledProcess
from difftilt.core.oracle import Oracle
from difftilt.core.reward import RewardOutput
from difftilt.core.rollout import sample_trajectories
from difftilt.core.store import SQLiteFeedbackStore
from difftilt.plugins.sequences.mdlm import MaskedDiffusionProcess, SequenceDenoiser


def test_schedule_is_cut_at_the_budget_and_repeats_its_last_round():
    earlier = [250, 250, 500, 1000, 1500, 1500]
    assert schedule_for(5000, earlier) == [250, 250, 500, 1000, 1500, 1500]
    assert schedule_for(2000, earlier) == [250, 250, 500, 1000]
    assert schedule_for(600, earlier) == [250, 250, 100]
    assert schedule_for(1000, [100] * 10) == [100] * 10
    assert schedule_for(5000, [250] * 8) == [250] * 20
    assert schedule_for(1100, [500, 300]) == [500, 300, 300]
    with pytest.raises(ValueError, match="positive"):
        schedule_for(100, [])


def test_store_curve_reads_best_and_top10_in_the_order_designs_were_asked(tmp_path):
    def truth(x):  # value = first coordinate; negative first coordinate is infeasible
        return RewardOutput(x[:, 0], x[:, 0] >= 0)

    store = SQLiteFeedbackStore(tmp_path / "feedback.sqlite")
    oracle = Oracle(truth, budget=40, store=store, batch_size=10, event_shape=(2,))
    rounds = [torch.arange(10.0), -torch.ones(10), 100 + torch.arange(10.0), torch.full((10,), 200.0)]
    for i, first in enumerate(rounds):
        oracle.query(torch.stack([first, torch.zeros(10)], 1), round=i)
    store.close()
    curve = store_curve(tmp_path, [10, 20, 30, 40, 50])
    assert curve[10] == {"best": 9.0, "top10": 4.5}
    assert curve[20] == curve[10]  # the infeasible round adds nothing
    assert curve[30]["best"] == 109.0 and curve[30]["top10"] == 104.5
    # ten queries of one design are one design: top-10 is 200 and the nine best others
    assert curve[40]["best"] == 200.0 and curve[40]["top10"] == (200 + sum(range(101, 110))) / 10
    assert 50 not in curve  # more calls than were spent


def test_an_arm_is_its_tasks_config_with_the_tasks_then_the_variants_then_the_command_lines_changes(monkeypatch):
    plain = arm_config("ehrlich-20-32-4-4", "ucb", 1, [250, 250], "ehrlich")
    assert (plain["methods"], plain["seed"], plain["schedule"], plain["stop_at"]) == (["ucb"], 1, [250, 250], None)
    assert plain["alpha"] == 0.0035 and "fill" not in plain and plain["finetune"]["batch_size"] == 16
    # (no fill: the online default, best_edits)
    assert plain["oracle"]["reward"]["num_motifs"] == 4 and plain.get("edit_share", 0.0) == 0.0
    variant = arm_config("ehrlich-20-32-4-4", "ucb_edits", 1, [250, 250], "ehrlich")
    assert variant["methods"] == ["ucb"] and variant["edit_share"] == 0.25
    assert {k: v for k, v in variant.items() if k != "edit_share"} == {k: v for k, v in plain.items() if k != "edit_share"}
    assert arm_config("tfbind8", "ucb_edits", 0, [100], "tfbind8", ["edit_share=0.5"])["edit_share"] == 0.5
    # a mapping in a task's changes updates the config's section, keeping its other fields
    monkeypatch.setitem(TASKS, "batch-32", {**TASKS["ehrlich-20-32-4-4"], "set": {"finetune": {"batch_size": 32}}})
    wide = arm_config("batch-32", "ucb", 1, [250], "ehrlich")
    assert wide["finetune"]["batch_size"] == 32 and wide["finetune"]["iterations"] == plain["finetune"]["iterations"]


def test_a_run_folder_made_with_another_config_is_not_reused(tmp_path):
    import json

    import yaml

    from difftilt.benchmarks.common import run_or_reuse
    from difftilt.core.errors import ConfigError

    models = tmp_path / "models"
    (models / "m").mkdir(parents=True)
    (tmp_path / "linked").symlink_to(models)
    cfg = arm_config("tfbind8", "ucb", 0, [100] * 4, {"name": "pretrained", "path": str(models / "m")})
    done = tmp_path / "ucb-seed0"  # a finished arm, as run_online leaves it
    done.mkdir()
    (done / "config.yaml").write_text(yaml.safe_dump(cfg))
    (done / "status.json").write_text(json.dumps({"state": "complete"}))
    rows = [{"round": i, "queries_used": 100 * (i + 1)} for i in range(4)]
    (done / "results.json").write_text(json.dumps({"methods": {"ucb": rows}}))

    assert run_or_reuse(cfg, done) == rows
    shorter = arm_config("tfbind8", "ucb", 0, [100] * 2, {"name": "pretrained", "path": str(tmp_path / "linked" / "m")})
    assert run_or_reuse(shorter, done) == rows  # a longer run of the same arm, through a symlink: read at the budget
    with pytest.raises(ConfigError, match=r"ucb-seed0 was run with another config \(alpha, edit_share\)"):
        run_or_reuse(arm_config("tfbind8", "ucb_edits", 0, [100] * 4, cfg["process"], ["alpha=0.2"]), done)
    with pytest.raises(ConfigError, match=r"another config \(schedule\)"):
        run_or_reuse(arm_config("tfbind8", "ucb", 0, [100] * 5, cfg["process"]), done)
    ga = arm_config("tfbind8", "ga", 0, [100] * 4, cfg["process"])
    (done / "config.yaml").write_text(yaml.safe_dump({**ga, "fill": "edits"}))  # the same thing for a GA
    (done / "results.json").write_text(json.dumps({"methods": {"ga": rows}}))
    assert run_or_reuse(ga, done) == rows


def test_round_alpha_reads_finetune_settings_as_yaml_values():
    import argparse

    from difftilt.benchmarks.common import yaml_setting as _setting

    assert _setting("iterations=240") == ("iterations", 240)
    assert _setting("lr=1e-3") == ("lr", 1e-3)  # a float, though YAML 1.1 reads it as a string
    assert _setting("strategy={name: policy_gradient, epochs: 2}") == ("strategy", {"name": "policy_gradient", "epochs": 2})
    assert _setting("lr_schedule=cosine") == ("lr_schedule", "cosine")
    with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
        _setting("iterations")


def test_order_consistency_of_a_model_with_itself_is_zero_and_the_path_ratio_is_the_sampled_kl():
    torch.manual_seed(0)
    p = MaskedDiffusionProcess(SequenceDenoiser(3, 4, dim=16, depth=1, heads=2), sampler="first_hit")
    same = consistency(p, p, samples=8, orders=3)
    for row in same:
        assert row["path_log_ratio"] == 0 and row["design_log_ratio"] == 0
        assert row["order_std_q"] == row["order_std_p"] > 0
    policy = copy.deepcopy(p)
    with torch.no_grad():
        for w in policy.denoiser.parameters():
            w.add_(0.5 * torch.randn_like(w))
    q = ControlledProcess(p, policy)
    rows = consistency(q, p, samples=64, orders=3)
    # q's own paths, sampled with the same seed: their log-ratio is the chain's per-step log-ratio summed
    traj = sample_trajectories(q, 64, seed=0, kl=False, log_prob=True, ref_log_prob=True)
    assert rows[0]["path_log_ratio"] == pytest.approx(float((traj.log_prob - traj.ref_log_prob).sum(1).mean()), abs=1e-4)
    assert rows[0]["path_log_ratio"] > 0 > rows[1]["path_log_ratio"]


def test_tfbind8_holdout_splits_the_half_and_accounts_for_every_sample(capsys):
    from difftilt.benchmarks.sequences_pretrained import tfbind8_holdout_report

    tiny = {"dim": 8, "depth": 1, "heads": 1, "steps": 2, "batch_size": 64, "warmup": 1}
    out = tfbind8_holdout_report(0.25, 300, seed=0, train=tiny, progress=False, nelbo_repeats=1)
    assert (out["fitted"], out["held_out"]) == (24576, 8192)  # the 32,768 8-mers of the half, a quarter held out
    share = out["sample_share"]
    assert share["fit"] + share["held_out"] + share["upper"] == pytest.approx(1.0)  # every sample is some 8-mer
    expected = (share["held_out"] / 8192) / (share["fit"] / 24576)
    assert out["held_out_per_8mer_vs_fitted"] == pytest.approx(expected)
    assert out["train"]["dim"] == 8 and out["train"]["neighbor_init"] == "counts"  # the embedded config, overridden
    assert "held out" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="holdout"):
        tfbind8_holdout_report(1.0, 10, seed=0)


def test_tfbind8_learnable_reference_is_a_normalized_law_on_every_8mer():
    import math

    from difftilt.benchmarks.sequences_pretrained import tfbind8_learnable_reference

    out = tfbind8_learnable_reference(seed=0, folds=2, epochs=1, hidden=8)
    assert out["entropy_uniform_half"] == pytest.approx(math.log(32768))  # the half is found by the threshold
    assert 0.5 < out["mass_on_half"] < 1 and 0.5 < out["accuracy"] <= 1  # even one epoch beats chance
    # Gibbs: no law has a lower cross-entropy on the half than the uniform law on it
    assert out["nll_half"] >= out["entropy_uniform_half"]


def test_an_arm_that_runs_prints_a_line_as_each_round_ends_after_its_label(tmp_path, monkeypatch, capsys):
    from difftilt.benchmarks import common

    rows = [{"method": "ucb", "round": i, "queries_used": 100 * (i + 1), "best_true": 0.5, "top10_true": 0.25,
             "seconds": seconds} for i, seconds in enumerate([30.0, 90.0, 20.0])]

    class Done:
        def read_json(self, name):
            return {"methods": {"ucb": rows}}

    def fake_run_online(cfg, *, on_round, **kwargs):
        for row in rows:
            on_round(row, 3)
        return Done()

    monkeypatch.setattr(common, "run_online", fake_run_online)
    assert common.run_or_reuse({"methods": ["ucb"]}, tmp_path / "arm", "tfbind8 ucb seed 0, ") == rows
    assert capsys.readouterr().out.splitlines() == [  # the time left: rounds to go at the median time so far
        "  tfbind8 ucb seed 0, ucb round 1/3: 100 queries, best 0.5000, top-10 0.2500 (30 s, about 60 s left)",
        "  tfbind8 ucb seed 0, ucb round 2/3: 200 queries, best 0.5000, top-10 0.2500 (90 s, about 60 s left)",
        "  tfbind8 ucb seed 0, ucb round 3/3: 300 queries, best 0.5000, top-10 0.2500 (20 s)"]
