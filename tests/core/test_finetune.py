"""Finetuner.fit under Lightning: a Ctrl-C stays a KeyboardInterrupt."""

import os
import random
import signal

import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from difftilt.core.finetune import Finetuner
from difftilt.core.reward import Reward


class _Stops(Reward):
    """A reward whose second evaluation raises ``error`` (in the middle of trainer.fit)."""

    differentiable = True

    def __init__(self, error: type[BaseException]):
        super().__init__()
        self.error, self.calls = error, 0

    def evaluate(self, x):
        self.calls += 1
        if self.calls == 2:
            raise self.error()
        return x.sum(-1)


def _finetuner(reward):
    from difftilt.plugins.toy import make_mixture_process

    return Finetuner(make_mixture_process(num_steps=3), reward, alpha=1.0, iterations=4, batch_size=8,
                     value_refit_iterations=1, initial_iterations=1, initial_steps=2, progress=False, seed=0)


def test_a_ctrl_c_inside_the_fit_is_raised_as_a_keyboard_interrupt_and_sigint_is_restored():
    # Lightning catches it, ignores SIGINT from then on and calls sys.exit(1)
    def notebook(signum, frame):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGINT, notebook)
    try:
        reward = _Stops(KeyboardInterrupt)
        with pytest.raises(KeyboardInterrupt):
            _finetuner(reward).fit()
        assert reward.calls == 2 and signal.getsignal(signal.SIGINT) is notebook
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_sigterm_inside_the_fit_stays_a_system_exit():
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(SIGTERMException):
        _finetuner(_Stops(SIGTERMException)).fit()
    assert signal.getsignal(signal.SIGINT) is handler


def test_the_command_ends_a_sigterm_with_status_143_not_0(monkeypatch, capsys):
    # Lightning's SIGTERMException is a SystemExit() whose status is 0: a killed run read as a success
    from difftilt.core import cli

    def killed(args):
        raise SIGTERMException()

    monkeypatch.setattr(cli, "_cmd_plugins", killed)
    assert cli.main(["plugins"]) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == "difftilt: terminated (SIGTERM)"


@pytest.mark.parametrize("norm", [-0.5, 0, 0.0])
def test_a_gradient_clip_norm_that_is_not_positive_is_refused(norm):
    # clip_grad_norm_ with a negative norm flips the gradient: the policy would descend the reward
    from difftilt.core.errors import ConfigError
    from difftilt.plugins.toy import make_mixture_process

    with pytest.raises(ConfigError, match="max_grad_norm must be a positive number, or null"):
        Finetuner(make_mixture_process(num_steps=3), _Stops(KeyboardInterrupt), max_grad_norm=norm)


class _DrawsGlobally(Reward):
    """A reward that adds noise from torch's global RNG (as a user's dropout would) and keeps it."""

    differentiable = True

    def __init__(self):
        super().__init__()
        self.noise = []

    def evaluate(self, x):
        self.noise.append(float(torch.rand(())))
        return x.sum(-1)


def _draws():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_a_fit_seeds_the_global_rngs_inside_and_gives_the_callers_states_back(monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    noise = []
    for caller_seed in (1, 2):  # the caller's states differ; the fit's draws do not
        reward = _DrawsGlobally()
        finetuner = _finetuner(reward)
        reward.noise.clear()  # the constructor's check of the reward draws from the caller's state
        random.seed(caller_seed), np.random.seed(caller_seed), torch.manual_seed(caller_seed)
        expected = _draws()
        random.seed(caller_seed), np.random.seed(caller_seed), torch.manual_seed(caller_seed)
        finetuner.fit()
        assert _draws() == expected  # as if the fit had not run
        noise.append(reward.noise)
    assert len(noise[0]) > 2 and noise[0] == noise[1]
    assert "PL_GLOBAL_SEED" not in os.environ


def test_a_fit_that_stops_gives_the_callers_states_back_too():
    finetuner = _finetuner(_Stops(KeyboardInterrupt))
    torch.manual_seed(3)
    expected = float(torch.rand(()))
    torch.manual_seed(3)
    with pytest.raises(KeyboardInterrupt):
        finetuner.fit()
    assert float(torch.rand(())) == expected


@pytest.mark.parametrize("terminal", [True, False])
def test_the_progress_bars_are_on_stderr_and_a_log_file_gets_a_few_redraws_a_stage(monkeypatch, capsys, terminal):
    """stdout is the command's results (``difftilt online > results.txt``); in a log file a
    stage's bar is redrawn about LOG_BAR_REDRAWS times, not once per update."""
    import sys

    from difftilt.core.finetune import LOG_BAR_REDRAWS, bar_interval
    from difftilt.core.reward import FunctionReward
    from difftilt.plugins.toy import make_mixture_process

    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    iterations = 200
    Finetuner(make_mixture_process(num_steps=3), FunctionReward(lambda x: x.sum(-1), differentiable=True), alpha=1.0,
              iterations=iterations, batch_size=8, learn_initial=False, progress=True, seed=0).fit()
    out, err = capsys.readouterr()
    assert out == ""
    updates = [line for line in err.split("\r") if line.startswith("transitions: ") and "/200 [" in line]
    drawn = {line.split("/200")[0].split()[-1] for line in updates}  # the update counts shown
    assert "200" in drawn
    if terminal:
        assert len(drawn) == iterations + 1 and bar_interval() == 0.1  # 0 to 200, each shown
    else:
        assert drawn == {str(i) for i in range(0, iterations + 1, iterations // LOG_BAR_REDRAWS)}
        assert bar_interval() == 30.0
