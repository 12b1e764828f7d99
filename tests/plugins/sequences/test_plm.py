"""ESMReward on a tiny random-initialized ESM-2 (no weights are downloaded)."""

from argparse import Namespace

import pytest
import torch

esm = pytest.importorskip("esm")

from difftilt.core.errors import ConfigError, InputDataError  # noqa: E402
from difftilt.plugins.sequences import PROTEIN  # noqa: E402
from difftilt.plugins.sequences.plm import ESMReward  # noqa: E402


def _one_hot(ids, vocab=20):
    return torch.nn.functional.one_hot(ids, vocab + 1).float()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = esm.ESM2(num_layers=1, embed_dim=32, attention_heads=2, alphabet="ESM-1b")
    return model.eval(), model.alphabet


def _hand_tokens(alphabet, seq):
    return torch.tensor([[alphabet.cls_idx] + [alphabet.get_idx(c) for c in seq] + [alphabet.eos_idx]])


def test_shape_and_mean_logprob_is_the_hand_computation(tiny):
    model, alphabet = tiny
    reward = ESMReward(model=model, alphabet=alphabet)
    assert reward.differentiable
    ids = torch.randint(0, 20, (3, 9), generator=torch.Generator().manual_seed(1))
    out = reward(_one_hot(ids))
    assert out.value.shape == (3,) and torch.isfinite(out.value).all() and out.feasible.all()

    seq = "".join(PROTEIN[i] for i in ids[0].tolist())
    tokens = _hand_tokens(alphabet, seq)
    with torch.no_grad():
        logp = model(tokens)["logits"].log_softmax(-1)[0]
    hand = sum(float(logp[1 + l, tokens[0, 1 + l]]) for l in range(len(seq))) / len(seq)
    assert out.value[0].item() == pytest.approx(hand, abs=1e-5)


def test_pseudo_log_likelihood_is_the_hand_loop(tiny):
    model, alphabet = tiny
    reward = ESMReward(model=model, alphabet=alphabet, score="pseudo_log_likelihood", batch_size=4)
    assert not reward.differentiable
    seqs = ["MKVLA", "WYCHP"]
    ids = torch.tensor([[PROTEIN.index(c) for c in s] for s in seqs])
    out = reward(_one_hot(ids))
    for row, seq in enumerate(seqs):
        tokens = _hand_tokens(alphabet, seq)
        total = 0.0
        for l in range(len(seq)):
            masked = tokens.clone()
            masked[0, 1 + l] = alphabet.mask_idx
            with torch.no_grad():
                logp = model(masked)["logits"].log_softmax(-1)[0, 1 + l]
            total += float(logp[tokens[0, 1 + l]])
        assert out.value[row].item() == pytest.approx(total / len(seq), abs=1e-5)


def test_differentiable_path_matches_token_path_and_passes_gradients(tiny):
    model, alphabet = tiny
    reward = ESMReward(model=model, alphabet=alphabet, batch_size=3)
    ids = torch.randint(0, 20, (5, 16), generator=torch.Generator().manual_seed(2))
    x = _one_hot(ids).requires_grad_()
    value = reward(x).value
    with torch.no_grad():
        by_tokens = reward._mean_logprob_tokens(ids, torch.full((5,), 16))
    torch.testing.assert_close(value.detach(), by_tokens, atol=1e-4, rtol=0)
    value.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad[..., :20].abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())  # the language model stays frozen


def test_masked_designs_are_infeasible_and_bad_shapes_rejected(tiny):
    model, alphabet = tiny
    for score in ("mean_logprob", "pseudo_log_likelihood"):
        ids = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(3))
        ids[1, 2] = 20  # still masked
        out = ESMReward(model=model, alphabet=alphabet, score=score)(_one_hot(ids))
        assert out.feasible.tolist() == [True, False]
    with pytest.raises(InputDataError):
        ESMReward(model=model, alphabet=alphabet)(torch.zeros(2, 6, 5))
    with pytest.raises(ConfigError):
        ESMReward(model=model, alphabet=alphabet, score="perplexity")
    with pytest.raises(ConfigError):
        ESMReward(model=model, alphabet=alphabet, letters="AB#")


def test_missing_weights_file_is_a_config_error(tmp_path):
    path = tmp_path / "esm2_t6_8M_UR50D.pt"
    with pytest.raises(ConfigError, match="never downloaded") as info:
        ESMReward(weights=str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_loads_a_local_fair_esm_checkpoint(tiny, tmp_path):
    """The checkpoint layout fair-esm's ESM-2 loader reads: ``cfg.model`` a Namespace and
    fairseq-prefixed ``model`` weights, no contact regression file."""
    model, alphabet = tiny
    state = {"encoder.sentence_encoder." + k: v for k, v in model.state_dict().items()
             if not k.startswith("contact_head.regression")}
    cfg = Namespace(encoder_layers=1, encoder_embed_dim=32, encoder_attention_heads=2, token_dropout=True)
    path = tmp_path / "esm2_tiny.pt"
    torch.save({"cfg": {"model": cfg}, "model": state}, path)

    ids = torch.randint(0, 20, (3, 10), generator=torch.Generator().manual_seed(4))
    loaded = ESMReward(weights=str(path))
    assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())
    torch.testing.assert_close(loaded(_one_hot(ids)).value, ESMReward(model=model)(_one_hot(ids)).value.detach())

    renamed = tmp_path / "my_model.pt"  # an ESM-2 file under another name still loads as ESM-2
    renamed.write_bytes(path.read_bytes())
    assert isinstance(ESMReward(weights=str(renamed)).model, esm.ESM2)

    junk = tmp_path / "esm2_junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="esm2_junk"):
        ESMReward(weights=str(junk))


def test_a_padded_model_s_designs_are_scored_without_their_padding(tiny):
    """ESM-2 reads a padded design as BOS, its letters, EOS, then ESM's own padding (masked out
    of attention): every score equals the unpadded sequence's; a design that is not a
    sequence is infeasible."""
    from difftilt.plugins.sequences.mdlm import MaskedDiffusionProcess, SequenceDenoiser

    model, alphabet = tiny
    letters = PROTEIN + "-"
    process = MaskedDiffusionProcess(SequenceDenoiser(21, 6, dim=8, depth=0, heads=1), alphabet=letters, pad="-")
    designs = ["MKV---", "WYCHPA", "M-K---", "------", "CA----"]
    x = torch.nn.functional.one_hot(torch.tensor([[letters.index(c) for c in s] for s in designs]), 22).float()
    seqs = {0: "MKV", 1: "WYCHPA", 4: "CA"}
    for score in ("mean_logprob", "pseudo_log_likelihood"):
        padded = ESMReward(model=model, alphabet=alphabet, score=score, process=process, batch_size=4)
        fixed = ESMReward(model=model, alphabet=alphabet, score=score)
        out = padded(x.clone().requires_grad_(score == "mean_logprob"))
        assert out.feasible.tolist() == [True, True, False, False, True]
        for row, seq in seqs.items():
            alone = fixed(_one_hot(torch.tensor([[PROTEIN.index(c) for c in seq]]))).value
            assert out.value[row].item() == pytest.approx(alone.item(), abs=1e-5), (score, seq)
    tokens = padded.esm_tokens(torch.tensor([[PROTEIN.index(c) for c in "MKVAAA"]]), torch.tensor([3]))
    assert tokens[0].tolist() == [alphabet.cls_idx, *[alphabet.get_idx(c) for c in "MKV"], alphabet.eos_idx,
                                  *[alphabet.padding_idx] * 3]
    # the differentiable path: the same values as the token path, gradients to the letters only
    relaxed = ESMReward(model=model, alphabet=alphabet, process=process)
    x.requires_grad_()
    value = relaxed(x).value
    ids, unscored, n = relaxed._check(x)
    with torch.no_grad():
        by_tokens = relaxed._mean_logprob_tokens(ids, n)
    assert torch.isfinite(value).all()
    torch.testing.assert_close(value.detach()[~unscored], by_tokens[~unscored], atol=1e-4, rtol=0)
    value[0].backward()
    assert x.grad[0, :3, :20].abs().sum() > 0 and x.grad[0, 3:].abs().sum() == 0
    with pytest.raises(ConfigError, match="alphabet 'ACGT' looks like nucleotides"):
        ESMReward(model=model, alphabet=alphabet, process=MaskedDiffusionProcess(
            SequenceDenoiser(5, 6, dim=8, depth=0, heads=1), alphabet="ACGT-", pad="-"))
    with pytest.raises(ConfigError, match="'ACDEFGHIKLMNPQRSTVWY-' are not the process's alphabet .* padding letter"):
        ESMReward(model=model, alphabet=alphabet, letters=letters, process=process)


def _save_tiny(model, path, **cfg):
    state = {"encoder.sentence_encoder." + k: v for k, v in model.state_dict().items()
             if not k.startswith("contact_head.regression")}
    cfg = Namespace(**{"encoder_layers": 1, "encoder_embed_dim": 32, "encoder_attention_heads": 2,
                       "token_dropout": True, **cfg})
    torch.save({"cfg": {"model": cfg}, "model": state}, path)


def test_designs_are_read_in_the_process_s_alphabet(tiny):
    from difftilt.plugins.sequences.mdlm import MaskedDiffusionProcess, SequenceDenoiser

    model, alphabet = tiny
    textbook = "ARNDCQEGHILKMFPSTWYV"
    process = MaskedDiffusionProcess(SequenceDenoiser(20, 6, dim=8, depth=0, heads=1), alphabet=textbook)
    reward = ESMReward(model=model, alphabet=alphabet, process=process)
    assert reward.letters == textbook
    seq = "MKVLAW"
    ours = reward(_one_hot(torch.tensor([[textbook.index(c) for c in seq]]))).value
    standard = ESMReward(model=model, alphabet=alphabet)(_one_hot(torch.tensor([[PROTEIN.index(c) for c in seq]])))
    assert ours.item() == pytest.approx(standard.value.item(), abs=1e-5)
    with pytest.raises(ConfigError, match="not the process's alphabet 'ARNDCQEGHILKMFPSTWYV'"):
        ESMReward(model=model, alphabet=alphabet, letters=PROTEIN, process=process)


def test_a_nucleotide_model_is_not_scored_as_a_protein(tiny):
    from difftilt.plugins.sequences.mdlm import MaskedDiffusionProcess, SequenceDenoiser

    model, alphabet = tiny
    process = MaskedDiffusionProcess(SequenceDenoiser(4, 8, dim=8, depth=0, heads=1), alphabet="ACGT")
    for letters in (None, "ACGT"):
        with pytest.raises(ConfigError, match="scores proteins, but the model's alphabet 'ACGT' looks like nucl"):
            ESMReward(model=model, alphabet=alphabet, letters=letters, process=process)


def test_files_that_are_not_checkpoints_are_one_line_config_errors(tiny, tmp_path):
    model, _ = tiny
    text = tmp_path / "notpt.txt"
    text.write_text("hello\n")
    fasta = tmp_path / "seqs.fasta"
    fasta.write_text(">a\nMKV\n")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    expected = {text: "is not a torch checkpoint .*text file", fasta: "is not a torch checkpoint .*text file",
                empty: r"is not a torch checkpoint \(the file is empty\)", tmp_path: "is a folder"}
    _save_tiny(model, tmp_path / "esm2_wide.pt", encoder_embed_dim=64)
    expected[tmp_path / "esm2_wide.pt"] = r"size mismatch for .* \(and \d+ more\)"
    _save_tiny(model, tmp_path / "esm2_deep.pt", encoder_layers=2)
    expected[tmp_path / "esm2_deep.pt"] = r"Missing key\(s\) .* \(and \d+ more\)"
    for name, cfg in (("esm2_nocfg.pt", {}), ("esm2_five.pt", 5)):
        torch.save({"cfg": cfg, "model": {}}, tmp_path / name)
        expected[tmp_path / name] = "'cfg' must be a dict with a 'model' entry"
    for path, match in expected.items():
        with pytest.raises(ConfigError, match=match) as info:
            ESMReward(weights=str(path))
        message = str(info.value)
        assert str(path) in message and "\n" not in message and "trust" not in message, message

    refused = tmp_path / "esm2_refused.pt"  # a real pickle that weights_only refuses: only it may be trusted
    torch.save({"model": Namespace, "cfg": ConfigError("x")}, refused)
    with pytest.raises(ConfigError, match="Unsupported global.*if you trust the file"):
        ESMReward(weights=str(refused))


def test_a_bad_contact_regression_file_is_skipped_with_a_warning(tiny, tmp_path):
    model, _ = tiny
    path = tmp_path / "esm2_tiny.pt"
    _save_tiny(model, path)
    regression = tmp_path / "esm2_tiny-contact-regression.pt"
    ids = torch.randint(0, 20, (2, 7), generator=torch.Generator().manual_seed(5))
    expected = ESMReward(model=model)(_one_hot(ids)).value.detach()
    bad = {"unreadable": lambda: regression.write_text("junk"),
           "misfit": lambda: torch.save({"model": {"contact_head.regression.weight": torch.zeros(1, 7),
                                                   "contact_head.regression.bias": torch.zeros(1)}}, regression)}
    for why, write in bad.items():
        write()
        with pytest.warns(UserWarning, match="esm2_tiny-contact-regression.pt.*skipped"):
            reward = ESMReward(weights=str(path))
        torch.testing.assert_close(reward(_one_hot(ids)).value, expected)


def test_an_empty_batch_scores_nothing(tiny):
    model, alphabet = tiny
    for score in ("mean_logprob", "pseudo_log_likelihood"):
        out = ESMReward(model=model, alphabet=alphabet, score=score)(torch.zeros(0, 6, 21))
        assert out.value.shape == (0,) and out.feasible.shape == (0,)
