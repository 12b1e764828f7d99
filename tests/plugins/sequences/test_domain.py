"""The sequences plugin end to end at tiny size: pretrain CLI, rewards, online loop."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from difftilt.core.errors import ConfigError, InputDataError
from difftilt.core.plugins import load_plugin
from difftilt.core.testing import DomainContract
from difftilt.plugins.sequences import (PROTEIN, EhrlichFunction, EhrlichReward, OneHotFeatures, TFBind8,
                                        TFBind8Reward, hamming_diversity)
from difftilt.plugins.sequences.domain import SequencesDomain, complement_order
from difftilt.plugins.sequences.mdlm import MaskedDiffusionProcess, SequenceDenoiser
from tests.helpers import DEVICES


def _one_hot(tokens, vocab):
    return torch.nn.functional.one_hot(tokens, vocab + 1).float()


@pytest.fixture(scope="module")
def tiny_tfbind_model(tmp_path_factory):
    """A tiny masked-diffusion model of TFBind8's lower half, made by the pretrain CLI."""
    root = tmp_path_factory.mktemp("pre")
    cfg = {"plugin": "sequences", "output": str(root / "model"), "data": {"name": "tfbind8"},
           "model": {"dim": 16, "depth": 1, "heads": 2}, "process": {"num_steps": 4},
           "train": {"steps": 60, "batch_size": 64, "lr": 3e-3, "warmup": 5, "seed": 0}}
    path = root / "pretrain.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "difftilt", "pretrain", str(path), "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    info = json.loads((root / "model" / "process.json").read_text())
    assert info["data"]["num_sequences_used"] == 32768 and info["command"] == f"difftilt pretrain {path}"
    return root / "model"


def test_pretraining_called_from_code_records_the_command_it_is_given_or_this_process_command_line(tmp_path):
    import shlex

    from difftilt.plugins.sequences.pretrain_cli import pretrain_from_config

    cfg = {"data": {"name": "tfbind8"}, "model": {"dim": 8, "depth": 1, "heads": 1}, "process": {"num_steps": 4},
           "train": {"steps": 2, "batch_size": 8, "warmup": 1, "seed": 0}}
    given = pretrain_from_config(cfg, progress=False, output=str(tmp_path / "a"), command="make-it --seed 0")
    default = pretrain_from_config(cfg, progress=False, output=str(tmp_path / "b"))
    assert json.loads((given / "process.json").read_text())["command"] == "make-it --seed 0"
    # not a made-up `difftilt pretrain ...` from another program's arguments
    assert json.loads((default / "process.json").read_text())["command"] == shlex.join(sys.orig_argv)


def test_ehrlich_reward_reads_one_hot_states_and_masks_are_infeasible():
    f = EhrlichFunction(20, 32, 2, 4, seed=0)
    reward = EhrlichReward(20, 32, 2, 4, seed=0)
    best = f.optimal_solution()[None]
    out = reward(_one_hot(best, 20))
    assert out.value.item() == 1.0 and out.feasible.item()
    masked = best.clone()
    masked[0, 5] = 20
    assert not reward(_one_hot(masked, 20)).feasible.item()


def test_tfbind8_reward_is_the_table_lookup():
    table = TFBind8()
    seq, score = table.global_optimum()
    out = TFBind8Reward()(_one_hot(table.encode([seq, "AAAAAAAA"]), 4))
    assert out.value[0].item() == score == 1.0
    assert out.value[1].item() == pytest.approx(float(table(table.encode(["AAAAAAAA"]))[0]))


def test_features_are_differentiable_and_diversity_is_hamming():
    x = _one_hot(torch.tensor([[0, 1, 2, 3], [0, 1, 2, 0]]), 4).requires_grad_()
    phi = OneHotFeatures(4)(x)
    assert phi.shape == (2, 16)
    phi.sum().backward()
    assert x.grad[..., :4].eq(1).all() and x.grad[..., 4].eq(0).all()
    assert hamming_diversity(x) == pytest.approx(0.25)
    pairs = OneHotFeatures(4, max_gap=2)(x.detach())
    assert pairs.shape == (2, 16 + 2 * 16)
    gap1 = pairs[:, 16:32].reshape(2, 4, 4)
    assert gap1[0].sum() == 3 and gap1[0, 0, 1] == 1 and gap1[0, 1, 2] == 1 and gap1[0, 2, 3] == 1
    gap2 = pairs[:, 32:].reshape(2, 4, 4)
    assert gap2[1, 0, 2] == 1 and gap2[1, 1, 0] == 1 and gap2[1].sum() == 2
    # the counts do not care where a pair sits
    shifted = OneHotFeatures(4, max_gap=2)(_one_hot(torch.tensor([[3, 0, 1, 3]]), 4))[:, 16:]
    ref = OneHotFeatures(4, max_gap=2)(_one_hot(torch.tensor([[0, 1, 3, 3]]), 4))[:, 16:]
    assert shifted[0, 1].item() == ref[0, 1].item() == 1  # the (0, 1) pair at gap 1


def test_kmer_counts_match_a_direct_count_and_pass_gradients():
    ids = torch.randint(4, (3, 7), generator=torch.Generator().manual_seed(0))
    x = _one_hot(ids, 4).requires_grad_()
    phi = OneHotFeatures(4, max_gap=1, max_kmer=4)(x)
    assert phi.shape == (3, 7 * 4 + 16 + 64 + 256)
    tri, quad = phi[:, 44:108], phi[:, 108:]
    for b in range(3):
        s = ids[b].tolist()
        for k, block in ((3, tri), (4, quad)):
            direct = torch.zeros(4**k)
            for i in range(7 - k + 1):
                direct[sum(s[i + j] * 4 ** (k - 1 - j) for j in range(k))] += 1  # first letter most significant
            assert torch.equal(block[b].detach(), direct)
    phi.sum().backward()
    assert x.grad[..., :4].gt(0).all() and x.grad[..., 4].eq(0).all()
    # the domain's featurizer counts words up to 4 letters for DNA, none for 20 letters
    assert SequencesDomain().featurizer(_tiny_process(4, 8)).max_kmer == 4
    assert SequencesDomain().featurizer(_tiny_process(20, 8)).max_kmer == 0


def test_both_strands_features_give_a_design_and_its_reverse_complement_one_value():
    ids = torch.randint(4, (6, 8), generator=torch.Generator().manual_seed(0))
    x = _one_hot(ids, 4).requires_grad_()
    rc = _one_hot(3 - ids.flip(-1), 4)  # ACGT: token i pairs with 3 - i
    phi = SequencesDomain().featurizer(_tiny_process(4, 8), reverse_complement=True)
    plain = OneHotFeatures(4, max_gap=7, max_kmer=4)
    assert not torch.allclose(plain(x), plain(rc))  # one strand's features do tell them apart
    assert torch.allclose(phi(x), phi(rc)) and torch.allclose(phi(x), plain(x) + plain(rc))
    phi(x).sum().backward()
    assert x.grad[..., :4].abs().sum() > 0 and x.grad[..., 4].eq(0).all()
    table = TFBind8()  # what the symmetry is for: the table gives both strands one score
    assert torch.equal(table(ids), table(3 - ids.flip(-1)))
    assert complement_order("ACGT") == complement_order("ACGU") == [3, 2, 1, 0]
    assert complement_order("TGCA") == [3, 2, 1, 0] and complement_order("ATGC") == [1, 0, 3, 2]
    for letters in ("ACG", "ACGTU", PROTEIN):
        with pytest.raises(ConfigError, match="needs a nucleotide alphabet"):
            complement_order(letters)
    with pytest.raises(ConfigError, match="needs a nucleotide alphabet"):
        SequencesDomain().featurizer(_tiny_process(20, 8), reverse_complement=True)


def test_both_strands_are_one_design_for_the_no_repeat_rule():
    from difftilt.core.online import design_key, design_keys, unique_batch

    phi = SequencesDomain().featurizer(_tiny_process(4, 8), reverse_complement=True)
    ids = torch.randint(4, (16, 8), generator=torch.Generator().manual_seed(1))
    ids[0] = torch.tensor([0, 3, 0, 3, 0, 3, 0, 3])  # ATATATAT is its own reverse complement
    x = _one_hot(ids, 4)
    rc = _one_hot(3 - ids.flip(-1), 4)
    assert torch.equal(phi.reverse_complement(x), rc)
    canon = phi.canonical(x)
    assert torch.equal(canon, phi.canonical(rc)) and torch.equal(canon[0], x[0])
    assert all(torch.equal(c, a) or torch.equal(c, b) for c, a, b in zip(canon, x, rc))
    lower = [a.argmax(-1).tolist() <= b.argmax(-1).tolist() for a, b in zip(x, rc)]
    assert [torch.equal(c, a) for c, a in zip(canon, x)] == lower  # the strand that reads first

    key = design_keys(phi)  # the online loop's key for this featurizer
    assert design_keys(OneHotFeatures(4)) is design_key
    assert len({key(r) for r in x}) == 16  # sixteen molecules
    taken: set = set()
    got, repeated, _ = unique_batch(lambda n: torch.cat([x, rc]), 16, taken, key=key)
    assert repeated == 0 and torch.equal(got, x)  # the other strands were dropped, not asked
    _, repeated, _ = unique_batch(lambda n: rc[:n], 4, taken, key=key)
    assert repeated == 4  # every proposal is the other strand of an asked design
    _, repeated, _ = unique_batch(lambda n: rc[1:][:n], 4, {design_key(r) for r in x})
    assert repeated == 0  # while keyed by their letters alone they would be asked again


def _tiny_process(vocab: int, length: int) -> MaskedDiffusionProcess:
    return MaskedDiffusionProcess(SequenceDenoiser(vocab, length, dim=8, depth=0, heads=1), sampler="first_hit")


def test_reward_and_process_of_different_sizes_are_refused(tiny_tfbind_model):
    domain = load_plugin("sequences")
    process = domain.make_process({"name": "pretrained", "path": str(tiny_tfbind_model)})
    with pytest.raises(ConfigError, match="length 32 over 20 letters.*length 8 over 4"):
        domain.make_reward({"name": "ehrlich"}, process)


@pytest.mark.parametrize("device", DEVICES)
def test_sample_writes_a_pretrained_folders_designs_as_fasta(tiny_tfbind_model, tmp_path, device):
    from difftilt.core.cli import main
    from difftilt.core.rollout import step_generator

    out = tmp_path / "pre.fasta"
    assert main(["sample", str(tiny_tfbind_model), "-n", "6", "--seed", "3", "-o", str(out), "--device", device]) == 0
    process = load_plugin("sequences").make_process({"name": "pretrained", "path": str(tiny_tfbind_model)})
    drawn = process.to(device).sample(6, generator=step_generator(3, -3, device))
    assert out.read_text() == "".join(f">sample_{i}\n{s}\n" for i, s in enumerate(process.decode(drawn)))
    assert all(len(s) == 8 and set(s) <= set("ACGT") for s in process.decode(drawn))
    assert load_plugin("sequences").load_folder(tmp_path) is None  # not a model folder: not this plugin's


def test_pretrain_reports_a_bad_letter_in_one_line(tmp_path):
    fasta = tmp_path / "seqs.fa"
    fasta.write_text(">a\nACGT\n>b\nACXT\n")
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"plugin": "sequences", "output": str(tmp_path / "m"),
                                   "data": {"name": "file", "path": str(fasta), "alphabet": "ACGT"}}))
    proc = subprocess.run([sys.executable, "-m", "difftilt", "pretrain", str(cfg)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "difftilt: error: sequence 1 (line 4 of seqs.fa) has letter 'X' at position 2, outside the alphabet 'ACGT'"]
    assert not (tmp_path / "m").exists()


def test_ehrlich_motifs_that_cannot_fit_are_a_config_error():
    with pytest.raises(ConfigError):
        load_plugin("sequences").make_reward({"name": "ehrlich", "length": 6, "num_motifs": 2, "motif_length": 4})


@pytest.mark.slow
def test_online_loop_fine_tunes_a_full_denoiser_copy_and_saves_it_each_round(tiny_tfbind_model, tmp_path):
    from difftilt.core.checkpoint import load_finetuned
    from difftilt.core.online import run_online
    from difftilt.core.store import SQLiteFeedbackStore

    cfg = {"plugin": "sequences", "seed": 0, "process": {"name": "pretrained", "path": str(tiny_tfbind_model)},
           "oracle": {"reward": {"name": "tfbind8"}, "batch_size": 16}, "methods": ["ucb"], "schedule": [16, 16],
           "alpha": 0.1,
           "finetune": {"iterations": 3, "batch_size": 16, "lr": 1e-3, "value_refit_iterations": 0},
           "reward_model": {"epochs": 5}, "features": {"reverse_complement": True}, "eval_samples": 32}
    run = run_online(cfg, output_dir=str(tmp_path), name="seq", progress=False)
    rows = run.read_json("results.json")["methods"]["ucb"]
    assert [r["queries_used"] for r in rows] == [16, 32]
    assert 0.0 < rows[-1]["eval_diversity"] <= 1.0 and rows[-1]["kl_to_pretrained"] > 0
    with SQLiteFeedbackStore(run.path / "ucb" / "feedback.sqlite", readonly=True) as store:
        asked = {tuple(r.design.argmax(-1).tolist()) for r in store.records()}
    assert len(asked) == 32 and all(r["repeated"] == 0 for r in rows)  # no query spent twice on one design
    model = load_finetuned(run.path / "ucb" / "checkpoints" / "round_1")
    x = model.sample(8, seed=0)
    assert x.shape == (8, 8, 5) and (x.argmax(-1) < 4).all()


class TestSequencesContract(DomainContract):
    plugin = "sequences"
    reward_spec = {"name": "tfbind8"}

    @pytest.fixture(autouse=True)
    def _spec(self, tiny_tfbind_model):
        self.process_spec = {"name": "pretrained", "path": str(tiny_tfbind_model)}


def test_mutations_change_exactly_the_asked_positions_to_other_letters():
    domain = load_plugin("sequences")
    x = _one_hot(torch.randint(4, (64, 8)), 4)
    g = torch.Generator().manual_seed(0)
    y = domain.mutate(x, generator=g, count=2)
    assert ((x.argmax(-1) != y.argmax(-1)).sum(1) == 2).all() and (y.argmax(-1) < 4).all()
    assert torch.equal(domain.mutate(x, generator=g, rate=0.0), x)
    z = domain.mutate(x, generator=g, rate=1.0)
    assert (x.argmax(-1) != z.argmax(-1)).all()
    kids = domain.crossover(x[:32], x[32:], generator=g)
    from_a = (kids.argmax(-1) == x[:32].argmax(-1)) | (kids.argmax(-1) == x[32:].argmax(-1))
    assert from_a.all()


def test_a_collapsed_proposer_is_completed_with_its_nearest_unasked_mutants():
    from difftilt.core.online import design_key, unique_batch

    domain = load_plugin("sequences")
    seq = _one_hot(torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]]), 4)
    g = torch.Generator().manual_seed(0)
    # 30 designs from a model that only samples one 8-mer: itself, its 24 single mutants,
    # then 5 double mutants; the next 10 are all double mutants
    taken: set = set()
    x, repeated, edited = unique_batch(lambda n: seq.expand(n, -1, -1), 30, taken,
                                       edit=lambda x, k: domain.mutate(x, generator=g, count=k))
    dist = (x.argmax(-1) != seq.argmax(-1)).sum(1).tolist()
    assert (repeated, edited) == (0, 29) and len({design_key(r) for r in x}) == 30
    assert dist[0] == 0 and sorted(dist[1:]) == [1] * 24 + [2] * 5
    x, repeated, edited = unique_batch(lambda n: seq.expand(n, -1, -1), 10, taken,
                                       edit=lambda x, k: domain.mutate(x, generator=g, count=k))
    assert (repeated, edited) == (0, 10) and (x.argmax(-1) != seq.argmax(-1)).sum(1).tolist() == [2] * 10


@pytest.mark.slow
def test_ga_and_hill_climber_spend_the_budget_in_the_same_harness(tiny_tfbind_model, tmp_path):
    from difftilt.core.online import run_online
    from difftilt.core.store import COUNTED, SQLiteFeedbackStore

    cfg = {"plugin": "sequences", "seed": 1, "process": {"name": "pretrained", "path": str(tiny_tfbind_model)},
           "oracle": {"reward": {"name": "tfbind8"}, "batch_size": 16}, "methods": ["ga", "hill_climb"],
           "schedule": [16, 8, 30], "evolution": {"mutations": 1}}
    run = run_online(cfg, output_dir=str(tmp_path), name="evo", progress=False)
    results = run.read_json("results.json")["methods"]
    for method in ("ga", "hill_climb"):
        assert [r["queries_used"] for r in results[method]] == [16, 24, 54]
        best = [r["best_true"] for r in results[method]]
        assert best == sorted(best)  # the best found never gets worse
    with SQLiteFeedbackStore(run.path / "hill_climb" / "feedback.sqlite", readonly=True) as store:
        assert store.count(COUNTED) == 54
        first = store.records(round=0)
        best = max((r for r in first if r.feasible), key=lambda r: r.value).design.argmax(-1)
        for r in store.records(round=1):
            assert int((r.design.argmax(-1) != best).sum()) == 1  # one point mutation of the best so far
        # an 8-mer has 24 one-letter neighbours: round 2 asks each new one once, then edits
        # of them (two or more letters from the best), never a design twice
        seen = [tuple(r.design.argmax(-1).tolist()) for r in store.records()]
        last = results["hill_climb"][2]
        assert last["repeated"] == 0 and last["edited"] >= 30 - 24 and len(set(seen)) == 54
        assert results["hill_climb"][1]["repeated"] == 0


def test_best_edits_fill_a_dry_round_with_the_acquisitions_favourites_and_resume_exactly(tiny_tfbind_model, tmp_path,
                                                                                          monkeypatch):
    from difftilt.core.online import run_online
    from difftilt.core.process import Process
    from difftilt.core.store import SQLiteFeedbackStore

    # A collapsed model: every sample is one of four 8-mers, so from round 1 on every design is an edit.
    modes = _one_hot(torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3], [3, 3, 2, 2, 1, 1, 0, 0],
                                   [0, 0, 0, 0, 3, 3, 3, 3], [1, 2, 1, 2, 1, 2, 1, 2]]), 4)
    monkeypatch.setattr(Process, "sample", lambda self, n, generator=None, x0=None: modes[torch.arange(n) % 4])
    cfg = {"plugin": "sequences", "seed": 0, "process": {"name": "pretrained", "path": str(tiny_tfbind_model)},
           "oracle": {"reward": {"name": "tfbind8"}, "batch_size": 16}, "methods": ["ucb"], "schedule": [16, 16, 16],
           "alpha": 0.1, "finetune": {"iterations": 2, "batch_size": 8, "lr": 1e-3, "value_refit_iterations": 0},
           "reward_model": {"epochs": 20}, "eval_samples": 8}
    runs = {fill: run_online({**cfg, "fill": fill}, output_dir=str(tmp_path), name=fill, progress=False).path
            for fill in ("edits", "best_edits")}

    def designs(path, rnd):
        with SQLiteFeedbackStore(path / "ucb" / "feedback.sqlite", readonly=True) as store:
            return torch.stack([r.design for r in store.records(round=rnd)])

    assert torch.equal(designs(runs["edits"], 0), designs(runs["best_edits"], 0))  # no acquisition before round 1
    rows = json.loads((runs["best_edits"] / "results.json").read_text())["methods"]["ucb"]
    assert [r["edited"] for r in rows] == [12, 16, 16] and all(r["repeated"] == 0 for r in rows)
    # round 1 asks the edits that round 0's acquisition (saved with its checkpoint) rates highest, not random ones
    from safetensors.torch import load_file

    from difftilt.core.reward_models import UCB, LastLayerUCBRewardModel

    domain = load_plugin("sequences")
    phi = domain.featurizer(domain.make_process(cfg["process"]))
    model = LastLayerUCBRewardModel(phi, phi(modes).shape[-1])
    model.load_fitted(load_file(str(runs["best_edits"] / "ucb" / "checkpoints" / "round_0" / "reward_model.safetensors")))
    ucb = lambda x: UCB(1.0).from_posterior(model.posterior(x))  # noqa: E731
    assert ucb(designs(runs["best_edits"], 1)).mean() > ucb(designs(runs["edits"], 1)).mean()
    assert ucb(designs(runs["best_edits"], 1)).min() > ucb(designs(runs["edits"], 1)).median()
    # a crash after round 1: the resume restores round 1's reward model and asks round 2's designs again, the same
    crashed = _crash_before_last_round(runs["best_edits"], tmp_path / "crashed", 2)
    run_online(resume=crashed, progress=False)
    assert torch.equal(designs(crashed, 2), designs(runs["best_edits"], 2))


def _crash_before_last_round(run, into, last: int, method: str = "ucb"):
    """A copy of a finished run folder as a crash right after round ``last - 1`` left it."""
    import shutil
    import sqlite3

    shutil.copytree(run, into)
    with sqlite3.connect(into / method / "feedback.sqlite") as db:
        db.execute("DELETE FROM queries WHERE round = ?", (last,))
    shutil.rmtree(into / method / "checkpoints" / f"round_{last}")
    lines = (into / method / "rounds.jsonl").read_text().splitlines()
    (into / method / "rounds.jsonl").write_text("\n".join(lines[:last]) + "\n")
    (into / method / "state.json").write_text(json.dumps({"rounds_done": last}) + "\n")
    (into / "status.json").write_text(json.dumps({"state": "running"}) + "\n")
    return into


@pytest.mark.slow
def test_edit_share_asks_the_acquisitions_favourite_edits_of_the_best_answers_beside_the_models_samples(
        tiny_tfbind_model, tmp_path):
    from safetensors.torch import load_file

    from difftilt.core.online import run_online
    from difftilt.core.reward_models import UCB, LastLayerUCBRewardModel
    from difftilt.core.store import SQLiteFeedbackStore

    # a model that does not run dry, with random edits as its fill: only edit_share brings edits
    cfg = {"plugin": "sequences", "seed": 2, "process": {"name": "pretrained", "path": str(tiny_tfbind_model)},
           "oracle": {"reward": {"name": "tfbind8"}, "batch_size": 16}, "methods": ["ucb"], "schedule": [16, 16, 16],
           "alpha": 0.1, "finetune": {"iterations": 2, "batch_size": 8, "lr": 1e-3, "value_refit_iterations": 0},
           "reward_model": {"epochs": 20}, "eval_samples": 8, "fill": "edits", "edit_share": 0.3}
    run = run_online(cfg, output_dir=str(tmp_path), name="share", progress=False).path
    rows = json.loads((run / "results.json").read_text())["methods"]["ucb"]
    assert [r["edited"] for r in rows] == [0, 4, 4] and all(r["repeated"] == 0 for r in rows)  # int(0.3 * 16)
    with SQLiteFeedbackStore(run / "ucb" / "feedback.sqlite", readonly=True) as store:
        first = store.records(round=0)
        second = [r.design for r in store.records(round=1)]
        asked = [tuple(r.design.argmax(-1).tolist()) for r in store.records()]
    assert len(set(asked)) == 48  # still never a design twice
    # round 1's last 4 are single edits of round 0's answers, among the best the acquisition rates of all of them
    domain = load_plugin("sequences")
    phi = domain.featurizer(domain.make_process(cfg["process"]))
    model = LastLayerUCBRewardModel(phi, phi(second[0][None]).shape[-1])
    model.load_fitted(load_file(str(run / "ucb" / "checkpoints" / "round_0" / "reward_model.safetensors")))
    ucb = lambda x: UCB(1.0).from_posterior(model.posterior(x))  # noqa: E731
    parents = torch.stack([r.design for r in first if r.feasible]).argmax(-1)
    letters = {tuple(p.tolist()) for p in parents}
    mutants = {m for p in parents.tolist() for i in range(8) for a in range(4) if a != p[i]
               for m in [tuple(p[:i] + [a] + p[i + 1:])] if m not in letters}
    every = _one_hot(torch.tensor(sorted(mutants)), 4)
    edits = torch.stack(second[12:])
    assert {tuple(e.argmax(-1).tolist()) for e in edits} <= mutants
    assert ucb(edits).min() >= ucb(every).quantile(0.95)
    assert ucb(torch.stack(second[:12])).mean() < ucb(edits).mean()  # the model's own samples, rated lower
    # its reward model is kept with each round's checkpoint, so a resumed round asks the same edits
    crashed = _crash_before_last_round(run, tmp_path / "crashed", 2)
    run_online(resume=crashed, progress=False)
    with SQLiteFeedbackStore(crashed / "ucb" / "feedback.sqlite", readonly=True) as a, \
            SQLiteFeedbackStore(run / "ucb" / "feedback.sqlite", readonly=True) as b:
        assert torch.equal(torch.stack([r.design for r in a.records(round=2)]),
                           torch.stack([r.design for r in b.records(round=2)]))


def test_edit_share_must_leave_the_model_a_share():
    from difftilt.core.online import _validate

    base = {"plugin": "sequences", "oracle": {"reward": {"name": "tfbind8"}}}
    assert _validate({**base, "edit_share": 0.25}).edit_share == 0.25
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match=r"config.edit_share: a share of each round in \[0, 1\)"):
            _validate({**base, "edit_share": bad})


def test_a_sequence_file_is_read_as_fasta_records_or_lines_whatever_its_encoding_marks(tmp_path):
    from difftilt.plugins.sequences.pretrain_cli import file_corpus

    wrapped = tmp_path / "wrapped.fa"  # records over several lines, as most FASTA files write them
    wrapped.write_bytes(b"\xef\xbb\xbf>one\r\nACGT\r\nTT\r\n\r\n>two\r\nacgtac\r\n")  # Excel's BOM, Windows ends
    tokens, letters, _ = file_corpus(str(wrapped), alphabet="acgt")
    assert letters == "ACGT" and tokens.tolist() == [[0, 1, 2, 3, 3, 3], [0, 1, 2, 3, 0, 1]]
    plain = tmp_path / "plain.txt"  # no headers: one sequence per line
    plain.write_text("ACG\nTTA\n")
    assert file_corpus(str(plain), alphabet="ACGT")[0].tolist() == [[0, 1, 2], [3, 3, 0]]
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"ACGT\nAC\xb5T\n")
    with pytest.raises(InputDataError, match=r"latin.txt: line 2 is not UTF-8 text \(byte 0xb5\)"):
        file_corpus(str(latin), alphabet="ACGT")
    latin.write_bytes(b"\xef\xbb\xbfACGT\nAC\xb5T\n")  # after a byte-order mark: the same line and byte
    with pytest.raises(InputDataError, match=r"latin.txt: line 2 is not UTF-8 text \(byte 0xb5\)"):
        file_corpus(str(latin), alphabet="ACGT")
    with pytest.raises(ConfigError, match="'A' more than once"):
        file_corpus(str(plain), alphabet="ACGTa")
    with pytest.warns(UserWarning, match="uses only ACGT: for nucleotides, set data.alphabet"):
        file_corpus(str(plain))  # the default alphabet is the amino acids'


def test_sample_checks_its_output_and_count_before_sampling_and_makes_the_output_folder(tiny_tfbind_model, tmp_path,
                                                                                       capsys):
    from difftilt.core.cli import main

    cases = [(["-n", "0"], "--num-samples and --batch-size must be >= 1, got 0 and 1024"),
             (["-n", "4", "-o", str(tmp_path / "dir.fasta")], "is a folder; name a file in it"),
             (["--device", "gpu0"], "--device 'gpu0': not a torch device"),
             (["--device", "meta"], "--device meta: sampling runs on cpu, cuda or mps")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda: torch sees no CUDA GPU here"))
    for args, message in cases:
        (tmp_path / "dir.fasta").mkdir(exist_ok=True)
        out = ["-o", str(tmp_path / "x.fasta")] if "-o" not in args else []
        assert main(["sample", str(tiny_tfbind_model), *args, *out]) == 2
        assert message in capsys.readouterr().err
    nested = tmp_path / "new" / "folder" / "designs.fasta"
    assert main(["sample", str(tiny_tfbind_model), "-n", "5", "-o", str(nested)]) == 0
    assert nested.read_text().count(">sample_") == 5
    # in batches of 2 from one generator: the same designs as the first call's of its size
    batched = tmp_path / "batched.txt"
    assert main(["sample", str(tiny_tfbind_model), "-n", "5", "--batch-size", "2", "-o", str(batched),
                 "--no-progress"]) == 0
    assert len(batched.read_text().split()) == 5


def test_a_fine_tuned_checkpoint_of_a_model_named_by_a_relative_path_loads_from_any_folder(tiny_tfbind_model,
                                                                                           tmp_path, monkeypatch):
    import copy

    from difftilt.core.checkpoint import load_finetuned, save_model

    monkeypatch.chdir(tiny_tfbind_model.parent)
    spec = {"name": "pretrained", "path": tiny_tfbind_model.name}  # as a config names it, from the run's folder
    process = load_plugin("sequences").make_process(spec)
    save_model(copy.deepcopy(process), process, tmp_path / "ck", plugin="sequences", process=spec)
    monkeypatch.chdir(tmp_path)
    assert json.loads((tmp_path / "ck" / "model_index.json").read_text())["process"]["path"] == str(tiny_tfbind_model)
    assert load_finetuned(tmp_path / "ck").model.sample(2).shape == (2, 8, 5)
