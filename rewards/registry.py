"""The reward handlers by name, the check of a reward spec, and the composed reward built from it.

Built-in handler factories (REGISTRY; `register` adds your own):

    correctness   the task suite's verifiers by row `task` (arithmetic, retrieval, safety, math): 1.0 / 0.0
    math          final-answer equivalence against `answer` (numbers, fractions, simple expressions): 1.0 / 0.0
    format        1.0 when the completion has the expected shape (per-task regex, no chat markers, length cap)
    length        shaping against length bias [M1 §4]: -penalty per character beyond `max_chars`
    safety        refusal detector + labels or a harmless RM (rewards/safety.py)
    reward_model  a sequence-classification RM from a local directory (rewards/reward_model.py)
    code          pass rate of `tests` run against the completion's code in a sandbox (rewards/sandbox.py)

A spec is the YAML mapping `{name: {weight: w, clip: [lo, hi], type: kind, ...options}}`: `weight` defaults to 1,
`clip` to none, `type` to `name` (give `type` to use one kind twice); the other keys are the factory's keyword
arguments. `check_reward_spec` checks a spec from the factories' signatures alone, so a typo or a missing reward
model fails before a stage loads anything. Imports point one way: base <- handler modules <- this registry; factories
import torch lazily, so `build_reward({"correctness": {}})` costs no torch import.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Mapping

from alignment.config import did_you_mean
from rewards import handlers, reward_model, safety, sandbox
from rewards.base import Handler, RewardError, WeightedSum, as_trl_reward

# name -> factory(**options) -> handler; a factory's `path_options` (rewards.base.path_options) name the options
# that are local model directories.
REGISTRY: dict[str, Callable[..., Handler]] = {
    "correctness": handlers.correctness,
    "math": handlers.math,
    "format": handlers.format,
    "length": handlers.length,
    "safety": safety.safety,
    "reward_model": reward_model.reward_model,
    "code": sandbox.code,
}

# Keys of a spec entry that belong to the composition, not to the factory.
SPEC_KEYS = ("weight", "clip", "type")


def register(name: str):
    """Decorator: make a handler factory of your own available to `build_reward` under `name` (mark its model
    directory options with `rewards.base.path_options` so that `check_reward_spec` checks them too)."""

    def wrap(factory):
        REGISTRY[name] = factory
        return factory

    return wrap


def _factory_options(name, options: dict, exists: Callable[[str], bool], keys=("type",)) -> tuple[Callable, dict]:
    """The factory of one handler and its keyword arguments, checked against its signature; `keys` are the other
    keys valid where `options` came from (listed in the message for an unknown option)."""
    options = dict(options)
    where = f"reward '{name}': option 'type'" if "type" in options else f"reward '{name}'"
    kind = options.pop("type", name)
    if not isinstance(kind, str) or kind not in REGISTRY:
        raise RewardError(f"{where}: unknown handler type '{kind}'{did_you_mean(kind, REGISTRY)}; "
                          f"known: {', '.join(sorted(REGISTRY))}")
    factory = REGISTRY[kind]
    params = inspect.signature(factory).parameters.values()
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        valid = [p.name for p in named] + list(keys)
        for key in options:
            if key not in valid:
                raise RewardError(f"reward '{name}': option '{key}' is unknown for handler type '{kind}'"
                                  f"{did_you_mean(key, valid)}; valid: {', '.join(valid)}")
    for p in named:  # a blank YAML value (None) does not give a required option
        if p.default is p.empty and options.get(p.name) is None:
            raise RewardError(f"reward '{name}': option '{p.name}' is required for handler type '{kind}'")
    for key in getattr(factory, "path_options", ()):
        path = options.get(key)
        if path is None:
            continue
        if not isinstance(path, (str, os.PathLike)):
            raise RewardError(f"reward '{name}': option '{key}' must be a local model directory, got {path!r}")
        if not exists(os.fspath(path)):
            raise RewardError(f"reward '{name}': option '{key}': model directory '{os.fspath(path)}' not found")
    return factory, options


def check_reward_spec(spec: Mapping, exists: Callable[[str], bool] = os.path.exists) -> None:
    """Check a reward spec without building any handler (building a `reward_model` one loads the model): raises
    `RewardError` naming the handler and the option. `exists(path)` says whether a model directory is there (a
    pipeline passes one that also knows the checkpoints its earlier stages will write).

    >>> check_reward_spec({"rm": {"type": "reward_model", "pth": "runs/tiny/rm/final"}})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    rewards.base.RewardError: reward 'rm': option 'pth' is unknown ... (did you mean 'path'?); valid: path, ...
    >>> check_reward_spec({"safety": {"reward_model": "runs/tiny/rm/final"}}, exists=lambda path: False)
    Traceback (most recent call last):
    ...
    rewards.base.RewardError: reward 'safety': option 'reward_model': model directory 'runs/tiny/rm/final' not found
    """
    if not isinstance(spec, Mapping):
        raise RewardError(f"reward spec must be a mapping of handler name -> options, got {type(spec).__name__}")
    if not spec:
        raise RewardError("reward spec is empty: give at least one handler, e.g. {correctness: {}}")
    for name, options in spec.items():
        if options is None:  # `correctness:` in YAML
            options = {}
        if not isinstance(options, Mapping):
            raise RewardError(f"reward '{name}': options must be a mapping of option -> value, got "
                              f"{type(options).__name__} {options!r}")
        options = dict(options)
        weight, clip = options.pop("weight", 1.0), options.pop("clip", None)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
            raise RewardError(f"reward '{name}': option 'weight' must be a finite number, got {weight!r}")
        if clip is not None and not (
                isinstance(clip, (list, tuple)) and len(clip) == 2
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in clip) and clip[0] <= clip[1]):
            raise RewardError(f"reward '{name}': option 'clip' must be [lo, hi] with lo <= hi, got {clip!r}")
        _factory_options(name, options, exists, SPEC_KEYS)


def make_handler(name: str, options: dict | None = None) -> Handler:
    """One handler from its options (a spec entry without `weight` and `clip`; `type` picks the factory when
    `name` is only a label)."""
    factory, options = _factory_options(name, options or {}, os.path.exists)
    try:
        return factory(**options)
    except RewardError:
        raise
    except (TypeError, ValueError, OSError) as err:
        raise RewardError(f"reward '{name}': {err}") from err


def build_reward(spec: Mapping) -> WeightedSum:
    """The weighted sum of the handlers of `spec` (checked first by `check_reward_spec`, so a bad spec raises the
    same `RewardError` either way).

    >>> reward = build_reward({"correctness": {"weight": 2.0}})
    >>> reward(["What is 2 + 3?"], ["2 + 3 = 5"], task=["arithmetic"], answer=["5"], harmful=[False]).scores
    [2.0]
    """
    check_reward_spec(spec)
    parts = []
    for name, options in spec.items():
        options = dict(options or {})
        weight, clip = options.pop("weight", 1.0), options.pop("clip", None)
        parts.append((name, make_handler(name, options), weight, None if clip is None else tuple(map(float, clip))))
    return WeightedSum(parts)


def trl_reward_funcs(spec: Mapping) -> tuple[list[Callable[..., list[float]]], list[float]]:
    """The handlers of `spec` as separate TRL reward functions plus their weights (`reward_funcs=`,
    `reward_weights=`), so TRL logs each one. Clipping is applied inside each function.

    >>> funcs, weights = trl_reward_funcs({"correctness": {}, "format": {"weight": 0.1}})
    >>> [f.__name__ for f in funcs], weights
    (['correctness', 'format'], [1.0, 0.1])
    """
    composed = build_reward(spec)
    funcs, weights = [], []
    for name, handler, weight, clip in composed.parts:
        single = WeightedSum([(name, handler, 1.0, clip)])
        funcs.append(as_trl_reward(single, name))
        weights.append(weight)
    return funcs, weights
