"""Reward-model training on preference pairs with TRL's RewardTrainer (Bradley–Terry loss).

    make rm                                    # configs/tiny/rm.yaml: from the SFT checkpoint
    python -m pipelines.rm --config CONFIG [--set training.learning_rate=1e-4 ...] [--overwrite]
    make eval-rm                               # held-out report (rewards/eval_rm.py)

Reads top to bottom: config -> preference data (built-in set: verifier-correct vs incorrect, safe refusal vs
harmful compliance, helpful answer vs needless refusal, on- vs off-topic; plus user files) -> tokenizer + one-logit
MiniMax sequence classifier (score head on the SFT model) -> held-out pairwise accuracy -> RewardTrainer -> accuracy
again -> refusal threshold for the safety handler -> atomic `<output_dir>/final` (model, tokenizer, metrics.json,
reward_meta.json), `metrics.json`, `summary.md`, `curves.png`, TensorBoard logs.

Pairs are tokenised here with `rewards.reward_model.rm_input_ids`, the function the reward handler scores with, so
training and scoring render sequences identically. No packing: a pair is two short sequences, padded.
Departures from the paper [01 §5.2]: its reward models are large and trained on human and rule-labelled data; here
the labels come from the task suite's verifiers and safety rules, and the harmless RM is one model that also learns
the helpfulness principle (over-refusal pairs) instead of a separate constitution-driven pipeline.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path


from alignment.config import ConfigError, to_dict
from alignment.schema import TrainOptions
from pipelines.common import cached_eval_before, prepare_output, save_stage, stage_main, train_resuming


@dataclass
class RMModelOptions:
    # A checkpoint directory (a causal-LM checkpoint gets a fresh score head) or a model YAML (fresh weights).
    path: str
    dtype: str = "float32"


@dataclass
class PreferenceDataOptions:
    # Built-in preference set: category -> builder kwargs (data_recipes/preferences.py), e.g. {math: {n: 1000}}.
    builtin: dict[str, dict] = field(default_factory=dict)
    # Local .jsonl / .parquet files of {prompt, chosen, rejected[, category]} rows.
    files: list[str] = field(default_factory=list)
    # Pairs with a side longer than this (tokens) are dropped, not truncated: the score is read at the last token.
    max_length: int = 256

    def __post_init__(self):
        if not self.builtin and not self.files:
            raise ValueError("data: give at least one of 'builtin' or 'files'")
        if self.max_length < 8:
            raise ValueError(f"data.max_length must be >= 8, got {self.max_length}")


@dataclass
class RMEvalOptions:
    # Held-out preference pairs (built from the task suite's held-out split) and/or files.
    builtin: dict[str, dict] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    batch_size: int = 64


@dataclass
class RMStageConfig:
    model: RMModelOptions
    data: PreferenceDataOptions
    training: TrainOptions = field(default_factory=TrainOptions)
    eval: RMEvalOptions = field(default_factory=RMEvalOptions)
    # TRL's auxiliary loss c·mean((r_chosen + r_rejected)²) keeps scores centred on 0, so a fixed offset means the
    # same thing across runs (Eisenstein et al. 2023); None turns it off.
    center_rewards_coefficient: float | None = 0.01
    output_dir: str = "runs/rm"
    # None: the tokenizer saved with the checkpoint; "builtin": the task-suite BPE (for a model YAML).
    tokenizer: str | None = None
    seed: int = 0
    title: str = "Reward model"


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        argv, prog="python -m pipelines.rm", config_cls=RMStageConfig, run=run, example="configs/tiny/rm.yaml",
        description="Train a reward model (one-logit MiniMax sequence classifier) on preference pairs with TRL's "
        "RewardTrainer. Writes <output_dir>/final (model + tokenizer + reward_meta.json), metrics.json, summary.md, "
        "curves.png and TensorBoard logs; a re-run resumes from the last checkpoint.")


def run(cfg: RMStageConfig, overwrite: bool = False) -> dict:
    """Train the reward model; returns the metrics written to `<output_dir>/metrics.json`."""
    import datasets
    from transformers import set_seed

    from data_recipes.preferences import build_preferences
    from pipelines.sft import _load_tokenizer
    from rewards.reward_model import load_reward_model

    out = Path(cfg.output_dir)
    if (done := prepare_output(cfg, overwrite)) is not None:
        return done
    set_seed(cfg.seed)

    if not Path(cfg.model.path).exists():
        raise ConfigError(f"model.path '{cfg.model.path}' does not exist (run make sft first, or use a model YAML "
                          "such as configs/tiny/model.yaml with tokenizer: builtin)")
    # data first: bad files fail before a model is built
    train_rows = build_preferences(cfg.data.builtin, cfg.seed, "train", cfg.data.files)
    heldout_rows = build_preferences(cfg.eval.builtin, cfg.seed, "heldout", cfg.eval.files) \
        if cfg.eval.builtin or cfg.eval.files else []

    tokenizer = _load_tokenizer(cfg, out)
    model = load_reward_model(cfg.model.path, dtype=cfg.model.dtype, seed=cfg.seed)
    if len(tokenizer) > model.config.vocab_size:
        raise ConfigError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                          f"{model.config.vocab_size}")
    model.config.pad_token_id = tokenizer.pad_token_id

    train_rows, n_dropped = tokenize_pairs(train_rows, tokenizer, cfg.data.max_length)
    heldout_rows, _ = tokenize_pairs(heldout_rows, tokenizer, cfg.data.max_length)
    print(f"[{cfg.title}] {len(train_rows)} training pairs ({n_dropped} longer than {cfg.data.max_length} tokens "
          f"dropped), {len(heldout_rows)} held-out pairs")

    before = cached_eval_before(out, lambda: pairwise_accuracy(model, heldout_rows, tokenizer.pad_token_id,
                                                               cfg.eval.batch_size))
    print(f"[{cfg.title}] before: {_short(before)}")

    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tensorboard")
    columns = ["chosen_ids", "rejected_ids"]
    trainer = _reward_trainer_class()(
        model=model,
        args=_trl_args(cfg, out / "checkpoints"),
        train_dataset=datasets.Dataset.from_list([{k: r[k] for k in columns} for r in train_rows]),
        processing_class=tokenizer,
    )
    result, last = train_resuming(trainer, out, cfg.title)
    model = trainer.model

    after = pairwise_accuracy(model, heldout_rows, tokenizer.pad_token_id, cfg.eval.batch_size)
    print(f"[{cfg.title}] after:  {_short(after)}")
    meta = {"refusal_threshold": fit_refusal_threshold(model, tokenizer, train_rows, cfg.eval.batch_size),
            "template": "chat template over prompt + assistant turn (rewards.reward_model.rm_input_ids)"}

    history = trainer.state.log_history
    losses = [e["loss"] for e in history if "loss" in e]
    metrics = {
        "stage": cfg.title,
        "before": before,
        "after": after,
        "reward_meta": meta,
        "train": {**result.metrics, "first_loss": losses[0] if losses else None,
                  "last_loss": losses[-1] if losses else None, "dropped_too_long": n_dropped,
                  "train_pairs": len(train_rows), "heldout_pairs": len(heldout_rows), "resumed_from": last,
                  "global_step": trainer.state.global_step},
        "config": to_dict(cfg),
    }
    notes = {"training loss": f"{metrics['train']['first_loss']} -> {metrics['train']['last_loss']}",
             "refusal threshold (safety handler)": f"{meta['refusal_threshold']:.3f}", "full report": "make eval-rm"}
    save_stage(cfg, model, tokenizer, metrics, history, notes=notes, extra_files={"reward_meta.json": meta},
               curve_keys=("loss", "accuracy", "margin", "learning_rate", "grad_norm"),
               heading="held-out pairwise accuracy")
    return metrics


def _reward_trainer_class():
    """TRL's RewardTrainer with the toolkit's crash-safe checkpoints, whose resume restores the MoE weights
    (alignment/checkpointing.py); nothing else changes."""
    from trl import RewardTrainer

    from alignment.checkpointing import SafeCheckpoints

    return type("MiniMaxRewardTrainer", (SafeCheckpoints, RewardTrainer), {})


def tokenize_pairs(rows: list[dict], tokenizer, max_length: int) -> tuple[list[dict], int]:
    """Add `chosen_ids` / `rejected_ids` (via `rm_input_ids`); drop pairs with a side over `max_length` tokens."""
    from rewards.reward_model import rm_input_ids

    kept = []
    for row in rows:
        chosen = rm_input_ids(tokenizer, row["prompt"], row["chosen"])
        rejected = rm_input_ids(tokenizer, row["prompt"], row["rejected"])
        if max(len(chosen), len(rejected)) <= max_length:
            kept.append({**row, "chosen_ids": chosen, "rejected_ids": rejected})
    return kept, len(rows) - len(kept)


def score_pairs(model, rows: list[dict], pad_token_id: int, batch_size: int) -> tuple[list[float], list[float]]:
    """(chosen scores, rejected scores) of tokenised pairs."""
    from rewards.reward_model import score_ids

    scores = score_ids(model, [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows], pad_token_id,
                       batch_size)
    return scores[: len(rows)], scores[len(rows):]


def pairwise_accuracy(model, rows: list[dict], pad_token_id: int, batch_size: int) -> dict[str, float]:
    """Share of pairs where chosen outscores rejected, overall and per category (ties count as wrong)."""
    if not rows:
        return {}
    chosen, rejected = score_pairs(model, rows, pad_token_id, batch_size)
    wins = [c > r for c, r in zip(chosen, rejected)]
    metrics = {"accuracy": sum(wins) / len(wins)}
    for category in sorted({r["category"] for r in rows}):
        picked = [w for w, r in zip(wins, rows) if r["category"] == category]
        metrics[f"accuracy/{category}"] = sum(picked) / len(picked)
    return metrics


def fit_refusal_threshold(model, tokenizer, rows: list[dict], batch_size: int) -> float:
    """The RM score of a canonical refusal that best separates harmful from benign training prompts.

    The safety handler (rewards/safety.py) judges a prompt harmful, when no label says so, by whether the RM scores
    refusing it above this threshold: trained on refusal-chosen pairs for harmful prompts and refusal-rejected
    pairs for benign look-alikes, the RM scores a refusal high exactly where refusing is right.
    """
    from data_recipes.tasks import REFUSALS
    from rewards.reward_model import rm_input_ids, score_ids

    labelled = {}
    for r in rows:
        if r["category"] in ("safety", "over_refusal"):
            labelled[r["prompt"][-1]["content"]] = r["category"] == "safety"
    if not labelled:
        return 0.0
    prompts = sorted(labelled)
    scores = score_ids(model, [rm_input_ids(tokenizer, p, REFUSALS[0]) for p in prompts], tokenizer.pad_token_id,
                       batch_size)
    return best_threshold(scores, [labelled[p] for p in prompts])


def best_threshold(scores: list[float], positive: list[bool]) -> float:
    """Threshold t maximising the accuracy of `score > t` (midpoint between neighbouring scores).

    >>> best_threshold([0.1, 0.4, 0.6, 0.9], [False, False, True, True])
    0.5
    """
    ranked = sorted(zip(scores, positive))
    cuts = [ranked[0][0] - 1.0] + [(a[0] + b[0]) / 2 for a, b in zip(ranked, ranked[1:])]
    return max(cuts, key=lambda t: sum((s > t) == p for s, p in ranked))


def _trl_args(cfg: RMStageConfig, checkpoints: Path):
    from trl import RewardConfig

    return RewardConfig(
        **cfg.training.trainer_kwargs(checkpoints, cfg.seed),  # batch_size counts pairs (two sequences each)
        max_length=cfg.data.max_length,
        center_rewards_coefficient=cfg.center_rewards_coefficient,
        dataset_num_proc=None,
    )


def _short(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in metrics.items())


if __name__ == "__main__":
    sys.exit(main())
