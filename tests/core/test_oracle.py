import sqlite3
import time

import pytest
import torch

from difftilt.core import BudgetExceededError, ShapeError
from difftilt.core.errors import OracleError
from difftilt.core.oracle import Oracle
from difftilt.core.reward import FunctionReward, RewardOutput
from difftilt.core.store import SQLiteFeedbackStore


class Counting:
    """A ground truth that counts its calls and can misbehave."""

    def __init__(self, fail_times=0, sleep=0.0, nan_at=None):
        self.calls, self.fail_times, self.sleep, self.nan_at = 0, fail_times, sleep, nan_at

    def __call__(self, x):
        self.calls += 1
        if self.calls <= self.fail_times:
            raise RuntimeError("assay robot jammed")
        if self.sleep:
            time.sleep(self.sleep)
        v = x.sum(-1)
        if self.nan_at is not None:
            v = v.clone()
            v[self.nan_at] = float("nan")
        return RewardOutput(v, x[:, 0] > -5)


def test_answers_are_recorded_with_feasibility_and_budget(store):
    truth = Counting()
    oracle = Oracle(truth, budget=5, store=store, batch_size=2, event_shape=(2,))
    x = torch.tensor([[1.0, 1.0], [-9.0, 0.0], [0.5, 0.0]])
    ans = oracle.query(x, round=0, tag="a")
    assert ans.status == ["answered", "infeasible", "answered"]
    assert ans.value[0].item() == 2.0 and torch.isnan(ans.value[1])
    assert oracle.used == 3 and oracle.remaining == 2 and truth.calls == 2  # batches of 2
    with pytest.raises(BudgetExceededError, match="3 queries requested but only 2"):
        oracle.query(torch.zeros(3, 2))
    assert store.count(("pending",)) == 0 and len(store.records()) == 3  # nothing recorded for the refused query
    xs, ys = store.training_data()
    assert xs.shape == (2, 2) and ys.tolist() == [2.0, 0.5]
    xs, ys = store.training_data(infeasible_value=-1.0)  # infeasible answers too, at the given value
    assert xs.shape == (3, 2) and ys.tolist() == [2.0, -1.0, 0.5] and xs[1, 0].item() == -9.0


def test_nan_design_is_invalid_and_never_sent(store):
    truth = Counting()
    oracle = Oracle(truth, budget=10, store=store, event_shape=(2,))
    ans = oracle.query(torch.tensor([[1.0, float("nan")], [1.0, 2.0]]))
    assert ans.status == ["invalid", "answered"] and oracle.used == 1
    assert "NaN" in store.records(status=("invalid",))[0].error


def test_wrong_shape_is_recorded_and_stops(store):
    oracle = Oracle(Counting(), budget=10, store=store, event_shape=(2,))
    with pytest.raises(ShapeError, match=r"designs of shape \(3,\), expected \(2,\)"):
        oracle.query(torch.zeros(4, 3))
    assert store.count(("invalid",)) == 4 and oracle.used == 0


def test_exception_inside_the_oracle_is_retried_then_recorded(store):
    truth = Counting(fail_times=2)
    oracle = Oracle(truth, budget=10, store=store, retries=2)
    ans = oracle.query(torch.ones(2, 2))  # fails twice, third attempt succeeds
    assert ans.status == ["answered", "answered"] and truth.calls == 3

    truth = Counting(fail_times=100)
    oracle = Oracle(truth, budget=10, store=store, retries=1)
    with pytest.raises(OracleError, match="assay robot jammed"):
        oracle.query(torch.ones(3, 2))
    failed = store.records(status=("failed",))
    assert len(failed) == 3 and "after 2 attempts" in failed[0].error and truth.calls == 2

    skip = Oracle(Counting(fail_times=100), budget=10, store=store, retries=0, on_error="skip")
    assert skip.query(torch.ones(1, 2)).status == ["failed"]


def test_timeout_is_a_recorded_failure(store):
    oracle = Oracle(Counting(sleep=1.0), budget=10, store=store, retries=0, timeout=0.05)
    with pytest.raises(OracleError, match="TimeoutError"):
        oracle.query(torch.ones(2, 2))
    assert store.count(("failed",)) == 2


def test_nan_answer_fails_only_that_design(store):
    oracle = Oracle(Counting(nan_at=1), budget=10, store=store)
    ans = oracle.query(torch.ones(3, 2))
    assert ans.status == ["answered", "failed", "answered"]
    assert "returned nan" in store.records(status=("failed",))[0].error


def test_noise_is_seeded_by_query_id(tmp_path):
    def run(path):
        with SQLiteFeedbackStore(path) as s:
            o = Oracle(Counting(), budget=10, store=s, noise_std=0.5, seed=3)
            return o.query(torch.zeros(4, 2)).value
    a, b = run(tmp_path / "a.sqlite"), run(tmp_path / "b.sqlite")
    assert torch.equal(a, b) and a.std() > 0


def test_answer_pending_asks_only_what_was_never_answered(store):
    truth = Counting()
    oracle = Oracle(truth, budget=10, store=store)
    oracle.query(torch.ones(2, 2), round=0)
    store.add_pending(torch.zeros(3, 2), round=1)  # as if the process died right after recording them
    truth.calls = 0
    ans = oracle.answer_pending()
    assert len(ans.ids) == 3 and truth.calls == 1 and oracle.used == 5
    assert oracle.answer_pending().ids == []


def test_a_reader_does_not_block_the_writer(store, tmp_path):
    oracle = Oracle(Counting(), budget=100, store=store)
    oracle.query(torch.ones(2, 2))
    reader = SQLiteFeedbackStore(tmp_path / "feedback.sqlite", readonly=True)
    reader._db.execute("BEGIN")  # hold a read transaction open, as a slow notebook would
    reader._db.execute("SELECT COUNT(*) FROM queries").fetchone()
    oracle.query(torch.ones(3, 2))  # the writer commits while the read snapshot is open
    assert reader.count(("answered",)) == 2  # the reader still sees its snapshot
    reader._db.execute("COMMIT")
    assert reader.count(("answered",)) == 5
    with pytest.raises(sqlite3.OperationalError):
        reader._db.execute("DELETE FROM queries")
    reader.close()


def test_a_new_store_appears_with_its_table(tmp_path, monkeypatch):
    # a notebook that opens the store the moment its file appears must find the table
    path = tmp_path / "new.sqlite"
    real = sqlite3.connect
    seen = []

    def watching(target, *args, **kwargs):
        if str(target) == str(path):
            has_table = False
            if path.is_file():
                with real(f"file:{path}?mode=ro", uri=True) as peek:
                    has_table = peek.execute("SELECT name FROM sqlite_master WHERE name = 'queries'").fetchone() is not None
                peek.close()
            seen.append(has_table)
        return real(target, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", watching)
    SQLiteFeedbackStore(path).close()
    assert seen == [True]
    monkeypatch.undo()
    with SQLiteFeedbackStore(path, readonly=True) as reader:
        assert reader.count(("answered",)) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_designs_out_for_measurement_stay_pending_use_no_budget_and_are_asked_again_later(store):
    from difftilt.core.errors import AwaitingAnswers

    class Lab:
        """Has results for designs whose first coordinate is below 2 only, until the plate is read."""

        def __init__(self):
            self.calls, self.read = 0, False

        def __call__(self, x):
            self.calls += 1
            if not self.read and (x[:, 0] >= 2).any():
                raise AwaitingAnswers("read plate 7")
            return x.sum(-1)

    lab = Lab()
    oracle = Oracle(lab, budget=10, store=store, batch_size=2)
    x = torch.tensor([[0.0, 1.0], [1.0, 1.0], [2.0, 0.0], [3.0, 0.0], [1.5, 0.0]])
    with pytest.raises(AwaitingAnswers, match="^2 designs await the oracle's answers: read plate 7$") as err:
        oracle.query(x)
    assert (err.value.count, err.value.reason) == (2, "read plate 7")
    assert [r.status for r in store.records()] == ["answered", "answered", "pending", "pending", "answered"]
    assert oracle.used == 3 and lab.calls == 3  # each batch asked once: waiting is not retried
    lab.read = True
    answer = oracle.answer_pending()
    assert answer.status == ["answered", "answered"] and answer.value.tolist() == [2.0, 3.0]
    assert oracle.used == 5 and [r.status for r in store.records()] == ["answered"] * 5


def test_a_malformed_answer_is_not_retried(store):
    """A wrong count, shape or type is the same on every attempt, and each attempt may be a
    real experiment: the batch fails at once (an exception of the user's own is retried)."""
    from difftilt.core.errors import RewardError

    calls = []

    def short(x):  # one value too few
        calls.append(len(x))
        return x.sum(-1)[:-1]

    def listed(x):  # not a tensor
        calls.append(len(x))
        return x.sum(-1).tolist()

    class Checked(FunctionReward):  # a reward that checks its own answer (as the sequences plugin's does)
        def evaluate(self, x):
            calls.append(len(x))
            raise RewardError("my_assay.py:score returned 2 values for 3 sequences")

    for truth, kind in [(short, "ShapeError"), (listed, "RewardError"), (Checked(short), "RewardError")]:
        calls.clear()
        oracle = Oracle(truth, budget=100, store=store, retries=2)
        with pytest.raises(OracleError, match=f"^the oracle failed on a batch of 3 designs after 1 attempt \\({kind}: "):
            oracle.query(torch.ones(3, 2))
        assert calls == [3]
        assert store.records(status=("failed",))[-1].error.startswith(f"after 1 attempt: {kind}: ")


def test_bad_settings_are_config_errors(store):
    from difftilt.core.errors import ConfigError

    for bad, match in [({"timeout": -1}, "timeout: seconds > 0"), ({"timeout": 0}, "timeout: seconds > 0"),
                       ({"batch_size": 0}, "batch_size >= 1"), ({"retries": -1}, "retries"),
                       ({"on_error": "ignore"}, "on_error: 'raise' or 'skip'")]:
        with pytest.raises(ConfigError, match=match):
            Oracle(Counting(), budget=10, store=store, **bad)
    assert Oracle(Counting(), budget=10, store=store, timeout=0.5).timeout == 0.5


def test_answer_pending_with_failed_asks_again_the_batch_that_stopped_the_caller(store):
    truth = Counting()
    oracle = Oracle(truth, budget=7, store=store, batch_size=2, retries=0)
    oracle.query(torch.full((1, 2), 9.0), round=0)  # answered: never asked again
    truth.calls, truth.fail_times = 0, 1  # then the next call fails, and the caller stops
    with pytest.raises(OracleError):
        oracle.query(torch.arange(12.0).reshape(6, 2), round=1)
    assert [r.status for r in store.records()] == ["answered", "failed", "failed", "pending", "pending",
                                                   "pending", "pending"]
    assert oracle.used == 3 and oracle.remaining == 4  # the failed batch used its budget
    assert oracle.answer_pending(round=0, failed=True).ids == []  # round 0 has nothing to ask
    ans = oracle.answer_pending(round=1, failed=True)  # fixed: the failed batch, then what waited
    assert ans.ids == [1, 2, 3, 4, 5, 6] and ans.status == ["answered"] * 6 and truth.calls == 1 + 3
    assert oracle.used == 7 and len(store.records()) == 7 and store.records()[0].value == 18.0
    assert oracle.answer_pending(failed=True).ids == []

    # a NaN answer is an answer, and without failed=True (on_error="skip") a failure stays
    skip = Oracle(Counting(fail_times=1), budget=20, store=store, batch_size=2, retries=0, on_error="skip")
    assert skip.query(torch.ones(2, 2), round=2).status == ["failed", "failed"]
    assert skip.answer_pending(round=2).ids == []
    nan = Oracle(Counting(nan_at=0), budget=20, store=store, retries=0)
    assert nan.query(torch.ones(2, 2), round=3).status == ["failed", "answered"]
    assert nan.answer_pending(round=3, failed=True).ids == []
