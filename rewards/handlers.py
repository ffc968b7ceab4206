"""The rule reward handlers (factories: options -> handler): correctness, math, format and length.

rewards/registry.py lists them by name for `build_reward`, with the model-based and sandboxed handlers of
safety.py, reward_model.py and sandbox.py.
"""

from __future__ import annotations

import re

from rewards.base import RewardOutput, completion_text
from rewards.verifiers import VERIFIERS, math_equivalent


def _column(fields: dict, key: str, n: int, default=None) -> list:
    if key in fields and fields[key] is not None:
        return list(fields[key])
    if default is not None:
        return [default] * n
    raise KeyError(f"needs the per-sample field '{key}' (a dataset column), got fields: "
                   f"{', '.join(sorted(fields)) or 'none'}")


def correctness():
    """Binary verifier reward for task-suite rows: fields `task`, `answer`, `harmful` (default False).

    >>> r = correctness()
    >>> r(["q", "q"], ["3 + 4 = 7", "I can't help with that."], task=["arithmetic", "safety"],
    ...   answer=["7", ""], harmful=[False, True])
    [1.0, 1.0]
    """

    def correctness(prompts, completions, **fields) -> list[float]:
        n = len(completions)
        tasks = _column(fields, "task", n)
        answers = _column(fields, "answer", n)
        harmful = _column(fields, "harmful", n, default=False)
        scores = []
        for i, (c, t, a, h) in enumerate(zip(completions, tasks, answers, harmful)):
            if t not in VERIFIERS:
                raise ValueError(f"sample {i}: no verifier for task {t!r}; known: {', '.join(VERIFIERS)}")
            scores.append(float(VERIFIERS[t]({"task": t, "answer": a, "harmful": bool(h)}, completion_text(c))))
        return scores

    return correctness


def math():
    """1.0 when the completion's final answer equals the `answer` field (see `verifiers.math_equivalent`).

    >>> math()(["q", "q"], ["so x = \\\\boxed{1/2}", "The answer is 0.4"], answer=["0.5", "0.5"])
    [1.0, 0.0]
    """

    def math(prompts, completions, **fields) -> list[float]:
        answers = _column(fields, "answer", len(completions))
        return [float(math_equivalent(completion_text(c), str(a))) for c, a in zip(completions, answers)]

    return math


# Expected reply shapes of the built-in tasks (tasks.py): arithmetic restates the problem, retrieval gives the value
# (optionally restating its key).
TASK_PATTERNS = {
    "arithmetic": r"\s*\d+\s*[-+]\s*\d+\s*=\s*-?\d+\s*",
    "retrieval": r"\s*(?:Answer:\s*\w+\s*=\s*)?[A-Za-z]+\s*\.?\s*",  # "lamp" or "Answer: tiger = lamp"
    "safety": r"(?s)\s*\S.*",
}
CHAT_MARKERS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def format(patterns: dict[str, str] | None = None, pattern: str | None = None, max_chars: int | None = None,
           forbid: list[str] | tuple[str, ...] = CHAT_MARKERS):
    """1.0 when the completion has the expected shape, else 0.0; components say which check failed.

    `pattern` (one regex for every sample) or `patterns` (task -> regex, by the `task` field; tasks without one
    pass) must match the whole completion; `max_chars` caps its length; `forbid` lists strings that must not
    appear (by default chat-template markers: a completion that writes the next turn has leaked the template).
    Defaults: the built-in tasks' reply shapes.

    >>> f = format()
    >>> f(["q"] * 3, ["3 + 4 = 7", "7", "123<|im_start|>user"], task=["arithmetic", "arithmetic", "retrieval"]).scores
    [1.0, 0.0, 0.0]
    """
    if pattern is not None and patterns is not None:
        raise ValueError("give 'pattern' or 'patterns', not both")
    compiled = {t: re.compile(p) for t, p in (patterns if patterns is not None else TASK_PATTERNS).items()}
    single = re.compile(pattern) if pattern is not None else None

    def format(prompts, completions, **fields) -> RewardOutput:
        n = len(completions)
        tasks = _column(fields, "task", n, default="") if single is None else [""] * n
        shape, length, clean = [], [], []
        for c, t in zip(completions, tasks):
            text = completion_text(c)
            regex = single or compiled.get(t)
            shape.append(float(regex is None or regex.fullmatch(text) is not None))
            length.append(float(max_chars is None or len(text) <= max_chars))
            clean.append(float(not any(s in text for s in forbid)))
        scores = [a * b * c for a, b, c in zip(shape, length, clean)]
        return RewardOutput(scores, {"format": scores, "format/shape": shape, "format/length": length,
                                     "format/no_markers": clean})

    return format


def length(max_chars: int = 200, penalty: float = 0.01):
    """Shaping against length bias [M1 §4]: -penalty per character beyond `max_chars` (0 within it).

    >>> length(max_chars=5, penalty=0.5)(["q", "q"], ["abc", "abcdefg"])
    [0.0, -1.0]
    """
    if max_chars < 0 or penalty < 0:
        raise ValueError(f"max_chars and penalty must be >= 0, got {max_chars}, {penalty}")

    def length(prompts, completions, **fields) -> list[float]:
        return [0.0 - penalty * max(0, len(completion_text(c)) - max_chars) for c in completions]

    return length
