"""The reward handlers by name, the check of a reward spec, and the composed reward built from it.

Built-in handler factories (REGISTRY; `register` adds your own):

    correctness   the task suite's verifiers by row `task` (arithmetic, retrieval, safety, math): 1.0 / 0.0
    math          final-answer equivalence against `answer` (\\boxed{}, "answer is", else the last number;
                  numbers, fractions, simple expressions; else normalised text): 1.0 / 0.0
    exact         the completion (or its last line) equals `answer`, whitespace / case / final period normalised
    regex         the completion matches a regex (option `pattern`, or the per-sample `pattern` field)
    format        1.0 when the completion has the expected shape (per-task regex, no chat markers, length cap)
    length        shaping against length bias [M1 §4]: -penalty per character beyond `max_chars`
    safety        refusal detector + labels or a harmless RM (rewards/safety.py)
    reward_model  a sequence-classification RM from a local directory (rewards/reward_model.py)
    code          pass rate of `tests` run against the completion's code in a sandbox (rewards/sandbox.py)

A spec is the YAML mapping `{name: {weight: w, clip: [lo, hi], type: kind, ...options}}`: `weight` defaults to 1,
`clip` to none, `type` to `name` (give `type` to use one kind twice), `fields` ({field the handler reads: the
dataset column holding it}, e.g. `{answer: solution}`) to the handler's own field names; the other keys are the
factory's keyword arguments. `spec_fields` lists the columns a spec reads and the kind of value each must hold
(declared by the factories, `rewards.base.reads`), so that a data file is checked row by row before training, and
`Verifier` scores completions of such rows in [0, 1]: the success measure of prompt pools and evaluation sets. `check_reward_spec` checks a spec from the factories' signatures alone, so a typo or a missing reward
model fails before a stage loads anything. Imports point one way: base <- handler modules <- this registry; factories
import torch lazily, so `build_reward({"correctness": {}})` costs no torch import.
"""

from __future__ import annotations

import inspect
import math
import os
import re
from collections.abc import Callable, Mapping

from alignment.config import did_you_mean
from rewards import handlers, reward_model, safety, sandbox
from rewards.base import Field, Handler, RewardError, WeightedSum, as_trl_reward, prompt_messages

# name -> factory(**options) -> handler; a factory's `path_options` (rewards.base.path_options) name the options
# that are local model directories.
REGISTRY: dict[str, Callable[..., Handler]] = {
    "correctness": handlers.correctness,
    "math": handlers.math,
    "exact": handlers.exact,
    "regex": handlers.regex,
    "format": handlers.format,
    "length": handlers.length,
    "safety": safety.safety,
    "reward_model": reward_model.reward_model,
    "code": sandbox.code,
}

# Keys of a spec entry that belong to the composition, not to the factory.
SPEC_KEYS = ("weight", "clip", "type", "fields")


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
        renamed = options.pop("fields", None) or {}
        factory, options = _factory_options(name, options, exists, SPEC_KEYS)
        read = _reads(factory, options)
        if not isinstance(renamed, Mapping) or not all(isinstance(v, str) for v in renamed.values()):
            raise RewardError(f"reward '{name}': option 'fields' must map a field the handler reads to a column "
                              f"name, e.g. {{answer: solution}}; got {renamed!r}")
        for key in renamed:
            if key not in read:
                raise RewardError(f"reward '{name}': option 'fields': '{key}' is not a field handler type "
                                  f"'{options.get('type', name)}' reads{did_you_mean(key, read)}; it reads: "
                                  f"{', '.join(read) or 'no fields'}")


def _reads(factory, options: dict) -> dict[str, Field]:
    """The fields a factory's handler reads with these options (`rewards.base.reads`; none declared: none)."""
    declared = getattr(factory, "reads", {})
    return dict(declared(**options) if callable(declared) else declared)


def spec_fields(spec: Mapping) -> list[tuple[str, str, str, Field]]:
    """(handler name, field, dataset column, Field) for every field the handlers of `spec` read, the column being
    the field itself unless the spec's `fields` renames it. Checks the spec first (`check_reward_spec`).

    >>> [(h, f, c, k.expected) for h, f, c, k in spec_fields({"math": {"fields": {"answer": "solution"}}})]
    [('math', 'answer', 'solution', 'a string or a number')]
    """
    check_reward_spec(spec, exists=lambda path: True)  # model directories are checked where they are loaded
    out = []
    for name, options in spec.items():
        options = {k: v for k, v in dict(options or {}).items() if k not in ("weight", "clip")}
        renamed = options.pop("fields", None) or {}
        factory, options = _factory_options(name, options, lambda path: True)
        out += [(name, key, renamed.get(key, key), kind) for key, kind in _reads(factory, options).items()]
    return out


def _renamed(handler: Handler, columns: Mapping[str, str]) -> Handler:
    """`handler` reading each of its fields from the column `columns` names for it."""

    def renamed(prompts, completions, **fields):
        return handler(prompts, completions, **{**fields, **{key: fields.get(col) for key, col in columns.items()}})

    renamed.name = getattr(handler, "name", None) or getattr(handler, "__name__", "handler")
    return renamed


def make_handler(name: str, options: dict | None = None) -> Handler:
    """One handler from its options (a spec entry without `weight` and `clip`; `type` picks the factory when
    `name` is only a label)."""
    options = dict(options or {})
    columns = options.pop("fields", None) or {}
    factory, options = _factory_options(name, options, os.path.exists)
    try:
        handler = factory(**options)
        return _renamed(handler, columns) if columns else handler
    except RewardError:
        raise
    except (TypeError, ValueError, OSError, re.error) as err:
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


class Verifier:
    """Success of completions by a reward spec, in [0, 1]: the spec's weighted sum (`build_reward`) clipped to
    [0, 1], so a binary verifier gives pass / fail, the `code` handler its per-test pass rate, and a weighted mix
    (e.g. `{math: {weight: 0.8}, format: {weight: 0.2}}`) partial credit. What the offline success-rate band, the
    online pool refresh and file evaluation sets measure.

    `verifier(prompts, completions, rows)`: `rows` are the dataset rows of the samples, whose columns reach the
    handlers as fields (a key absent from a row reads as None).

    >>> v = Verifier({"math": {}})
    >>> v(["q", "q"], ["The answer is 42.", "41"], [{"answer": "42"}, {"answer": 42}])
    [1.0, 0.0]
    """

    def __init__(self, spec: Mapping):
        self.spec, self.reward = dict(spec), build_reward(spec)

    def __call__(self, prompts, completions, rows: list[dict]) -> list[float]:
        keys = dict.fromkeys(k for row in rows for k in row if k not in ("prompt", "messages"))
        columns = {key: [row.get(key) for row in rows] for key in keys}
        scores = self.reward([prompt_messages(p) for p in prompts], completions, **columns).scores
        return [min(max(s, 0.0), 1.0) for s in scores]
