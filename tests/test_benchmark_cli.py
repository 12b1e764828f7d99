"""The benchmark commands refuse bad options before any work, in one line; the sequences benchmark's
--jobs on tiny real arms; the summary of the committed tables."""

import json
from pathlib import Path

import pytest
import torch

from difftilt.benchmarks import (finetune_speed, order_consistency, reward_model_rank, round_alpha, sequences,
                                 sequences_pretrained)
from difftilt.benchmarks.common import check_online_run, main_exit
from difftilt.core.errors import CheckpointError, ConfigError, Terminated


def _seq(tmp_path, *extra):
    return ["--tasks", "tfbind8", "--methods", "ga", "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path / "x.json"), "--plot", str(tmp_path / "x.png"), *extra]


@pytest.mark.parametrize("extra", [["--budget", "0"], ["--budget", "-5"], ["--seeds", "0"]])
def test_sequences_refuses_an_empty_budget_or_no_seeds_when_parsing(tmp_path, extra, capsys):
    with pytest.raises(SystemExit) as exit_:
        sequences.main(_seq(tmp_path, *extra))
    assert exit_.value.code == 2 and ">= 1" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written, no run folder made


@pytest.mark.parametrize("setting, says", [
    ("nokey=1", "unknown field 'nokey'"), ("alpha=-1", "config.alpha"), ("fill=bogus", "config.fill"),
    ("seed=3", "use --first-seed"), ("methods=[ga]", "use --methods"), ("schedule=[5]", "use --budget"),
    ("stop_at=0.5", "sets stop_at"), ("process=tfbind8", "sets process"), ("oracle.reward.seed=1", "sets oracle.reward"),
    ("oracle={}", "oracle.KEY=VALUE"), ("alpha", "KEY=VALUE")])
def test_sequences_checks_every_set_before_any_arm_runs(tmp_path, setting, says, capsys):
    with pytest.raises(ConfigError, match=f".*{says}"):
        sequences.main(_seq(tmp_path, "--set", setting))
    assert main_exit(lambda: sequences.main(_seq(tmp_path, "--set", setting))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_sequences_accepts_a_valid_set_and_the_variants(tmp_path):
    sequences.check_arms(list(sequences.TASKS), sequences.DEFAULT_METHODS + ["ucb_clip"], 0, 300,
                         ["fill=edits", "oracle.noise_std=0.1", "finetune.iterations=3"])


def test_sequences_checks_its_paths_up_front(tmp_path):
    (tmp_path / "file").write_text("")
    (tmp_path / "dir").mkdir()
    cases = [(["--runs", str(tmp_path / "file")], "--runs .* is a file"),
             (["--runs", str(tmp_path / "file" / "sub")], "is a file, not a folder"),
             (["--out", str(tmp_path / "dir")], "--out .* is a folder"),
             (["--out", str(tmp_path / "file" / "x.json")], "is a file, not a folder"),
             (["--plot", str(tmp_path / "dir")], "--plot .* is a folder"),
             (["--plot", str(tmp_path / "p.xyz")], r"its suffix names the format.*\.png")]
    for extra, says in cases:
        with pytest.raises(ConfigError, match=says):
            sequences.main(_seq(tmp_path, *extra))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"]


def test_sequences_reads_the_scores_at_the_budget_when_it_is_not_a_checkpoint():
    assert sequences.checkpoints_for(5000) == [500, 1000, 2000, 5000]
    assert sequences.checkpoints_for(2000) == [500, 1000, 2000]
    assert sequences.checkpoints_for(300) == [300]  # used to be no column at all
    assert sequences.checkpoints_for(3000) == [500, 1000, 2000, 3000]
    assert sequences.checkpoints_for(8000) == [500, 1000, 2000, 5000, 8000]


def test_sequences_writes_nothing_when_every_arm_failed():
    failed, ok = {"failed": {"failed_round": 0, "error": "x"}}, {"failed": None}
    assert sequences.all_failed({"tfbind8": {"ga": [failed, failed], "ucb": [failed]}})
    assert not sequences.all_failed({"tfbind8": {"ga": [failed, ok]}})


@pytest.mark.parametrize("extra, says", [
    (["--ehrlich-samples", "0"], ">= 1"), (["--ehrlich-samples", "-3"], ">= 1"), (["--tfbind8-samples", "0"], ">= 1"),
    (["--tfbind8-holdout", "1.5"], r"\(0, 1\)"), (["--tfbind8-holdout", "0"], r"\(0, 1\)")])
def test_sequences_pretrained_checks_its_counts_when_parsing(extra, says, capsys):
    import re

    with pytest.raises(SystemExit) as exit_:
        sequences_pretrained.main(extra)
    assert exit_.value.code == 2 and re.search(says, capsys.readouterr().err)


def test_sequences_pretrained_checks_model_paths_and_options_before_sampling(tmp_path):
    (tmp_path / "dir").mkdir()
    with pytest.raises(CheckpointError, match="no process.json"):
        sequences_pretrained.main(["--ehrlich-model", str(tmp_path / "dir"), "--out", str(tmp_path / "o.json")])
    with pytest.raises(ConfigError, match="drop --only ehrlich"):
        sequences_pretrained.main(["--only", "ehrlich", "--tfbind8-holdout", "0.1"])
    with pytest.raises(ConfigError, match="is a folder"):
        sequences_pretrained.main(["--out", str(tmp_path / "dir")])
    tfbind8 = sequences_pretrained.Path(__file__).parents[1] / "plugins" / "sequences" / "checkpoints" / "tfbind8"
    with pytest.raises(ConfigError, match="not pretrained on an Ehrlich corpus"):
        sequences_pretrained.check_ehrlich_model(str(tfbind8))


def test_sequences_pretrained_only_one_part_keeps_the_other_parts_committed_entry(tmp_path, monkeypatch):
    committed = tmp_path / "results.json"
    monkeypatch.setattr(sequences_pretrained, "DEFAULT_OUT", str(committed))
    committed.write_text(json.dumps({"ehrlich": {"old": 1}, "tfbind8": {"old": 2}}))
    path, written = sequences_pretrained.merged_results({"tfbind8": {"new": 3}}, None, "tfbind8")
    assert path == committed and written == {"ehrlich": {"old": 1}, "tfbind8": {"new": 3}}
    # the holdout of an earlier run is tfbind8's: replaced only when run again
    committed.write_text(json.dumps({"ehrlich": {"old": 1}, "tfbind8": {"old": 2}, "tfbind8_holdout": {"old": 4}}))
    assert sequences_pretrained.merged_results({"ehrlich": {"new": 5}}, None, "ehrlich")[1] == {
        "ehrlich": {"new": 5}, "tfbind8": {"old": 2}, "tfbind8_holdout": {"old": 4}}
    # an explicit --out, or both parts: just the results
    assert sequences_pretrained.merged_results({"tfbind8": {}}, str(tmp_path / "o.json"), "tfbind8")[1] == {"tfbind8": {}}
    assert sequences_pretrained.merged_results({"a": 1}, None, None) == (committed, {"a": 1})
    committed.write_text("{not json")
    with pytest.raises(ConfigError, match="give --out"):
        sequences_pretrained.merged_results({}, None, "ehrlich")


def _finetune_run(tmp_path):
    run = tmp_path / "ft-run"
    run.mkdir()
    (run / "config.yaml").write_text("plugin: toy\nreward: {name: linear}\nfinetune: {}\n")
    return run


def test_the_round_tools_refuse_a_finetune_run_folder_and_bad_options_before_the_work(tmp_path, capsys):
    run = _finetune_run(tmp_path)
    with pytest.raises(ConfigError, match="is a finetune run folder .*not an online run folder"):
        check_online_run(run)
    check_online_run(tmp_path / "missing")  # left to the online reader ("no config.yaml")
    for main, extra in ((round_alpha.main, ["--alphas", "0.01"]), (reward_model_rank.main, [])):
        with pytest.raises(ConfigError, match="finetune run folder"):
            main([str(run), *extra])
        (tmp_path / "dir").mkdir(exist_ok=True)
        with pytest.raises(ConfigError, match="--out .* is a folder"):
            main([str(run), *extra, "--out", str(tmp_path / "dir")])
    for samples in ("-5", "0", "1"):
        with pytest.raises(SystemExit) as exit_:
            round_alpha.main([str(run), "--alphas", "0.01", "--samples", samples])
        assert exit_.value.code == 2 and "--samples must be >= 2" in capsys.readouterr().err


def test_order_consistency_starts_from_a_pretrained_folder_and_refuses_models_that_do_not_match(tmp_path):
    checkpoints = order_consistency.Path(__file__).parents[1] / "plugins" / "sequences" / "checkpoints"
    tfbind8 = order_consistency.load_start(checkpoints / "tfbind8")
    ehrlich = order_consistency.load_start(checkpoints / "ehrlich-20-32-2-4")
    order_consistency.check_same_kind(tfbind8, tfbind8, tmp_path, tmp_path)
    with pytest.raises(ConfigError, match="the two models do not match"):
        order_consistency.check_same_kind(ehrlich, tfbind8, tmp_path / "q", tmp_path / "p")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a fine-tuned model folder"):
        order_consistency.load_start(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="not a folder"):
        order_consistency.load_start(tmp_path / "missing")


def test_sequences_exits_non_zero_and_writes_nothing_when_every_arm_failed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sequences, "run_or_reuse", lambda cfg, path, label: [{"failed_round": 0, "error": "boom"}])
    assert main_exit(lambda: sequences.main(_seq(tmp_path, "--budget", "300", "--seeds", "2"))) == 2
    captured = capsys.readouterr()
    assert "FAILED in round 0: boom" in captured.out and "best @300" in captured.out  # the table is still printed
    assert captured.err.startswith("error: every arm failed; nothing written")
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "x.png").exists()


def test_sequences_prints_a_temporary_runs_folder_at_the_start(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sequences.tempfile, "mkdtemp", lambda prefix: str(tmp_path / "tmp-runs"))
    monkeypatch.setattr(sequences, "run_or_reuse", lambda cfg, path, label: [{"failed_round": 0, "error": "boom"}])
    argv = [a for a in _seq(tmp_path, "--budget", "100", "--seeds", "1") if a not in ("--runs", str(tmp_path / "runs"))]
    main_exit(lambda: sequences.main(argv))
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"run folders: {tmp_path / 'tmp-runs'} (temporary")


@pytest.mark.slow
def test_finetune_speed_times_the_tasks_round_on_the_cpu_and_writes_its_figures(tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert finetune_speed.main(["--task", "ehrlich-20-32-2-4", "--devices", "cpu", "--threads", "1", "--answers", "8",
                                "--updates", "2", "--warmup", "1", "--repeats", "1", "--samples", "4",
                                "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["finetune"]["batch_size"] == 16 and saved["finetune"]["strategy"]["name"] == "backprop"
    [row] = saved["rows"]
    assert row["device_name"] == "cpu, 1 thread(s)" and row["update_seconds"] > 0 and row["draw_seconds"] > 0
    assert "cpu, 1 thread(s)" in capsys.readouterr().out.splitlines()[-2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_finetune_speed_refuses_cuda_where_there_is_no_gpu(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        finetune_speed.main(["--devices", "cpu", "cuda", "--out", str(tmp_path / "x.json")])
    assert exit_.value.code == 2 and "no CUDA GPU" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_sequences_jobs_run_the_arms_at_once_and_give_the_tables_of_one_after_another(tmp_path, capfd):
    """--jobs 2: the same table, JSON and run folders as the arms run one after another on one
    thread (real, tiny arms: TFBind8, a round of 100 and one of 20, two fine-tuning updates)."""
    tiny = ["--tasks", "tfbind8", "--methods", "ucb", "ga", "hill_climb", "ga", "--budget", "120", "--seeds", "1",
            "--set", "finetune.iterations=2", "--set", "finetune.batch_size=16", "--set", "reward_model.epochs=5",
            "--set", "eval_samples=16"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each job runs
    try:
        assert sequences.main([*tiny, "--runs", str(tmp_path / "a"), "--out", str(tmp_path / "a.json"),
                               "--plot", str(tmp_path / "a.png")]) == 0
    finally:
        torch.set_num_threads(threads)
    one = capfd.readouterr().out
    assert sequences.main([*tiny, "--jobs", "2", "--runs", str(tmp_path / "b"), "--out", str(tmp_path / "b.json"),
                           "--plot", str(tmp_path / "b.png")]) == 0
    two = capfd.readouterr().out
    assert two.count(" round ") == 2 * 3  # the workers' round lines (fd 1 is theirs too)

    def table(out):
        return [line for line in out.splitlines() if line.startswith(("method", "ucb ", "ga ", "hill_climb "))]

    def untimed(path):
        results = json.loads(path.read_text())["results"]["tfbind8"]
        for arms in results.values():
            for arm in arms:
                arm["last"].pop("seconds")
        return results

    assert len(table(one)) == 4 and table(two) == table(one)
    assert list(untimed(tmp_path / "a.json")) == ["ucb", "ga", "hill_climb"]  # ga asked twice, run once
    assert untimed(tmp_path / "b.json") == untimed(tmp_path / "a.json")
    assert sorted(p.name for p in (tmp_path / "b" / "tfbind8").iterdir()) == sorted(
        f"{m}-seed{s}" for m in ("ucb", "ga", "hill_climb") for s in (0,))
    # and a second --jobs run reads the finished arms back
    assert sequences.main([*tiny, "--jobs", "2", "--runs", str(tmp_path / "b"), "--out", str(tmp_path / "c.json"),
                           "--plot", str(tmp_path / "c.png")]) == 0
    assert " round " not in capfd.readouterr().out  # nothing ran again
    assert untimed(tmp_path / "c.json") == untimed(tmp_path / "b.json")


@pytest.mark.parametrize("stop, status, said", [(KeyboardInterrupt, 130, "stopped"),
                                                 (Terminated, 143, "terminated (SIGTERM)")])
def test_sequences_says_how_to_go_on_when_stopped_by_a_ctrl_c_or_a_sigterm(tmp_path, monkeypatch, capsys, stop,
                                                                           status, said):
    def stopped(cfg, path, label):
        raise stop()  # as run_online re-raises it, its run marked interrupted

    monkeypatch.setattr(sequences, "run_or_reuse", stopped)
    assert main_exit(lambda: sequences.main(_seq(tmp_path, "--budget", "100", "--seeds", "1"))) == status
    assert capsys.readouterr().err == (f"{said}; the same command goes on from there: finished arms are read back, "
                                       f"interrupted ones resumed (run folders: {tmp_path / 'runs'})\n")
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_a_sigterm_to_the_jobs_runner_alone_stops_its_arms_as_interrupted_and_the_command_goes_on(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    command = [sys.executable, "-m", "difftilt.benchmarks.sequences", "--tasks", "tfbind8", "--methods", "ucb",
               "--budget", "500", "--jobs", "2", "--seeds", "1", "--set", "finetune.iterations=10",
               "--set", "finetune.batch_size=16", "--set", "eval_samples=16", "--set", "reward_model.epochs=5",
               "--runs", "runs", "--out", "x.json", "--plot", "x.png"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rounds = [tmp_path / "runs" / "tfbind8" / "ucb-seed0" / "ucb" / "rounds.jsonl"]
    deadline = time.time() + 300
    while not all(r.is_file() for r in rounds) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)  # the arm has finished its first round of five
    proc.send_signal(signal.SIGTERM)  # to the runner only, not to its arms' processes
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("terminated (SIGTERM); the same command goes on from there")
    states = [json.loads((r.parent.parent / "status.json").read_text())["state"] for r in rounds]
    assert states == ["interrupted"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert [json.loads((r.parent.parent / "status.json").read_text())["state"] for r in rounds] == ["complete"]


def test_the_summary_reads_each_arm_from_its_committed_table(tmp_path, capsys):
    from difftilt.benchmarks import sequences_summary as summary

    arms = summary.read_arms(Path(summary.__file__).parent / "results")
    assert list(arms) == list(summary.BUDGETS[0]) == list(summary.BUDGETS[1])
    # the README's figures: (20, 64, 4, 4) at 2,000 calls, seeds 0-2
    assert [round(v, 4) for v in arms["ehrlich-20-64-4-4"]["ucb"][2000]] == [0.5625, 0.3164, 0.3164]
    assert round(sum(arms["ehrlich-20-64-4-4"]["hill_climb"][2000]) / 3, 3) == 0.453
    assert round(sum(arms["ehrlich-20-64-4-4"]["ucb"][5000]) / 3, 3) == 0.661
    # an arm listed twice: the 2,000-call cells of its own table, the 5,000 ones from the longer run's
    nonadaptive = arms["ehrlich-20-32-4-4"]["nonadaptive"]
    assert round(sum(nonadaptive[2000]) / 3, 3) == 0.164 and round(sum(nonadaptive[5000]) / 3, 3) == 0.203
    lines = summary.table(arms)
    assert lines[1].split()[:4] == ["ucb", "1.000", "(3/3", "at"]  # 1.0 on every seed of (20, 32, 2, 4)
    at_5000 = summary.table(arms, summary.BUDGETS[1])
    rows = [line.split()[0] for line in at_5000[1:]]
    assert rows[0] == "ucb" and "ucb_edits" not in rows  # no line for an arm that never ran that far
    assert summary.main(["--plot", str(tmp_path / "s.png")]) == 0 and (tmp_path / "s.png").stat().st_size > 0
    with pytest.raises(CheckpointError, match="no such result file"):
        summary.read_arms(tmp_path)
    (tmp_path / "sequences_tfbind8.json").write_text(json.dumps({"results": {"tfbind8": {}}}))
    with pytest.raises(CheckpointError, match="has no ucb on tfbind8"):
        summary.read_arms(tmp_path, {"tfbind8": [("ucb", "sequences_tfbind8.json")]})


def test_the_online_toy_benchmark_hands_its_arms_to_the_jobs_and_reads_them_back(tmp_path, monkeypatch, capsys):
    import yaml

    from difftilt.benchmarks import online_toy

    tiny = {"plugin": "toy", "seed": 0, "process": {"name": "mixture", "num_steps": 8},
            "oracle": {"reward": {"name": "bumps", "centers": [[0.0, -3.0]], "heights": [1.0], "widths": 0.5},
                       "batch_size": 4},
            "schedule": [8], "eval_samples": 8}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny))
    handed = []
    monkeypatch.setattr(online_toy, "run_arms", lambda arms, jobs: handed.append((arms, jobs)))  # runs nothing
    argv = ["--config", str(tmp_path / "c.yaml"), "--methods", "best_of_n", "--seeds", "2", "--no-no-kl-arm",
            "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "o.json"), "--plot", str(tmp_path / "o.png")]
    assert online_toy.main([*argv, "--jobs", "3"]) == 0
    [(arms, jobs)] = handed
    assert jobs == 3 and [(cfg["seed"], path.name, label) for cfg, path, label in arms] == [
        (0, "best_of_n-seed0", "seed 0 best_of_n, "), (1, "best_of_n-seed1", "seed 1 best_of_n, ")]
    # the arms it handed over, run here instead, are what it read back
    assert [len(r) for r in json.loads((tmp_path / "o.json").read_text())["curves"]["best_of_n"]] == [1, 1]
    assert online_toy.main(argv) == 0 and len(handed) == 1  # --jobs 1: nothing handed over
