"""The exceptions difftilt raises on bad input.

Every error a user can cause derives from :class:`DifftiltError`; the CLI prints
such an error as one line and exits with status 2 (a traceback only with
``--debug``). Anything else escaping the library is a bug.
"""

from __future__ import annotations

import contextlib
import signal
import threading


class DifftiltError(Exception):
    """Base class of the errors a user can cause (bad config, bad data, bad model)."""


class ConfigError(DifftiltError, ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


class ShapeError(DifftiltError, ValueError):
    """A tensor handed to a public function has the wrong shape or dtype."""


class InputDataError(DifftiltError, ValueError):
    """Input data is malformed: out-of-alphabet tokens, NaN coordinates, and so on."""


class RewardError(DifftiltError, ValueError):
    """A reward returned something unusable (NaN or inf, wrong shape)."""


class DeterministicStepError(DifftiltError, ValueError):
    """A KL objective met a deterministic transition (std 0, e.g. DDIM with eta = 0).

    The KL divergence between two different deterministic transitions is infinite,
    so no finite entropy-regularized objective exists for such a sampler.
    """


class PluginNotFoundError(DifftiltError, LookupError):
    """No installed plugin has the requested name."""


class OptionalDependencyError(DifftiltError, ImportError):
    """A feature needs a package from one of difftilt's extras."""


class CheckpointError(DifftiltError, OSError):
    """A checkpoint folder is missing, incomplete or of an unknown format."""


class BudgetExceededError(DifftiltError, RuntimeError):
    """An oracle query would exceed the query budget (no query is made)."""


class OracleError(DifftiltError, RuntimeError):
    """The ground-truth oracle failed on a batch after its retries (the failure is recorded)."""


class TrainingDivergedError(DifftiltError, FloatingPointError):
    """A training loss became NaN or infinite (a learning rate too high, most often)."""


class AwaitingAnswers(DifftiltError):
    """The oracle sent designs out to be measured and has no answers yet (a lab assay).

    Raised by a reward (e.g. a function that finds no results yet); the oracle leaves that
    batch's designs ``pending`` in the feedback store, asks the query's other batches, and
    raises it again with ``count``, the designs that wait, and the reward's ``reason`` (e.g.
    which file to fill in). ``difftilt online`` stops with exit status 3, and
    ``difftilt online --resume RUN`` asks for exactly those designs again.
    """

    def __init__(self, message: str, count: int = 0, reason: str | None = None):
        super().__init__(message)
        self.count = int(count)
        self.reason = message if reason is None else reason  # what to do, without the count
        self.run = None  # the online run folder that waits, once the online loop has one


class Terminated(SystemExit):
    """The ``difftilt`` command got SIGTERM (``kill``, a scheduler's time limit): raised where
    the process is, so that a run stops as after a Ctrl-C, records itself ``interrupted`` and
    resumes with ``--resume``. The command then ends with exit status 143 (128 + SIGTERM)."""

    def __init__(self):
        super().__init__(143)


def stopped_by_sigterm(err: BaseException) -> bool:
    """Whether ``err`` is a SIGTERM's: :class:`Terminated`, or Lightning's ``SIGTERMException``
    (a ``SystemExit`` it raises when the signal comes during a fit)."""
    return isinstance(err, Terminated) or type(err).__name__ == "SIGTERMException"


@contextlib.contextmanager
def terminated_on_sigterm():
    """While in the block, SIGTERM raises :class:`Terminated` where the process is (its
    default would end the process on the spot, leaving a run's status at ``running``); a
    second SIGTERM while the first winds the run down is ignored. During a fit Lightning
    also sees the signal. A SIGTERM handler already set (or a thread other than the main
    one) is left alone, and the default is put back after."""
    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: the run is stopping
        raise Terminated()

    ours = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if ours:
        signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        if ours:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

