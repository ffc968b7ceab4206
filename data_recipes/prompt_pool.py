"""Prompt pools for online RL, chosen by success rate [01 §5.4.2, M1 §4-5].

MiniMax-01 prioritises prompts of moderate success rate (most information per rollout); MiniMax-M1 samples each
problem several times and keeps 0 < pass rate < 0.9. `build_prompt_pool` does that offline with the *current*
policy through any rollout worker: k samples per prompt, a verifier scores each, prompts whose pass rate lies
strictly inside the band (lo, hi) are kept, and the pool is written as a dataset with its `pass_rate` column.
(The online half, dropping zero-variance groups and refilling the batch, lives with the trainer:
`alignment.losses.zero_variance_groups` and `alignment.trainers.MiniMaxGRPOTrainer`.)

Departure: M1 measures pass@10 with a stronger model; here the policy being trained measures itself (there is no
stronger model for the tiny suite), which is also what "moderate success for this policy" means.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import datasets

from alignment.rollout.base import RolloutWorker, SamplingOptions
from data_recipes.io import prompt_of
from rewards.verifiers import verify


@dataclass
class PoolOptions:
    # Built-in task rows: task name -> kwargs of its builder (data_recipes.tasks), e.g. {arithmetic: {n: 2000}}.
    # Use a seed other than the SFT stage's, so that the RL prompts come from a different stream [01 §5.4.2].
    builtin: dict[str, dict]
    seed: int = 1
    k: int = 8  # samples per prompt for the pass rate
    # Keep lo < pass rate < hi (M1: 0 < p < 0.9): never-solved prompts give no signal, always-solved ones none either.
    lo: float = 0.0
    hi: float = 0.9
    max_prompts: int | None = None  # cap after filtering (None: all that pass)
    # Prompts "not seen in SFT" [01 §5.4.2]: candidates whose prompt occurs in this built-in mix (the SFT stage's
    # `data.builtin`, built with `exclude_seed`, the SFT stage's seed) are removed before scoring.
    exclude_builtin: dict[str, dict] = field(default_factory=dict)
    exclude_seed: int = 0

    def __post_init__(self):
        if not self.builtin:
            raise ValueError("prompts.builtin: give at least one task")
        if self.k < 1:
            raise ValueError(f"prompts.k must be >= 1, got {self.k}")
        if not 0 <= self.lo < self.hi <= 1:
            raise ValueError(f"prompts: need 0 <= lo < hi <= 1, got lo={self.lo}, hi={self.hi}")


def success_rates(worker: RolloutWorker, rows: list[dict], k: int, sampling: SamplingOptions,
                  score: Callable[[dict, str], float] = verify) -> list[float]:
    """Pass rate of each row's prompt (its messages without the final assistant reply): mean score of k samples."""
    batch = worker.generate([prompt_of(r) for r in rows], n=k, sampling=sampling)
    return [sum(float(score(row, batch.texts[i * k + j])) for j in range(k)) / k for i, row in enumerate(rows)]


def filter_by_success_rate(rows: list[dict], rates: list[float], lo: float, hi: float) -> list[dict]:
    """Rows with lo < rate < hi, each with its `pass_rate` added (order kept).

    >>> [r["id"] for r in filter_by_success_rate([{"id": i} for i in range(4)], [0, .25, .9, 1], 0, .9)]
    [1]
    """
    if len(rows) != len(rates):
        raise ValueError(f"{len(rows)} rows but {len(rates)} pass rates")
    return [{**row, "pass_rate": rate} for row, rate in zip(rows, rates) if lo < rate < hi]


def unique_prompts(rows: list[dict]) -> list[dict]:
    """First row of each distinct prompt (task generators sample with replacement; a pool wants each once).

    >>> len(unique_prompts([{"messages": [{"role": "user", "content": "q"}]}] * 3))
    1
    """
    seen, out = set(), []
    for row in rows:
        key = repr(prompt_of(row))
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def exclude_prompts(rows: list[dict], seen: list[dict]) -> list[dict]:
    """Rows whose prompt does not occur in `seen` (e.g. the SFT mix).

    >>> q = lambda text: {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "x"}]}
    >>> [r["messages"][0]["content"] for r in exclude_prompts([q("a"), q("b")], [q("b")])]
    ['a']
    """
    seen_keys = {repr(prompt_of(r)) for r in seen}
    return [r for r in rows if repr(prompt_of(r)) not in seen_keys]


def build_prompt_pool(worker: RolloutWorker, rows: list[dict], opts: PoolOptions, sampling: SamplingOptions,
                      out_path: str | Path | None = None, score: Callable[[dict, str], float] = verify):
    """Filter `rows` by success rate and return (dataset, stats). The dataset has `prompt` (chat messages), the
    task columns the verifiers read, and `pass_rate`; written to `out_path` (.jsonl or .parquet) atomically if
    given. Duplicate prompts are scored once. stats: prompts scored / kept and the pass-rate histogram counts
    (0, band, >= hi)."""
    rows = unique_prompts(rows)
    rates = success_rates(worker, rows, opts.k, sampling, score)
    kept = filter_by_success_rate(rows, rates, opts.lo, opts.hi)
    if opts.max_prompts is not None:
        kept = kept[: opts.max_prompts]
    if not kept:
        raise ValueError(f"prompt pool is empty: none of {len(rows)} prompts has a pass rate in "
                         f"({opts.lo}, {opts.hi}) (mean pass rate {sum(rates) / max(len(rates), 1):.3f})")
    records = [{"prompt": prompt_of(r), "task": r["task"], "answer": r["answer"], "harmful": r["harmful"],
                "n_pairs": r["n_pairs"], "pass_rate": r["pass_rate"]} for r in kept]
    ds = datasets.Dataset.from_list(records)
    stats = {"scored": len(rows), "kept": len(kept), "mean_pass_rate_all": sum(rates) / len(rates),
             "mean_pass_rate_kept": sum(r["pass_rate"] for r in kept) / len(kept),
             "below_or_at_lo": sum(r <= opts.lo for r in rates), "at_or_above_hi": sum(r >= opts.hi for r in rates)}
    if out_path is not None:
        save_pool(ds, out_path)
    return ds, stats


def save_pool(ds: datasets.Dataset, path: str | Path) -> None:
    """Write the pool as JSON lines or Parquet atomically (`alignment.reporting.atomic_path`: a crash never leaves
    half a pool where a resumed run would pick it up)."""
    from alignment.reporting import atomic_path

    path = Path(path)
    if path.suffix not in (".parquet", ".jsonl"):
        raise ValueError(f"{path}: prompt pool must be .jsonl or .parquet")
    with atomic_path(path) as tmp:
        ds.to_parquet(str(tmp)) if path.suffix == ".parquet" else ds.to_json(str(tmp), lines=True)


def load_pool(path: str | Path) -> datasets.Dataset:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompt pool not found")
    kind = "parquet" if path.suffix == ".parquet" else "json"
    return datasets.load_dataset(kind, data_files=str(path), split="train")
