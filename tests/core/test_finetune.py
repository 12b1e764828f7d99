"""Finetuner.fit under Lightning: a Ctrl-C stays a KeyboardInterrupt."""

import signal

import pytest
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
