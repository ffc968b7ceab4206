"""Length-bias monitor for RL [M1 §4]: reward models prefer longer outputs, so M1 watches, during RL, for completion
length growing while task success does not, and recalibrates the reward when it happens.

`LengthBiasMonitor.update(step, rewards, lengths, success)` is called once per training step with that step's
per-sample rewards, completion lengths (tokens or characters) and verifier successes (0/1, or None when the prompts
have no verifier), and returns metrics to log:

    length_bias/corr_reward_length    Pearson r of reward vs length within the step (0 when either is constant)
    length_bias/corr_success_length   the same for success (a length that buys success is not bias)
    length_bias/mean_length, mean_reward, success_rate
    length_bias/length_trend          relative growth of mean length over the window (slope · (W-1) / mean)
    length_bias/success_trend         absolute growth of the success rate over the window (slope · (W-1))
    length_bias/flag                  1.0 when length grows (> length_growth) and success does not (<= success_growth)

When the flag goes up, the monitor says so on stderr (one line, not every step it stays up), and `summary()` gives
the steps it was up for the stage's report.

Without success labels the flag falls back to "length grows and the reward follows length within steps"
(corr_reward_length > corr_threshold). Trends are least-squares slopes over the last `window` steps, so one noisy
step does not flip the flag. Departure from M1: M1 does not publish its thresholds; the defaults here (10% length
growth over 20 steps with < 2 points of success gain) are ours.
"""

from __future__ import annotations

import math
import sys
from collections import deque


def pearson(x: list[float], y: list[float]) -> float:
    """Pearson correlation; 0.0 when either side is constant or has fewer than 2 points.

    >>> round(pearson([1, 2, 3], [2, 4, 7]), 4), pearson([1, 1], [2, 3])
    (0.9934, 0.0)
    """
    n = len(x)
    if n < 2 or len(y) != n:
        return 0.0
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys on xs (0.0 for fewer than 2 distinct xs).

    >>> slope([0, 1, 2, 3], [1, 3, 5, 7])
    2.0
    """
    n = len(xs)
    mx, my = sum(xs) / max(n, 1), sum(ys) / max(n, 1)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0


class LengthBiasMonitor:
    """Per-step reward / length / success tracker that flags length growth without success growth.

    >>> m = LengthBiasMonitor(window=5, min_steps=3)
    >>> for step in range(5):
    ...     out = m.update(step, rewards=[0.5, 1.0], lengths=[10 + 5 * step, 20 + 5 * step], success=[0, 1])
    >>> out["length_bias/flag"], round(out["length_bias/length_trend"], 3), out["length_bias/success_trend"]
    (1.0, 0.8, 0.0)
    """

    def __init__(self, window: int = 20, min_steps: int = 5, length_growth: float = 0.10,
                 success_growth: float = 0.02, corr_threshold: float = 0.3):
        if window < 2 or not 2 <= min_steps <= window:
            raise ValueError(f"need window >= 2 and 2 <= min_steps <= window, got window={window}, "
                             f"min_steps={min_steps}")
        self.window, self.min_steps = window, min_steps
        self.length_growth, self.success_growth, self.corr_threshold = length_growth, success_growth, corr_threshold
        self.history: deque[tuple[float, float, float, float | None]] = deque(maxlen=window)
        self.flagged_steps: list[int] = []
        self._raised = False

    def update(self, step: int, rewards, lengths, success=None) -> dict[str, float]:
        rewards = [float(r) for r in rewards]
        lengths = [float(n) for n in lengths]
        if len(rewards) != len(lengths) or not rewards:
            raise ValueError(f"step {step}: {len(rewards)} rewards for {len(lengths)} lengths (need equal, > 0)")
        mean_len = sum(lengths) / len(lengths)
        metrics = {
            "length_bias/mean_length": mean_len,
            "length_bias/mean_reward": sum(rewards) / len(rewards),
            "length_bias/corr_reward_length": pearson(rewards, lengths),
        }
        rate = None
        if success is not None:
            success = [float(s) for s in success]
            if len(success) != len(lengths):
                raise ValueError(f"step {step}: {len(success)} success values for {len(lengths)} lengths")
            rate = sum(success) / len(success)
            metrics["length_bias/success_rate"] = rate
            metrics["length_bias/corr_success_length"] = pearson(success, lengths)
        self.history.append((float(step), mean_len, metrics["length_bias/mean_reward"], rate))

        steps = [h[0] for h in self.history]
        span = len(steps) - 1
        mean_of_means = sum(h[1] for h in self.history) / len(self.history)
        metrics["length_bias/length_trend"] = (
            slope(steps, [h[1] for h in self.history]) * span / mean_of_means if mean_of_means > 0 else 0.0)
        metrics["length_bias/reward_trend"] = slope(steps, [h[2] for h in self.history]) * span
        rates = [h[3] for h in self.history if h[3] is not None]
        has_success = len(rates) == len(self.history)
        if has_success:
            metrics["length_bias/success_trend"] = slope(steps, rates) * span

        grows = len(self.history) >= self.min_steps and metrics["length_bias/length_trend"] > self.length_growth
        if has_success:
            flag = grows and metrics["length_bias/success_trend"] <= self.success_growth
        else:
            flag = grows and metrics["length_bias/corr_reward_length"] > self.corr_threshold
        metrics["length_bias/flag"] = float(flag)
        if flag:
            self.flagged_steps.append(step)
            if not self._raised:  # newly up: say it where the user looks, not only in a logged scalar
                success = (f"success {metrics['length_bias/success_trend']:+.3f}" if has_success else
                           f"reward follows length within steps (r = {metrics['length_bias/corr_reward_length']:.2f})")
                print(f"[length-bias alarm] step {step}: mean completion length "
                      f"{metrics['length_bias/length_trend']:+.0%} over the last {len(self.history)} steps, "
                      f"{success}; the reward may be paying for length (M1 §4 recalibrates the reward model here)",
                      file=sys.stderr, flush=True)
        self._raised = flag
        return metrics

    def summary(self) -> str:
        """The steps the alarm was up, as ranges, for the stage's report.

        >>> m = LengthBiasMonitor(window=3, min_steps=2)
        >>> m.flagged_steps = [4, 5, 6, 9]
        >>> m.summary()
        'raised at steps 4-6, 9'
        """
        if not self.flagged_steps:
            return "never raised"
        runs, start = [], self.flagged_steps[0]
        for prev, step in zip(self.flagged_steps, self.flagged_steps[1:] + [None]):
            if step != prev + 1:
                runs.append(f"{start}-{prev}" if prev != start else f"{start}")
                start = step
        return "raised at steps " + ", ".join(runs)
