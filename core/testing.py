"""A contract test suite every domain plugin should pass.

Subclass :class:`DomainContract` in your plugin's tests and supply the plugin and
small specs; pytest collects the inherited tests::

    from difftilt.core.testing import DomainContract

    class TestMyDomain(DomainContract):
        plugin = "mydomain"
        process_spec = {"name": "small", "num_steps": 4}
        reward_spec = {"name": "score"}

The tests check what the core relies on: step shapes, zero KL of an untrained policy
against its reference, reward shapes and validation, decoding, clear errors for
unknown names, and a save/load round trip of a (briefly) fine-tuned model.
"""

from __future__ import annotations

from typing import Any

import torch

from .checkpoint import load_finetuned, save_finetuned
from .distributions import StepDistribution
from .errors import ConfigError
from .finetune import Finetuner, default_policy
from .plugins import Domain, load_plugin, plugin_entry_points
from .process import ControlledProcess
from .rollout import sample_trajectories

__all__ = ["DomainContract"]


class DomainContract:
    """Mix-in of contract tests; set :attr:`plugin`, :attr:`process_spec`, :attr:`reward_spec`."""

    plugin: str = ""
    process_spec: dict[str, Any] | None = None
    reward_spec: dict[str, Any] | str = ""
    batch_size: int = 4
    #: options for the tiny fine-tuning run of the round-trip test
    finetune_options: dict[str, Any] = {"iterations": 2, "batch_size": 4, "value_refit_iterations": 1,
                                        "initial_iterations": 2, "initial_steps": 3, "initial_batch_size": 4,
                                        "progress": False}

    def domain(self) -> Domain:
        return load_plugin(self.plugin)

    def test_plugin_is_registered_under_the_entry_point_group(self):
        assert self.plugin in plugin_entry_points()
        domain = self.domain()
        assert isinstance(domain, Domain) and domain.name == self.plugin
        assert domain.processes and domain.rewards

    def test_step_shapes(self):
        proc = self.domain().make_process(self.process_spec)
        x = proc.initial(self.batch_size)
        proc.check_state(x)
        for k in range(proc.num_steps):
            step = proc.step(x, k)
            assert isinstance(step, StepDistribution) and step.batch_size == self.batch_size
            x = step.sample()
            proc.check_state(x)

    def test_untrained_policy_has_zero_kl_to_its_reference(self):
        domain = self.domain()
        proc = domain.make_process(self.process_spec)
        policy = domain.make_policy(proc) or default_policy(proc)
        traj = sample_trajectories(ControlledProcess(proc, policy), self.batch_size, seed=0, kl=True)
        assert torch.allclose(traj.kl, torch.zeros_like(traj.kl), atol=1e-6)

    def test_reward_shapes(self):
        domain = self.domain()
        proc = domain.make_process(self.process_spec)
        reward = domain.make_reward(self.reward_spec, proc)
        out = reward(proc.sample(self.batch_size))
        assert out.value.shape == (self.batch_size,) and out.feasible.shape == (self.batch_size,)
        assert out.feasible.dtype == torch.bool

    def test_decode_returns_one_object_per_sample(self):
        domain = self.domain()
        proc = domain.make_process(self.process_spec)
        assert len(domain.decode(proc.sample(self.batch_size))) == self.batch_size

    def test_unknown_names_are_clear_errors(self):
        domain = self.domain()
        try:
            domain.make_process({"name": "no-such-process"})
        except ConfigError as err:
            assert "no-such-process" in str(err)
        else:  # pragma: no cover - the assertion documents the contract
            raise AssertionError("an unknown process name must raise ConfigError")
        try:
            domain.make_reward({"name": "no-such-reward"})
        except ConfigError as err:
            assert "no-such-reward" in str(err)
        else:  # pragma: no cover
            raise AssertionError("an unknown reward name must raise ConfigError")

    def test_finetuned_model_save_load_round_trip(self, tmp_path):
        domain = self.domain()
        proc = domain.make_process(self.process_spec)
        reward = domain.make_reward(self.reward_spec, proc)
        strategy = "backprop" if reward.differentiable else "policy_gradient"
        ft = Finetuner(proc, reward, alpha=1.0, strategy=strategy, policy=domain.make_policy(proc),
                       value_net=domain.make_value_net(proc), **self.finetune_options)
        result = ft.fit()
        spec = self.process_spec or {"name": next(iter(domain.processes))}
        save_finetuned(result, tmp_path / "model", plugin=self.plugin, process=spec)
        back = load_finetuned(tmp_path / "model")
        assert torch.allclose(back.sample(self.batch_size, seed=3), result.sample(self.batch_size, seed=3), atol=1e-5)
