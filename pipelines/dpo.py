"""Offline DPO: stage III (short DPO) and stage IV (long-context DPO) of the MiniMax-01 recipe [01 §5.4.1].

    make dpo                                   # python -m pipelines dpo --config configs/tiny/dpo.yaml (after make sft)
    make long-dpo                              # configs/tiny/long_dpo.yaml, starts from the stage III checkpoint
    python -m pipelines dpo --config CONFIG [--set dpo.beta=0.2 ...] [--overwrite]

Reads top to bottom: config -> prompts already used in SFT (the SFT mix rebuilt from its spec and seed; in a pipeline
the runner hands over the SFT stage's `data` and `seed`) and your preference files (`pairs.files`, every row checked
first) -> tokenizer + packing-safe policy -> held-out evaluation -> preference pairs (`data_recipes.dpo_pairs`: N
samples per prompt at several temperatures through the rollout worker, scored by `rewards` (rule verifiers and/or a
trained reward model: `pairs.reward`, as the paper scores with its reward models [01 §5.3, §5.4.1]), best vs worst
with a minimum margin; saved to `<output_dir>/pairs` with their provenance), plus the files' pairs -> reference =
the starting checkpoint (`dpo.reference: live`: loaded again from disk, packing-safe, FP32 head; `precomputed`: its
log-probs computed once before training, no second model; with LoRA the model without its new adapter) -> TRL
DPOTrainer (`MiniMaxDPOTrainer`, sigmoid loss; a response's log-prob sums over assistant tokens only, so a tool's
output inside a response is not scored) -> evaluation again -> atomic `<output_dir>/final` + metrics.json /
summary.md / curves.png / TensorBoard. A re-run reuses the pairs and resumes from the last checkpoint.

Long DPO is a config, not a copy: all prompts long-context (retrieval haystacks), a constant LR.
Departures from the paper [01 §5.4.1, Table 7]: the tiny configs' reward is the task suite's rule verifiers alone
(`rewards.build_reward`; the paper's reward models are the `reward_model` handler, which the 548M and released
pipelines use); groups whose best and worst responses score within `pairs.min_margin` are dropped (the
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
                              check_rollout, check_tokenizer, claim, evaluate_sets, every_rank_samples, finish, finished,
                              load_policy, series_ends, short, stage_main, stage_tokenizer, train_resuming)

DESCRIPTION = ("Reward-scored pairs sampled from the starting checkpoint (pairs.reward: rule verifiers and/or a "
               "trained reward model) and/or your own preference files (pairs.files: TRL's prompt/chosen/rejected "
               "rows, plain or conversational, tool turns included; pairs.sample: false trains on the files alone), "
               "then DPO against the starting checkpoint: dpo.reference: live (a frozen copy scores every batch) or "
               "precomputed (its log-probs computed once before training, no second model: what ZeRO-3 wants). "
               "Writes <output_dir>/pairs, final/ (the checkpoint), metrics.json, summary.md, curves.png and "
               "TensorBoard logs; a re-run reuses the pairs and resumes from the last checkpoint in "
               "<output_dir>/checkpoints.")


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

    required = False  # a stage trained on preference files alone (pairs.sample: false) samples no prompts

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
    # The reference policy's log-probs: "live" scores every batch with a frozen copy of the starting checkpoint
    # (one more model in memory); "precomputed" scores every pair once before training with the policy as loaded
    # (= the starting checkpoint) and keeps the numbers in the dataset (TRL's `precompute_ref_log_probs`): the same
    # loss (tests/test_dpo.py), no second model, which is what a ZeRO-3 run wants (TRL wraps the policy in one
    # inference engine for the pass instead of sharding a second copy). With LoRA both are the model without its
    # new adapter.
    reference: Literal["live", "precomputed"] = "live"

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
    # Where sampled pairs' prompts come from (in a pipeline: the SFT stage named by `data_from`); not needed with
    # pairs.sample: false.
    prompts: PromptOptions = field(default_factory=PromptOptions)
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
    """Inputs, before any work: a trained starting checkpoint, the SFT prompts' spec, the reward, every row of the
    preference files, the eval sets."""
    from alignment.config import ConfigError

    check_model(cfg, source, produced, checkpoint=True, what="DPO", zero_init=True)
    check_tokenizer(cfg, source, produced)
    if cfg.pairs.sample:
        if not cfg.prompts.builtin and not cfg.prompts.files:
            raise ConfigError(f"{source}: 'prompts': pairs are sampled from prompts (pairs.sample: true), but prompts "
                              "has neither builtin nor files (or set pairs.sample: false to train on pairs.files)")
        check_files(cfg.prompts.files, source, "prompts.files")
        check_builtin(cfg.prompts.builtin, source, "prompts.builtin")
        check_reward(cfg.pairs.reward, source, "pairs.reward", produced)
        check_rollout(cfg.pairs.rollout)
    check_files(cfg.pairs.files, source, "pairs.files")
    preference_files(cfg.pairs)  # every row: a bad one fails here, naming file, row and key
    check_builtin(cfg.eval.sets, source, "eval.sets", registry="eval")


def preference_files(pairs: PairOptions) -> list[dict]:
    """The rows of `pairs.files` (`data_recipes.preferences.load_dpo_preferences`), in one format for the stage:
    plain-text files only alone (no sampled pairs, which are conversational, and no conversational files)."""
    from data_recipes import DataError
    from data_recipes.preferences import CONVERSATIONAL, PLAIN, load_dpo_preferences

    rows, kinds = [], {}
    for path in pairs.files:
        file_rows, kinds[path] = load_dpo_preferences(path)
        rows += file_rows
    plain = [path for path, kind in kinds.items() if kind == PLAIN]
    if plain and (pairs.sample or len(plain) < len(kinds)):
        other = "the sampled pairs" if pairs.sample else \
            next(p for p, kind in kinds.items() if kind == CONVERSATIONAL)
        raise DataError(f"{plain[0]}: plain-text pairs (strings) cannot be trained together with {other}, which "
                        "are conversational (message lists): DPO trains on one format; use message lists, or "
                        "pairs.sample: false with plain files only")
    return rows


def pair_length(tokenizer, row: dict, side: str) -> int:
    """Tokens of prompt + `side` as DPO sees them: through the chat template (conversational) or as text + EOS."""
    from data_recipes.io import chat_length

    if isinstance(row["prompt"], str):
        return len(tokenizer(row["prompt"] + row[side], add_special_tokens=False)["input_ids"]) + 1
    return chat_length(tokenizer, row["prompt"] + row[side])


def run(cfg: Config, overwrite: bool = False) -> dict:
    """Build pairs and train one DPO stage; returns the metrics written to `<output_dir>/metrics.json`."""
    from transformers import set_seed

    from alignment.distributed import barrier, broadcast, computed_once, forward_ready, is_main
    from alignment.modeling import load_model
    from alignment.rollout import build_rollout
    from alignment.trainers import MiniMaxDPOTrainer
    from data_recipes import build_sft_mix, heldout_sets
    from data_recipes.dpo_pairs import build_dpo_pairs, load_pairs, select_prompts
    import datasets

    from data_recipes.io import drop_too_long
    from rewards import build_reward

    if (done := finished(cfg, overwrite)) is not None:
        return done
    set_seed(cfg.seed)

    file_pairs = preference_files(cfg.pairs)  # your pairs, checked before any model work
    p = cfg.prompts
    if cfg.pairs.sample:
        prompts = select_prompts(build_sft_mix(p.builtin, p.files, p.seed), cfg.seed, p.n, p.tasks, p.min_n_pairs,
                                 p.max_per_task)
        if not prompts:
            raise ValueError(f"prompts: nothing left after filtering the SFT mix (tasks={p.tasks}, "
                             f"min_n_pairs={p.min_n_pairs})")
        reward = build_reward(cfg.pairs.reward)
    heldout = heldout_sets(cfg.eval.sets, cfg.seed)
    tokenizer = stage_tokenizer(cfg)
    model, args = load_policy(cfg, tokenizer, lambda: dpo_args(cfg, Path(cfg.output_dir) / "checkpoints"))

    out = claim(cfg, overwrite)
    with forward_ready(model, args):  # loaded partitioned: every rank takes part in each forward
        before = cached_eval_before(out, model, lambda: evaluate_sets(model, tokenizer, heldout, cfg.eval))
    print(f"[{cfg.title}] before: {short(before)}")

    # pairs sampled by the starting policy [01 §5.4.1]; reused on resume (and deterministic under the seed anyway)
    # under a launcher the main process samples and writes them (the model is whole before its trainer shards it),
    # the other ranks read what it wrote. A vLLM engine joins the launcher's process group as it starts (a
    # collective), so with that backend every rank starts one and the main process alone samples. A model loaded
    # partitioned (training.zero_init) samples on every rank with the transformers backend (each forward needs
    # every rank; they compute the same samples) and the main process's are kept.
    pairs_path = out / "pairs"
    sampled, pair_stats = [], None
    if cfg.pairs.sample:
        rollout = cfg.pairs.rollout
        if broadcast(not (pairs_path / "pair_stats.json").is_file()):
            everyone = every_rank_samples(args, rollout.backend)
            worker = build_rollout(rollout.backend, model, tokenizer, **rollout.worker_kwargs(cfg.seed)) \
                if is_main() or everyone or rollout.backend == "vllm" else None
            try:
                if is_main() or everyone:
                    with forward_ready(model, args):
                        build_dpo_pairs(worker, prompts, cfg.pairs, cfg.seed, policy=cfg.model.path,
                                        out_path=pairs_path if is_main() else None, reward=reward)
            finally:
                if hasattr(worker, "close"):  # a vLLM engine gives its share of the GPU back to the trainer
                    worker.close()
        barrier()
        sampled, pair_stats = load_pairs(pairs_path)
        sampled = sampled.select_columns(["prompt", "chosen", "rejected"]).to_list()
        print(f"[{cfg.title}] {len(sampled)} sampled pairs from {pair_stats['prompts']} prompts x {cfg.pairs.n} "
              f"samples (dropped: {pair_stats['dropped_all_tied']} all tied, {pair_stats['dropped_below_margin']} "
              f"below margin {cfg.pairs.min_margin}); per task {pair_stats['pairs_per_task']}")
    if file_pairs:
        print(f"[{cfg.title}] {len(file_pairs)} pairs from {len(cfg.pairs.files)} preference file(s)")
    # one Dataset of both sources (their message structs merged); a cut response no longer says what was
    # preferred: pairs whose longer side does not fit are dropped
    pairs, n_too_long = drop_too_long(
        datasets.Dataset.from_list(sampled + file_pairs),
        lambda row: max(pair_length(tokenizer, row, side) for side in ("chosen", "rejected")), cfg.dpo.max_length)
    print(f"[{cfg.title}] training on {len(pairs)} pairs ({n_too_long} longer than {cfg.dpo.max_length} tokens "
          "dropped)")
    if len(pairs) == 0:
        raise ValueError(f"no DPO pairs left after dropping those longer than dpo.max_length={cfg.dpo.max_length}")

    # reference = the starting checkpoint, from disk, packing-safe with the same head; with LoRA, TRL uses the
    # model without its new adapter instead (no second copy); precomputed: no reference model, the trainer scores
    # every pair with the policy as loaded before its first step. Partitioned too when the policy is (zero_init)
    ref_model = None
    if cfg.model.lora is None and cfg.dpo.reference == "live":
        ref_model = load_model(dataclasses.replace(cfg.model, gradient_checkpointing=False), seed=cfg.seed,
                               tokenizer=tokenizer)
    trainer = MiniMaxDPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args or dpo_args(cfg, out / "checkpoints"),
        train_dataset=pairs,
        processing_class=tokenizer,
    )
    result, last = train_resuming(trainer, cfg)
    after = computed_once(trainer.model, lambda: evaluate_sets(trainer.model, tokenizer, heldout, cfg.eval))
    print(f"[{cfg.title}] after:  {short(after)}")

    curve_keys = ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected",
                  "logps/chosen", "logps/rejected", "learning_rate")
    ends = series_ends(trainer.state.log_history, ("rewards/margins", "rewards/accuracies"))
    sources = []
    if pair_stats is not None:
        sources.append(f"{len(sampled)} sampled from {pair_stats['prompts']} SFT prompts x {cfg.pairs.n} samples at "
                       f"T={cfg.pairs.temperatures} ({pair_stats['dropped_all_tied']} groups all tied, "
                       f"{pair_stats['dropped_below_margin']} below margin); chosen score "
                       f"{pair_stats['mean_score_chosen']:.3f} vs rejected {pair_stats['mean_score_rejected']:.3f}")
    if file_pairs:
        sources.append(f"{len(file_pairs)} from {', '.join(cfg.pairs.files)}")
    notes = {"pairs": f"{len(pairs)} trained on ({n_too_long} too long dropped): {'; '.join(sources)}",
             "reference": cfg.dpo.reference,
             **{f"DPO {key.replace('rewards/', 'reward ')}": f"{ends.get(f'{key}/first')} -> {ends.get(f'{key}/last')}"
                for key in ("rewards/margins", "rewards/accuracies")}}
    return finish(cfg, trainer, result, last, tokenizer, before, after, curve_keys=curve_keys, notes=notes,
                  train={"pairs": len(pairs), "dropped_too_long": n_too_long, "file_pairs": len(file_pairs)},
                  extra={"pairs": pair_stats} if pair_stats is not None else {})


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
        precompute_ref_log_probs=d.reference == "precomputed",
        dataset_num_proc=None,
    )


if __name__ == "__main__":
    sys.exit(main())
