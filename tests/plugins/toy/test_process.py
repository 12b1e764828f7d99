import pytest
import torch

from difftilt.core import ConfigError, DeterministicStepError, Finetuner
from difftilt.plugins.toy import LinearReward, exactness_metrics, make_mixture_process

D = torch.float64


def test_exact_score_matches_autograd_of_the_noised_mixture():
    proc = make_mixture_process(num_steps=8)
    x = torch.randn(16, 2)
    for k in (0, 3, 7):
        noisy = proc.mixture.noised(float(proc.abar[k].double()))
        xx = x.double().requires_grad_(True)
        (auto,) = torch.autograd.grad(noisy.log_prob(xx).sum(), xx)
        assert torch.allclose(proc.score(x, k).double(), auto, atol=1e-4)


def test_full_covariance_score_matches_autograd():
    proc = make_mixture_process(weights=[0.6, 0.4], means=[[0.0, 1.0], [1.0, -1.0]],
                                covs=[[[1.0, 0.3], [0.3, 0.5]], [[0.4, -0.1], [-0.1, 0.8]]], num_steps=5)
    assert not proc.isotropic
    x = torch.randn(8, 2)
    noisy = proc.mixture.noised(float(proc.abar[2].double()))
    xx = x.double().requires_grad_(True)
    (auto,) = torch.autograd.grad(noisy.log_prob(xx).sum(), xx)
    assert torch.allclose(proc.score(x, 2).double(), auto, atol=1e-4)


def test_pretrained_chain_reproduces_its_terminal_law():
    proc = make_mixture_process(num_steps=50, eta=0.5)
    x = proc.sample(20_000, generator=torch.Generator().manual_seed(0))
    law = proc.terminal_law()
    assert torch.allclose(x.double().mean(0), law.mean(), atol=0.05)
    weights = law.responsibilities(x.double()).mean(0)
    assert torch.allclose(weights, law.weights, atol=0.015)


def test_eta_zero_is_deterministic_and_refused_by_kl_finetuning():
    proc = make_mixture_process(num_steps=5, eta=0.0)
    x = proc.initial(3)
    assert proc.step(x, 0).is_deterministic
    with pytest.raises(DeterministicStepError, match="eta"):
        Finetuner(proc, LinearReward([1.0, 0.0]), alpha=1.0, learn_initial=False)


def test_process_validation():
    with pytest.raises(ConfigError, match="eta"):
        make_mixture_process(eta=1.5)
    with pytest.raises(ConfigError, match="num_steps"):
        make_mixture_process(num_steps=0)
    with pytest.raises(ConfigError, match="schedule"):
        make_mixture_process(schedule="quadratic")


def test_exactness_metrics_on_exact_tilted_samples():
    proc = make_mixture_process(num_steps=10)
    rew = LinearReward([1.0, 0.5])
    target = rew.tilt(proc.terminal_law(), 1.0)
    x = target.sample(20_000, torch.Generator().manual_seed(0)).float()
    m = exactness_metrics(x, proc, rew, 1.0)
    assert m["mean_error"] < 0.03 and m["weight_error"] < 0.01 and m["sw2"] < 0.05
    assert m["target_reward"] == pytest.approx(float((x.double() @ torch.tensor([1.0, 0.5], dtype=D)).mean()), abs=0.03)
    assert exactness_metrics(x, proc, rew, 0.0) == {}
