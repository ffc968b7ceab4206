"""Where an RL training step's wall time goes: the `time/*` metrics of `MiniMaxGRPOTrainer`, and their stage summary.

A step is one optimizer step of the Trainer's loop (its `on_step_begin` .. `on_step_end`: every micro-batch's
forward + backward, grad clipping, the optimizer and scheduler step, `zero_grad`; not the logging, evaluation or
checkpoint saving after it). `StepClock` splits it into exclusive phases (`PHASES`):

    rollout        generation by the rollout worker (or TRL's own generate): every round of the step, dynamic-sampling
                   refills and a pool refresh's measurement rollouts included
    sync           pushing the policy's weights to the rollout worker (vLLM: the in-place copy; transformers: nothing)
    reward         the reward functions / verifiers (TRL's `_calculate_rewards`) and the trainer's `success_fn`
    ref_logprobs   the reference model's no-grad forward (or, for LoRA, the policy's with the adapter off)
    old_logprobs   the policy's no-grad forward for π_old / the rollout-correction log-probs
    other          the rest of building the step's batch: prompt tokenization, decoding, padding, advantages,
                   dynamic-sampling selection, the cross-rank gathers of rewards and metrics
    train          everything else in the step: the loss's forward + backward, the optimizer step

A phase entered inside another pauses it, so the phases add up to the step's wall time. With CUDA the clock
synchronizes the device before every read: GPU work queued in a phase is counted there, not in whichever later
phase first waits on it (no synchronization on CPU).
"""

from __future__ import annotations

import contextlib
import time

import torch

PHASES = ("rollout", "sync", "reward", "ref_logprobs", "old_logprobs", "other", "train")


class StepClock:
    """Exclusive wall time per phase of the open step (module docstring). `begin()` opens a step in phase `train`;
    `phase(name)` runs a block in another phase; `count_tokens(n)` adds generated tokens; `end()` closes the step
    and returns its seconds per phase, the step's total (`step`) and the tokens (`tokens`). Outside an open step
    `phase` and `count_tokens` do nothing (evaluation, scoring before or after training).

    >>> clock = StepClock()
    >>> clock.begin()
    >>> with clock.phase("rollout"):
    ...     with clock.phase("sync"):
    ...         time.sleep(0.02)
    ...     clock.count_tokens(5)
    >>> t = clock.end()
    >>> t["sync"] >= 0.02, t["rollout"] < t["sync"], abs(sum(t[p] for p in PHASES) - t["step"]) < 1e-9, t["tokens"]
    (True, True, True, 5)
    """

    def __init__(self, cuda: bool = False):
        self.cuda = cuda
        self._stack: list[str] | None = None  # None: no step open

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def begin(self) -> None:
        self._seconds = dict.fromkeys(PHASES, 0.0)
        self._tokens = 0
        self._stack = ["train"]
        self._start = self._mark = self._now()

    def _switch(self) -> None:
        now = self._now()
        self._seconds[self._stack[-1]] += now - self._mark
        self._mark = now

    @contextlib.contextmanager
    def phase(self, name: str):
        if self._stack is None:
            yield
            return
        if name not in self._seconds:
            raise ValueError(f"unknown step phase {name!r}; known: {', '.join(PHASES)}")
        self._switch()
        self._stack.append(name)
        try:
            yield
        finally:
            self._switch()
            self._stack.pop()

    def count_tokens(self, n: int) -> None:
        if self._stack is not None:
            self._tokens += int(n)

    def end(self) -> dict[str, float]:
        self._switch()
        self._stack = None
        return {**self._seconds, "step": self._mark - self._start, "tokens": self._tokens}


def step_metrics(t: dict[str, float]) -> dict[str, float]:
    """The logged metrics of one step from `StepClock.end()`'s values (over ranks: times their max, tokens their
    sum): `time/<phase>_s` and `time/step_s`, `time/rollout_frac` (generation's share of the step),
    `rollout/generated_tokens`, and `time/tokens_per_s` (generated tokens per second of `rollout`) on steps that
    generated (with `updates_per_batch` > 1 the later updates of a batch generate nothing).

    >>> m = step_metrics({**dict.fromkeys(PHASES, 0.0), "rollout": 1.5, "train": 0.5, "step": 2.5, "tokens": 300})
    >>> m["time/rollout_s"], m["time/step_s"], m["time/rollout_frac"], m["time/tokens_per_s"]
    (1.5, 2.5, 0.6, 200.0)
    >>> "time/tokens_per_s" in step_metrics({**dict.fromkeys(PHASES, 0.0), "step": 0.5, "tokens": 0})
    False
    """
    out = {f"time/{p}_s": float(t[p]) for p in PHASES}
    out["time/step_s"] = float(t["step"])
    # min: the max over ranks of a rank's rollout never exceeds the max of its step, up to float rounding
    out["time/rollout_frac"] = min(t["rollout"] / t["step"], 1.0) if t["step"] > 0 else 0.0
    out["rollout/generated_tokens"] = float(t["tokens"])
    if t["rollout"] > 0:
        out["time/tokens_per_s"] = t["tokens"] / t["rollout"]
    return out


def step_time_split(history: list[dict]) -> dict | None:
    """A stage's step-time split from a Trainer's log history: the mean seconds per step of each phase and of the
    step (`mean_s`), each phase's share of the step time (`share`), the generated tokens per second of rollout over
    the stage (`tokens_per_s`; None if nothing was generated), and the number of `steps`. None without `time/`
    metrics. Each logged value is a mean over the steps since the previous log (the Trainer's `logging_steps`
    window), so windows are weighted by their steps; a resumed run's history holds the steps before the resume
    (a checkpoint between two logs leaves its window's first steps unlogged; the window still counts them).

    >>> log = [{"step": 2, "time/step_s": 3.0, "time/rollout_s": 2.0, "time/train_s": 1.0,
    ...         "rollout/generated_tokens": 100.0},
    ...        {"step": 3, "time/step_s": 1.0, "time/rollout_s": 0.0, "time/train_s": 1.0,
    ...         "rollout/generated_tokens": 0.0},
    ...        {"step": 3, "eval_loss": 0.1}]
    >>> s = step_time_split(log)  # step means: (2*3 + 1)/3 s; rollout (2*2 + 0)/3 s; 200 tokens in 4 s of rollout
    >>> s["steps"], round(s["mean_s"]["step"], 4), round(s["mean_s"]["rollout"], 4), s["share"]["rollout"]
    (3, 2.3333, 1.3333, 0.5714285714285714)
    >>> s["tokens_per_s"], s["mean_s"]["sync"]
    (50.0, 0.0)
    """
    rows, last = [], 0
    for entry in history:
        if "time/step_s" in entry and "step" in entry:
            rows.append((entry["step"] - last, entry))
            last = entry["step"]
    steps = sum(n for n, _ in rows)
    if steps <= 0:
        return None

    def total(key):
        return sum(n * (e.get(key) or 0.0) for n, e in rows)

    step = total("time/step_s")
    mean = {p: total(f"time/{p}_s") / steps for p in PHASES}
    rollout, tokens = total("time/rollout_s"), total("rollout/generated_tokens")
    return {"steps": steps, "mean_s": {**mean, "step": step / steps},
            "share": {p: total(f"time/{p}_s") / step if step > 0 else 0.0 for p in PHASES},
            "tokens_per_s": tokens / rollout if rollout > 0 else None}


LABELS = {"rollout": "rollout", "sync": "weight sync", "reward": "reward", "ref_logprobs": "ref log-probs",
          "old_logprobs": "old log-probs", "other": "other", "train": "train"}


def step_time_line(split: dict) -> str:
    """One line for a summary: the mean step, each phase's mean and share, and the generated tokens/s.

    >>> split = {"steps": 4, "mean_s": {**dict.fromkeys(PHASES, 0.0), "rollout": 1.5, "train": 0.5, "step": 2.5},
    ...          "share": {**dict.fromkeys(PHASES, 0.0), "rollout": 0.6, "train": 0.2}, "tokens_per_s": 1234.4}
    >>> step_time_line(split)  # doctest: +NORMALIZE_WHITESPACE
    '2.500 s per step (mean of 4): rollout 1.500 s (60%), weight sync 0.000 s (0%), reward 0.000 s (0%),
    ref log-probs 0.000 s (0%), old log-probs 0.000 s (0%), other 0.000 s (0%), train 0.500 s (20%);
    1,234 generated tokens/s of rollout'
    """
    parts = ", ".join(f"{LABELS[p]} {split['mean_s'][p]:.3f} s ({split['share'][p]:.0%})" for p in PHASES)
    speed = split.get("tokens_per_s")
    tail = f"; {speed:,.0f} generated tokens/s of rollout" if speed is not None else ""
    return f"{split['mean_s']['step']:.3f} s per step (mean of {split['steps']}): {parts}{tail}"
