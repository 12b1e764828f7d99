import pytest
import torch

from difftilt.core.plugins import Domain


class _Letters(Domain):
    """A plugin written before the hooks took ``process``: its overrides lack the keyword."""

    name = "letters"

    def decode(self, x):
        return ["".join("AB"[int(v)] for v in row) for row in x]

    def mutate(self, x, *, generator, rate=None, count=None):
        return 1 - x

    def crossover(self, a, b, *, generator):
        return a


class _Aware(_Letters):
    def mutate(self, x, *, generator, rate=None, count=None, process=None):
        return x if process == "keep" else 1 - x


def test_hooks_without_the_process_keyword_are_called_without_it():
    domain, g = _Letters(), torch.Generator()
    x = torch.tensor([[0, 1, 1]])
    assert domain.decode(x, process="model") == ["ABB"]
    assert torch.equal(domain.mutate(x, generator=g, count=1, process="model"), 1 - x)
    assert torch.equal(domain.crossover(x, 1 - x, generator=g, process="model"), x)
    # an override that takes it still gets it; the inherited ones are left as they were
    aware = _Aware()
    assert torch.equal(aware.mutate(x, generator=g, process="keep"), x)
    assert aware.decode(x, process="model") == ["ABB"]


def test_ask_plugins_passes_over_a_broken_plugin_and_says_why(monkeypatch):
    """Which installed plugin reads a folder (difftilt sample, show): the first that answers,
    a plugin that fails to load or to answer passed over, a difftilt error raised."""
    from types import SimpleNamespace

    from difftilt.core import plugins
    from difftilt.core.errors import CheckpointError

    def answers(value):
        def ask():
            if isinstance(value, Exception):
                raise value
            return value
        return SimpleNamespace(ask=ask)

    installed = {"a": ImportError("no module"), "b": answers(KeyError("x")), "c": answers(None), "d": answers("yes"),
                 "e": answers("too late")}

    def load(name):
        if isinstance(installed[name], Exception):
            raise installed[name]
        return installed[name]

    monkeypatch.setattr(plugins, "plugin_entry_points", lambda: dict.fromkeys(installed))
    monkeypatch.setattr(plugins, "load_plugin", load)
    tried = []
    assert plugins.ask_plugins(lambda domain: domain.ask(), tried) == (installed["d"], "yes")
    assert tried == ["a (failed to load: ImportError)", "b (failed: KeyError: 'x')", "c"]
    installed["b"] = answers(CheckpointError("a folder it knows but cannot read"))
    with pytest.raises(CheckpointError, match="cannot read"):
        plugins.ask_plugins(lambda domain: domain.ask())
    installed.update(b=answers(None), d=answers(None), e=answers(None))
    assert plugins.ask_plugins(lambda domain: domain.ask()) is None
