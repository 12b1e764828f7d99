"""difftilt sample --batch-size bounds memory, and -- as its help says -- once -n exceeds it,
the samples one seed draws depend on it (each batch's chains take the generator's draws in turn)."""

import pytest
import torch

from difftilt.core.cli import _sample_in_batches, main
from difftilt.plugins.toy.domain import make_mixture_process


def test_the_batch_size_changes_the_samples_of_one_seed_once_n_exceeds_it_and_the_help_says_so(capsys):
    process = make_mixture_process(num_steps=4)

    def draw(batch_size):
        return _sample_in_batches(process, 6, batch_size, torch.Generator().manual_seed(0), progress=False)

    assert torch.equal(draw(6), draw(1024))  # n within one batch: one call, whatever the batch size
    assert not torch.allclose(draw(3), draw(6))
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--batch-size BATCH_SIZE chains sampled at once, to bound memory; when -n exceeds it, the samples a " \
           "--seed draws depend on it too" in help_text
