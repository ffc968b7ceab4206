"""Narrow TRL trainer subclasses: only what the MiniMax recipe changes."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from trl import DPOTrainer, GRPOTrainer, SFTTrainer
from trl.trainer.utils import add_fused_lm_head

from alignment.checkpointing import SafeCheckpoints
from alignment.losses import LossOptions, group_advantages, policy_loss, zero_variance_groups
from alignment.modeling import FP32LMHead, make_packing_safe
from alignment.rollout.base import importance_weights, logprob_mismatch
from rewards.base import completion_text


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


class MiniMaxSFTTrainer(SafeCheckpoints, SFTTrainer):
    """`SFTTrainer` whose chunked LM-head loss honours the FP32 LM head (MiniMax-M1 §3).

    TRL computes the SFT loss with its own fused, chunked LM head that reads `lm_head.weight` directly, so our
    `FP32LMHead.forward` never runs there. When the model has an FP32 head, re-install TRL's fused head with
    `cast_lm_head_to_fp32=True` (TRL's own switch for exactly this) instead of the default.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        fp32_fused_lm_head(self.model, outputs=("log_probs", "entropy", "is_top1"))


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
    - the FP32 LM head [M1 §3] honoured inside TRL's fused log-prob head, for the policy and the reference
      (`fp32_fused_lm_head`, shared with the SFT trainer);
    - crash-safe checkpoints whose resume restores every MoE weight (`SafeCheckpoints`).
    """

    def __init__(self, model, ref_model=None, args=None, **kwargs):
        if args is not None and args.precompute_ref_log_probs and _has_fp32_head(model):
            # TRL precomputes inside its __init__, before the FP32 head can be re-installed
            raise ValueError("precompute_ref_log_probs is not supported with an FP32 LM head; leave it off")
        if ref_model is None and isinstance(model, torch.nn.Module) and not _is_peft(model):
            ref_model = copy.deepcopy(model)
        if ref_model is not None:
            make_packing_safe(ref_model).requires_grad_(False).eval()
        super().__init__(model, ref_model, args, **kwargs)
        outputs = ("log_probs", "entropy", "mean_logits", "is_top1") + (
            ("log_sum_sq_probs",) if self.use_weighting else ())
        fp32_fused_lm_head(self.model, outputs=outputs)  # TRL's own choice of outputs for the policy
        if self.ref_model is not None:
            fp32_fused_lm_head(self.accelerator.unwrap_model(self.ref_model), outputs=("log_probs",))


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


class MiniMaxGRPOTrainer(SafeCheckpoints, GRPOTrainer):
    """`GRPOTrainer` with the MiniMax-01 / M1 online-RL changes, at TRL's own hooks:

    - `_generate_single_turn`: completions come from a rollout worker (`alignment.rollout`), with the engine's
      per-token log-probs and the repetition early stop [M1 §3]; weights are synced to it once per optimizer step.
    - `_calculate_rewards` / `_generate_and_score_completions`: advantages recomputed by
      `alignment.losses.group_advantages` (balanced advantages, change 3); zero-variance groups dropped and the
      batch refilled from further prompts (dynamic sampling); train-vs-rollout log-prob mismatch logged, with
      optional importance-sampling correction; reward, success rate and the length-bias monitor logged.
    - `_compute_loss`: TRL's log-prob forward, then the named loss from `alignment.losses` (modified GRPO or CISPO).

    Checkpoints go through `SafeCheckpoints` (staged then renamed; resume restores the MoE weights).
    Multi-process runs are refused when dynamic sampling is on (groups would have to be re-balanced across ranks).
    """

    def __init__(self, *args, loss: LossOptions, sampling, rollout=None, advantages: AdvantageOptions | None = None,
                 dynamic_sampling: DynamicSamplingOptions | None = None,
                 rollout_correction: RolloutCorrectionOptions | None = None, length_monitor=None,
                 success_fn=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_opts, self.sampling, self.rollout = loss, sampling, rollout
        self.adv_opts = advantages or AdvantageOptions()
        self.dynamic = dynamic_sampling or DynamicSamplingOptions(enabled=False)
        self.correction = rollout_correction or RolloutCorrectionOptions()
        self.length_monitor, self.success_fn = length_monitor, success_fn
        if self.dynamic.enabled and self.accelerator.num_processes > 1:
            raise NotImplementedError("dynamic sampling is single-process for now; set dynamic_sampling.enabled: "
                                      "false for multi-GPU runs")
        if loss.beta > 0 and loss.kl != "none" and self.beta == 0:
            raise ValueError("loss.beta > 0 needs GRPOConfig.beta > 0 too (TRL then builds the reference model)")
        if self.ref_model is not None:  # TRL rebuilds it from the checkpoint as a stock model
            make_packing_safe(self.ref_model)
        self._synced_step = None
        self._refill_iter = None
        self._round_log: list[dict] = []

    # -- generation --------------------------------------------------------------------------------------------

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if self.rollout is None:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        if self._synced_step != self.state.global_step:
            self.rollout.sync_weights(self.accelerator.unwrap_model(self.model))
            self._synced_step = self.state.global_step
        # TRL's sampler repeats each prompt `num_generations` times in a row: generate each group with n = G
        n = num_generations
        grouped = len(prompt_ids) % n == 0 and all(
            prompt_ids[i] == prompt_ids[i - i % n] for i in range(len(prompt_ids)))
        unique = prompt_ids[::n] if grouped else prompt_ids
        batch = self.rollout.generate([list(p) for p in unique], n=n if grouped else 1, sampling=self.sampling)
        mode = "train" if self.model.training else "eval"
        for key, value in batch.metrics.items():
            self._metrics[mode][key].append(value)
        return batch.completion_ids, batch.logprobs

    # -- rewards, advantages, dynamic sampling -----------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)
        success = None
        if self.success_fn is not None:
            success = [float(self.success_fn(row, completion_text(c))) for row, c in zip(inputs, completions)]
        self._round_log.append({"rewards": rewards.detach().cpu(), "lengths": [len(c) for c in completion_ids_list],
                                "success": success})
        return rewards_per_func

    def _score_round(self, inputs) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """One TRL generation + scoring round; advantages replaced by ours. Returns (batch, rewards, zero-var)."""
        batch = super()._generate_and_score_completions(inputs)
        rewards = self._round_log[-1]["rewards"].to(batch["advantages"].device)
        mode = "train" if self.model.training else "eval"
        G = self.num_generations if mode == "train" else self.num_generations_eval
        batch["advantages"] = group_advantages(torch.nan_to_num(rewards, nan=0.0), G, self.adv_opts.scale,
                                               self.adv_opts.balanced)
        return batch, rewards, zero_variance_groups(rewards, G, self.dynamic.tolerance)

    def _generate_and_score_completions(self, inputs):
        self._round_log = []
        batch, rewards, zero_var = self._score_round(inputs)
        mode = "train" if self.model.training else "eval"
        G = self.num_generations if mode == "train" else self.num_generations_eval
        if mode == "train" and self.dynamic.enabled:
            batch = self._dynamic_sampling(batch, zero_var, G)
        batch = self._rollout_correction(batch, mode)
        self._log_round_metrics(mode)
        return batch

    def _dynamic_sampling(self, batch: dict, zero_var: torch.Tensor, G: int) -> dict:
        target = len(zero_var)
        kept, dropped = [_select_groups(batch, ~zero_var, G)], [_select_groups(batch, zero_var, G)]
        n_kept, n_generated, refills = int((~zero_var).sum()), target, 0
        while n_kept < target and refills < self.dynamic.max_refills:
            more, _, zv = self._score_round(self._next_refill_inputs(target, G))
            kept.append(_select_groups(more, ~zv, G))
            dropped.append(_select_groups(more, zv, G))
            n_kept, n_generated, refills = n_kept + int((~zv).sum()), n_generated + len(zv), refills + 1
        # kept groups first; dropped ones (zero advantage) only fill a batch still short after the refills
        merged = _concat_batches([b for b in kept + dropped if b is not None], self._tokenizer.pad_token_id)
        m = self._metrics["train"]
        m["dynamic/kept_frac"].append(n_kept / n_generated)  # of all groups generated for this batch
        m["dynamic/dropped_frac"].append(1 - n_kept / n_generated)
        m["dynamic/zero_var_fill_frac"].append(max(target - n_kept, 0) / target)  # of the final batch
        m["dynamic/refills"].append(float(refills))
        return _select_rows(merged, torch.arange(target * G))

    def _next_refill_inputs(self, n_prompts: int, G: int) -> list[dict]:
        """Further training prompts (a separately seeded pass over the train set), each repeated G times."""
        if self._refill_iter is None:
            self._refill_iter = _cycle_rows(self.train_dataset, seed=self.args.seed + 1)
        rows = [next(self._refill_iter) for _ in range(n_prompts)]
        return [dict(row) for row in rows for _ in range(G)]

    def _rollout_correction(self, batch: dict, mode: str) -> dict:
        """Log train-vs-rollout log-prob mismatch; optionally attach truncated IS weights for the loss."""
        rollout_logp = batch.get("sampling_per_token_logps")
        if rollout_logp is None:
            return batch
        old = batch.get("old_per_token_logps")
        if old is None:  # π_old = the current model at rollout time (no update yet): one no-grad forward
            input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
            attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
            with torch.no_grad():
                old, _, _ = self._get_per_token_logps_and_entropies(
                    self.model, input_ids, attention, batch["completion_ids"].size(1),
                    batch_size=self.args.per_device_train_batch_size)
            batch["old_per_token_logps"] = old
        mask = batch["completion_mask"]
        for key, value in logprob_mismatch(old, rollout_logp, mask).items():
            self._metrics[mode][key].append(value)
        if self.correction.importance_sampling:
            weights = importance_weights(old, rollout_logp, mask, self.correction.level, self.correction.cap)
            batch["importance_sampling_ratio"] = weights
            self._metrics[mode]["mismatch/is_weight_mean"].append(float((weights * mask).sum() / mask.sum()))
        return batch

    def _log_round_metrics(self, mode: str) -> None:
        rewards = torch.cat([r["rewards"] for r in self._round_log]).tolist()
        lengths = [n for r in self._round_log for n in r["lengths"]]
        success = None
        if all(r["success"] is not None for r in self._round_log):
            success = [s for r in self._round_log for s in r["success"]]
            self._metrics[mode]["success_rate"].append(sum(success) / max(len(success), 1))
        if self.length_monitor is not None and mode == "train":
            for key, value in self.length_monitor.update(self.state.global_step, rewards, lengths, success).items():
                self._metrics[mode][key].append(value)

    # -- loss --------------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
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
        self._metrics[mode]["policy_loss"].append(float(loss.detach()))
        loss = loss / accum
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accum
            self._metrics[mode]["aux_loss"].append(float(aux_loss.detach()))
        self._metrics[mode]["entropy"].append(float((entropy.detach() * mask).sum() / mask.sum().clamp(min=1.0)))
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)
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
_LEFT_PADDED = {"prompt_ids", "prompt_mask"}


def _concat_batches(batches: list[dict], pad_id: int) -> dict:
    """Concatenate scored rollout batches row-wise, re-padding prompts on the left and completions on the right."""
    out = {}
    for key, first in batches[0].items():
        if not isinstance(first, torch.Tensor) or first.dim() == 0:
            out[key] = first
            continue
        parts = [b[key] for b in batches]
        if first.dim() == 2:
            width = max(p.size(1) for p in parts)
            fill = pad_id if key in ("prompt_ids", "completion_ids") else 0
            padded = []
            for p in parts:
                extra = p.new_full((p.size(0), width - p.size(1)), fill)
                padded.append(torch.cat([extra, p] if key in _LEFT_PADDED else [p, extra], dim=1))
            parts = padded
        out[key] = torch.cat(parts, dim=0)
    out["num_items_in_batch"] = out["completion_mask"].sum()
    return out


def _cycle_rows(dataset, seed: int):
    """Endless reshuffled passes over a dataset's rows."""
    import random

    rng = random.Random(seed)
    while True:
        order = list(range(len(dataset)))
        rng.shuffle(order)
        for i in order:
            yield dataset[i]
