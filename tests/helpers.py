"""Small exact chains shared by the tests, and the devices to run the device tests on."""

import pytest
import torch
from torch import nn

from difftilt.core import BrownianProcess, ControlledProcess, ResidualControlProcess


# Tests parametrized over DEVICES also run on a CUDA GPU where torch sees one (CI has none:
# there they are skipped). conftest hides GPUs unless CUDA_VISIBLE_DEVICES is set:
# `CUDA_VISIBLE_DEVICES=0 pytest -k cuda` runs only those.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


class ConstantControl(nn.Module):
    """h(x, t_k) = theta_k, one trainable vector per step: the simplest exact control."""

    def __init__(self, num_steps: int, dim: int, init: float = 0.0):
        super().__init__()
        self.num_steps = num_steps
        self.theta = nn.Parameter(torch.full((num_steps, dim), float(init)))

    def forward(self, x, t):
        k = int(round(float(t) * self.num_steps))
        return self.theta[k].expand_as(x)


def brownian_controlled(K: int = 4, d: int = 2, init: float = 0.0) -> ControlledProcess:
    """Reference: x_{k+1} = x_k + s eps, x_0 = 0, s = sqrt(1/K); policy: tilt by theta_k."""
    ref = BrownianProcess((d,), K)
    return ControlledProcess(ref, ResidualControlProcess(ref, ConstantControl(K, d, init)))


def plain_context(process, reward, alpha, x0, seed=0, step=None):
    """An UpdateContext without Lightning that keeps gradients for inspection."""
    from difftilt.core import UpdateContext

    return UpdateContext(process=process, reward=reward, alpha=alpha, x0=x0, seed=seed,
                         backward=lambda loss: loss.backward(), optimizer_step=step or (lambda: 0.0))
