"""Online RL: stage V of the MiniMax-01 recipe, modified GRPO with success-rate prompt filtering.

    make grpo                                  # python -m pipelines grpo --config configs/tiny/grpo.yaml (after make sft)
    python -m pipelines grpo --config CONFIG [--set loss.name=cispo ...] [--overwrite]

Reads top to bottom: config -> candidate prompts (built-in tasks and/or your `prompts.files`, every row checked
against the fields the reward and verifier handlers read) -> tokenizer + packing-safe policy -> held-out evaluation
(built-in `eval.sets` and your `eval.files`) -> prompt pool (the policy samples k answers per candidate prompt
through the rollout worker; prompts whose success rate by `prompts.verifier` lies inside (lo, hi) are kept and
written to `<output_dir>/prompt_pool.jsonl` with their rates; with `prompts.refresh.every` > 0 the rest go to
`prompt_pool_reserve.jsonl` and the pool is refreshed during training: data_recipes.prompt_pool.LivePool) -> TRL
GRPOTrainer subclass
(`MiniMaxGRPOTrainer`: rollout worker with the repetition early stop, rewards from `rewards.build_reward`, balanced
group advantages, zero-variance groups dropped and refilled, the modified GRPO or CISPO loss from
`alignment.losses`; every step's wall time per phase logged as `time/*`, alignment.timing) -> evaluation again ->
atomic `<output_dir>/final` + metrics.json (with `train.step_time`, the mean step's split) / summary.md (its "step
time" line) / curves.png / TensorBoard.

Across ranks (`make grpo NPROC=N`, i.e. torchrun): each rank rolls out its block of every round's groups and
trains on it (alignment.trainers.MiniMaxGRPOTrainer: gathered rewards, global dynamic-sampling decisions, global
metrics); the prompt pool is scored by the main process alone, with the starting policy, and read by every rank.
vLLM rollouts are one process only for now (no engine per rank, no sync from ZeRO-3 partitions yet).

Where it departs from the paper [01 §5.4.2, M1 §3-5]: the shipped tiny prompts are the built-in arithmetic task
(the paper's RL prompts are "mainly math") from a different random stream than SFT's; pass rates are measured by the policy itself,
not a stronger model; the clip / drop thresholds, KL coefficient, group size and early-stop K are our defaults
(the papers give none, or give numbers for 40K-token rollouts); batch sizes and LR are scaled to the tiny model.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from alignment.config import ConfigError
from alignment.distributed import is_main
from alignment.losses import LossOptions
from alignment.modeling import ModelOptions
from alignment.rollout.base import RolloutOptions, SamplingOptions
from alignment.schema import EvalOptions, TokenizerOptions, TrainOptions
from alignment.trainers import AdvantageOptions, DynamicSamplingOptions, RolloutCorrectionOptions
from data_recipes.prompt_pool import PoolOptions, load_pool_files, pool_row
from pipelines.common import (cached_eval_before, check_builtin, check_files, check_model, check_reward,
                              check_rollout, check_tokenizer, claim, evaluate_sets, every_rank_samples, finish, finished,
                              load_policy, series_ends, short, stage_main, stage_tokenizer, train_resuming)

DESCRIPTION = ("With success-rate prompt filtering. Writes <output_dir>/prompt_pool.jsonl, final/ (the checkpoint), "
               "metrics.json, summary.md, curves.png and TensorBoard logs; a re-run resumes from the last checkpoint "
               "in <output_dir>/checkpoints.")


@dataclass
class Config:
    model: ModelOptions
    prompts: PoolOptions
    # Rollout sampling, used by the offline pass-rate filter and by training.
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    rollout: RolloutOptions = field(default_factory=RolloutOptions)
    loss: LossOptions = field(default_factory=LossOptions)
    advantages: AdvantageOptions = field(default_factory=AdvantageOptions)
    dynamic_sampling: DynamicSamplingOptions = field(default_factory=DynamicSamplingOptions)
    rollout_correction: RolloutCorrectionOptions = field(default_factory=RolloutCorrectionOptions)
    # Reward handlers (rewards.build_reward spec): {name: {weight, clip, ...options}}.
    reward: dict[str, dict] = field(default_factory=lambda: {"correctness": {"weight": 1.0}})
    num_generations: int = 8  # G, completions per prompt (one group)
    # μ: optimizer steps per rollout batch (TRL's num_iterations), as PPO-style training does. > 1 makes the later
    # steps off-policy (ratio != 1), which is where the clip rule and change 1 (drop A < 0 tokens with a large
    # ratio) act [01 §5.4.2]; their shares are logged (`dropped`, `clip_low`, `clip_high`). 1 is purely on-policy
    # (ratio = 1: nothing is ever clipped or dropped, the MiniMax change is inert), so the default is 2.
    updates_per_batch: int = 2
    # training.batch_size counts completions per optimizer micro-step (a multiple of num_generations).
    training: TrainOptions = field(default_factory=TrainOptions)
    eval: EvalOptions = field(default_factory=EvalOptions)
    # Length-bias monitor (rewards.LengthBiasMonitor) window in steps; 0 turns it off.
    length_monitor_window: int = 20
    output_dir: str = "runs/grpo"
    # null (the checkpoint's own), "builtin" (for a model YAML) or a tokenizer directory; or {path: <one of those>,
    # chat_template: <.jinja file or template text>}: both documented at alignment.schema.TokenizerOptions.
    tokenizer: str | TokenizerOptions | None = None
    seed: int = 0
    title: str = "GRPO"

    def __post_init__(self):
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (advantages are relative within a group), got "
                             f"{self.num_generations}")
        if self.training.batch_size % self.num_generations:
            raise ValueError(f"training.batch_size ({self.training.batch_size}) must be a multiple of "
                             f"num_generations ({self.num_generations}): a step holds whole groups")
        if self.updates_per_batch < 1:
            raise ValueError(f"updates_per_batch must be >= 1, got {self.updates_per_batch}")
        if self.loss.beta > 0 and self.loss.kl == "none":
            raise ValueError("loss.beta > 0 but loss.kl is none; pick kl: minimax or k3, or set beta: 0")


def main(argv: list[str] | None = None, stage: str = "grpo") -> int:
    return stage_main(argv, stage=stage)


def verifier_spec(cfg: Config) -> dict:
    """The reward spec that measures success (pass rates): `prompts.verifier`, else the stage's `reward`."""
    return cfg.prompts.verifier if cfg.prompts.verifier is not None else cfg.reward


def candidates(cfg: Config) -> list[dict]:
    """The candidate prompts: built-in task rows (prompts.builtin, seed prompts.seed), then every row of
    prompts.files, each as a pool row (`prompt` + fields) checked against the fields the reward and the verifier
    read (`rewards.spec_fields`): a DataError names file, row, column and handler."""
    from data_recipes import build_sft_mix
    from rewards import spec_fields

    reads = list({(h, f, c): (h, f, c, k) for spec in (cfg.reward, verifier_spec(cfg))
                  for h, f, c, k in spec_fields(spec)}.values())
    built = build_sft_mix(cfg.prompts.builtin, [], cfg.prompts.seed) if cfg.prompts.builtin else []
    rows = [pool_row(dict(r), f"prompts.builtin row {i + 1} (task '{r['task']}')", reads)
            for i, r in enumerate(built)]
    return rows + load_pool_files(cfg.prompts.files, reads)


def check(cfg: Config, source: str, produced: set) -> None:
    """Inputs, before any work: a trained starting checkpoint, the prompt-pool, verifier and reward specs, every
    row of the prompt files against the fields those handlers read, the eval sets, and vLLM (with its install hint)
    when the rollouts use it."""
    check_model(cfg, source, produced, checkpoint=True, what="GRPO", zero_init=True)
    check_tokenizer(cfg, source, produced)
    check_builtin(cfg.prompts.builtin, source, "prompts.builtin")
    check_builtin(cfg.prompts.exclude_builtin, source, "prompts.exclude_builtin")
    check_files(cfg.prompts.files, source, "prompts.files")
    check_reward(cfg.reward, source, "reward", produced)
    if cfg.prompts.verifier is not None:
        check_reward(cfg.prompts.verifier, source, "prompts.verifier", produced)
    candidates(cfg)  # the rows themselves (DataError: file, row, column, handler)
    check_builtin(cfg.eval.sets, source, "eval.sets", registry="eval")
    check_rollout(cfg.rollout)


def run(cfg: Config, overwrite: bool = False) -> dict:
    """Train one GRPO stage; returns the metrics written to `<output_dir>/metrics.json`."""
    from transformers import set_seed

    from alignment.distributed import barrier, broadcast, computed_once, forward_ready
    from alignment.modeling import load_model
    from alignment.released import checkpoint_config
    from alignment.reporting import write_json_atomic
    from alignment.rollout import build_rollout
    from alignment.timing import step_time_line, step_time_split
    from alignment.trainers import MiniMaxGRPOTrainer
    from data_recipes import build_sft_mix, heldout_sets
    from data_recipes.prompt_pool import LivePool, build_prompt_pool, exclude_prompts, load_pool
    from rewards import LengthBiasMonitor, Verifier, trl_reward_funcs

    if (done := finished(cfg, overwrite)) is not None:
        return done
    set_seed(cfg.seed)

    rows = candidates(cfg)
    n_candidates = len(rows)
    if cfg.prompts.exclude_builtin:  # "prompts not seen in SFT" [01 §5.4.2]
        seen = build_sft_mix(cfg.prompts.exclude_builtin, [], cfg.prompts.exclude_seed)
        rows = exclude_prompts(rows, [dict(r) for r in seen])
        if not rows:
            raise ConfigError("prompts: every candidate prompt occurs in prompts.exclude_builtin (the SFT mix)")
    verifier = Verifier(verifier_spec(cfg))
    heldout = heldout_sets(cfg.eval.sets, cfg.seed)
    reward_funcs, reward_weights = trl_reward_funcs(cfg.reward)
    tokenizer = stage_tokenizer(cfg)
    model, args = load_policy(cfg, tokenizer, lambda: _trl_args(cfg, Path(cfg.output_dir) / "checkpoints",
                                                                reward_weights, checkpoint_config(Path(cfg.model.path))))
    # the KL reference: the starting checkpoint through the same loader (packing-safe, FP32 head; partitioned too
    # when the policy is); with LoRA, TRL scores the reference with the adapter disabled (no second copy)
    ref_model = load_model(dataclasses.replace(cfg.model, gradient_checkpointing=False), seed=cfg.seed,
                           tokenizer=tokenizer) if cfg.loss.uses_kl and cfg.model.lora is None else None
    worker = build_rollout(cfg.rollout.backend, model, tokenizer, **cfg.rollout.worker_kwargs(cfg.seed))

    out = claim(cfg, overwrite)
    with forward_ready(model, args):  # loaded partitioned: every rank takes part in each forward
        before = cached_eval_before(out, model, lambda: evaluate_sets(model, tokenizer, heldout, cfg.eval))
    print(f"[{cfg.title}] before: {short(before)}")

    # offline success-rate filter with the starting policy; reused on resume. Under a launcher the main process
    # scores the candidates (the model is whole before its trainer shards it) and writes the pool, every rank reads
    # it: the pool one process would build. A model loaded partitioned (training.zero_init) is scored on every rank
    # (each forward needs every rank; they compute the same rates) and the main process writes.
    pool_path, pool_stats_path = out / "prompt_pool.jsonl", out / "prompt_pool_stats.json"
    refresh = cfg.prompts.refresh.every > 0
    reserve_path = out / "prompt_pool_reserve.jsonl" if refresh else None
    if broadcast(not (pool_path.is_file() and pool_stats_path.is_file())) and (is_main() or every_rank_samples(args, cfg.rollout.backend)):
        with forward_ready(model, args):
            _, pool_stats = build_prompt_pool(worker, rows, cfg.prompts, cfg.sampling,
                                              pool_path if is_main() else None, score=verifier,
                                              reserve_path=reserve_path if is_main() else None)
        pool_stats["candidates"], pool_stats["excluded_seen_in_sft"] = n_candidates, n_candidates - len(rows)
        if is_main():
            write_json_atomic(pool_stats_path, pool_stats)
    barrier()
    pool, pool_stats = load_pool(pool_path), json.loads(pool_stats_path.read_text())
    live = None
    if refresh:  # the slots' prompts change during training; the sampler indexes slots (LivePool)
        live = LivePool([dict(r) for r in pool], [dict(r) for r in load_pool(reserve_path)], cfg.prompts.lo,
                        cfg.prompts.hi, cfg.prompts.refresh.every, cfg.prompts.refresh.measure)
        pool = live.dataset()
    print(f"[{cfg.title}] prompt pool: kept {pool_stats['kept']} of {pool_stats['scored']} prompts with pass rate in "
          f"({cfg.prompts.lo}, {cfg.prompts.hi}) (mean pass rate {pool_stats['mean_pass_rate_all']:.3f} -> "
          f"{pool_stats['mean_pass_rate_kept']:.3f})")

    def success_fn(rows, completions):  # each completion's success in [0, 1] by the verifier spec
        return verifier([r["prompt"] for r in rows], completions, rows)

    monitor = LengthBiasMonitor(window=cfg.length_monitor_window, min_steps=min(5, cfg.length_monitor_window)) \
        if cfg.length_monitor_window >= 2 else None
    trainer = MiniMaxGRPOTrainer(
        model=model,
        ref_model=ref_model,
        reward_funcs=reward_funcs,
        args=args or _trl_args(cfg, out / "checkpoints", reward_weights, model.config),
        train_dataset=pool,
        processing_class=tokenizer,
        loss=cfg.loss, sampling=cfg.sampling, rollout=worker, advantages=cfg.advantages,
        dynamic_sampling=cfg.dynamic_sampling, rollout_correction=cfg.rollout_correction,
        length_monitor=monitor, success_fn=success_fn, seed_groups=cfg.rollout.seed_groups,
        pool=live, pool_k=cfg.prompts.k, router_replay=cfg.rollout.router_replay,
    )
    result, last = train_resuming(trainer, cfg)
    after = computed_once(trainer.model, lambda: evaluate_sets(trainer.model, tokenizer, heldout, cfg.eval))
    print(f"[{cfg.title}] after:  {short(after)}")

    ends = series_ends(trainer.state.log_history, ("reward",))
    notes = {"prompt pool": f"{pool_stats['kept']} of {pool_stats['scored']} prompts kept "
                            f"(pass rate in ({cfg.prompts.lo}, {cfg.prompts.hi}))",
             "reward": f"{ends.get('reward/first')} -> {ends.get('reward/last')}"}
    if live is not None:
        d = live.distribution()
        notes["pool refresh"] = (f"every {cfg.prompts.refresh.every} steps: {live.counts['retired']} prompts retired "
                                 f"for re-measured ones ({live.counts['measured']} measured); at the end the active "
                                 f"prompts' latest rates: mean {d['pool/rate_mean']:.3f}, "
                                 f"{d['pool/in_band_frac']:.0%} in band, {d['pool/solved_frac']:.0%} solved")
        pool_stats = {**pool_stats, "refresh": {**live.counts, **d}}
    if monitor is not None:  # rewards/monitor.py: length growing while success does not [M1 §4]
        notes["length-bias alarm"] = monitor.summary()
    # where a step's time goes (the trainer's time/* metrics), over every logged step of the stage
    split = step_time_split(trainer.state.log_history)
    if split is not None:
        notes["step time"] = step_time_line(split)
    return finish(cfg, trainer, result, last, tokenizer, before, after, notes=notes, extra={"prompt_pool": pool_stats},
                  train={"step_time": split} if split is not None else None,
                  curve_keys=("reward", "success_rate", "dynamic/kept_frac", "kl", "entropy",
                              "completions/mean_length", "dropped", "clip_high", "clip_low", "pool/rate_mean",
                              "pool/in_band_frac", "mismatch/prob_corr", "mismatch/logp_abs_mean",
                              "time/step_s", "time/rollout_frac", "time/tokens_per_s", "time/sync_s"))


def _trl_args(cfg: Config, checkpoints: Path, reward_weights: list[float], model_config):
    from trl import GRPOConfig

    from alignment.trainers import grpo_trl_settings

    trainer_kwargs = cfg.training.trainer_kwargs(checkpoints, cfg.seed)
    trainer_kwargs["deepspeed"] = zero3_with_whole_lm_head(trainer_kwargs.get("deepspeed"), model_config)
    return GRPOConfig(
        **trainer_kwargs,
        # beta (the reference switch), temperature, top_p/top_k, max_completion_length; no epsilon / scale_rewards:
        # only TRL's own loss and advantages read them, and ours replace both (see grpo_trl_settings)
        **grpo_trl_settings(cfg.loss, cfg.sampling),
        num_generations=cfg.num_generations,
        num_iterations=cfg.updates_per_batch,
        reward_weights=reward_weights,
        cast_lm_head_to_fp32=cfg.model.fp32_lm_head,
        router_aux_loss_coef=cfg.model.router_aux_loss_coef,
        log_completions=False,
        remove_unused_columns=False,
    )


def zero3_with_whole_lm_head(path: str | None, model_config):
    """The stage's DeepSpeed config (`training.deepspeed`); a ZeRO-3 one comes back as a dict that keeps parameters
    up to the LM head's size whole on every rank (`stage3_param_persistence_threshold`), anything else as it is.
    Why: TRL's fused log-prob head reads `lm_head.weight` directly, gathering it inside the model's forward, and
    ZeRO-3 then finds the head out of the fetch order it recorded and stops ("tracing error at step 0"; 2 CPU ranks,
    DeepSpeed 0.19.8, TRL 1.16). A whole head is never fetched. The price is memory: every parameter no larger than
    the head stays whole on each rank (the 456B model: attention, norms, routers, embedding and head, ~21B
    parameters, ~42 GB in bf16 per GPU; the experts stay partitioned) -- too much beside a full fine-tune's
    partitions at that size (docs/scaling.md); the lasting fix is a fused head that fetches the weight through the
    head module's own ZeRO-3 hooks, not built."""
    if not path:
        return path
    config = json.loads(Path(path).read_text())
    zero = config.get("zero_optimization", {})
    if zero.get("stage") != 3:
        return path
    head = model_config.vocab_size * model_config.hidden_size
    threshold = zero.get("stage3_param_persistence_threshold", "auto")
    if threshold == "auto" or float(threshold) < head:
        zero["stage3_param_persistence_threshold"] = head
        if is_main():
            print(f"[grpo] {path}: ZeRO-3 keeps parameters up to the LM head's {head:,} elements whole on every rank "
                  "(TRL's fused log-prob head reads it outside DeepSpeed's fetch order)")
    return {**config, "zero_optimization": zero}


if __name__ == "__main__":
    sys.exit(main())
