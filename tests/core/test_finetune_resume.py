"""difftilt finetune --resume: a stopped run continues from its saved state and ends exactly
as a run never stopped."""

import json
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difftilt.core.cli import main
from difftilt.core.errors import CheckpointError, ConfigError
from difftilt.core.finetune import STAGES, read_state
from difftilt.core.run import STATE_FILE, RunFolder, run_finetune
from difftilt.core.system import EntropyRegularizedSystem

# 7 transitions updates, 3 value updates, 5 initial updates; a state every 2 updates
TINY = {
    "plugin": "toy",
    "seed": 0,
    "process": {"name": "mixture", "num_steps": 5},
    "reward": {"name": "linear", "weights": [1.0, 0.5]},
    "finetune": {"alpha": 1.0, "iterations": 7, "batch_size": 16, "warmup": 2, "value_refit_iterations": 3,
                 "initial_iterations": 5, "initial_steps": 4, "initial_batch_size": 16, "save_every": 2},
    "eval_samples": 64,
}
CROSS_ENTROPY = {**TINY, "finetune": {**TINY["finetune"], "strategy": {"name": "cross_entropy", "resample": 4,
                                                                      "reuse": 3}}}


def _with(cfg: dict, **finetune) -> dict:
    return {**cfg, "finetune": {**cfg["finetune"], **finetune}}


def _stop_at(monkeypatch, call: int) -> None:
    """Ctrl-C at the run's ``call``-th update (counted from 0 over all its stages)."""
    original = EntropyRegularizedSystem.training_step
    calls = []

    def step(self, batch, batch_idx):
        if len(calls) == call:
            raise KeyboardInterrupt
        calls.append(batch)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(EntropyRegularizedSystem, "training_step", step)


def _stopped(tmp_path, monkeypatch, cfg: dict, call: int, name: str = "run") -> RunFolder:
    """The run folder of ``cfg`` stopped by a Ctrl-C at its ``call``-th update; later updates run."""
    _stop_at(monkeypatch, call)
    with pytest.raises(KeyboardInterrupt) as stop:
        run_finetune(cfg, output_dir=tmp_path, name=name, progress=False)
    monkeypatch.undo()
    run = RunFolder(tmp_path / name)
    assert stop.value.run == run.path
    return run


def _model(path) -> dict[str, torch.Tensor]:
    """Every tensor of a run's final model."""
    tensors = {}
    for f in sorted((path / "model").glob("*.safetensors")):
        tensors.update({f"{f.stem}/{k}": v for k, v in load_file(str(f)).items()})
    return tensors


def _assert_same_model(a, b) -> None:
    ta, tb = _model(a), _model(b)
    assert ta and ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta), [k for k in ta if not torch.equal(ta[k], tb[k])]


@pytest.mark.parametrize("cfg, call, stage, saved, kept", [
    (TINY, 5, "transitions", 4, 4),     # in the middle of the transitions: update 4 redone
    (TINY, 7, "transitions", 7, 7),     # at the value stage's first update: the transitions are not redone
    (TINY, 13, "initial", 2, 12),       # in the middle of the initial law's stage (7 + 3 + 3): update 2 redone
    (CROSS_ENTROPY, 5, "transitions", 3, 3),  # reuse 3 holds a batch across updates: saved where none is held
], ids=["transitions", "stage-end", "initial", "cross-entropy-reuse"])
def test_a_stopped_run_resumes_to_exactly_the_model_and_metrics_of_one_never_stopped(
        tmp_path, monkeypatch, cfg, call, stage, saved, kept):
    straight = run_finetune(cfg, output_dir=tmp_path, name="straight", progress=False)

    stopped = _stopped(tmp_path, monkeypatch, cfg, call, "stopped")
    status = stopped.status()
    assert status["state"] == "interrupted" and "--resume" in status["error"]
    state = read_state(stopped.path / STATE_FILE)
    assert (state["stage"], state["iteration"]) == (stage, saved)
    assert len(stopped.metrics()) == call and len(state["history"]) == kept  # the rows after kept are redone

    # save_every does not change the result: a resumed run may change it
    run = run_finetune(_with(cfg, save_every=1), resume=stopped.path, progress=False)
    assert run.path == stopped.path and run.status()["state"] == "complete"
    _assert_same_model(run.path, straight.path)
    assert run.metrics() == straight.metrics()  # no row twice
    assert run.read_json("metrics.json") == straight.read_json("metrics.json")
    assert not (run.path / STATE_FILE).exists()  # removed once complete
    assert all((run.path / "checkpoints" / s / "model_index.json").is_file() for s in STAGES)


def test_the_state_file_holds_the_stage_the_trained_networks_the_optimizers_and_the_metrics(tmp_path, monkeypatch):
    state = read_state(_stopped(tmp_path, monkeypatch, TINY, 5).path / STATE_FILE)
    assert set(state) == {"format", "stage", "iteration", "modules", "optimizers", "history"}
    assert (state["stage"], state["iteration"]) == ("transitions", 4)
    assert set(state["modules"]) == {"policy", "value_net", "initial"}
    # the tilt's control is saved, not the frozen pretrained chain it wraps
    assert state["modules"]["policy"] and all(k.startswith("control.") for k in state["modules"]["policy"])
    # the policy's and the value's Adam (4 steps taken) and their schedulers (4 steps)
    assert [int(o["state"][0]["step"]) for o in state["optimizers"]["optimizers"]] == [4, 4]
    assert [s["last_epoch"] for s in state["optimizers"]["schedulers"]] == [4, 4]
    assert [(r["stage"], r["iteration"]) for r in state["history"]] == [("transitions", i) for i in range(4)]


def test_a_run_that_is_resumed_and_stopped_again_still_ends_exactly(tmp_path, monkeypatch):
    cfg = _with(TINY, learn_initial=False, strategy="policy_gradient")
    straight = run_finetune(cfg, output_dir=tmp_path, name="straight", progress=False)
    run = _stopped(tmp_path, monkeypatch, cfg, 3)
    states = []
    original = EntropyRegularizedSystem.training_step

    def step(self, batch, batch_idx):  # the resumed run reads running; stopped again at iteration 5
        states.append(run.status()["state"])
        if batch == 5:
            raise KeyboardInterrupt
        return original(self, batch, batch_idx)

    monkeypatch.setattr(EntropyRegularizedSystem, "training_step", step)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(cfg, resume=run.path, progress=False)
    assert states == ["running"] * 4 and run.status()["state"] == "interrupted"  # from iteration 2 to 5
    assert read_state(run.path / STATE_FILE)["iteration"] == 4
    monkeypatch.undo()
    run_finetune(cfg, resume=run.path, progress=False)
    _assert_same_model(run.path, straight.path)
    assert run.metrics() == straight.metrics()


def test_saving_the_state_leaves_an_uninterrupted_run_unchanged(tmp_path):
    every = run_finetune(_with(TINY, save_every=1), output_dir=tmp_path, name="every", progress=False)
    never = run_finetune(_with(TINY, save_every=0), output_dir=tmp_path, name="never", progress=False)
    _assert_same_model(every.path, never.path)
    assert every.metrics() == never.metrics()


def test_save_every_0_saves_at_the_stages_ends_only(tmp_path, monkeypatch):
    run = _stopped(tmp_path, monkeypatch, _with(TINY, save_every=0), 9)  # the value stage's third update
    state = read_state(run.path / STATE_FILE)
    assert (state["stage"], state["iteration"], state["optimizers"]) == ("transitions", 7, None)


def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_complete_run_a_changed_config_and_a_run_without_a_state_are_refused_in_one_line(tmp_path, monkeypatch):
    done = run_finetune(TINY, output_dir=tmp_path, name="done", progress=False)
    with pytest.raises(ConfigError) as err:
        run_finetune(TINY, resume=done.path, progress=False)
    assert _one_line(err) == f"{done.path} is complete: there is nothing to resume"

    stopped = _stopped(tmp_path, monkeypatch, TINY, 3, "stopped").path
    changed = {**_with(TINY, lr=0.02), "seed": 1}
    with pytest.raises(ConfigError) as err:
        run_finetune(changed, resume=stopped, progress=False)
    assert _one_line(err) == (f"the config differs from the one {stopped} was started with (finetune.lr, seed); "
                              "resume it unchanged")
    with pytest.raises(ConfigError, match=r"\(reward.weights\)"):
        run_finetune({**TINY, "reward": {"name": "linear", "weights": [1.0, 0.0]}}, resume=stopped, progress=False)

    (stopped / STATE_FILE).write_bytes(b"torn")
    with pytest.raises(CheckpointError) as err:
        run_finetune(TINY, resume=stopped, progress=False)
    assert _one_line(err).startswith(f"{stopped / STATE_FILE} is not a readable fine-tuning state (")
    (stopped / STATE_FILE).unlink()
    with pytest.raises(ConfigError) as err:
        run_finetune(TINY, resume=stopped, progress=False)
    assert _one_line(err) == f"nothing to resume: {stopped} holds no saved training state ({STATE_FILE})"
    with pytest.raises(CheckpointError) as err:
        run_finetune(TINY, resume=tmp_path, progress=False)
    assert _one_line(err) == f"{tmp_path} is not a difftilt finetune run folder (no config.yaml)"
    with pytest.raises(ConfigError) as err:
        run_finetune(TINY, resume=tmp_path / "stoped", progress=False)
    assert _one_line(err) == f"nothing to resume: {tmp_path / 'stoped'} does not exist"
    with pytest.raises(ConfigError) as err:  # they would name a new folder, and a resumed run stays in its own
        run_finetune(TINY, resume=stopped, output_dir=tmp_path / "elsewhere", name="other", progress=False)
    assert _one_line(err) == (f"a resumed run goes on in its own folder ({stopped}); output_dir and name "
                              "(--output-dir, --name) name a new run's")
    online = tmp_path / "online"
    online.mkdir()
    (online / "config.yaml").write_text("plugin: toy\noracle: {reward: {name: bumps}}\nmethods: [ucb]\n")
    with pytest.raises(ConfigError) as err:
        run_finetune(TINY, resume=online, progress=False)
    assert _one_line(err) == f"{online} is an online run folder (difftilt online), not a finetune one"
    assert RunFolder(stopped).status()["state"] == "interrupted"  # a refusal touches nothing


def test_a_run_another_process_holds_is_not_resumed_until_it_lets_go(tmp_path, monkeypatch):
    straight = run_finetune(TINY, output_dir=tmp_path, name="straight", progress=False)
    run = _stopped(tmp_path, monkeypatch, TINY, 3)
    metrics, state = run.metrics(), (run.path / STATE_FILE).read_bytes()
    with run.lock():  # as a run still going, or resumed in another terminal, holds it
        with pytest.raises(ConfigError) as err:
            run_finetune(TINY, resume=run.path, progress=False)
        assert _one_line(err) == f"{run.path} is in use by another difftilt process"
    assert run.metrics() == metrics and (run.path / STATE_FILE).read_bytes() == state
    run_finetune(TINY, resume=run.path, progress=False)  # the lock went with the holder
    _assert_same_model(straight.path, run.path)


def test_ctrl_c_prints_the_command_that_continues_the_run_and_that_command_ends_it_exactly(
        tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps(TINY))  # JSON is YAML
    straight = run_finetune(_with(TINY, lr=0.02), output_dir=tmp_path, name="straight", progress=False)

    _stop_at(monkeypatch, 12)  # the initial law's stage, update 2
    status = main(["finetune", str(cfg), "--set", "finetune.lr=0.02", "--output-dir", str(tmp_path),
                   "--name", "run", "--no-progress"])
    monkeypatch.undo()
    run = tmp_path / "run"
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 130 and lines[-1] == "difftilt: interrupted"
    command = f"difftilt finetune --resume {run}"  # the run's own config.yaml, --set included
    assert lines[-2] == (f"fine-tuning stopped; its last saved state is in {run / STATE_FILE}: continue it with "
                         f"{command}")
    assert json.loads((run / "status.json").read_text())["state"] == "interrupted"

    assert main(shlex.split(command)[1:] + ["--no-progress"]) == 0
    said = capsys.readouterr()
    assert f"run folder: {run}" in said.out
    assert "it/s" not in said.out + said.err  # no bar: --no-progress wins over the saved config's progress: true
    assert json.loads((run / "status.json").read_text())["state"] == "complete"
    _assert_same_model(run, straight.path)


def test_a_run_resumed_from_another_directory_goes_on_in_the_one_it_was_started_from(tmp_path, monkeypatch):
    (tmp_path / "project").mkdir()
    (tmp_path / "elsewhere" / "deeper").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "project")  # a config's relative paths were given from here
    run = _stopped(tmp_path, monkeypatch, TINY, call=5)
    assert json.loads((run.path / "status.json").read_text())["directory"] == str(tmp_path / "project")
    monkeypatch.chdir(tmp_path / "elsewhere" / "deeper")
    seen = []
    run_finetune(resume="../../run", progress=False, on_start=lambda path: seen.append((path, Path.cwd())))
    assert seen == [(run.path, tmp_path / "project")]
    assert Path.cwd() == tmp_path / "elsewhere" / "deeper"  # given back
    _assert_same_model(run.path, run_finetune(TINY, output_dir=tmp_path, name="never_stopped", progress=False).path)


def test_a_run_works_in_its_start_directory_until_the_with_ends_and_stays_put_if_that_is_gone(tmp_path, monkeypatch,
                                                                                               caplog):
    (tmp_path / "start").mkdir()
    monkeypatch.chdir(tmp_path / "start")
    run = RunFolder.create(tmp_path, "run")
    run.set_running()
    assert run.status()["directory"] == str(tmp_path / "start")
    with run.in_start_directory() as same:  # resumed from where it started: nothing moves
        assert Path.cwd() == tmp_path / "start" and same.path == tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    later = RunFolder("run")  # named from here
    with pytest.raises(RuntimeError, match="boom"), later.in_start_directory():
        assert Path.cwd() == tmp_path / "start" and later.path == tmp_path / "run"  # made absolute
        raise RuntimeError("boom")
    assert Path.cwd() == tmp_path  # given back, after a failure too
    (tmp_path / "start").rmdir()
    with caplog.at_level("WARNING"), RunFolder("run").in_start_directory():
        assert Path.cwd() == tmp_path
    assert (f"run was started in {tmp_path / 'start'}, which is not here: its config's relative paths are read "
            f"from {tmp_path}") in caplog.text
