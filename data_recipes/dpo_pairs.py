"""Preference pairs for offline DPO, built the MiniMax-01 way [01 §5.4.1]: prompts already used in SFT, several
responses per prompt sampled from the current policy at varying temperatures, scored by the reward handlers;
chosen = the best response, rejected = the worst.

    worker = build_rollout("transformers", model, tokenizer)
    pairs, stats = build_dpo_pairs(worker, rows, PairOptions(), seed=0, policy="runs/tiny/sft/final",
                                   out_path="runs/tiny/dpo/pairs")

What the paper leaves open, and what this module does about it:
- A pair is only as informative as the gap between its two responses. Groups whose best and worst scores differ by
  less than `min_margin` are dropped (`below_margin`), groups whose scores are all equal are dropped (`all_tied`:
  with binary verifiers, "every sample right" or "every sample wrong" carries no preference). Both are counted.
- Several samples may share the best (or the worst) score. By default the one sampled at the lowest temperature
  wins (`tie_break: coldest`): with binary verifiers most wrong answers tie, and the cold one is the mistake the
  policy actually makes at greedy decoding, not high-temperature noise; equals are drawn with a seeded RNG, so
  the output is deterministic under `seed` (sampling is seeded too).
- Every pair keeps its provenance: all N scores and their temperatures, the sampled texts, which temperature gave
  the chosen and the rejected response, and the policy checkpoint that sampled them.

The dataset is in TRL's conversational preference format (`prompt`, `chosen`, `rejected` as chat messages) and is
written with `datasets.save_to_disk` into a temp directory renamed into place, with `pair_stats.json` beside it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import datasets
import torch

from alignment.rollout.base import RolloutOptions, RolloutWorker, SamplingOptions
from data_recipes.io import prompt_of

STATS_FILE = "pair_stats.json"
TASK_FIELDS = ("task", "answer", "harmful", "n_pairs")  # row columns the reward handlers read


@dataclass
class PairOptions:
    # Sampling temperatures [01 §5.4.1: "varying temperatures"]; each gives `samples_per_temperature` responses, so a
    # prompt gets N = len(temperatures) * samples_per_temperature candidates. Low temperatures find the policy's
    # best answers, high ones its typical mistakes: both ends of a pair.
    temperatures: list[float] = field(default_factory=lambda: [0.7, 1.0, 1.3])
    samples_per_temperature: int = 2
    max_new_tokens: int = 32
    top_p: float = 1.0
    # Drop a group when best - worst < min_margin (scores are the composed reward below).
    min_margin: float = 0.5
    # Reward handlers (rewards.build_reward spec). Binary correctness decides the pair; a small format term ranks
    # responses with equal correctness (a well-formed wrong answer beats a malformed one).
    reward: dict[str, dict] = field(default_factory=lambda: {"correctness": {"weight": 1.0}})
    # Among samples tied for best (or for worst): "coldest" takes one sampled at the lowest temperature (the
    # answer, or the mistake, the policy is most likely to give when decoding greedily: a hard negative rather than
    # high-temperature noise), seeded-random among equals; "random": seeded-random among all tied samples.
    tie_break: Literal["coldest", "random"] = "coldest"
    # The worker that samples them (alignment.rollout.base.RolloutOptions, as GRPO's `rollout:`): backend
    # transformers (the policy's own generate) or vllm (an engine on the same GPU, closed before training starts),
    # batch_size completions per generate call.
    rollout: RolloutOptions = field(default_factory=RolloutOptions)
    # Your own preference files, trained on beside the sampled pairs: TRL's preference rows (`prompt`, `chosen`,
    # `rejected`, all strings or all message lists; or `chosen`/`rejected` whole conversations with the prompt left
    # implicit), .jsonl / .json / .parquet; checked row by row before any model work
    # (`data_recipes.preferences.check_dpo_row`). Plain-text files cannot be mixed with the sampled pairs, which
    # are conversational: use them with `sample: false`.
    files: list[str] = field(default_factory=list)
    # Sample pairs from the stage's prompts and score them (the paper's way [01 §5.4.1]); false: train on `files`
    # alone (no prompts, sampling or reward needed).
    sample: bool = True

    def __post_init__(self):
        if not self.sample and not self.files:
            raise ValueError("pairs.sample: false trains on pairs.files alone; give at least one file")
        if not self.temperatures or any(t <= 0 for t in self.temperatures):
            raise ValueError(f"pairs.temperatures must be a non-empty list of values > 0, got {self.temperatures}")
        if self.samples_per_temperature < 1:
            raise ValueError(f"pairs.samples_per_temperature must be >= 1, got {self.samples_per_temperature}")
        if len(self.temperatures) * self.samples_per_temperature < 2:
            raise ValueError("pairs: need at least 2 samples per prompt (len(temperatures) * samples_per_temperature)")
        if self.min_margin < 0:
            raise ValueError(f"pairs.min_margin must be >= 0, got {self.min_margin}")
        if self.rollout.batch_size < 1:
            raise ValueError(f"pairs.rollout.batch_size must be >= 1, got {self.rollout.batch_size}")

    @property
    def n(self) -> int:
        return len(self.temperatures) * self.samples_per_temperature


def select_prompts(rows, seed: int, n: int | None = None, tasks: list[str] | None = None,
                   min_n_pairs: int = 0, max_per_task: dict[str, int] | None = None) -> list[dict]:
    """Distinct prompts of `rows` (an SFT mix: the task generators repeat problems), optionally only some tasks and
    retrieval haystacks of at least `min_n_pairs` pairs, at most `max_per_task[task]` of a task, then `n` in all
    (None: no cap). Caps keep a seeded random subset in the mix's order.

    >>> rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "a"}], "task": t,
    ...          "n_pairs": k} for q, t, k in [("1+1", "arithmetic", 0), ("1+1", "arithmetic", 0),
    ...                                        ("lookup", "retrieval", 16)]]
    >>> len(select_prompts(rows, seed=0)), [r["task"] for r in select_prompts(rows, 0, tasks=["retrieval"])]
    (2, ['retrieval'])
    """
    seen, out = set(), []
    for row in rows:
        row = dict(row)
        if tasks is not None and row.get("task") not in tasks:
            continue
        if row.get("n_pairs", 0) < min_n_pairs:
            continue
        key = repr(prompt_of(row))
        if key not in seen:
            seen.add(key)
            out.append(row)
    rng = random.Random(f"dpo-prompts:{seed}")

    def subset(indices: list[int], cap: int | None) -> list[int]:
        return indices if cap is None or cap >= len(indices) else rng.sample(indices, cap)

    keep = list(range(len(out)))
    if max_per_task:
        by_task: dict = {}
        for i, row in enumerate(out):
            by_task.setdefault(row.get("task"), []).append(i)
        keep = [i for task, idx in by_task.items() for i in subset(idx, max_per_task.get(task))]
    keep = sorted(subset(keep, n))
    return [out[i] for i in keep]


def select_pair(scores: list[float], min_margin: float, rng: random.Random, temperatures: list[float] | None = None,
                tol: float = 1e-9):
    """(chosen, rejected) indices into `scores`: a best and a worst sample; or a drop reason, "all_tied" (every
    score equal within `tol`) or "below_margin" (best - worst < min_margin). Ties go to the lowest of
    `temperatures` when given, then to `rng`.

    >>> rng = random.Random(0)
    >>> select_pair([0.0, 1.0, 0.1], 0.5, rng)
    (1, 0)
    >>> select_pair([1.0, 0.0, 0.0, 1.0], 0.5, rng, temperatures=[1.3, 1.3, 0.7, 0.7])
    (3, 2)
    >>> select_pair([1.0, 1.0], 0.5, rng), select_pair([1.0, 0.8], 0.5, rng)
    ('all_tied', 'below_margin')
    """
    best, worst = max(scores), min(scores)
    if best - worst <= tol:
        return "all_tied"
    if best - worst < min_margin - tol:
        return "below_margin"

    def pick(tied: list[int]) -> int:
        if temperatures is not None:
            coldest = min(temperatures[i] for i in tied)
            tied = [i for i in tied if temperatures[i] == coldest]
        return rng.choice(tied)

    return pick([i for i, s in enumerate(scores) if s >= best - tol]), \
        pick([i for i, s in enumerate(scores) if s <= worst + tol])


def sample_responses(worker: RolloutWorker, prompts: list[list[dict]], opts: PairOptions, seed: int):
    """N responses per prompt: for each temperature, `samples_per_temperature` samples of every prompt, batched
    through the rollout worker. Returns (texts, temperatures, stop_reasons), each a list per prompt of N entries,
    ordered by temperature. Each temperature's pass is seeded from `seed` (the global RNG is left as it was)."""
    texts = [[] for _ in prompts]
    temps = [[] for _ in prompts]
    stops = [[] for _ in prompts]
    k = opts.samples_per_temperature
    for j, temperature in enumerate(opts.temperatures):
        print(f"sampling pairs: temperature {temperature} ({j + 1} of {len(opts.temperatures)}), {len(prompts)} "
              f"prompts x {k}", flush=True)
        sampling = SamplingOptions(temperature=temperature, top_p=opts.top_p, max_new_tokens=opts.max_new_tokens)
        with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
            torch.manual_seed(seed * 1009 + j)
            batch = worker.generate(prompts, n=k, sampling=sampling)
        for i in range(len(prompts)):
            texts[i] += batch.texts[i * k : (i + 1) * k]
            stops[i] += batch.stop_reasons[i * k : (i + 1) * k]
            temps[i] += [float(temperature)] * k
    return texts, temps, stops


def score_responses(reward, rows: list[dict], texts: list[list[str]]) -> list[list[float]]:
    """Score every response with the reward handler; the row columns (`task`, `answer`, ...) go in as fields."""
    flat_rows = [row for row, group in zip(rows, texts) for _ in group]
    fields = {key: [row.get(key) for row in flat_rows] for key in TASK_FIELDS if key in flat_rows[0]}
    out = reward([prompt_of(r) for r in flat_rows], [t for group in texts for t in group], **fields)
    scores, start = [], 0
    for group in texts:
        scores.append(out.scores[start : start + len(group)])
        start += len(group)
    return scores


def make_pairs(rows: list[dict], texts, temps, scores, min_margin: float, seed: int, policy: str,
               tie_break: str = "coldest"):
    """Preference records from scored groups, plus counts of what was dropped and why."""
    rng = random.Random(f"dpo-pairs:{seed}")
    records, dropped = [], {"all_tied": 0, "below_margin": 0}
    for row, group, group_temps, group_scores in zip(rows, texts, temps, scores):
        picked = select_pair(group_scores, min_margin, rng, group_temps if tie_break == "coldest" else None)
        if isinstance(picked, str):
            dropped[picked] += 1
            continue
        c, r = picked
        records.append({
            "prompt": prompt_of(row),
            "chosen": [{"role": "assistant", "content": group[c]}],
            "rejected": [{"role": "assistant", "content": group[r]}],
            "score_chosen": group_scores[c], "score_rejected": group_scores[r],
            "temperature_chosen": group_temps[c], "temperature_rejected": group_temps[r],
            "scores": list(group_scores), "temperatures": list(group_temps), "samples": list(group),
            "policy": policy,
            **{key: row.get(key) for key in TASK_FIELDS},
        })
    return records, dropped


def build_dpo_pairs(worker: RolloutWorker, rows: list[dict], opts: PairOptions, seed: int, policy: str,
                    out_path: str | Path | None = None, reward=None):
    """Sample, score and pair; returns (dataset, stats) and, with `out_path`, saves both atomically.

    `rows` are task-suite rows (their prompts are the conversation without the final reply); `reward` defaults to
    `rewards.build_reward(opts.reward)`; `policy` names the checkpoint that samples (kept in every record).
    Raises ValueError when no pair survives (the stats say why), rather than training on an empty set.
    """
    from rewards import build_reward

    if not rows:
        raise ValueError("no prompts to build DPO pairs from")
    reward = reward if reward is not None else build_reward(opts.reward)
    texts, temps, stops = sample_responses(worker, [prompt_of(r) for r in rows], opts, seed)
    scores = score_responses(reward, rows, texts)
    records, dropped = make_pairs(rows, texts, temps, scores, opts.min_margin, seed, policy, opts.tie_break)
    stats = pair_stats(rows, temps, scores, stops, records, dropped, policy)
    if not records:
        raise ValueError(f"no DPO pairs: all {len(rows)} prompt groups were dropped ({dropped['all_tied']} with all "
                         f"scores equal, {dropped['below_margin']} below min_margin {opts.min_margin}); mean sample "
                         f"score {stats['mean_sample_score']:.3f}. Sample more per prompt, raise temperatures or "
                         "add a graded reward term")
    ds = datasets.Dataset.from_list(records)
    if out_path is not None:
        save_pairs(ds, stats, out_path)
    return ds, stats


def pair_stats(rows, temps, scores, stops, records, dropped, policy) -> dict:
    """What went into the pairs: counts, drop reasons, score by temperature, per-task pair counts."""
    flat = [(t, s) for group_t, group_s in zip(temps, scores) for t, s in zip(group_t, group_s)]
    by_temp = {}
    for t, s in flat:
        by_temp.setdefault(str(t), []).append(s)
    tasks = {}
    for rec in records:
        tasks[rec["task"]] = tasks.get(rec["task"], 0) + 1
    n_stops = [s for group in stops for s in group]
    return {
        "policy": policy, "prompts": len(rows), "samples": len(flat), "pairs": len(records),
        "dropped_all_tied": dropped["all_tied"], "dropped_below_margin": dropped["below_margin"],
        "pairs_per_task": tasks,
        "mean_sample_score": sum(s for _, s in flat) / max(len(flat), 1),
        "mean_score_by_temperature": {t: sum(v) / len(v) for t, v in by_temp.items()},
        "mean_score_chosen": sum(r["score_chosen"] for r in records) / max(len(records), 1),
        "mean_score_rejected": sum(r["score_rejected"] for r in records) / max(len(records), 1),
        "stopped_by_length": sum(s == "length" for s in n_stops) / max(len(n_stops), 1),
    }


def save_pairs(ds: datasets.Dataset, stats: dict, path: str | Path) -> None:
    """`save_to_disk` into a temp directory, `pair_stats.json` beside the data, then one rename: a crash never
    leaves a half-written pair set where a resumed run would pick it up."""
    from alignment.reporting import atomic_directory, write_json_atomic

    with atomic_directory(path) as tmp:
        ds.save_to_disk(str(tmp))
        write_json_atomic(Path(tmp) / STATS_FILE, stats)


def load_pairs(path: str | Path) -> tuple[datasets.Dataset, dict]:
    """A pair set written by `save_pairs`: (dataset, stats)."""
    import json

    path = Path(path)
    if not (path / STATS_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a DPO pair set (no {STATS_FILE})")
    return datasets.load_from_disk(str(path)), json.loads((path / STATS_FILE).read_text())
