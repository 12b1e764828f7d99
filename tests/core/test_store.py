"""The feedback store says why a design failed, and a store from before it did still
opens and resumes (by the error text, as it was written)."""

import sqlite3

import pytest
import torch

from difftilt.core.errors import OracleError
from difftilt.core.oracle import Oracle
from difftilt.core.reward import RewardOutput
from difftilt.core.store import SQLiteFeedbackStore

# The schema of the stores written before the ``failure`` column.
_OLD_SCHEMA = """
CREATE TABLE queries (
    id INTEGER PRIMARY KEY,
    round INTEGER NOT NULL,
    tag TEXT NOT NULL DEFAULT '',
    design BLOB NOT NULL,
    shape TEXT NOT NULL,
    dtype TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'answered', 'infeasible', 'failed', 'invalid')),
    value REAL,
    true_value REAL,
    feasible INTEGER,
    error TEXT,
    created REAL NOT NULL,
    answered REAL
);
"""


def _old_store(path, rows):
    """A store as written before the ``failure`` column: ``rows`` of (status, error), one
    design ``[id, 0.0]`` each, all of round 0."""
    db = sqlite3.connect(str(path))
    db.executescript(_OLD_SCHEMA)
    db.executemany(
        "INSERT INTO queries (id, round, tag, design, shape, dtype, status, error, created) "
        "VALUES (?, 0, '', ?, '[2]', 'float32', ?, ?, 0.0)",
        [(i, torch.tensor([float(i), 0.0]).numpy().tobytes(), st, err) for i, (st, err) in enumerate(rows)],
    )
    db.commit()
    db.close()


def _sum(x):
    return x.sum(-1)


def test_a_failed_record_says_why(store):
    def raising(x):
        raise RuntimeError("plate reader offline")

    def short(x):  # one value too few
        return x.sum(-1)[:-1]

    def nan_first(x):
        v = x.sum(-1)
        v[0] = float("nan")
        return RewardOutput(v, x[:, 0] > -5)

    for truth, status, failure in [(raising, ["failed"] * 2, ["oracle_error"] * 2),
                                   (short, ["failed"] * 2, ["malformed"] * 2),
                                   (nan_first, ["failed", "answered"], ["nonfinite", None])]:
        ids = Oracle(truth, budget=100, store=store, retries=1, on_error="skip").query(torch.ones(2, 2)).ids
        assert [(r.status, r.failure) for r in store.records(ids=ids)] == list(zip(status, failure))
    ids = Oracle(_sum, budget=100, store=store).query(torch.tensor([[1.0, float("nan")], [1.0, 2.0]])).ids
    assert [(r.status, r.failure) for r in store.records(ids=ids)] == [("invalid", None), ("answered", None)]


def test_answer_pending_goes_by_the_failure_not_by_the_error_text(store):
    ids = store.add_pending(torch.arange(6.0).reshape(3, 2), round=0)
    # an unanswered batch whose text does not begin "after ", a NaN answer whose text does
    store.record(ids, ["failed"] * 3, [None] * 3, [None] * 3, [None] * 3,
                 ["plate reader offline", "after 1 attempt: looked like a call failure", "timed out"],
                 ["oracle_error", "nonfinite", "malformed"])
    truth = []
    oracle = Oracle(lambda x: truth.append(x.shape[0]) or x.sum(-1), budget=3, store=store, retries=0)
    ans = oracle.answer_pending(round=0, failed=True)
    assert ans.ids == [0, 2] and ans.status == ["answered", "answered"] and truth == [2]
    assert [(r.status, r.failure) for r in store.records()] == [("answered", None), ("failed", "nonfinite"),
                                                                 ("answered", None)]
    with pytest.raises(ValueError, match="cannot record failure 'oops' for status 'failed'"):
        store.record([1], ["failed"], [None], [None], [None], ["x"], ["oops"])
    with pytest.raises(ValueError, match="cannot record failure 'nonfinite' for status 'answered'"):
        store.record([1], ["answered"], [1.0], [1.0], [True], [None], ["nonfinite"])


def test_a_store_from_before_the_failure_column_opens_and_resumes_by_the_error_text(tmp_path):
    path = tmp_path / "old.sqlite"
    _old_store(path, [("answered", None), ("failed", "after 2 attempts: RuntimeError: plate reader offline"),
                      ("failed", "the oracle returned nan for a feasible design"), ("pending", None)])
    with SQLiteFeedbackStore(path, readonly=True) as reader:  # a reader cannot add the column
        assert [(r.status, r.failure) for r in reader.records()] == [("answered", None), ("failed", None),
                                                                      ("failed", None), ("pending", None)]
    truth = []
    with SQLiteFeedbackStore(path) as store:  # a writer adds it, NULL in the old rows
        oracle = Oracle(lambda x: truth.append(x.shape[0]) or x.sum(-1), budget=4, store=store)
        ans = oracle.answer_pending(round=0, failed=True)
        assert ans.ids == [1, 3] and ans.value.tolist() == [1.0, 3.0] and truth == [2]
        assert [(r.status, r.failure) for r in store.records()] == [("answered", None), ("answered", None),
                                                                     ("failed", None), ("answered", None)]
        broken = Oracle(lambda x: 1 / 0, budget=10, store=store, retries=0)
        with pytest.raises(OracleError, match="ZeroDivisionError"):
            broken.query(torch.ones(1, 2), round=1)
        assert store.records(round=1)[0].failure == "oracle_error"
    with SQLiteFeedbackStore(path, readonly=True) as reader:
        assert [r.failure for r in reader.records(status=("failed",))] == [None, "oracle_error"]
