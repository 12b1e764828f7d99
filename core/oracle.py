"""The ground-truth oracle: an expensive reward behind a query budget.

:class:`Oracle` wraps any reward (a simulator, a wrapper around a lab assay) and adds
what an expensive oracle needs: a budget that is never exceeded, batching, optional
observation noise, retries and a timeout per batch, feasibility, and a
:class:`~difftilt.core.store.FeedbackStore` in which every design is recorded *before*
the ground truth sees it and every answer as soon as it arrives.

What happens to bad input, design by design:

* a design with NaN or inf is recorded ``invalid`` and never sent (no budget used);
* a batch of the wrong shape is recorded ``invalid`` and stops the caller with a
  :class:`~difftilt.core.errors.ShapeError`;
* an exception or a timeout inside the user's oracle is retried; if it persists, the
  batch is recorded ``failed`` with the error and, with ``on_error="raise"``, the caller
  stops with one :class:`~difftilt.core.errors.OracleError`; with ``"skip"`` it goes on;
* an answer of the wrong shape, type or count (a :class:`~difftilt.core.errors.RewardError`,
  :class:`~difftilt.core.errors.ShapeError` or :class:`~difftilt.core.errors.InputDataError`,
  from the oracle's checks or from the reward's own) is the same on every attempt -- and
  each attempt may be a real experiment -- so it is not retried: the batch fails at once;
* a batch that failed and stopped the caller (``on_error="raise"``) never got an answer:
  :meth:`Oracle.answer_pending` with ``failed=True`` asks it again (a resumed run does,
  once the oracle is fixed), without using budget a second time;
* a NaN value for a feasible design marks that design ``failed``;
* an infeasible design is recorded ``infeasible`` with no value, and uses budget;
* a batch whose reward raises :class:`~difftilt.core.errors.AwaitingAnswers` (sent out to
  a lab, no results yet) stays ``pending``, uses no budget and is not retried; the other
  batches are asked, then the query raises it with the number of designs that wait.
"""

from __future__ import annotations

import concurrent.futures as cf
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

from .errors import (AwaitingAnswers, BudgetExceededError, ConfigError, InputDataError, OracleError, RewardError,
                     ShapeError)
from .reward import FunctionReward, Reward, RewardOutput
from .rollout import step_generator
from .store import COUNTED, FeedbackStore, QueryRecord

__all__ = ["Oracle", "OracleAnswer"]

#: A malformed answer: asking again gives the same, so the batch fails without a retry.
_NOT_RETRIED = (RewardError, ShapeError, InputDataError)
#: The failures (:data:`~difftilt.core.store.FAILURES`) that left a batch without an answer.
_UNANSWERED = ("oracle_error", "malformed")
#: How the stored error of a batch whose call failed begins (a NaN answer's does not): how a
#: store written before the ``failure`` column tells those failures apart.
_CALL_FAILED = "after "


@dataclass
class OracleAnswer:
    """Answers for a batch of designs, in the order asked.

    Attributes:
        ids: store ids.
        status: per design, ``answered`` / ``infeasible`` / ``failed`` / ``invalid``.
        value: ``(n,)`` observed values, NaN where there is none.
        true_value: ``(n,)`` noise-free values where known, NaN elsewhere.
        feasible: ``(n,)`` bool (False where there is no answer).
    """

    ids: list[int]
    status: list[str]
    value: Tensor
    true_value: Tensor
    feasible: Tensor


class Oracle:
    """A reward used as a budgeted ground-truth oracle.

    Args:
        reward: the ground truth: a :class:`~difftilt.core.reward.Reward`, or a callable
            ``f(x) -> values`` / ``RewardOutput``.
        budget: total number of designs that may be answered.
        store: where queries and answers are recorded.
        batch_size: designs per call of the ground truth.
        noise_std: std of Gaussian observation noise added to values (simulated assays);
            seeded by the query id, so a resumed run observes the same noise.
        retries: extra attempts of a batch whose call raised or timed out (a malformed
            answer is not retried: see the module's notes).
        timeout: seconds allowed per call, > 0 (``None``: unlimited). A call that times out
            is abandoned (its thread cannot be killed); a late answer is ignored.
        on_error: ``"raise"`` (record the failure, then stop) or ``"skip"`` (record, go on).
        event_shape: the shape of one design, checked on every query.
        seed: seeds the observation noise.
    """

    def __init__(
        self,
        reward: Reward | Callable[[Tensor], Tensor | RewardOutput],
        budget: int,
        store: FeedbackStore,
        batch_size: int = 64,
        noise_std: float = 0.0,
        retries: int = 2,
        timeout: float | None = None,
        on_error: Literal["raise", "skip"] = "raise",
        event_shape: tuple[int, ...] | None = None,
        seed: int = 0,
    ):
        if budget < 0 or batch_size < 1 or retries < 0 or noise_std < 0:
            raise ConfigError("oracle: budget, retries and noise_std must be >= 0 and batch_size >= 1, got "
                              f"{budget}, {retries}, {noise_std} and {batch_size}")
        if timeout is not None and not timeout > 0:  # 0 or less would fail every batch
            raise ConfigError(f"oracle.timeout: seconds > 0, or null for no limit, got {timeout}")
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"oracle.on_error: 'raise' or 'skip', got {on_error!r}")
        self.reward = reward if isinstance(reward, Reward) else FunctionReward(reward, name="oracle")
        self.budget = int(budget)
        self.store = store
        self.batch_size = int(batch_size)
        self.noise_std = float(noise_std)
        self.retries = int(retries)
        self.timeout = timeout
        self.on_error = on_error
        self.event_shape = tuple(event_shape) if event_shape is not None else None
        self.seed = int(seed)

    # ------------------------------------------------------------------ budget
    @property
    def used(self) -> int:
        """Designs answered so far (in any way), from the store."""
        return self.store.count(COUNTED)

    @property
    def remaining(self) -> int:
        return self.budget - self.used

    # ------------------------------------------------------------------ queries
    def query(self, x: Tensor, round: int = 0, tag: str = "") -> OracleAnswer:
        """Ask the oracle about designs ``x``: ``(n, *event_shape)``.

        Every design is recorded as ``pending`` first, then answered batch by batch.

        Raises:
            BudgetExceededError: the valid designs exceed the remaining budget (nothing
                is recorded or asked).
            ShapeError: ``x`` has the wrong shape (recorded as ``invalid``).
            OracleError: the ground truth kept failing and ``on_error="raise"``.
        """
        if not isinstance(x, Tensor) or x.dim() < 1:
            raise ShapeError(f"oracle designs must be a tensor (n, *event_shape), got {type(x).__name__}")
        x = x.detach()
        flat = x.reshape(x.shape[0], -1).float() if x.numel() else x.reshape(x.shape[0], -1)
        finite = torch.isfinite(flat).all(1) if x.shape[0] else torch.zeros(0, dtype=torch.bool)
        if self.event_shape is not None and tuple(x.shape[1:]) != self.event_shape:
            ids = self.store.add_pending(x, round, tag)
            msg = f"designs of shape {tuple(x.shape[1:])}, expected {self.event_shape}"
            self._record(ids, ["invalid"] * len(ids), error=msg)
            raise ShapeError(f"oracle: {msg} ({len(ids)} designs recorded as invalid)")
        n_valid = int(finite.sum())
        if n_valid > self.remaining:
            raise BudgetExceededError(
                f"oracle: {n_valid} queries requested but only {self.remaining} of the budget of {self.budget} remain"
            )
        ids = self.store.add_pending(x, round, tag)
        bad = [i for i, ok in zip(ids, finite.tolist()) if not ok]
        if bad:
            self._record(bad, ["invalid"] * len(bad), error="design contains NaN or inf; not sent to the oracle")
        self._answer([i for i, ok in zip(ids, finite.tolist()) if ok], x[finite])
        return self.answers(ids)

    def answer_pending(self, round: int | None = None, failed: bool = False) -> OracleAnswer:
        """Query the designs recorded as ``pending`` (e.g. after a crash) and nothing else.

        With ``failed``, also the designs of batches whose call failed (an exception, a
        timeout or a malformed answer; not a NaN answer, which is one): with
        ``on_error="raise"`` such a batch stopped the caller without an answer, and once the
        oracle is fixed it is asked again, in the order first asked. Their budget was
        already counted, so asking them uses none.
        """
        recs = self.store.records(round=round, status=("pending", "failed") if failed else ("pending",))
        recs = [r for r in recs if r.status == "pending" or _unanswered(r)]
        if not recs:
            return OracleAnswer([], [], torch.empty(0), torch.empty(0), torch.zeros(0, dtype=torch.bool))
        pending = sum(r.status == "pending" for r in recs)
        if pending > self.remaining:
            raise BudgetExceededError(
                f"oracle: {pending} pending queries but only {self.remaining} of the budget of {self.budget} remain"
            )
        ids = [r.id for r in recs]
        self._answer(ids, torch.stack([r.design for r in recs]))
        return self.answers(ids)

    def answers(self, ids: list[int]) -> OracleAnswer:
        """The stored answers for ``ids``."""
        by_id = {r.id: r for r in self.store.records(ids=list(ids))}
        recs = [by_id[i] for i in ids]
        nan = float("nan")
        return OracleAnswer(
            ids=list(ids),
            status=[r.status for r in recs],
            value=torch.tensor([nan if r.value is None else r.value for r in recs], dtype=torch.float32),
            true_value=torch.tensor([nan if r.true_value is None else r.true_value for r in recs], dtype=torch.float32),
            feasible=torch.tensor([bool(r.feasible) for r in recs], dtype=torch.bool),
        )

    # ------------------------------------------------------------------ internals
    def _record(self, ids, status, value=None, true_value=None, feasible=None, error=None, failure=None) -> None:
        n = len(ids)
        self.store.record(
            ids, status,
            value if value is not None else [None] * n,
            true_value if true_value is not None else [None] * n,
            feasible if feasible is not None else [None] * n,
            error if isinstance(error, list) else [error] * n,
            failure if isinstance(failure, list) else [failure] * n,
        )

    def _call(self, x: Tensor) -> RewardOutput:
        if self.timeout is None:
            out = self.reward.evaluate(x)
        else:
            pool = cf.ThreadPoolExecutor(max_workers=1)
            try:
                out = pool.submit(self.reward.evaluate, x).result(timeout=self.timeout)
            except cf.TimeoutError:
                raise TimeoutError(f"no answer within {self.timeout:g} s") from None
            finally:
                pool.shutdown(wait=False, cancel_futures=True)
        if isinstance(out, Tensor):
            out = RewardOutput(out, torch.ones(out.shape[:1], dtype=torch.bool, device=out.device))
        if not (isinstance(out, RewardOutput) and isinstance(out.value, Tensor) and isinstance(out.feasible, Tensor)):
            raise RewardError(f"the oracle returned {type(out).__name__}; expected a (b,) tensor of values "
                              "or a RewardOutput")
        b = x.shape[0]
        if tuple(out.value.shape) != (b,) or tuple(out.feasible.shape) != (b,):
            raise ShapeError(f"the oracle returned values of shape {tuple(out.value.shape)} for {b} designs")
        return out

    def _noise(self, ids: list[int]) -> Tensor:
        if self.noise_std == 0:
            return torch.zeros(len(ids))
        return torch.stack([torch.randn((), generator=step_generator(self.seed, i)) for i in ids]) * self.noise_std

    def _answer(self, ids: list[int], x: Tensor) -> None:
        waiting, why = 0, None
        for start in range(0, len(ids), self.batch_size):
            bid, bx = ids[start:start + self.batch_size], x[start:start + self.batch_size]
            error: Exception | None = None
            for attempt in range(1, self.retries + 2):
                try:
                    with torch.no_grad():
                        out = self._call(bx)
                    error = None
                    break
                except AwaitingAnswers as err:  # sent out to be measured: the batch stays pending
                    error = why = err
                    break
                except _NOT_RETRIED as err:  # a malformed answer: the same on every attempt
                    error = err
                    break
                except Exception as err:  # anything the user's oracle raises is recorded
                    error = err
            if isinstance(error, AwaitingAnswers):
                waiting += len(bid)
                continue
            if error is not None:
                msg = f"{type(error).__name__}: {error}"
                tries = f"{attempt} attempt{'s' if attempt > 1 else ''}"
                self._record(bid, ["failed"] * len(bid), error=f"{_CALL_FAILED}{tries}: {msg}",
                             failure="malformed" if isinstance(error, _NOT_RETRIED) else "oracle_error")
                if self.on_error == "raise":
                    raise OracleError(
                        f"the oracle failed on a batch of {len(bid)} designs after {tries} ({msg}); "
                        "the failure is recorded in the feedback store"
                    ) from error
                continue
            value = out.value.detach().double().cpu()
            feasible = out.feasible.detach().bool().cpu()
            noisy = value + self._noise(bid).double()
            status, vals, tvals, feas, errs = [], [], [], [], []
            for v, nv, f in zip(value.tolist(), noisy.tolist(), feasible.tolist()):
                if not f:
                    status.append("infeasible"), vals.append(None), tvals.append(None), feas.append(False), errs.append(None)
                elif v != v or v in (float("inf"), float("-inf")):
                    status.append("failed"), vals.append(None), tvals.append(None), feas.append(None)
                    errs.append(f"the oracle returned {v} for a feasible design")
                else:
                    status.append("answered"), vals.append(nv), tvals.append(v), feas.append(True), errs.append(None)
            self._record(bid, status, vals, tvals, feas, errs, ["nonfinite" if s == "failed" else None for s in status])
        if waiting:
            raise AwaitingAnswers(f"{waiting} designs await the oracle's answers: {why.reason}", count=waiting,
                                  reason=why.reason)


def _unanswered(r: QueryRecord) -> bool:
    """Whether ``r`` failed without an answer (its call raised, timed out or answered
    malformed; not a NaN answer, which is one): by its ``failure``, or in a store from
    before that field, by its error text."""
    if r.status != "failed":
        return False
    if r.failure is not None:
        return r.failure in _UNANSWERED
    return (r.error or "").startswith(_CALL_FAILED)
