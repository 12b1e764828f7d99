"""The difftilt command, end to end, in subprocesses (as a user runs it)."""

import json
import os
import subprocess
import sys

import pytest
import yaml

TINY = {
    "plugin": "toy",
    "seed": 0,
    "process": {"name": "mixture", "num_steps": 5},
    "reward": {"name": "linear", "weights": [1.0, 0.5]},
    "finetune": {"alpha": 1.0, "iterations": 4, "batch_size": 16, "value_refit_iterations": 2,
                 "initial_iterations": 3, "initial_steps": 4, "initial_batch_size": 16},
    "eval_samples": 64,
}


def _run(args, cwd, **env):
    return subprocess.run([sys.executable, "-m", "difftilt", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)


def _write(tmp_path, cfg, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _one_line_error(proc):
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("difftilt: error: "), proc.stderr
    return lines[0]


def test_plugins_lists_the_installed_plugins(tmp_path):
    proc = _run(["plugins"], tmp_path)
    names = [line.split()[0] for line in proc.stdout.splitlines()]
    assert proc.returncode == 0 and {"toy", "sequences"} <= set(names) and names == sorted(names)
    listed = {row["name"]: row for row in json.loads(_run(["plugins", "--json"], tmp_path).stdout)}
    assert listed["toy"]["target"] == "difftilt.plugins.toy:ToyDomain"
    assert listed["sequences"]["target"] == "difftilt.plugins.sequences:SequencesDomain"
    assert listed["toy"]["description"].startswith("analytic")
    # with autoload off, plugins are listed without being imported
    off = json.loads(_run(["plugins", "--json"], tmp_path, DIFFTILT_DISABLE_PLUGIN_AUTOLOAD="1").stdout)
    assert {row["name"] for row in off} >= {"toy", "sequences"} and all(row["description"] == "" for row in off)


@pytest.mark.slow
def test_finetune_writes_a_complete_run_folder_and_sample_reads_the_model(tmp_path):
    cfg = _write(tmp_path, TINY)
    proc = _run(["finetune", str(cfg), "--output-dir", str(tmp_path / "runs"), "--name", "tiny", "--no-progress"],
                tmp_path)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "runs" / "tiny"
    for name in ("config.yaml", "status.json", "metrics.csv", "metrics.json", "metrics.jsonl", "summary.json",
                 "training.png", "model/model_index.json", "checkpoints/transitions/model_index.json",
                 "checkpoints/initial/model_index.json"):
        assert (run / name).is_file(), name
    assert json.loads((run / "status.json").read_text())["state"] == "complete"
    rows = json.loads((run / "metrics.json").read_text())
    assert [r["stage"] for r in rows] == ["transitions"] * 4 + ["value"] * 2 + ["initial"] * 3
    summary = json.loads((run / "summary.json").read_text())
    assert {"sw2", "mean_error", "weight_error"} <= set(summary["finetuned"])
    saved = yaml.safe_load((run / "config.yaml").read_text())
    import inspect

    from difftilt.core import Finetuner

    assert saved["finetune"]["lr"] == inspect.signature(Finetuner).parameters["lr"].default  # defaults filled in
    assert f"run folder: {run}" in proc.stdout and "KL(fine-tuned || pretrained)" in proc.stdout
    assert proc.stdout.splitlines()[0] == f"running in {run} (follow it from another terminal: difftilt show {run})"

    out = tmp_path / "s.npy"
    proc = _run(["sample", str(run / "model"), "-n", "7", "-o", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    import numpy as np

    assert np.load(out).shape == (7, 2)
    # the toy's designs are points, not text; an unknown suffix is refused before sampling
    assert "plugin 'toy' designs are not text" in _one_line_error(
        _run(["sample", str(run / "model"), "-o", str(tmp_path / "s.fasta")], tmp_path))
    assert "--output s.pt: write .safetensors, .npy, or text designs to .fasta / .fa / .txt" in _one_line_error(
        _run(["sample", str(run / "model"), "-o", "s.pt"], tmp_path))
    # a folder that holds no model names what it looked for
    assert f"{run} is neither a fine-tuned model folder (no model_index.json) nor a pretrained model folder of " \
           "an installed plugin (tried: " in _one_line_error(_run(["sample", str(run)], tmp_path))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"plugin": "toyy"}, "unknown plugin 'toyy' (did you mean 'toy'?)"),
        ({"finetune": {**TINY["finetune"], "alpha": "abc"}}, "finetune.alpha: expected a number, got str 'abc'"),
        ({"finetune": {**TINY["finetune"], "iteratons": 3}}, "finetune: unknown field 'iteratons' (did you mean 'iterations'?)"),
        ({"process": {"name": "mixture", "num_steps": 5, "eta": 0.0}}, "deterministic"),
        ({"reward": {"name": "cubic"}}, "reward.name: plugin 'toy' has no reward 'cubic'"),
        ({"reward": {"name": "linear", "weights": [1.0, 0.5, 2.0]}}, "shape (b, 3)"),
    ],
)
def test_bad_config_is_one_error_line_and_leaves_no_run_folder(tmp_path, change, message):
    cfg = _write(tmp_path, {**TINY, **change})
    proc = _run(["finetune", str(cfg), "--output-dir", str(tmp_path / "runs"), "--no-progress"], tmp_path)
    line = _one_line_error(proc)
    assert message in line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_reward_returning_inf_fails_the_run_cleanly(tmp_path):
    # weights of 1e38 overflow float32 to inf on the first batch
    cfg = _write(tmp_path, {**TINY, "reward": {"name": "linear", "weights": [1e38, 1e38]}})
    proc = _run(["finetune", str(cfg), "--output-dir", str(tmp_path / "runs"), "--name", "bad", "--no-progress"],
                tmp_path)
    line = _one_line_error(proc)
    assert "reward 'linear' returned" in line and "feasible designs" in line
    run = tmp_path / "runs" / "bad"
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and "RewardError" in status["error"]
    assert not (run / "summary.json").exists() and not (run / "model").exists()


def test_missing_config_file_and_bad_override(tmp_path):
    assert "config file not found" in _one_line_error(_run(["finetune", "nope.yaml"], tmp_path))
    cfg = _write(tmp_path, TINY)
    line = _one_line_error(_run(["finetune", str(cfg), "--set", "finetune.batch_size=many"], tmp_path))
    assert "finetune.batch_size: expected an integer" in line


def test_debug_shows_the_traceback(tmp_path):
    cfg = _write(tmp_path, {**TINY, "plugin": "nope"})
    proc = _run(["--debug", "finetune", str(cfg)], tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "PluginNotFoundError" in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "loggers=[tb]"], "config.loggers: unknown logger 'tb' (known: csv, tensorboard)"),
        (["--set", "finetune.lr=0"], "finetune.lr must be a positive number, got 0.0"),
        (["--set", "finetune.devices=2"], "finetune.devices: 2 gives 2 devices, but fine-tuning runs on one"),
        (["--name", "../escaped"], "the run name must be a plain folder name"),
    ],
)
def test_values_that_failed_inside_the_run_are_one_error_line_before_any_run_folder(tmp_path, args, message):
    cfg = _write(tmp_path, TINY)
    proc = _run(["finetune", str(cfg), "--output-dir", str(tmp_path / "runs"), "--no-progress", *args], tmp_path)
    assert message in _one_line_error(proc)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "escaped").exists()


def test_an_output_dir_with_a_file_in_the_way_is_one_error_line(tmp_path):
    cfg = _write(tmp_path, TINY)
    (tmp_path / "runs").write_text("")
    proc = _run(["finetune", str(cfg), "--output-dir", str(tmp_path / "runs"), "--no-progress"], tmp_path)
    assert f"cannot create a run folder in {tmp_path / 'runs'}: " in _one_line_error(proc)


def test_a_diverging_run_fails_as_divergence_not_as_the_rewards_nan(tmp_path):
    cfg = _write(tmp_path, {**TINY, "finetune": {**TINY["finetune"], "lr": 1e8, "learn_initial": False}})
    proc = _run(["finetune", str(cfg), "--output-dir", str(tmp_path / "runs"), "--name", "hot", "--no-progress"],
                tmp_path)
    line = _one_line_error(proc)
    assert "fine-tuning diverged in stage 'transitions': " in line and " at iteration " in line
    assert line.endswith("lower finetune.lr (now 1e+08) or finetune.max_grad_norm (now 1)")
    status = json.loads((tmp_path / "runs" / "hot" / "status.json").read_text())
    assert status["state"] == "failed" and status["error"].startswith("TrainingDivergedError: ")
    assert not (tmp_path / "runs" / "hot" / "model").exists()


def test_output_whose_reader_went_away_ends_quietly(tmp_path):
    """``difftilt ... | head``: the pipe's reader closes before the command prints; no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "difftilt", "plugins"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # long before the command, still importing, prints its first line
    err = proc.stderr.read()
    assert proc.wait(timeout=600) == 141 and err == ""
