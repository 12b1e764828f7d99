import pytest
import torch

from difftilt.core import (BrownianProcess, ChainedProcess, ControlledProcess, ResidualControlProcess, ShapeError,
                           TimeMLP, sample_trajectories)
from difftilt.core.rollout import step_generator

from ..helpers import ConstantControl


def test_brownian_process_ends_standard_normal_exactly_in_law():
    proc = BrownianProcess((3,), num_steps=10)
    x = proc.sample(40_000, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(x.mean(0), torch.zeros(3), atol=0.02)
    assert torch.allclose(x.var(0), torch.ones(3), atol=0.03)
    assert proc.initial_sde(5) is None and proc.initial_kind == "point"


def test_controlled_process_freezes_reference_and_shares_base_computation():
    ref = BrownianProcess((2,), 4)
    pol = ResidualControlProcess(ref, ConstantControl(4, 2, init=1.0))
    cp = ControlledProcess(ref, pol)
    assert not any(p.requires_grad for p in cp.reference.parameters())
    x = torch.randn(5, 2)
    q, p = cp.step_pair(x, 1)
    assert torch.allclose(q.mean, x + 0.25 * 1.0) and torch.allclose(p.mean, x)
    assert [t is cp.policy.control.theta for t in cp.trainable_parameters()] == [True]


def test_frozen_policy_is_a_copy_sharing_the_base_and_next_round_kl_is_zero_at_start():
    ref = BrownianProcess((2,), 4)
    cp = ControlledProcess(ref, ResidualControlProcess(ref, ConstantControl(4, 2, init=0.5)))
    prev = cp.frozen_policy()
    assert prev.base is ref and prev.control is not cp.policy.control
    assert not any(p.requires_grad for p in prev.parameters())
    # next round: policy starts as a trainable copy of the previous one -> KL exactly 0
    import copy

    nxt = ControlledProcess(prev, ResidualControlProcess(ref, copy.deepcopy(cp.policy.control)))
    traj = sample_trajectories(nxt, 8, seed=0, kl=True)
    assert torch.all(traj.kl == 0)


def test_controlled_process_rejects_mismatched_chains():
    with pytest.raises(ShapeError):
        ControlledProcess(BrownianProcess((2,), 4), BrownianProcess((2,), 5))


def test_chained_process_draws_initial_states_from_the_initial_chain():
    aux = BrownianProcess((2,), 3)
    aux_pol = ResidualControlProcess(aux, ConstantControl(3, 2, init=3.0))  # drift 3 over [0, 1]
    trans = BrownianProcess((2,), 2)
    chained = ChainedProcess(trans, aux_pol)
    x0 = chained.initial(20_000, generator=step_generator(0, 0))
    assert torch.allclose(x0.mean(0), torch.full((2,), 3.0), atol=0.03)
    assert chained.initial_sde(7) is aux_pol


def test_time_mlp_zero_init_and_time_dependence():
    net = TimeMLP((2,), (2,), hidden=8)
    x = torch.randn(3, 2)
    assert torch.equal(net(x, 0.1), torch.zeros(3, 2))
    net2 = TimeMLP((2,), (), hidden=8, zero_init=False)
    assert net2(x, 0.1).shape == (3,)
    assert not torch.allclose(net2(x, 0.1), net2(x, 0.9))
    # float times (cached embeddings) and tensor times agree
    assert torch.allclose(net2(x, 0.3), net2(x, torch.full((3,), 0.3)), atol=1e-6)
