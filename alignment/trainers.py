"""Narrow TRL trainer subclasses: only what the MiniMax recipe changes."""

from __future__ import annotations

import copy
import os
import random
import zlib
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from accelerate.utils import gather_object
from datasets import Dataset
from transformers import TrainerCallback
from trl import DPOTrainer, GRPOTrainer, SFTTrainer
from trl.data_utils import extract_prompt, get_dataset_column_names, is_conversational
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model, global_then_local_main_first

from alignment.checkpointing import SafeCheckpoints
from alignment.context_parallel import ContextParallelTraining
from alignment.losses import LossOptions, group_advantages, policy_loss, zero_variance_groups
from alignment.modeling import FP32LMHead, make_packing_safe
from alignment.rollout.base import SamplingOptions, importance_weights, logprob_mismatch
from alignment.routing import layout_routes, record_routes, replay_routes, route_mismatch
from alignment.timing import StepClock, step_metrics
from alignment.tokenizer import assistant_tokens, template_messages


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _is_peft(model) -> bool:
    return hasattr(model, "get_base_model") and hasattr(model, "peft_config")


def _has_fp32_head(model) -> bool:
    return isinstance(_base(model).get_output_embeddings(), FP32LMHead)


def fp32_fused_lm_head(model, outputs: tuple[str, ...]) -> None:
    """Make TRL's fused, chunked log-prob head compute in FP32 when `model` has an FP32 LM head (MiniMax-M1 §3).

    TRL's trainers score tokens with their own fused head that reads `lm_head.weight` directly, so
    `FP32LMHead.forward` never runs inside a TRL loss. This drops the instance-level forward TRL patched in and
    patches again with `cast_lm_head_to_fp32=True` (TRL's own switch for exactly this), keeping the `outputs` the
    trainer asked for. No-op for any other head.
    """
    base = _base(model)
    if _has_fp32_head(base):
        base.__dict__.pop("forward", None)  # TRL's instance-level patch, if any
        add_fused_lm_head(base, cast_lm_head_to_fp32=True, outputs=outputs)


class MiniMaxSFTTrainer(ContextParallelTraining, SafeCheckpoints, SFTTrainer):
    """`SFTTrainer` with an assistant-only loss for any chat template, and a chunked LM-head loss that honours the
    FP32 LM head (MiniMax-M1 §3).

    - `assistant_only_loss=True`: a conversational dataset (`messages`, not yet tokenized), train or eval, is
      tokenized here by `alignment.tokenizer.assistant_tokens` into `input_ids` + `assistant_masks`; TRL then
      builds the labels from the mask, truncates or packs, as for any pre-tokenized dataset. TRL's own path needs
      `{% generation %}` markers in the template and otherwise swaps in one of the few templates it knows, which a
      released tokenizer's (MiniMax-Text-01's has no markers) is not. Errors name the row (its dataset index).
    - TRL computes the SFT loss with its own fused, chunked LM head that reads `lm_head.weight` directly, so our
      `FP32LMHead.forward` never runs there. When the model has an FP32 head, re-install TRL's fused head with
      `cast_lm_head_to_fp32=True` (TRL's own switch for exactly this) instead of the default.
    - `training.context_parallel` > 1: each training step's packed rows are split over the rank's
      context-parallel group (`alignment.context_parallel.ContextParallelTraining`).
    """

    def __init__(self, model, args=None, **kwargs):
        self.assistant_only_loss = args is not None and args.assistant_only_loss
        if self.assistant_only_loss:
            # TRL sees the flag off so that its template swap, marker checks and tokenization never run: the
            # datasets reach it already tokenized with `assistant_masks` (`_prepare_dataset` below)
            args = copy.copy(args)
            args.assistant_only_loss = False
        super().__init__(model, args, **kwargs)
        fp32_fused_lm_head(self.model, outputs=("log_probs", "entropy", "is_top1"))

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        if self.assistant_only_loss:
            dataset = _mark_assistant_tokens(dataset, processing_class, dataset_name, args.dataset_num_proc)
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)


def _mark_assistant_tokens(dataset, tokenizer, name: str, num_proc: int | None):
    """A conversational dataset (`messages` rows) as `input_ids` + `assistant_masks` columns
    (`alignment.tokenizer.assistant_tokens`); a row without any assistant token is an error naming it (its index
    in `dataset`). A dataset already tokenized with its mask (`assistant_masks` or `labels`) is returned as is."""
    columns = get_dataset_column_names(dataset)
    if "input_ids" in columns and {"assistant_masks", "labels"} & set(columns):
        return dataset
    if "messages" not in columns or "input_ids" in columns:  # else TRL would train on every token
        raise ValueError(f"assistant_only_loss needs a conversational {name} dataset (a 'messages' column) or a "
                         f"tokenized one with its mask (input_ids + assistant_masks or labels); got columns {columns}")

    def tokenize(row, index):
        where = f"{name} dataset row {index}"
        ids, mask = assistant_tokens(tokenizer, row["messages"], where)
        if 1 not in mask:
            raise ValueError(f"{where}: no assistant message, so nothing to train on")
        return {"input_ids": ids, "assistant_masks": mask}

    map_kwargs = {"num_proc": num_proc, "desc": f"Marking assistant tokens in the {name} dataset"} \
        if isinstance(dataset, Dataset) else {}  # IterableDataset.map takes neither
    with global_then_local_main_first():  # one process writes the datasets cache, the others read it
        return dataset.map(tokenize, with_indices=True, remove_columns=columns, **map_kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Offline DPO [01 §5.4.1]


class MiniMaxDPOTrainer(SafeCheckpoints, DPOTrainer):
    """`DPOTrainer` for MiniMax models: TRL's sigmoid DPO loss (or any TRL `loss_type`) unchanged, with

    - a reference model that is the stage's starting point, packing-safe, with the same FP32 LM head. TRL rebuilds
      a missing reference from `config._name_or_path`, which yields a stock transformers model (no document
      isolation, no FP32 head) and, for a model built in memory, nothing at all. So: pass `ref_model` (the DPO
      stage loads its starting checkpoint from disk with `alignment.modeling.load_model`); without one, a frozen
      copy of the policy as handed in is the reference, which is the same weights. A PEFT model needs no reference
      model: TRL scores the reference with a frozen copy of the starting adapter ("ref"; for a fresh adapter, B = 0,
      that is exactly the base model), or with adapters disabled when given `peft_config`.
    - or, with `precompute_ref_log_probs=True` and no `ref_model`, no reference model at all: the reference
      log-probs of every pair are computed once, before training, by the policy as handed in (= the starting
      checkpoint; under DeepSpeed TRL wraps it in one inference engine, so ZeRO-3 never holds a second sharded
      model), and read from the batch after that. TRL computes them inside its `__init__`, before the FP32 head
      below is installed; here they are computed after it, so both kinds of reference score with the same head.
      (Under FSDP TRL still builds a reference from `config._name_or_path` for the precompute; not used here.)
    - the FP32 LM head [M1 §3] honoured inside TRL's fused log-prob head, for the policy and the reference
      (`fp32_fused_lm_head`, shared with the SFT trainer);
    - conversational pairs tokenized here (`_tokenize_preferences`) so that a response's log-prob sums over the
      assistant's tokens only: TRL sums over everything after the prompt, which for a response holding tool turns
      (an assistant tool call, the tool's result, the assistant's answer) includes the tool's output. The ids are
      TRL's; for a response of one assistant turn the mask is TRL's too (every completion token);
    - crash-safe checkpoints whose resume restores every MoE weight (`SafeCheckpoints`).
    """

    def __init__(self, model, ref_model=None, args=None, **kwargs):
        precompute = args is not None and args.precompute_ref_log_probs
        if ref_model is None and not precompute and isinstance(model, torch.nn.Module) and not _is_peft(model):
            ref_model = copy.deepcopy(model)
        if ref_model is not None:
            make_packing_safe(ref_model).requires_grad_(False).eval()
        tokenizer = kwargs.get("processing_class")
        if kwargs.get("data_collator") is None and tokenizer is not None and args is not None:
            # TRL's collator, reading the assistant masks of `_tokenize_preferences` where rows have them
            kwargs["data_collator"] = PreferenceCollator(
                pad_token_id=tokenizer.pad_token_id, max_length=args.max_length,
                truncation_mode=args.truncation_mode, pad_to_multiple_of=args.pad_to_multiple_of)
            # what TRL does when it builds its own collator: the model agrees with the tokenizer on padding
            model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        self._defer_precompute = precompute  # see `_precompute_ref_logps`
        super().__init__(model, ref_model, args, **kwargs)
        outputs = ("log_probs", "entropy", "mean_logits", "is_top1") + (
            ("log_sum_sq_probs",) if self.use_weighting else ())
        fp32_fused_lm_head(self.model, outputs=outputs)  # TRL's own choice of outputs for the policy
        if self.ref_model is not None:
            fp32_fused_lm_head(self.accelerator.unwrap_model(self.ref_model), outputs=("log_probs",))
        if precompute:  # now with the FP32 head in place, as TRL's __init__ would have done
            self._defer_precompute = False
            size = self.args.precompute_ref_batch_size
            self.train_dataset = self._precompute_ref_logps(
                self.train_dataset, "train", size or self.args.per_device_train_batch_size)
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {name: self._precompute_ref_logps(
                    ds, name, size or self.args.per_device_eval_batch_size) for name, ds in self.eval_dataset.items()}
            elif self.eval_dataset is not None:
                self.eval_dataset = self._precompute_ref_logps(
                    self.eval_dataset, "eval", size or self.args.per_device_eval_batch_size)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # TRL calls this from its __init__, before `fp32_fused_lm_head` can run: skipped there, run after it
        if self._defer_precompute:
            return dataset
        if isinstance(dataset, Dataset) and not dataset.cache_files:
            return self._ref_logps_in_memory(dataset, name, batch_size)
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _ref_logps_in_memory(self, dataset, name, batch_size):
        """TRL's precompute for a dataset held in memory (the DPO stage's pairs are): TRL keeps the numbers in a
        cache file beside the dataset's files, written by the main process and read by every rank; an in-memory
        dataset has no files, so its cache path is a random name in a per-process temp directory that the other
        ranks never find. Here every rank gathers the numbers (as TRL's loop does) and adds them as columns; the
        same model choice and scoring as TRL's (`compute_ref_log_probs`), nothing cached across runs."""
        from torch.utils.data import DataLoader

        loader = self.accelerator.prepare(DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator,
                                                     shuffle=False))
        if self.ref_model is None and self.is_deepspeed_enabled:  # as TRL: one inference engine over the policy
            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            model = self._precompute_engine
        else:
            model = self.ref_model or self.model
        chosen, rejected = [], []
        for batch in loader:
            c, r = self.accelerator.gather_for_metrics(self.compute_ref_log_probs(model, batch))
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
        return dataset.add_column("ref_chosen_logps", torch.cat(chosen).tolist()).add_column(
            "ref_rejected_logps", torch.cat(rejected).tolist())

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        columns = get_dataset_column_names(dataset)
        if "prompt_ids" not in columns and is_conversational(next(iter(dataset))):
            return _tokenize_preferences(dataset, processing_class, dataset_name, args)
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _set_signature_columns_if_needed(self):
        first = self._signature_columns is None
        super()._set_signature_columns_if_needed()
        if first and "prompt_ids" in self._signature_columns:  # keep the masks for the collator
            self._signature_columns = self._signature_columns + ["chosen_mask", "rejected_mask"]


def _tokenize_preferences(dataset, tokenizer, name: str, args):
    """Conversational pairs (`prompt`, `chosen`, `rejected` message lists; a missing prompt is TRL's implicit one)
    as `prompt_ids`, `chosen_ids`, `rejected_ids` (TRL's: the chat template's ids, the completion starting where
    the prompt rendered with its generation prompt and prompt + response stop agreeing) plus `chosen_mask` /
    `rejected_mask`, 1 on the completion tokens DPO scores: TRL's completion less every token that is not the
    assistant's before its last assistant token (a tool's result, the headers around it); the whitespace after
    the last turn, which TRL scores, stays scored. Errors name the row (its dataset index)."""
    from trl.data_utils import common_prefix_length

    if "prompt" not in get_dataset_column_names(dataset):
        dataset = dataset.map(extract_prompt)

    def tokenize(row, index):
        where = f"{name} dataset row {index}"
        prompt = template_messages(row["prompt"])
        prompt_ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                                   return_dict=True)["input_ids"]
        sides = {side: assistant_tokens(tokenizer, prompt + template_messages(row[side]), where)
                 for side in ("chosen", "rejected")}
        n = min(common_prefix_length(prompt_ids, ids) for ids, _ in sides.values())
        out = {"prompt_ids": prompt_ids[:n]}
        for side, (ids, mask) in sides.items():
            marked = [i for i, m in enumerate(mask) if m and i >= n]
            if not marked:
                raise ValueError(f"{where}: {side} has no assistant token after the prompt; nothing to score")
            out[f"{side}_ids"] = ids[n:]
            out[f"{side}_mask"] = [int(m or i > marked[-1]) for i, m in enumerate(mask)][n:]
        return out

    map_kwargs = {"num_proc": args.dataset_num_proc, "desc": f"Tokenizing {name} dataset (assistant masks)"} \
        if isinstance(dataset, Dataset) else {}
    with global_then_local_main_first():
        dataset = dataset.map(tokenize, with_indices=True, **map_kwargs)
        if args.max_length is not None and args.truncation_mode == "keep_start":
            # as TRL: a prompt that fills max_length leaves no completion token to learn from
            dataset = dataset.filter(lambda row: len(row["prompt_ids"]) < args.max_length,
                                     **({"num_proc": args.dataset_num_proc} if isinstance(dataset, Dataset) else {}))
    return dataset


class PreferenceCollator(DataCollatorForPreference):
    """TRL's preference collator; rows with `chosen_mask` / `rejected_mask` (from `_tokenize_preferences`) get those
    as the completion mask, truncated and padded as TRL truncates and pads the ids, instead of "every token after
    the prompt"."""

    def torch_call(self, examples):
        out = super().torch_call(examples)
        if "chosen_mask" not in examples[0]:
            return out
        masks = [[0] * len(e["prompt_ids"]) + list(e[side]) for side in ("chosen_mask", "rejected_mask")
                 for e in examples]  # TRL's order: every chosen row, then every rejected row
        if self.max_length is not None:
            cut = slice(None, self.max_length) if self.truncation_mode == "keep_start" else slice(-self.max_length, None)
            masks = [m[cut] for m in masks]
        width = out["input_ids"].shape[1]
        out["completion_mask"] = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.long)
        return out


# ---------------------------------------------------------------------------------------------------------------
# Online RL: modified GRPO [01 §5.4.2] / CISPO [M1 §3]


@dataclass
class AdvantageOptions:
    # Group-normalised advantages (R − mean_g) / (std + 1e-4) with std over the `group`, the `batch`, or `none`.
    scale: Literal["group", "batch", "none"] = "group"
    # Change 3 [01 §5.4.2]: equal positive / negative totals per group (alignment.losses.balanced_advantages).
    balanced: bool = True


@dataclass
class DynamicSamplingOptions:
    # Drop groups whose rewards are all equal within `tolerance` (zero advantage: no gradient) [M1 §5] and refill the
    # batch from further prompts, at most `max_refills` extra generation rounds per batch; a batch still short
    # after that is topped up with dropped groups (zero advantage, so they only dilute) to keep its size.
    enabled: bool = True
    tolerance: float = 1e-6
    max_refills: int = 2


@dataclass
class RolloutCorrectionOptions:
    # Multiply each token's loss by the truncated importance weight min(π_train / π_rollout, cap) (TIS), correcting
    # for sampling with an engine whose probabilities differ from the trainer's (vLLM, lower precision). The
    # mismatch metrics are logged either way.
    importance_sampling: bool = False
    level: Literal["token", "sequence"] = "token"
    cap: float = 2.0


def grpo_trl_settings(loss: LossOptions, sampling: SamplingOptions) -> dict:
    """The `GRPOConfig` fields TRL needs from our loss and sampling options, and only those; the trainer refuses a
    config that disagrees with them on `beta` (as a switch) or `temperature`.

    What TRL still reads once `MiniMaxGRPOTrainer._compute_loss` (our loss) and `_round` (our advantages) replace
    its own (TRL 1.16, `grpo_trainer.py`):
    - `beta`: only as the switch "build a reference model (non-PEFT policy) and compute `ref_per_token_logps`"; its
      value never reaches a loss (ours takes `loss.beta`). Non-zero exactly when `loss.uses_kl`; set to `loss.beta`
      then so the saved training arguments tell the truth.
    - `temperature`: TRL's fused log-prob head divides the logits by it, for the policy, π_old and the reference; it
      must be the temperature the rollout worker samples at. `top_p`, `top_k`, `max_completion_length`: TRL's own
      generation path (used when the trainer has no rollout worker) and its completion-length bookkeeping.
    Left out on purpose: `epsilon`, `epsilon_high`, `loss_type`, `importance_sampling_level`, `delta`,
    `use_bias_correction_kl`: read only by TRL's `_compute_loss` and its clip metrics, which ours replaces (our
    clip range is `loss.epsilon_low/high`). `scale_rewards`: read only where TRL computes its advantages (replaced by
    `group_advantages` with `AdvantageOptions.scale`) and for its `frac_reward_zero_std` metric, which keeps TRL's
    default "group" meaning (share of groups with equal rewards).

    >>> grpo_trl_settings(LossOptions(kl="none", beta=0.04), SamplingOptions(temperature=0.8, max_new_tokens=16))
    {'beta': 0.0, 'temperature': 0.8, 'top_p': 1.0, 'top_k': 0, 'max_completion_length': 16}
    """
    return {"beta": loss.beta if loss.uses_kl else 0.0, "temperature": sampling.temperature, "top_p": sampling.top_p,
            "top_k": sampling.top_k, "max_completion_length": sampling.max_new_tokens}


@dataclass
class Round:
    """One generation + scoring round, as `MiniMaxGRPOTrainer._round` computes it and returns it.

    Every field covers the whole round, all processes' completions in TRL's order (a group of `group_size`
    consecutive completions can straddle processes; advantages are relative within it), except `batch`: TRL's
    scored batch of this process's rows, with `batch["advantages"]` this process's slice of `advantages`.

        rewards        (N,) Σ_f reward_weights[f] · reward_f per completion (NaN-skipping: unscored counts 0)
        advantages     (N,) group_advantages(rewards, group_size, AdvantageOptions.scale, .balanced)
        zero_variance  (N / group_size,) bool: zero_variance_groups(rewards, group_size, tolerance)
        lengths        N ints: completion tokens (the completion-mask sums, i.e. the tokens the loss sees)
        success        N floats from the trainer's `success_fn`, or None without one
        slots          N ints: each completion's `pool_slot` (with a `pool`), else None
    """

    batch: dict
    rewards: torch.Tensor
    advantages: torch.Tensor
    zero_variance: torch.Tensor
    lengths: list[int]
    success: list[float] | None
    group_size: int
    slots: list[int] | None = None

    @property
    def kept(self) -> torch.Tensor:
        """(n_groups,) bool: the groups with a learning signal (not zero-variance), which dynamic sampling keeps."""
        return ~self.zero_variance


class MiniMaxGRPOTrainer(SafeCheckpoints, GRPOTrainer):
    """`GRPOTrainer` with the MiniMax-01 / M1 online-RL changes, at TRL's own hooks:

    - `_generate_single_turn`: completions come from a rollout worker (`alignment.rollout`), with the engine's
      per-token log-probs and the repetition early stop [M1 §3]; weights are synced to it once per optimizer step.
    - `_generate_and_score_completions`: one explicit `Round` per generation (`_round`: TRL's generation + scoring,
      our rewards / advantages from `alignment.losses.group_advantages` (balanced advantages, change 3) /
      zero-variance groups / lengths / successes); then, on Round values, dynamic sampling (zero-variance groups
      dropped, the batch refilled from further prompts), the train-vs-rollout log-prob mismatch (optional
      importance-sampling correction), and the reward / success-rate / length-bias metrics.
    - `_compute_loss`: TRL's log-prob forward, then the named loss from `alignment.losses` (modified GRPO or CISPO).
    - router replay (`router_replay=True`, `rollout.router_replay`; needs a worker that records routes, e.g.
      `TransformersRollout(record_routes=True)`): the rollout's per-completion routes (which experts every MoE layer
      used at every prompt and completion position) ride in the batch as `prompt_routes` (B, P, L, K, left-padded
      like `prompt_ids`) and `completion_routes` (B, C, L, K, right-padded), -1 at padding, gathered / selected /
      re-padded with the other per-row tensors; the π_old pass and the loss's forward (and its gradient-checkpoint
      recompute) run under `alignment.routing.replay_routes`, so the trainer routes every token as the rollout did
      (gate weights still from the current router: it keeps its gradient). TRL's own π_old pass (generation and
      updates misaligned) routes by itself and is redone under replay; the KL reference routes by its own router
      (it is another model). Whenever the batch carries routes, `rollout/route_mismatch` is logged: the share of
      the rollout's (token, layer, k) routing decisions that the trainer's own routers, in the π_old pass, would
      not have made. Not in MiniMax-01 / M1: it targets the train/inference gap of M1 §3 for MoE routing.
    - timing: every optimizer step logs its wall time per phase (`time/rollout_s`, `time/sync_s`, `time/reward_s`,
      `time/ref_logprobs_s`, `time/old_logprobs_s`, `time/other_s`, `time/train_s`), its total `time/step_s`,
      `time/rollout_frac`, `time/tokens_per_s` and `rollout/generated_tokens` (`alignment.timing`), measured at the
      hooks that do the work (`_generate_single_turn`, `_sync_rollout`, `_calculate_rewards`, the no-grad
      `_get_per_token_logps_and_entropies`, `_prepare_inputs`) between the Trainer's `on_step_begin` and
      `on_step_end`. Across ranks the times are the max over ranks, the tokens their sum. The rollout worker's own
      clock (`rollout/seconds`, `rollout/tokens_per_s` of a generate call) is not logged: `time/*` is the one home.
      (TRL's own `step_time`, its time inside `training_step`, is logged as TRL logs it.)

    Arguments beyond TRL's: `loss`, `sampling` (what the rollout worker samples with; build the `GRPOConfig` from
    the same two through `grpo_trl_settings`), `rollout` (a worker; None: TRL's own generation), `advantages`,
    `dynamic_sampling`, `rollout_correction`, `length_monitor` (`update(step, rewards, lengths, success) -> dict`),
    `success_fn(rows, completions) -> list[float]` (one success in [0, 1] per completion; rows: the dataset rows;
    completions: as TRL gives them to reward functions, strings or, for conversational prompts, lists of messages,
    and plain strings for a pool refresh's measurement: the caller adapts them, e.g. with `rewards.completion_text`),
    `pool`: a live prompt pool (`data_recipes.prompt_pool.LivePool`'s interface: the dataset rows carry a
    `pool_slot`, the prompt rolled out is `pool.row(slot)`, each group's success is `observe`d, and at the steps
    `pool.due(step)` says `pool.refresh(measure)` swaps out-of-band prompts for re-measured ones, `measure` being
    k rollouts per row scored by `success_fn`, split over the ranks; its state is saved in every checkpoint as
    `pool_state.json` and restored on resume; `pool_k`: the k of that measurement), and `ref_model`: the KL reference when `loss.uses_kl`, a model from
    `alignment.modeling.load_model` (packing-safe, FP32 head). Given one, TRL loads none; without one, a full
    (non-PEFT) policy gets TRL's reference, rebuilt from `config._name_or_path` as a stock transformers model and
    then made packing-safe; a PEFT policy needs none (TRL scores the reference with the adapter disabled, or with a
    frozen copy of the starting adapter).

    Checkpoints go through `SafeCheckpoints` (staged then renamed; resume restores the MoE weights).

    Across ranks (DDP or DeepSpeed, one policy replica or shard per rank): TRL's sampler hands each rank a
    contiguous block of whole groups (`training.batch_size` is a multiple of G), so each rank rolls out its own
    prompts and every group stays on one rank; rewards are gathered, so advantages are computed over the whole
    round on every rank. Dynamic sampling decides on the gathered round (every rank takes the same decision, refills
    the same number of rounds, and steps together): the rounds' rows are gathered, the global batch is selected
    exactly as in one process, and each rank keeps its block of it. The logged metrics are global (token-weighted
    where they are token means), and `token_mean` losses are normalised by the global token count (TRL's own
    cispo/dapo normaliser), so N ranks with per-rank batch B/N compute what one process computes with batch B.
    `seed_groups=True` samples each group under its own seed (run seed, step, round, the group's index in the round)
    instead of one stream per rank, so the rollouts themselves do not depend on how the round is split across ranks
    or batched (the transformers backend: one generate call per group; slower on a GPU, for reproducibility).
    """

    def __init__(self, model, reward_funcs=None, args=None, *, loss: LossOptions, sampling: SamplingOptions,
                 rollout=None, advantages: AdvantageOptions | None = None,
                 dynamic_sampling: DynamicSamplingOptions | None = None,
                 rollout_correction: RolloutCorrectionOptions | None = None, length_monitor=None,
                 success_fn=None, ref_model=None, seed_groups: bool = False, pool=None, pool_k: int = 8,
                 router_replay: bool = False, **kwargs):
        if router_replay and rollout is None:
            raise ValueError("router_replay replays the rollout worker's routes: give a rollout worker that records "
                             "them (TransformersRollout(record_routes=True)); TRL's own generation records none")
        if pool is not None and (success_fn is None or rollout is None):
            raise ValueError("a live prompt pool measures success through the rollout worker: give success_fn and "
                             "rollout too")
        trl_beta = 0.0 if args is None else args.beta  # TRL's default GRPOConfig has beta 0
        if (trl_beta != 0) != loss.uses_kl:
            raise ValueError(f"GRPOConfig.beta = {trl_beta} disagrees with the loss (uses_kl = {loss.uses_kl}): TRL "
                             "builds the reference and its log-probs iff beta != 0; build the config with "
                             "alignment.trainers.grpo_trl_settings(loss, sampling)")
        if args is not None and args.temperature != sampling.temperature:
            raise ValueError(f"GRPOConfig.temperature = {args.temperature} but sampling.temperature = "
                             f"{sampling.temperature}: TRL's log-probs divide by the former, the rollouts sample at "
                             "the latter; use grpo_trl_settings(loss, sampling)")
        if ref_model is not None:
            if not loss.uses_kl:
                raise ValueError("ref_model is only used by a KL term; pass it only when loss.uses_kl")
            if _is_peft(model) or kwargs.get("peft_config") is not None:
                raise ValueError("a PEFT policy needs no ref_model: TRL scores the reference with the adapter "
                                 "disabled (or a frozen copy of the starting adapter)")
            if ref_model is model:
                raise ValueError("ref_model must be a separate copy of the policy, not the policy itself")
            if args.sync_ref_model:
                raise NotImplementedError("sync_ref_model with a given ref_model is not supported")
            # TRL loads a reference in its __init__ iff beta != 0 (and the policy is not PEFT), and beta is read
            # nowhere else during __init__ (sync_ref_model is refused above): hide it for that call only, then put
            # the given reference where TRL keeps its own and prepare it the way TRL prepares its own.
            args.beta = 0.0
        try:
            super().__init__(model, reward_funcs, args, **kwargs)
        finally:
            if ref_model is not None:
                args.beta = trl_beta
        if ref_model is not None:
            self.beta = trl_beta  # TRL's switch for the reference log-probs in _generate_and_score_completions
            self.ref_model = self._prepare_ref_model(ref_model)
        elif self.ref_model is not None:  # TRL rebuilt it from the checkpoint as a stock model
            make_packing_safe(self.ref_model)
        if len(set(self.reward_func_names)) != len(self.reward_func_names):
            raise ValueError(f"reward functions need distinct names (TRL records rewards per name), got "
                             f"{self.reward_func_names}")
        self.loss_opts, self.sampling, self.rollout = loss, sampling, rollout
        self.adv_opts = advantages or AdvantageOptions()
        self.dynamic = dynamic_sampling or DynamicSamplingOptions(enabled=False)
        self.correction = rollout_correction or RolloutCorrectionOptions()
        self.length_monitor, self.success_fn = length_monitor, success_fn
        self.seed_groups, self.pool, self.pool_k = seed_groups, pool, pool_k
        self.router_replay = router_replay
        # the routes of the generation in progress: TRL's `_generate_and_score_completions` builds the batch from
        # what `_generate_single_turn` returns (ids, log-probs) and has no slot for more per-completion data, so
        # `_round` takes them from here right after that call
        self._pending_routes = None
        self._synced_step = None
        self._round_key = None  # (mode, step, round within the step): names a round for seed_groups and refills
        self._clock = StepClock(cuda=self.accelerator.device.type == "cuda")
        self.add_callback(_StepTimes(self))

    def _prepare_ref_model(self, ref_model):
        """What TRL's __init__ does to the reference it loads, done to the given one: dropout off (if asked), the
        fused log-prob head at the training temperature, then DeepSpeed / FSDP / accelerate preparation for
        evaluation. TRL's `cast_lm_head_to_fp32` also stores the head's weight in fp32; not needed here: the fused
        head computes in fp32 with that flag whatever the weight's dtype, and `load_model`'s FP32 head is fp32."""
        make_packing_safe(ref_model).requires_grad_(False).eval()
        if self.args.disable_dropout:
            disable_dropout_in_model(ref_model)
        add_fused_lm_head(ref_model, temperature=self.temperature,
                          cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(ref_model, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(ref_model, self.accelerator)
        return self.accelerator.prepare_model(ref_model, evaluation_mode=True)

    # -- generation --------------------------------------------------------------------------------------------

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if self.rollout is None:
            with self._clock.phase("rollout"):
                completion_ids, logprobs = super()._generate_single_turn(prompt_ids, images, multimodal_fields,
                                                                         num_generations, has_tool_images)
            self._clock.count_tokens(sum(map(len, completion_ids)))
            return completion_ids, logprobs
        self._sync_rollout()  # timed as `sync`, before the rollout's clock starts
        # TRL's sampler repeats each prompt `num_generations` times in a row: generate each group with n = G
        n = num_generations
        grouped = len(prompt_ids) % n == 0 and all(
            prompt_ids[i] == prompt_ids[i - i % n] for i in range(len(prompt_ids)))
        unique = prompt_ids[::n] if grouped else prompt_ids
        with self._clock.phase("rollout"):
            if not self.seed_groups:
                batches = [self.rollout.generate([list(p) for p in unique], n=n if grouped else 1,
                                                 sampling=self.sampling)]
            else:
                if not grouped:
                    raise ValueError("seed_groups needs TRL's grouped prompts (each prompt repeated num_generations "
                                     "times)")
                first = self.accelerator.process_index * len(unique)  # this rank's block of the round's groups
                batches = [self._seeded(first + j, lambda p=p: self.rollout.generate([list(p)], n=n,
                                                                                      sampling=self.sampling))
                           for j, p in enumerate(unique)]
        completion_ids = [c for b in batches for c in b.completion_ids]
        self._clock.count_tokens(sum(map(len, completion_ids)))
        mode = "train" if self.model.training else "eval"
        # the rollout's own metrics (stop reasons) averaged over this rank's calls, then over the ranks; not its
        # clock (`_WORKER_CLOCK`): the step's timing is the `time/*` metrics
        local = {key: sum(b.metrics[key] for b in batches) / len(batches) for key in batches[0].metrics
                 if key not in _WORKER_CLOCK}
        for key, value in _mean_over_ranks(local).items():
            self._metrics[mode][key].append(value)
        recorded = all(b.routes is not None for b in batches)
        self._pending_routes = [r for b in batches for r in b.routes] if recorded else None
        return completion_ids, [lp for b in batches for lp in b.logprobs]

    def _seeded(self, group: int, generate):
        """`generate()` under a seed of its own for the round's `group`-th group (`seed_groups`), leaving the global
        RNG streams as they were."""
        mode, step, i = self._round_key
        seed = zlib.crc32(f"{self.args.seed}:{mode}:{step}:{i}:{group}".encode())
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return generate()

    # -- one round: rewards, advantages, zero-variance groups -------------------------------------------------

    def _round(self, inputs: list[dict]) -> Round:
        """One TRL generation + scoring round (`GRPOTrainer._generate_and_score_completions`), with our rewards,
        advantages, zero-variance groups, lengths and successes, returned as a `Round`.

        Where the rewards come from: TRL's output holds only its own advantages (not invertible to rewards), and
        `_calculate_rewards` runs deep inside that call. TRL records every round's per-function rewards, gathered
        over processes (exactly the `rewards_per_func` its `_calculate_rewards` returned), and its completions in
        `self._logs`, whatever `log_completions` says; the last N entries, read right after the call, are this
        round's. So `_calculate_rewards` stays TRL's, and nothing of ours is stashed between hooks. The weighted
        sum is TRL's own (`reward_weights`, NaN-skipping).
        """
        mode = "train" if self.model.training else "eval"
        G = self.num_generations if mode == "train" else self.num_generations_eval
        if self.pool is not None:  # the slot's prompt now (a refresh may have replaced the one the sampler read)
            inputs = [self.pool.row(row["pool_slot"]) if "pool_slot" in row else row for row in inputs]
        key = (mode, self.state.global_step)
        self._round_key = (*key, self._round_key[2] + 1 if self._round_key and self._round_key[:2] == key else 0)
        self._pending_routes = None
        batch = super()._generate_and_score_completions(inputs)
        routes, self._pending_routes = self._pending_routes, None
        if routes is not None:  # into TRL's layout, beside prompt_ids / completion_ids
            batch["prompt_routes"], batch["completion_routes"] = (t.to(batch["prompt_ids"].device) for t in
                layout_routes(routes, batch["prompt_mask"].sum(1).tolist(), batch["prompt_ids"].size(1),
                              batch["completion_ids"].size(1)))
        n_local = len(inputs)
        n = n_local * self.accelerator.num_processes
        recorded = [self._logs["rewards"][name] for name in self.reward_func_names] + [self._logs["completion"]]
        if any(len(r) < n for r in recorded):
            raise RuntimeError(f"TRL kept fewer than the round's {n} completions in its records (their length is the "
                               f"generation batch, {self.args.generation_batch_size}); rounds larger than the "
                               "generation batch (e.g. a larger eval batch) are not supported")
        per_func = torch.tensor([list(r)[-n:] for r in recorded[:-1]], dtype=torch.float32).T  # (N, F)
        completions = list(recorded[-1])[-n:]
        rewards = (per_func * self.reward_weights.cpu()).nansum(dim=1)
        advantages = group_advantages(rewards, G, self.adv_opts.scale, self.adv_opts.balanced)
        local = slice(self.accelerator.process_index * n_local, (self.accelerator.process_index + 1) * n_local)
        batch["advantages"] = advantages[local].to(batch["advantages"].device)
        lengths = self.accelerator.gather(batch["completion_mask"].sum(1)).tolist()
        success = slots = None
        if self.success_fn is not None:
            with self._clock.phase("reward"):
                mine = [float(s) for s in self.success_fn(inputs, completions[local])]
            success = gather_object(mine)
        if self.pool is not None:
            slots = gather_object([row.get("pool_slot", -1) for row in inputs])
        return Round(batch=batch, rewards=rewards, advantages=advantages,
                     zero_variance=zero_variance_groups(rewards, G, self.dynamic.tolerance), lengths=lengths,
                     success=success, group_size=G, slots=slots)

    def _generate_and_score_completions(self, inputs):
        mode = "train" if self.model.training else "eval"
        if mode == "train" and self.pool is not None and self.pool.due(self.state.global_step):
            for key, value in self.pool.refresh(self._measure, self.state.global_step).items():
                self._metrics[mode][key].append(value)
        first = self._round(inputs)
        batch, rounds = first.batch, [first]
        if mode == "train" and self.dynamic.enabled:
            batch, rounds = self._dynamic_sampling(first)
        batch = self._rollout_correction(batch, mode)
        self._log_round_metrics(rounds, mode)
        return batch

    def _dynamic_sampling(self, first: Round) -> tuple[dict, list[Round]]:
        """Keep `first`'s informative groups and refill from further prompts (more rounds) until the batch is full
        or `max_refills` is spent. Returns this rank's block of the batch (first's size) and every round generated
        for it.

        The decisions read the rounds' gathered rewards, so every rank takes them alike; each refill round is rolled
        out like the first (each rank its block of the refill prompts); the selection runs on the rounds' rows
        gathered from every rank, so the global batch is the one a single process would select (the kept groups of
        all rounds in order, then zero-variance fill), and each rank keeps its block of it."""
        G, target = first.group_size, len(first.zero_variance)
        rounds = [first]
        n_kept = int(first.kept.sum())
        while n_kept < target and len(rounds) - 1 < self.dynamic.max_refills:
            rounds.append(self._round(self._refill_inputs(target, G, refill=len(rounds))))
            n_kept += int(rounds[-1].kept.sum())
        n_generated, refills = sum(len(r.zero_variance) for r in rounds), len(rounds) - 1
        pad_id = self._tokenizer.pad_token_id
        gathered = [self._gather_rows(r.batch, pad_id) for r in rounds]
        # kept groups first; dropped ones (zero advantage) only fill a batch still short after the refills
        parts = [_select_groups(b, r.kept, G) for b, r in zip(gathered, rounds)]
        parts += [_select_groups(b, r.zero_variance, G) for b, r in zip(gathered, rounds)]
        merged = _concat_batches([b for b in parts if b is not None], pad_id)
        m = self._metrics["train"]
        m["dynamic/kept_frac"].append(n_kept / n_generated)  # of all groups generated for this batch
        m["dynamic/dropped_frac"].append(1 - n_kept / n_generated)
        m["dynamic/zero_var_fill_frac"].append(max(target - n_kept, 0) / target)  # of the final batch
        m["dynamic/refills"].append(float(refills))
        batch = _select_rows(merged, torch.arange(target * G))
        n_local = len(first.batch["completion_ids"])
        rank = self.accelerator.process_index
        local = _select_rows(batch, torch.arange(rank * n_local, (rank + 1) * n_local))
        local["num_items_in_batch"] = batch["num_items_in_batch"]  # TRL's meaning: the whole generation batch
        return local, rounds

    def _refill_inputs(self, n_prompts: int, G: int, refill: int) -> list[dict]:
        """This rank's block of a refill round: `n_prompts` further training prompts, each repeated G times, drawn
        without replacement under a seed of the run seed, the step and the refill number. A function of the step
        (not a stream), so a resumed run refills with the prompts the uninterrupted run used, and every rank
        draws the same global list."""
        rng = random.Random(f"{self.args.seed + 1}:{self.state.global_step}:{refill}")
        picked = rng.sample(range(len(self.train_dataset)), min(n_prompts, len(self.train_dataset)))
        picked += [rng.randrange(len(self.train_dataset)) for _ in range(n_prompts - len(picked))]
        rows = [dict(self.train_dataset[i]) for i in picked for _ in range(G)]
        n_local = len(rows) // self.accelerator.num_processes
        rank = self.accelerator.process_index
        return rows[rank * n_local:(rank + 1) * n_local]

    def _gather_rows(self, batch: dict, pad_id: int) -> dict:
        """A scored batch with every rank's rows, in rank order (a round's global order): per-row tensors padded to
        one width across ranks (prompts on the left, completions on the right), then gathered; scalars and
        `None` entries (e.g. no reference log-probs) are left as they are."""
        if self.accelerator.num_processes == 1:
            return batch
        out = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                if value.dim() >= 2:
                    value = self.accelerator.pad_across_processes(
                        value, dim=1, pad_index=_pad_value(key, pad_id), pad_first=key in _LEFT_PADDED)
                if value.dtype == torch.int16:  # routes: gloo gathers no int16
                    value = self.accelerator.gather(value.int()).to(torch.int16)
                else:
                    value = self.accelerator.gather(value)
            out[key] = value
        return out

    def _rollout_correction(self, batch: dict, mode: str) -> dict:
        """Log train-vs-rollout log-prob mismatch (and, with routes, routing mismatch); optionally attach truncated
        IS weights for the loss."""
        rollout_logp = batch.get("sampling_per_token_logps")
        if rollout_logp is None:
            return batch
        routes = _batch_routes(batch)
        if self.router_replay and routes is None:
            raise RuntimeError("router_replay is on but the rollout worker returned no routes (RolloutBatch.routes "
                               "is None): build it with record_routes=True (the vLLM worker records none yet)")
        old = batch.get("old_per_token_logps")
        # π_old = the current model at rollout time (no update yet): one no-grad forward, under the rollout's routes
        # when replaying (TRL's own π_old pass, when it ran, routed by the model's own top-k: redone)
        if old is None or self.router_replay:
            old, own = self._old_logps(batch, routes)
            batch["old_per_token_logps"] = old
            if own is not None:
                counts = torch.stack(route_mismatch(routes, own)).float()[None]
                total = self.accelerator.gather(counts)  # (ranks, 2): differing, decisions
                self._metrics[mode]["rollout/route_mismatch"].append(
                    float(total[:, 0].sum() / total[:, 1].sum().clamp(min=1.0)))
        mask = batch["completion_mask"]
        # the metrics over every rank's rows (correlations do not average over ranks)
        every = self._gather_rows({"old": old, "rollout": rollout_logp, "mask": mask}, 0)
        for key, value in logprob_mismatch(every["old"], every["rollout"], every["mask"]).items():
            self._metrics[mode][key].append(value)
        if self.correction.importance_sampling:
            weights = importance_weights(old, rollout_logp, mask, self.correction.level, self.correction.cap)
            batch["importance_sampling_ratio"] = weights
            total = self.accelerator.gather(torch.stack([(weights * mask).sum(), mask.sum()]).float()[None])
            self._metrics[mode]["mismatch/is_weight_mean"].append(float(total[:, 0].sum() / total[:, 1].sum()))
        return batch

    def _old_logps(self, batch: dict, routes: torch.Tensor | None):
        """π_old's (B, C) log-probs of the batch's completions (no grad, in chunks of the per-device batch), under
        `routes` (B, P + C, L, K) when replaying, and the (B, P + C, L, K) experts the model's own routers chose
        meanwhile (None without routes)."""
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        size = self.args.per_device_train_batch_size
        logps, own = [], []
        for start in range(0, input_ids.size(0), size):
            rows = slice(start, start + size)
            if routes is None:
                routing = nullcontext()
            else:
                routing = replay_routes(self.model, routes[rows]) if self.router_replay else record_routes(self.model)
            with torch.no_grad(), routing as log:
                logp, _, _ = self._get_per_token_logps_and_entropies(
                    self.model, input_ids[rows], attention[rows], batch["completion_ids"].size(1), batch_size=size)
            logps.append(logp)
            if log is not None:
                own.append(log.routes(logp.size(0)))
        return torch.cat(logps), torch.cat(own) if own else None

    def _log_round_metrics(self, rounds: list[Round], mode: str) -> None:
        """Success rate and the length-bias monitor over every completion generated for this batch (dropped
        groups and refills included: they describe the policy's samples, not the filtered batch)."""
        rewards = torch.cat([r.rewards for r in rounds]).tolist()
        lengths = [n for r in rounds for n in r.lengths]
        success = None
        if all(r.success is not None for r in rounds):
            success = [s for r in rounds for s in r.success]
            self._metrics[mode]["success_rate"].append(sum(success) / max(len(success), 1))
        if self.length_monitor is not None and mode == "train":
            for key, value in self.length_monitor.update(self.state.global_step, rewards, lengths, success).items():
                self._metrics[mode][key].append(value)
        if self.pool is not None and mode == "train" and success is not None:
            for r in rounds:
                if r.slots is not None and min(r.slots) >= 0:
                    self.pool.observe(r.slots, r.success, r.group_size)
            for key, value in self.pool.distribution().items():  # the pool's rate distribution, every step
                self._metrics[mode][key].append(value)

    # -- the live prompt pool ----------------------------------------------------------------------------------

    def _sync_rollout(self) -> None:
        if self._synced_step != self.state.global_step:
            with self._clock.phase("sync"):
                self.rollout.sync_weights(self.accelerator.unwrap_model(self.model))
            self._synced_step = self.state.global_step

    def _measure(self, rows: list[dict]) -> list[float]:
        """Pass rate of each row's prompt under the current policy: `pool_k` rollouts each, scored by `success_fn`.
        Each rank measures its contiguous block of the rows; the rates are gathered in rank order, so every rank
        returns the same list."""
        k, ranks, rank = self.pool_k, self.accelerator.num_processes, self.accelerator.process_index
        per = -(-len(rows) // ranks)
        mine = rows[rank * per:(rank + 1) * per]
        rates = []
        # every rank syncs, rows or not: under ZeRO-3 the sync gathers partitions, a collective all ranks join
        self._sync_rollout()
        if mine:
            was_training = self.model.training
            self.model.eval()
            try:
                with self._clock.phase("rollout"):
                    batch = self.rollout.generate([row["prompt"] for row in mine], n=k, sampling=self.sampling)
            finally:
                self.model.train(was_training)
            self._clock.count_tokens(sum(map(len, batch.completion_ids)))
            with self._clock.phase("reward"):
                scores = self.success_fn([row for row in mine for _ in range(k)], batch.texts)
            rates = [sum(map(float, scores[i * k:(i + 1) * k])) / k for i in range(len(mine))]
        return gather_object(rates)

    def _save_rng_state(self, output_dir):
        super()._save_rng_state(output_dir)
        if self.pool is not None and self.args.should_save:  # into the staged checkpoint, with the RNG states
            self.pool.save(os.path.join(output_dir, "pool_state.json"))

    def _load_rng_state(self, checkpoint):
        super()._load_rng_state(checkpoint)
        if self.pool is not None and checkpoint is not None and os.path.isfile(os.path.join(checkpoint,
                                                                                            "pool_state.json")):
            self.pool.load(os.path.join(checkpoint, "pool_state.json"))

    # -- step timing (alignment.timing): each hook's work in its phase ------------------------------------------

    def _prepare_inputs(self, generation_batch):
        # what the phases inside it (rollout, sync, reward, log-probs) leave of building the batch is `other`
        with self._clock.phase("other"):
            return super()._prepare_inputs(generation_batch)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        with self._clock.phase("reward"):
            return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        if torch.is_grad_enabled():  # the loss's own forward: part of `train`
            return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        with self._clock.phase("ref_logprobs" if self._scores_reference(model) else "old_logprobs"):
            return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)

    def _scores_reference(self, model) -> bool:
        """Whether a no-grad forward of `model` scores the KL reference: the reference model itself, or (LoRA) the
        policy inside TRL's `use_adapter`, which disables the adapter (peft's `disable_adapter` sets
        `_adapters_disabled`; no public flag) or activates the frozen starting adapter "ref"."""
        if self.ref_model is not None and model is self.ref_model:
            return True
        policy = self.accelerator.unwrap_model(model)
        return _is_peft(policy) and (getattr(policy, "_adapters_disabled", False) or policy.active_adapter == "ref")

    # -- loss --------------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        routes = _batch_routes(inputs) if self.router_replay else None
        # the rollout's experts for every position (the backward's checkpoint recompute gets them too)
        with nullcontext() if routes is None else replay_routes(model, routes, log_own=False):
            logp, entropy, aux_loss = self._get_per_token_logps_and_entropies(
                model, input_ids, attention, completion_ids.size(1), compute_entropy=True,
                compute_aux_loss=self.aux_loss_enabled)  # (B, T) each
        mask = inputs["completion_mask"].to(logp.dtype)
        old_logp = inputs.get("old_per_token_logps")
        old_logp = logp.detach() if old_logp is None else old_logp
        loss, metrics = policy_loss(logp, old_logp, inputs["advantages"], mask, self.loss_opts,
                                    ref_logp=inputs.get("ref_per_token_logps"),
                                    is_weight=inputs.get("importance_sampling_ratio"))
        mode = "train" if self.model.training else "eval"
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        tokens = mask.sum()
        entropy_mean = (entropy.detach() * mask).sum() / tokens.clamp(min=1.0)
        token_means = {"entropy": float(entropy_mean), **metrics}  # every metric of policy_loss is a masked mean
        # (B, T) token counts behind this rank's loss: the mask, less the tokens change 1 dropped (out of the
        # normaliser too; their share is the `dropped` metric); one vector gathered for every cross-rank sum below
        kept = tokens - torch.round(tokens * metrics.get("dropped", 0.0))
        local = torch.tensor([[float(loss.detach()), float(tokens), float(kept), float(aux_loss.detach()) if
                               self.aux_loss_enabled else 0.0, *token_means.values()]], device=loss.device)
        every = self.accelerator.gather(local)  # (ranks, 4 + metrics)
        world = every.size(0)
        if self.loss_opts.aggregation == "token_mean" and world > 1:
            # Σ over this rank's tokens / the global count (x ranks: DDP averages the ranks' gradients): the
            # gradient of one process's Σ / count over the same rows, as TRL's own cispo/dapo normaliser does
            scale = kept * world / every[:, 2].sum().clamp(min=1.0)
            loss = loss * scale
            policy_value = float((every[:, 0] * every[:, 2]).sum() / every[:, 2].sum().clamp(min=1.0))
        else:  # sequence_mean: every rank holds as many rows, so the mean of the ranks' means is the global one
            policy_value = float(every[:, 0].mean())
        self._metrics[mode]["policy_loss"].append(policy_value)
        loss = loss / accum
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accum
            self._metrics[mode]["aux_loss"].append(float(every[:, 3].mean()))
        weights = every[:, 1] / every[:, 1].sum().clamp(min=1.0)  # token means weighted by each rank's tokens
        for i, key in enumerate(token_means):
            self._metrics[mode][key].append(float((every[:, 4 + i] * weights).sum()))
        return loss


def _select_rows(batch: dict, idx: torch.Tensor) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            out[key] = value[idx.to(value.device)]
        else:
            out[key] = value
    mask = out["completion_mask"]
    out["num_items_in_batch"] = mask.sum()
    return out


def _select_groups(batch: dict, group_keep: torch.Tensor, G: int) -> dict | None:
    rows = torch.nonzero(group_keep.repeat_interleave(G)).flatten()
    return _select_rows(batch, rows) if len(rows) else None


# per-row tensors and how to pad them when batches of different widths are concatenated
_LEFT_PADDED = {"prompt_ids", "prompt_mask", "prompt_routes"}


def _pad_value(key: str, pad_id: int) -> int:
    """The fill for a per-row tensor widened to a common width: the pad token for ids, -1 (route by the model's own
    top-k) for routes, else 0 (masks, log-probs)."""
    if key in ("prompt_ids", "completion_ids"):
        return pad_id
    return -1 if key in ("prompt_routes", "completion_routes") else 0


def _batch_routes(batch: dict) -> torch.Tensor | None:
    """The rollout's (B, P + C, L, K) routes of a batch's prompt + completion rows, or None (none recorded)."""
    if batch.get("prompt_routes") is None:
        return None
    return torch.cat([batch["prompt_routes"], batch["completion_routes"]], dim=1)


def _concat_batches(batches: list[dict], pad_id: int) -> dict:
    """Concatenate scored rollout batches row-wise, re-padding prompts on the left and completions on the right."""
    out = {}
    for key, first in batches[0].items():
        if not isinstance(first, torch.Tensor) or first.dim() == 0:
            out[key] = first
            continue
        parts = [b[key] for b in batches]
        if first.dim() >= 2:
            width = max(p.size(1) for p in parts)
            fill = _pad_value(key, pad_id)
            padded = []
            for p in parts:
                extra = p.new_full((p.size(0), width - p.size(1), *p.shape[2:]), fill)
                padded.append(torch.cat([extra, p] if key in _LEFT_PADDED else [p, extra], dim=1))
            parts = padded
        out[key] = torch.cat(parts, dim=0)
    out["num_items_in_batch"] = out["completion_mask"].sum()
    return out


# a rollout worker's timing of its own generate call (the vLLM backend's): left out of the logs, which time the
# step's phases instead (`time/*`)
_WORKER_CLOCK = ("rollout/seconds", "rollout/tokens_per_s")


class _StepTimes(TrainerCallback):
    """Opens the trainer's `StepClock` when an optimizer step begins and, when it ends (before the Trainer logs),
    appends the step's `time/*` metrics (`alignment.timing.step_metrics`) over every rank."""

    def __init__(self, trainer: MiniMaxGRPOTrainer):
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer._clock.begin()

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        for key, value in step_metrics(_step_times_over_ranks(t.accelerator, t._clock.end())).items():
            t._metrics["train"][key].append(value)


def _step_times_over_ranks(accelerator, times: dict[str, float]) -> dict[str, float]:
    """One step's clock over every rank: each time the max over ranks (the step lasts as long as its slowest rank),
    the generated tokens summed. Every rank's clock has the same keys in the same order."""
    keys = list(times)
    local = torch.tensor([[float(times[k]) for k in keys]], dtype=torch.float64, device=accelerator.device)
    every = accelerator.gather(local)  # (ranks, keys)
    return {k: float(every[:, i].sum() if k == "tokens" else every[:, i].max()) for i, k in enumerate(keys)}


def _mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each key's mean over the ranks that report it (`gather_object`: ranks may report different keys)."""
    every = gather_object([values])
    keys = sorted({k for v in every for k in v})
    return {k: sum(v[k] for v in every if k in v) / sum(k in v for v in every) for k in keys}
