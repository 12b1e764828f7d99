"""difftilt show: where a run folder stands (running, stopped without a word, interrupted,
failed, complete), its rounds or updates so far, and the command that continues it."""

import json
import shlex

import pytest

from difftilt.core.cli import main
from difftilt.core.errors import CheckpointError
from difftilt.core.online import read_results, run_online
from difftilt.core.run import STATE_FILE, RunFolder, run_finetune

from .test_finetune_resume import TINY, _stopped
from .test_online_guards import CFG

ONLINE = {**CFG, "methods": ["ucb", "best_of_n"]}


def _show(capsys, *args) -> tuple[int, list[str]]:
    status = main(["show", *map(str, args)])
    return status, capsys.readouterr().out.strip().splitlines()


def _stopped_finetune(tmp_path, monkeypatch, call: int) -> RunFolder:
    """A finetune run stopped by a Ctrl-C at its ``call``-th update (counted over all stages)."""
    return _stopped(tmp_path, monkeypatch, TINY, call)


def test_a_stopped_finetune_run_shows_its_stages_so_far_and_the_command_that_ends_it(tmp_path, monkeypatch, capsys):
    run = _stopped_finetune(tmp_path, monkeypatch, 9)  # the value stage's third update
    status, lines = _show(capsys, run.path)
    assert status == 0
    assert lines[0].startswith("finetune run: interrupted (stopped (KeyboardInterrupt); continue with --resume), "
                               "started ")
    assert lines[1] == f"run folder: {run.path}"
    rows = run.metrics()
    transitions = [r for r in rows if r["stage"] == "transitions"][-1]
    value = [r for r in rows if r["stage"] == "value"][-1]
    assert lines[2] == (f"transitions  update 7 of 7: reward {transitions['reward']:.4f}, kl {transitions['kl']:.4f}, "
                        f"value_loss {transitions['value_loss']:.4f}")
    assert lines[3].startswith("value        update 2 of 3")  # updates 0 and 1 were done
    assert f"value_loss {value['value_loss']:.4f}" in lines[3]
    assert lines[-1] == f"continue it with: difftilt finetune --resume {run.path}"

    # the command it gives ends the run, and the run then shows its summary
    assert main(shlex.split(lines[-1].split(": ", 1)[1])[1:] + ["--no-progress"]) == 0
    capsys.readouterr()
    status, lines = _show(capsys, run.path)
    assert lines[0].startswith("finetune run: complete, started ")
    assert lines[1] == f"run folder: {run.path}" and lines[-1] == f"plot: {run.path / 'training.png'}"
    assert any(line.startswith("KL(fine-tuned || pretrained) = ") for line in lines)
    assert not any("continue it with" in line for line in lines)


def test_a_run_whose_status_reads_running_is_told_apart_from_one_a_process_holds(tmp_path, monkeypatch, capsys):
    run = _stopped_finetune(tmp_path, monkeypatch, 3)
    status = run.status()
    run.write_json("status.json", {**status, "state": "running", "pid": 12345})  # as after a kill -9
    del status["error"]
    assert not run.in_use()
    _, lines = _show(capsys, run.path)
    assert lines[0].startswith("finetune run: stopped without a word (its status reads running, but no process on "
                               "this machine holds it: killed, or its machine went down), started ")
    assert lines[-1] == f"continue it with: difftilt finetune --resume {run.path}"
    with run.lock():  # as the run's own process holds it
        assert run.in_use()
        _, lines = _show(capsys, run.path)
    assert lines[0].startswith("finetune run: running (pid 12345), started ")
    assert not any("continue it with" in line for line in lines)
    assert not run.in_use()  # showing it took nothing


def test_a_run_on_another_machine_is_not_called_stopped_for_want_of_a_lock_seen_here(tmp_path, monkeypatch, capsys):
    """A cluster job's folder, looked at from the login node: its process is on the compute
    node, whose file locks this machine may not see."""
    import socket

    here = socket.gethostname()
    run = _stopped_finetune(tmp_path, monkeypatch, 3)
    go_on = f"if it has stopped, continue it with: difftilt finetune --resume {run.path}"
    run.write_json("status.json", {**run.status(), "state": "running", "pid": 12345, "host": "node17"})
    _, lines = _show(capsys, run.path)
    assert lines[0].startswith("finetune run: running (pid 12345 on node17) as its status reads, but whether it "
                               f"still is cannot be told from here: no process holds it that this machine ({here}) "
                               "can see, started ")
    assert lines[-1] == go_on
    _, lines = _show(capsys, tmp_path)
    assert lines[1].split()[:3] == [run.path.name, "finetune", "running?"]
    with run.lock():  # a lock that reaches this machine (NFS with shared locks) settles it
        _, lines = _show(capsys, run.path)
    assert lines[0].startswith("finetune run: running (pid 12345 on node17), started ")
    assert not any("continue it with" in line for line in lines)

    # its own machine's name is no other machine: there the lock test is trusted
    run.write_json("status.json", {**run.status(), "host": here})
    _, lines = _show(capsys, run.path)
    assert lines[0].startswith("finetune run: stopped without a word")


def test_a_file_system_without_locks_runs_with_a_warning_and_show_cannot_tell(tmp_path, monkeypatch, capsys, caplog):
    """Some cluster mounts refuse flock (ENOLCK): that is no other process holding the folder."""
    import errno
    import fcntl
    import socket

    from difftilt.core import run as run_module

    def refuse(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    flock = fcntl.flock
    monkeypatch.setattr(run_module.fcntl, "flock", refuse)
    with caplog.at_level("WARNING", logger="difftilt.core.run"):
        run = run_online({**ONLINE, "methods": ["ucb"]}, output_dir=str(tmp_path), name="run", progress=False)
    assert run.status()["state"] == "complete"
    assert run.status()["host"] == socket.gethostname() and run.status()["pid"] > 0
    assert [r.getMessage() for r in caplog.records] == [
        f"{run.path}: the file system refuses file locks (No locks available), so nothing stops a second process "
        "from running in this folder at the same time: start or resume it once"]
    assert run.in_use() is None
    run.write_json("status.json", {**run.status(), "state": "running"})  # caught while it runs, or killed
    _, lines = _show(capsys, run.path)
    assert lines[0].startswith(f"online run: running (pid {run.status()['pid']}) as its status reads, but whether it "
                               "still is cannot be told from here: this file system refuses file locks, started ")
    assert lines[-1] == f"if it has stopped, continue it with: difftilt online --resume {run.path}"
    monkeypatch.setattr(run_module.fcntl, "flock", flock)  # where locks work, nobody holds it
    assert run.in_use() is False


def test_a_finetune_run_that_saved_no_state_says_to_start_again(tmp_path, monkeypatch, capsys):
    run = _stopped_finetune(tmp_path, monkeypatch, 1)
    (run.path / STATE_FILE).unlink()  # as a kill -9 before its first save
    _, lines = _show(capsys, run.path)
    assert lines[2].startswith("transitions  update 1 of 7: reward ")
    assert lines[-1] == "it saved no training state to continue from: start it again"


@pytest.mark.parametrize("config", [None, "reward: {name: linear}\n", "- not a mapping\n", "oracle: [unclosed\n"])
def test_read_results_refuses_a_folder_without_an_online_config(tmp_path, config):
    if config is not None:
        (tmp_path / "config.yaml").write_text(config)
    with pytest.raises(CheckpointError, match=f"{tmp_path} is not a difftilt online run folder"):
        read_results(tmp_path)


def test_an_online_run_shows_each_methods_rounds_so_far_and_plots_them(tmp_path, capsys):
    run = run_online(ONLINE, output_dir=str(tmp_path), name="run", progress=False)
    done = run.read_json("results.json")
    assert read_results(run.path) == done  # the rounds files hold results.json's rows
    status, lines = _show(capsys, run.path)
    assert status == 0 and lines[0].startswith("online run: complete, started ")
    assert lines[1] == f"run folder: {run.path}"
    table = [line.split() for line in lines[3:]]
    assert [(r[0], r[1], r[2]) for r in table[:3]] == [("ucb", "0", "8"), ("ucb", "1", "16"), ("best_of_n", "0", "16")]
    assert table[1][3] == f"{done['methods']['ucb'][1]['best_true']:.4f}"
    assert lines[-1] == f"plot: {run.path / 'reward_vs_queries.png'}"

    # the same run caught after ucb's first round: results.json not yet written, best_of_n not begun
    (run.path / "results.json").unlink()
    first = {**done["methods"]["ucb"][0], "seconds": 30.0}  # 8 queries in 30 s: 8 to go, at that pace
    (run.path / "ucb" / "rounds.jsonl").write_text(json.dumps(first) + "\n")
    (run.path / "best_of_n" / "rounds.jsonl").unlink()
    run.set_status("interrupted", error="stopped (KeyboardInterrupt); continue with --resume")
    assert read_results(run.path) == {"methods": {"ucb": [first], "best_of_n": []}, "schedule": [8, 8]}
    status, lines = _show(capsys, run.path, "--plot", tmp_path / "so_far.png")
    assert lines[0].startswith("online run: interrupted (stopped (KeyboardInterrupt); continue with --resume)")
    assert [line.split()[:3] for line in lines[3:4]] == [["ucb", "0", "8"]]
    assert (f"progress: ucb 8/16 queries, best {first['best_true']:.4f}, about 30 s to go; best_of_n 0/16 queries"
            in lines)
    assert not any(line.startswith("plot: ") for line in lines)  # the run's own plot is not of these rounds
    assert f"plot of the rounds so far: {tmp_path / 'so_far.png'}" in lines
    assert (tmp_path / "so_far.png").stat().st_size > 0
    assert lines[-1] == f"continue it with: difftilt online --resume {run.path}"

    run.set_status("failed", error="OracleError: the lab's server is down")
    _, lines = _show(capsys, run.path)
    assert lines[0].startswith("online run: failed (OracleError: the lab's server is down), started ")
    assert lines[-1] == f"once the cause is fixed, continue it with: difftilt online --resume {run.path}"

    waiting = (f"8 designs (ucb 8) await the oracle's answers: fill in x.csv; then continue with: "
               f"difftilt online --resume {run.path}")
    run.set_status("waiting", error=waiting)  # its own message says how to go on
    _, lines = _show(capsys, run.path)
    assert lines[0].startswith(f"online run: waiting ({waiting}), started ")
    assert lines[-1].startswith("progress: ucb 8/16 queries")


@pytest.mark.parametrize("what, message", [
    ("missing", "{path} does not exist"),
    ("file", "{path} is not a folder"),
    ("folder", "{path} is not a difftilt run folder (no config.yaml of difftilt finetune or online), nor a folder "
               "holding some, nor a model folder of an installed plugin"),
    ("plot", "--plot x.jpg: write a .png, .pdf or .svg file"),
])
def test_show_refuses_what_is_not_a_run_folder_in_one_line(tmp_path, capsys, what, message):
    path = tmp_path / what
    args = [path]
    if what == "file":
        path.write_text("")
    elif what == "folder":
        path.mkdir()
    elif what == "plot":
        path.mkdir()
        (path / "config.yaml").write_text(json.dumps({"plugin": "toy", "reward": {"name": "linear"}}))
        args += ["--plot", "x.jpg"]
    assert main(["show", *map(str, args)]) == 2
    assert capsys.readouterr().err.strip() == "difftilt: error: " + message.format(path=path)


def test_a_folder_of_runs_shows_one_line_per_run(tmp_path, monkeypatch, capsys):
    """A benchmark's --runs tree: each run folder below it, found without looking inside runs."""
    online = run_online({**ONLINE, "methods": ["ucb"], "schedule": [8, 8, 8]}, output_dir=str(tmp_path / "a"),
                        name="online-seed0", progress=False)
    rows = online.read_json("results.json")["methods"]["ucb"]
    rows[0]["seconds"] = 30.0  # 8 queries in 30 s: 16 to go, at that pace
    (online.path / "ucb" / "rounds.jsonl").write_text(json.dumps(rows[0]) + "\n")  # caught after round 0
    online.write_json("status.json", {**online.status(), "state": "running"})  # and killed
    _stopped_finetune(tmp_path / "b", monkeypatch, 9)
    done = run_finetune(TINY, output_dir=tmp_path / "b" / "c", name="run", progress=False)
    summary = done.read_json("summary.json")
    (tmp_path / "b" / "notes").mkdir()
    status, lines = _show(capsys, tmp_path)
    assert status == 0
    assert lines == [
        "run             kind      state        progress",
        f"a/online-seed0  online    stopped      ucb 8/24 queries, best {rows[0]['best_true']:.4f}, about 60 s to go",
        "b/c/run         finetune  complete     reward mean "
        f"{summary['finetuned']['reward_mean']:.4f} (pretrained {summary['pretrained']['reward_mean']:.4f})",
        "b/run           finetune  interrupted  value update 2",
        f"3 runs in {tmp_path}; difftilt show {tmp_path}/<run> for one's rounds or updates and how to go on",
    ]
    assert main(["show", str(tmp_path / "b")]) == 0 and capsys.readouterr().out.splitlines()[1:3] == [
        "c/run  finetune  complete     reward mean "
        f"{summary['finetuned']['reward_mean']:.4f} (pretrained {summary['pretrained']['reward_mean']:.4f})",
        "run    finetune  interrupted  value update 2"]
    assert main(["show", str(tmp_path), "--plot", str(tmp_path / "p.png")]) == 2
    assert capsys.readouterr().err.strip() == (f"difftilt: error: --plot draws one run's rounds; {tmp_path} holds "
                                               "3 runs")
    # three levels down at most: a run deeper than that is not looked for (nor a home folder walked through)
    deep = tmp_path / "x" / "y" / "z"
    deep.mkdir(parents=True)
    (tmp_path / "b" / "c").rename(deep / "c")
    assert main(["show", str(tmp_path / "x")]) == 2
    assert "nor a folder holding some" in capsys.readouterr().err


def test_a_line_being_appended_is_left_out_and_a_broken_line_before_it_is_not(tmp_path):
    from difftilt.core.run import read_jsonl

    path = tmp_path / "metrics.jsonl"
    assert read_jsonl(path) == []
    path.write_text('{"iteration": 0}\n{"iteration": 1}\n{"itera')  # show reads while the run appends
    assert read_jsonl(path) == [{"iteration": 0}, {"iteration": 1}] == RunFolder(tmp_path).metrics()
    path.write_text('{"itera\n{"iteration": 1}\n')  # not a line being written: a broken file
    with pytest.raises(json.JSONDecodeError):
        read_jsonl(path)


def test_the_time_left_is_the_median_pace_of_the_rounds_so_far_times_the_queries_to_go():
    from difftilt.core.online import duration, time_left

    def rows(*rounds):  # (queries, seconds) per round
        used, out = 0, []
        for queries, seconds in rounds:
            used += queries
            out.append({"queries_used": used, "seconds": seconds})
        return out

    assert time_left([], 100) is None
    assert time_left(rows((10, 20.0)), 100) == 180.0
    # a round that waited out a stop (4,000 s) does not sway the pace, 2 s a query
    assert time_left(rows((10, 20.0), (10, 4000.0), (20, 40.0)), 100) == 120.0
    assert time_left(rows((50, 1.0), (50, 1.0)), 100) is None  # the budget is spent
    assert time_left([{**rows((10, 20.0))[0], "stopped": "an answer reached stop_at 1"}], 100) is None
    assert [duration(s) for s in (45, 2040, 9000)] == ["45 s", "34 min", "2.5 h"]
