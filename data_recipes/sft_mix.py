"""SFT mixes and held-out evaluation sets from the built-in tasks plus user files.

The paper's SFT prompt pool is tagged by task type and domain [01 §5.1]; here the tag is the `task` column, which
the evaluation and reward code dispatch on. Responses are the tasks' reference replies, not rejection samples:
with rule-verified tasks the reference is already the best response a reward model could pick.
"""

from __future__ import annotations

import random

import datasets

from data_recipes.io import load_rows, rows_to_dataset
from data_recipes.specs import check_builtin
from data_recipes.tasks import TASKS


def build_sft_mix(builtin: dict[str, dict], files: list[str], seed: int) -> datasets.Dataset:
    """Rows of each built-in task (`builtin` maps task name → kwargs of its function, e.g.
    {"arithmetic": {"n": 4000}, "retrieval": {"n": 800, "n_pairs": [4, 16]}}) plus every user file, shuffled.

    `seed` seeds the tasks unless their kwargs give one, and the shuffle: the same arguments give the same Dataset.
    """
    check_builtin(builtin, TASKS, "build_sft_mix", "builtin")
    rows = []
    for name, kwargs in builtin.items():
        rows += TASKS[name](**{"seed": seed, **kwargs})
    for path in files:
        rows += load_rows(path)
    if not rows:
        raise ValueError("empty SFT mix: no built-in task rows and no files")
    random.Random(seed).shuffle(rows)
    return rows_to_dataset(rows)


def heldout_sets(spec: dict[str, dict], seed: int) -> dict[str, list[dict]]:
    """Held-out rows per named evaluation set, e.g. {"arithmetic": {"task": "arithmetic", "n": 100},
    "retrieval@32": {"task": "retrieval", "n": 50, "n_pairs": 32}}; "task" defaults to the set's name.

    Arithmetic and safety held-out problems never occur in the train split; retrieval uses a separate stream.
    """
    check_builtin(spec, TASKS, "heldout_sets", "spec", named_sets=True)
    sets = {}
    for name, kwargs in spec.items():
        kwargs = dict(kwargs)
        task = kwargs.pop("task", name)
        sets[name] = TASKS[task](**{"seed": seed, **kwargs, "split": "heldout"})
    return sets
