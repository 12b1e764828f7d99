import pytest
import torch

from difftilt.core import ControlledProcess, differentiable_rollout, sample_trajectories
from difftilt.core.finetune import default_policy
from difftilt.plugins.toy import make_mixture_process

from ..helpers import brownian_controlled


def _toy_controlled(K=6):
    proc = make_mixture_process(num_steps=K, eta=0.5)
    cp = ControlledProcess(proc, default_policy(proc, hidden=16))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in cp.trainable_parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return cp


def _grads(cp, x0, **kw):
    cp.zero_grad(set_to_none=True)
    x, kl = differentiable_rollout(cp, x0, seed=11, **kw)
    loss = (x[:, 0] ** 2 - x[:, 1]).mean() + kl.mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in cp.trainable_parameters()]


def test_checkpointed_and_truncated_gradients_equal_full_gradient_when_T_equals_K():
    cp = _toy_controlled(K=6)
    x0 = torch.randn(32, 2)
    ref_loss, ref = _grads(cp, x0, checkpoint=False, grad_steps=None)
    for kw in (dict(checkpoint=True, grad_steps=None), dict(checkpoint=True, grad_steps=6),
               dict(checkpoint=False, grad_steps=6)):
        loss, got = _grads(cp, x0, **kw)
        assert torch.allclose(loss, ref_loss)
        for a, b in zip(got, ref):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), kw


def test_truncated_gradient_is_the_same_with_and_without_checkpointing_and_differs_from_full():
    cp = _toy_controlled(K=6)
    x0 = torch.randn(32, 2)
    _, trunc_plain = _grads(cp, x0, checkpoint=False, grad_steps=2)
    _, trunc_ckpt = _grads(cp, x0, checkpoint=True, grad_steps=2)
    _, full = _grads(cp, x0, checkpoint=False)
    for a, b in zip(trunc_plain, trunc_ckpt):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(trunc_plain, full))


def test_truncation_keeps_reward_gradient_only_for_last_T_steps_exactly():
    # x_K = s^2 sum_k theta_k + noise; d r / d theta_k = s^2 c for the last T steps, 0 before;
    # the KL term s^2 ||theta_k||^2 / 2 keeps its direct gradient s^2 theta_k at every step.
    K, T = 5, 2
    cp = brownian_controlled(K, d=2, init=0.4)
    s2 = 1.0 / K
    c = torch.tensor([1.0, -2.0])
    x, kl = differentiable_rollout(cp, torch.zeros(8, 2), seed=0, grad_steps=T, checkpoint=True)
    ((x @ c).mean() - kl.mean()).backward()
    theta = cp.policy.control.theta
    expected = torch.stack([(s2 * c if k >= K - T else torch.zeros(2)) - s2 * theta[k].detach() for k in range(K)])
    assert torch.allclose(theta.grad, expected, atol=1e-6)


def test_sampling_and_differentiable_rollout_share_noise_for_the_same_seed():
    cp = _toy_controlled(K=5)
    x0 = torch.randn(16, 2)
    traj = sample_trajectories(cp, x0=x0, seed=4, kl=True)
    with torch.no_grad():
        x, kl = differentiable_rollout(cp, x0, seed=4, checkpoint=False, per_step_kl=True)
        _, path = differentiable_rollout(cp, x0, seed=4, checkpoint=True)
    assert torch.allclose(traj.x, x, atol=1e-6)
    assert torch.allclose(traj.kl, kl, atol=1e-6)
    assert torch.allclose(path, kl.sum(1), atol=1e-5)


def test_sample_trajectories_records_states_and_log_probs():
    cp = _toy_controlled(K=4)
    traj = sample_trajectories(cp, 10, seed=1, kl=True, log_prob=True, states=True)
    assert len(traj.states) == 5 and traj.log_prob.shape == (10, 4) and traj.kl.shape == (10, 4)
    assert torch.equal(traj.states[-1], traj.x)
    # log-prob of each recorded transition under the policy, recomputed
    for k in range(4):
        lp = cp.step(traj.states[k], k).log_prob(traj.states[k + 1])
        assert torch.allclose(lp, traj.log_prob[:, k], atol=1e-5)


def test_rollout_rejects_wrong_state_shape():
    from difftilt.core import ShapeError

    cp = _toy_controlled(K=3)
    with pytest.raises(ShapeError):
        sample_trajectories(cp, x0=torch.zeros(4, 3))
