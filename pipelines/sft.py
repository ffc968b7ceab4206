"""Supervised fine-tuning: stage I (short SFT) and stage II (long-context SFT) of the MiniMax-01 recipe.

    make sft                                   # configs/tiny/sft.yaml
    make long-sft                              # configs/tiny/long_sft.yaml, starts from the SFT checkpoint
    python -m pipelines.sft --config CONFIG [--set training.learning_rate=3e-4 ...] [--overwrite]

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

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path


from alignment.config import ConfigError, to_dict
from alignment.modeling import ModelOptions, load_model
from alignment.schema import DataOptions, EvalOptions, TrainOptions
from pipelines.common import cached_eval_before, prepare_output, save_stage, stage_main, train_resuming


@dataclass
class SFTStageConfig:
    model: ModelOptions
    data: DataOptions
    training: TrainOptions = field(default_factory=TrainOptions)
    eval: EvalOptions = field(default_factory=EvalOptions)
    output_dir: str = "runs/sft"
    # None: the tokenizer saved with the model checkpoint; "builtin": train the built-in byte-level BPE on the task
    # suite's corpus (for a model YAML with fresh weights); otherwise a local tokenizer directory.
    tokenizer: str | None = None
    seed: int = 0
    title: str = "SFT"


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        argv, prog="python -m pipelines.sft", config_cls=SFTStageConfig, run=run, example="configs/tiny/sft.yaml",
        description="Short or long-context SFT of a MiniMax model (stages I/II of the MiniMax-01 recipe). "
        "Writes <output_dir>/final (the checkpoint), metrics.json, summary.md, curves.png and TensorBoard logs; "
        "a re-run resumes from the last checkpoint in <output_dir>/checkpoints.")


def run(cfg: SFTStageConfig, overwrite: bool = False) -> dict:
    """Train one SFT stage; returns the metrics written to `<output_dir>/metrics.json`."""
    from transformers import set_seed

    from alignment.evaluation import evaluate
    from alignment.trainers import MiniMaxSFTTrainer
    from data_recipes import build_sft_mix, heldout_sets

    out = Path(cfg.output_dir)
    if (done := prepare_output(cfg, overwrite)) is not None:
        return done
    set_seed(cfg.seed)

    # data first: bad files fail before a model is built
    train_rows = build_sft_mix(cfg.data.builtin, cfg.data.files, cfg.seed)
    heldout = heldout_sets(cfg.eval.sets, cfg.seed)

    tokenizer = _load_tokenizer(cfg, out)
    model = load_model(cfg.model, seed=cfg.seed)
    if len(tokenizer) > model.config.vocab_size:
        raise ConfigError(f"tokenizer has {len(tokenizer)} tokens but model.vocab_size is {model.config.vocab_size}")
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    train_rows, n_dropped = _drop_too_long(train_rows, tokenizer, cfg.data.max_length)
    print(f"[{cfg.title}] {len(train_rows)} training conversations ({n_dropped} longer than "
          f"{cfg.data.max_length} tokens dropped); held-out sets: {', '.join(heldout) or 'none'}")

    before = cached_eval_before(out, lambda: evaluate(model, tokenizer, heldout, cfg.eval.max_new_tokens,
                                                      cfg.eval.batch_size))
    print(f"[{cfg.title}] before: {_short(before)}")

    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tensorboard")
    trainer = MiniMaxSFTTrainer(
        model=model,
        args=_trl_args(cfg, out / "checkpoints"),
        train_dataset=train_rows.select_columns(["messages"]),
        processing_class=tokenizer,
    )
    result, last = train_resuming(trainer, out, cfg.title)

    model = trainer.model
    after = evaluate(model, tokenizer, heldout, cfg.eval.max_new_tokens, cfg.eval.batch_size)
    print(f"[{cfg.title}] after:  {_short(after)}")

    history = trainer.state.log_history
    losses = [e["loss"] for e in history if "loss" in e]
    metrics = {
        "stage": cfg.title,
        "before": before,
        "after": after,
        "train": {**result.metrics, "first_loss": losses[0] if losses else None,
                  "last_loss": losses[-1] if losses else None, "dropped_too_long": n_dropped,
                  "train_conversations": len(train_rows), "resumed_from": last,
                  "global_step": trainer.state.global_step},
        "config": to_dict(cfg),
    }
    save_stage(cfg, model, tokenizer, metrics, history,
               curve_keys=("loss", "mean_token_accuracy", "learning_rate", "grad_norm", "aux_loss"),
               notes={"training loss": f"{metrics['train']['first_loss']} -> {metrics['train']['last_loss']}"})
    return metrics


def _load_tokenizer(cfg: SFTStageConfig, out: Path):
    from transformers import AutoTokenizer

    from alignment.tokenizer import build_tokenizer

    if cfg.tokenizer == "builtin":
        from alignment.modeling import model_config_from_yaml

        is_yaml = cfg.model.path.endswith((".yaml", ".yml"))
        vocab = model_config_from_yaml(cfg.model.path).vocab_size if is_yaml else 512
        return build_tokenizer(out / "tokenizer", vocab_size=vocab, seed=cfg.seed)
    source = cfg.tokenizer or cfg.model.path
    if not Path(source, "tokenizer_config.json").is_file():
        key = "tokenizer" if cfg.tokenizer else "model.path"
        raise ConfigError(f"{key}: no tokenizer in '{source}' (set tokenizer: builtin for a fresh model YAML)")
    return AutoTokenizer.from_pretrained(source)


def _drop_too_long(rows, tokenizer, max_length: int):
    """Drop (not truncate) conversations longer than the packed row: a cut-off reply teaches the wrong ending."""
    lengths = [len(tokenizer.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"])
               for m in rows["messages"]]
    keep = [i for i, n in enumerate(lengths) if n <= max_length]
    return rows.select(keep), len(lengths) - len(keep)


def _trl_args(cfg: SFTStageConfig, checkpoints: Path):
    from trl import SFTConfig

    return SFTConfig(
        **cfg.training.trainer_kwargs(checkpoints, cfg.seed),
        max_length=cfg.data.max_length,
        packing=cfg.data.packing,
        packing_strategy="bfd",  # padding-free rows with position_ids restarting per document
        assistant_only_loss=True,
        dataset_num_proc=None,
    )


def _read_json(path: Path) -> dict:
    import json

    return json.loads(Path(path).read_text())


def _short(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in metrics.items())


if __name__ == "__main__":
    sys.exit(main())
