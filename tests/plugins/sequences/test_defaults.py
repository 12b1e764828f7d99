"""The committed default models: present, reproducible from their recorded command, and good.

(The figures on 1,000+ samples are in ``python -m difftilt.benchmarks.sequences_pretrained``;
these checks use fewer samples with a fixed seed and bounds a broken model cannot meet.)
"""

import json

import pytest
import torch

from difftilt.core.plugins import load_plugin
from difftilt.plugins.sequences import EhrlichFunction, TFBind8
from difftilt.plugins.sequences.domain import checkpoint_path
from tests.helpers import DEVICES


@pytest.mark.parametrize("name, config", [("ehrlich-20-32-2-4", "pretrain_ehrlich.yaml"),
                                          ("tfbind8", "pretrain_tfbind8.yaml")])
def test_default_checkpoint_records_the_command_and_seed_that_made_it(name, config):
    info = json.loads((checkpoint_path(name) / "process.json").read_text())
    assert info["command"].startswith("difftilt pretrain") and config in info["command"]
    assert info["train"]["seed"] == 0 and info["process"]["sampler"] == "first_hit"
    assert (checkpoint_path(name) / "denoiser.safetensors").stat().st_size < 4_000_000
    # the shipped config, read as `difftilt pretrain` reads it, is the one that made it
    from importlib import resources

    from difftilt.core.config import load_yaml

    cfg = load_yaml(resources.files("difftilt.plugins.sequences") / "configs" / config)
    assert info["train"] == {**cfg["model"], **cfg["train"]}
    assert {k: v for k, v in info["data"].items() if k != "num_sequences_used"} == cfg["data"]
    assert all(info["process"][k] == v for k, v in cfg["process"].items())


def test_ehrlich_default_samples_are_feasible():
    process = load_plugin("sequences").make_process("ehrlich")
    f = EhrlichFunction(20, 32, 2, 4, seed=0)
    x = process.sample(300, generator=torch.Generator().manual_seed(0))
    ids = process.tokens(x)
    assert (ids < 20).all()
    value, feasible = f(ids)
    assert feasible.float().mean().item() >= 0.99  # the corpus is 100% feasible; a uniform sampler ~0%
    assert 0.0 < value[feasible].mean().item() < 0.5  # the pretrained level: far from the optimum 1.0


def test_tfbind8_default_samples_look_like_its_training_half():
    process = load_plugin("sequences").make_process("tfbind8")
    table = TFBind8()
    train = table.offline_dataset()
    threshold = float(table(train).max())
    ids = process.tokens(process.sample(2000, generator=torch.Generator().manual_seed(0)))
    inside = (table(ids) <= threshold).float().mean().item()
    # independent positions with the half's letter frequencies: the bar a model that
    # learned nothing about the half's structure would reach
    freq = torch.nn.functional.one_hot(train, 4).float().mean(0)
    g = torch.Generator().manual_seed(1)
    indep = torch.stack([torch.multinomial(freq[l], 2000, replacement=True, generator=g) for l in range(8)], 1)
    baseline = (table(indep) <= threshold).float().mean().item()
    assert inside > baseline + 0.05  # measured: 0.66 against 0.57 (0.68 against 0.59 on 10,000 samples)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", ["online_ehrlich.yaml", "online_tfbind8.yaml"])
def test_shipped_online_configs_run_end_to_end_at_tiny_size(config, device, tmp_path):
    from importlib import resources

    from difftilt.core.online import run_online

    path = str(resources.files("difftilt.plugins.sequences") / "configs" / config)
    accelerator = "gpu" if device == "cuda" else "cpu"
    run = run_online(path, overrides=["schedule=[16, 16]", "finetune.iterations=2", "finetune.batch_size=4",
                                      "eval_samples=16", "reward_model.epochs=5", "oracle.batch_size=16",
                                      f"finetune.accelerator={accelerator}"],
                     output_dir=str(tmp_path), name="tiny", progress=False)
    results = run.read_json("results.json")["methods"]
    assert set(results) == {"ucb", "ga", "hill_climb"}
    for rows in results.values():
        assert [r["queries_used"] for r in rows] == [16, 32]
        assert 0.0 <= rows[-1]["best_true"] <= 1.0
    assert (run.path / "reward_vs_queries.png").is_file()


def test_the_committed_ehrlich_64_benchmark_model_is_what_its_task_would_pretrain_and_its_samples_are_feasible():
    from difftilt.benchmarks.sequences import _pretrained_process, committed_model, pretrain_config

    task = "ehrlich-20-64-4-4"
    folder = committed_model(task)
    info = json.loads((folder / "process.json").read_text())
    cfg = pretrain_config(task)
    assert info["train"] == {**cfg["model"], **cfg["train"]} and info["train"]["steps"] == 2000
    assert {k: v for k, v in info["data"].items() if k != "num_sequences_used"} == cfg["data"]
    assert info["command"].startswith("python -m difftilt.benchmarks.sequences --tasks ehrlich-20-64-4-4")
    # the benchmark reads it instead of pretraining (a missing --runs folder is never touched)
    assert _pretrained_process(task, folder / "no-such-runs") == {"name": "pretrained", "path": str(folder)}
    process = load_plugin("sequences").make_process({"name": "pretrained", "path": str(folder)})
    f = EhrlichFunction(20, 64, 4, 4, seed=0)
    ids = process.tokens(process.sample(100, generator=torch.Generator().manual_seed(0)))
    value, feasible = f(ids)
    assert ids.shape == (100, 64) and feasible.all()  # 1,000 of 1,000 in the benchmark's check
    assert 0.0 < value.mean().item() < 0.2  # the pretrained level (0.034 on 1,000)
