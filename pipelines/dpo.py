"""Offline DPO: stage III (short DPO) and stage IV (long-context DPO) of the MiniMax-01 recipe [01 §5.4.1].

    make dpo                                   # python -m pipelines dpo --config configs/tiny/dpo.yaml (after make sft)
    make long-dpo                              # configs/tiny/long_dpo.yaml, starts from the stage III checkpoint
    python -m pipelines dpo --config CONFIG [--set dpo.beta=0.2 ...] [--overwrite]

Reads top to bottom: config -> prompts already used in SFT (the SFT mix rebuilt from its spec and seed; in a pipeline
the runner hands over the SFT stage's `data` and `seed`) -> tokenizer + packing-safe policy -> held-out evaluation -> preference pairs (`data_recipes.dpo_pairs`: N samples per prompt at
several temperatures through the rollout worker, scored by `rewards`, best vs worst with a minimum margin; saved
to `<output_dir>/pairs` with their provenance) -> reference model = the starting checkpoint loaded from disk
(packing-safe, FP32 head; with LoRA the reference is the model without its new adapter) -> TRL DPOTrainer
(`MiniMaxDPOTrainer`, sigmoid loss) -> evaluation again -> atomic `<output_dir>/final` + metrics.json /
summary.md / curves.png / TensorBoard. A re-run reuses the pairs and resumes from the last checkpoint.

Long DPO is a config, not a copy: all prompts long-context (retrieval haystacks), a constant LR.
Departures from the paper [01 §5.4.1, Table 7]: the reward models are the rule verifiers of the task suite
(`rewards.build_reward`); groups whose best and worst responses score within `pairs.min_margin` are dropped (the
paper does not say what it does with them); beta (not given) defaults to 0.1; lengths, batch sizes and LRs are
scaled to the tiny model, keeping the schedule shapes (short: cosine to 10%, long: constant).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from alignment.modeling import ModelOptions
from alignment.schema import DataSource, EvalOptions, TokenizerOptions, TrainOptions
from data_recipes.dpo_pairs import PairOptions
from pipelines.common import (cached_eval_before, check_builtin, check_files, check_model, check_reward,
                              check_tokenizer, claim, evaluate_sets, finish, finished, series_ends, short,
                              stage_main, stage_tokenizer, train_resuming)

DESCRIPTION = ("Reward-scored pairs sampled from the starting checkpoint, then DPO against it. Writes "
               "<output_dir>/pairs, final/ (the checkpoint), metrics.json, summary.md, curves.png and TensorBoard "
               "logs; a re-run reuses the pairs and resumes from the last checkpoint in <output_dir>/checkpoints.")


@dataclass
class PromptOptions(DataSource):
    # `builtin` / `files` / `seed`: the SFT stage's mix, rebuilt exactly (its `data.builtin`, `data.files` and
    # `seed`), so DPO prompts are prompts SFT trained on [01 §5.4.1]. The pipeline runner fills them in from the
    # stage named by `data_from`.
    seed: int = 0
    # Keep only these tasks (long DPO: [retrieval], the long-context prompts), and retrieval haystacks of at least
    # `min_n_pairs` key-value pairs; null keeps all.
    tasks: list[str] | None = None
    min_n_pairs: int = 0
    # At most this many distinct prompts of a task (seeded sample), e.g. {arithmetic: 800}: the mix is dominated by
    # its largest task, and the rarer domains (safety) need enough pairs to move; unlisted tasks are not capped.
    max_per_task: dict[str, int] = field(default_factory=dict)
    # Distinct prompts sampled (seeded) from what is left; null: all of them.
    n: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.n is not None and self.n < 1:
            raise ValueError(f"prompts.n must be >= 1 or null, got {self.n}")


@dataclass
class DPOOptions:
    # DPO's KL strength; the papers give none, 0.1 is the usual default.
    beta: float = 0.1
    # TRL loss: sigmoid = the DPO loss -log σ(β((log π_c − log ref_c) − (log π_r − log ref_r))).
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "sigmoid_norm"] = "sigmoid"
    # Weight of an added NLL term on the chosen response (TRL's "sft" loss, as in RPO); 0 = pure DPO. It stops DPO
    # from lowering the chosen response's likelihood along with the rejected one.
    sft_weight: float = 0.0
    label_smoothing: float = 0.0  # robust DPO's label noise
    # prompt + response tokens; longer pairs are dropped (not truncated, as in SFT) and counted
    max_length: int = 512

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"dpo.beta must be > 0, got {self.beta}")
        if self.sft_weight < 0:
            raise ValueError(f"dpo.sft_weight must be >= 0, got {self.sft_weight}")
        if self.max_length < 8:
            raise ValueError(f"dpo.max_length must be >= 8, got {self.max_length}")


@dataclass
class Config:
    # The starting checkpoint: the policy, the sampler of the pairs and (loaded again, frozen) the reference.
    model: ModelOptions
    prompts: PromptOptions
    pairs: PairOptions = field(default_factory=PairOptions)
    dpo: DPOOptions = field(default_factory=DPOOptions)
    training: TrainOptions = field(default_factory=TrainOptions)
    eval: EvalOptions = field(default_factory=EvalOptions)
    output_dir: str = "runs/dpo"
    # null (the checkpoint's own), "builtin" (for a model YAML) or a tokenizer directory; or {path: <one of those>,
    # chat_template: <.jinja file or template text>}: both documented at alignment.schema.TokenizerOptions.
    tokenizer: str | TokenizerOptions | None = None
    seed: int = 0
    title: str = "DPO"


def main(argv: list[str] | None = None, stage: str = "dpo") -> int:
    return stage_main(argv, stage=stage)


def check(cfg: Config, source: str, produced: set) -> None:
    """Inputs, before any work: a trained starting checkpoint, the SFT prompts' spec, the reward, the eval sets."""
    check_model(cfg, source, produced, checkpoint=True, what="DPO")
    check_tokenizer(cfg, source, produced)
    check_files(cfg.prompts.files, source, "prompts.files")
    check_builtin(cfg.prompts.builtin, source, "prompts.builtin")
    check_reward(cfg.pairs.reward, source, "pairs.reward", produced)
    check_builtin(cfg.eval.sets, source, "eval.sets", registry="eval")


def run(cfg: Config, overwrite: bool = False) -> dict:
    """Build pairs and train one DPO stage; returns the metrics written to `<output_dir>/metrics.json`."""
    from transformers import set_seed

    from alignment.distributed import barrier, computed_once, is_main
    from alignment.modeling import load_model
    from alignment.rollout import build_rollout
    from alignment.trainers import MiniMaxDPOTrainer
    from data_recipes import build_sft_mix, heldout_sets
    from data_recipes.dpo_pairs import build_dpo_pairs, load_pairs, select_prompts
    from data_recipes.io import chat_length, drop_too_long
    from rewards import build_reward

    if (done := finished(cfg, overwrite)) is not None:
        return done
    set_seed(cfg.seed)

    p = cfg.prompts
    prompts = select_prompts(build_sft_mix(p.builtin, p.files, p.seed), cfg.seed, p.n, p.tasks, p.min_n_pairs,
                             p.max_per_task)
    if not prompts:
        raise ValueError(f"prompts: nothing left after filtering the SFT mix (tasks={p.tasks}, "
                         f"min_n_pairs={p.min_n_pairs})")
    heldout = heldout_sets(cfg.eval.sets, cfg.seed)
    reward = build_reward(cfg.pairs.reward)
    tokenizer = stage_tokenizer(cfg)
    model = load_model(cfg.model, seed=cfg.seed, tokenizer=tokenizer)

    out = claim(cfg, overwrite)
    before = cached_eval_before(out, lambda: evaluate_sets(model, tokenizer, heldout, cfg.eval))
    print(f"[{cfg.title}] before: {short(before)}")

    # pairs sampled by the starting policy [01 §5.4.1]; reused on resume (and deterministic under the seed anyway)
    # under a launcher the main process samples and writes them (the model is whole before its trainer shards it),
    # the other ranks read what it wrote
    pairs_path = out / "pairs"
    if is_main() and not (pairs_path / "pair_stats.json").is_file():
        worker = build_rollout("transformers", model, tokenizer, batch_size=cfg.pairs.batch_size)
        build_dpo_pairs(worker, prompts, cfg.pairs, cfg.seed, policy=cfg.model.path, out_path=pairs_path,
                        reward=reward)
    barrier()
    pairs, pair_stats = load_pairs(pairs_path)
    # a cut response no longer says what was preferred: pairs whose longer side does not fit are dropped
    pairs, n_too_long = drop_too_long(
        pairs, lambda row: max(chat_length(tokenizer, row["prompt"] + row[side]) for side in ("chosen", "rejected")),
        cfg.dpo.max_length)
    print(f"[{cfg.title}] {len(pairs)} pairs from {pair_stats['prompts']} prompts x {cfg.pairs.n} samples "
          f"(dropped: {pair_stats['dropped_all_tied']} all tied, {pair_stats['dropped_below_margin']} below margin "
          f"{cfg.pairs.min_margin}, {n_too_long} longer than {cfg.dpo.max_length} tokens); per task "
          f"{pair_stats['pairs_per_task']}")
    if len(pairs) == 0:
        raise ValueError(f"no DPO pairs left after dropping those longer than dpo.max_length={cfg.dpo.max_length}")

    # reference = the starting checkpoint, from disk, packing-safe with the same head; with LoRA, TRL uses the
    # model without its new adapter instead (no second copy)
    ref_model = None
    if cfg.model.lora is None:
        ref_model = load_model(dataclasses.replace(cfg.model, gradient_checkpointing=False), seed=cfg.seed,
                               tokenizer=tokenizer)
    trainer = MiniMaxDPOTrainer(
        model=model,
        ref_model=ref_model,
        args=dpo_args(cfg, out / "checkpoints"),
        train_dataset=pairs.select_columns(["prompt", "chosen", "rejected"]),
        processing_class=tokenizer,
    )
    result, last = train_resuming(trainer, cfg)
    after = computed_once(trainer.model, lambda: evaluate_sets(trainer.model, tokenizer, heldout, cfg.eval))
    print(f"[{cfg.title}] after:  {short(after)}")

    curve_keys = ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected",
                  "logps/chosen", "logps/rejected", "learning_rate")
    ends = series_ends(trainer.state.log_history, ("rewards/margins", "rewards/accuracies"))
    notes = {"pairs": f"{len(pairs)} from {pair_stats['prompts']} SFT prompts x {cfg.pairs.n} samples at "
                      f"T={cfg.pairs.temperatures} ({pair_stats['dropped_all_tied']} groups all tied, "
                      f"{pair_stats['dropped_below_margin']} below margin, {n_too_long} too long); chosen score "
                      f"{pair_stats['mean_score_chosen']:.3f} vs rejected {pair_stats['mean_score_rejected']:.3f}",
             **{f"DPO {key.replace('rewards/', 'reward ')}": f"{ends.get(f'{key}/first')} -> {ends.get(f'{key}/last')}"
                for key in ("rewards/margins", "rewards/accuracies")}}
    return finish(cfg, trainer, result, last, tokenizer, before, after, curve_keys=curve_keys, notes=notes,
                  train={"pairs": len(pairs), "dropped_too_long": n_too_long}, extra={"pairs": pair_stats})


def dpo_args(cfg: Config, checkpoints: Path):
    """TRL's DPOConfig from the stage config (TrainingArguments shared with every stage)."""
    from trl import DPOConfig

    t, d = cfg.training, cfg.dpo
    loss_type, loss_weights = [d.loss_type], [1.0]
    if d.sft_weight > 0:
        loss_type, loss_weights = loss_type + ["sft"], loss_weights + [d.sft_weight]
    return DPOConfig(
        **t.trainer_kwargs(checkpoints, cfg.seed),
        beta=d.beta,
        loss_type=loss_type,
        loss_weights=loss_weights,
        label_smoothing=d.label_smoothing,
        max_length=d.max_length,
        router_aux_loss_coef=cfg.model.router_aux_loss_coef,
        dataset_num_proc=None,
    )


if __name__ == "__main__":
    sys.exit(main())
