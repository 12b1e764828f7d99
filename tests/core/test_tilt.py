"""The importance estimate of J's exact maximizer p* ∝ p exp(r / alpha) (estimate_tilt)."""

import math

import pytest
import torch

from difftilt.core.errors import ConfigError
from difftilt.core.finetune import estimate_tilt, tilt_weights


def _exact(p: list[float], r: list[float], alpha: float) -> dict[str, float]:
    z = sum(pi * math.exp(ri / alpha) for pi, ri in zip(p, r))
    q = [pi * math.exp(ri / alpha) / z for pi, ri in zip(p, r)]
    return {"reward": sum(qi * ri for qi, ri in zip(q, r)),
            "kl": sum(qi * math.log(qi / pi) for qi, pi in zip(q, p)),
            "objective": alpha * math.log(z)}


@pytest.mark.parametrize("alpha", [0.3, 1.0, 4.0])
def test_samples_that_are_the_support_in_proportion_give_the_exact_tilt(alpha):
    # p = (1/2, 1/4, 1/4) on three designs, as the four samples a, a, b, c
    est = estimate_tilt(torch.tensor([0.0, 0.0, 1.0, 2.5]), alpha)
    exact = _exact([0.5, 0.25, 0.25], [0.0, 1.0, 2.5], alpha)
    for key in ("reward", "kl", "objective"):
        assert est[key] == pytest.approx(exact[key], rel=1e-9, abs=1e-12)
    assert est["reward"] - alpha * est["kl"] == pytest.approx(est["objective"], rel=1e-9)
    truth = estimate_tilt(torch.tensor([0.0, 0.0, 1.0, 2.5]), alpha, others={"t": torch.tensor([1.0, 1.0, 0.0, 3.0])})
    z = 0.5 + 0.25 * math.exp(1.0 / alpha) + 0.25 * math.exp(2.5 / alpha)
    assert truth["t"] == pytest.approx((0.5 + 0.75 * math.exp(2.5 / alpha)) / z, rel=1e-9)  # E_{p*}[t]
    w = tilt_weights(torch.tensor([0.0, 0.0, 1.0, 2.5]), alpha)
    assert float(w.sum()) == pytest.approx(1.0) and est["ess"] == pytest.approx(float(1 / (w ** 2).sum()))


def test_a_constant_reward_leaves_the_model_where_it_is():
    est = estimate_tilt(torch.full((50,), 0.7), 0.01)
    assert est["kl"] == pytest.approx(0.0, abs=1e-9) and est["ess"] == pytest.approx(50.0)
    assert est["reward"] == pytest.approx(0.7) and est["objective"] == pytest.approx(0.7)


def test_a_gaussian_tilt_matches_its_closed_form():
    # x ~ N(0, 1), r = b x: p* = N(b / alpha, 1), KL = b^2 / (2 alpha^2), J* = b^2 / (2 alpha)
    x = torch.randn(400_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    b, alpha = 0.5, 0.5
    est = estimate_tilt(b * x, alpha)
    assert est["kl"] == pytest.approx(b ** 2 / (2 * alpha ** 2), rel=0.03)
    assert est["objective"] == pytest.approx(b ** 2 / (2 * alpha), rel=0.03)
    assert est["reward"] == pytest.approx(b * b / alpha, rel=0.03)
    assert est["ess"] == pytest.approx(len(x) * math.exp(-(b / alpha) ** 2), rel=0.05)


def test_bad_input_is_refused():
    with pytest.raises(ConfigError, match="alpha must be a positive number"):
        estimate_tilt(torch.zeros(3), 0.0)
    with pytest.raises(ValueError, match="finite"):
        estimate_tilt(torch.tensor([0.0, float("nan")]), 1.0)
    with pytest.raises(ValueError, match="1-D"):
        estimate_tilt(torch.zeros(2, 2), 1.0)
    with pytest.raises(ValueError, match=r"others\['t'\]: \(2,\) values for 3 samples"):
        estimate_tilt(torch.zeros(3), 1.0, others={"t": torch.zeros(2)})
