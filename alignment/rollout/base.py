"""The rollout-worker interface, and the train-vs-rollout log-prob checks every backend shares.

A rollout worker turns prompts into sampled completions **with the log-probability of every sampled token under the
sampling engine**:

    worker.generate(prompts, n, sampling) -> RolloutBatch      # n completions per prompt, grouped per prompt
    worker.sync_weights(model)                                  # make the engine sample from `model`'s weights

Contract for backends (`transformers_backend`, `vllm_backend`):
- `prompts` are token-id lists (already chat-templated) or strings (templated by the worker's tokenizer).
- completions are returned in prompt order, the n of one prompt consecutive (GRPO groups).
- `completion_ids` end with the EOS token when the model emitted one (no padding), else they were cut by
  `max_new_tokens` or by the repetition early stop; `stop_reasons` says which.
- `logprobs[i][t]` = log softmax(logits / temperature)[token] of the engine at that step: the model's distribution at
  the sampling temperature, before top-k / top-p truncation. That is the quantity the trainer recomputes
  (TRL's fused LM head divides by the same temperature), so `logprob_mismatch` measures only numerics (kernels,
  dtype, cached decoding), the train/inference gap MiniMax-M1 §3 fixes with an FP32 LM head. (vLLM: request
  `logprobs=0` with `logprobs_mode="processed_logprobs"` and no top-k/top-p, or recompute.)
- `routes` (optional, for router replay, `alignment.routing`): per completion the experts every MoE layer routed
  each position to, prompt and completion positions as the engine computed them (prefill + decode steps),
  [prompt + completion tokens, L, K] int16, -1 where the engine never ran the position; None when not recorded.
  The transformers backend records them (`record_routes=True`); the vLLM worker returns `routes=None` (recording
  inside vLLM's fused MoE is not built yet).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch


@dataclass
class SamplingOptions:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 32
    # MiniMax-M1 §3 early truncation: stop a completion once `repetition_stop_k` consecutive sampled tokens each had
    # probability > `repetition_stop_p`. On by default at M1's 3,000 tokens at 0.99 (for 40K-token rollouts; scale it
    # to the completion lengths of a config, e.g. 12 for the tiny ~10-token answers); None disables. The
    # transformers backend ends the completion's generation at that token; vLLM cuts it (in-engine stop: later).
    repetition_stop_k: int | None = 3000
    repetition_stop_p: float = 0.99

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"sampling.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.repetition_stop_k is not None and self.repetition_stop_k < 1:
            raise ValueError(f"sampling.repetition_stop_k must be >= 1 or null, got {self.repetition_stop_k}")
        if not 0 < self.repetition_stop_p < 1:
            raise ValueError(f"sampling.repetition_stop_p must be in (0, 1), got {self.repetition_stop_p}")


# the vLLM engine patches of alignment.rollout.vllm_backend, by name; the default is all of them
ENGINE_PATCHES = ("numerics", "batched_prefill", "kv_group_per_kind")


@dataclass
class RolloutOptions:
    """Which rollout worker samples (`rollout:` in GRPO, `pairs.rollout:` in DPO) and its engine's settings;
    `worker_kwargs` gives `build_rollout`'s keyword arguments."""

    # `transformers`: model.generate on the training model itself (CPU/GPU). `vllm`: an in-process vLLM engine on the
    # same GPU, weights synced in place after every optimizer step (alignment.rollout.vllm_backend; the `gpu` extra).
    backend: Literal["transformers", "vllm"] = "transformers"
    batch_size: int = 128  # completions generated together (vLLM: its max_num_seqs)
    # vLLM only:
    gpu_memory_utilization: float = 0.3  # vLLM's share of the GPU (weights + KV cache); the trainer has the rest
    max_model_len: int = 4096  # prompt + completion tokens
    enforce_eager: bool = False  # True: no CUDA graphs (slower decoding, faster start)
    # trainer-matching numerics, the batched lightning prefill, one KV-cache group per layer kind (see vllm_backend;
    # for long-context rollouts drop kv_group_per_kind: it costs softmax KV memory); [] = stock vLLM
    engine_patches: list[str] = field(default_factory=lambda: list(ENGINE_PATCHES))
    # further vLLM engine arguments, passed as they are (e.g. {async_scheduling: true, max_num_batched_tokens: 16384})
    engine_kwargs: dict = field(default_factory=dict)
    # transformers only: sample each group under its own seed (run seed, step, round, the group's index in it), one
    # generate call per group. Rollouts then do not depend on how the prompts are split across ranks or batched: N
    # ranks sample what one process samples (the multi-process tests rely on it). Off: one batched call per rank,
    # one RNG stream per rank (faster on a GPU).
    seed_groups: bool = False
    # GRPO: router replay ("R3", alignment.routing): the rollout records which experts each token was routed to
    # (prompt and completion positions), and the trainer's π_old and loss forwards use those experts instead of
    # recomputing the top-k, which removes the MoE routing part of the train/rollout log-prob mismatch (routing flips
    # near top-k ties between the engine's decode path and the trainer's full-sequence forward); the trainer logs
    # `rollout/route_mismatch` (share of routing decisions its own routers would have made differently). Meant to be
    # on for backend vllm once that engine records routes; until then only the transformers backend records them
    # (sampling from the trained model itself, where routes differ only by numerics), so the default is off.
    router_replay: bool = False

    def __post_init__(self):
        if self.seed_groups and self.backend != "transformers":
            raise ValueError("rollout.seed_groups is for the transformers backend (vLLM samples with its own "
                             "per-request seeds, not torch's); drop it or use backend: transformers")
        if self.router_replay and self.backend != "transformers":
            raise ValueError(f"rollout.router_replay needs the rollout's routes, which only the transformers backend "
                             f"records so far (the {self.backend} worker returns routes=None: recording inside its "
                             "engine is not built yet); drop rollout.router_replay or use backend: transformers")

    def worker_kwargs(self, seed: int) -> dict:
        if self.backend != "vllm":
            return {"batch_size": self.batch_size, "record_routes": self.router_replay}
        return {"batch_size": self.batch_size, "gpu_memory_utilization": self.gpu_memory_utilization,
                "max_model_len": self.max_model_len, "enforce_eager": self.enforce_eager, "seed": seed,
                "engine_patches": tuple(self.engine_patches), **self.engine_kwargs}


@dataclass
class RolloutBatch:
    """len(prompts) * n completions, prompt-major (the n samples of prompt 0 first)."""

    prompt_ids: list[list[int]]  # one entry per completion (the prompt repeated n times)
    completion_ids: list[list[int]]
    logprobs: list[list[float]]  # same lengths as completion_ids
    texts: list[str]  # decoded completions, special tokens skipped
    stop_reasons: list[str]  # "eos" | "length" | "repetition"
    n: int = 1
    metrics: dict[str, float] = field(default_factory=dict)
    # per completion [prompt + completion tokens, L, K] int16 expert indices (see the module docstring), or None
    routes: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.completion_ids)


class RolloutWorker(Protocol):
    def generate(self, prompts: list, n: int, sampling: SamplingOptions) -> RolloutBatch: ...

    def sync_weights(self, model: torch.nn.Module) -> None: ...


def encode_prompts(tokenizer, prompts: list) -> list[list[int]]:
    """Token ids of prompts given as chat conversations (templated with the generation prompt), strings, or id
    lists (kept as they are; the only form that needs no tokenizer)."""
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append(tokenizer(p, add_special_tokens=False)["input_ids"])
        elif p and isinstance(p[0], dict):
            out.append(list(tokenizer.apply_chat_template(p, tokenize=True, add_generation_prompt=True,
                                                          return_dict=True)["input_ids"]))
        else:
            out.append([int(t) for t in p])
    return out


def eos_ids(tokenizer) -> list[int]:
    """The tokenizer's EOS id(s) as a list ([] without a tokenizer or EOS)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def stop_metrics(reasons: list[str]) -> dict[str, float]:
    """Share of completions per stop reason ("eos", "length", "repetition")."""
    return {f"rollout/stop_{k}": sum(r == k for r in reasons) / max(len(reasons), 1)
            for k in ("eos", "length", "repetition")}


def logprob_mismatch(train_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Train-vs-rollout agreement on the sampled tokens (B, T): mean / max |Δ log p| and the Pearson correlation of
    the token probabilities (the number MiniMax-M1 §3 reports: 0.987 → 0.997 with an FP32 LM head)."""
    keep = mask.bool() & torch.isfinite(rollout_logp) & torch.isfinite(train_logp)
    if not keep.any():
        return {"mismatch/logp_abs_mean": 0.0, "mismatch/logp_abs_max": 0.0, "mismatch/prob_corr": 1.0}
    a, b = train_logp[keep].double(), rollout_logp[keep].double()
    delta = (a - b).abs()
    pa, pb = a.exp(), b.exp()
    if pa.numel() > 1 and pa.std() > 1e-6 and pb.std() > 1e-6:  # else the correlation is noise
        corr = float(torch.corrcoef(torch.stack([pa, pb]))[0, 1])
    else:
        corr = 1.0 if torch.allclose(pa, pb, atol=1e-4) else 0.0
    return {"mismatch/logp_abs_mean": float(delta.mean()), "mismatch/logp_abs_max": float(delta.max()),
            "mismatch/prob_corr": corr}


def importance_weights(train_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                       level: str = "token", cap: float = 2.0) -> torch.Tensor:
    """Truncated importance weights w = min(π_train / π_rollout, cap) that correct the policy gradient for sampling
    from the rollout engine instead of the trained model (TIS). `level="sequence"` uses one weight per completion,
    exp(Σ_t Δ), broadcast over its tokens. Masked / non-finite tokens get weight 1. No gradient."""
    delta = torch.nan_to_num((train_logp - rollout_logp).detach(), nan=0.0) * mask
    if level == "sequence":
        delta = delta.sum(-1, keepdim=True).expand_as(train_logp)
    elif level != "token":
        raise ValueError(f"importance-weight level must be 'token' or 'sequence', got {level!r}")
    return torch.exp(delta).clamp(max=cap)
