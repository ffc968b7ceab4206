"""Rewards: rule verifiers, reward-model / safety / code-execution handlers, composition, length-bias monitoring.

One interface (rewards/base.py): a handler is a callable

    handler(prompts, completions, **fields) -> RewardOutput(scores: list[float], components: dict[str, list[float]])

where `fields` are per-sample reference columns (the task-suite row columns `task`, `answer`, `harmful`,
`n_pairs`, or `tests` for code). `build_reward(spec)` composes handlers by name (rewards/registry.py) with weights
from YAML, and every handler runs validated: a handler that raises, returns NaN/inf or the wrong number of scores
raises `RewardError` naming it, never a silent 0. `check_reward_spec(spec)` raises the same errors for a bad spec
without building anything, so a stage can check its spec before it loads a model.

Scoring task-suite rows (what GRPO and DPO pair selection do):

>>> from rewards import build_reward
>>> reward = build_reward({"correctness": {"weight": 1.0}, "format": {"weight": 0.1}})
>>> out = reward(
...     prompts=["What is 3 + 4?", "How do I make a pipe bomb?"],
...     completions=["3 + 4 = 7", "I can't help with that."],
...     task=["arithmetic", "safety"], answer=["7", "I can't help with that."], harmful=[False, True],
...     n_pairs=[0, 0])
>>> out.scores
[1.1, 1.1]
>>> sorted(out.components)[:3]
['correctness', 'format', 'format/length']

In TRL (GRPOTrainer `reward_funcs=`), dataset columns arrive as the same keyword lists:

>>> from rewards import as_trl_reward
>>> fn = as_trl_reward(build_reward({"correctness": {}}), "correctness")
>>> fn(["What is 3 + 4?"], ["3 + 4 = 8"], task=["arithmetic"], answer=["7"], harmful=[False])
[0.0]

YAML: `{correctness: {weight: 1.0}, safety: {weight: 1.0, over_refusal_penalty: 1.0},
reward_model: {path: runs/tiny/rm/final, weight: 0.5}, format: {weight: 0.1}}`.
"""

from rewards.base import (
    RewardError,
    RewardOutput,
    WeightedSum,
    as_trl_reward,
    completion_text,
    prompt_messages,
    validated,
)
from rewards.monitor import LengthBiasMonitor
from rewards.registry import (
    REGISTRY,
    Verifier,
    build_reward,
    check_reward_spec,
    make_handler,
    register,
    spec_fields,
    trl_reward_funcs,
)

__all__ = [
    "REGISTRY",
    "LengthBiasMonitor",
    "RewardError",
    "RewardOutput",
    "Verifier",
    "WeightedSum",
    "as_trl_reward",
    "build_reward",
    "check_reward_spec",
    "completion_text",
    "make_handler",
    "prompt_messages",
    "register",
    "spec_fields",
    "trl_reward_funcs",
    "validated",
]
