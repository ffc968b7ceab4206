"""Checking built-in data specs (task or preference-category name -> builder options) before any data is built.

A stage YAML names built-in builders with their options, e.g. `data.builtin: {arithmetic: {n: 16000}}` (registry
`data_recipes.tasks.TASKS`), an RM's `data.builtin` (`data_recipes.preferences.PREFERENCE_BUILDERS`), or named
evaluation sets `eval.sets: {"retrieval@8": {task: retrieval, n: 100, n_pairs: 8}}`. `check_builtin` reports the
first problem as a `ConfigError` naming the file and the dotted key, with a did-you-mean for misspelt names.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, get_type_hints

from alignment.config import ConfigError, check_value, did_you_mean

NOT_OPTIONS = ("split",)  # set by the code that builds the rows (train / heldout), never by a config
OPTIONAL = ("seed",)  # defaults to the stage's seed


def _type_name(value) -> str:
    return "nothing" if value is None else type(value).__name__


def builder_options(builder: Callable) -> tuple[list[str], list[str]]:
    """(options a config may give `builder`, those it must give): its parameters but `split`; `seed` is optional.

    >>> from data_recipes.tasks import retrieval_examples
    >>> builder_options(retrieval_examples)
    (['n', 'seed', 'n_pairs'], ['n', 'n_pairs'])
    """
    params = [p for p in inspect.signature(builder).parameters.values() if p.name not in NOT_OPTIONS]
    required = [p.name for p in params if p.default is inspect.Parameter.empty and p.name not in OPTIONAL]
    return [p.name for p in params], required


def check_builtin(spec, builders: dict, source: str, key: str, named_sets: bool = False,
                  noun: tuple[str, str] = ("task", "tasks")) -> None:
    """Raise `ConfigError` unless `spec` maps names in `builders` to options their builder takes, with values of
    the annotated types. `source` (the file) and `key` (the spec's dotted key, e.g. "data.builtin") start every
    message: "{source}: '{key}.{name}.{option}' ...". With `named_sets` the names are evaluation-set names and the
    builder is the set's `task` option (default: the name itself), as in `eval.sets`. `noun` is what a name of
    `builders` names, singular and plural, for the messages (preferences: category).

    >>> from data_recipes.tasks import TASKS
    >>> check_builtin({"arithmetic": {"n": 10}, "retrieval": {"n": 5, "n_pairs": [1, 4]}}, TASKS, "sft.yaml",
    ...               "data.builtin")
    >>> check_builtin({"arithmetic": {"n": "ten"}}, TASKS, "sft.yaml", "data.builtin")
    Traceback (most recent call last):
    ...
    alignment.config.ConfigError: sft.yaml: 'data.builtin.arithmetic.n' = 'ten' must be int, got str
    """
    noun, nouns = noun
    if not isinstance(spec, dict):
        example = "{retrieval@8: {task: retrieval, n: 100}}" if named_sets else "{name: {n: 100}}"
        raise ConfigError(f"{source}: '{key}' must be a mapping of {'set name' if named_sets else noun} -> options, "
                          f"e.g. {example}; got {_type_name(spec)}")
    for name, options in spec.items():
        where = f"{key}.{name}"
        if not isinstance(options, dict):
            raise ConfigError(f"{source}: '{where}' must be a mapping of options, e.g. {{n: 100}}; "
                              f"got {_type_name(options)}")
        options = dict(options)
        task_key, task = where, name
        if named_sets and "task" in options:
            task_key, task = f"{where}.task", options.pop("task")
            if not isinstance(task, str):
                raise ConfigError(f"{source}: '{task_key}' must be a {noun} name, got {_type_name(task)}")
        if task not in builders:
            valid = f"{did_you_mean(task, builders)}; valid {nouns}: {', '.join(builders)}"
            if task_key != where:
                raise ConfigError(f"{source}: '{task_key}' = {task!r} is not a built-in {noun}{valid}")
            hint = "; a set named otherwise needs a 'task' option" if named_sets else ""
            raise ConfigError(f"{source}: '{where}' is not a built-in {noun}{valid}{hint}")
        builder = builders[task]
        allowed, required = builder_options(builder)
        valid = ", ".join(sorted(allowed + (["task"] if named_sets else [])))
        for option in options:
            if option in NOT_OPTIONS:
                raise ConfigError(f"{source}: '{where}.{option}' cannot be set: the stage picks the {option} "
                                  f"(train or heldout); valid options: {valid}")
            if option not in allowed:
                raise ConfigError(f"{source}: '{where}.{option}' is not an option of {noun} '{task}'"
                                  f"{did_you_mean(option, allowed)}; valid options: {valid}")
        for option in required:
            if option not in options:
                raise ConfigError(f"{source}: '{where}.{option}' is missing ({noun} '{task}' requires "
                                  f"{', '.join(required)})")
        hints = get_type_hints(builder)
        for option, value in options.items():
            check_value(hints.get(option, Any), value, source, f"{where}.{option}")
