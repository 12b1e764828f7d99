"""Saving and loading fine-tuned models (safetensors + JSON, never pickles).

A fine-tuned model folder holds::

    model_index.json          format, plugin and process spec (how to rebuild the reference),
                              alpha, and which parts follow
    transitions_control.*     the control network of the transition chain (residual policy)
    transitions_policy.safetensors   or the whole policy's weights (full-copy policy)
    initial_control.*         the auxiliary chain's control (learned initial law), if any
    value.*                   the value network v(x_0), if any

The reference chain is not stored: it is rebuilt from the plugin and its process spec,
which is what makes a fine-tuned model a few kilobytes for a domain with a committed
pretrained checkpoint.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from .config import ConfigMixin, atomic_write_text
from .errors import CheckpointError
from .finetune import FinetuneResult
from .plugins import Domain, ask_plugins, load_plugin
from .process import (BrownianProcess, ChainedProcess, ControlledProcess, Process, ResidualControlProcess, freeze,
                      transitions_of)

__all__ = ["save_model", "save_finetuned", "load_finetuned", "load_model_folder", "FORMAT"]

FORMAT = "difftilt.finetuned/1"


def _save_module(module: nn.Module, directory: Path, name: str) -> None:
    if not isinstance(module, ConfigMixin):
        raise CheckpointError(
            f"cannot save a {type(module).__name__}: networks saved with a model must be ConfigMixin "
            "subclasses that record their constructor arguments"
        )
    module.save_pretrained(directory, name)


def _policy_part(policy: Process, is_base, directory: Path, prefix: str) -> dict:
    from safetensors.torch import save_file

    if isinstance(policy, ResidualControlProcess) and is_base(policy.base):
        _save_module(policy.control, directory, f"{prefix}_control")
        return {"kind": "residual", "control": f"{prefix}_control", "control_input": policy.control_input}
    if isinstance(policy, ResidualControlProcess) or is_base(policy):
        raise CheckpointError(f"cannot save the {prefix} chain: it is not a tilt of (or a copy of) the pretrained chain")
    state = {k: v.detach().contiguous().cpu() for k, v in policy.state_dict().items()}
    tmp = directory / f".{prefix}_policy.safetensors.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, directory / f"{prefix}_policy.safetensors")
    return {"kind": "full", "weights": f"{prefix}_policy.safetensors"}


def save_model(model: Process, pretrained: Process, directory: str | os.PathLike, *, plugin: str, process: dict,
               alpha: float | None = None, value_net: nn.Module | None = None, extra: dict | None = None) -> Path:
    """Write a fine-tuned model relative to the pretrained chain it was built on.

    ``model`` is what fine-tuning produced: the pretrained chain tilted by a control (or a
    trained copy of it), possibly preceded by a learned initial chain (a tilted Brownian
    chain), possibly after several rounds -- as long as its transitions are a tilt of
    ``pretrained`` itself it is self-contained. The pretrained chain is not stored: it is
    rebuilt from ``plugin`` and ``process`` on loading. A relative ``path`` in ``process``
    (a pretrained model folder named from the run's working directory) is stored absolute,
    so that the checkpoint loads from any other.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = process.get("path")
    if isinstance(path, str) and not Path(path).is_absolute() and Path(path).exists():
        process = {**process, "path": str(Path(path).resolve())}
    index: dict[str, Any] = {
        "format": FORMAT,
        "plugin": plugin,
        "process": process,
        "alpha": alpha,
        "transitions": _policy_part(transitions_of(model), lambda p: p is pretrained, directory, "transitions"),
        "initial": None,
        "value": None,
    }
    if isinstance(model, ChainedProcess):
        aux = model.initial_chain
        index["initial"] = {"steps": aux.num_steps,
                            **_policy_part(aux, lambda p: isinstance(p, BrownianProcess), directory, "initial")}
    if value_net is not None:
        _save_module(value_net, directory, "value")
        index["value"] = "value"
    if extra:
        index["extra"] = extra
    # The index goes last: a folder without it is not a model.
    atomic_write_text(directory / "model_index.json", json.dumps(index, indent=2) + "\n")
    return directory


def save_finetuned(result: FinetuneResult, directory: str | os.PathLike, *, plugin: str, process: dict,
                   extra: dict | None = None) -> Path:
    """Write what :meth:`~difftilt.core.finetune.Finetuner.fit` returned (see :func:`save_model`)."""
    pretrained = result.transitions.reference
    while isinstance(pretrained, (ChainedProcess, ControlledProcess)):  # a later round's reference
        pretrained = pretrained.reference if isinstance(pretrained, ControlledProcess) else transitions_of(pretrained)
    if isinstance(pretrained, ResidualControlProcess):
        pretrained = pretrained.base
    return save_model(result.model, pretrained, directory, plugin=plugin, process=process, alpha=result.alpha,
                      value_net=result.value_net, extra=extra)


def _load_policy(part: dict, reference: Process, directory: Path) -> Process:
    if part["kind"] == "residual":
        control = ConfigMixin.from_pretrained(directory, part["control"])
        return ResidualControlProcess(reference, control, part.get("control_input", "state"))
    if part["kind"] == "full":
        from safetensors.torch import load_file

        policy = copy.deepcopy(reference)
        for p in policy.parameters():
            p.requires_grad_(True)
        policy.load_state_dict(load_file(str(directory / part["weights"])))
        return policy
    raise CheckpointError(f"unknown policy kind '{part['kind']}' in {directory}")


def load_finetuned(directory: str | os.PathLike, pretrained: Process | None = None) -> FinetuneResult:
    """Rebuild a model saved by :func:`save_model` / :func:`save_finetuned`.

    The plugin named in the folder must be installed (unless ``pretrained`` is given).
    Returns a :class:`~difftilt.core.finetune.FinetuneResult` (``history`` empty) whose
    ``model`` samples like the saved one and whose references are the pretrained chain.
    """
    directory = Path(directory)
    index_path = directory / "model_index.json"
    if not index_path.is_file():
        raise CheckpointError(f"{directory} is not a fine-tuned model folder (no model_index.json)")
    index = json.loads(index_path.read_text())
    if index.get("format") != FORMAT:
        raise CheckpointError(f"{index_path}: unknown format {index.get('format')!r} (expected {FORMAT})")
    if pretrained is None:
        pretrained = load_plugin(index["plugin"]).make_process(index["process"])
    reference = freeze(pretrained)
    transitions = ControlledProcess(reference, _load_policy(index["transitions"], reference, directory))
    initial = None
    value = None
    if index.get("initial"):
        aux_ref = reference.initial_sde(int(index["initial"]["steps"]))
        if aux_ref is None:
            raise CheckpointError(f"{index_path} has an initial law but the reference's initial law is a point")
        initial = ControlledProcess(aux_ref, _load_policy(index["initial"], aux_ref, directory))
    if index.get("value"):
        value = ConfigMixin.from_pretrained(directory, index["value"])
    model: Process = ChainedProcess(transitions.policy, initial.policy) if initial is not None else transitions
    for module in (transitions, initial, value):
        if module is not None:
            freeze(module)
    alpha = index.get("alpha")
    return FinetuneResult(model=model, transitions=transitions, initial=initial, value_net=value,
                          alpha=float(alpha) if alpha is not None else float("nan"))


def load_model_folder(directory: str | os.PathLike) -> tuple[Process, Process, Domain]:
    """``(model, reference, domain)`` of a model folder, as ``difftilt sample`` reads them: a
    fine-tuned one (``model_index.json``; ``reference`` its pretrained chain) or a pretrained
    one that an installed plugin reads (``Domain.load_folder``, e.g. the sequences plugin's
    ``process.json`` folders; ``reference`` the model itself).

    Raises:
        CheckpointError: ``directory`` is not a folder, or neither kind of model folder.
    """
    path = Path(directory)
    if (path / "model_index.json").is_file():
        result = load_finetuned(path)
        plugin = json.loads((path / "model_index.json").read_text())["plugin"]
        return result.model, result.transitions.reference, load_plugin(plugin)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder")
    tried: list[str] = []
    found = ask_plugins(lambda domain: domain.load_folder(path), tried)
    if found is not None:
        domain, process = found
        return process, process, domain
    raise CheckpointError(f"{path} is neither a fine-tuned model folder (no model_index.json) nor a pretrained "
                          f"model folder of an installed plugin (tried: {', '.join(tried) or 'none installed'})")
