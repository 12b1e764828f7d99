"""Pretraining: a held-out loss, a loss plot, and a run stopped at any step that resumes to the same model."""

import json

import pytest
import torch
import yaml

from difftilt.core.cli import main
from difftilt.core.errors import ConfigError
from difftilt.plugins.sequences import pretrain as pretrain_module
from difftilt.plugins.sequences.pretrain import STATE_FILE, split_validation, train_masked_diffusion
from difftilt.plugins.sequences.pretrain_cli import pretrain_from_config

TINY = {"dim": 16, "depth": 1, "heads": 2, "batch_size": 32, "lr": 3e-3, "warmup": 5, "seed": 0}


def _corpus(n=200, L=6, V=4, seed=0):
    return torch.randint(V, (n, L), generator=torch.Generator().manual_seed(seed))


class _StopAt:
    """Stands in for the loss function and raises KeyboardInterrupt at its ``n``-th call
    (a run killed mid-training)."""

    def __init__(self, n, real):
        self.n, self.real, self.calls = n, real, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.real(*args, **kwargs)


def test_a_stopped_pretraining_resumes_from_its_last_save_to_the_same_weights_and_losses(tmp_path, monkeypatch):
    data = _corpus()
    whole, whole_log = train_masked_diffusion(data, 4, steps=130, val_fraction=0.2, progress=False, **TINY)
    state = tmp_path / STATE_FILE
    monkeypatch.setattr(pretrain_module, "masked_diffusion_loss", _StopAt(98, pretrain_module.masked_diffusion_loss))
    with pytest.raises(KeyboardInterrupt):
        train_masked_diffusion(data, 4, steps=130, val_fraction=0.2, save_every=40, state_file=state,
                               progress=False, **TINY)
    monkeypatch.undo()
    assert torch.load(state, weights_only=True)["step"] == 80  # the last save before step 98
    with pytest.raises(ConfigError, match="lr differ"):
        train_masked_diffusion(data, 4, steps=130, val_fraction=0.2, state_file=state, resume=True,
                               progress=False, **{**TINY, "lr": 1e-3})
    with pytest.raises(ConfigError, match="data_sha256 differ"):
        train_masked_diffusion(_corpus(seed=1), 4, steps=130, val_fraction=0.2, state_file=state, resume=True,
                               progress=False, **TINY)
    resumed, log = train_masked_diffusion(data, 4, steps=130, val_fraction=0.2, save_every=40, state_file=state,
                                          resume=True, progress=False, **TINY)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert log == whole_log and len(log.losses) == len(log.val_losses) == 2  # steps 50 and 100


def test_the_held_out_sequences_are_apart_from_the_training_ones_and_their_loss_is_logged():
    data = torch.arange(100)[:, None].repeat(1, 3)  # every row its own
    train, val = split_validation(data, 0.1, seed=0)
    assert val.shape[0] == 10 and train.shape[0] == 90
    assert set(train[:, 0].tolist()).isdisjoint(val[:, 0].tolist())
    assert sorted(train[:, 0].tolist() + val[:, 0].tolist()) == list(range(100))
    assert torch.equal(split_validation(data, 0.0, seed=0)[0], data)
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="val_fraction"):
            split_validation(data, bad, seed=0)
    with pytest.raises(ConfigError, match="leaves 0 to hold out"):
        split_validation(data[:3], 0.1, seed=0)
    # a corpus too small to generalize from: the model memorizes it, and the held-out loss says so
    # (random letters: nothing to learn but the 30 training sequences themselves)
    data = _corpus(n=40, L=8)
    _, log = train_masked_diffusion(data, 4, steps=600, val_fraction=0.25, progress=False,
                                    **{**TINY, "depth": 2, "dim": 32, "batch_size": 30, "lr": 1e-2})
    assert log.val_sequences == 10 and len(log.val_losses) == len(log.losses) == 12
    assert log.losses[-1] < log.losses[0] < 1.39  # below log(4), the loss of knowing nothing
    assert log.val_losses[-1] > log.val_losses[0] > 1.39 and log.val_losses[-1] > log.losses[-1] + 0.5
    _, no_val = train_masked_diffusion(data, 4, steps=50, progress=False, **TINY)
    assert no_val.val_losses == [] and no_val.val_sequences == 0


def test_the_pretrain_command_refuses_to_overwrite_a_stopped_run_and_resumes_it_with_resume(tmp_path, monkeypatch,
                                                                                              capsys):
    fasta = tmp_path / "seqs.fa"
    fasta.write_text("".join(f">s{i}\n{''.join('ACGT'[t] for t in row)}\n" for i, row in enumerate(_corpus().tolist())))
    cfg = {"plugin": "sequences", "output": str(tmp_path / "model"),
           "data": {"name": "file", "path": str(fasta), "alphabet": "ACGT"},
           "model": {"dim": 16, "depth": 1, "heads": 2}, "process": {"num_steps": 4},
           "train": {"steps": 120, "batch_size": 32, "lr": 3e-3, "warmup": 5, "seed": 0, "save_every": 50,
                     "val_fraction": 0.1}}
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(pretrain_module, "masked_diffusion_loss", _StopAt(70, pretrain_module.masked_diffusion_loss))
    assert main(["pretrain", str(path), "--no-progress"]) == 130  # stopped (Ctrl-C) at step 70
    monkeypatch.undo()
    state = tmp_path / "model" / STATE_FILE
    assert state.is_file()
    assert capsys.readouterr().err.strip().splitlines()[-2:] == [
        f"pretraining stopped; its state at step 50 is in {state}: continue it with difftilt pretrain {path} --resume",
        "difftilt: interrupted"]
    assert main(["show", str(tmp_path / "model")]) == 0  # where it stands, and the command that goes on
    shown = capsys.readouterr().out.strip().splitlines()
    assert shown[0].startswith("pretraining, unfinished: its state at step 50 of 120 was saved ")
    log = torch.load(state, weights_only=True)["log"]  # step 50's losses, the first logged
    assert shown[1:] == [f"model folder: {tmp_path / 'model'}",
                         f"loss {log['losses'][0]:.4f} (first logged {log['losses'][0]:.4f}), held-out "
                         f"{log['val_losses'][0]:.4f} (first {log['val_losses'][0]:.4f})",
                         f"if it has stopped, continue it with: difftilt pretrain {path} --resume"]
    assert main(["pretrain", str(path), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"difftilt: error: {tmp_path / 'model'} holds an unfinished pretraining (step 50 of 120); continue it with "
        f"--resume, or delete {state} to start over"]
    assert main(["pretrain", str(path), "--no-progress", "--resume"]) == 0
    assert not state.exists()
    folder = tmp_path / "model"
    assert (folder / "training.png").stat().st_size > 0
    info = json.loads((folder / "process.json").read_text())
    assert info["command"] == f"difftilt pretrain {path}" and len(info["val_losses"]) == len(info["losses"]) == 2
    capsys.readouterr()
    assert main(["show", str(folder)]) == 0
    assert capsys.readouterr().out.strip().splitlines() == [
        "pretrained model: 120 steps on 200 sequences (file)", f"model folder: {folder}",
        f"loss {info['losses'][-1]:.4f} (first logged {info['losses'][0]:.4f}), held-out {info['val_losses'][-1]:.4f} "
        f"(first {info['val_losses'][0]:.4f})", f"made by: difftilt pretrain {path}", f"loss curve: {folder / 'training.png'}"]
    assert main(["show", str(folder), "--plot", str(tmp_path / "p.png")]) == 2
    assert capsys.readouterr().err.strip() == (f"difftilt: error: --plot draws a run's rounds or updates; {folder} is "
                                               "a model folder")
    whole = pretrain_from_config({**cfg, "output": str(tmp_path / "whole")}, progress=False)
    assert (whole / "denoiser.safetensors").read_bytes() == (folder / "denoiser.safetensors").read_bytes()
    assert main(["pretrain", str(path), "--no-progress", "--resume"]) == 2  # nothing left to resume
    assert "nothing to resume" in capsys.readouterr().err


def test_bad_training_settings_and_an_unwritable_output_are_errors_before_any_training(tmp_path, capsys):
    plain = tmp_path / "seqs.txt"
    plain.write_text("ACGT\nTTGA\nCCAA\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    base = {"plugin": "sequences", "output": str(tmp_path / "m"),
            "data": {"name": "file", "path": str(plain), "alphabet": "ACGT"},
            "model": {"dim": 8, "depth": 1, "heads": 1}, "train": {"steps": 3, "batch_size": 2, "warmup": 1}}
    cases = [({"train": {"steps": 0}}, "train.steps must be a whole number >= 1, got 0"),
             ({"train": {"batch_size": 0}}, "train.batch_size must be a whole number >= 1, got 0"),
             ({"train": {"lr": 0.0}}, "train.lr must be a positive number, got 0.0"),
             ({"output": str(a_file)}, f"output {a_file} is a file, not a model folder"),
             ({"output": str(a_file / "m")}, "is not a writable folder"),
             ({"train": {"steps": 5, "lr": 1e30}}, "training diverged; lower train.lr (now 1e+30)")]
    for change, message in cases:
        cfg = {**base, **{k: ({**base[k], **v} if isinstance(v, dict) else v) for k, v in change.items()}}
        path = tmp_path / "p.yaml"
        path.write_text(yaml.safe_dump(cfg))
        assert main(["pretrain", str(path), "--no-progress"]) == 2, change
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (change, err)
        assert not (tmp_path / "m").exists() or change["train"].get("lr") == 1e30
    state = tmp_path / "m" / STATE_FILE
    state.parent.mkdir(exist_ok=True)
    state.write_bytes(b"not a state")
    path.write_text(yaml.safe_dump(base))
    assert main(["pretrain", str(path), "--no-progress", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a readable pretraining state" in err[0] and "delete it to start over" in err[0]


def test_the_pretraining_bar_writes_a_log_file_a_line_now_and_then_not_one_per_step(monkeypatch, capsys):
    import sys

    from difftilt.core.finetune import bar_interval

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)  # stderr is a log file
    monkeypatch.setattr(pretrain_module.tqdm, "monitor_interval", 0)  # no monitor thread to add redraws
    train_masked_diffusion(_corpus(), 4, steps=100, progress=True, **TINY)
    out, err = capsys.readouterr()
    drawn = [line.split("/100")[0].split()[-1] for line in err.split("\r") if "/100 [" in line]
    assert out == "" and drawn == ["0", "100"]  # 30 s between redraws: the start and the end of a short run
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert bar_interval() == 0.1  # tqdm's own on a terminal
