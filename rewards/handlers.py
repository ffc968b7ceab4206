"""The rule reward handlers (factories: options -> handler): correctness, math, exact, regex, format and length.

Each factory declares the per-sample fields its handler reads (`rewards.base.reads`), so that a user's pool or
evaluation file is checked row by row before training.

rewards/registry.py lists them by name for `build_reward`, with the model-based and sandboxed handlers of
safety.py, reward_model.py and sandbox.py.
"""

from __future__ import annotations

import re

from rewards.base import STRING, TEXT, Field, RewardOutput, completion_text, reads
from rewards.verifiers import VERIFIERS, math_equivalent

TASK = Field(f"one of the built-in tasks {', '.join(VERIFIERS)}", lambda v: v in VERIFIERS)


def _column(fields: dict, key: str, n: int, default=None) -> list:
    if key in fields and fields[key] is not None:
        return list(fields[key])
    if default is not None:
        return [default] * n
    raise KeyError(f"needs the per-sample field '{key}' (a dataset column), got fields: "
                   f"{', '.join(sorted(fields)) or 'none'}")


@reads({"task": TASK, "answer": TEXT})
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


@reads({"answer": TEXT})
def math():
    """1.0 when the completion's final answer equals the `answer` field (see `verifiers.math_equivalent`).

    >>> math()(["q", "q"], ["so x = \\\\boxed{1/2}", "The answer is 0.4"], answer=["0.5", "0.5"])
    [1.0, 0.0]
    """

    def math(prompts, completions, **fields) -> list[float]:
        answers = _column(fields, "answer", len(completions))
        return [float(math_equivalent(completion_text(c), str(a))) for c, a in zip(completions, answers)]

    return math


def _normal(text: str, case_sensitive: bool) -> str:
    text = " ".join(text.split()).rstrip(".")  # runs of whitespace as one space, a final period dropped
    return text if case_sensitive else text.lower()


@reads({"answer": TEXT})
def exact(case_sensitive: bool = False, last_line: bool = False):
    """1.0 when the completion equals the `answer` field after normalising whitespace and a final period (and case,
    unless `case_sensitive`); `last_line` compares only the completion's last non-empty line (a reply that reasons
    first and answers last). For labels (classification) point `fields: {answer: label}` at the label column.

    >>> exact()(["q"] * 3, ["Paris.", "  paris ", "Lyon"], answer=["Paris"] * 3)
    [1.0, 1.0, 0.0]
    >>> exact(last_line=True)(["q"], ["It is in France.\\nParis"], answer=["Paris"])
    [1.0]
    """

    def exact(prompts, completions, **fields) -> list[float]:
        answers = _column(fields, "answer", len(completions))
        scores = []
        for c, a in zip(completions, answers):
            text = completion_text(c)
            if last_line:
                lines = [line for line in text.splitlines() if line.strip()]
                text = lines[-1] if lines else ""
            scores.append(float(_normal(text, case_sensitive) == _normal(str(a), case_sensitive)))
        return scores

    return exact


@reads(lambda pattern=None, **_: {} if pattern is not None else {"pattern": STRING})
def regex(pattern: str | None = None, full: bool = False, ignore_case: bool = False):
    """1.0 when the completion matches a regular expression: `pattern` for every sample, or, without it, the
    per-sample `pattern` field; `full` requires the whole completion (stripped) to match, else one match anywhere
    counts. A pattern that does not compile fails when the handler is built (option) or called (field).

    >>> regex(pattern=r"\\b(yes|no)\\b")(["q", "q"], ["I think yes.", "maybe"])
    [1.0, 0.0]
    >>> regex(full=True)(["q", "q"], ["42", "42 apples"], pattern=[r"\\d+", r"\\d+"])
    [1.0, 0.0]
    """
    flags = re.IGNORECASE if ignore_case else 0
    fixed = re.compile(pattern, flags) if pattern is not None else None

    def regex(prompts, completions, **fields) -> list[float]:
        patterns = [fixed] * len(completions) if fixed is not None else [
            re.compile(p, flags) for p in _column(fields, "pattern", len(completions))]
        match = (lambda r, t: r.fullmatch(t.strip())) if full else (lambda r, t: r.search(t))
        return [float(match(r, completion_text(c)) is not None) for r, c in zip(patterns, completions)]

    return regex


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
