"""Supervised fine-tuning: stage I (short SFT) and stage II (long-context SFT) of the MiniMax-01 recipe.

    make sft                                   # python -m pipelines sft --config configs/tiny/sft.yaml
    make long-sft                              # configs/tiny/long_sft.yaml, starts from the SFT checkpoint
    python -m pipelines sft --config CONFIG [--set training.learning_rate=3e-4 ...] [--overwrite]

Reads top to bottom: config -> tokenizer + packing-safe model -> data (built-in task suite and/or local chat files)
-> held-out evaluation -> TRL SFTTrainer (assistant-only loss, packed rows) -> evaluation again -> atomic save of
`<output_dir>/final` (safetensors; loadable with plain `AutoModelForCausalLM.from_pretrained`) with the tokenizer,
`metrics.json`, `summary.md`, `curves.png` and TensorBoard logs under `<output_dir>`.

Long SFT is a config, not a copy: a longer packed row length, long retrieval prompts in the mix (Table 7: 50%
long-context), a constant LR, and RoPE base from the config. Departures from the paper [01 §5, Table 7]: responses are
the task suite's reference replies (rule-verified, so they are what rejection sampling with a verifier would keep);
lengths, batch sizes and LRs are scaled to the tiny model; samples longer than the row length are dropped as in the
paper, and the count is reported.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from alignment.config import ConfigError
from alignment.modeling import ModelOptions
from alignment.schema import DataOptions, EvalOptions, TokenizerOptions, TrainOptions
from pipelines.common import (cached_eval_before, check_builtin, check_files, check_model, check_tokenizer, claim,
                              evaluate_sets, finish, finished, load_policy, short, stage_main, stage_tokenizer,
                              train_resuming)

DESCRIPTION = ("Writes <output_dir>/final (the checkpoint), metrics.json, summary.md, curves.png and TensorBoard logs; "
               "a re-run resumes from the last checkpoint in <output_dir>/checkpoints.")


@dataclass
class Config:
    model: ModelOptions
    data: DataOptions
    training: TrainOptions = field(default_factory=TrainOptions)
    eval: EvalOptions = field(default_factory=EvalOptions)
    output_dir: str = "runs/sft"
    # null (the checkpoint's own), "builtin" (for a model YAML) or a tokenizer directory; or {path: <one of those>,
    # chat_template: <.jinja file or template text>}: both documented at alignment.schema.TokenizerOptions.
    tokenizer: str | TokenizerOptions | None = None
    seed: int = 0
    title: str = "SFT"


def main(argv: list[str] | None = None, stage: str = "sft") -> int:
    return stage_main(argv, stage=stage)


def check(cfg: Config, source: str, produced: set) -> None:
    """Inputs, before any work: the model and its tokenizer, data files, built-in task and evaluation options."""
    check_model(cfg, source, produced, checkpoint=False, max_length=cfg.data.max_length, context_parallel=True,
                zero_init=True)
    if cfg.training.context_parallel > 1 and not cfg.data.packing:
        raise ConfigError(f"{source}: 'training.context_parallel' splits packed rows: set data.packing: true")
    check_tokenizer(cfg, source, produced)
    check_files(cfg.data.files, source, "data.files")
    check_builtin(cfg.data.builtin, source, "data.builtin")
    check_builtin(cfg.eval.sets, source, "eval.sets", registry="eval")


def run(cfg: Config, overwrite: bool = False) -> dict:
    """Train one SFT stage; returns the metrics written to `<output_dir>/metrics.json`."""
    from transformers import set_seed

    from alignment.context_parallel import context_parallel_group
    from alignment.distributed import computed_once, forward_ready
    from alignment.trainers import MiniMaxSFTTrainer
    from data_recipes import build_sft_mix, heldout_sets
    from data_recipes.io import chat_length, drop_too_long

    if (done := finished(cfg, overwrite)) is not None:
        return done
    set_seed(cfg.seed)

    # data first: a bad file or row fails before a model is built or anything is written
    train_rows = build_sft_mix(cfg.data.builtin, cfg.data.files, cfg.seed)
    heldout = heldout_sets(cfg.eval.sets, cfg.seed)
    tokenizer = stage_tokenizer(cfg)
    model, args = load_policy(cfg, tokenizer, lambda: _trl_args(cfg, Path(cfg.output_dir) / "checkpoints"))
    train_rows, n_dropped = drop_too_long(train_rows, lambda row: chat_length(tokenizer, row["messages"]),
                                          cfg.data.max_length)
    print(f"[{cfg.title}] {len(train_rows)} training conversations ({n_dropped} longer than "
          f"{cfg.data.max_length} tokens dropped); held-out sets: {', '.join(heldout) or 'none'}")

    out = claim(cfg, overwrite)
    with forward_ready(model, args):  # loaded partitioned: every rank takes part in each forward
        before = cached_eval_before(out, model, lambda: evaluate_sets(model, tokenizer, heldout, cfg.eval))
    print(f"[{cfg.title}] before: {short(before)}")
    trainer = MiniMaxSFTTrainer(
        model=model,
        args=args or _trl_args(cfg, out / "checkpoints"),
        train_dataset=train_rows.select_columns(["messages"]),
        processing_class=tokenizer,
    )
    # each packed row split over consecutive ranks (alignment.context_parallel.ContextParallelTraining)
    trainer.context_parallel = context_parallel_group(cfg.training.context_parallel)
    result, last = train_resuming(trainer, cfg)
    after = computed_once(trainer.model, lambda: evaluate_sets(trainer.model, tokenizer, heldout, cfg.eval))
    print(f"[{cfg.title}] after:  {short(after)}")
    metrics = finish(cfg, trainer, result, last, tokenizer, before, after,
                     curve_keys=("loss", "mean_token_accuracy", "learning_rate", "grad_norm", "aux_loss"),
                     train={"dropped_too_long": n_dropped, "train_conversations": len(train_rows)})
    return metrics


def _trl_args(cfg: Config, checkpoints: Path):
    from trl import SFTConfig

    return SFTConfig(
        **cfg.training.trainer_kwargs(checkpoints, cfg.seed),
        max_length=cfg.data.max_length,
        packing=cfg.data.packing,
        packing_strategy="bfd",  # padding-free rows with position_ids restarting per document
        assistant_only_loss=True,  # MiniMaxSFTTrainer marks the assistant tokens itself, for any chat template
        dataset_num_proc=None,
    )


if __name__ == "__main__":
    sys.exit(main())
