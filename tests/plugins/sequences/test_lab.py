"""A lab in the loop: designs go out in a CSV file, the run stops, the answers come back."""

import csv
import json
from pathlib import Path

import pytest
import torch

from difftilt.core.cli import main
from difftilt.core.errors import AwaitingAnswers
from difftilt.core.online import run_online
from difftilt.core.oracle import Oracle
from difftilt.core.store import SQLiteFeedbackStore
from difftilt.plugins.sequences import DNA, MeasurementFile
from difftilt.plugins.sequences.function_reward import lab as lab_reward

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



def _one_hot(seqs, letters=DNA):
    ids = torch.tensor([[letters.index(c) for c in s] for s in seqs])
    return torch.nn.functional.one_hot(ids, len(letters) + 1).float()


def _statuses(store):
    return [r.status for r in store.records()]


def test_a_lab_file_that_cannot_be_written_is_a_config_error_before_any_run(tmp_path):
    from difftilt.core.errors import ConfigError

    (tmp_path / "plates").mkdir()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match="is a folder; name a CSV file"):
        lab_reward(str(tmp_path / "plates"), letters=DNA)
    with pytest.raises(ConfigError, match="is not a writable folder"):
        lab_reward(str(tmp_path / "a_file" / "m.csv"), letters=DNA)
    assert lab_reward(str(tmp_path / "new" / "m.csv"), letters=DNA) is not None  # its folder is made when written


def test_a_file_that_is_not_utf8_waits_naming_the_line_and_loses_no_measurement(tmp_path):
    """An Excel "CSV" export in a Latin-1 code page (µ as byte 0xb5) is not a failed batch:
    the designs stay pending, with the line, until the file is saved as UTF-8."""
    sheet = tmp_path / "m.csv"
    with SQLiteFeedbackStore(tmp_path / "f.sqlite") as store:
        oracle = Oracle(lab_reward(str(sheet), letters=DNA), budget=4, store=store, batch_size=2)
        with pytest.raises(AwaitingAnswers):
            oracle.query(_one_hot(["ACGT", "GGGG"]))
        sheet.write_bytes(b"sequence,value,note\nACGT,0.5,\nGGGG,0.25,5 \xb5g\n")
        with pytest.raises(AwaitingAnswers, match=r"m.csv line 3: byte 0xb5 is not UTF-8 text; save the file as "
                                                  r"'CSV UTF-8'") as err:
            oracle.answer_pending()
        assert err.value.count == 2 and _statuses(store) == ["pending", "pending"] and oracle.used == 0
        sheet.write_bytes(b"sequence,value,note\nACGT,0.5,\nGGGG,0.25,5 \xc2\xb5g\n")
        assert oracle.answer_pending().value.tolist() == [0.5, 0.25] and _statuses(store) == ["answered"] * 2


def test_a_file_saved_as_csv_utf8_by_excel_is_read_past_its_byte_order_mark_and_appended_to(tmp_path):
    sheet = tmp_path / "m.csv"
    sheet.write_bytes(b"\xef\xbb\xbfsequence,value\r\nACGT,0.5\r\n")  # Excel: a BOM, CRLF line ends
    lab = MeasurementFile(sheet)
    assert lab(["ACGT"]) == [0.5]
    with pytest.raises(AwaitingAnswers):
        lab(["ACGT", "GGGG"])
    assert sheet.read_bytes() == b"\xef\xbb\xbfsequence,value\r\nACGT,0.5\r\nGGGG,\r\n"
    sheet.write_bytes(sheet.read_bytes().replace(b"GGGG,", b"GGGG,0.25"))
    assert lab(["GGGG", "ACGT"]) == [0.25, 0.5]


def test_sequences_typed_in_the_other_case_are_the_designs_when_the_alphabet_has_one_case(tmp_path):
    sheet = tmp_path / "m.csv"
    lab = MeasurementFile(sheet, letters=DNA)
    with pytest.raises(AwaitingAnswers):
        lab(["ACGT", "GGGG"])
    sheet.write_text("sequence,value\nacgt,0.5\ngggg,\n")  # retyped in lower case by the lab
    with pytest.raises(AwaitingAnswers) as err:
        lab(["ACGT", "GGGG"])
    assert err.value.count == 1 and sheet.read_text() == "sequence,value\nacgt,0.5\ngggg,\n"  # nothing listed again
    sheet.write_text("sequence,value\nacgt,0.5\nGgGg,infeasible\n")
    assert lab(["GGGG", "ACGT"]) == [None, 0.5]
    sheet.write_text("sequence,value\nACGT,0.5\nacgt,0.6\n")
    with pytest.raises(AwaitingAnswers, match=r"line 3: acgt is listed again with another value"):
        lab(["ACGT"])
    # an alphabet with both cases tells them apart: the file says which lines are not the designs
    sheet.write_text("sequence,value\naCgt,0.5\n")
    with pytest.raises(AwaitingAnswers, match=r"; line 2 lists 'aCgt' for the design 'ACgt': the alphabet "
                                              r"'ACGTacgt' tells upper from lower case"):
        MeasurementFile(sheet, letters="ACGTacgt")(["ACgt"])
    reward = lab_reward(str(sheet), letters="ACGT")
    assert reward.fn.letters == "ACGT"  # the reward's alphabet decides for the file


def test_nan_and_infinite_values_wait_naming_the_line_rather_than_fail_the_design(tmp_path):
    sheet = tmp_path / "m.csv"
    with SQLiteFeedbackStore(tmp_path / "f.sqlite") as store:
        oracle = Oracle(lab_reward(str(sheet), letters=DNA), budget=4, store=store, batch_size=2)
        with pytest.raises(AwaitingAnswers):
            oracle.query(_one_hot(["ACGT", "GGGG"]))
        for value in ["NaN", "nan", "inf", "-inf", "-Infinity"]:
            sheet.write_text(f"sequence,value\nACGT,0.5\nGGGG,{value}\n")
            with pytest.raises(AwaitingAnswers, match=rf"m.csv line 3: value '{value}' is not a finite number; a "
                                                      r"value must be a finite number or 'infeasible'"):
                oracle.answer_pending()
            assert _statuses(store) == ["pending", "pending"]
        sheet.write_text("sequence,value\nACGT,0.5\nGGGG,infeasible\n")
        assert oracle.answer_pending().status == ["answered", "infeasible"]


def test_an_unclosed_quote_waits_naming_the_line_where_it_opens_and_lists_nothing_again(tmp_path):
    """csv would read the rest of the file as the quoted field: later rows vanish (and were
    listed again, inside the quote, at every call) or read as one odd value."""
    sheet = tmp_path / "m.csv"
    with SQLiteFeedbackStore(tmp_path / "f.sqlite") as store:
        oracle = Oracle(lab_reward(str(sheet), letters=DNA), budget=4, store=store, batch_size=2)
        with pytest.raises(AwaitingAnswers):
            oracle.query(_one_hot(["ACGT", "GGGG"]))
        for text, line in [('sequence,value\nACGT,"0.5\nGGGG,0.25\n', 2),  # in a value
                           ('sequence,value\n"ACGT,0.5\nGGGG,0.25\n', 2),  # in a sequence
                           ('sequence,value,note\nACGT,0.5,"p1\nGGGG,0.25,p1\n', 2),  # in another column
                           ('sequence,value\r\nACGT,0.5\r\n\r\nGGGG,"0.25\r\n', 4),  # after a blank line, CRLF
                           ('sequence,value\nACGT,0.5\nGGGG,"0.25', 3)]:  # on the last line, no line end
            sheet.write_bytes(text.encode())
            with pytest.raises(AwaitingAnswers, match=rf"m.csv line {line}: a quote opened in this row is never "
                                                      r"closed, so the rest of the file would read as one field"):
                oracle.answer_pending()
            assert sheet.read_bytes() == text.encode() and _statuses(store) == ["pending", "pending"]
        sheet.write_text('sequence,value\nACGT,0.5\n"GGGG"x,0.25\n')  # another csv error: its line too
        with pytest.raises(AwaitingAnswers, match=r"m.csv line 3: ',' expected after '\"'"):
            oracle.answer_pending()
        sheet.write_text('sequence,value,note\nACGT,"0.5",\nGGGG,0.25,"two\nlines"\n')  # closed quotes are fine
        assert oracle.answer_pending().value.tolist() == [0.5, 0.25] and oracle.used == 2


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
    assert out.out.startswith(f"running in {run} (follow it from another terminal: difftilt show {run})\n"
                              f"run folder: {run}\n") and "hill_climb       0          16" in out.out
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


def test_a_lab_run_resumed_from_another_directory_reads_the_file_it_was_started_with(tmp_path, monkeypatch):
    (tmp_path / "project").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    cfg = {"plugin": "sequences", "seed": 0, "process": "tfbind8", "methods": ["hill_climb"], "schedule": [8, 8],
           "eval_samples": 0, "output_dir": "runs", "name": "lab",
           "oracle": {"reward": {"name": "lab", "file": "measurements.csv"}, "batch_size": 8}}
    with pytest.raises(AwaitingAnswers):
        run_online(cfg, progress=False)
    sheet = tmp_path / "project" / "measurements.csv"
    assert _measure(sheet) == 8
    monkeypatch.chdir(tmp_path / "elsewhere")  # a cluster job, say, that resumes it by its full path
    run = tmp_path / "project" / "runs" / "lab"
    with pytest.raises(AwaitingAnswers, match=f"in {sheet}; then continue with: difftilt online --resume {run}$"):
        run_online(resume=run, progress=False)  # round 0 answered from the file; round 1 out
    assert not (tmp_path / "elsewhere" / "measurements.csv").exists() and Path.cwd() == tmp_path / "elsewhere"
    assert _measure(sheet) == 8
    run_online(resume=run, progress=False)
    rows = [json.loads(line) for line in (run / "hill_climb" / "rounds.jsonl").read_text().splitlines()]
    assert [r["queries_used"] for r in rows] == [8, 16] and len(_rows(sheet)) == 16
