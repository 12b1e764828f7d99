"""Variable-length sequences: a padding letter in the corpus, the model and the rewards."""

import csv
import sys
import textwrap

import pytest
import torch

from difftilt.core.errors import ConfigError, InputDataError
from difftilt.plugins.sequences import FunctionReward
from difftilt.plugins.sequences.alphabets import PROTEIN, well_padded
from difftilt.plugins.sequences.descriptors import DescriptorConstraint, ProteinDescriptor, protein_descriptor
from difftilt.plugins.sequences.mdlm import MaskedDiffusionProcess, SequenceDenoiser, padding_rule
from difftilt.plugins.sequences.domain import SequencesDomain
from difftilt.plugins.sequences.pretrain import load_pretrained
from difftilt.plugins.sequences.pretrain_cli import encode_strings, file_corpus, pretrain_from_config

LETTERS = "ACGT-"


def _process(length: int = 4) -> MaskedDiffusionProcess:
    net = SequenceDenoiser(len(LETTERS), length, dim=8, depth=0, heads=1)
    return MaskedDiffusionProcess(net, num_steps=4, alphabet=LETTERS, pad="-")


def _one_hot(seqs: list[str]) -> torch.Tensor:
    ids = torch.tensor([[LETTERS.index(c) for c in s] for s in seqs])
    return torch.nn.functional.one_hot(ids, len(LETTERS) + 1).float()


def test_a_file_of_sequences_of_any_length_is_padded_at_their_ends(tmp_path):
    fasta = tmp_path / "seqs.fa"
    fasta.write_text(">a\nACG\n>b\nA\n>c\nacgta\n")
    tokens, letters, pad = file_corpus(str(fasta), alphabet="ACGT", pad="-")
    assert (letters, pad) == (LETTERS, "-")
    assert tokens.tolist() == [[0, 1, 2, 4, 4], [0, 4, 4, 4, 4], [0, 1, 2, 3, 0]]
    tokens, _, _ = file_corpus(str(fasta), alphabet="ACGT", pad="-", length=7)
    assert tokens.shape == (3, 7) and tokens[2, 5:].tolist() == [4, 4]


def test_bad_padding_gets_a_clear_error(tmp_path):
    fasta = tmp_path / "seqs.fa"
    fasta.write_text("ACG\nAC-G\n")
    with pytest.raises(InputDataError, match=r"sequence 1 \(line 2 of seqs.fa\) contains the padding letter '-' at position 2"):
        file_corpus(str(fasta), alphabet="ACGT", pad="-")
    with pytest.raises(ConfigError, match="one character outside the alphabet"):
        file_corpus(str(fasta), alphabet="ACGT", pad="A")
    with pytest.raises(ConfigError, match="needs data.pad"):
        file_corpus(str(fasta), alphabet="ACGT", length=8)
    with pytest.raises(ConfigError, match="not '\\?', which shows a masked position"):
        file_corpus(str(fasta), alphabet="ACGT", pad="?")
    with pytest.raises(InputDataError, match="sequence 1 has length 4, expected 1 to 3"):
        encode_strings(["ACG", "ACGT"], LETTERS, pad="-", length=3)
    with pytest.raises(InputDataError, match="or give a padding letter"):
        encode_strings(["ACG", "ACGT"], "ACGT")
    with pytest.raises(ConfigError, match="pad must be one letter of the alphabet"):
        MaskedDiffusionProcess(SequenceDenoiser(4, 4, dim=8, depth=0, heads=1), alphabet="ACGT", pad="-")
    with pytest.raises(ConfigError, match="reverse_complement reads designs of one length; this model pads"):
        SequencesDomain().featurizer(_process(), reverse_complement=True)
    for alphabet in ("-ACG", "AC-G"):  # the padding rule, mutations and decoding read the pad as the last token
        with pytest.raises(ConfigError, match="pad must be the last letter of the alphabet"):
            MaskedDiffusionProcess(SequenceDenoiser(4, 4, dim=8, depth=0, heads=1), alphabet=alphabet, pad="-")


def test_a_padded_model_samples_with_the_first_hitting_chain_unless_the_config_says_otherwise(tmp_path):
    (tmp_path / "seqs.txt").write_text("ACG\nA\nACGTA\n")
    base = {"plugin": "sequences", "data": {"name": "file", "path": str(tmp_path / "seqs.txt"), "alphabet": "ACGT",
                                            "pad": "-"},
            "model": {"dim": 8, "depth": 1, "heads": 1}, "train": {"steps": 2, "batch_size": 4, "warmup": 1}}
    cases = [({}, "first_hit"), ({"num_steps": 4}, "ancestral"), ({"sampler": "ancestral"}, "ancestral")]
    for i, (process, sampler) in enumerate(cases):
        folder = pretrain_from_config({**base, "process": process, "output": str(tmp_path / f"model{i}")},
                                      progress=False, command="test")
        assert load_pretrained(folder).sampler == sampler, process


def test_a_sequence_is_letters_then_padding_only():
    ids = torch.tensor([[0, 1, 4, 4], [0, 1, 2, 3], [0, 4, 1, 4], [4, 4, 4, 4], [4, 0, 0, 0]])
    assert well_padded(ids, 4).tolist() == [True, True, False, False, False]


def test_the_reverse_steps_never_put_a_letter_after_a_pad():
    # ? is masked; per position, the tokens A C G T - it may take
    tokens = torch.tensor([[0, 5, 4, 5, 5], [5, 5, 1, 5, 4], [5, 5, 5, 5, 5]])
    allowed = padding_rule(tokens.clamp(max=4), tokens == 5, pad_id=4)
    letters, pad, anything = [True] * 4 + [False], [False] * 4 + [True], [True] * 5
    # "A?-??": after the pad only pads; "??C?-": no pad before the C; "?????": no pad first
    assert allowed[0, [1, 3, 4]].tolist() == [anything, pad, pad] and allowed[0, 0].tolist() == letters
    assert allowed[1, [0, 1, 3]].tolist() == [letters, letters, anything]
    assert allowed[2].tolist() == [letters] + [anything] * 4
    # a first-hitting step from "A-??" puts all of positions 2 and 3's mass on the pad
    process = MaskedDiffusionProcess(SequenceDenoiser(5, 4, dim=8, depth=1, heads=1), alphabet=LETTERS,
                                     sampler="first_hit", pad="-")
    x = _one_hot(["A-AA"])
    x[0, 2:] = torch.nn.functional.one_hot(torch.tensor(5), 6).float()
    probs = process.step(x, 2).log_probs.exp()[0, 2:]
    assert torch.allclose(probs[:, 4], torch.ones(2)) and probs[:, :4].max() < 1e-6
    # so an untrained first-hitting model draws only sequences (53% of 1,000 without the rule)
    x = process.sample(1000, generator=torch.Generator().manual_seed(0))
    assert process.well_formed(x).all()
    assert {len(s) for s in process.decode(x)} == {1, 2, 3, 4}


def test_decode_cuts_the_padding_and_the_setting_is_saved_with_the_model():
    process = _process()
    x = _one_hot(["AC--", "ACGT", "A-C-"])
    assert process.decode(x) == ["AC", "ACGT", "A-C"]
    assert process.well_formed(x).tolist() == [True, True, False]
    assert process.spec()["pad"] == "-"
    again = MaskedDiffusionProcess(process.denoiser, **process.spec())
    assert again.pad == "-" and again.decode(x) == process.decode(x)
    fixed = MaskedDiffusionProcess(process.denoiser, alphabet=LETTERS)
    assert "pad" not in fixed.spec() and fixed.well_formed(x).all() and fixed.decode(x)[0] == "AC--"


def test_a_function_reward_is_asked_only_sequences_without_their_padding(tmp_path):
    assay = tmp_path / "assay.py"
    assay.write_text(textwrap.dedent('''
        CALLS = []
        def length(seqs):
            CALLS.append(list(seqs))
            return [float(len(s)) for s in seqs]
    '''))
    reward = FunctionReward(f"{assay}:length", process=_process())
    out = reward(_one_hot(["AC--", "ACGT", "A-C-", "----", "G---"]))
    assert out.feasible.tolist() == [True, True, False, False, True]
    assert out.value[out.feasible].tolist() == [2.0, 4.0, 1.0]
    assert sys.modules[reward.fn.__module__].CALLS == [["AC", "ACGT", "G"]]
    with pytest.raises(ConfigError, match="lack the process's padding letter"):
        FunctionReward(f"{assay}:length", letters="ACGTN", process=_process())


def _single_edits(s: str, letters: str, length: int) -> set[str]:
    """Every design one substitution, deletion or insertion away from ``s`` (an insertion into
    a full design drops its last letter), by brute force."""
    subs = {s[:i] + c + s[i + 1:] for i in range(len(s)) for c in letters if c != s[i]}
    dels = {s[:i] + s[i + 1:] for i in range(len(s))} if len(s) > 1 else set()
    ins = {(s[:i] + c + s[i:])[:length] for i in range(len(s) + 1) for c in letters}
    return (subs | dels | ins) - {s}


def test_mutations_of_padded_designs_are_single_substitutions_insertions_or_deletions():
    from difftilt.core.plugins import load_plugin

    domain, process = load_plugin("sequences"), _process(length=6)
    words = ["ACG", "A", "ACGTAC"]
    parents = _one_hot([w.ljust(6, "-") for w in words] * 4000)
    g = torch.Generator().manual_seed(0)
    kids = domain.mutate(parents, generator=g, count=1, process=process)
    assert process.well_formed(kids).all()
    decoded = process.decode(kids)
    for j, word in enumerate(words):  # exactly the single edits, every one of them drawn
        assert set(decoded[j::3]) == _single_edits(word, "ACGT", 6), word
    lengths = torch.tensor([len(s) for s in process.decode(kids)]).view(-1, 3)
    # ACG: 4 sites (3 letters, the end); at a letter each kind 1 in 3, at the end an appended letter
    share = {n: (lengths[:, 0] == n).float().mean().item() for n in (2, 3, 4)}
    assert share == pytest.approx({2: 1 / 4, 3: 1 / 4, 4: 1 / 2}, abs=0.02)
    # A: never emptied (its deletion is a substitution); ACGTAC: full, so no longer
    assert (lengths[:, 1] == 1).float().mean().item() == pytest.approx(1 / 3, abs=0.02)
    assert set(lengths[:, 1].tolist()) == {1, 2} and set(lengths[:, 2].tolist()) == {5, 6}
    several = domain.mutate(parents, generator=g, count=3, process=process)
    assert process.well_formed(several).all() and all(process.decode(several))  # none emptied
    assert process.well_formed(domain.mutate(parents, generator=g, process=process)).all()  # rate 1 / sites
    crossed = domain.crossover(parents[:6000], parents[6000:].roll(1, 0), generator=g, process=process)
    assert process.well_formed(crossed).all()
    # without padding nothing changes: the same draws as with no process
    fixed = MaskedDiffusionProcess(SequenceDenoiser(4, 6, dim=8, depth=0, heads=1), alphabet="ACGT")
    x = torch.nn.functional.one_hot(torch.randint(4, (64, 6), generator=g), 5).float()
    assert torch.equal(domain.mutate(x, generator=torch.Generator().manual_seed(1), count=2, process=fixed),
                       domain.mutate(x, generator=torch.Generator().manual_seed(1), count=2))


@pytest.mark.slow
def test_the_baselines_ask_only_sequences_of_a_padded_first_hitting_model(padded_model, tmp_path):
    from difftilt.core.online import run_online
    from difftilt.core.store import SQLiteFeedbackStore

    assay = tmp_path / "assay.py"
    assay.write_text("def g_count(seqs):\n    return [float(s.count('G')) for s in seqs]\n")
    cfg = {"plugin": "sequences", "seed": 0,
           "process": {"name": "pretrained", "path": str(padded_model), "sampler": "first_hit"},
           "oracle": {"reward": {"name": "function", "target": f"{assay}:g_count"}, "batch_size": 16},
           "methods": ["ga", "hill_climb"], "schedule": [32, 32, 32], "eval_samples": 0}
    run = run_online(cfg, output_dir=str(tmp_path), name="padded", progress=False)
    for method in cfg["methods"]:
        with SQLiteFeedbackStore(run.path / method / "feedback.sqlite", readonly=True) as store:
            records = store.records()
        assert len(records) == 96 and all(r.status == "answered" for r in records), method
        lengths = {len(s) for s in load_pretrained(padded_model).decode(torch.stack([r.design for r in records]))}
        assert len(lengths) > 2, lengths


def test_descriptors_score_a_padded_model_s_proteins_without_their_padding():
    letters = PROTEIN + "-"
    process = MaskedDiffusionProcess(SequenceDenoiser(21, 6, dim=8, depth=0, heads=1), alphabet=letters, pad="-")
    x = torch.nn.functional.one_hot(torch.tensor([[letters.index(c) for c in s] for s in
                                                  ["ACD---", "MKWVTF", "A-C---", "------", "KKR---"]]), 22).float()
    charge = ProteinDescriptor("charge", process=process)(x)
    assert charge.feasible.tolist() == [True, True, False, False, True]
    expected = [protein_descriptor(s, "charge") for s in ("ACD", "MKWVTF", "KKR")]
    assert charge.value[charge.feasible].tolist() == pytest.approx(expected) and expected[2] > 2 > expected[0]
    inside = DescriptorConstraint("charge", low=-2.0, high=2.0, process=process)(x).feasible
    assert inside.tolist() == [True, True, False, False, False]
    with pytest.raises(ConfigError, match="alphabet 'ACGT' looks like nucleotides"):  # a DNA model, padded
        ProteinDescriptor("charge", process=_process())


@pytest.fixture(scope="module")
def padded_model(tmp_path_factory):
    """A tiny model of random DNA of lengths 2 to 6 (uniform), padded with ``-`` to 6."""
    root = tmp_path_factory.mktemp("padded")
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 7, (400,), generator=g).tolist()
    lines = ["".join("ACGT"[int(i)] for i in torch.randint(4, (n,), generator=g)) for n in lengths]
    (root / "seqs.txt").write_text("\n".join(lines) + "\n")
    cfg = {"plugin": "sequences", "output": str(root / "model"),
           "data": {"name": "file", "path": str(root / "seqs.txt"), "alphabet": "ACGT", "pad": "-"},
           "model": {"dim": 32, "depth": 1, "heads": 2}, "process": {"num_steps": 8},
           "train": {"steps": 300, "batch_size": 64, "lr": 3e-3, "warmup": 10, "seed": 0}}
    return pretrain_from_config(cfg, progress=False, command="test")


def test_a_model_pretrained_on_sequences_of_several_lengths_learns_where_they_end(padded_model):
    process = load_pretrained(padded_model)
    assert process.pad == "-" and process.alphabet == LETTERS and process.length == 6
    for sampler in ("ancestral", "first_hit"):
        process = load_pretrained(padded_model, sampler=sampler)
        x = process.sample(500, generator=torch.Generator().manual_seed(0))
        strings = process.decode(x)
        formed = process.well_formed(x)
        # the first-hitting chain always keeps pads at the end; the ancestral one can unmask a pad and
        # a letter after it in one step (96% sequences over 2,000 draws; 93% before the padding rule)
        assert formed.all() if sampler == "first_hit" else formed.float().mean() > 0.9, formed.float().mean()
        kept = [s for s, ok in zip(strings, formed.tolist()) if ok]
        assert all(1 <= len(s) <= 6 and set(s) <= set("ACGT") for s in kept)
        # the lengths drawn follow the corpus's (uniform on 2..6): each within 0.1 of 1/5, none shorter
        share = {n: sum(len(s) == n for s in kept) / len(kept) for n in range(1, 7)}
        assert share[1] < 0.05 and all(abs(share[n] - 0.2) < 0.1 for n in range(2, 7)), share


@pytest.mark.slow
def test_the_online_loop_asks_a_users_function_about_sequences_of_several_lengths(padded_model, tmp_path):
    from difftilt.core.checkpoint import load_finetuned
    from difftilt.core.cli import main
    from difftilt.core.online import run_online
    from difftilt.core.plugins import load_plugin
    from difftilt.core.store import COUNTED, SQLiteFeedbackStore

    assay = tmp_path / "assay.py"
    assay.write_text("def g_count(seqs):\n    return [float(s.count('G')) for s in seqs]\n")
    cfg = {"plugin": "sequences", "seed": 0, "process": {"name": "pretrained", "path": str(padded_model)},
           "oracle": {"reward": {"name": "function", "target": f"{assay}:g_count"}, "batch_size": 16},
           "methods": ["ucb"], "schedule": [32, 32], "alpha": 0.1, "eval_samples": 0,
           "finetune": {"iterations": 3, "batch_size": 16, "lr": 1e-3, "value_refit_iterations": 0},
           "reward_model": {"epochs": 5}}
    run = run_online(cfg, output_dir=str(tmp_path), name="padded", progress=False)
    assert [r["queries_used"] for r in run.read_json("results.json")["methods"]["ucb"]] == [32, 64]
    process = load_plugin("sequences").make_process(cfg["process"])
    with SQLiteFeedbackStore(run.path / "ucb" / "feedback.sqlite", readonly=True) as store:
        records = store.records(status=COUNTED)
    designs = torch.stack([r.design for r in records])
    formed = process.well_formed(designs).tolist()
    assert len(records) == 64 and 0 < sum(formed) < 64  # both kinds asked (the ancestral sampler: 59 sequences on this seed)
    for s, ok, r in zip(process.decode(designs), formed, records):
        expected = ("answered", float(s.count("G"))) if ok else ("infeasible", None)
        assert (r.status, r.true_value) == expected
    # designs.csv has them as the function saw them, without their padding
    with open(run.path / "ucb" / "designs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(row["status"], row["design"]) for row in rows] == list(zip([r.status for r in records],
                                                                        process.decode(designs)))
    assert any(0 < len(row["design"]) < 6 for row in rows if row["status"] == "answered")
    # `difftilt sample` writes a fine-tuned round's designs as FASTA, in the model's own letters
    model = run.path / "ucb" / "checkpoints" / "round_1"
    assert main(["sample", str(model), "-n", "5", "-o", str(tmp_path / "d.fasta")]) == 0
    drawn = load_finetuned(model).sample(5, seed=0)
    expected = "".join(f">sample_{i}\n{s}\n" for i, s in enumerate(process.decode(drawn)))
    assert (tmp_path / "d.fasta").read_text() == expected
