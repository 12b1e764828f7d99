"""Runs: one YAML config in, one run folder out. The CLI and the Python API share this.

A ``difftilt finetune`` run folder holds::

    config.yaml       the validated config, with every default filled in
    status.json       {"state": "running" | "complete" | "failed" | "interrupted", ...}
    metrics.jsonl     one line per update, appended as training goes (nothing lost on a crash)
    metrics.csv/.json the same as tables, rewritten after every stage
    checkpoints/      the model after each finished stage, and state.pt: the whole training
                      state, saved every finetune.save_every updates, for --resume (removed
                      once the run is complete)
    model/            the final fine-tuned model (see :mod:`.checkpoint`)
    summary.json      evaluation of the final model against the pretrained one
    training.png      reward and KL over training

Everything is validated before the folder is created, so a bad config leaves no folder;
a run that fails later is marked ``failed`` with the error and has no ``model/`` or
``summary.json`` -- it never looks complete. A run that stopped (Ctrl-C, a crash, a
failure) continues from its last saved state with ``run_finetune(config, resume=folder)``
(``difftilt finetune CONFIG --resume RUN``) and ends as a run never stopped.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import datetime as _dt
import fcntl
import importlib.util
import inspect
import io
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import yaml

from .checkpoint import save_finetuned
from .config import atomic_write_text, check_count, field_differences, load_yaml, parse_yaml, validate_kwargs
from .errors import CheckpointError, ConfigError, DifftiltError, OptionalDependencyError
from .finetune import (SEED_MAX, Finetuner, FinetuneResult, check_finetune_options, estimate_kl,
                       keeps_rng_states, read_state, reward_summary)
from .plugins import load_plugin
from .rollout import step_generator

log = logging.getLogger(__name__)

__all__ = ["RunFolder", "FinetuneRunConfig", "run_finetune", "load_config", "run_kind", "read_jsonl", "STATE_FILE"]

#: A finetune run's training state, in its folder (:meth:`~.finetune.Finetuner.fit`'s ``state_file``).
STATE_FILE = "checkpoints/state.pt"


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSON-lines file that a run appends to (``[]`` if there is none). A last
    line that is not whole (being written now, or cut by a crash) is left out."""
    path = Path(path)
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    rows = [json.loads(line) for line in lines[:-1]]
    if lines:
        try:
            rows.append(json.loads(lines[-1]))
        except json.JSONDecodeError:
            pass
    return rows


def saved_config(folder: str | os.PathLike) -> dict | None:
    """The config mapping a run folder was started with (its ``config.yaml``), or ``None``
    when there is no readable one."""
    try:
        cfg = load_yaml(Path(folder) / "config.yaml")
    except (OSError, DifftiltError):
        return None
    return cfg if isinstance(cfg, dict) else None


def run_kind(folder: str | os.PathLike) -> str | None:
    """``"online"`` or ``"finetune"``: which command made the run folder, told by its
    config (an online config has an ``oracle``, a finetune config a ``reward`` and none);
    ``None`` when there is no readable config."""
    cfg = saved_config(folder)
    if cfg is None:
        return None
    return "online" if "oracle" in cfg else "finetune" if "reward" in cfg else None


class RunFolder:
    """A run's folder on disk.

    Args:
        path: the folder (created by :meth:`create`).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @classmethod
    def create(cls, parent: str | os.PathLike, name: str) -> "RunFolder":
        """Create ``parent/name``; if it exists, ``name-1``, ``name-2``, ... (never reuses a folder).

        Raises:
            ConfigError: ``name`` is not a plain folder name (a path such as ``../x`` or
                ``a/b`` would put the run outside ``parent``), or ``parent`` cannot be
                created or written.
        """
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise ConfigError(f"the run name must be a plain folder name (no '/', '\\', '.' or '..'), got {name!r}; "
                              "set the parent folder with output_dir (--output-dir)")
        parent = Path(parent)
        try:
            parent.mkdir(parents=True, exist_ok=True)
            for i in range(10_000):
                path = parent / (name if i == 0 else f"{name}-{i}")
                try:
                    path.mkdir()
                    return cls(path)
                except FileExistsError:
                    continue
        except OSError as err:  # read-only, or a file in the way
            reason = "a file is in the way" if isinstance(err, (FileExistsError, NotADirectoryError)) else err.strerror
            raise ConfigError(f"cannot create a run folder in {parent}: {reason or err}; "
                              "set output_dir (--output-dir) to a folder you can write") from None
        raise ConfigError(f"could not create a run folder under {parent}")

    # ------------------------------------------------------------------ files
    def write_json(self, name: str, obj: Any) -> Path:
        """Atomically write ``obj`` as JSON to ``<run>/<name>``."""
        path = self.path / name
        atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")
        return path

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text())

    def write_config(self, config: dict) -> None:
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def set_status(self, state: str, **info: Any) -> None:
        """Record the run's state (``running``, ``complete``, ``failed``, ``interrupted``).

        An ``error`` explains the state it was given with: a new state drops it (a run
        resumed after a failure does not read ``complete`` beside the old error)."""
        prev = self.status() if (self.path / "status.json").is_file() else {}
        prev.pop("error", None)
        now = _dt.datetime.now().isoformat(timespec="seconds")
        status = {**prev, "state": state, "updated": now, **info}
        status.setdefault("started", now)
        status.setdefault("directory", str(Path.cwd()))  # where the config's relative paths point
        self.write_json("status.json", status)

    @classmethod
    def to_resume(cls, path: str | os.PathLike, command: str, *, output_dir: Any = None,
                  name: Any = None) -> "RunFolder":
        """The existing run folder that ``difftilt {command} --resume`` continues in place.

        Raises:
            ConfigError: ``output_dir`` or ``name`` is given (they name a new folder), or
                ``path`` does not exist.
            CheckpointError: ``path`` is not a run folder (no ``config.yaml``).
        """
        run = cls(path)
        if output_dir is not None or name is not None:
            given = " and ".join(n for n, v in (("output_dir", output_dir), ("name", name)) if v is not None)
            raise ConfigError(f"a resumed run goes on in its own folder ({run.path}); {given} "
                              f"(--output-dir, --name) name a new run's")
        if not run.path.exists():
            raise ConfigError(f"nothing to resume: {run.path} does not exist")
        if not (run.path / "config.yaml").is_file():
            raise CheckpointError(f"{run.path} is not a difftilt {command} run folder (no config.yaml)")
        kind = run_kind(run.path)
        if kind is not None and kind != command:
            a = {"online": "an", "finetune": "a"}
            raise ConfigError(f"{run.path} is {a[kind]} {kind} run folder (difftilt {kind}), "
                              f"not {a[command]} {command} one")
        return run

    @contextlib.contextmanager
    def in_start_directory(self) -> Iterator["RunFolder"]:
        """Work, while in the ``with``, in the directory the run was started from (``directory``
        in ``status.json``), so that a run resumed from elsewhere reads its config's relative
        paths (a model folder, a lab's measurement file, an oracle's ``.py`` file) where they
        were given; ``path`` is then resolved. If that directory is gone (the run folder was
        moved to another machine), the current one is kept, with a warning."""
        here, start = Path.cwd(), self.status().get("directory")
        if start is None or Path(start) == here:
            yield self
            return
        if not Path(start).is_dir():
            log.warning("%s was started in %s, which is not here: its config's relative paths are read from %s",
                        self.path, start, here)
            yield self
            return
        log.info("resuming %s in %s, where it was started (its config's relative paths point there)", self.path, start)
        self.path = self.path.resolve()  # the messages that name it hold from either directory
        os.chdir(start)
        try:
            yield self
        finally:
            os.chdir(here)

    def lock(self) -> io.TextIOWrapper:
        """Hold the folder for this process: an exclusive lock on its ``.lock`` file, released
        when the returned file is closed (use it in a ``with``) or the process ends. On a file
        system without file locks (some cluster mounts) it warns and holds nothing.

        Raises:
            ConfigError: another process holds it (a run still going, resumed twice).
        """
        handle = open(self.path / ".lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise ConfigError(f"{self.path} is in use by another difftilt process") from None
        except OSError as err:  # ENOLCK, EOPNOTSUPP, ...: this mount has no locks, not a holder
            log.warning("%s: the file system refuses file locks (%s), so nothing stops a second process from "
                        "running in this folder at the same time: start or resume it once", self.path,
                        err.strerror or err)
        return handle

    def in_use(self) -> bool | None:
        """Whether a process holds the folder's lock (:meth:`lock`): a run going on now, on this
        machine (or on another that shares the folder's file locks). A run whose status still
        reads ``running`` with no holder was killed, or its machine went down. ``None``: the
        file system refuses locks, so it cannot be told. Tested by taking a shared lock and
        dropping it at once; opens nothing for writing."""
        path = self.path / ".lock"
        if not path.is_file():
            return False
        with open(path) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            except OSError:
                return None
            fcntl.flock(handle, fcntl.LOCK_UN)
        return False

    def set_running(self, **info: Any) -> None:
        """Record that this process runs the folder now: its pid and its machine's name (which
        ``difftilt show`` on another machine needs, as it cannot see this one's processes)."""
        self.set_status("running", pid=os.getpid(), host=socket.gethostname(), **info)

    def status(self) -> dict:
        """The content of ``status.json`` (``{}`` if absent)."""
        path = self.path / "status.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def append_metrics(self, row: dict) -> None:
        """Append one update's metrics to ``metrics.jsonl`` (flushed at once)."""
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row, default=_json_default) + "\n")

    def write_metrics(self, rows: list[dict]) -> None:
        """Replace ``metrics.jsonl`` with ``rows`` (a resumed run drops the updates it redoes)."""
        atomic_write_text(self.path / "metrics.jsonl",
                          "".join(json.dumps(row, default=_json_default) + "\n" for row in rows))

    def metrics(self) -> list[dict]:
        """All rows of ``metrics.jsonl``."""
        return read_jsonl(self.path / "metrics.jsonl")

    def write_metric_tables(self) -> None:
        """Rewrite ``metrics.csv`` and ``metrics.json`` from ``metrics.jsonl``."""
        rows = self.metrics()
        columns = list(dict.fromkeys(k for r in rows for k in r))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path / "metrics.csv", buf.getvalue())
        self.write_json("metrics.json", rows)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


@dataclass
class FinetuneRunConfig:
    """The YAML config of ``difftilt finetune``.

    Attributes:
        plugin: the domain plugin (entry-point name), e.g. ``toy``.
        reward: ``{name: ..., **kwargs}`` for one of the plugin's rewards.
        process: ``{name: ..., **kwargs}`` for one of the plugin's pretrained chains
            (default: the plugin's first, with its defaults).
        finetune: fields of :class:`~difftilt.core.finetune.Finetuner` (``alpha``,
            ``strategy``, ``learn_initial``, ``iterations``, ...).
        seed: seeds everything; the same seed gives the same run.
        output_dir: parent folder of run folders.
        name: run folder name (default ``<plugin>-<date>-<time>``).
        eval_samples: samples drawn to evaluate the final model.
        loggers: extra Lightning loggers writing into the run folder: ``csv``, ``tensorboard``
            (needs the ``tensorboard`` package).
    """

    plugin: str
    reward: dict | str
    process: dict | str | None = None
    finetune: dict = field(default_factory=dict)
    seed: int = 0
    output_dir: str = "runs"
    name: str | None = None
    eval_samples: int = 10000
    loggers: list[str] = field(default_factory=list)


_FINETUNER_SKIP = ("reference", "reward", "policy", "value_net", "initial_policy", "loggers", "on_metrics", "seed")


def _apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a config mapping."""
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        key, value = item.split("=", 1)
        target = raw
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--set {key}: '{part}' is not a section")
        target[parts[-1]] = parse_yaml(value)
    return raw


def read_config(config: dict | str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """A config mapping or YAML path with ``key.sub=value`` overrides applied (not yet validated)."""
    return _apply_overrides(dict(config) if isinstance(config, dict) else load_yaml(config), overrides)


def load_config(config: dict | str | os.PathLike, overrides: list[str] | None = None) -> FinetuneRunConfig:
    """Read and validate a run config (a mapping or a YAML path) with ``key.sub=value`` overrides.

    Its ``finetune`` section is returned type-checked (:func:`~.finetune.check_finetune_options`)."""
    raw = read_config(config, overrides)
    cfg = FinetuneRunConfig(**validate_kwargs(FinetuneRunConfig, raw, "config"))
    if cfg.eval_samples < 2:
        raise ConfigError("config.eval_samples must be >= 2")
    check_count("config", "seed", cfg.seed, 0, SEED_MAX)
    _check_loggers(cfg.loggers)
    cfg.finetune = check_finetune_options(cfg.finetune, "finetune", skip=_FINETUNER_SKIP)
    return cfg


def _csv_logger(path: Path):
    from lightning.pytorch.loggers import CSVLogger

    return CSVLogger(save_dir=str(path), name="lightning")


def _tensorboard_logger(path: Path):
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=str(path), name="lightning")


_LOGGERS = {"csv": _csv_logger, "tensorboard": _tensorboard_logger}


def _check_loggers(names: list[str]) -> None:
    """Known logger names, with what they need installed (before a run folder exists)."""
    for name in names:
        if name not in _LOGGERS:
            raise ConfigError(f"config.loggers: unknown logger '{name}' (known: {', '.join(_LOGGERS)})")
    if "tensorboard" in names and not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        raise OptionalDependencyError("config.loggers: the tensorboard logger needs tensorboard. "
                                      "Install it with `pip install tensorboard`, or use loggers: [csv]")


def _make_loggers(names: list[str], run: RunFolder) -> list:
    return [_LOGGERS[name](run.path) for name in names]


def _filled_defaults(fn, given: dict, skip: tuple[str, ...]) -> dict:
    out = {}
    for name, p in inspect.signature(fn).parameters.items():
        if name in skip or name == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        if name in given:
            out[name] = given[name]
        elif p.default is not inspect.Parameter.empty:
            out[name] = p.default
    return out


#: Finetune fields that do not change what a run computes: a resumed run may change them.
_NOT_COMPARED = ("finetune.progress", "finetune.save_every")


def _check_not_complete(run: RunFolder) -> None:
    if run.status().get("state") == "complete":
        raise ConfigError(f"{run.path} is complete: there is nothing to resume")


def _resumable(run: RunFolder, resolved: dict) -> dict:
    """The saved state of the run folder to resume, once the run is known to be unfinished and
    started with the same config."""
    with run.lock():  # free: not still running, nor being resumed
        pass
    _check_not_complete(run)
    given = parse_yaml(yaml.safe_dump(resolved))  # as written to config.yaml and read back
    differ = field_differences(given, load_yaml(run.path / "config.yaml"), skip=_NOT_COMPARED)
    if differ:
        raise ConfigError(f"the config differs from the one {run.path} was started with "
                          f"({', '.join(differ)}); resume it unchanged")
    if not (run.path / STATE_FILE).is_file():
        raise ConfigError(f"nothing to resume: {run.path} holds no saved training state ({STATE_FILE})")
    return read_state(run.path / STATE_FILE)


@torch.no_grad()
def evaluate_model(result: FinetuneResult, reference, reward, domain, n: int, seed: int) -> dict:
    """Reward, KL and domain metrics of the fine-tuned model, beside the pretrained one."""
    x = result.sample(n, seed=seed)
    x_pre = reference.sample(n, generator=step_generator(seed, -5, reference.device))
    summary = {
        "finetuned": reward_summary(reward(x), reward.infeasible_value),
        "pretrained": reward_summary(reward(x_pre), reward.infeasible_value),
        "kl_to_pretrained": estimate_kl(result, min(n, 4096), seed=seed),
        "alpha": result.alpha,
        "num_samples": n,
    }
    summary["finetuned"].update(domain.evaluate(x, process=reference, reward=reward, alpha=result.alpha))
    return summary


@keeps_rng_states  # the run seeds torch's global state; the caller's is given back
def run_finetune(
    config: dict | str | os.PathLike | None = None,
    *,
    overrides: list[str] | None = None,
    output_dir: str | os.PathLike | None = None,
    name: str | None = None,
    progress: bool = True,
    resume: str | os.PathLike | None = None,
    on_start: Callable[[Path], None] | None = None,
) -> RunFolder:
    """Run ``difftilt finetune`` and return its run folder (the CLI calls exactly this).

    It seeds torch with the config's ``seed`` and gives the caller's random states back after.

    While it trains, the run folder holds the whole training state (:data:`STATE_FILE`), saved
    every ``finetune.save_every`` updates and after each stage.

    Args:
        config: a YAML path or the same mapping; with ``resume``, the run's own
            ``config.yaml`` when omitted.
        overrides: ``key.sub=value`` strings applied on top (YAML values).
        output_dir: overrides ``config.output_dir`` (not used with ``resume``).
        name: overrides ``config.name`` (not used with ``resume``).
        progress: show progress bars.
        resume: a run folder that stopped before it was complete, to continue from its last
            saved state; ``config`` (with ``overrides``) must be the one it was started with
            (``finetune.save_every`` and ``finetune.progress`` aside). The run ends with the
            same model and metrics as one never stopped.
        on_start: called with the run folder once it is made (or, resumed, locked), before
            the first update: where to follow the run (``difftilt show``) and resume it.

    Raises:
        DifftiltError: on bad input, before any folder is created when the problem is in
            the config, plugin, process or reward; with ``resume``, a config that differs
            from the run's, a run that is complete or that holds no saved state.
    """
    if resume is None:
        if config is None:
            raise ConfigError("give a config file (or --resume RUN_DIR)")
        return _run_finetune(config, None, overrides, output_dir, name, progress, on_start)
    run = RunFolder.to_resume(resume, "finetune", output_dir=output_dir, name=name)
    if config is None:
        config = run.path.resolve() / "config.yaml"
    elif isinstance(config, (str, os.PathLike)):
        config = Path(config).resolve()  # given from here; the run goes on where it was started
    with run.in_start_directory():
        return _run_finetune(config, run, overrides, output_dir, name, progress, on_start)


def _run_finetune(config: dict | str | os.PathLike, run: RunFolder | None, overrides: list[str] | None,
                  output_dir: str | os.PathLike | None, name: str | None, progress: bool,
                  on_start: Callable[[Path], None] | None) -> RunFolder:
    """:func:`run_finetune` in a new run folder (``run`` None) or, resumed, in ``run``."""
    cfg = load_config(config, overrides)
    if output_dir is not None:
        cfg.output_dir = str(output_dir)
    if name is not None:
        cfg.name = name
    torch.manual_seed(cfg.seed)
    domain = load_plugin(cfg.plugin)
    ft_kwargs = cfg.finetune  # checked by load_config
    resolved = {
        "plugin": cfg.plugin,
        "process": cfg.process if cfg.process is not None else {"name": next(iter(domain.processes))},
        "reward": cfg.reward,
        "finetune": _filled_defaults(Finetuner, ft_kwargs, _FINETUNER_SKIP),
        "seed": cfg.seed,
        "eval_samples": cfg.eval_samples,
        "loggers": cfg.loggers,
    }
    strategy = resolved["finetune"].get("strategy")
    if not isinstance(strategy, (str, dict)):  # a Strategy object given through the Python API
        resolved["finetune"]["strategy"] = type(strategy).__name__
    state = _resumable(run, resolved) if run is not None else None
    process = domain.make_process(cfg.process)
    reward = domain.make_reward(cfg.reward, process)
    finetuner = Finetuner(
        process, reward, seed=cfg.seed, policy=domain.make_policy(process), value_net=domain.make_value_net(process),
        **{**ft_kwargs, "progress": progress and ft_kwargs.get("progress", True)},  # --no-progress wins
    )

    if run is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        run = RunFolder.create(cfg.output_dir, cfg.name or f"{cfg.plugin}-{stamp}")
        run.write_config(resolved)
    with run.lock():
        if on_start is not None:
            on_start(run.path)
        _finetune_in(run, cfg, state, finetuner, reward, domain, resolved)
    return run


def _finetune_in(run: RunFolder, cfg: FinetuneRunConfig, state: dict | None, finetuner: Finetuner, reward, domain,
                 resolved: dict) -> None:
    """:func:`run_finetune`'s training, evaluation and writing, in ``run`` (locked)."""
    stage_times: dict[str, float] = {}
    if state is not None:  # resumed: the updates done after the last save are done again
        _check_not_complete(run)  # again, now that it is locked
        run.write_metrics(state["history"])
        stage_times = dict(run.status().get("stage_times", {}))
    run.set_running()
    finetuner.on_metrics = run.append_metrics
    finetuner.loggers = _make_loggers(cfg.loggers, run) or None
    process_spec = resolved["process"] if isinstance(resolved["process"], dict) else {"name": resolved["process"]}
    t0 = time.time() - max(stage_times.values(), default=0.0)  # resumed: the stages' times go on from there

    def stage_done(stage: str, ft: Finetuner) -> None:
        stage_times[stage] = round(time.time() - t0, 2)
        save_finetuned(ft.result(), run.path / "checkpoints" / stage, plugin=cfg.plugin, process=process_spec)
        run.write_metric_tables()
        run.set_status("running", stage_done=stage, stage_times=stage_times)

    try:
        result = finetuner.fit(stages=stage_done, state_file=run.path / STATE_FILE, resume=state)
        summary = evaluate_model(result, finetuner.reference, reward, domain, cfg.eval_samples, cfg.seed)
        summary["stage_seconds"] = stage_times
        from .plotting import plot_training

        plot_training(result.history, run.path / "training.png",
                      title=f"{cfg.plugin}: reward '{reward.name}', alpha = {finetuner.alpha:g}")
        save_finetuned(result, run.path / "model", plugin=cfg.plugin, process=process_spec,
                       extra={"reward": cfg.reward})
        run.write_json("summary.json", summary)
        run.set_status("complete", seconds=round(time.time() - t0, 2))
        (run.path / STATE_FILE).unlink(missing_ok=True)
    except (KeyboardInterrupt, SystemExit) as err:  # Ctrl-C, or SIGTERM (Lightning raises a SystemExit)
        run.write_metric_tables()
        run.set_status("interrupted", error=f"stopped ({type(err).__name__}); continue with --resume")
        err.run = run.path  # for the command's line saying how to continue
        raise
    except BaseException as err:
        run.write_metric_tables()
        run.set_status("failed", error=f"{type(err).__name__}: {err}")
        raise
