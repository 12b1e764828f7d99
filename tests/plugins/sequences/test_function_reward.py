"""A user's own oracle: a Python function of sequence strings as the reward."""

import csv
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from difftilt.core.cli import main
from difftilt.core.errors import ConfigError, RewardError
from difftilt.core.online import run_online
from difftilt.core.plugins import load_plugin
from difftilt.core.store import COUNTED, SQLiteFeedbackStore
from difftilt.plugins.sequences import DNA, FunctionReward

ASSAY = '''
CALLS = []

def score(seqs):
    """G/C content, no score for a sequence with TTT (it 'fails to express')."""
    CALLS.append(list(seqs))
    return [None if "TTT" in s else (s.count("G") + s.count("C")) / len(s) for s in seqs]

def bad_length(seqs):
    return [0.0] * (len(seqs) + 1)

def bad_type(seqs):
    return ["high"] * len(seqs)

def nan_for_all_a(seqs):
    return [float("nan") if set(s) == {"A"} else 1.0 for s in seqs]

not_a_function = 3
'''


@pytest.fixture
def assay(tmp_path):
    path = tmp_path / "assay.py"
    path.write_text(textwrap.dedent(ASSAY))
    return path


def _one_hot(seqs, letters=DNA):
    ids = torch.tensor([[letters.index(c) for c in s] for s in seqs])
    return torch.nn.functional.one_hot(ids, len(letters) + 1).float()


def test_the_function_gets_the_strings_and_its_numbers_and_nones_are_the_reward(assay):
    reward = FunctionReward(f"{assay}:score")
    x = _one_hot(["GGCCAAAA", "TTTGGGCC", "GCGCGCGC", "ACGTACGT"])
    x[3, 5] = 0.0
    x[3, 5, 4] = 1.0  # a position still masked: infeasible, never asked
    out = reward(x)
    assert out.feasible.tolist() == [True, False, True, False]
    assert out.value[out.feasible].tolist() == [0.5, 1.0]
    assert sys.modules[reward.fn.__module__].CALLS == [["GGCCAAAA", "TTTGGGCC", "GCGCGCGC"]]
    assert not FunctionReward.differentiable and reward.name == f"{assay}:score"


def test_a_module_target_and_the_letters(tmp_path, monkeypatch):
    (tmp_path / "my_oracle_mod.py").write_text("def first(seqs):\n    return [float('ACDE'.index(s[0])) for s in seqs]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = FunctionReward("my_oracle_mod:first", letters="ACDE")
    assert reward(_one_hot(["DA", "EC", "AA"], "ACDE")).value.tolist() == [2.0, 3.0, 0.0]


def test_bad_targets_fail_when_the_reward_is_built(assay):
    for target, message in [("assay.py", "expected 'module:function'"), (":score", "expected 'module:function'"),
                            (f"{assay.parent / 'nope.py'}:score", "no file"),
                            (f"{assay}:scroe", "has no attribute 'scroe'"),
                            (f"{assay}:not_a_function", "is a int, not a function"),
                            ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'")]:
        with pytest.raises(ConfigError, match=message):
            FunctionReward(target)
    broken = assay.parent / "broken.py"
    broken.write_text("raise RuntimeError('needs the lab VPN')\n")
    with pytest.raises(ConfigError, match="importing .*broken.py' failed: RuntimeError: needs the lab VPN"):
        FunctionReward(f"{broken}:f")
    with pytest.raises(ConfigError, match="distinct"):
        FunctionReward(f"{assay}:score", letters="AAC")


def test_answers_that_are_not_one_number_per_sequence_are_errors(assay):
    x = _one_hot(["ACGT", "GGGG"])
    with pytest.raises(RewardError, match="returned 3 values for 2 sequences"):
        FunctionReward(f"{assay}:bad_length").evaluate(x)
    with pytest.raises(RewardError, match="returned str 'high' for 'ACGT'; expected a number or None"):
        FunctionReward(f"{assay}:bad_type").evaluate(x)


def test_a_nan_is_passed_on_for_the_oracle_to_record(assay):
    out = FunctionReward(f"{assay}:nan_for_all_a").evaluate(_one_hot(["AAAA", "ACGT"]))
    assert out.feasible.tolist() == [True, True] and out.value[0].isnan() and out.value[1] == 1.0


def test_the_online_loop_asks_the_users_function_and_writes_the_designs_as_text(assay, tmp_path, capsys):
    """TFBind8's model, the user's function as the ground truth (`difftilt online`): every stored
    answer is the function's, designs.csv lists each design asked as a string with its answer,
    and the command prints the best one."""
    cfg = {"plugin": "sequences", "seed": 0, "process": "tfbind8", "methods": ["hill_climb"], "schedule": [32, 32],
           "oracle": {"reward": {"name": "function", "target": f"{assay}:score"}, "batch_size": 8},
           "eval_samples": 0, "name": "mine"}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["online", str(path), "--output-dir", str(tmp_path / "runs"), "--no-progress"]) == 0
    folder = tmp_path / "runs" / "mine" / "hill_climb"
    with SQLiteFeedbackStore(folder / "feedback.sqlite", readonly=True) as store:
        records = store.records(status=COUNTED)
    strings = load_plugin("sequences").decode(torch.stack([r.design for r in records]))
    assert len(records) == 64 and any("TTT" in s for s in strings)
    for s, r in zip(strings, records):
        expected = ("infeasible", None) if "TTT" in s else ("answered", (s.count("G") + s.count("C")) / 8)
        assert (r.status, r.true_value) == expected
    with open(folder / "designs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(int(row["query"]), int(row["round"]), row["status"], row["design"]) for row in rows] == \
        [(r.id, r.round, r.status, s) for r, s in zip(records, strings)]
    assert [float(row["value"]) if row["value"] else None for row in rows] == [r.value for r in records]
    value = max(r.value for r in records if r.status == "answered")
    best = next(s for r, s in zip(records, strings) if r.value == value)  # the first asked of the best
    assert f"hill_climb  best design {value:.4f} {best}  (all: {folder / 'designs.csv'})" in capsys.readouterr().out


def test_a_typo_in_the_target_is_one_line_before_any_run_folder(assay, tmp_path):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(f"plugin: sequences\nprocess: tfbind8\nmethods: [hill_climb]\nschedule: [8]\n"
                   f"oracle: {{reward: {{name: function, target: '{assay}:scroe'}}}}\n")
    proc = subprocess.run([sys.executable, "-m", "difftilt", "online", str(cfg), "--output-dir", str(tmp_path / "r")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"difftilt: error: target: '{assay}' has no attribute 'scroe'"
    assert not (tmp_path / "r").exists()


def test_a_real_experiment_is_never_asked_outside_the_budget(assay, tmp_path):
    """The online loop's per-round diagnostic scores model samples with the ground truth,
    outside the budget: refused for the user's function unless it says it is cheap."""
    reward = FunctionReward(f"{assay}:score")
    assert not reward.simulated and FunctionReward(f"{assay}:score", cheap=True).simulated
    assert not (reward + 0.1 * load_plugin("sequences").make_reward("tfbind8")).simulated
    cfg = {"plugin": "sequences", "process": "tfbind8", "methods": ["ucb"], "schedule": [8],
           "oracle": {"reward": {"name": "function", "target": f"{assay}:score"}},
           "output_dir": str(tmp_path / "runs"), "name": "mine"}
    with pytest.raises(ConfigError, match=r"eval_samples: the oracle '.*assay.py:score' is a real experiment.* "
                                          r"score 256 of each round's model samples"):
        run_online(cfg, progress=False)
    assert not (tmp_path / "runs").exists()
