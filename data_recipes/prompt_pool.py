"""Prompt pools for online RL, chosen by success rate [01 §5.4.2, M1 §4-5]: from built-in tasks or your own files.

MiniMax-01 prioritises prompts of moderate success rate (most information per rollout); MiniMax-M1 samples each
problem several times and keeps 0 < pass rate < 0.9. `build_prompt_pool` does that offline with the *current*
policy through any rollout worker: k samples per prompt, a verifier scores each, prompts whose pass rate lies
strictly inside the band (lo, hi) are kept, and the pool is written as a dataset with its `pass_rate` column.
Online, `LivePool` keeps it there: prompts whose success measured during training leaves the band are retired and
re-measured reserve prompts take their place. (Zero-variance groups are dropped per batch by the trainer:
`alignment.losses.zero_variance_groups` and `alignment.trainers.MiniMaxGRPOTrainer`.)

Your own prompts: `prompts.files` are .jsonl / .json / .parquet files of rows with a prompt (`prompt`: text or chat
messages, or `messages`: a conversation whose final assistant reply, if any, is dropped) and whatever fields the
verifiers read (`answer`, `tests`, `label`, metadata...). The reward handlers declare the fields they read
(`rewards.spec_fields`), and every row is checked against them when the pool is read (`load_pool_files`), before
any model loads: a missing field or a value of the wrong kind is a `DataError` naming the file, the row, the column
and the handler. Built-in task rows are one more source and are checked the same way.

The success of a completion is the `prompts.verifier` reward spec's score clipped to [0, 1] (`rewards.Verifier`;
the stage's `reward` spec when not given): pass / fail for a binary verifier, the per-test pass rate for `code`.

Departure: M1 measures pass@10 with a stronger model; here the policy being trained measures itself (there is no
stronger model for the tiny suite), which is also what "moderate success for this policy" means.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import datasets

from alignment.rollout.base import RolloutWorker, SamplingOptions
from data_recipes.io import ROLES, DataError, prompt_of, read_rows, rows_to_dataset
from rewards.verifiers import verify

# score(prompts, completions, rows) -> one success in [0, 1] per completion (a `rewards.Verifier`)
Score = Callable[[list, list, list[dict]], list[float]]


@dataclass
class RefreshOptions:
    # Online refresh: every `every` optimizer steps (0: off), the prompts whose success rate measured in training
    # (their latest rollout group, G samples) lies outside (lo, hi) are retired, and `measure` reserve prompts (those
    # at or below lo in the offline pass: the policy may have grown into them) are measured again, k samples each with
    # the current policy; those now inside the band take the retired prompts' places. A solved pool keeps giving
    # signal, where dynamic sampling alone would drop ever more groups.
    every: int = 0
    measure: int = 32

    def __post_init__(self):
        if self.every < 0 or self.measure < 1:
            raise ValueError(f"prompts.refresh: need every >= 0 and measure >= 1, got {self.every}, {self.measure}")


@dataclass
class PoolOptions:
    # Built-in task rows: task name -> kwargs of its builder (data_recipes.tasks), e.g. {arithmetic: {n: 2000}}.
    # Use a seed other than the SFT stage's, so that the RL prompts come from a different stream [01 §5.4.2].
    builtin: dict[str, dict] = field(default_factory=dict)
    # Your own prompt files (.jsonl / .json / .parquet): rows of `prompt` (or `messages`) + the verifiers' fields.
    files: list[str] = field(default_factory=list)
    # What success means for the pass rate (offline band, online refresh): a reward spec whose score, clipped to
    # [0, 1], is a completion's success (rewards.Verifier), e.g. {math: {}} or {code: {}}; null: the stage's `reward`.
    verifier: dict[str, dict] | None = None
    refresh: RefreshOptions = field(default_factory=RefreshOptions)
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
        if not self.builtin and not self.files:
            raise ValueError("prompts: give at least one of 'builtin' (task name -> options) or 'files'")
        if self.k < 1:
            raise ValueError(f"prompts.k must be >= 1, got {self.k}")
        if not 0 <= self.lo < self.hi <= 1:
            raise ValueError(f"prompts: need 0 <= lo < hi <= 1, got lo={self.lo}, hi={self.hi}")


def builtin_score(prompts, completions, rows: list[dict]) -> list[float]:
    """The built-in task verifiers (`rewards.verifiers.verify`, by each row's `task`) as a `Score`.

    >>> builtin_score([None], ["2 + 3 = 5"], [{"task": "arithmetic", "answer": "5", "harmful": False}])
    [1.0]
    """
    return [float(verify(row, c)) for row, c in zip(rows, completions)]


def success_rates(worker: RolloutWorker, rows: list[dict], k: int, sampling: SamplingOptions,
                  score: Score = builtin_score) -> list[float]:
    """Pass rate of each row's prompt (its messages without the final assistant reply): mean score of k samples,
    scored in one `score` call."""
    prompts = [prompt_of(r) for r in rows]
    batch = worker.generate(prompts, n=k, sampling=sampling)
    scores = score([p for p in prompts for _ in range(k)], batch.texts, [r for r in rows for _ in range(k)])
    return [sum(float(s) for s in scores[i * k:(i + 1) * k]) / k for i in range(len(rows))]


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


def rate_histogram(rates: list[float], bins: int = 10) -> list[int]:
    """Counts of rates in [0, 1/bins), ..., [(bins-1)/bins, 1] (1.0 in the last bin).

    >>> rate_histogram([0.0, 0.05, 0.5, 1.0], bins=4)
    [2, 0, 1, 1]
    """
    counts = [0] * bins
    for r in rates:
        counts[min(int(r * bins), bins - 1)] += 1
    return counts


def _record(row: dict) -> dict:
    """A pool row: its prompt as chat messages and every other column but `messages`."""
    return {"prompt": prompt_of(row), **{k: v for k, v in row.items() if k not in ("prompt", "messages")}}


def build_prompt_pool(worker: RolloutWorker, rows: list[dict], opts: PoolOptions, sampling: SamplingOptions,
                      out_path: str | Path | None = None, score: Score = builtin_score,
                      reserve_path: str | Path | None = None):
    """Filter `rows` by success rate and return (dataset, stats). The dataset has `prompt` (chat messages), every
    other column of the rows (the fields the verifiers read), and `pass_rate`; written to `out_path` (.jsonl or
    .parquet) atomically if given. `reserve_path`: the prompts at or below `lo` (too hard for now) and those in the
    band beyond `max_prompts`, with their rates, for the online refresh (`LivePool`). Duplicate prompts are scored
    once. stats: prompts scored / kept, the pass-rate counts (<= lo, >= hi) and a 10-bin histogram of all rates."""
    rows = unique_prompts(rows)
    rates = success_rates(worker, rows, opts.k, sampling, score)
    band = filter_by_success_rate(rows, rates, opts.lo, opts.hi)
    kept = band if opts.max_prompts is None else band[: opts.max_prompts]
    if not kept:
        raise ValueError(f"prompt pool is empty: none of {len(rows)} prompts has a pass rate in "
                         f"({opts.lo}, {opts.hi}) (mean pass rate {sum(rates) / max(len(rates), 1):.3f})")
    ds = rows_to_dataset([_record(r) for r in kept])
    stats = {"scored": len(rows), "kept": len(kept), "mean_pass_rate_all": sum(rates) / len(rates),
             "mean_pass_rate_kept": sum(r["pass_rate"] for r in kept) / len(kept),
             "below_or_at_lo": sum(r <= opts.lo for r in rates), "at_or_above_hi": sum(r >= opts.hi for r in rates),
             "histogram_all": rate_histogram(rates)}
    if out_path is not None:
        save_pool(ds, out_path)
    if reserve_path is not None:
        reserve = band[len(kept):] + [{**row, "pass_rate": r} for row, r in zip(rows, rates) if r <= opts.lo]
        stats["reserve"] = len(reserve)
        # never empty on disk (a schema-less file does not load): an empty reserve is a file of no rows but the pool's
        save_pool(rows_to_dataset([_record(r) for r in reserve]) if reserve else ds.select([]), reserve_path)
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


# -- your own prompt files -----------------------------------------------------------------------------------------


def _conversation(value, where: str, key: str) -> list[dict]:
    """A prompt as chat messages: text becomes one user turn; a message list is checked (roles, string contents)
    and a final assistant reply is dropped (the policy writes its own)."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: {key} is an empty string; expected the prompt text or chat messages")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else type(value).__name__
        raise DataError(f"{where}: {key} is {got}; expected the prompt text or a non-empty list of {{role, content}}")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {key}[{i}] is {m!r}; expected {{role: {'|'.join(ROLES)}, content: text}}")
        messages.append({"role": m["role"], "content": m["content"]})
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not any(m["role"] == "user" for m in messages):
        raise DataError(f"{where}: {key} has no user turn before its end; a prompt needs a request")
    return messages


def check_fields(row: dict, where: str, reads) -> dict:
    """`row` with every field of `reads` ((handler, field, column, rewards.base.Field) from `rewards.spec_fields`)
    present and of its kind; fields read as text take numbers as their text. A DataError names `where` (file and
    row), the column and the handler."""
    out = dict(row)
    for handler, name, column, kind in reads:
        alias = f" as its '{name}' field" if name != column else ""
        if out.get(column) is None:
            raise DataError(f"{where}: '{column}' is missing; reward '{handler}' reads it{alias} ({kind.expected})")
        if not kind.check(out[column]):
            raise DataError(f"{where}: '{column}' is {type(out[column]).__name__} {out[column]!r:.60}; reward "
                            f"'{handler}' reads it{alias} and expects {kind.expected}")
        if kind.text and not isinstance(out[column], str):
            out[column] = str(out[column])
    return out


def pool_row(row, where: str, reads=()) -> dict:
    """One row of a prompt file as a pool candidate: `prompt` (chat messages, from `prompt` or `messages`) + the
    row's other columns, checked against `reads` (`check_fields`)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: row is {type(row).__name__}; expected an object")
    key = "prompt" if row.get("prompt") is not None else "messages"
    if row.get(key) is None:
        raise DataError(f"{where}: prompt is missing (give 'prompt': text or chat messages, or 'messages')")
    out = {k: v for k, v in row.items() if k not in ("prompt", "messages")}
    return {"prompt": _conversation(row[key], where, key), **check_fields(out, where, reads)}


def load_pool_files(paths: list[str], reads=()) -> list[dict]:
    """Every row of the prompt files as pool candidates (`pool_row`), in file order; errors name file and row (the
    line of a JSON lines file)."""
    rows = []
    for path in paths:
        found = read_rows(path)
        if not found:
            raise DataError(f"{path}: no rows")
        rows += [pool_row(row, f"{path} row {n}", reads) for n, row in found]
    return rows


# -- online refresh ------------------------------------------------------------------------------------------------


class LivePool:
    """The GRPO prompt pool during training, kept at moderate success [01 §5.4.2] (`RefreshOptions`).

    The trainer sees `dataset()`: one row per slot, each with its `pool_slot`; it reads the slot's current prompt
    with `row(slot)` when it rolls the group out (so the sampler's indices stay valid while prompts change), reports
    each group's success with `observe`, and calls `refresh(measure)` at the steps `due` says: slots whose latest
    measured rate left (lo, hi) get reserve prompts that `measure(rows)` (the current policy's pass rate, k samples
    each) puts inside the band. A slot keeps its prompt while no replacement is found. Retired prompts at or below
    lo go back to the end of the reserve (measured again later); solved ones (>= hi) are not. Deterministic in its
    inputs, so every rank holds the same pool; `state_dict` / `load_state_dict` carry it across a resume.

    >>> pool = LivePool([{"q": "a", "pass_rate": .5}], [{"q": "b", "pass_rate": 0.0}], lo=0.0, hi=0.9, every=1,
    ...                 measure=4)
    >>> pool.observe([0, 0], [1.0, 1.0], group_size=2)  # prompt "a" is solved now
    >>> pool.refresh(lambda rows: [0.5 for _ in rows])["pool/admitted"], pool.row(0)["q"]
    (1.0, 'b')
    """

    def __init__(self, kept: list[dict], reserve: list[dict], lo: float, hi: float, every: int, measure: int):
        self.rows = [dict(r) for r in kept] + [dict(r) for r in reserve]
        self.lo, self.hi, self.every, self.measure = lo, hi, every, measure
        self.slots = list(range(len(kept)))
        self.reserve = list(range(len(kept), len(self.rows)))
        self.solved: list[int] = []
        self.rate = {i: float(r["pass_rate"]) for i, r in enumerate(self.rows)}
        self.counts = {"retired": 0, "admitted": 0, "measured": 0}
        self.last = -1

    def dataset(self) -> datasets.Dataset:
        return rows_to_dataset([self.row(s) for s in range(len(self.slots))])

    def row(self, slot: int) -> dict:
        return {**self.rows[self.slots[slot]], "pool_slot": slot}

    def in_band(self, rate: float) -> bool:
        return self.lo < rate < self.hi

    def observe(self, slots: list[int], success: list[float], group_size: int) -> None:
        """Record each group's success rate (slots and successes per completion, groups of `group_size`
        consecutive completions of one slot) as its prompt's latest measurement."""
        for g in range(0, len(slots), group_size):
            rates = success[g:g + group_size]
            self.rate[self.slots[slots[g]]] = sum(rates) / len(rates)

    def due(self, step: int) -> bool:
        return self.every > 0 and step > 0 and step % self.every == 0 and step != self.last

    def refresh(self, measure: Callable[[list[dict]], list[float]], step: int | None = None) -> dict[str, float]:
        """Retire out-of-band slots for re-measured reserve prompts; returns this refresh's metrics."""
        self.last = self.last if step is None else step
        vacant = [s for s, c in enumerate(self.slots) if not self.in_band(self.rate[c])]
        take, self.reserve = self.reserve[:self.measure], self.reserve[self.measure:]
        fresh = []
        for c, r in zip(take, measure([self.rows[c] for c in take]) if take else []):
            self.rate[c] = float(r)
            (fresh if self.in_band(r) else self.reserve if r <= self.lo else self.solved).append(c)
        admitted = 0
        for s in vacant[:len(fresh)]:
            old, self.slots[s] = self.slots[s], fresh[admitted]
            (self.reserve if self.rate[old] <= self.lo else self.solved).append(old)
            admitted += 1
        self.reserve = fresh[admitted:] + self.reserve  # inside the band but no vacancy: first in line next time
        self.counts["retired"] += admitted
        self.counts["admitted"] += admitted
        self.counts["measured"] += len(take)
        return {"pool/out_of_band": float(len(vacant)), "pool/admitted": float(admitted),
                "pool/measured": float(len(take)), "pool/reserve": float(len(self.reserve))}

    def distribution(self) -> dict[str, float]:
        """The active prompts' latest rates: mean, quantiles and the shares below / inside / above the band."""
        rates = sorted(self.rate[c] for c in self.slots)
        n = len(rates)

        def q(p):
            return rates[min(int(p * n), n - 1)]

        return {"pool/rate_mean": sum(rates) / n, "pool/rate_p10": q(0.1), "pool/rate_p50": q(0.5),
                "pool/rate_p90": q(0.9), "pool/in_band_frac": sum(map(self.in_band, rates)) / n,
                "pool/solved_frac": sum(r >= self.hi for r in rates) / n,
                "pool/unsolved_frac": sum(r <= self.lo for r in rates) / n,
                "pool/retired_total": float(self.counts["retired"])}

    def state_dict(self) -> dict:
        return {"slots": self.slots, "reserve": self.reserve, "solved": self.solved,
                "rate": {str(k): v for k, v in self.rate.items()}, "counts": self.counts, "last": self.last}

    def load_state_dict(self, state: dict) -> None:
        if max(state["slots"] + state["reserve"] + state["solved"], default=-1) >= len(self.rows):
            raise ValueError("the saved pool state names prompts this pool does not have (another pool file?)")
        self.slots, self.reserve, self.solved = list(state["slots"]), list(state["reserve"]), list(state["solved"])
        self.rate = {int(k): v for k, v in state["rate"].items()}
        self.counts, self.last = dict(state["counts"]), state["last"]

    def save(self, path: str | Path) -> None:
        from alignment.reporting import write_json_atomic

        write_json_atomic(Path(path), self.state_dict())

    def load(self, path: str | Path) -> None:
        self.load_state_dict(json.loads(Path(path).read_text()))
