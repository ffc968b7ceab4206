"""YAML -> validated dataclasses.

Every stage config is a tree of dataclasses. `load_config(path, cls)` reads the YAML, rejects unknown keys (with a
did-you-mean), checks types and allowed values, and reports every problem as a `ConfigError` that names the file and
the dotted key — before any model is built or any data is read.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A bad config: the message names the file and the key."""


def did_you_mean(word, choices, prefix: str = "") -> str:
    """" (did you mean 'X'?)" for the closest of `choices` to a misspelt `word` (`prefix` + X), or "".

    >>> did_you_mean("learnin_rate", ["learning_rate", "epochs"], "training.")
    " (did you mean 'training.learning_rate'?)"
    """
    guess = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean '{prefix}{guess[0]}'?)" if guess else ""


def read_yaml(path: str | Path) -> dict:
    """Load a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    return data


def load_config(path: str | Path, cls: type, overrides: dict | None = None):
    """Read `path` into dataclass `cls`; `overrides` (dotted keys -> values) are applied first."""
    data = read_yaml(path)
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return from_dict(cls, data, source=str(path))


def from_dict(cls: type, data: Any, source: str, prefix: str = ""):
    """Build dataclass `cls` from a mapping, validating keys and types recursively."""
    where = prefix.rstrip(".") or "(top level)"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{where}' must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            hint = did_you_mean(key, fields, prefix)
            raise ConfigError(
                f"{source}: unknown key '{prefix}{key}'{hint}; valid keys here: {', '.join(sorted(fields))}"
            )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], source, f"{prefix}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key '{prefix}{name}'")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:  # __post_init__ checks name their own key
        raise ConfigError(f"{source}: {where}: {err}") from None


def check_value(tp: Any, value: Any, source: str, key: str):
    """`value` checked against type `tp` as `from_dict` checks a field (unions, lists, dicts, Literal, int -> float),
    returned converted; a mismatch is a `ConfigError` naming `source` and the dotted `key`.

    >>> check_value(int | list[int], [4, 16], "sft.yaml", "data.builtin.retrieval.n_pairs")
    [4, 16]
    >>> check_value(int, "ten", "sft.yaml", "data.builtin.arithmetic.n")
    Traceback (most recent call last):
    ...
    alignment.config.ConfigError: sft.yaml: 'data.builtin.arithmetic.n' = 'ten' must be int, got str
    """
    return _convert(tp, value, source, key)


def _convert(tp: Any, value: Any, source: str, key: str):
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(option, value, source, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"{source}: '{key}' = {value!r} does not match any of {', '.join(_name(o) for o in options)}"
        )
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, f"{key}.")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: '{key}' = {value!r}; expected one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {type(value).__name__}")
        item = args[0] if args else Any
        return [_convert(item, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {type(value).__name__}")
        item = args[1] if len(args) == 2 else Any
        return {k: _convert(item, v, source, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{source}: '{key}' = {value!r} must be {_name(tp)}, got {type(value).__name__}")


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def to_dict(cfg) -> dict:
    """A plain dict of a config (for manifests and metrics files)."""
    return dataclasses.asdict(cfg)


