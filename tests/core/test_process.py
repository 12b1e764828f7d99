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


def test_train_mode_reaches_each_module_of_a_chain_of_rounds_once_and_leaves_references_in_eval(monkeypatch):
    """SEIKO's round-i model is controlled against round i - 1's: a chain of references.
    ``train()`` used to visit each reference twice (2^i visits in all)."""
    ref = BrownianProcess((2,), 4)
    model = ref
    for _ in range(16):
        model = ControlledProcess(model, ResidualControlProcess(ref, ConstantControl(4, 2, init=0.5)))
    visits = []
    plain = torch.nn.Module.train
    monkeypatch.setattr(torch.nn.Module, "train", lambda self, mode=True: visits.append(self) or plain(self, mode))
    monkeypatch.setattr(ControlledProcess, "train", lambda self, mode=True: visits.append(self) or
                        _controlled_train(self, mode))
    model.train()
    # each module once, but the shared base once per round that reaches it (linear, not 2^16)
    assert len({id(m) for m in visits}) == len(list(model.modules()))
    assert len(visits) <= 2 * len(list(model.modules()))
    assert model.training and model.policy.training
    inner = model.reference
    while isinstance(inner, ControlledProcess):
        assert not inner.training and not inner.policy.training
        inner = inner.reference


_controlled_train = ControlledProcess.train


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
