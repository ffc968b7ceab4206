"""The reward-handler interface, its validation, weighted composition from YAML, and the TRL adapter.

A reward handler is a plain callable

    handler(prompts, completions, **fields) -> RewardOutput(scores, components)   (or just a list of floats)

`prompts` are strings or chat message lists, `completions` strings or assistant message lists (TRL hands both forms),
and `fields` are per-sample reference columns of the dataset rows (lists as long as `completions`: `task`, `answer`,
`harmful`, `n_pairs`, `tests`, ...). `scores` has one float per completion; `components` holds named per-sample
breakdowns for logging.

Every handler that a stage calls goes through `validated`: an exception, a NaN/inf score or the wrong number of
scores becomes a `RewardError` that names the handler and the offending sample. A broken reward never silently
becomes 0 — with group-normalised advantages a constant 0 is indistinguishable from "all samples equally good" and
RL would train on noise.

`build_reward(spec)` composes handlers with weights, as the paper mixes rule rewards, reward models and the
harmlessness reward [01 §5.2]: the score is Σ_i weight_i · clip_i(score_i) and each handler's raw score is logged
as a component under its name (sub-components as "name/sub").
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field


class RewardError(RuntimeError):
    """A reward handler failed, returned a non-finite score or the wrong number of scores; names the handler."""


@dataclass
class RewardOutput:
    """Per-sample rewards plus named per-sample components (for logging, e.g. `safety/refusal`)."""

    scores: list[float]
    components: dict[str, list[float]] = field(default_factory=dict)


Handler = Callable[..., "RewardOutput | Sequence[float]"]

# name -> factory(**options) -> handler. Factories import their heavy dependencies lazily (torch for reward models).
REGISTRY: dict[str, Callable[..., Handler]] = {}


def register(name: str):
    """Decorator: make a handler factory available to `build_reward` under `name`."""

    def wrap(factory):
        REGISTRY[name] = factory
        return factory

    return wrap


def completion_text(completion) -> str:
    """The text of a completion: a string, or the content of the last message of a conversational completion.

    >>> completion_text("85"), completion_text([{"role": "assistant", "content": "85"}])
    ('85', '85')
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return completion["content"]
    return completion[-1]["content"] if completion else ""


def prompt_messages(prompt) -> list[dict]:
    """A prompt as chat messages: a string becomes one user turn.

    >>> prompt_messages("What is 2 + 2?")
    [{'role': 'user', 'content': 'What is 2 + 2?'}]
    """
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


def prompt_text(prompt) -> str:
    """The last user turn of a prompt (what rule handlers read)."""
    messages = prompt_messages(prompt)
    users = [m["content"] for m in messages if m.get("role") == "user"]
    return users[-1] if users else (messages[-1]["content"] if messages else "")


def _finite_list(values, what: str, name: str, n: int) -> list[float]:
    if hasattr(values, "tolist"):  # numpy array / torch tensor
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise RewardError(f"reward handler '{name}' returned {type(values).__name__} for {what}; "
                          "expected a list of floats or RewardOutput")
    if len(values) != n:
        raise RewardError(f"reward handler '{name}' returned {len(values)} {what} for {n} completions")
    out = []
    for i, v in enumerate(values):
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise RewardError(f"reward handler '{name}' returned {v!r} ({type(v).__name__}) for sample {i} "
                              f"of {what}; expected a float") from None
        if not math.isfinite(x):
            raise RewardError(f"reward handler '{name}' returned {x} for sample {i} of {what}")
        out.append(x)
    return out


def validated(handler: Handler, name: str | None = None) -> Callable[..., RewardOutput]:
    """Wrap `handler` so that every call returns a checked `RewardOutput` or raises `RewardError` naming it.

    >>> ok = validated(lambda prompts, completions, **f: [1.0] * len(completions), "ones")
    >>> ok(["p", "p"], ["a", "b"]).scores
    [1.0, 1.0]
    >>> validated(lambda prompts, completions, **f: [1.0], "short")(["p", "p"], ["a", "b"])
    Traceback (most recent call last):
    ...
    rewards.base.RewardError: reward handler 'short' returned 1 scores for 2 completions
    """
    if getattr(handler, "_validated", False):
        return handler
    name = name or getattr(handler, "name", None) or getattr(handler, "__name__", type(handler).__name__)

    @functools.wraps(handler, assigned=("__doc__",))
    def checked(prompts, completions, **fields) -> RewardOutput:
        n = len(completions)
        if len(prompts) != n:
            raise RewardError(f"reward handler '{name}' called with {len(prompts)} prompts for {n} completions")
        for key, column in fields.items():
            if isinstance(column, (list, tuple)) and len(column) != n:
                raise RewardError(f"reward handler '{name}': field '{key}' has {len(column)} values "
                                  f"for {n} completions")
        try:
            out = handler(prompts, completions, **fields)
        except RewardError:
            raise
        except Exception as err:
            raise RewardError(f"reward handler '{name}' raised {type(err).__name__}: {err}") from err
        if isinstance(out, RewardOutput):
            scores = _finite_list(out.scores, "scores", name, n)
            components = {key: _finite_list(v, f"scores of component '{key}'", name, n)
                          for key, v in out.components.items()}
        else:
            scores, components = _finite_list(out, "scores", name, n), {}
        return RewardOutput(scores, components or {name: scores})

    checked.name = name
    checked._validated = True
    checked.handler = handler
    return checked


class WeightedSum:
    """Σ_i weight_i · clip_i(handler_i(...)): the composed reward of `build_reward`.

    Components: each handler's raw (unweighted, unclipped) score under its name, its own sub-components as
    "name/sub", so that logs show what drove the total.
    """

    def __init__(self, parts: list[tuple[str, Handler, float, tuple[float, float] | None]]):
        if not parts:
            raise RewardError("reward spec is empty: give at least one handler, e.g. {correctness: {}}")
        self.parts = [(name, validated(h, name), float(w), clip) for name, h, w, clip in parts]
        self.name = "+".join(name for name, *_ in self.parts)
        self.weights = {name: w for name, _, w, _ in self.parts}

    def __call__(self, prompts, completions, **fields) -> RewardOutput:
        total = [0.0] * len(completions)
        components: dict[str, list[float]] = {}
        for name, handler, weight, clip in self.parts:
            out = handler(prompts, completions, **fields)
            components[name] = out.scores
            for key, values in out.components.items():
                if key != name:
                    components[key if key.startswith(f"{name}/") else f"{name}/{key}"] = values
            for i, s in enumerate(out.scores):
                total[i] += weight * (min(max(s, clip[0]), clip[1]) if clip else s)
        return RewardOutput(total, components)


def make_handler(name: str, options: dict | None = None) -> Handler:
    """One registered handler from its options (`type` picks the factory when `name` is only a label)."""
    from rewards import handlers  # noqa: F401  (registers the built-in handlers)

    options = dict(options or {})
    kind = options.pop("type", name)
    if kind not in REGISTRY:
        raise RewardError(f"reward '{name}': unknown handler type '{kind}'; known: {', '.join(sorted(REGISTRY))}")
    factory = REGISTRY[kind]
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in options if k not in params]
        if unknown:
            raise RewardError(f"reward '{name}': unknown option(s) {', '.join(map(repr, unknown))} for handler "
                              f"type '{kind}'; valid: {', '.join(params) or 'none'}")
    try:
        return factory(**options)
    except RewardError:
        raise
    except (TypeError, ValueError, OSError) as err:
        raise RewardError(f"reward '{name}': {err}") from err


def build_reward(spec: dict) -> WeightedSum:
    """Compose handlers from a YAML mapping `{name: {weight: w, clip: [lo, hi], type: kind, ...options}}`.

    `weight` defaults to 1, `clip` to none, `type` to `name` (give `type` to use one kind twice). Other keys are the
    handler factory's options; unknown ones raise naming the handler.

    >>> reward = build_reward({"correctness": {"weight": 2.0}})
    >>> reward(["What is 2 + 3?"], ["2 + 3 = 5"], task=["arithmetic"], answer=["5"], harmful=[False]).scores
    [2.0]
    """
    if not isinstance(spec, dict):
        raise RewardError(f"reward spec must be a mapping of handler name -> options, got {type(spec).__name__}")
    parts = []
    for name, options in spec.items():
        options = dict(options or {})
        weight = options.pop("weight", 1.0)
        clip = options.pop("clip", None)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
            raise RewardError(f"reward '{name}': weight must be a finite number, got {weight!r}")
        if clip is not None:
            if not (isinstance(clip, (list, tuple)) and len(clip) == 2 and clip[0] <= clip[1]):
                raise RewardError(f"reward '{name}': clip must be [lo, hi] with lo <= hi, got {clip!r}")
            clip = (float(clip[0]), float(clip[1]))
        parts.append((name, make_handler(name, options), weight, clip))
    return WeightedSum(parts)


def as_trl_reward(handler: Handler, name: str | None = None) -> Callable[..., list[float]]:
    """A TRL reward function `fn(prompts, completions, **kwargs) -> list[float]` (TRL logs it under `__name__`).

    Non-list kwargs TRL adds (`trainer_state`, `log_metric`, ...) pass through; the scores are validated.

    >>> fn = as_trl_reward(build_reward({"correctness": {}}), "correctness")
    >>> fn(prompts=["q"], completions=[[{"role": "assistant", "content": "7"}]], task=["arithmetic"],
    ...    answer=["7"], harmful=[False], trainer_state=None)
    [1.0]
    """
    checked = validated(handler, name)

    def reward_fn(prompts, completions, **kwargs) -> list[float]:
        return checked(prompts, completions, **kwargs).scores

    reward_fn.__name__ = reward_fn.__qualname__ = name or checked.name
    return reward_fn


def trl_reward_funcs(spec: dict) -> tuple[list[Callable[..., list[float]]], list[float]]:
    """The handlers of `spec` as separate TRL reward functions plus their weights (`reward_funcs=`,
    `reward_weights=`), so TRL logs each one. Clipping is applied inside each function."""
    composed = build_reward(spec)
    funcs, weights = [], []
    for name, handler, weight, clip in composed.parts:
        single = WeightedSum([(name, handler, 1.0, clip)])
        funcs.append(as_trl_reward(single, name))
        weights.append(weight)
    return funcs, weights
