import pytest
import torch

from difftilt.core.errors import ConfigError, InputDataError, ShapeError
from difftilt.plugins.sequences.ehrlich import EhrlichFunction

PARAMS = dict(num_states=20, length=32, num_motifs=2, motif_length=4)


@pytest.fixture(scope="module")
def fn():
    return EhrlichFunction(**PARAMS, seed=0)


def _outside_state(f: EhrlichFunction) -> int:
    """A state used by no motif."""
    used = set(f.motifs.flatten().tolist())
    return next(s for s in range(f.num_states) if s not in used)


def _partial_motif(f: EhrlichFunction, num_present: int) -> torch.Tensor:
    """``(1, L)``: the first ``num_present`` elements of motif 0 at their offsets, else a non-motif state."""
    x = torch.full((1, f.length), _outside_state(f), dtype=torch.long)
    start = 3
    for j in range(num_present):
        x[0, start + f.spacings[0, j]] = f.motifs[0, j]
    return x


def test_same_params_same_instance_and_another_seed_differs():
    a, b = EhrlichFunction(**PARAMS, seed=7), EhrlichFunction(**PARAMS, seed=7)
    assert torch.equal(a.transition_matrix, b.transition_matrix)
    assert torch.equal(a.motifs, b.motifs) and torch.equal(a.spacings, b.spacings)
    assert torch.equal(a.optimal_solution(), b.optimal_solution())
    c = EhrlichFunction(**PARAMS, seed=8)
    assert not torch.equal(a.transition_matrix, c.transition_matrix)
    assert not (torch.equal(a.motifs, c.motifs) and torch.equal(a.spacings, c.spacings))
    assert EhrlichFunction(**a.config()).config() == a.config()
    assert a.config() == {**PARAMS, "quantization": 4, "seed": 7}


def test_transition_matrix_is_stochastic_sparse_and_ergodic(fn):
    P = fn.transition_matrix
    v = fn.num_states
    assert P.shape == (v, v) and fn.initial_dist.shape == (v,)
    assert torch.allclose(P.sum(1), torch.ones(v), atol=1e-6)
    assert (P >= 0).all() and (P == 0).any()  # some transitions are forbidden
    assert (P.diagonal() > 0).all()  # repeats are always allowed
    # irreducible: breadth-first search reaches every state from every state
    adj = (P > 0).tolist()
    for s in range(v):
        seen, frontier = {s}, [s]
        while frontier:
            frontier = [t for u in frontier for t in range(v) if adj[u][t] and t not in seen]
            seen.update(frontier)
        assert len(seen) == v
    pi = fn.stationary_dist
    assert torch.allclose(pi @ P, pi, atol=1e-5) and abs(float(pi.sum()) - 1) < 1e-5


def test_motifs_and_spacings_have_the_holo_bench_shape(fn):
    c, k, L = fn.num_motifs, fn.motif_length, fn.length
    assert fn.motifs.shape == (c, k) and fn.spacings.shape == (c, k)
    assert (fn.spacings[:, 0] == 0).all() and (fn.spacings.diff(dim=1) >= 1).all()
    assert (fn.spacings[:, -1] <= L // c - 1).all()
    # motifs come from one DMP path: every step inside and across motifs is allowed
    path = fn.motifs.flatten()
    assert (fn.transition_matrix[path[:-1], path[1:]] > 0).all()


def test_sampled_sequences_are_feasible_and_reproducible(fn):
    x = fn.sample_feasible(256, generator=torch.Generator().manual_seed(3))
    assert x.shape == (256, fn.length) and x.dtype == torch.long
    assert fn.is_feasible(x).all()
    assert torch.equal(x, fn.sample_feasible(256, generator=torch.Generator().manual_seed(3)))
    assert fn.sample_feasible(0).shape == (0, fn.length)


def test_forbidden_transition_is_infeasible_with_value_zero(fn):
    i, j = map(int, (fn.transition_matrix == 0).nonzero()[0])
    x = torch.full((1, fn.length), i)
    x[0, fn.length // 2 :] = j
    value, feasible = fn(x)
    assert not feasible.item() and value.item() == 0.0
    # the same motifs in a feasible context would score: infeasibility alone zeroes it
    opt = fn.optimal_solution()
    broken = torch.stack([opt, opt])
    last = fn.length - 1
    banned = int((fn.transition_matrix[opt[last - 1]] == 0).nonzero()[0])
    broken[1, last] = banned
    value, feasible = fn(broken)
    assert feasible.tolist() == [True, False] and value[1].item() == 0.0


def test_optimal_solution_scores_one(fn):
    others = [EhrlichFunction(**PARAMS, seed=s) for s in range(1, 8)]
    others += [EhrlichFunction(32, 64, 4, 4, seed=1), EhrlichFunction(5, 7, 1, 3, quantization=1, seed=2)]
    for f in [fn, *others]:
        x = f.optimal_solution()
        assert x.shape == (f.length,)
        value, feasible = f(x[None])
        assert feasible.item() and value.item() == 1.0
        assert (f.motif_presence(x[None]) == 1.0).all()


def test_half_a_motif_gives_quality_one_half(fn):
    x = _partial_motif(fn, 2)  # 2 of the 4 elements of motif 0, correctly spaced
    pres = fn.motif_presence(x)
    assert pres.shape == (1, 2) and pres[0, 0].item() == 0.5
    value, _ = fn(x)
    assert pres[0, 1].item() == 0.0  # no element of motif 1 at a usable position (seed 0)
    assert value.item() == 0.0  # the product over motifs


def test_quantization_rounds_down():
    expected = {4: [0.0, 0.25, 0.5, 0.75, 1.0], 2: [0.0, 0.0, 0.5, 0.5, 1.0], 1: [0.0, 0.0, 0.0, 0.0, 1.0],
                3: [0.0, 0.0, 1 / 3, 2 / 3, 1.0]}
    for q, want in expected.items():
        f = EhrlichFunction(**PARAMS, quantization=q, seed=0)
        x = torch.cat([_partial_motif(f, n) for n in range(5)])
        got = f.motif_presence(x)[:, 0]
        assert torch.allclose(got, torch.tensor(want)), (q, got)
    assert EhrlichFunction(**PARAMS).quantization == PARAMS["motif_length"]


def test_value_is_the_product_of_motif_qualities(fn):
    opt = fn.optimal_solution()
    # motif 1 follows motif 0: repeat the last state of motif 0 over it (repeats are allowed)
    start = int(fn.spacings[0, -1]) + 1
    no_motif_1 = opt.clone()
    no_motif_1[start:] = opt[start - 1]
    x = torch.cat([opt[None], no_motif_1[None], fn.sample_feasible(64, torch.Generator().manual_seed(5))])
    value, feasible = fn(x)
    pres = fn.motif_presence(x)
    assert feasible.all()
    assert torch.equal(value, pres.prod(1))
    assert value[0].item() == 1.0
    assert pres[1, 0].item() == 1.0 and pres[1, 1].item() < 1.0 and value[1].item() < 1.0


def test_random_feasible_sequences_rarely_score_one(fn):
    x = fn.sample_feasible(512, generator=torch.Generator().manual_seed(0))
    value, feasible = fn(x)
    assert feasible.all()
    assert (value < 1).float().mean() > 0.95
    assert ((value >= 0) & (value <= 1)).all()
    uniform = torch.randint(fn.num_states, (512, fn.length), generator=torch.Generator().manual_seed(0))
    assert fn.is_feasible(uniform).float().mean() < 0.2  # the feasible set is small


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(num_states=20, length=7, num_motifs=2, motif_length=4), "8"),
        (dict(num_states=20, length=32, num_motifs=2, motif_length=4, quantization=5), "5"),
        (dict(num_states=20, length=32, num_motifs=2, motif_length=4, quantization=0), "0"),
        (dict(num_states=1, length=32, num_motifs=2, motif_length=4), "num_states"),
        (dict(num_states=20, length=32.0, num_motifs=2, motif_length=4), "length"),
        (dict(num_states=20, length=32, num_motifs=0, motif_length=4), "num_motifs"),
        (dict(num_states=20, length=32, num_motifs=2, motif_length=True), "motif_length"),
        (dict(num_states=20, length=32, num_motifs=2, motif_length=4, seed=-1), "seed"),
    ],
)
def test_bad_parameters_raise_config_error(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        EhrlichFunction(**kwargs)


def test_bad_sequences_raise_shape_error(fn):
    good = fn.optimal_solution()[None]
    with pytest.raises(ShapeError, match=r"\(batch, 32\).*\(1, 31\)"):
        fn(good[:, :-1])
    with pytest.raises(ShapeError, match="batch"):
        fn.is_feasible(good[0])
    with pytest.raises(ShapeError, match="dtype"):
        fn.motif_presence(good.float())
    too_big = good.clone()
    too_big[0, 0] = 20
    with pytest.raises(InputDataError, match=r"\[0, 20\).*20"):
        fn(too_big)
    negative = good.clone()
    negative[0, 5] = -1
    with pytest.raises(InputDataError, match="-1"):
        fn.is_feasible(negative)
    with pytest.raises(ConfigError):
        fn.sample_feasible(-1)


def test_the_pretraining_corpus_depends_on_states_length_and_seed_only():
    """Why the sequences benchmark runs Ehrlich (20, 32, 4, 4) on the (20, 32, 2, 4) default model."""
    from difftilt.plugins.sequences.pretrain_cli import ehrlich_corpus

    two, _, _ = ehrlich_corpus(20, 32, 2, 4, seed=0, num_sequences=500, data_seed=0)
    four, _, _ = ehrlich_corpus(20, 32, 4, 4, seed=0, num_sequences=500, data_seed=0)
    assert torch.equal(two, four)
    f2, f4 = EhrlichFunction(20, 32, 2, 4, seed=0), EhrlichFunction(20, 32, 4, 4, seed=0)
    assert torch.equal(f2.transition_matrix, f4.transition_matrix) and f4.motifs.shape == (4, 4)
    other, _, _ = ehrlich_corpus(20, 32, 2, 4, seed=1, num_sequences=500, data_seed=0)
    assert not torch.equal(two, other)
