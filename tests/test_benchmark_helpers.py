"""The sequences benchmark's bookkeeping: rounds cut at the budget, best-so-far read in asking order."""

import pytest
import torch

from difftilt.benchmarks.sequences import EARLIER_ROUNDS, arm_config, schedule_for, store_curve
from difftilt.core.oracle import Oracle
from difftilt.core.reward import RewardOutput
from difftilt.core.store import SQLiteFeedbackStore


def test_schedule_is_cut_at_the_budget_and_repeats_its_last_round():
    assert schedule_for(5000, EARLIER_ROUNDS) == [250, 250, 500, 1000, 1500, 1500]
    assert schedule_for(2000, EARLIER_ROUNDS) == [250, 250, 500, 1000]
    assert schedule_for(600, EARLIER_ROUNDS) == [250, 250, 100]
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


def test_an_arm_is_its_tasks_config_with_the_tasks_then_the_variants_then_the_command_lines_changes():
    plain = arm_config("ehrlich-20-32-4-4", "ucb", 1, [250, 250], "ehrlich")
    assert (plain["methods"], plain["seed"], plain["schedule"], plain["stop_at"]) == (["ucb"], 1, [250, 250], None)
    assert plain["alpha"] == 0.005 and plain["fill"] == "edits" and plain["finetune"]["batch_size"] == 32
    assert plain["oracle"]["reward"]["num_motifs"] == 4 and plain.get("edit_share", 0.0) == 0.0
    variant = arm_config("ehrlich-20-32-4-4", "ucb_edits", 1, [250, 250], "ehrlich")
    assert variant["methods"] == ["ucb"] and variant["edit_share"] == 0.25
    assert {k: v for k, v in variant.items() if k != "edit_share"} == {k: v for k, v in plain.items() if k != "edit_share"}
    assert arm_config("tfbind8", "ucb_edits", 0, [100], "tfbind8", ["edit_share=0.5"])["edit_share"] == 0.5
