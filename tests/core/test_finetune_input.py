"""Bad input to ``difftilt finetune`` and to the Finetuner: refused before any run folder
exists, as one ConfigError line naming the setting; training that diverges is told apart
from a reward that returns NaN."""

import importlib.util
import os

import pytest
import torch

from difftilt.core.errors import ConfigError, DifftiltError, OptionalDependencyError, RewardError, \
    TrainingDivergedError
from difftilt.core.finetune import Finetuner, FinetuneResult, default_policy
from difftilt.core.reward import FunctionReward, Reward
from difftilt.core.run import RunFolder, run_finetune
from difftilt.plugins.toy import make_mixture_process
from difftilt.plugins.toy.rewards import LinearReward

TINY = {
    "plugin": "toy",
    "seed": 0,
    "process": {"name": "mixture", "num_steps": 3},
    "reward": {"name": "linear", "weights": [1.0, 0.5]},
    "finetune": {"alpha": 1.0, "iterations": 2, "batch_size": 8, "value_refit_iterations": 1,
                 "initial_iterations": 1, "initial_steps": 2, "initial_batch_size": 8},
    "eval_samples": 16,
}
SMALL = dict(iterations=4, batch_size=8, value_refit_iterations=1, initial_iterations=1, initial_steps=2,
             initial_batch_size=8, value_batch_size=8, progress=False, seed=0)


def _refused(tmp_path, error=ConfigError, **kwargs) -> str:
    """run_finetune's error, once it is checked to be one line with no run folder made."""
    runs = tmp_path / "runs"
    kwargs.setdefault("overrides", [])
    with pytest.raises(error) as info:
        run_finetune(TINY, output_dir=runs, progress=False, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())
    return message


@pytest.mark.parametrize(
    "override, message",
    [
        ("loggers=[tb]", "config.loggers: unknown logger 'tb' (known: csv, tensorboard)"),
        ("finetune.lr=0", "finetune.lr must be a positive number, got 0.0"),
        ("finetune.lr=-1", "finetune.lr must be a positive number, got -1.0"),
        ("finetune.lr=abc", "finetune.lr: expected a number, got str 'abc'"),
        ("finetune.initial_lr=.nan", "finetune.initial_lr must be a positive number, got nan"),
        ("finetune.value_lr=0", "finetune.value_lr must be a positive number"),
        ("finetune.accelerator=xpu", "invalid accelerator name: `accelerator='xpu'`"),
        ("finetune.precision=abc", "Lightning refuses accelerator='cpu', devices=1, precision='abc': Precision 'abc' "
                                   "is invalid"),
        ("finetune.devices=0", "Lightning refuses accelerator='cpu', devices=0"),
        ("seed=-1", "config.seed must be a whole number from 0 to 4294967295, got -1"),
        ("seed=4294967296", "config.seed must be a whole number from 0 to 4294967295, got 4294967296"),
        ("seed=1.5", "config.seed: expected an integer, got float 1.5"),
        ("finetune.control_hidden=0", "finetune.control_hidden must be a whole number >= 1, got 0"),
    ],
)
def test_a_bad_value_is_one_config_error_before_any_run_folder(tmp_path, override, message):
    assert message in _refused(tmp_path, overrides=[override])


@pytest.mark.parametrize("override", ["finetune.devices=2", "finetune.devices='2'", "finetune.devices=[0, 1]"])
def test_more_than_one_device_is_refused_before_any_run_folder(tmp_path, override):
    # a DDP fit ran the whole run once per rank: one run folder per rank, then a failure
    message = _refused(tmp_path, overrides=[override])
    assert message.startswith("finetune.devices: ")
    assert "fine-tuning runs on one" in message or "expected an integer or a string" in message


def test_multi_device_python_api_is_refused():
    with pytest.raises(ConfigError, match=r"finetune\.devices: 2 gives 2 devices, but fine-tuning runs on one "
                                          r"\(multi-device DDP training is not supported\); set devices: 1"):
        Finetuner(make_mixture_process(num_steps=3), LinearReward([1.0, 0.5]), devices=2, **SMALL)


@pytest.mark.skipif(any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")),
                    reason="tensorboard is installed")
def test_the_tensorboard_logger_without_tensorboard_is_refused_before_any_run_folder(tmp_path):
    message = _refused(tmp_path, OptionalDependencyError, overrides=["loggers=[tensorboard]"])
    assert "pip install tensorboard" in message


# --------------------------------------------------------------------------- run folder names and places


@pytest.mark.parametrize("name", ["../x", "a/b", "a\\b", ".", "..", "", "/abs"])
def test_a_run_name_that_is_not_a_plain_folder_name_is_refused(tmp_path, name):
    with pytest.raises(ConfigError, match="the run name must be a plain folder name"):
        RunFolder.create(tmp_path / "runs", name)
    assert list(tmp_path.iterdir()) == []  # nothing made, inside or outside the parent


def test_a_name_given_to_run_finetune_that_is_a_path_writes_nothing(tmp_path):
    message = _refused(tmp_path, name="../escaped")
    assert "got '../escaped'" in message and not (tmp_path / "escaped").exists()


@pytest.mark.parametrize("where", ["runs", "runs/deeper"])
def test_a_file_in_the_way_of_the_output_folder_is_a_config_error_naming_it(tmp_path, where):
    (tmp_path / "runs").write_text("not a folder")
    with pytest.raises(ConfigError, match=f"cannot create a run folder in {tmp_path / where}: a file is in the way; "
                                          "set output_dir") as info:
        run_finetune(TINY, output_dir=tmp_path / where, name="tiny", progress=False)
    assert "\n" not in str(info.value) and (tmp_path / "runs").read_text() == "not a folder"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_a_config_error_naming_it(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match=f"cannot create a run folder in {runs}: Permission denied"):
            RunFolder.create(runs, "tiny")
    finally:
        runs.chmod(0o700)


# --------------------------------------------------------------------------- the Python API


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"learn_initial": "no"}, "finetune.learn_initial: expected true/false, got str 'no'"),
        ({"iterations": 2.0}, "finetune.iterations: expected an integer, got float 2.0"),
        ({"iterations": 0}, "finetune.iterations must be a whole number >= 1, got 0"),
        ({"alpha": "1"}, "finetune.alpha: expected a number, got str '1'"),
        ({"alpha": -1.0}, "finetune.alpha must be a non-negative number, got -1.0"),
        ({"lr": 0}, "finetune.lr must be a positive number, got 0"),
        ({"seed": -1}, "finetune.seed must be a whole number >= 0, got -1"),
        ({"seed": 1.0}, "finetune.seed: expected an integer, got float 1.0"),
        ({"progress": "yes"}, "finetune.progress: expected true/false"),
        ({"policy": "mine"}, "finetune.policy: expected Process, got str 'mine'"),
        ({"lr_schedule": "linear"}, "finetune.lr_schedule: expected one of 'cosine', 'constant'"),
        ({"precision": "abc"}, "Precision 'abc' is invalid"),
    ],
)
def test_finetuner_arguments_are_checked_like_the_config(kwargs, message):
    with pytest.raises(ConfigError) as info:
        Finetuner(make_mixture_process(num_steps=3), LinearReward([1.0, 0.5]), **{**SMALL, **kwargs})
    assert message in str(info.value)


def test_a_seed_beyond_32_bits_is_folded_for_lightning_not_refused():
    # the online loop derives such seeds for each round; Lightning's seed_everything refused them
    big = 5000 * 1_000_003
    runs = [Finetuner(make_mixture_process(num_steps=3), LinearReward([1.0, 0.5]), learn_initial=False,
                      **{**SMALL, "iterations": 1, "seed": seed}).fit().sample(4) for seed in (big, big)]
    assert torch.equal(runs[0], runs[1]) and torch.isfinite(runs[0]).all()


def test_a_plain_function_is_a_reward():
    ft = Finetuner(make_mixture_process(num_steps=3), lambda x: x[:, 0], strategy="policy_gradient",
                   learn_initial=False, **SMALL)
    assert isinstance(ft.reward, FunctionReward) and not ft.reward.differentiable
    x = ft.fit().sample(5)
    assert x.shape == (5, 2) and torch.isfinite(x).all()
    # taken as not differentiable: backprop says how to say that it is
    with pytest.raises(ConfigError, match=r"pass FunctionReward\(f, differentiable=True\) if it is"):
        Finetuner(make_mixture_process(num_steps=3), lambda x: x[:, 0], **SMALL)
    ft = Finetuner(make_mixture_process(num_steps=3), FunctionReward(lambda x: x[:, 0], differentiable=True), **SMALL)
    assert ft.reward.differentiable


def test_a_reward_that_is_neither_a_reward_nor_a_function_is_refused():
    with pytest.raises(ConfigError, match="finetune.reward: expected a Reward or a function of x, got int 3"):
        Finetuner(make_mixture_process(num_steps=3), 3, **SMALL)


@pytest.mark.parametrize("n, message", [(0, "got 0"), (-2, "got -2"), (2.0, "got 2.0")])
def test_result_sample_needs_a_positive_whole_number(n, message):
    process = make_mixture_process(num_steps=3)
    result = FinetuneResult(model=process, transitions=None, initial=None, value_net=None, alpha=1.0)
    with pytest.raises(ConfigError, match=f"FinetuneResult.sample.n must be a whole number >= 1, {message}"):
        result.sample(n)
    assert result.sample(3).shape == (3, 2)


# --------------------------------------------------------------------------- divergence


class _NaNOnCall(Reward):
    """``x.sum(-1)``, but NaN for every design on call ``bad`` (a reward's own NaN)."""

    differentiable = True

    def __init__(self, bad: int):
        super().__init__()
        self.bad, self.calls = bad, 0

    def evaluate(self, x):
        self.calls += 1
        value = x.sum(-1)
        return torch.full_like(value, float("nan")) if self.calls == self.bad else value


def test_a_huge_learning_rate_is_reported_as_divergence_with_the_iteration_and_the_settings():
    ft = Finetuner(make_mixture_process(num_steps=3), LinearReward([1.0, 0.5]), lr=1e8, learn_initial=False, **SMALL)
    with pytest.raises(TrainingDivergedError) as info:
        ft.fit()
    message = str(info.value)
    assert message.startswith("fine-tuning diverged in stage 'transitions': ") and "\n" not in message
    assert " at iteration " in message and "reward" not in message.split(";")[-1]
    assert message.endswith("; lower finetune.lr (now 1e+08) or finetune.max_grad_norm (now 1)")


def test_nan_parameters_are_divergence_not_the_rewards_nan():
    process = make_mixture_process(num_steps=3)
    policy = default_policy(process)
    with torch.no_grad():
        next(policy.control.parameters()).fill_(float("nan"))
    ft = Finetuner(process, LinearReward([1.0, 0.5]), policy=policy, learn_initial=False, max_grad_norm=None, **SMALL)
    with pytest.raises(TrainingDivergedError, match=r"^fine-tuning diverged in stage 'transitions': NaN in the "
                                                    r"chain's samples at iteration 0; lower finetune.lr \(now 0.01\), "
                                                    r"or set finetune.max_grad_norm \(gradient clipping is off\)$"):
        ft.fit()


def test_a_diverging_value_network_names_the_value_learning_rate():
    ft = Finetuner(make_mixture_process(num_steps=3), LinearReward([1.0, 0.5]), value_lr=1e12, **SMALL)
    with pytest.raises(TrainingDivergedError, match=r"in the value network's (outputs|parameters) at iteration \d+; "
                                                    r"lower finetune.lr \(now 0.01\), finetune.value_lr \(now 1e\+12\) "
                                                    r"or finetune.max_grad_norm \(now 1\)$"):
        ft.fit()


@pytest.mark.parametrize("strategy", ["backprop", "policy_gradient"])
def test_a_reward_that_returns_nan_on_finite_samples_is_still_the_rewards_fault(strategy):
    reward = _NaNOnCall(bad=3)  # call 1 is the preflight, call 3 the second update
    ft = Finetuner(make_mixture_process(num_steps=3), reward, strategy=strategy, learn_initial=False, **SMALL)
    with pytest.raises(RewardError, match="reward '_NaNOnCall' returned NaN for 8 of 8 feasible designs") as info:
        ft.fit()
    assert not isinstance(info.value, TrainingDivergedError) and isinstance(info.value, DifftiltError)
    assert reward.calls == 3


def test_a_reward_too_large_to_square_is_the_rewards_fault_not_divergence():
    # its values are finite, but the value regression's squared errors overflow float32
    ft = Finetuner(make_mixture_process(num_steps=3), LinearReward([1e38, 1e38]), **SMALL)
    with pytest.raises(RewardError, match=r"^reward 'linear' returned values too large to train on for \d+ of 8 "
                                          r"feasible designs \(up to .*: their squares overflow torch.float32\); "
                                          r"scale the reward down$"):
        ft.fit()
