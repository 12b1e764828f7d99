"""Configuration: constructor signatures are the schema.

A run's YAML maps onto constructors (the plugin's process and reward factories, the
:class:`~difftilt.core.finetune.Finetuner`, ...). :func:`validate_kwargs` checks a
mapping against a callable's signature and type hints and raises one
:class:`~difftilt.core.errors.ConfigError` naming the bad field, so the CLI and the
Python API accept exactly the same things.

:class:`ConfigMixin` records a module's constructor arguments so it can be saved as
safetensors + JSON and rebuilt (the ``save_pretrained`` / ``from_pretrained`` layout).
"""

from __future__ import annotations

import collections.abc as cabc
import difflib
import importlib
import inspect
import json
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import yaml

from .errors import CheckpointError, ConfigError

__all__ = ["ConfigMixin", "validate_kwargs", "check_type", "check_count", "check_rate", "load_yaml",
           "atomic_write_text", "field_differences"]


# --------------------------------------------------------------------------- ranges


def check_count(section: str, name: str, value, low: int, high: int | None = None) -> None:
    """:class:`ConfigError` unless ``value`` is a whole number >= ``low`` (a size, a number of
    steps), and <= ``high`` if given (a seed), checked where a setting is read rather than
    where it fails."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"from {low} to {high}"
        raise ConfigError(f"{section}.{name} must be a whole number {bound}, got {value!r}")


def check_rate(section: str, name: str, value, positive: bool) -> None:
    """:class:`ConfigError` unless ``value`` is a finite number > 0 (``positive``, a learning
    rate) or >= 0 (a weight decay)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
            or (positive and value == 0):
        raise ConfigError(f"{section}.{name} must be a {'positive' if positive else 'non-negative'} number, "
                          f"got {value!r}")


# --------------------------------------------------------------------------- types


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if hint is type(None) or hint is None:
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin in (list, tuple, cabc.Sequence):
        args = typing.get_args(hint)
        inner = _describe(args[0]) if args else "anything"
        return f"a list of {inner}"
    if origin in (dict, cabc.Mapping):
        return "a mapping"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_type(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against the type ``hint`` and return it, converted where harmless.

    Integers are accepted for floats (and converted), lists for tuples. Raises
    :class:`ConfigError` naming ``where`` otherwise.
    """
    if hint is Any or hint is inspect.Parameter.empty:
        return value
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    bad = ConfigError(f"{where}: expected {_describe(hint)}, got {type(value).__name__} {value!r}")
    if hint is type(None) or hint is None:
        if value is None:
            return None
        raise bad
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in args:
            try:
                return check_type(value, arg, where)
            except ConfigError as err:
                errors.append((arg, err))
        non_null = [err for arg, err in errors if arg is not type(None)]
        if value is not None and len(non_null) == 1:
            raise non_null[0]  # "X or null" with a non-null value: X's own, precise message
        raise bad
    if origin is Literal:
        if value in args:
            return value
        raise bad
    if origin in (list, tuple, cabc.Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(check_type(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple or hint is tuple else out
    if origin in (dict, cabc.Mapping) or hint in (dict, cabc.Mapping):
        if not isinstance(value, Mapping):
            raise bad
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if hint is float:
        if _is_number(value):
            return float(value)
        raise bad
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad
    if hint in (Path, os.PathLike):
        if isinstance(value, (str, os.PathLike)):
            return value
        raise bad
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise bad
    return value  # an annotation we do not understand: accept


def _hints(target: Callable) -> dict[str, Any]:
    fn = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: fall back to no checking
        return {}


def validate_kwargs(target: Callable, kwargs: Mapping[str, Any], where: str, *, skip: tuple[str, ...] = ()) -> dict:
    """Check ``kwargs`` against ``target``'s signature; return them type-checked.

    Args:
        target: a class or function whose parameters form the schema.
        kwargs: the mapping from the config file or the caller.
        where: the config path used in error messages, e.g. ``"finetune"``.
        skip: parameters supplied by the caller rather than by the config.

    Raises:
        ConfigError: an unknown field (with a suggestion), a missing required field, or
            a value of the wrong type.
    """
    if not isinstance(kwargs, Mapping):
        raise ConfigError(f"{where}: expected a mapping of fields, got {type(kwargs).__name__}")
    sig = inspect.signature(target)
    params = {
        n: p for n, p in sig.parameters.items()
        if n not in skip and n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    takes_var_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    hints = _hints(target)
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key not in params:
            if takes_var_kw:
                out[key] = value
                continue
            close = difflib.get_close_matches(str(key), list(params), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known fields: {', '.join(params) or 'none'})"
            raise ConfigError(f"{where}: unknown field '{key}'{hint}")
        out[key] = check_type(value, hints.get(key, Any), f"{where}.{key}")
    for name, p in params.items():
        if p.default is inspect.Parameter.empty and name not in out:
            raise ConfigError(f"{where}: missing required field '{name}'")
    return out


# --------------------------------------------------------------------------- files


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, reading ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_yaml(text: str):
    """Parse YAML text safely, with ``1e-3`` read as a number."""
    return yaml.load(text, Loader=_Loader)


def load_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping, raising :class:`ConfigError` with the file name on failure."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = parse_yaml(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: invalid YAML{at}: {getattr(err, 'problem', err)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of fields")
    return data


def field_differences(a: dict, b: dict, skip: tuple[str, ...] = ()) -> list[str]:
    """The fields in which two configs differ, sections to one level (``["finetune.lr",
    "seed"]``), sorted, but the names in ``skip`` (``"name"``, ``"finetune.progress"``)."""
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += [f"{key}.{k}" for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]
        elif x != y:
            out.append(key)
    return [name for name in out if name not in skip]


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


# --------------------------------------------------------------------------- modules


class ConfigMixin:
    """Save and rebuild an ``nn.Module`` from its constructor arguments and weights.

    A subclass calls ``self.register_to_config(**init_kwargs)`` in ``__init__`` with
    JSON-able values. :meth:`save_pretrained` writes ``<name>.json`` (class path and
    arguments) and ``<name>.safetensors``; :meth:`from_pretrained` rebuilds the module
    from them. No pickles are read.
    """

    _config: dict

    def register_to_config(self, **kwargs: Any) -> None:
        """Record constructor arguments (JSON-able values only)."""
        self._config = _jsonable(dict(kwargs))

    @property
    def config(self) -> dict:
        """The recorded constructor arguments."""
        return dict(getattr(self, "_config", {}))

    def save_pretrained(self, directory: str | os.PathLike, name: str = "model") -> None:
        """Write ``<directory>/<name>.json`` and ``<directory>/<name>.safetensors``."""
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"class": f"{type(self).__module__}.{type(self).__qualname__}", "config": self.config}
        tmp = directory / f".{name}.safetensors.tmp"
        save_model(self, str(tmp))  # type: ignore[arg-type]
        os.replace(tmp, directory / f"{name}.safetensors")
        atomic_write_text(directory / f"{name}.json", json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, name: str = "model", map_location: str = "cpu"):
        """Rebuild a module saved by :meth:`save_pretrained`.

        Called on :class:`ConfigMixin` itself, the class is taken from the JSON file (it
        must be a ``ConfigMixin`` subclass); called on a subclass, the file must name it.
        """
        from safetensors.torch import load_model

        directory = Path(directory)
        meta_path, weights_path = directory / f"{name}.json", directory / f"{name}.safetensors"
        if not meta_path.is_file() or not weights_path.is_file():
            raise CheckpointError(f"no saved module '{name}' in {directory} (need {name}.json and {name}.safetensors)")
        meta = json.loads(meta_path.read_text())
        target = _resolve_class(meta.get("class", ""))
        if not (inspect.isclass(target) and issubclass(target, ConfigMixin)):
            raise CheckpointError(f"{meta_path}: '{meta.get('class')}' is not a difftilt module class")
        if cls is not ConfigMixin and not issubclass(target, cls):
            raise CheckpointError(f"{meta_path} holds a {target.__name__}, not a {cls.__name__}")
        module = target(**meta.get("config", {}))
        load_model(module, str(weights_path), device=map_location)
        return module


def _resolve_class(path: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise CheckpointError(f"cannot import '{module_name}' for checkpoint class '{path}': {err}") from None
    for part in attr.split("."):
        obj = getattr(obj, part, None)
    return obj
