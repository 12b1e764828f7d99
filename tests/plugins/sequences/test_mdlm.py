import copy
import math

import pytest
import torch

from difftilt.core import ControlledProcess
from difftilt.core.errors import ConfigError, InputDataError, ShapeError
from difftilt.core.rollout import differentiable_rollout, sample_trajectories
from difftilt.plugins.sequences.mdlm import (MaskedDiffusionProcess, SequenceDenoiser, log_likelihood, masked_diffusion_loss,
                                             order_log_likelihoods, revealed_order)
from difftilt.plugins.sequences.pretrain import load_pretrained, save_pretrained, train_masked_diffusion
from tests.helpers import DEVICES


def _process(V=4, L=6, K=8, seed=0, **kw):
    torch.manual_seed(seed)
    return MaskedDiffusionProcess(SequenceDenoiser(V, L, dim=16, depth=1, heads=2), num_steps=K, **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_starts_all_masked_and_ends_with_no_mask(device):
    p = _process().to(device)
    x0 = p.initial(5)
    assert (p.tokens(x0) == p.mask_index).all() and x0.device.type == device
    x = p.sample(64, generator=torch.Generator(device).manual_seed(0))
    assert x.shape == (64, 6, 5) and x.device.type == device
    assert (p.tokens(x) < p.mask_index).all()
    assert torch.allclose(x.sum(-1), torch.ones(64, 6, device=device))


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


@pytest.mark.parametrize("device", DEVICES)
def test_kl_between_two_denoisers_is_the_closed_form_at_masked_positions(device):
    V, L, K = 3, 4, 4
    p, q = _process(V, L, K, seed=0).to(device), _process(V, L, K, seed=1).to(device)
    x = p.one_hot(torch.tensor([[0, 3, 3, 2], [3, 3, 3, 3]], device=device))
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
    V = 4
    data = torch.tensor([[0, 1, 2, 3, 0], [3, 2, 1, 0, 3]]).repeat(64, 1)
    net, log = train_masked_diffusion(data, V, dim=32, depth=2, heads=2, steps=800, batch_size=64, lr=3e-3,
                                      warmup=10, progress=False)
    losses = log.losses
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


def test_count_initialization_gives_the_corpus_conditionals_and_banned_pairs_a_tiny_probability():
    V, L = 3, 6
    g = torch.Generator().manual_seed(0)
    # a Markov chain in which letter 0 is never followed by letter 2
    T = torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.3, 0.5], [0.4, 0.4, 0.2]])
    seqs = [torch.multinomial(torch.ones(V), 500, replacement=True, generator=g)]
    for _ in range(L - 1):
        seqs.append(torch.multinomial(T[seqs[-1]], 1, generator=g).squeeze(-1))
    data = torch.stack(seqs, 1)
    net = SequenceDenoiser(V, L, dim=8, depth=0, heads=1, neighbor_bias=True)
    net.init_from_counts(data, smoothing=0.5)
    with torch.no_grad():
        net.out.weight.zero_()  # leave only the bias and the tables
        x = torch.full((V, L), V)
        x[:, 2] = torch.arange(V)  # position 3 has a known left neighbour and a masked right one
        p = torch.softmax(net(torch.nn.functional.one_hot(x, V + 1).float()), -1)[:, 3]
    pairs = torch.zeros(V, V)
    for a, b in zip(data[:, :-1].reshape(-1).tolist(), data[:, 1:].reshape(-1).tolist()):
        pairs[a, b] += 1
    expected = (pairs + 0.5) / (pairs + 0.5).sum(1, keepdim=True)
    torch.testing.assert_close(p, expected)
    assert p[0, 2] < 1e-3
    with pytest.raises(ConfigError, match="neighbor_bias"):
        SequenceDenoiser(V, L, dim=8, depth=0, heads=1).init_from_counts(data)
    with pytest.raises(ConfigError, match="neighbor_init"):
        train_masked_diffusion(data, V, steps=1, neighbor_init="ones", progress=False)


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


class _ExactDenoiser(torch.nn.Module):
    """The exact conditionals ``p(x_l | unmasked positions)`` of a known law over ``V^L`` sequences."""

    def __init__(self, probs: torch.Tensor, V: int, L: int):
        super().__init__()
        self.vocab_size, self.length = V, L
        self.seqs = torch.cartesian_prod(*[torch.arange(V)] * L).reshape(-1, L)
        self.probs = probs

    def forward(self, x, t=0.0):
        ids = x.argmax(-1)  # (b, L); V = masked
        agree = ((self.seqs[None] == ids[:, None]) | (ids[:, None] == self.vocab_size)).all(-1)  # (b, n)
        w = self.probs[None] * agree  # posterior over full sequences
        marg = torch.stack([(w[..., None] * torch.nn.functional.one_hot(self.seqs[:, l], self.vocab_size)).sum(1)
                            for l in range(self.length)], 1)
        return torch.log(marg.clamp_min(1e-30))


def _sampler_law(p, seqs):
    """Exact probability of each final sequence under the chain, by enumerating every path."""
    import itertools
    out = []
    for y in seqs:
        total = 0.0
        target = p.one_hot(y[None])
        for order in itertools.permutations(range(p.length)) if p.sampler == "first_hit" else [None]:
            x, lp = p.initial(1), 0.0
            for k in range(p.num_steps):
                step = p.step(x, k)
                if order is None:  # K = 1 ancestral: everything at once
                    nxt = target
                else:
                    nxt = x.clone()
                    nxt[0, order[k]] = target[0, order[k]]
                lp += step.log_prob(nxt).item()
                x = nxt
            total += math.exp(lp)
        out.append(total)
    return torch.tensor(out)


def test_first_hit_sampler_reproduces_the_data_law_exactly_and_parallel_decoding_does_not():
    V, L = 2, 3
    probs = torch.tensor([0.30, 0.0, 0.05, 0.15, 0.0, 0.25, 0.20, 0.05])  # correlated, with banned sequences
    den = _ExactDenoiser(probs, V, L)
    first_hit = MaskedDiffusionProcess(den, sampler="first_hit")
    assert first_hit.num_steps == L
    law = _sampler_law(first_hit, den.seqs)
    assert torch.allclose(law, probs, atol=1e-6)
    one_shot = MaskedDiffusionProcess(den, num_steps=1)
    law1 = _sampler_law(one_shot, den.seqs)
    assert law1.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert (law1 - probs).abs().max() > 0.05 and law1[1] > 0  # independent draws reach a banned sequence


def test_first_hit_steps_unmask_one_position_each_with_the_mean_per_position_kl():
    V, L = 3, 5
    torch.manual_seed(0)
    p = MaskedDiffusionProcess(SequenceDenoiser(V, L, dim=16, depth=1, heads=2), sampler="first_hit")
    q = MaskedDiffusionProcess(SequenceDenoiser(V, L, dim=16, depth=1, heads=2), sampler="first_hit")
    traj = sample_trajectories(ControlledProcess(q, p), 8, seed=0, states=True)
    masks = [int((p.tokens(s) == V).sum(-1)[0]) for s in traj.states]
    assert masks == list(range(L, -1, -1)) and (p.tokens(traj.x) < V).all()
    x = p.one_hot(torch.tensor([[0, 3, 3, 2, 3]]))
    lq, lp = torch.log_softmax(q.denoiser(x), -1), torch.log_softmax(p.denoiser(x), -1)
    per_pos = (lq.exp() * (lq - lp)).sum(-1)[0]
    assert q.step(x, 2).kl(p.step(x, 2)).item() == pytest.approx(per_pos[[1, 2, 4]].mean().item(), abs=1e-6)
    with pytest.raises(ConfigError, match="first_hit"):
        MaskedDiffusionProcess(p.denoiser, num_steps=8, sampler="first_hit")
    with pytest.raises(ConfigError, match="sampler"):
        MaskedDiffusionProcess(p.denoiser, sampler="greedy")


def _all_orders(b, L):
    import itertools
    perms = torch.tensor(list(itertools.permutations(range(L))))
    return perms[None].expand(b, *perms.shape)


def test_likelihood_over_every_reveal_order_is_the_chains_exact_law():
    V, L = 2, 3
    p = MaskedDiffusionProcess(SequenceDenoiser(V, L, dim=16, depth=1, heads=2), sampler="first_hit")
    q = copy.deepcopy(p)
    with torch.no_grad():
        for w in q.denoiser.parameters():
            w.add_(0.5 * torch.randn_like(w))
    seqs = torch.cartesian_prod(*[torch.arange(V)] * L)
    for model in (p, ControlledProcess(p, q)):  # a fine-tuned copy, read through its controlled chain
        ll = order_log_likelihoods(model, seqs, _all_orders(len(seqs), L), chunk=5)  # chunks across sequences
        exact = torch.logsumexp(ll, 1) - math.log(ll.shape[1])
        law = _sampler_law(q if model is not p else p, seqs)  # every path enumerated step by step
        assert torch.allclose(exact.exp(), law.double(), atol=1e-6)
        assert torch.allclose(log_likelihood(model, seqs, orders="all"), exact, atol=1e-9)
        assert exact.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
        assert ll.std(1).max() > 1e-3  # a random denoiser's conditionals are not one joint law's
    # one sampled path's value is that path's own log-probability (times L!)
    traj = sample_trajectories(p, 4, seed=3, kl=False, log_prob=True, states=True)
    order = revealed_order(traj.states)
    own = order_log_likelihoods(p, p.tokens(traj.x), order[:, None])[:, 0]
    assert torch.allclose(own, traj.log_prob.sum(1).double() + math.lgamma(L + 1), atol=1e-5)


def test_a_consistent_model_gives_every_order_the_same_likelihood_and_the_estimate_converges():
    V, L = 2, 3
    probs = torch.tensor([0.30, 0.0, 0.05, 0.15, 0.0, 0.25, 0.20, 0.05])
    den = _ExactDenoiser(probs, V, L)
    p = MaskedDiffusionProcess(den, sampler="first_hit")
    seqs = den.seqs[probs > 0]
    ll = order_log_likelihoods(p, seqs, _all_orders(len(seqs), L))
    assert torch.allclose(ll, probs[probs > 0].log().double()[:, None].expand_as(ll), atol=1e-5)
    rand = MaskedDiffusionProcess(SequenceDenoiser(V, L, dim=16, depth=1, heads=2), sampler="first_hit")
    exact = _sampler_law(rand, den.seqs).double().log()
    est = log_likelihood(rand, den.seqs, orders=400, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(est, exact, atol=0.03)
    one = log_likelihood(rand, den.seqs, orders=1, generator=torch.Generator().manual_seed(0))
    assert (one - exact).abs().max() > (est - exact).abs().max()


def test_likelihood_refuses_bad_input():
    V, L = 3, 4
    fh = MaskedDiffusionProcess(SequenceDenoiser(V, L, dim=16, depth=1, heads=2), sampler="first_hit")
    ok = torch.zeros(2, L, dtype=torch.long)
    with pytest.raises(ConfigError, match="first_hit"):
        log_likelihood(MaskedDiffusionProcess(fh.denoiser, num_steps=4), ok)
    with pytest.raises(ShapeError, match="token ids"):
        log_likelihood(fh, torch.zeros(2, L + 1, dtype=torch.long))
    with pytest.raises(InputDataError, match="no masks"):
        log_likelihood(fh, torch.full((2, L), V))
    with pytest.raises(InputDataError, match="permutation"):
        order_log_likelihoods(fh, ok, torch.zeros(2, 1, L, dtype=torch.long))
    with pytest.raises(ShapeError, match="orders"):
        order_log_likelihoods(fh, ok, torch.arange(L).expand(3, 1, L))
    for bad in (0, 2.5, "every"):
        with pytest.raises(ConfigError, match="orders must be a number >= 1 or 'all'"):
            log_likelihood(fh, ok, orders=bad)
    long = MaskedDiffusionProcess(SequenceDenoiser(V, 9, dim=16, depth=1, heads=2), sampler="first_hit")
    with pytest.raises(ConfigError, match=r"9! = 362,880 reveal orders"):
        log_likelihood(long, torch.zeros(1, 9, dtype=torch.long), orders="all")


class _TimeRecorder(SequenceDenoiser):
    def forward(self, x, t):
        self.seen.append((float(t), float(x[0, :, -1].mean())))  # the time and the masked fraction
        return super().forward(x, t)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_first_hit_steps_give_a_time_conditioned_denoiser_the_time_of_their_masked_fraction(schedule):
    # step k of a first-hitting chain has L - k of L positions masked: the denoiser, trained on
    # x_t with masking probability 1 - a(t), should read the t at which 1 - a(t) = (L - k) / L
    V, L = 3, 5
    den = _TimeRecorder(V, L, dim=16, depth=1, heads=2, time_conditioning=True)
    den.seen = []
    p = MaskedDiffusionProcess(den, sampler="first_hit", schedule=schedule)
    p.sample(1)
    assert [m for _, m in den.seen] == pytest.approx([(L - k) / L for k in range(L)])
    for t, masked in den.seen:
        a = 1 - t if schedule == "linear" else math.cos(math.pi * t / 2)
        assert 1 - a == pytest.approx(masked, abs=1e-6)
