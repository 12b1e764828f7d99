import math

import pytest
import torch
from torch.distributions import Categorical, Normal, kl_divergence

from difftilt.core import CategoricalStep, DeterministicStepError, GaussianStep, ShapeError, SinglePositionStep


# ---------------------------------------------------------------- Gaussian

def test_gaussian_kl_shared_std_hand_computed():
    # ||mu_q - mu_p||^2 / (2 s^2), summed over dimensions (never averaged)
    q = GaussianStep(torch.tensor([[1.0, 2.0], [0.0, 0.0]]), 0.5)
    p = GaussianStep(torch.zeros(2, 2), 0.5)
    assert torch.allclose(q.kl(p), torch.tensor([(1 + 4) / (2 * 0.25), 0.0]))


def test_gaussian_kl_different_std_hand_computed():
    # KL(N(0,1) || N(1, 2^2)) = log 2 + (1 + 1) / 8 - 1/2 per dimension; two dimensions
    q = GaussianStep(torch.zeros(1, 2), 1.0)
    p = GaussianStep(torch.ones(1, 2), 2.0)
    per_dim = math.log(2.0) + 2.0 / 8.0 - 0.5
    assert q.kl(p).item() == pytest.approx(2 * per_dim, abs=1e-6)


def test_gaussian_kl_matches_torch_distributions_on_random_cases():
    g = torch.Generator().manual_seed(1)
    mq, mp = torch.randn(5, 3, 4, generator=g), torch.randn(5, 3, 4, generator=g)
    sq, sp = torch.rand(5, 1, 1, generator=g) + 0.1, torch.rand(5, 1, 1, generator=g) + 0.1
    ours = GaussianStep(mq, sq).kl(GaussianStep(mp, sp))
    ref = kl_divergence(Normal(mq, sq.expand_as(mq)), Normal(mp, sp.expand_as(mp))).sum((1, 2))
    assert torch.allclose(ours, ref, atol=1e-5)


def test_gaussian_kl_with_itself_is_zero_and_log_prob_matches_normal():
    m = torch.randn(4, 3)
    q = GaussianStep(m, 0.3)
    assert torch.equal(q.kl(GaussianStep(m.clone(), 0.3)), torch.zeros(4))
    x = torch.randn(4, 3)
    assert torch.allclose(q.log_prob(x), Normal(m, 0.3).log_prob(x).sum(-1), atol=1e-5)


def test_gaussian_tilt_moves_mean_by_variance_times_field():
    m, s, h = torch.randn(3, 2), 0.4, torch.randn(3, 2)
    base = GaussianStep(m, s)
    tilted = base.tilted(h)
    assert torch.allclose(tilted.mean, m + s**2 * h)
    # KL of the tilt to its base is s^2 ||h||^2 / 2
    assert torch.allclose(tilted.kl(base), 0.5 * s**2 * (h**2).sum(-1))


def test_gaussian_tilt_is_the_exponential_tilt():
    # Self-normalized importance weights exp(h x) on samples of the base give the tilted mean.
    base = GaussianStep(torch.tensor([[0.5]]), 0.7)
    h = torch.tensor([[1.3]])
    x = base.mean + 0.7 * torch.randn(400_000, 1)
    w = torch.softmax((h * x).squeeze(-1), 0)
    assert (w @ x).item() == pytest.approx(base.tilted(h).mean.item(), abs=5e-3)


def test_deterministic_gaussian_step_samples_but_refuses_kl():
    q = GaussianStep(torch.ones(2, 2), 0.0)
    assert torch.equal(q.sample(), torch.ones(2, 2))
    with pytest.raises(DeterministicStepError, match="eta"):
        q.kl(GaussianStep(torch.zeros(2, 2), 0.0))
    with pytest.raises(DeterministicStepError):
        q.log_prob(torch.ones(2, 2))


def test_gaussian_rejects_bad_shapes():
    with pytest.raises(ShapeError):
        GaussianStep(torch.zeros(3), 1.0)
    with pytest.raises(ShapeError):
        GaussianStep(torch.zeros(3, 2), torch.ones(4))
    with pytest.raises(ShapeError):
        GaussianStep(torch.zeros(3, 2), -1.0)


def test_gaussian_rsample_is_reparameterized():
    mean = torch.zeros(2, 3, requires_grad=True)
    x = GaussianStep(mean, 0.5).rsample(torch.Generator().manual_seed(0))
    x.sum().backward()
    assert torch.equal(mean.grad, torch.ones(2, 3))


# ---------------------------------------------------------------- Categorical

def _onehot(idx, S):
    return torch.nn.functional.one_hot(torch.tensor(idx), S).float()


def test_categorical_kl_hand_computed_with_frozen_positions():
    # position 0: q = (1/2, 1/2), p = (1/4, 3/4): KL = 1/2 log 2 + 1/2 log(2/3)
    # position 1: frozen (already unmasked) -> 0
    q_logits = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))
    p_logits = torch.log(torch.tensor([[[0.25, 0.75], [0.1, 0.9]]]))
    current = _onehot([[1, 0]], 2)
    frozen = torch.tensor([[False, True]])
    q = CategoricalStep(q_logits, current, frozen)
    p = CategoricalStep(p_logits, current, frozen)
    expected = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert q.kl(p).item() == pytest.approx(expected, abs=1e-6)
    # without the frozen mask both positions count
    both = CategoricalStep(q_logits, current).kl(CategoricalStep(p_logits, current))
    second = 0.9 * math.log(9) + 0.1 * math.log(1 / 9)
    assert both.item() == pytest.approx(expected + second, abs=1e-5)


def test_categorical_kl_matches_torch_and_zero_against_itself():
    logits_q, logits_p = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    cur = _onehot(torch.zeros(3, 5, dtype=torch.long).tolist(), 4)
    q, p = CategoricalStep(logits_q, cur), CategoricalStep(logits_p, cur)
    ref = kl_divergence(Categorical(logits=logits_q), Categorical(logits=logits_p)).sum(-1)
    assert torch.allclose(q.kl(p), ref, atol=1e-5)
    assert torch.allclose(q.kl(CategoricalStep(logits_q.clone(), cur)), torch.zeros(3), atol=1e-6)


def test_categorical_kl_handles_zero_probabilities():
    q_logits = torch.tensor([[[0.0, -float("inf")]]])
    p_logits = torch.tensor([[[0.0, 0.0]]])
    cur = _onehot([[0]], 2)
    assert CategoricalStep(q_logits, cur).kl(CategoricalStep(p_logits, cur)).item() == pytest.approx(math.log(2))


def test_categorical_log_prob_sample_and_frozen_copy():
    logits = torch.log(torch.tensor([[[0.2, 0.8], [0.5, 0.5]]]))
    cur = _onehot([[0, 1]], 2)
    frozen = torch.tensor([[False, True]])
    step = CategoricalStep(logits, cur, frozen)
    x = _onehot([[1, 1]], 2)
    assert step.log_prob(x).item() == pytest.approx(math.log(0.8), abs=1e-6)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([step.sample(g) for _ in range(4000)])  # (n, 1, 2, 2)
    assert torch.all(draws[:, 0, 1, 1] == 1)  # frozen position copied
    assert draws[:, 0, 0, 1].mean().item() == pytest.approx(0.8, abs=0.03)


def test_categorical_rsample_straight_through():
    logits = torch.zeros(2, 3, 4, requires_grad=True)
    cur = _onehot(torch.zeros(2, 3, dtype=torch.long).tolist(), 4)
    x = CategoricalStep(logits, cur, tau=0.5).rsample(torch.Generator().manual_seed(0))
    hard = x.detach()
    assert torch.allclose(hard, hard.round(), atol=1e-6) and torch.allclose(hard.sum(-1), torch.ones(2, 3))
    (x * torch.arange(4.0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_categorical_tilt_adds_to_logits():
    logits, h = torch.randn(1, 2, 3), torch.randn(1, 2, 3)
    cur = _onehot([[0, 0]], 3)
    t = CategoricalStep(logits, cur).tilted(h)
    assert torch.allclose(t.log_probs, torch.log_softmax(logits + h, -1))


def test_categorical_rejects_bad_shapes():
    with pytest.raises(ShapeError):
        CategoricalStep(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ShapeError):
        CategoricalStep(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))


# ---------------------------------------------------------------- SinglePositionStep
def _single_position_case(seed=0, weights=False):
    g = torch.Generator().manual_seed(seed)
    b, L, S = 2, 3, 4
    current = _onehot([[3, 0, 3], [3, 3, 3]], S)  # state 3 plays "masked"
    is_open = torch.tensor([[True, False, True], [True, True, True]])
    logits = torch.randn(b, L, S, generator=g)
    logits[..., 3] = -1.0e4  # an open position never stays in state 3
    lw = torch.randn(b, L, generator=g) if weights else None
    return logits, current, is_open, lw


def _next_states(current, is_open, S):
    """Every state one step can reach, per sample: list of (b-indexed) lists of (L, S) tensors."""
    out = []
    for i in range(current.shape[0]):
        states = []
        for pos in is_open[i].nonzero().flatten().tolist():
            for v in range(S - 1):
                x = current[i].clone()
                x[pos] = torch.nn.functional.one_hot(torch.tensor(v), S).float()
                states.append(x)
        out.append(torch.stack(states))
    return out


@pytest.mark.parametrize("weights", [False, True])
def test_single_position_log_prob_normalizes_and_kl_matches_enumeration(weights):
    logits, current, is_open, lw = _single_position_case(0, weights)
    q = SinglePositionStep(logits, current, is_open, lw)
    logits2, _, _, lw2 = _single_position_case(1, weights)
    p = SinglePositionStep(logits2, current, is_open, lw2)
    kl = q.kl(p)
    for i, xs in enumerate(_next_states(current, is_open, 4)):
        n = xs.shape[0]
        lq = torch.stack([SinglePositionStep(logits[i:i + 1], current[i:i + 1],
                                                                          is_open[i:i + 1], None if lw is None else lw[i:i + 1]).log_prob(x[None])[0] for x in xs])
        lp = torch.stack([SinglePositionStep(logits2[i:i + 1], current[i:i + 1], is_open[i:i + 1],
                                             None if lw2 is None else lw2[i:i + 1]).log_prob(x[None])[0] for x in xs])
        assert n == int(is_open[i].sum()) * 3
        assert lq.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
        assert kl[i].item() == pytest.approx((lq.exp() * (lq - lp)).sum().item(), abs=1e-6)
    assert torch.allclose(q.kl(q), torch.zeros(2), atol=1e-7)


def test_single_position_uniform_pick_kl_is_mean_of_per_position_kl():
    logits, current, is_open, _ = _single_position_case(0)
    logits2, *_ = _single_position_case(1)
    q, p = SinglePositionStep(logits, current, is_open), SinglePositionStep(logits2, current, is_open)
    lq, lp = torch.log_softmax(logits, -1), torch.log_softmax(logits2, -1)
    per_pos = (lq.exp() * (lq - lp)).sum(-1)
    expected = (per_pos * is_open).sum(-1) / is_open.sum(-1)
    assert torch.allclose(q.kl(p), expected, atol=1e-6)


def test_single_position_samples_follow_log_prob_and_move_one_open_position():
    logits, current, is_open, lw = _single_position_case(2, weights=True)
    q = SinglePositionStep(logits[:1].expand(20000, -1, -1), current[:1].expand(20000, -1, -1),
                           is_open[:1].expand(20000, -1), lw[:1].expand(20000, -1))
    x = q.sample(torch.Generator().manual_seed(0))
    changed = x.argmax(-1) != current[:1].argmax(-1)
    assert (changed.sum(-1) == 1).all() and not changed[:, 1].any()  # one move, never the closed position
    lp = q.log_prob(x)
    for pos in (0, 2):
        for v in range(3):
            hit = changed[:, pos] & (x[:, pos].argmax(-1) == v)
            expected = lp[hit][0].exp().item()
            assert hit.float().mean().item() == pytest.approx(expected, abs=0.012)


def test_single_position_tilt_is_the_exponential_tilt():
    logits, current, is_open, lw = _single_position_case(3, weights=True)
    h = torch.randn(logits.shape, generator=torch.Generator().manual_seed(4))
    q = SinglePositionStep(logits, current, is_open, lw)
    t = q.tilted(h)
    for i, xs in enumerate(_next_states(current, is_open, 4)):
        base = torch.stack([SinglePositionStep(logits[i:i + 1], current[i:i + 1], is_open[i:i + 1],
                                               lw[i:i + 1]).log_prob(x[None])[0] for x in xs])
        tilt = torch.stack([SinglePositionStep(t.logits[i:i + 1], current[i:i + 1], is_open[i:i + 1],
                                               t.log_weights[i:i + 1]).log_prob(x[None])[0] for x in xs])
        target = torch.log_softmax(base + (xs * h[i]).sum((-1, -2)), 0)
        assert torch.allclose(tilt, target, atol=1e-5)


def test_single_position_rsample_is_straight_through_and_matches_sample():
    logits, current, is_open, _ = _single_position_case(5)
    logits = logits.clone().requires_grad_(True)
    q = SinglePositionStep(logits, current, is_open, tau=0.5)
    y = q.rsample(torch.Generator().manual_seed(7))
    assert torch.equal(y.detach(), q.sample(torch.Generator().manual_seed(7)))
    (y * torch.randn_like(y)).sum().backward()
    moved = (y.detach().argmax(-1) != current.argmax(-1))
    assert (logits.grad.abs().sum(-1) > 0).eq(moved).all()  # gradient only at the moved position


def test_single_position_rejects_bad_input():
    logits, current, is_open, _ = _single_position_case(0)
    with pytest.raises(ValueError, match="at least one open position"):
        SinglePositionStep(logits, current, torch.zeros_like(is_open))
    with pytest.raises(ShapeError):
        SinglePositionStep(logits, current[:, :2], is_open)
    with pytest.raises(ValueError, match="exactly one open position"):
        SinglePositionStep(logits, current, is_open).log_prob(current)
    with pytest.raises(TypeError):
        SinglePositionStep(logits, current, is_open).kl(CategoricalStep(logits, current))


@pytest.mark.parametrize("kind", ["categorical", "single_position"])
def test_one_hot_steps_name_the_shape_or_kind_they_refuse(kind):
    logits, current, is_open, _ = _single_position_case(0)

    def make(logits, current):
        if kind == "categorical":
            return CategoricalStep(logits, current)
        return SinglePositionStep(logits, current, is_open[: logits.shape[0]])

    step = make(logits, current)
    shape = tuple(logits.shape)
    with pytest.raises(ShapeError, match=rf"log_prob's one-hot states must have shape \({shape[0]}, {shape[1]}, {shape[2]}\)"):
        step.log_prob(current[..., :-1])
    with pytest.raises(ShapeError, match="tilt field must have shape"):
        step.tilted(torch.zeros(shape[0], shape[1], shape[2] + 1))
    with pytest.raises(ShapeError, match="KL between steps of shapes"):
        step.kl(make(logits[:1], current[:1]))
    other = GaussianStep(torch.zeros(shape), 1.0)
    with pytest.raises(TypeError, match=f"KL between {type(step).__name__} and GaussianStep is not defined"):
        step.kl(other)
