import math

import pytest
import torch

from difftilt.core.reward_models import (
    AcquisitionReward, BatchedMLP, EnsembleRewardModel, Flatten, Greedy, LastLayerUCBRewardModel, MaxOverHeads,
    Posterior, Thompson, UCB, make_reward_model,
)
from difftilt.core import ConfigError


def test_acquisitions_on_a_mock_posterior():
    post = Posterior(mean=torch.tensor([1.0, 2.0]), std=torch.tensor([0.5, 0.1]),
                     members=torch.tensor([[0.5, 2.1], [1.5, 1.9], [1.2, 2.0]]))
    assert torch.allclose(UCB(beta=2.0).from_posterior(post), torch.tensor([2.0, 2.2]), atol=1e-6)
    assert torch.allclose(Greedy().from_posterior(post), torch.tensor([1.0, 2.0]))
    assert torch.allclose(MaxOverHeads().from_posterior(post), torch.tensor([1.5, 2.1]))
    with pytest.raises(ConfigError, match="ensemble"):
        MaxOverHeads().from_posterior(Posterior(torch.zeros(2), torch.zeros(2)))


def test_batched_mlp_equals_running_each_head_alone():
    net = BatchedMLP(num_models=4, in_dim=3, hidden=5, depth=2)
    x = torch.randn(7, 3)
    out = net(x)
    for m in range(4):
        h = x
        for layer, (w, b) in enumerate(zip(net.weights, net.biases)):
            h = h @ w[m] + b[m]
            if layer < len(net.weights) - 1:
                h = torch.nn.functional.silu(h)
        assert torch.allclose(out[m], h.squeeze(-1), atol=1e-5)


def _data(n, g):
    x = torch.rand(n, 2, generator=g) * 4 - 2
    return x, torch.sin(x[:, 0]) + 0.5 * x[:, 1]


def test_ensemble_fits_and_is_uncertain_away_from_data():
    g = torch.Generator().manual_seed(0)
    x, y = _data(200, g)
    model = EnsembleRewardModel(Flatten((2,)), 2, num_heads=6, epochs=150)
    model.fit(x, y, seed=0)
    near = model.posterior(torch.tensor([[0.5, 0.5]]))
    far = model.posterior(torch.tensor([[6.0, 6.0]]))
    assert abs(near.mean.item() - (math.sin(0.5) + 0.25)) < 0.15
    assert far.std.item() > 3 * near.std.item()
    assert near.members.shape == (6, 1)
    # different bootstrap resamples give different heads
    assert near.members.std().item() > 0


def test_fit_is_deterministic_given_the_seed():
    g = torch.Generator().manual_seed(1)
    x, y = _data(50, g)
    a = EnsembleRewardModel(Flatten((2,)), 2, num_heads=3, epochs=20)
    b = EnsembleRewardModel(Flatten((2,)), 2, num_heads=3, epochs=20)
    a.fit(x, y, seed=5)
    b.fit(x, y, seed=5)
    probe = torch.randn(4, 2)
    assert torch.equal(a.posterior(probe).members, b.posterior(probe).members)


def test_ucb_bonus_shrinks_as_data_near_a_point_grows():
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([[1.5, -1.0]])
    x, y = _data(40, g)
    model = LastLayerUCBRewardModel(Flatten((2,)), 2, depth=0, lambda_=1.0, epochs=50)
    model.fit(x, y, seed=0)
    widths = [model.posterior(x0).std.item()]
    for extra in (10, 40, 160):
        near = x0 + 0.1 * torch.randn(extra, 2, generator=g)
        model.update_confidence(torch.cat([x, near]))  # same features, more data near x0
        widths.append(model.posterior(x0).std.item())
    assert all(a > b for a, b in zip(widths, widths[1:])), widths
    assert widths[-1] < 0.5 * widths[0]


def test_ucb_sigma_is_uncentred_so_duplicated_data_shrinks_the_bonus():
    # With Sigma = sum psi psi^T (not a covariance), repeating the data doubles Sigma and
    # divides the width by ~sqrt(2); a covariance would not change at all.
    g = torch.Generator().manual_seed(2)
    x, y = _data(300, g)
    model = LastLayerUCBRewardModel(Flatten((2,)), 2, depth=0, lambda_=1e-3, epochs=30)
    model.fit(x, y, seed=0)
    probe = torch.randn(5, 2, generator=g)
    before = model.posterior(probe).std
    model.update_confidence(torch.cat([x, x]))
    after = model.posterior(probe).std
    assert torch.allclose(before / after, torch.full((5,), math.sqrt(2)), rtol=1e-3)


def test_ucb_fit_and_thompson_draws_vary():
    g = torch.Generator().manual_seed(3)
    x, y = _data(120, g)
    model = LastLayerUCBRewardModel(Flatten((2,)), 2, hidden=32, depth=2, epochs=100)
    model.fit(x, y, seed=0)
    probe = torch.tensor([[0.3, -0.2]])
    assert abs(model.posterior(probe).mean.item() - (math.sin(0.3) - 0.1)) < 0.15
    draws = []
    for s in range(5):
        th = Thompson()
        th.prepare(model, torch.Generator().manual_seed(s))
        draws.append(th.value(model, probe).item())
    assert len(set(round(d, 6) for d in draws)) > 1


def test_acquisition_reward_is_differentiable_in_x_and_frozen_in_parameters():
    g = torch.Generator().manual_seed(4)
    x, y = _data(60, g)
    model = EnsembleRewardModel(Flatten((2,)), 2, num_heads=4, epochs=20)
    model.fit(x, y)
    reward = AcquisitionReward(model, MaxOverHeads())
    assert reward.differentiable and not any(p.requires_grad for p in model.parameters())
    probe = torch.zeros(3, 2, requires_grad=True)
    reward(probe).value.sum().backward()
    assert probe.grad is not None and probe.grad.abs().sum() > 0


def test_make_reward_model_validates_options():
    m = make_reward_model("ucb", Flatten((2,)), 2, lambda_=0.5, depth=1)
    assert isinstance(m, LastLayerUCBRewardModel) and m.lambda_ == 0.5
    with pytest.raises(ConfigError, match="num_hedas"):
        make_reward_model("ensemble", Flatten((2,)), 2, num_hedas=3)
    with pytest.raises(ConfigError, match="unknown 'gp'"):
        make_reward_model("gp", Flatten((2,)), 2)
    # sizes and optimizer settings that would fail (or do nothing) at the first fit
    for kind in ("ucb", "ensemble"):
        for option, message in (({"hidden": -3}, "hidden must be a whole number >= 1, got -3"),
                                ({"hidden": 0}, "hidden must be a whole number >= 1, got 0"),
                                ({"depth": -1}, "depth must be a whole number >= 0"),
                                ({"epochs": 0}, "epochs must be a whole number >= 1"),
                                ({"batch_size": 0}, "batch_size must be a whole number >= 1"),
                                ({"lr": 0.0}, "lr must be a positive number"),
                                ({"weight_decay": -1e-4}, "weight_decay must be a non-negative number")):
            with pytest.raises(ConfigError, match=f"reward_model.{message}"):
                make_reward_model(kind, Flatten((2,)), 2, **option)
    with pytest.raises(ConfigError, match="num_heads must be a whole number >= 2"):
        make_reward_model("ensemble", Flatten((2,)), 2, num_heads=1)


@pytest.mark.parametrize("cls", [EnsembleRewardModel, LastLayerUCBRewardModel])
def test_a_feature_constant_in_the_data_is_not_blown_up(cls):
    g = torch.Generator().manual_seed(0)
    x, y = _data(100, g)
    x = torch.cat([x, torch.zeros(100, 1)], 1)  # third feature never varies in the data
    model = cls(Flatten((3,)), 3, epochs=50)
    model.fit(x, y, seed=0)
    assert model.phi_std[2].item() == 1.0
    post = model.posterior(torch.tensor([[0.5, 0.5, 1.0]]))
    assert post.mean.abs().item() < 20 and post.std.item() < 20  # it was ~1e6 with a 1e-6 floor
    raw = cls(Flatten((3,)), 3, epochs=50, standardize_features=False)
    raw.fit(x, y, seed=0)
    assert torch.equal(raw.phi_std, torch.ones(3)) and torch.equal(raw.phi_mean, torch.zeros(3))


@pytest.mark.parametrize("cls", [EnsembleRewardModel, LastLayerUCBRewardModel])
def test_clip_features_values_a_design_outside_the_data_as_the_nearest_point_of_its_box(cls):
    g = torch.Generator().manual_seed(0)
    x, y = _data(100, g)  # both features within [-2, 2]
    clipped = cls(Flatten((2,)), 2, epochs=50, clip_features=True)
    plain = cls(Flatten((2,)), 2, epochs=50)
    clipped.fit(x, y, seed=0)
    plain.fit(x, y, seed=0)
    lo, hi = x.min(0).values, x.max(0).values
    assert torch.allclose(clipped.phi_low * clipped.phi_std + clipped.phi_mean, lo, atol=1e-5)
    assert torch.allclose(clipped.phi_high * clipped.phi_std + clipped.phi_mean, hi, atol=1e-5)
    inside = torch.tensor([[0.3, -1.1], [1.5, 0.2]])
    a, b = clipped.posterior(inside), plain.posterior(inside)  # the same fit: clipping changes nothing inside
    assert torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std)
    far = torch.tensor([[30.0, 0.5], [-2.0, -400.0]])
    corner = torch.stack([far[:, 0].clamp(lo[0], hi[0]), far[:, 1].clamp(lo[1], hi[1])], 1)
    a, b = clipped.posterior(far), plain.posterior(corner)
    assert torch.allclose(a.mean, b.mean) and torch.allclose(a.std, b.std)
    # without it the network extrapolates: further out, a different value (and, for UCB, a wider bonus)
    assert not torch.allclose(plain.posterior(far).mean, b.mean)
    # and the fine-tuning gets no gradient pushing a feature further out
    x_far = far.clone().requires_grad_(True)
    clipped.posterior(x_far).mean.sum().backward()
    assert x_far.grad[0, 0] == 0 and x_far.grad[1, 1] == 0 and x_far.grad[0, 1] != 0


def test_ucb_width_grows_without_bound_outside_the_data_unless_clipped():
    g = torch.Generator().manual_seed(1)
    x, y = _data(200, g)
    plain = LastLayerUCBRewardModel(Flatten((2,)), 2, depth=0, epochs=20)  # a linear bandit: width ~ |phi|
    clipped = LastLayerUCBRewardModel(Flatten((2,)), 2, depth=0, epochs=20, clip_features=True)
    plain.fit(x, y, seed=0)
    clipped.fit(x, y, seed=0)
    out = torch.tensor([[10.0, 0.0], [100.0, 0.0], [1000.0, 0.0]])
    w_plain, w_clip = plain.posterior(out).std, clipped.posterior(out).std
    assert w_plain[2] > 50 * w_plain[0]
    assert torch.allclose(w_clip, w_clip[:1].expand(3)) and w_clip[0] < w_plain[0]


def test_clip_features_range_is_saved_and_an_older_state_loads_unclipped():
    g = torch.Generator().manual_seed(2)
    x, y = _data(50, g)
    model = LastLayerUCBRewardModel(Flatten((2,)), 2, epochs=10, clip_features=True)
    model.fit(x, y, seed=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    probe = torch.tensor([[50.0, -50.0]])
    again = LastLayerUCBRewardModel(Flatten((2,)), 2, epochs=10, clip_features=True).load_fitted(state)
    assert torch.equal(again.posterior(probe).mean, model.posterior(probe).mean)
    older = {k: v for k, v in state.items() if k not in ("phi_low", "phi_high")}
    old = LastLayerUCBRewardModel(Flatten((2,)), 2, epochs=10, clip_features=True).load_fitted(older)
    unclipped = LastLayerUCBRewardModel(Flatten((2,)), 2, epochs=10).load_fitted(state)
    assert torch.equal(old.posterior(probe).mean, unclipped.posterior(probe).mean)
    assert make_reward_model("ucb", Flatten((2,)), 2, clip_features=True).clip_features
