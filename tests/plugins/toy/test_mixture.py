import math

import pytest
import torch

from difftilt.core import ConfigError
from difftilt.plugins.toy import GaussianMixture, LinearReward, QuadraticReward, sliced_w2_to_mixture

D = torch.float64


def _grid_moments_1d(logdens):
    x = torch.linspace(-15, 15, 300_001, dtype=D)
    w = torch.softmax(logdens(x), 0)
    m = (w * x).sum()
    return m, (w * (x - m) ** 2).sum()


@pytest.fixture
def mix1d():
    return GaussianMixture([0.3, 0.7], [[-1.0], [2.0]], [[[0.25]], [[0.64]]])


def test_linear_tilt_matches_quadrature(mix1d):
    c, alpha = torch.tensor([1.5]), 0.8
    t = mix1d.tilt_linear(c, alpha)
    m, v = _grid_moments_1d(lambda x: mix1d.log_prob(x[:, None]) + c.item() * x / alpha)
    assert t.mean().item() == pytest.approx(m.item(), abs=1e-7)
    assert t.covariance().item() == pytest.approx(v.item(), abs=1e-7)


def test_a_tilt_so_strong_that_a_component_weighs_nothing_drops_it(mix1d):
    # at alpha 0.005 the left component's log-weight is ~900 below the right one's: exp underflows
    t = mix1d.tilt_linear(torch.tensor([1.5]), 0.005)
    assert t.weights.tolist() == [1.0] and t.means.tolist() == [[2.0 + 0.64 * 1.5 / 0.005]]
    q = mix1d.tilt_quadratic(torch.tensor([[1.0]]), torch.tensor([60.0]), 0.001)
    assert q.weights.tolist() == [1.0] and q.means.shape == (1, 1)


def test_quadratic_tilt_matches_quadrature(mix1d):
    alpha = 0.5
    t = mix1d.tilt_quadratic(torch.tensor([[2.0]]), torch.tensor([0.5]), alpha)
    m, v = _grid_moments_1d(lambda x: mix1d.log_prob(x[:, None]) - 2.0 * (x - 0.5) ** 2 / (2 * alpha))
    assert t.mean().item() == pytest.approx(m.item(), abs=1e-7)
    assert t.covariance().item() == pytest.approx(v.item(), abs=1e-7)


def test_quadratic_tilt_full_covariance_matches_importance_weights():
    mix = GaussianMixture([0.4, 0.6], [[0.0, 1.0], [2.0, -1.0]],
                          [[[1.0, 0.3], [0.3, 0.5]], [[0.4, -0.1], [-0.1, 0.8]]])
    A = torch.tensor([[1.0, 0.2], [0.2, 0.5]], dtype=D)
    x0 = torch.tensor([1.0, 0.0], dtype=D)
    t = mix.tilt_quadratic(A, x0, 1.0)
    xs = mix.sample(400_000, torch.Generator().manual_seed(0))
    w = torch.softmax(-0.5 * ((xs - x0) @ A * (xs - x0)).sum(-1), 0)
    assert torch.allclose(w @ xs, t.mean(), atol=5e-3)


def test_noised_score_matches_autograd():
    mix = GaussianMixture.isotropic([0.5, 0.5], [[-2.0, 0.0], [2.0, 1.0]], [0.5, 0.3])
    noisy = mix.noised(0.3)
    assert torch.allclose(noisy.means, math.sqrt(0.3) * mix.means)
    assert torch.allclose(noisy.covs[1], (0.3 * 0.09 + 0.7) * torch.eye(2, dtype=D))


def test_mixture_validation():
    with pytest.raises(ConfigError, match="sum to 1"):
        GaussianMixture.isotropic([0.5, 0.4], [[0.0], [1.0]], 1.0)
    with pytest.raises(ConfigError, match="positive definite"):
        GaussianMixture([1.0], [[0.0, 0.0]], [[[1.0, 2.0], [2.0, 1.0]]])
    with pytest.raises(ConfigError, match="means"):
        GaussianMixture.isotropic([1.0], [0.0, 1.0], 1.0)


def test_sliced_w2_is_small_for_exact_samples_and_large_for_shifted_ones():
    mix = GaussianMixture.isotropic([0.5, 0.3, 0.2], [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], 0.5)
    g = torch.Generator().manual_seed(0)
    small, large = mix.sample(5_000, g), mix.sample(100_000, g)
    floor_small, floor_large = sliced_w2_to_mixture(small, mix), sliced_w2_to_mixture(large, mix)
    assert floor_large < floor_small < 0.08 and floor_large < 0.025  # the estimator's noise floor shrinks with n
    assert sliced_w2_to_mixture(large + torch.tensor([0.5, 0.0], dtype=D), mix) > 0.2


def test_rewards_evaluate_and_tilt_exactly():
    lin, quad = LinearReward([1.0, -1.0], bias=2.0), QuadraticReward([1.0, 0.0], precision=[2.0, 0.5])
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    assert lin(x).value.tolist() == [1.0, 2.0]
    assert quad(x).value.tolist() == pytest.approx([-0.5 * 0.5 * 4, -0.5 * 2.0])
    mix = GaussianMixture.isotropic([1.0], [[0.0, 0.0]], 1.0)
    # single unit Gaussian tilted by <c, x>/alpha: N(c/alpha, I)
    assert torch.allclose(lin.tilt(mix, 2.0).mean(), torch.tensor([0.5, -0.5], dtype=D))
    with pytest.raises(ConfigError, match="dimension"):
        LinearReward([1.0, 2.0, 3.0]).tilt(mix, 1.0)
    with pytest.raises(Exception, match=r"shape \(b, 2\)"):
        lin(torch.zeros(3, 3))
