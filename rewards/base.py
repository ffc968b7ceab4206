"""The reward-handler interface, its validation, weighted composition, and the TRL adapter.

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

`WeightedSum` composes handlers with weights, as the paper mixes rule rewards, reward models and the harmlessness
reward [01 §5.2]: the score is Σ_i weight_i · clip_i(score_i) and each handler's raw score is logged as a component
under its name (sub-components as "name/sub"). Handlers are built by name from a YAML spec in rewards/registry.py;
this module imports nothing from the package, so every handler module can import it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


class RewardError(RuntimeError):
    """A reward handler failed, returned a non-finite score or the wrong number of scores; names the handler."""


@dataclass
class RewardOutput:
    """Per-sample rewards plus named per-sample components (for logging, e.g. `safety/refusal`)."""

    scores: list[float]
    components: dict[str, list[float]] = field(default_factory=dict)


Handler = Callable[..., "RewardOutput | Sequence[float]"]


def path_options(*names: str):
    """Decorator: declare the options of a handler factory that name a local model directory, so that
    `check_reward_spec` reports a missing one without calling the factory (which would load the model)."""

    def mark(factory):
        factory.path_options = names
        return factory

    return mark


@dataclass(frozen=True)
class Field:
    """A per-sample field a handler reads (a dataset column): what kind of value it takes, in words for the error
    message and as a check; `text=True` fields also take a number and read it as its text ("42")."""

    expected: str
    check: Callable[[object], bool]
    text: bool = False


STRING = Field("a string", lambda v: isinstance(v, str))
TEXT = Field("a string or a number", lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool), text=True)
FLAG = Field("true or false", lambda v: isinstance(v, bool))
TESTS = Field("a non-empty list of strings (Python test snippets) or one string",
              lambda v: (isinstance(v, str) and bool(v.strip()))
              or (isinstance(v, (list, tuple)) and bool(v) and all(isinstance(t, str) for t in v)))


def reads(fields: "dict[str, Field] | Callable[..., dict[str, Field]]"):
    """Decorator: declare the per-sample fields a handler factory's handler needs, {field: Field}, or a function of
    the factory's options giving them (what it needs can depend on an option). A pool or evaluation file is checked
    against them, row by row, before any training (`rewards.registry.spec_fields`)."""

    def mark(factory):
        factory.reads = fields
        return factory

    return mark


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
    """The last user turn of a prompt: the request itself, for a handler that judges it without the conversation.

    >>> prompt_text([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    'Hi'
    """
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
    return checked


class WeightedSum:
    """Σ_i weight_i · clip_i(handler_i(...)): the composed reward that `build_reward` returns.

    Components: each handler's raw (unweighted, unclipped) score under its name, its own sub-components as
    "name/sub", so that logs show what drove the total.
    """

    def __init__(self, parts: list[tuple[str, Handler, float, tuple[float, float] | None]]):
        if not parts:
            raise RewardError("reward spec is empty: give at least one handler, e.g. {correctness: {}}")
        self.parts = [(name, validated(h, name), float(w), clip) for name, h, w, clip in parts]
        self.name = "+".join(name for name, *_ in self.parts)

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


def as_trl_reward(handler: Handler, name: str | None = None) -> Callable[..., list[float]]:
    """A TRL reward function `fn(prompts, completions, **kwargs) -> list[float]` (TRL logs it under `__name__`).

    Non-list kwargs TRL adds (`trainer_state`, `log_metric`, ...) pass through; the scores are validated.

    >>> chars = lambda prompts, completions, **fields: [len(completion_text(c)) for c in completions]
    >>> fn = as_trl_reward(chars, "chars")
    >>> fn(prompts=["q"], completions=[[{"role": "assistant", "content": "abc"}]], answer=["7"], trainer_state=None)
    [3.0]
    >>> fn.__name__
    'chars'
    """
    checked = validated(handler, name)

    def reward_fn(prompts, completions, **kwargs) -> list[float]:
        return checked(prompts, completions, **kwargs).scores

    reward_fn.__name__ = reward_fn.__qualname__ = name or checked.name
    return reward_fn
