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

from .errors import AwaitingAnswers, BudgetExceededError, OracleError, ShapeError
from .reward import FunctionReward, Reward, RewardOutput
from .rollout import step_generator
from .store import COUNTED, FeedbackStore

__all__ = ["Oracle", "OracleAnswer"]


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
        retries: extra attempts of a batch whose call raised or timed out.
        timeout: seconds allowed per call (``None``: unlimited). A call that times out is
            abandoned (its thread cannot be killed); a late answer is ignored.
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
            raise ValueError("budget, retries and noise_std must be >= 0 and batch_size >= 1")
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

    def answer_pending(self, round: int | None = None) -> OracleAnswer:
        """Query the designs recorded as ``pending`` (e.g. after a crash) and nothing else."""
        recs = self.store.records(round=round, status=("pending",))
        if not recs:
            return OracleAnswer([], [], torch.empty(0), torch.empty(0), torch.zeros(0, dtype=torch.bool))
        if len(recs) > self.remaining:
            raise BudgetExceededError(
                f"oracle: {len(recs)} pending queries but only {self.remaining} of the budget of {self.budget} remain"
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
    def _record(self, ids, status, value=None, true_value=None, feasible=None, error=None) -> None:
        n = len(ids)
        self.store.record(
            ids, status,
            value if value is not None else [None] * n,
            true_value if true_value is not None else [None] * n,
            feasible if feasible is not None else [None] * n,
            error if isinstance(error, list) else [error] * n,
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
            for _ in range(self.retries + 1):
                try:
                    with torch.no_grad():
                        out = self._call(bx)
                    error = None
                    break
                except AwaitingAnswers as err:  # sent out to be measured: the batch stays pending
                    error = why = err
                    break
                except Exception as err:  # anything the user's oracle raises is recorded
                    error = err
            if isinstance(error, AwaitingAnswers):
                waiting += len(bid)
                continue
            if error is not None:
                msg = f"{type(error).__name__}: {error}"
                self._record(bid, ["failed"] * len(bid), error=f"after {self.retries + 1} attempts: {msg}")
                if self.on_error == "raise":
                    raise OracleError(
                        f"the oracle failed on a batch of {len(bid)} designs after {self.retries + 1} attempts ({msg}); "
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
            self._record(bid, status, vals, tvals, feas, errs)
        if waiting:
            raise AwaitingAnswers(f"{waiting} designs await the oracle's answers: {why.reason}", count=waiting,
                                  reason=why.reason)
