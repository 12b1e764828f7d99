"""The feedback store: every oracle query and its answer, persisted before anything uses it.

:class:`FeedbackStore` is the interface; :class:`SQLiteFeedbackStore` the embedded
default (one ``feedback.sqlite`` file in the run folder). The protocol that makes a run
killable at any moment:

1. a round's designs are inserted as ``pending`` (one transaction) before any query;
2. each answered batch is committed at once (``answered``, ``infeasible``, ``failed``);
3. on resume, ``pending`` designs are queried again and nothing else is.

Budget accounting counts every design the oracle was asked about and answered in any
way (``answered``, ``infeasible``, ``failed``); ``pending`` (never answered) and
``invalid`` (rejected before reaching the oracle: NaN, wrong shape) do not count.

A ``failed`` record says why in ``failure`` (one of :data:`FAILURES`). Stores written
before that column existed open as they are: a writer adds the column (``NULL`` in the old
rows), a reader reads ``None``.

SQLite runs in WAL mode, so a reader (a notebook watching the run, opened with
``readonly=True``) never blocks the run and always sees a consistent snapshot.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["FeedbackStore", "SQLiteFeedbackStore", "QueryRecord", "STATUSES", "COUNTED", "FAILURES"]

STATUSES = ("pending", "answered", "infeasible", "failed", "invalid")
#: statuses that used oracle budget
COUNTED = ("answered", "infeasible", "failed")
#: why a design ``failed``: the oracle's call raised or timed out on every attempt; it
#: answered with the wrong shape, type or count; it answered NaN or inf for a feasible design
FAILURES = ("oracle_error", "malformed", "nonfinite")


@dataclass
class QueryRecord:
    """One design and what the oracle said about it.

    Attributes:
        id: global query index (insertion order).
        round: the round that produced the design.
        tag: free text (the method or batch that asked).
        design: the design, a tensor of the event shape.
        status: one of :data:`STATUSES`.
        value: the observed reward (``None`` unless ``answered``).
        true_value: the noise-free reward when the oracle knows it (simulations), else ``None``.
        feasible: whether the design is feasible (``None`` until answered).
        error: the error message of a ``failed`` or ``invalid`` design.
        failure: why a ``failed`` design failed, one of :data:`FAILURES` (``None`` for the
            other statuses, and for a failure stored before the field existed).
    """

    id: int
    round: int
    tag: str
    design: Tensor
    status: str
    value: float | None
    true_value: float | None
    feasible: bool | None
    error: str | None
    failure: str | None = None


class FeedbackStore(ABC):
    """Where queries and answers live. Implementations must make :meth:`add_pending` and
    :meth:`record` durable before they return."""

    @abstractmethod
    def add_pending(self, designs: Tensor, round: int, tag: str = "") -> list[int]:
        """Insert designs ``(n, *event_shape)`` as ``pending``; return their ids."""

    @abstractmethod
    def record(self, ids: list[int], status: list[str], value: list[float | None],
               true_value: list[float | None], feasible: list[bool | None], error: list[str | None],
               failure: list[str | None] | None = None) -> None:
        """Store the answers for ``ids`` (one transaction); ``failure`` (default: none) per
        ``failed`` design, one of :data:`FAILURES`."""

    @abstractmethod
    def records(self, round: int | None = None, status: tuple[str, ...] | None = None,
                ids: list[int] | None = None) -> list[QueryRecord]:
        """Records, optionally of one round, some statuses and/or some ids, in id order."""

    @abstractmethod
    def count(self, status: tuple[str, ...] = COUNTED, round: int | None = None) -> int:
        """How many records have one of ``status`` (default: those that used budget)."""

    def training_data(self, infeasible_value: float | None = None,
                      before_round: int | None = None) -> tuple[Tensor, Tensor]:
        """Answered designs and their observed values: ``(n, *event_shape)``, ``(n,)``.

        Only feasible answers by default; with ``infeasible_value``, infeasible answers too,
        at that value (so that a reward model learns where designs fail). With
        ``before_round``, only the answers of earlier rounds.
        """
        recs = [r for r in self.records(status=("answered", "infeasible"))
                if (before_round is None or r.round < before_round)
                and ((r.status == "answered" and r.feasible) or (infeasible_value is not None and r.status == "infeasible"))]
        if not recs:
            return torch.empty(0), torch.empty(0)
        values = [r.value if r.status == "answered" else float(infeasible_value) for r in recs]
        return torch.stack([r.design for r in recs]), torch.tensor(values, dtype=torch.float32)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS queries (
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
    answered REAL,
    failure TEXT
);
CREATE INDEX IF NOT EXISTS queries_round ON queries (round);
CREATE INDEX IF NOT EXISTS queries_status ON queries (status);
"""


class SQLiteFeedbackStore(FeedbackStore):
    """The embedded store: one SQLite file, WAL mode, durable commits.

    Args:
        path: the database file (created with its schema if missing).
        readonly: open for reading only (never blocks a writer).
    """

    def __init__(self, path: str | os.PathLike, readonly: bool = False):
        self.path = Path(path)
        if readonly:
            if not self.path.is_file():
                raise FileNotFoundError(f"no feedback store at {self.path}")
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30.0)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self.path.is_file():
                # Made aside with its schema, then moved into place, so that a reader (a
                # notebook watching the run) never opens a store without its table.
                tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
                new = sqlite3.connect(str(tmp))
                new.executescript(_SCHEMA)
                new.commit()
                new.close()
                os.replace(tmp, self.path)
            self._db = sqlite3.connect(str(self.path), timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            if "failure" not in self._columns():  # a store from before the column: old rows read NULL
                self._db.execute("ALTER TABLE queries ADD COLUMN failure TEXT")
            self._db.commit()
        self.readonly = readonly

    def _columns(self) -> set[str]:
        return {row[1] for row in self._db.execute("PRAGMA table_info(queries)")}

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "SQLiteFeedbackStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add_pending(self, designs: Tensor, round: int, tag: str = "") -> list[int]:
        arr = designs.detach().cpu().contiguous().numpy()
        now = time.time()
        rows = [(int(round), tag, sqlite3.Binary(a.tobytes()), json.dumps(list(a.shape)), str(a.dtype), "pending", now)
                for a in arr]
        with self._db:  # one transaction, committed (and fsynced) on exit
            cur = self._db.execute("SELECT COALESCE(MAX(id), -1) FROM queries")
            start = cur.fetchone()[0] + 1
            self._db.executemany(
                "INSERT INTO queries (id, round, tag, design, shape, dtype, status, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(start + i, *row) for i, row in enumerate(rows)],
            )
        return list(range(start, start + len(rows)))

    def record(self, ids, status, value, true_value, feasible, error, failure=None) -> None:
        now = time.time()
        failure = [None] * len(ids) if failure is None else failure
        for s, why in zip(status, failure):
            if s not in STATUSES or s == "pending":
                raise ValueError(f"cannot record status {s!r}")
            if why is not None and (s != "failed" or why not in FAILURES):
                raise ValueError(f"cannot record failure {why!r} for status {s!r}")
        with self._db:
            self._db.executemany(
                "UPDATE queries SET status = ?, value = ?, true_value = ?, feasible = ?, error = ?, failure = ?, "
                "answered = ? WHERE id = ?",
                [(s, v, tv, None if f is None else int(bool(f)), e, why, now, int(i))
                 for i, s, v, tv, f, e, why in zip(ids, status, value, true_value, feasible, error, failure)],
            )

    def records(self, round: int | None = None, status: tuple[str, ...] | None = None,
                ids: list[int] | None = None) -> list[QueryRecord]:
        # a reader of a store from before the failure column cannot add it: reads None
        failure = "failure" if "failure" in self._columns() else "NULL"
        sql = ("SELECT id, round, tag, design, shape, dtype, status, value, true_value, feasible, error, "
               f"{failure} FROM queries")
        where, args = [], []
        if ids is not None:
            if not ids:
                return []
            where.append(f"id IN ({', '.join('?' * len(ids))})")
            args.extend(int(i) for i in ids)
        if round is not None:
            where.append("round = ?")
            args.append(int(round))
        if status:
            where.append(f"status IN ({', '.join('?' * len(status))})")
            args.extend(status)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id"
        out = []
        for (id_, rnd, tag, blob, shape, dtype, st, val, tval, feas, err, why) in self._db.execute(sql, args):
            design = torch.from_numpy(np.frombuffer(blob, dtype=np.dtype(dtype)).reshape(json.loads(shape)).copy())
            out.append(QueryRecord(id_, rnd, tag, design, st, val, tval, None if feas is None else bool(feas), err,
                                   why))
        return out

    def count(self, status: tuple[str, ...] = COUNTED, round: int | None = None) -> int:
        sql = f"SELECT COUNT(*) FROM queries WHERE status IN ({', '.join('?' * len(status))})"
        args: list = list(status)
        if round is not None:
            sql += " AND round = ?"
            args.append(int(round))
        return int(self._db.execute(sql, args).fetchone()[0])
