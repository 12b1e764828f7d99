"""ELEGANT end to end against closed-form answers.

For data N(0, 1) every noised marginal is N(0, 1), the exact score is -x, and each DDIM
step is linear: ``x_{k+1} = c_k x_k + s_k eps``. With ``r(x) = x`` and ``alpha = 1``
everything is Gaussian and known exactly for the K-step chain (not just in the
continuous limit), with ``D_k = prod_{j>k} c_j`` and ``C_0 = prod_k c_k``:

* pretrained: ``x_K ~ N(0, V)``, ``V = C_0^2 + sum_k D_k^2 s_k^2``;
* optimal control: tilt ``h_k = D_k`` (a Gaussian stays Gaussian under a linear tilt);
* soft value ``v*(x_0) = C_0 x_0 + const``, so ``nu* = N(C_0, 1)``;
* drift-only optimum (``x_0 ~ N(0, 1)``): ``x_K ~ N(sum_k D_k^2 s_k^2, V)``;
* full optimum: ``x_K ~ N(V, V)``, the exact tilt ``p_pre(x) e^x``.

With ``eta = 0.3`` the two differ by ``C_0^2 ≈ 0.57``.
"""

import pytest
import torch

from difftilt.core import Finetuner, sample_trajectories
from difftilt.plugins.toy import LinearReward, make_mixture_process
from tests.helpers import DEVICES


def _closed_form(process):
    c = (process.c_x - process.c_score).double()  # step mean = c_k x for score(x) = -x
    s2 = process.sigma.double() ** 2
    K = len(c)
    D = torch.stack([torch.prod(c[k + 1:]) for k in range(K)])
    C0 = torch.prod(c)
    drift_mean = float((D**2 * s2).sum())
    return {"C0": float(C0), "V": float(C0**2) + drift_mean, "drift_mean": drift_mean}


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_elegant_matches_the_closed_form_linear_gaussian_optimum(device):
    process = make_mixture_process(weights=[1.0], means=[[0.0]], stds=1.0, num_steps=20, eta=0.3)
    exact = _closed_form(process)
    ft = Finetuner(process, LinearReward([1.0]), alpha=1.0, iterations=150, batch_size=256,
                   value_refit_iterations=150, initial_iterations=200, initial_steps=20, progress=False, seed=0,
                   accelerator="gpu" if device == "cuda" else "cpu")
    result = ft.fit()
    assert result.model.device == torch.device("cpu")  # trained on the device, handed back on the CPU

    n = 40_000  # Monte-Carlo standard errors ~0.005
    x = result.sample(n, seed=1).squeeze(-1).double()
    drift = sample_trajectories(result.transitions, n, seed=2).x.squeeze(-1).double()
    pre = process.sample(n, generator=torch.Generator().manual_seed(3)).squeeze(-1).double()
    assert pre.var().item() == pytest.approx(exact["V"], abs=0.03)
    # drift-only reaches its own (biased) optimum, full ELEGANT the exact tilt
    assert drift.mean().item() == pytest.approx(exact["drift_mean"], abs=0.03)
    assert x.mean().item() == pytest.approx(exact["V"], abs=0.03)
    assert x.var().item() == pytest.approx(exact["V"], abs=0.04)
    assert exact["V"] - exact["drift_mean"] > 0.5  # the gap the initial law closes
    # the learned soft value has the exact slope C_0 (v is only defined up to a constant)
    with torch.no_grad():
        v = result.value_net(torch.tensor([[-1.0], [1.0]])).squeeze(-1)
    assert (v[1] - v[0]).item() / 2 == pytest.approx(exact["C0"], abs=0.05)
    assert {r["stage"] for r in result.history} == {"transitions", "value", "initial"}
