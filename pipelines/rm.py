"""Reward-model training on preference pairs with TRL's RewardTrainer (Bradley–Terry loss).

    make rm                                    # python -m pipelines rm --config configs/tiny/rm.yaml (after make sft)
    python -m pipelines rm --config CONFIG [--set training.learning_rate=1e-4 ...] [--overwrite]
    make eval-rm                               # held-out report (pipelines/eval_rm.py)

Reads top to bottom: config -> preference data (built-in set: verifier-correct vs incorrect, safe refusal vs
harmful compliance, helpful answer vs needless refusal, on- vs off-topic; plus user files) -> tokenizer + one-logit
MiniMax sequence classifier (score head on the SFT model) -> held-out pairwise accuracy -> RewardTrainer -> accuracy
again -> refusal threshold for the safety handler -> atomic `<output_dir>/final` (model, tokenizer, metrics.json,
reward_meta.json), `metrics.json`, `summary.md`, `curves.png`, TensorBoard logs.

Pairs are tokenised with `rewards.reward_model.tokenize_pairs` (through `rm_input_ids`, the function the reward handler
scores with), so training and scoring render sequences identically. No packing: a pair is two short sequences, padded.
Departures from the paper [01 §5.2]: its reward models are large and trained on human and rule-labelled data; here
the labels come from the task suite's verifiers and safety rules, and the harmless RM is one model that also learns
the helpfulness principle (over-refusal pairs) instead of a separate constitution-driven pipeline.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from alignment.modeling import ModelOptions
from alignment.schema import DataSource, TokenizerOptions, TrainOptions
from pipelines.common import (cached_eval_before, check_builtin, check_files, check_model, check_tokenizer, claim,
                              finish, finished, short, stage_main, stage_tokenizer, train_resuming)

DESCRIPTION = ("Trains a one-logit MiniMax sequence classifier on preference pairs with TRL's RewardTrainer. Writes "
               "<output_dir>/final (model + tokenizer + reward_meta.json), metrics.json, summary.md, curves.png and "
               "TensorBoard logs; a re-run resumes from the last checkpoint.")


@dataclass
class PreferenceDataOptions(DataSource):
    # `builtin`: category -> builder kwargs (data_recipes/preferences.py), e.g. {math: {n: 1000}}; `files`: local
    # .jsonl / .parquet files of {prompt, chosen, rejected[, category]} rows.
    # Pairs with a side longer than this (tokens) are dropped, not truncated: the score is read at the last token.
    max_length: int = 256

    def __post_init__(self):
        super().__post_init__()
        if self.max_length < 8:
            raise ValueError(f"data.max_length must be >= 8, got {self.max_length}")


@dataclass
class RMEvalOptions(DataSource):
    # Held-out preference pairs (built from the task suite's held-out split) and/or files; may be empty.
    batch_size: int = 64
    required = False


@dataclass
class Config:
    # A checkpoint directory (a causal-LM checkpoint gets a fresh score head) or a model YAML (fresh weights).
    model: ModelOptions
    data: PreferenceDataOptions
    training: TrainOptions = field(default_factory=TrainOptions)
    eval: RMEvalOptions = field(default_factory=RMEvalOptions)
    # TRL's auxiliary loss c·mean((r_chosen + r_rejected)²) keeps scores centred on 0, so a fixed offset means the
    # same thing across runs (Eisenstein et al. 2023); None turns it off.
    center_rewards_coefficient: float | None = 0.01
    output_dir: str = "runs/rm"
    # null (the checkpoint's own), "builtin" (for a model YAML) or a tokenizer directory; or {path: <one of those>,
    # chat_template: <.jinja file or template text>}: both documented at alignment.schema.TokenizerOptions.
    tokenizer: str | TokenizerOptions | None = None
    seed: int = 0
    title: str = "Reward model"


def main(argv: list[str] | None = None, stage: str = "rm") -> int:
    return stage_main(argv, stage=stage)


def check(cfg: Config, source: str, produced: set) -> None:
    """Inputs, before any work: the starting model and tokenizer, preference files and built-in categories."""
    check_model(cfg, source, produced, checkpoint=False)
    check_tokenizer(cfg, source, produced)
    for section in ("data", "eval"):
        check_files(getattr(cfg, section).files, source, f"{section}.files")
        check_builtin(getattr(cfg, section).builtin, source, f"{section}.builtin", registry="preferences")


def run(cfg: Config, overwrite: bool = False) -> dict:
    """Train the reward model; returns the metrics written to `<output_dir>/metrics.json`."""
    import datasets
    from transformers import set_seed

    from alignment.distributed import computed_once
    from alignment.modeling import load_model
    from data_recipes.preferences import build_preferences

    if (done := finished(cfg, overwrite)) is not None:
        return done
    set_seed(cfg.seed)

    # data first: bad files fail before a model is built or anything is written
    train_rows = build_preferences(cfg.data.builtin, cfg.seed, "train", cfg.data.files)
    heldout_rows = build_preferences(cfg.eval.builtin, cfg.seed, "heldout", cfg.eval.files) \
        if cfg.eval.builtin or cfg.eval.files else []
    tokenizer = stage_tokenizer(cfg)
    model = load_model(cfg.model, seed=cfg.seed, head="score", tokenizer=tokenizer)
    train_rows, n_dropped = tokenize_pairs(train_rows, tokenizer, cfg.data.max_length)
    heldout_rows, _ = tokenize_pairs(heldout_rows, tokenizer, cfg.data.max_length)
    print(f"[{cfg.title}] {len(train_rows)} training pairs ({n_dropped} longer than {cfg.data.max_length} tokens "
          f"dropped), {len(heldout_rows)} held-out pairs")

    out = claim(cfg, overwrite)
    before = cached_eval_before(out, model, lambda: heldout_accuracy(model, heldout_rows, tokenizer.pad_token_id,
                                                                     cfg.eval.batch_size))
    print(f"[{cfg.title}] before: {short(before)}")
    columns = ["chosen_ids", "rejected_ids"]
    trainer = _reward_trainer_class()(
        model=model,
        args=_trl_args(cfg, out / "checkpoints"),
        train_dataset=datasets.Dataset.from_list([{k: r[k] for k in columns} for r in train_rows]),
        processing_class=tokenizer,
    )
    result, last = train_resuming(trainer, cfg)
    # once, for every rank (alignment.distributed.computed_once: rank 0 alone, or all ranks for a ZeRO-3 model)
    after = computed_once(trainer.model, lambda: heldout_accuracy(trainer.model, heldout_rows, tokenizer.pad_token_id,
                                                                 cfg.eval.batch_size))
    print(f"[{cfg.title}] after:  {short(after)}")
    threshold = computed_once(trainer.model, lambda: fit_refusal_threshold(trainer.model, tokenizer, train_rows,
                                                                         cfg.eval.batch_size))
    meta = {"refusal_threshold": threshold,
            "template": "chat template over prompt + assistant turn (rewards.reward_model.rm_input_ids)"}
    notes = {"refusal threshold (safety handler)": f"{meta['refusal_threshold']:.3f}", "full report": "make eval-rm"}
    return finish(cfg, trainer, result, last, tokenizer, before, after, notes=notes, extra={"reward_meta": meta},
                  train={"dropped_too_long": n_dropped, "train_pairs": len(train_rows),
                         "heldout_pairs": len(heldout_rows)},
                  extra_files={"reward_meta.json": meta}, heading="held-out pairwise accuracy",
                  curve_keys=("loss", "accuracy", "margin", "learning_rate", "grad_norm"))


def _reward_trainer_class():
    """TRL's RewardTrainer with the toolkit's crash-safe checkpoints, whose resume restores the MoE weights
    (alignment/checkpointing.py); nothing else changes."""
    from trl import RewardTrainer

    from alignment.checkpointing import SafeCheckpoints

    return type("MiniMaxRewardTrainer", (SafeCheckpoints, RewardTrainer), {})


def tokenize_pairs(rows: list[dict], tokenizer, max_length: int) -> tuple[list[dict], int]:
    """Add `chosen_ids` / `rejected_ids` (`rm_input_ids`: as the reward handler scores); drop pairs with a side over
    `max_length` tokens (the score is read at the last token, so a truncated side would be scored elsewhere)."""
    from data_recipes.io import drop_too_long
    from rewards.reward_model import rm_input_ids

    rows = [{**row, "chosen_ids": rm_input_ids(tokenizer, row["prompt"], row["chosen"]),
             "rejected_ids": rm_input_ids(tokenizer, row["prompt"], row["rejected"])} for row in rows]
    return drop_too_long(rows, lambda row: max(len(row["chosen_ids"]), len(row["rejected_ids"])), max_length)


def heldout_accuracy(model, rows: list[dict], pad_token_id: int, batch_size: int) -> dict[str, float]:
    """Pairwise accuracy of tokenised pairs, overall and per category (`rewards.reward_model.pairwise_accuracy`)."""
    from rewards.reward_model import pairwise_accuracy, score_pairs

    if not rows:
        return {}
    chosen, rejected = score_pairs(model, rows, pad_token_id, batch_size)
    return {k: v for k, v in pairwise_accuracy(chosen, rejected, [r["category"] for r in rows]).items()
            if isinstance(v, float)}


def fit_refusal_threshold(model, tokenizer, rows: list[dict], batch_size: int) -> float:
    """The RM score of a canonical refusal that best separates harmful from benign training prompts.

    The safety handler (rewards/safety.py) judges a prompt harmful, when no label says so, by whether the RM scores
    refusing it above this threshold: trained on refusal-chosen pairs for harmful prompts and refusal-rejected
    pairs for benign look-alikes, the RM scores a refusal high exactly where refusing is right.
    """
    from rewards.reward_model import rm_input_ids, score_ids
    from rewards.safety import CANONICAL_REFUSAL, labelled_prompts

    labelled = labelled_prompts(rows)
    if not labelled:
        return 0.0
    prompts = sorted(labelled)
    scores = score_ids(model, [rm_input_ids(tokenizer, p, CANONICAL_REFUSAL) for p in prompts],
                       tokenizer.pad_token_id, batch_size)
    return best_threshold(scores, [labelled[p] for p in prompts])


def best_threshold(scores: list[float], positive: list[bool]) -> float:
    """Threshold t maximising the accuracy of `score > t` (midpoint between neighbouring scores).

    >>> best_threshold([0.1, 0.4, 0.6, 0.9], [False, False, True, True])
    0.5
    """
    ranked = sorted(zip(scores, positive))
    cuts = [ranked[0][0] - 1.0] + [(a[0] + b[0]) / 2 for a, b in zip(ranked, ranked[1:])]
    return max(cuts, key=lambda t: sum((s > t) == p for s, p in ranked))


def _trl_args(cfg: Config, checkpoints: Path):
    from trl import RewardConfig

    return RewardConfig(
        **cfg.training.trainer_kwargs(checkpoints, cfg.seed),  # batch_size counts pairs (two sequences each)
        max_length=cfg.data.max_length,
        center_rewards_coefficient=cfg.center_rewards_coefficient,
        dataset_num_proc=None,
    )


if __name__ == "__main__":
    sys.exit(main())
