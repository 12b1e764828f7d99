import copy
import math

import pytest
import torch

from difftilt.core import ControlledProcess
from difftilt.core.errors import ConfigError, InputDataError, ShapeError
from difftilt.core.rollout import differentiable_rollout, sample_trajectories
from difftilt.plugins.sequences.mdlm import MaskedDiffusionProcess, SequenceDenoiser, masked_diffusion_loss
from difftilt.plugins.sequences.pretrain import load_pretrained, save_pretrained, train_masked_diffusion


def _process(V=4, L=6, K=8, seed=0, **kw):
    torch.manual_seed(seed)
    return MaskedDiffusionProcess(SequenceDenoiser(V, L, dim=16, depth=1, heads=2), num_steps=K, **kw)


def test_sampling_starts_all_masked_and_ends_with_no_mask():
    p = _process()
    x0 = p.initial(5)
    assert (p.tokens(x0) == p.mask_index).all()
    x = p.sample(64, generator=torch.Generator().manual_seed(0))
    assert x.shape == (64, 6, 5)
    assert (p.tokens(x) < p.mask_index).all()
    assert torch.allclose(x.sum(-1), torch.ones(64, 6))


def test_step_probabilities_match_the_mdlm_reverse_kernel():
    V, L, K = 3, 4, 4
    p = _process(V, L, K)
    x = p.one_hot(torch.tensor([[0, 3, 3, 2]]))  # positions 1 and 2 masked
    k = 1  # t = 0.75 -> s = 0.5; linear schedule a = 1 - t
    step = p.step(x, k)
    probs = step.log_probs.exp()[0]
    den = torch.softmax(p.denoiser(x, 0.75), -1)[0]
    a_t, a_s = 0.25, 0.5
    for pos in (1, 2):
        assert probs[pos, V].item() == pytest.approx((1 - a_s) / (1 - a_t), abs=1e-6)
        assert torch.allclose(probs[pos, :V], (a_s - a_t) / (1 - a_t) * den[pos], atol=1e-6)
    assert step.frozen.tolist() == [[True, False, False, True]]
    # last step: nothing stays masked
    last = p.step(x, K - 1).log_probs.exp()[0]
    assert last[1, V].item() == 0.0 and last[1, :V].sum().item() == pytest.approx(1.0, abs=1e-6)


def test_kl_between_two_denoisers_is_the_closed_form_at_masked_positions():
    V, L, K = 3, 4, 4
    p, q = _process(V, L, K, seed=0), _process(V, L, K, seed=1)
    x = p.one_hot(torch.tensor([[0, 3, 3, 2], [3, 3, 3, 3]]))
    k = 2  # t = 0.5 -> s = 0.25
    kl = q.step(x, k).kl(p.step(x, k))
    lq = torch.log_softmax(q.denoiser(x, 0.5), -1)
    lp = torch.log_softmax(p.denoiser(x, 0.5), -1)
    per_pos = (lq.exp() * (lq - lp)).sum(-1)  # (b, L): the denoisers' KL
    c = (0.75 - 0.5) / (1 - 0.5)  # probability of unmasking at this step
    expected = c * (per_pos * (x[..., V] > 0.5)).sum(-1)
    assert torch.allclose(kl, expected, atol=1e-6)
    assert kl[1] > kl[0] > 0


def test_backprop_through_straight_through_rollout_reaches_the_policy():
    ref = _process(K=5)
    policy = copy.deepcopy(ref).requires_grad_(True)
    cp = ControlledProcess(ref, policy)
    x0 = ref.initial(8)
    target = torch.zeros(6, 5)
    target[:, 0] = 1.0
    x, kl = differentiable_rollout(cp, x0, seed=0, checkpoint=True)
    ((x * target).sum((1, 2)) - kl).mean().backward()
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert kl.detach().abs().max() < 1e-5  # policy == reference at the start


def test_trajectory_kl_is_zero_for_identical_models_and_positive_otherwise():
    ref = _process()
    same = ControlledProcess(ref, copy.deepcopy(ref))
    tr = sample_trajectories(same, 32, seed=0)
    assert tr.kl.abs().max() < 1e-5
    other = ControlledProcess(ref, _process(seed=3))
    assert sample_trajectories(other, 32, seed=0).kl.sum(1).mean() > 0


def test_pretraining_learns_a_fixed_pattern_and_round_trips(tmp_path):
    V, L = 4, 5
    data = torch.tensor([[0, 1, 2, 3, 0], [3, 2, 1, 0, 3]]).repeat(64, 1)
    net, losses = train_masked_diffusion(data, V, dim=32, depth=2, heads=2, steps=800, batch_size=64, lr=3e-3,
                                         warmup=10, progress=False)
    assert losses[-1] < 0.5 * losses[0]
    p = MaskedDiffusionProcess(net, num_steps=100, alphabet="ACGT")  # few simultaneous unmaskings
    x = p.sample(200, generator=torch.Generator().manual_seed(0))
    seqs = {tuple(r) for r in p.tokens(x).tolist()}
    hits = sum(1 for r in p.tokens(x).tolist() if tuple(r) in {(0, 1, 2, 3, 0), (3, 2, 1, 0, 3)})
    assert hits >= 185, seqs
    save_pretrained(p, tmp_path / "m", data={"name": "pattern"}, train={"steps": 300}, losses=losses, command="test")
    q = load_pretrained(tmp_path / "m")
    assert q.decode(x[:2]) == p.decode(x[:2])
    for a, b in zip(p.denoiser.state_dict().values(), q.denoiser.state_dict().values()):
        assert torch.equal(a, b)
    assert load_pretrained(tmp_path / "m", num_steps=3).num_steps == 3


def test_bad_input_is_refused_with_a_clear_error():
    p = _process(V=4, L=6)
    with pytest.raises(InputDataError, match="outside the alphabet"):
        p.one_hot(torch.tensor([[0, 1, 2, 3, 9, 0]]))
    with pytest.raises(ShapeError, match=r"\(batch, 6\)"):
        p.one_hot(torch.tensor([[0, 1, 2]]))
    with pytest.raises(ConfigError, match="alphabet"):
        _process(V=4, alphabet="ACG")


def test_loss_is_the_masked_cross_entropy_weighted_by_one_over_t():
    torch.manual_seed(0)
    net = SequenceDenoiser(3, 4, dim=16, depth=1, heads=2)
    tokens = torch.randint(3, (512, 4))
    loss = masked_diffusion_loss(net, tokens, generator=torch.Generator().manual_seed(0))
    # An untrained net predicts close to uniform: the bound is about log(V) per position
    # (E_t[1/t * t * L * CE] / L = CE).
    assert loss.item() == pytest.approx(math.log(3), rel=0.25)
