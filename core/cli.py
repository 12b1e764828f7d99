"""The ``difftilt`` command (also ``python -m difftilt``).

Errors a user can cause (:class:`~difftilt.core.errors.DifftiltError`) end the
command with one line on stderr and exit status 2; ``--debug`` (or
``DIFFTILT_DEBUG=1``) shows the traceback instead. An online run whose oracle is
waiting for a lab's answers (:class:`~difftilt.core.errors.AwaitingAnswers`) stops with
one line saying how to continue, and exit status 3.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import json
import logging
import os
import shlex
import socket
import sys
import warnings
from pathlib import Path
from typing import Callable

from .errors import AwaitingAnswers, DifftiltError, stopped_by_sigterm, terminated_on_sigterm

__all__ = ["main", "build_parser"]


def _cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins import list_plugins

    rows = list_plugins()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no difftilt plugins installed")
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['description'] or r['target']}")
    return 0


@contextlib.contextmanager
def _says_on_stop(how_to_continue: Callable[[Path], str | None]):
    """A Ctrl-C or SIGTERM in the block that stopped a run (its exception names the run's
    folder, ``err.run``): print ``how_to_continue(folder)`` on stderr, if it says anything,
    and let the exception go on."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit) as err:
        path = getattr(err, "run", None)
        line = how_to_continue(path) if path is not None else None
        if line:
            print(line, file=sys.stderr)
        raise


def _says_where(path: Path) -> None:
    """A run's first line: its folder, to follow it from another terminal or resume it."""
    print(f"running in {path} (follow it from another terminal: {shlex.join(['difftilt', 'show', str(path)])})",
          flush=True)


def _cmd_finetune(args: argparse.Namespace) -> int:
    from .run import STATE_FILE, run_finetune

    def how_to_continue(path: Path) -> str | None:
        if not (path / STATE_FILE).is_file():
            return None
        command = shlex.join(["difftilt", "finetune", "--resume", str(path)])  # with the config it was started with
        return f"fine-tuning stopped; its last saved state is in {path / STATE_FILE}: continue it with {command}"

    with _says_on_stop(how_to_continue):
        run = run_finetune(args.config, overrides=args.set, output_dir=args.output_dir, name=args.name,
                           progress=not args.no_progress, resume=args.resume, on_start=_says_where)
    _print_finetune(run.path)
    return 0


def _print_finetune(path: Path) -> None:
    """A complete finetune run's summary: the pretrained and fine-tuned models' rewards, the KL
    between them, the distance to the exact target where the domain knows it, and the plot."""
    summary = json.loads((path / "summary.json").read_text())
    ft, pre = summary["finetuned"], summary["pretrained"]
    kl = summary["kl_to_pretrained"]
    print(f"run folder: {path}")
    print(f"{'':<12}{'reward mean':>12}{'reward max':>12}{'feasible':>10}")
    for label, s in (("pretrained", pre), ("fine-tuned", ft)):
        print(f"{label:<12}{s['reward_mean']:>12.4f}{s['reward_max']:>12.4f}{s['feasible']:>10.3f}")
    print(f"KL(fine-tuned || pretrained) = {kl['total']:.4f}  (initial law {kl['initial']:.4f}, "
          f"transitions {kl['transitions']:.4f})")
    extras = {k: v for k, v in ft.items() if k in ("sw2", "mean_error", "weight_error", "target_reward")}
    if extras:
        print("exact target p*: " + ", ".join(f"{k} = {v:.4f}" for k, v in extras.items()))
    print(f"plot: {path / 'training.png'}")


#: A finetune stage's length in its config's ``finetune`` section.
_STAGE_LENGTH = {"transitions": "iterations", "value": "value_refit_iterations", "initial": "initial_iterations"}


def _print_finetune_progress(path: Path, rows: list[dict]) -> None:
    """An unfinished finetune run: per stage begun, its last update's metrics."""
    from .config import load_yaml

    lengths = load_yaml(path / "config.yaml").get("finetune") or {}
    print(f"run folder: {path}")
    if not rows:
        print("no update finished yet")
    for stage in dict.fromkeys(r["stage"] for r in rows):
        last = [r for r in rows if r["stage"] == stage][-1]
        total = lengths.get(_STAGE_LENGTH.get(stage, ""))
        done = last.get("iteration", -1) + 1
        shown = ", ".join(f"{k} {last[k]:.4f}" for k in ("reward", "kl", "value_loss") if k in last)
        print(f"{stage:<12} update {done:,}" + (f" of {total:,}" if isinstance(total, int) else "")
              + (f": {shown}" if shown else ""))


def _cmd_online(args: argparse.Namespace) -> int:
    from .online import RoundLines, run_online

    line = RoundLines()

    def report(row: dict, rounds: int) -> None:  # a line as each round ends, beside the progress bars
        print(line(row, rounds), file=sys.stderr, flush=True)

    def how_to_continue(path: Path) -> str:
        return f"online run stopped; continue it with {shlex.join(['difftilt', 'online', '--resume', str(path)])}"

    with _says_on_stop(how_to_continue):
        try:
            run = run_online(args.config, resume=args.resume, overrides=args.set, output_dir=args.output_dir,
                             name=args.name, progress=not args.no_progress,
                             on_round=None if args.no_progress else report, on_start=_says_where)
        except AwaitingAnswers as err:  # the rounds answered so far, then the line saying what to do
            if err.run is not None:
                _print_online(err.run)
            raise
    _print_online(run.path)
    return 0


def _print_online(path: Path, plot: bool = True, results: dict | None = None) -> None:
    """An online run's rounds so far (``results``, read from ``path`` if not given), each
    method's best design, and (``plot``) its plot; nothing before its first round."""
    from .online import read_results

    results = read_results(path) if results is None else results
    if not any(results["methods"].values()):
        return
    cols = [("queries_used", "queries", "d"), ("best_true", "best", ".4f"), ("top10_true", "top-10", ".4f"),
            ("eval_mean_true", "model mean", ".4f"), ("eval_feasible", "feasible", ".3f"),
            ("eval_diversity", "diversity", ".3f"), ("kl_to_pretrained", "KL to pre", ".3f")]
    print(f"run folder: {path}")
    print(f"{'method':<12}{'round':>6}" + "".join(f"{label:>12}" for _, label, _ in cols))
    for method, rows in results["methods"].items():
        for r in rows:
            cells = "".join(f"{format(r[k], f) if k in r else '-':>12}" for k, _, f in cols)
            print(f"{method:<12}{r['round']:>6}{cells}")
            if "stopped" in r:
                print(f"{'':<12}{'':>6}  stopped after {r['queries_used']:,} queries: {r['stopped']}")
    for method in results["methods"]:
        best = _best_design(path / method / "designs.csv")
        if best is not None:
            value, design = best
            shown = design if len(design) <= 60 else f"{design[:57]}..."
            print(f"{method:<12}best design {value:.4f} {shown}  (all: {path / method / 'designs.csv'})")
    if plot and (path / "reward_vs_queries.png").is_file():
        print(f"plot: {path / 'reward_vs_queries.png'}")


def _best_design(path: Path) -> tuple[float, str] | None:
    """The highest answer in a method's ``designs.csv`` and its design, the first asked of a tie
    (``None``: no file or no answer)."""
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        answered = [(float(r["value"]), r["design"]) for r in csv.DictReader(f) if r["status"] == "answered"]
    return max(answered, key=lambda a: a[0]) if answered else None


def _standing(path: Path, kind: str) -> tuple[str, str, str, str | None]:
    """Where a run folder stands: its state in a word (``running``; ``stopped``: its status
    reads running but no process holds it; ``running?``: its status reads running and whether
    a process still holds it cannot be told from here; ``interrupted``, ``failed``, ``waiting``,
    ``complete``), that state in a sentence, when it started and last moved on, and the line
    saying how to continue it (``None``: nothing to continue, or it is going on)."""
    from .run import STATE_FILE, RunFolder

    run = RunFolder(path)
    status = run.status()
    state, error = status.get("state") or "no status", status.get("error")
    when = f"started {status['started']}" if "started" in status else "not started"
    if state == "complete":
        when += f", finished {status['updated']}"
    else:  # when it last moved on: its last round's row, or its last update's
        logs = list(path.glob("*/rounds.jsonl")) if kind == "online" else [path / "metrics.jsonl"]
        times = [f.stat().st_mtime for f in logs if f.is_file()]
        if times:
            last = _dt.datetime.fromtimestamp(max(times)).isoformat(timespec="seconds")
            when += f", {'last round ended' if kind == 'online' else 'last update'} {last}"
    go_on = f"continue it with: {shlex.join(['difftilt', kind, '--resume', str(path)])}"
    if state == "running":
        held, host, here = run.in_use(), status.get("host"), socket.gethostname()
        elsewhere = host is not None and host != here  # its locks may not reach this machine
        pid = f"pid {status.get('pid', '?')}" + (f" on {host}" if elsewhere else "")
        if held:
            return state, f"running ({pid})", when, None
        if held is None or elsewhere:
            why = ("this file system refuses file locks" if held is None else
                   f"no process holds it that this machine ({here}) can see")
            return ("running?", f"running ({pid}) as its status reads, but whether it still is cannot be told "
                    f"from here: {why}", when, f"if it has stopped, {go_on}")
        state, said = "stopped", ("stopped without a word (its status reads running, but no process on this "
                                  "machine holds it: killed, or its machine went down)")
    else:
        said = state + (f" ({error})" if error else "")
    if state in ("complete", "waiting", "no status"):  # a waiting run's error says how to go on
        return state, said, when, None
    if kind == "finetune" and not (path / STATE_FILE).is_file():
        return state, said, when, "it saved no training state to continue from: start it again"
    return state, said, when, ("once the cause is fixed, " if state == "failed" else "") + go_on


def _run_folders(path: Path, depth: int = 3) -> list[tuple[Path, str]]:
    """The run folders below ``path`` (a benchmark's ``--runs`` tree: ``<task>/<arm>``), down to
    ``depth`` levels, and their kinds, sorted; the folders inside a run are not searched."""
    from .run import run_kind

    found = []
    for folder, subfolders, files in os.walk(path):
        kind = run_kind(folder) if "config.yaml" in files else None
        if kind is not None:
            found.append((Path(folder), kind))
        if kind is not None or len(Path(folder).relative_to(path).parts) >= depth:
            subfolders.clear()
    return sorted(found)


def _progress(path: Path, kind: str) -> str:
    """A run's progress in a few words: an online run's (:func:`_online_progress`), or a
    fine-tuning's result or last update."""
    if kind == "online":
        from .online import read_results

        return _online_progress(read_results(path))
    from .run import RunFolder

    if (path / "summary.json").is_file():
        summary = json.loads((path / "summary.json").read_text())
        return (f"reward mean {summary['finetuned']['reward_mean']:.4f} "
                f"(pretrained {summary['pretrained']['reward_mean']:.4f})")
    rows = RunFolder(path).metrics()
    return f"{rows[-1]['stage']} update {rows[-1].get('iteration', -1) + 1:,}" if rows else "no update yet"


def _online_progress(results: dict) -> str:
    """Per method of an online run's ``results``: queries used of the budget, the best answer
    and the time to go."""
    from .online import duration, time_left

    budget = sum(results["schedule"] or [])
    parts = []
    for method, rows in results["methods"].items():
        best = f", best {rows[-1]['best_true']:.4f}" if rows and "best_true" in rows[-1] else ""
        left = time_left(rows, budget)
        to_go = f", about {duration(left)} to go" if left is not None else ""
        parts.append(f"{method} {rows[-1]['queries_used'] if rows else 0:,}/{budget:,} queries{best}{to_go}")
    return "; ".join(parts)


def _cmd_show(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .run import run_kind

    path = Path(args.run)
    if not path.is_dir():
        raise ConfigError(f"{path} does not exist" if not path.exists() else f"{path} is not a folder")
    plot = Path(args.plot) if args.plot else None
    if plot is not None and plot.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise ConfigError(f"--plot {args.plot}: write a .png, .pdf or .svg file")
    kind = run_kind(path)
    if kind is None:  # a folder of runs (a benchmark's --runs): one line each
        runs = _run_folders(path)
        if not runs:
            from .plugins import ask_plugins

            described = ask_plugins(lambda domain: domain.describe_folder(path))  # a pretraining's model folder
            if described is None:
                raise ConfigError(f"{path} is not a difftilt run folder (no config.yaml of difftilt finetune or "
                                  "online), nor a folder holding some, nor a model folder of an installed plugin")
            if plot is not None:
                raise ConfigError(f"--plot draws a run's rounds or updates; {path} is a model folder")
            print("\n".join(described[1]))
            return 0
        if plot is not None:
            raise ConfigError(f"--plot draws one run's rounds; {path} holds {len(runs)} runs")
        names = [str(run.relative_to(path)) for run, _ in runs]
        width = max(len(n) for n in names)
        print(f"{'run':<{width}}  {'kind':<8}  {'state':<11}  progress")
        for name, (run, kind) in zip(names, runs):
            state = _standing(run, kind)[0]
            print(f"{name:<{width}}  {kind:<8}  {state:<11}  {_progress(run, kind)}")
        print(f"{len(runs)} runs in {path}; difftilt show {path}/<run> for one's rounds or updates and how to go on")
        return 0

    state, said, when, advice = _standing(path, kind)
    print(f"{kind} run: {said}, {when}")
    if kind == "online":
        from .online import plot_results, read_results

        results = read_results(path)
        _print_online(path, plot=plot is None, results=results)  # the run's own plot, redrawn as it runs
        if state != "complete":
            print(f"progress: {_online_progress(results)}")
        if plot is not None:
            print(f"plot of the rounds so far: {plot_results(results, plot)}")
    else:
        from .run import RunFolder

        rows = RunFolder(path).metrics()
        if state == "complete" and (path / "summary.json").is_file():
            _print_finetune(path)
        else:
            _print_finetune_progress(path, rows)
        if plot is not None:
            from .plotting import plot_training

            print(f"plot of the updates so far: {plot_training(rows, plot, title=path.name)}")
    if advice:
        print(advice)
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from .config import load_yaml
    from .errors import ConfigError
    from .plugins import load_plugin

    config = load_yaml(args.config)
    if "plugin" not in config:
        raise ConfigError(f"{args.config}: a pretraining config needs 'plugin'")
    command = shlex.join(["difftilt", "pretrain", args.config, *(["--out", args.out] if args.out else [])])
    domain = load_plugin(str(config["plugin"]))
    # resume is passed only when asked, so that a plugin that cannot resume need not take it
    folder = domain.pretrain(config, progress=not args.no_progress, output=args.out, command=command,
                             **({"resume": True} if args.resume else {}))
    print(f"pretrained model: {folder}")
    if (Path(folder) / "training.png").is_file():
        print(f"loss curve: {Path(folder) / 'training.png'}")
    return 0


TEXT_SUFFIXES = (".fasta", ".fa", ".txt")


def _sample_in_batches(model, n: int, batch_size: int, generator, progress: bool):
    """``n`` samples, ``batch_size`` chains at a time from one generator (memory stays that of
    one batch; ``n <= batch_size`` is one ``model.sample`` call), with a progress bar."""
    import torch
    from tqdm.auto import tqdm

    sizes = [min(batch_size, n - i) for i in range(0, n, batch_size)]
    bar = tqdm(sizes, desc="sampling", unit="batch", disable=not progress or len(sizes) == 1, dynamic_ncols=True)
    return torch.cat([model.sample(size, generator=generator).detach() for size in bar])


def _sampling_device(name: str):
    """``--device`` as a torch device this machine has; a :class:`ConfigError` otherwise."""
    import torch

    from .errors import ConfigError

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name!r}: not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: torch sees no CUDA GPU here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA GPU(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: torch sees no MPS device here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {name}: sampling runs on cpu, cuda or mps")
    return device


def _cmd_sample(args: argparse.Namespace) -> int:
    from .checkpoint import load_model_folder
    from .errors import ConfigError
    from .rollout import step_generator

    out = Path(args.output)
    if out.suffix not in (".safetensors", ".npy", *TEXT_SUFFIXES):
        raise ConfigError(f"--output {out}: write .safetensors, .npy, or text designs to "
                          f"{' / '.join(TEXT_SUFFIXES)}")
    if args.num_samples < 1 or args.batch_size < 1:
        raise ConfigError(f"--num-samples and --batch-size must be >= 1, got {args.num_samples} and {args.batch_size}")
    if out.is_dir():
        raise ConfigError(f"--output {out} is a folder; name a file in it")
    device = _sampling_device(args.device)
    try:  # before the sampling, which may take long
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--output {out}: cannot make its folder ({e.strerror or e})") from None
    model, reference, domain = load_model_folder(args.model)
    model.to(device)
    x = _sample_in_batches(model, args.num_samples, args.batch_size,
                           step_generator(args.seed, -3, device), progress=not args.no_progress)
    if out.suffix in TEXT_SUFFIXES:
        text = domain.decode(x, process=reference)
        if not all(isinstance(t, str) for t in text):
            raise ConfigError(f"plugin '{domain.name}' designs are not text; write .safetensors or .npy")
        lines = [f">sample_{i}\n{t}" for i, t in enumerate(text)] if out.suffix != ".txt" else text
        out.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.num_samples} designs to {out}")
        return 0
    if out.suffix == ".npy":
        import numpy as np

        np.save(out, x.cpu().numpy())
    else:
        from safetensors.torch import save_file

        save_file({"samples": x.contiguous().cpu()}, str(out))
    print(f"wrote {args.num_samples} samples of shape {tuple(x.shape[1:])} to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``difftilt`` command."""
    parser = argparse.ArgumentParser(
        prog="difftilt",
        description="Fine-tune pretrained diffusion models toward a reward (ELEGANT, SEIKO).",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what plugins load and what stages run")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("plugins", help="list installed domain plugins")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser("finetune", help="fine-tune a pretrained model toward a reward (ELEGANT)")
    p.add_argument("config", nargs="?", help="YAML run config (optional with --resume: the run's own)")
    p.add_argument("--output-dir", help="parent folder of the run folder (overrides output_dir)")
    p.add_argument("--name", help="run folder name (overrides name)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set finetune.alpha=0.5 (repeatable)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a run folder that stopped, from its last saved state (the same config)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("online", help="feedback-efficient online fine-tuning with an oracle (SEIKO) and baselines")
    p.add_argument("config", nargs="?", help="YAML online config (optional with --resume)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run folder (re-asks nothing already answered)")
    p.add_argument("--output-dir", help="parent folder of the run folder (overrides output_dir)")
    p.add_argument("--name", help="run folder name (overrides name)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars, and no line on stderr as each round ends")
    p.set_defaults(func=_cmd_online)

    p = sub.add_parser("show", help="where a finetune or online run folder stands: its state, its rounds or "
                                    "updates so far, how to continue it")
    p.add_argument("run", metavar="RUN_DIR", help="a run folder (running, stopped or complete)")
    p.add_argument("--plot", metavar="FILE", help="also draw its rounds (or updates) so far to FILE (.png, .pdf, .svg)")
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("pretrain", help="train a domain's default model on data that ships with the package")
    p.add_argument("config", help="YAML pretraining config (see the domain's configs/pretrain_*.yaml)")
    p.add_argument("--out", help="model folder to write (overrides output)")
    p.add_argument("--resume", action="store_true",
                   help="continue a pretraining that was stopped, from its last saved state in the model folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("sample", help="draw samples from a fine-tuned or pretrained model folder")
    p.add_argument("model", help="a model folder: fine-tuned (e.g. RUN/model) or written by difftilt pretrain")
    p.add_argument("-n", "--num-samples", type=int, default=16)
    p.add_argument("-o", "--output", default="samples.safetensors",
                   help=".safetensors or .npy; .fasta / .fa / .txt: the designs as text (sequences)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1024,
                   help="chains sampled at once, to bound memory; when -n exceeds it, the samples a --seed draws "
                        "depend on it too")
    p.add_argument("--device", default="cpu",
                   help="where to draw: cpu, cuda, cuda:1, mps (the random stream, hence the samples of a --seed, "
                        "depends on it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("DIFFTILT_DEBUG", "") not in ("", "0")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if not debug:
        warnings.filterwarnings("ignore", category=UserWarning, module="lightning")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with terminated_on_sigterm():
            return args.func(args)
    except AwaitingAnswers as err:  # not a failure: the oracle's answers come later
        if debug:
            raise
        print(f"difftilt: waiting: {err}", file=sys.stderr)
        return 3
    except DifftiltError as err:
        if debug:
            raise
        print(f"difftilt: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("difftilt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of the output went away (`| head`): stop quietly, as `cat` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 141
    except SystemExit as err:
        # Lightning turns a SIGTERM during a fit into SystemExit() (status 0): a scheduler
        # that killed the run would read it as a success
        if stopped_by_sigterm(err):
            print("difftilt: terminated (SIGTERM)", file=sys.stderr)
            return 143
        raise
