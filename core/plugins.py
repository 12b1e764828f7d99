"""Domain plugins and their discovery.

A domain (images, sequences, molecules, the analytic toy) is a :class:`Domain`
subclass published under the entry-point group ``difftilt.plugins``::

    [project.entry-points."difftilt.plugins"]
    mydomain = "mypackage.domain:MyDomain"

so a third-party package adds a domain without touching difftilt. The core never
imports a plugin module directly; :func:`load_plugin` resolves names through entry
points. Set ``DIFFTILT_DISABLE_PLUGIN_AUTOLOAD=1`` to keep :func:`list_plugins` from
importing every installed plugin (it then only lists names); a plugin named explicitly
is still loaded.

The toy plugin (``difftilt/plugins/toy``) is the worked example of writing one.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata as md
import inspect
import logging
import os
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .config import validate_kwargs
from .errors import ConfigError, DifftiltError, PluginNotFoundError
from .process import Process
from .reward import Reward

__all__ = ["Domain", "ENTRY_POINT_GROUP", "AUTOLOAD_ENV", "plugin_entry_points", "load_plugin", "ask_plugins",
           "list_plugins"]

ENTRY_POINT_GROUP = "difftilt.plugins"
AUTOLOAD_ENV = "DIFFTILT_DISABLE_PLUGIN_AUTOLOAD"

log = logging.getLogger(__name__)


#: Domain hooks the callers pass ``process=`` (the model the designs came from)
_TAKE_PROCESS = ("decode", "mutate", "crossover")


def _takes_keyword(function: Callable, name: str) -> bool:
    params = inspect.signature(function).parameters.values()
    return any(p.name == name and p.kind is not p.POSITIONAL_ONLY or p.kind is p.VAR_KEYWORD for p in params)


def _dropping_process(method: Callable) -> Callable:
    @functools.wraps(method)
    def call(self, *args: Any, process: Process | None = None, **kwargs: Any) -> Any:
        return method(self, *args, **kwargs)

    return call


class Domain:
    """A domain: pretrained chains, rewards, and how to read and judge samples.

    Subclasses fill the two registries with factories (functions or classes) whose
    signatures are the config schema of the ``process:`` and ``reward:`` sections:

    * :attr:`processes` -- ``name -> factory(**kwargs) -> Process``. The first entry is the
      default. A run config selects one with ``process: {name: ..., **kwargs}``.
    * :attr:`rewards` -- ``name -> factory(**kwargs) -> Reward``. A factory with a
      parameter named ``process`` receives the built process.

    and may override the networks used for fine-tuning and the evaluation hooks.
    """

    #: Entry-point name, e.g. ``"toy"``.
    name: str = "domain"
    #: One line shown by ``difftilt plugins``.
    description: str = ""
    processes: dict[str, Callable[..., Process]] = {}
    rewards: dict[str, Callable[..., Reward]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # ``process`` was added to these hooks after plugins overrode them without it: such an
        # override is called without the keyword (it never needed the model to read designs)
        super().__init_subclass__(**kwargs)
        for name in _TAKE_PROCESS:
            method = cls.__dict__.get(name)
            if callable(method) and not _takes_keyword(method, "process"):
                setattr(cls, name, _dropping_process(method))

    # ------------------------------------------------------------------ building
    def _build(self, registry: dict[str, Callable], spec: Any, section: str, extra: dict | None = None) -> Any:
        if spec is None:
            spec = {}
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, dict):
            raise ConfigError(f"{section}: expected a mapping with a 'name', got {type(spec).__name__}")
        options = dict(spec)
        if not registry:
            raise ConfigError(f"plugin '{self.name}' provides no {section}")
        name = options.pop("name", next(iter(registry)))
        if name not in registry:
            close = difflib.get_close_matches(str(name), list(registry), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"{section}.name: plugin '{self.name}' has no {section} '{name}'{hint}; known: {', '.join(registry)}"
            )
        factory = registry[name]
        extra = {k: v for k, v in (extra or {}).items() if k in inspect.signature(factory).parameters}
        kwargs = validate_kwargs(factory, options, section, skip=tuple(extra))
        return factory(**kwargs, **extra)

    def make_process(self, spec: dict | str | None = None) -> Process:
        """Build a pretrained chain from ``{"name": ..., **kwargs}`` (validated)."""
        return self._build(self.processes, spec, "process")

    def make_reward(self, spec: dict | str | None, process: Process | None = None) -> Reward:
        """Build a reward from ``{"name": ..., **kwargs}`` (validated)."""
        return self._build(self.rewards, spec, "reward", {"process": process})

    # ------------------------------------------------------------------ fine-tuning networks
    def make_policy(self, reference: Process, hidden: int = 64, depth: int = 2) -> Process | None:
        """The trainable chain for ``reference``; ``None`` uses the core default (a
        :class:`~difftilt.core.nets.TimeMLP` tilt). Domains with large states override it."""
        return None

    def make_value_net(self, reference: Process) -> nn.Module | None:
        """The network ``v(x_0)``; ``None`` uses the core default."""
        return None

    def featurizer(self, reference: Process) -> nn.Module | None:
        """Differentiable features ``phi(x)``: ``(b, *event_shape) -> (b, d)`` for reward models
        (online fine-tuning). ``None`` uses the flattened state. Keyword options a domain adds
        here are the online config's ``features`` section. A featurizer may define
        ``canonical(x)``, one representative of each set of designs the oracle cannot tell
        apart: the online loop then never asks about two designs of one set."""
        return None

    # ------------------------------------------------------------------ model-free baselines
    def mutate(self, x: Tensor, *, generator: torch.Generator, rate: float | None = None, count: int | None = None,
               process: Process | None = None) -> Tensor:
        """Random edits of designs ``x`` ``(b, *event_shape)`` for the ``ga`` and ``hill_climb``
        baselines: each position changed with probability ``rate``, or exactly ``count``
        positions per design. ``process``: the model the designs are read with (e.g. a
        sequence model's padding letter). Domains with discrete designs implement it."""
        raise ConfigError(f"plugin '{self.name}' has no mutation operator, which the ga and hill_climb methods need")

    def crossover(self, a: Tensor, b: Tensor, *, generator: torch.Generator, process: Process | None = None) -> Tensor:
        """Uniform crossover: each position (index along dimension 1) from ``a`` or ``b`` with
        equal probability; ``(b, *event_shape)``. ``process``: as in :meth:`mutate`."""
        take_a = torch.rand(a.shape[:2], generator=generator) < 0.5
        return torch.where(take_a.view(*a.shape[:2], *[1] * (a.dim() - 2)).to(a.device), a, b)

    # ------------------------------------------------------------------ pretraining
    def pretrain(self, config: dict, progress: bool = True, output: str | None = None,
                 command: str | None = None, resume: bool = False) -> "os.PathLike":
        """Train this domain's default model from a pretraining config (``difftilt pretrain``)
        and return the folder written; ``command``, the command that reproduces it, is
        recorded there. ``resume``: continue a pretraining that was stopped
        (``difftilt pretrain --resume``; only passed when asked, so a plugin that cannot
        resume need not take it). Domains without a trainable default raise."""
        raise ConfigError(f"plugin '{self.name}' has no pretrain command")

    def describe_folder(self, path: "os.PathLike") -> list[str] | None:
        """Where a folder this domain's :meth:`pretrain` writes stands, in lines (a pretraining
        under way or stopped: its step, losses and how to continue it; a finished model), else
        ``None`` (``difftilt show`` asks each installed plugin about a folder that is no run)."""
        return None

    def load_folder(self, path: "os.PathLike") -> Process | None:
        """The pretrained model in ``path`` if it is a folder this domain's :meth:`pretrain`
        writes, else ``None`` (``difftilt sample`` asks each installed plugin)."""
        return None

    # ------------------------------------------------------------------ reading samples
    def decode(self, x: Tensor, process: Process | None = None) -> list:
        """Domain objects for a batch of final states (images, strings, molecules); ``process``,
        the model that drew them, where the states alone do not say how to read them (a
        sequence model's own alphabet). Domains whose designs are text return ``str``: the
        online loop then writes each method's designs, as asked, to ``designs.csv``."""
        return [row for row in x.detach().cpu()]

    def diversity(self, x: Tensor) -> float:
        """Diversity of a batch of samples; the default is the mean pairwise Euclidean
        distance of (up to 512) flattened samples. Domains override it (e.g. Hamming
        distance for sequences, Tanimoto for molecules)."""
        flat = x.detach().reshape(x.shape[0], -1).float()[:512]
        n = flat.shape[0]
        if n < 2:
            return 0.0
        return float(torch.cdist(flat, flat).sum() / (n * (n - 1)))

    def evaluate(self, x: Tensor, *, process: Process, reward: Reward, alpha: float) -> dict[str, float]:
        """Domain metrics of samples ``x`` of a model fine-tuned on ``reward`` with ``alpha``
        (diversity, distances to known optima, ...). Plain floats only."""
        return {}


def plugin_entry_points() -> dict[str, md.EntryPoint]:
    """Installed plugins by name, without importing them."""
    return {ep.name: ep for ep in md.entry_points(group=ENTRY_POINT_GROUP)}


def load_plugin(name: str) -> Domain:
    """Import and instantiate the plugin ``name``.

    Raises:
        PluginNotFoundError: no installed plugin has that name.
    """
    eps = plugin_entry_points()
    if name not in eps:
        close = difflib.get_close_matches(name, list(eps), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        installed = ", ".join(sorted(eps)) or "none"
        raise PluginNotFoundError(f"unknown plugin '{name}'{hint}; installed plugins: {installed}")
    ep = eps[name]
    factory = ep.load()
    domain = factory() if callable(factory) else factory
    if not isinstance(domain, Domain):
        raise PluginNotFoundError(f"plugin '{name}' ({ep.value}) did not produce a difftilt Domain")
    log.info("loaded plugin %s from %s", name, ep.value)
    return domain


def ask_plugins(ask: Callable[[Domain], Any], tried: list[str] | None = None) -> tuple[Domain, Any] | None:
    """``(domain, answer)`` of the first installed plugin, by name, whose ``ask(domain)`` is not
    ``None`` (which one reads a model folder, say), else ``None``. A plugin that fails to load
    or to answer is passed over, so that a broken plugin does not hide the one that knows; a
    difftilt error (a folder it knows but cannot read) is raised. ``tried`` collects the names
    asked, with why a plugin was passed over."""
    for name in sorted(plugin_entry_points()):
        try:
            domain = load_plugin(name)
        except Exception as err:
            if tried is not None:
                tried.append(f"{name} (failed to load: {type(err).__name__})")
            continue
        try:
            answer = ask(domain)
        except DifftiltError:
            raise
        except Exception as err:
            if tried is not None:
                tried.append(f"{name} (failed: {type(err).__name__}: {err})")
            continue
        if answer is not None:
            return domain, answer
        if tried is not None:
            tried.append(name)
    return None


def list_plugins() -> list[dict[str, str]]:
    """``[{"name", "target", "description"}]`` for every installed plugin.

    Imports each plugin to read its description unless plugin autoloading is disabled
    through ``DIFFTILT_DISABLE_PLUGIN_AUTOLOAD``; a plugin that fails to import is
    listed with the error as its description.
    """
    rows = []
    autoload = os.environ.get(AUTOLOAD_ENV, "").strip().lower() in ("", "0", "false", "no")
    for name, ep in sorted(plugin_entry_points().items()):
        desc = ""
        if autoload:
            try:
                desc = load_plugin(name).description
            except Exception as err:  # a broken third-party plugin must not break listing
                desc = f"(failed to load: {type(err).__name__}: {err})"
        rows.append({"name": name, "target": ep.value, "description": desc})
    return rows
