import pytest
import torch

from difftilt.core import FunctionReward, RewardError, RewardOutput


def test_reward_validates_nan_and_inf_on_feasible_designs():
    r = FunctionReward(lambda x: x[:, 0] / x[:, 1], name="ratio")
    with pytest.raises(RewardError, match=r"reward 'ratio' returned NaN for 1 of 3 feasible designs \(first at index 1\)"):
        r(torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 2.0]]))
    with pytest.raises(RewardError, match="inf"):
        r(torch.tensor([[1.0, 0.0]]))


def test_nan_on_infeasible_designs_is_fine_and_masked():
    def f(x):
        feasible = x[:, 0] > 0
        return RewardOutput(torch.where(feasible, x[:, 0], torch.full_like(x[:, 0], float("nan"))), feasible)

    r = FunctionReward(f, infeasible_value=-1.0)
    out = r(torch.tensor([[2.0], [-1.0]]))
    assert out.feasible.tolist() == [True, False]
    assert out.masked(r.infeasible_value).tolist() == [2.0, -1.0]


def test_reward_shape_errors():
    r = FunctionReward(lambda x: x, name="identity")
    with pytest.raises(RewardError, match=r"shape \(3, 2\), expected \(3,\)"):
        r(torch.zeros(3, 2))


def test_reward_algebra():
    a = FunctionReward(lambda x: x[:, 0], differentiable=True, name="a")
    b = FunctionReward(lambda x: RewardOutput(x[:, 1], x[:, 1] > 0), name="b")
    combo = 2.0 * a - 0.5 * b
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    out = combo(x)
    assert out.value.tolist() == [2.0 - 1.0, 6.0 + 0.5]
    assert out.feasible.tolist() == [True, False]
    assert not combo.differentiable and (a + a).differentiable
    assert combo.weights == [2.0, -0.5]
