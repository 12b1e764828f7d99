"""A lab in the loop: designs go out in a CSV file, the run stops, the answers come back."""

import csv
import json

import pytest
import torch

from difftilt.core.cli import main
from difftilt.core.errors import AwaitingAnswers
from difftilt.core.online import run_online
from difftilt.core.store import SQLiteFeedbackStore
from difftilt.plugins.sequences import MeasurementFile

ASSAY = '''
def score(seqs):
    return [None if "TTT" in s else (s.count("G") + s.count("C")) / len(s) for s in seqs]
'''


def _score(s: str):
    return None if "TTT" in s else (s.count("G") + s.count("C")) / len(s)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _measure(path) -> int:
    """Fill in every empty value of the file as the assay would (the lab's work); returns how many."""
    rows = _rows(path)
    todo = [r for r in rows if not r["value"]]
    for r in todo:
        v = _score(r["sequence"])
        r["value"] = "infeasible" if v is None else repr(v)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return len(todo)


def test_the_file_lists_what_waits_once_and_reads_numbers_and_infeasible(tmp_path):
    lab = MeasurementFile(tmp_path / "m.csv")
    with pytest.raises(AwaitingAnswers) as err:
        lab(["ACGT", "GGGG", "ACGT"])
    assert err.value.count == 2 and str(tmp_path / "m.csv") in str(err.value)
    with pytest.raises(AwaitingAnswers):
        lab(["GGGG", "TTTT"])  # only the new one is appended
    assert [(r["sequence"], r["value"]) for r in _rows(tmp_path / "m.csv")] == [("ACGT", ""), ("GGGG", ""), ("TTTT", "")]
    # the lab adds a column, answers in place, and lists one result again on a row of its own
    (tmp_path / "m.csv").write_text("sequence,value,plate\nACGT,0.5,p1\nGGGG,,p1\nTTTT,Infeasible,p2\nGGGG,1e-1,p2")
    assert lab(["TTTT", "GGGG", "ACGT", "GGGG"]) == [None, 0.1, 0.5, 0.1]
    with pytest.raises(AwaitingAnswers):
        lab(["CCCC"])
    assert (tmp_path / "m.csv").read_text().endswith("GGGG,1e-1,p2\nCCCC,\n")  # appended after the last line
    (tmp_path / "m.csv").write_text("sequence,value\nACGT,0.5x\n")
    with pytest.raises(AwaitingAnswers, match=r"m.csv line 2: value '0.5x' is neither a number nor 'infeasible'"):
        lab(["ACGT"])
    (tmp_path / "m.csv").write_text("sequence,value\nACGT,0.5\nACGT,0.6\n")
    with pytest.raises(AwaitingAnswers, match=r"line 3: ACGT is listed again with another value"):
        lab(["ACGT"])
    (tmp_path / "m.csv").write_text("seq,value\nACGT,0.5\n")
    with pytest.raises(AwaitingAnswers, match=r"needs the columns 'sequence' and 'value', has seq, value"):
        lab(["ACGT"])


@pytest.mark.slow
def test_a_run_with_a_lab_stops_each_round_and_resumes_to_what_a_function_gives_at_once(tmp_path, capsys):
    (tmp_path / "assay.py").write_text(ASSAY)
    base = {"plugin": "sequences", "seed": 0, "process": "tfbind8", "methods": ["ucb", "hill_climb"],
            "schedule": [16, 16], "alpha": 0.1, "eval_samples": 0, "output_dir": str(tmp_path / "runs"),
            "finetune": {"iterations": 3, "batch_size": 16, "lr": 1e-3, "value_refit_iterations": 0},
            "reward_model": {"epochs": 5}}
    direct = run_online({**base, "name": "direct", "oracle": {"reward": {"name": "function",
                                                                         "target": f"{tmp_path / 'assay.py'}:score"},
                                                              "batch_size": 8}}, progress=False)
    sheet = tmp_path / "lab" / "measurements.csv"
    cfg = {**base, "name": "lab", "oracle": {"reward": {"name": "lab", "file": str(sheet)}, "batch_size": 8}}
    (tmp_path / "lab.json").write_text(json.dumps(cfg))
    assert main(["online", str(tmp_path / "lab.json"), "--no-progress"]) == 3
    run = tmp_path / "runs" / "lab"
    assert capsys.readouterr().err.strip() == (
        f"difftilt: waiting: 32 designs (ucb 16, hill_climb 16) await the oracle's answers: fill in their value "
        f"(a number, or 'infeasible') in {sheet}; then continue with: difftilt online --resume {run}")
    assert json.loads((run / "status.json").read_text())["state"] == "waiting"
    measured = [_measure(sheet)]
    assert main(["online", "--resume", str(run), "--no-progress"]) == 3  # round 1 out: round 0's table first
    out = capsys.readouterr()
    assert out.out.startswith(f"run folder: {run}\n") and "hill_climb       0          16" in out.out
    assert out.err.startswith("difftilt: waiting: 32 designs (ucb 16, hill_climb 16)")
    measured.append(_measure(sheet))
    while True:  # each resume runs one more round of each method, then waits again
        try:
            run_online(resume=run, progress=False)
            break
        except AwaitingAnswers as err:
            measured.append(_measure(sheet))
            assert err.count == 32
    assert len(measured) == 2 and 0 < measured[1] <= 32  # round 1's designs (a design both methods asked, once)
    assert sum(measured) == len(_rows(sheet))
    assert json.loads((run / "status.json").read_text())["state"] == "complete"
    for method in base["methods"]:  # the same designs, in the same order, with the same answers
        stores = [SQLiteFeedbackStore(path / method / "feedback.sqlite", readonly=True) for path in (direct.path, run)]
        (a, b) = [store.records() for store in stores]
        for store in stores:
            store.close()
        assert len(a) == len(b) == 32
        assert all(torch.equal(r.design, s.design) and (r.round, r.status, r.value) == (s.round, s.status, s.value)
                   for r, s in zip(a, b)), method
        rows = [[json.loads(line)["queries_used"] for line in (path / method / "rounds.jsonl").read_text().splitlines()]
                for path in (direct.path, run)]
        assert rows == [[16, 32], [16, 32]]
