import pytest
import torch

from difftilt.core import (ConfigError, DirectBackprop, Finetuner, FunctionReward, PathCrossEntropy, PolicyGradient,
                          make_strategy)

from ..helpers import brownian_controlled, plain_context


def _linear_reward(c):
    return FunctionReward(lambda x: x @ c, differentiable=True, name="linear")


def _analytic_grad(theta, c, alpha, K):
    # J(theta) = s^2 sum_k c.theta_k - alpha s^2 sum_k ||theta_k||^2 / 2, s^2 = 1/K
    return (c[None, :] - alpha * theta) / K


def test_backprop_gradient_is_exact_on_linear_gaussian_chain():
    K, alpha = 4, 0.7
    c = torch.tensor([1.0, 0.5])
    cp = brownian_controlled(K, init=0.3)
    with torch.no_grad():
        cp.policy.control.theta.add_(torch.randn(K, 2))
    out = DirectBackprop(checkpoint=True).update(plain_context(cp, _linear_reward(c), alpha, torch.zeros(64, 2)))
    theta = cp.policy.control.theta
    # the loss is -J, so the gradient is -grad J, exactly, whatever the noise
    assert torch.allclose(-theta.grad, _analytic_grad(theta.detach(), c, alpha, K), atol=1e-6)
    # returns are r - alpha * sum_k KL_k with KL_k = s^2 ||theta_k||^2 / 2
    kl = 0.5 * (theta.detach() ** 2).sum() / K
    assert out.returns.shape == (64,)
    assert out.metrics["kl"] == pytest.approx(kl.item(), rel=1e-5)


def test_policy_gradient_is_unbiased_on_linear_gaussian_chain():
    K, alpha = 3, 0.5
    c = torch.tensor([1.0, -1.0])
    cp = brownian_controlled(K, init=0.2)
    with torch.no_grad():
        cp.policy.control.theta.copy_(torch.tensor([[0.5, -0.3], [0.0, 0.2], [-0.4, 0.1]]))
    n = 200_000
    PolicyGradient(epochs=1, minibatches=1).update(plain_context(cp, _linear_reward(c), alpha, torch.zeros(n, 2), seed=3))
    theta = cp.policy.control.theta
    # per-sample gradient std is about sqrt(K) s * s; 200k samples: SE ~ 2e-3
    assert torch.allclose(-theta.grad, _analytic_grad(theta.detach(), c, alpha, K), atol=1.2e-2)


def test_policy_gradient_advantages_include_future_kl():
    reward = torch.tensor([1.0, 3.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.0, 0.0, 1.0]])
    A = PolicyGradient.advantages(reward, kl, alpha=2.0)
    # G_k = r - alpha * sum_{j>k} KL_j
    G = torch.tensor([[1 - 2 * 0.5, 1 - 2 * 0.3, 1.0], [3 - 2 * 1.0, 3 - 2 * 1.0, 3.0]])
    assert torch.allclose(A, G - G.mean(0, keepdim=True))


def test_policy_gradient_works_with_black_box_reward_and_takes_steps():
    cp = brownian_controlled(3, init=0.0)
    steps = []
    reward = FunctionReward(lambda x: (x.sum(-1) > 0).float(), differentiable=False)
    strat = PolicyGradient(epochs=2, minibatches=4)
    out = strat.update(plain_context(cp, reward, 0.1, torch.zeros(64, 2), step=lambda: steps.append(1) or 0.0))
    assert len(steps) == 8 and 0.0 <= out.metrics["clip_fraction"] <= 1.0


def test_make_strategy_from_names_and_mappings():
    assert isinstance(make_strategy("backprop"), DirectBackprop)
    s = make_strategy({"name": "policy_gradient", "clip_range": 0.1})
    assert isinstance(s, PolicyGradient) and s.clip_range == 0.1
    with pytest.raises(ConfigError, match="unknown strategy"):
        make_strategy("adjoint")
    with pytest.raises(ConfigError, match="clip_rnage"):
        make_strategy({"name": "policy_gradient", "clip_rnage": 0.1})


def test_same_seed_same_finetuning_whatever_the_global_rng():
    from difftilt.plugins.toy import LinearReward, make_mixture_process

    def run(global_seed):
        torch.manual_seed(global_seed)  # the caller's RNG state must not matter
        ft = Finetuner(make_mixture_process(num_steps=4), LinearReward([1.0, 0.5]), alpha=1.0, iterations=2,
                       batch_size=16, value_refit_iterations=1, initial_iterations=1, initial_steps=3,
                       progress=False, seed=7)
        ft.fit()
        return [p.detach().clone() for p in list(ft.policy.parameters()) + list(ft.initial.parameters())]

    for a, b in zip(run(1), run(2)):
        assert torch.equal(a, b)


def _linear_gaussian(theta):
    K = theta.shape[0]
    cp = brownian_controlled(K, d=theta.shape[1])
    with torch.no_grad():
        cp.policy.control.theta.copy_(theta)
    return cp


def test_cross_entropy_gradient_matches_the_exact_one_on_linear_gaussian_chain():
    # Step k of the policy is N(x + s^2 theta_k, s^2), so E_{Q*}[-log q_k] = s^2 ||theta* - theta_k||^2 / 2
    # + const with theta* = c / alpha (J's maximizer), and the gradient is s^2 (theta_k - c / alpha).
    K, alpha = 3, 2.0
    c = torch.tensor([0.6, -0.4])
    theta = torch.tensor([[0.5, -0.3], [0.0, 0.2], [-0.4, 0.1]])
    cp = _linear_gaussian(theta)
    out = PathCrossEntropy().update(plain_context(cp, _linear_reward(c), alpha, torch.zeros(200_000, 2), seed=5))
    exact = (theta - c / alpha) / K
    assert torch.allclose(cp.policy.control.theta.grad, exact, atol=5e-3)
    assert 0.5 * 200_000 < out.metrics["ess"] < 200_000
    # returns are J's per-path terms, as for the other strategies
    assert out.metrics["kl"] == pytest.approx(0.5 * (theta ** 2).sum().item() / K, rel=1e-5)


def test_cross_entropy_weights_are_equal_at_the_optimum_and_resampling_estimates_the_same_gradient():
    K, alpha = 4, 0.5
    c = torch.tensor([1.0, 0.5])
    cp = _linear_gaussian((c / alpha).expand(K, 2).clone())
    out = PathCrossEntropy().update(plain_context(cp, _linear_reward(c), alpha, torch.zeros(512, 2)))
    # at Q = Q* every path's weight exp(r / alpha) P / Q is the same constant
    assert out.metrics["ess"] == pytest.approx(512, rel=1e-4)

    theta = torch.tensor([[0.3, 0.0], [0.1, -0.2], [0.0, 0.4], [-0.1, 0.1]])
    grads = []
    for resample in (None, 400_000):
        cp = _linear_gaussian(theta)
        PathCrossEntropy(resample=resample).update(plain_context(cp, _linear_reward(c), alpha, torch.zeros(256, 2), seed=1))
        grads.append(cp.policy.control.theta.grad.clone())
    # 400k draws: the resampled gradient's standard error is about 1e-3 here, against entries of 0.03 to 0.4
    assert torch.allclose(grads[0], grads[1], atol=5e-3)
    assert grads[0].abs().max() > 0.3


def test_cross_entropy_finetuning_reaches_the_optimal_control_and_refuses_alpha_zero():
    K, alpha = 3, 0.5
    c = torch.tensor([1.0, -0.5])
    cp = brownian_controlled(K)
    ft = Finetuner(cp.reference, _linear_reward(c), alpha=alpha, strategy={"name": "cross_entropy"},
                   learn_initial=False, iterations=300, batch_size=256, lr=0.05, lr_schedule="cosine",
                   policy=cp.policy, progress=False)
    ft.fit()
    assert torch.allclose(cp.policy.control.theta.detach(), (c / alpha).expand(K, 2), atol=0.1)
    assert ft.history[-1]["ess"] > 0.9 * 256
    with pytest.raises(ConfigError, match="alpha > 0"):
        Finetuner(cp.reference, _linear_reward(c), alpha=0.0, strategy="cross_entropy", learn_initial=False)
    with pytest.raises(ConfigError, match="resample"):
        make_strategy({"name": "cross_entropy", "resample": 0})


def test_cross_entropy_reuses_each_batch_for_reuse_updates():
    calls = []
    c = torch.tensor([1.0, 0.5])
    reward = FunctionReward(lambda x: calls.append(x.shape[0]) or x @ c, differentiable=False)
    cp = _linear_gaussian(torch.zeros(3, 2))
    strat = make_strategy({"name": "cross_entropy", "resample": 8, "reuse": 3})
    assert isinstance(strat, PathCrossEntropy)
    opt = torch.optim.SGD(cp.trainable_parameters(), lr=0.1)

    def step():
        opt.step()
        opt.zero_grad()
        return 0.0

    thetas = []
    for i in range(7):
        strat.update(plain_context(cp, reward, 1.0, torch.zeros(32, 2), seed=i, step=step))
        thetas.append(cp.policy.control.theta.detach().clone())
    assert calls == [32, 32, 32]  # fresh batches at updates 0, 3 and 6
    assert all(not torch.equal(a, b) for a, b in zip(thetas, thetas[1:]))  # every update steps
    with pytest.raises(ConfigError, match="needs resample"):
        PathCrossEntropy(reuse=2)
