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
