"""Rollout backend 2: an in-process (colocated) vLLM engine, with in-place weight sync from the trainer.

    worker = VLLMRollout(model, tokenizer, gpu_memory_utilization=0.3)   # builds the engine from `model`'s weights
    batch = worker.generate(prompts, n=8, sampling=SamplingOptions(...))  # RolloutBatch, as the transformers backend
    worker.sync_weights(model)                                             # after each optimizer step

GPU only (the `gpu` extra); vLLM is imported lazily and a missing package fails with the install hint. Tested with
vLLM 0.22.1 (its `MiniMaxText01ForCausalLM`). What it takes to make vLLM sample from *our* model, and why:

- Export (`export_for_vllm`): vLLM reads `config.postnorm` (default False: a pre-norm network) while transformers'
  MiniMax is always post-norm, so the exported config says `postnorm: true`, or vLLM runs a different network
  silently. `head_dim` and the trainer's `rotary_dim` are written out (`alignment.released.rotary_dim`: the whole
  head for transformers' layout, 64 of 128 for the released models; vLLM rotates `rotary_dim` dims, default the
  whole head), and `eos_token_id` is the tokenizer's, so both engines stop alike. Weights go in
  the checkpoint layout (`vllm_checkpoint_tensors`), without the lightning buffers vLLM has no parameter for.
- Weight sync (`sync_weights`), LoRA deltas added out of place (peft's merge/unmerge would round the base weights
  of a bf16 model a little more on every step). Two ways, same result:
  - "direct" (the default once proven): one in-place `copy_` per vLLM parameter from the trainer tensor(s) it is
    made of (`direct_sync_plan`: the fused expert tensors map one to one, softmax q/k/v are stacked). The plan is
    built when the engine starts and kept only if every parameter it covers equals what vLLM loaded from the export,
    so a layout it gets wrong is never used.
  - "loader": vLLM's own `load_weights` in the checkpoint layout (experts split from transformers' fused 3D tensors
    into `block_sparse_moe.experts.E.w1/w2/w3`, the router renamed `block_sparse_moe.gate`). MiniMax's loader scans
    its whole expert-name table, with a regex per entry, for every expert tensor: 0.10-0.12 s a sync for the 548M
    bench config (16 layers x 8 experts), where the copies themselves take milliseconds.
  A tensor that fails raises `WeightSyncError` naming it; a vLLM parameter left unset raises too.
  (`collective_rpc("reload_weights")` breaks on MiniMax in 0.22.1.)
- Across ranks (`torchrun` / `accelerate launch`): one colocated engine per rank on the rank's GPU (data-parallel
  rollouts: each rank rolls out its own prompts), inside the launcher's process group through vLLM's
  `external_launcher` executor as TRL's colocate mode does, seeded `seed + rank`. Each rank's engine is synced from
  its policy after every optimizer step. Under DeepSpeed ZeRO-3 the policy is partitioned; both sync ways then
  stream it through `merged_layers`, which gathers one decoder layer (with its LoRA adapters) at a time, merges
  it, writes it into the engine and releases it -- never the whole model on one GPU (the 456B model: about 11 GB
  of bf16 weights per layer against 0.9 TB whole). Every rank takes part in every gather. An engine built from a
  sharded policy starts from `load_format="dummy"` and takes its weights through the loader stream, so nothing is
  written to disk; the direct plan is then proved against what that stream loaded.
  What a tensor-parallel engine per node (one engine over T GPUs) still needs, and why it is not here: the T ranks
  of an engine must submit the same prompts (gather them within the TP group, hand each rank its slice of the
  outputs back); each engine parameter is then a TP shard, so the direct plan (whole-tensor copies, proved by
  equality) does not apply -- the loader way does (vLLM's weight loaders slice whole tensors for their rank), or a
  plan that slices each gathered tensor as those loaders do; and the seed is per TP group, not per rank. The seam
  for it: `VLLMRollout.__init__` builds the engine of this process, `sync_weights` takes the streamed groups.
- Numerics (`engine_patches="numerics"`), so the train/rollout log-prob gap is kernels only: the linear-attention
  state cache in float32 (vLLM defaults to the model dtype: a bf16 state rounded at every decode step), the output
  RMSNorm epsilon of the trainer (vLLM hard-codes 1e-5, transformers' layer uses 1e-6) and the trainer's float32
  slopes (`alignment.lightning.lightning_slopes`: the released formula, as vLLM's, evaluated in float64 and rounded
  once; vLLM multiplies float32 powers, which differs in the last digits).
- Fewer KV-cache groups (`"kv_group_per_kind"`): vLLM makes every KV-cache group as large as the smallest
  layer kind, so 2 softmax + 14 lightning layers become 8 groups, and its scheduler asks every group's manager, for
  every request and decode step, which blocks to free and to allocate (the biggest host cost of a decode step in
  bench_rollout's cProfile). With one group per kind it asks two. The price: a softmax block leaves the pages of the
  pool's other layers unused (vLLM's own "padding layers"), so softmax KV memory per token grows by
  lightning layers / softmax layers (7x here) -- cheap for short rollouts; for long-context rollouts drop it from
  `engine_patches` (bench_rollout: batch-64 decode step 6.4 ms with it, 7.1 ms without, same run).
- Speed (`engine_patches="batched_prefill"`): vLLM 0.22.1 prefills lightning layers one sequence at a time, in a
  Python loop with a device sync per sequence per layer, which dominates rollouts of many short prompts. The patch
  runs all prefills of a step in one flash-linear-attention `chunk_simple_gla` call (`cu_seqlens`, initial states
  from the cache, final states written back): the same kernel the trainer uses (`alignment.kernels`).

Host work (`VLLMRollout.run`, `LEAN_OUTPUTS`): the in-process engine's decode step is host-bound at this model size
(bench_rollout: the GPU busy 6.7 ms of a 13.9 ms decode step at batch 256), so `generate` asks for vLLM's flat log-prob
container (a few lists per request instead of a dict and a `Logprob` per token) and pauses Python's cyclic garbage
collector while the engine steps. Measured: the collector's time per batch-256 generate 0.033 -> 0.005 s, under 2%
of it; most of the host time is vLLM's scheduler (see `kv_group_per_kind`).

Log-probs are vLLM's `processed_logprobs`: log softmax(logits / T) of the sampled token, the quantity the trainer
recomputes (top-k / top-p, when set, renormalise it). The repetition early stop [M1 §3] is applied to the returned
completions (cut at the first run of K confident tokens), which gives the same completions as the transformers
backend but saves no generation time.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from alignment.distributed import (is_sharded, launched, layer_groups, layer_key, merged_layers, merged_parameters,
                                   rank)
from alignment.lightning import lightning_slopes
from alignment.released import DECAY_BUFFERS, head_dim, rotary_dim
from alignment.rollout.base import (ENGINE_PATCHES, RolloutBatch, SamplingOptions, encode_prompts, eos_ids,
                                    stop_metrics)

VLLM_HINT = "the vLLM rollout backend needs vLLM and a CUDA GPU: pip install -e '.[gpu]'"
# lightning-layer buffers older checkpoints carry; vLLM's loader has no parameter for them (they are recomputed)
LIGHTNING_BUFFERS = tuple(f".{name}" for name in DECAY_BUFFERS)


class WeightSyncError(RuntimeError):
    """A weight sync into the rollout engine failed; the message names the tensor."""


def import_vllm():
    """vLLM, imported on first use with the in-process engine settings this backend relies on."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process: in-place sync
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"{VLLM_HINT} ({err})") from None
    if not torch.cuda.is_available():
        raise RuntimeError(f"{VLLM_HINT} (no CUDA device visible)")
    return vllm


# -- weights in the checkpoint layout ---------------------------------------------------------------------------


def vllm_checkpoint_tensors(model: torch.nn.Module):
    """(name, tensor) in the MiniMax checkpoint layout that vLLM's loader (and `save_pretrained`) uses: experts as
    `block_sparse_moe.experts.E.w1/w3` (the halves of transformers' fused `gate_up_proj` [E, 2I, H]) and `.w2`
    (`down_proj` [E, H, I]), the router as `block_sparse_moe.gate`. Views, no copies."""
    for name, p in merged_parameters(model):
        p = p.detach()
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("mlp.experts.gate_up_proj")] + "block_sparse_moe.experts."
            inter = p.shape[1] // 2
            for e in range(p.shape[0]):
                yield f"{prefix}{e}.w1.weight", p[e, :inter]
                yield f"{prefix}{e}.w3.weight", p[e, inter:]
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("mlp.experts.down_proj")] + "block_sparse_moe.experts."
            for e in range(p.shape[0]):
                yield f"{prefix}{e}.w2.weight", p[e]
        elif name.endswith("mlp.gate.weight"):
            yield name[: -len("mlp.gate.weight")] + "block_sparse_moe.gate.weight", p
        else:
            yield name, p


# vLLM MiniMax parameter suffix -> the transformers tensor it equals (the fused expert layouts are the same)
_VLLM_RENAMES = (("block_sparse_moe.experts.w13_weight", "mlp.experts.gate_up_proj"),
                 ("block_sparse_moe.experts.w2_weight", "mlp.experts.down_proj"),
                 ("block_sparse_moe.gate.weight", "mlp.gate.weight"))


def vllm_parameter_sources(vllm_name: str, trainer_names) -> tuple[str, ...] | None:
    """The trainer tensors (transformers names) a vLLM MiniMax parameter is made of, stacked along dim 0 when more
    than one (a softmax layer's `qkv_proj` = q, k, v); None when there is no such rule."""
    for theirs, ours in _VLLM_RENAMES:
        if vllm_name.endswith(theirs):
            name = vllm_name[: -len(theirs)] + ours
            return (name,) if name in trainer_names else None
    if vllm_name in trainer_names:
        return (vllm_name,)
    if vllm_name.endswith("self_attn.qkv_proj.weight"):
        parts = tuple(vllm_name.replace("qkv_proj", p) for p in ("q_proj", "k_proj", "v_proj"))
        return parts if all(p in trainer_names for p in parts) else None
    return None


def stacked(tensors: dict[str, torch.Tensor], names: tuple[str, ...]) -> torch.Tensor:
    return tensors[names[0]] if len(names) == 1 else torch.cat([tensors[n] for n in names])


def _trainer_groups(trainer):
    """The trainer's tensors as the groups of `merged_layers`: streamed groups as they come, one whole dict split
    by `layer_key`."""
    return [dict(group) for group in layer_groups(trainer.items())] if isinstance(trainer, dict) else trainer


def _by_layer(names) -> dict[str, list[str]]:
    buckets: dict[str, list[str]] = {}
    for name in names:
        buckets.setdefault(layer_key(name), []).append(name)
    return buckets


def _layer_matches(pending: dict[str, list[str]], trainer):
    """(trainer group, vLLM name) for each name in `pending` (`_by_layer` buckets) whose layer a group of `trainer`
    brings, in the stream's order; matched buckets are popped, so what is left afterwards no group brought."""
    for group in _trainer_groups(trainer):
        if group:
            for name in pending.pop(layer_key(next(iter(group))), ()):
                yield group, name


def direct_sync_plan(vllm_params: dict[str, torch.Tensor], trainer):
    """[(vLLM name, trainer names)] for the direct sync, and the vLLM parameters it cannot cover. `trainer`: the
    trainer's tensors, one dict or the groups of `merged_layers` (a ZeRO-3 model: streamed, a decoder layer at a
    time; a vLLM parameter's sources always lie in one layer). A parameter is covered only if its sources, in its
    dtype, equal it now (call right after vLLM loaded the trainer's weights): that proves the rule and the layout.
    vLLM may pad a vocabulary dimension; the sources then fill the leading rows, as its loader does."""
    plan = []
    with torch.no_grad():
        for group, name in _layer_matches(_by_layer(vllm_params), trainer):
            param = vllm_params[name]
            sources = vllm_parameter_sources(name, group)
            value = None if sources is None else stacked(group, sources)
            fits = value is not None and value.shape[1:] == param.shape[1:] and value.shape[0] <= param.shape[0]
            if fits and torch.equal(param[: value.shape[0]], value.to(param.device, param.dtype)):
                plan.append((name, sources))
    covered = {name for name, _ in plan}
    return plan, [name for name in vllm_params if name not in covered]


def copy_direct(vllm_params: dict[str, torch.Tensor], plan, trainer) -> int:
    """The direct sync itself: each planned vLLM parameter written in place from its trainer tensor(s) (`trainer`
    as for `direct_sync_plan`: streamed groups or one dict). Returns the number of parameters written; a copy that
    fails, or a planned parameter no group provided, raises `WeightSyncError` naming it."""
    pending = _by_layer(name for name, _ in plan)
    sources_of = dict(plan)
    written = 0
    with torch.no_grad():
        for group, name in _layer_matches(pending, trainer):
            sources = sources_of[name]
            try:
                value = stacked(group, sources)
                vllm_params[name][: value.shape[0]].copy_(value)
            except Exception as err:
                raise WeightSyncError(f"weight sync into vLLM failed at '{name}' (from {', '.join(sources)}): "
                                      f"{type(err).__name__}: {err}") from err
            written += 1
    if pending:
        missing = [n for names in pending.values() for n in names]
        raise WeightSyncError(f"weight sync left {len(missing)} vLLM parameters unwritten, e.g. {missing[:4]} (the "
                              "trainer's model no longer provides their tensors)")
    return written


def _base_config(model):
    return (model.get_base_model() if hasattr(model, "get_base_model") else model).config


def export_for_vllm(model, tokenizer, path: str | Path, dtype: torch.dtype = torch.bfloat16,
                    weights: bool = True) -> Path:
    """Write `model` (LoRA merged) as a checkpoint vLLM's MiniMax loader reads the way the trainer computes (see the
    module docstring). Returns the directory. `weights=False` writes the config (and tokenizer) alone: for an engine
    built with `load_format="dummy"` whose weights then come through a sync."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = _base_config(model)
    data = config.to_dict()
    data.update(architectures=["MiniMaxForCausalLM"], postnorm=True, head_dim=head_dim(config),
                rotary_dim=rotary_dim(config),
                dtype=str(dtype).removeprefix("torch."))
    data.pop("torch_dtype", None)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        data["eos_token_id"] = tokenizer.eos_token_id
    if weights:
        tensors = {name: t.to(dtype).contiguous() for name, t in vllm_checkpoint_tensors(model)}
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(data, indent=1, default=str))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


# -- engine patches ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def patched_engine_build(patches: tuple[str, ...], norm_eps: float):
    """While vLLM builds its model (before compilation and CUDA-graph capture, which freeze constants), give every
    MiniMax lightning layer the trainer's numerics and/or the batched prefill, and/or the engine one KV-cache group
    per layer kind. Instance attributes and module functions restored on exit: an engine built outside this context
    is stock (the batched prefill's state clearing stays; it has vLLM's semantics)."""
    unknown = set(patches) - set(ENGINE_PATCHES)
    if unknown:
        raise ValueError(f"engine_patches: unknown {sorted(unknown)}; known: {', '.join(ENGINE_PATCHES)}")
    if not patches:
        yield
        return
    from vllm.model_executor.layers.mamba import linear_attn
    from vllm.v1.core import kv_cache_utils

    original_groups = kv_cache_utils._get_kv_cache_groups_uniform_page_size
    if "kv_group_per_kind" in patches:  # vLLM calls it through the module while the engine core starts
        kv_cache_utils._get_kv_cache_groups_uniform_page_size = kv_group_per_kind

    cls = linear_attn.MiniMaxText01LinearAttention
    original_init = cls.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if "numerics" in patches:
            self.norm.variance_epsilon = norm_eps
            slopes = lightning_slopes(self.total_num_heads, self.layer_idx, kwargs["num_hidden_layer"],
                                      self.slope_rate.device)  # vLLM's decoder layer passes it by keyword
            self.slope_rate = slopes.reshape(self.slope_rate.shape)
            heads = slice(self.tp_rank * self.tp_heads, (self.tp_rank + 1) * self.tp_heads)
            self.tp_slope = self.slope_rate[heads].contiguous()
        if "batched_prefill" in patches:
            self._prefill_and_mix_infer = _batched_prefill_and_mix.__get__(self)

    cls.__init__ = init
    if "batched_prefill" in patches:  # same semantics, no per-sequence device sync; stays for the process
        linear_attn.clear_linear_attention_cache_for_new_sequences = _clear_new_sequence_states
    try:
        yield
    finally:
        cls.__init__ = original_init
        kv_cache_utils._get_kv_cache_groups_uniform_page_size = original_groups


def kv_group_per_kind(kv_cache_spec: dict) -> list:
    """Replacement for vLLM 0.22.1's `kv_cache_utils._get_kv_cache_groups_uniform_page_size`: one KV-cache group per
    layer kind (spec), in layer order, instead of groups the size of the smallest kind (module docstring). vLLM's
    memory layout takes groups of unequal length: pool i holds layer i of every group that has one."""
    from vllm.v1.core.kv_cache_utils import create_kv_cache_group_specs

    kinds: dict = {}
    for name, spec in kv_cache_spec.items():
        kinds.setdefault(spec, []).append(name)
    return create_kv_cache_group_specs(kv_cache_spec, list(kinds.values()))


def _clear_new_sequence_states(kv_cache, state_indices_tensor, attn_metadata) -> None:
    """vLLM's `clear_linear_attention_cache_for_new_sequences` without the loop: zero the state slot of every prefill
    that starts a sequence (no cached context)."""
    n = getattr(attn_metadata, "num_prefills", 0)
    if n <= 0:
        return
    d = attn_metadata.num_decode_tokens
    starts = attn_metadata.query_start_loc[d : d + n + 1]
    context = attn_metadata.seq_lens[d : d + n] - (starts[1:] - starts[:-1])
    slots = state_indices_tensor[d : d + n]
    fresh = (context == 0).view(-1, *([1] * (kv_cache.dim() - 1)))
    kv_cache[slots] = torch.where(fresh, torch.zeros((), dtype=kv_cache.dtype, device=kv_cache.device),
                                  kv_cache[slots])


def _batched_prefill_and_mix(self, q, k, v, kv_cache, state_indices_tensor, attn_metadata):
    """Replacement for `MiniMaxText01LinearAttention._prefill_and_mix_infer`: decode tokens through vLLM's decode
    kernel, then every prefill of the step in one varlen fla call. q, k, v: (tokens, heads, head_dim) float32, decode
    tokens first; the state cache holds k^T v per slot (heads, head_dim, head_dim), as fla's state does."""
    from fla.ops.simple_gla import chunk_simple_gla

    parts = []
    d, n = attn_metadata.num_decode_tokens, attn_metadata.num_prefills
    if d > 0:
        parts.append(self._decode_infer(q, k, v, kv_cache, state_indices_tensor, attn_metadata))
    if n > 0:
        starts = attn_metadata.query_start_loc[d : d + n + 1]
        cu_seqlens = (starts - starts[0]).long()
        tokens = slice(d, d + attn_metadata.num_prefill_tokens)
        slots = state_indices_tensor[d : d + n]
        out, final = chunk_simple_gla(
            q[tokens].unsqueeze(0), k[tokens].unsqueeze(0), v[tokens].unsqueeze(0),
            g_gamma=-self.tp_slope.reshape(-1).to(q.device, torch.float32), scale=1.0,
            initial_state=kv_cache[slots].float(), output_final_state=True, cu_seqlens=cu_seqlens)
        kv_cache[slots] = final.to(kv_cache.dtype)
        parts.append(out.squeeze(0).reshape(out.shape[1], -1).to(q.dtype))
    if not parts:
        return torch.empty((0, q.shape[1] * q.shape[2]), device=q.device, dtype=q.dtype)
    return torch.cat(parts).contiguous()


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector off inside the block (restored after; reference counting still frees
    almost everything): see the module docstring's host work."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def sampled_logprobs(completion) -> list[float]:
    """The log-prob of each sampled token of a vLLM `CompletionOutput` requested with `logprobs=0`: read straight
    from a `FlatLogprobs` container (one entry per position), else from the dict per position."""
    tokens, lps = list(completion.token_ids), completion.logprobs
    if getattr(lps, "token_ids", None) == tokens:
        return list(lps.logprobs)
    return [lps[t][tok].logprob for t, tok in enumerate(tokens)]


def _lightning_norm_eps(model) -> float:
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    for module in model.modules():
        if isinstance(module, MiniMaxLightningAttention):
            return float(module.norm.variance_epsilon)
    return 1e-6


# -- the worker -------------------------------------------------------------------------------------------------


class VLLMRollout:
    """`RolloutWorker` on an in-process vLLM engine built from the policy's current weights.

    The engine shares the GPU with the trainer: `gpu_memory_utilization` is vLLM's share of the card (weights + KV
    cache). `engine_patches` (see the module docstring) default to all; `()` builds stock vLLM (for comparisons).
    Further keyword arguments go to `vllm.LLM` as they are."""

    def __init__(self, model, tokenizer=None, batch_size: int | None = None, *, gpu_memory_utilization: float = 0.3,
                 max_model_len: int = 4096, max_num_seqs: int = 256, enforce_eager: bool = False, seed: int = 0,
                 dtype: str = "bfloat16", engine_patches: tuple[str, ...] = ENGINE_PATCHES,
                 workdir: str | Path | None = None, **engine_kwargs):
        vllm = import_vllm()
        self.tokenizer = tokenizer
        self.engine_patches = tuple(engine_patches)
        self._tmp = tempfile.TemporaryDirectory(prefix="vllm_policy_", dir=workdir)
        # a ZeRO-3 policy is never written out whole: the engine starts from dummy weights and takes the real ones
        # through the loader sync, gathered a decoder layer at a time (merged_layers)
        sharded = is_sharded(model)
        path = export_for_vllm(model, tokenizer, self._tmp.name, dtype=getattr(torch, dtype), weights=not sharded)
        kwargs = dict(model=str(path), skip_tokenizer_init=True, dtype=dtype, seed=seed + rank(),
                      gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                      max_num_seqs=batch_size or max_num_seqs, enforce_eager=enforce_eager,
                      logprobs_mode="processed_logprobs")
        if sharded:
            kwargs["load_format"] = "dummy"
        if launched():
            # one engine per rank on its own GPU, inside the launcher's process group (as TRL's colocate mode)
            kwargs["distributed_executor_backend"] = "external_launcher"
        if "numerics" in self.engine_patches:
            kwargs["mamba_cache_dtype"] = "float32"
        kwargs.update(engine_kwargs)  # any other vLLM engine argument, e.g. async_scheduling=True
        with patched_engine_build(self.engine_patches, _lightning_norm_eps(model)):
            self.llm = vllm.LLM(**kwargs)
        # in-process engine: these are vLLM's own parameter tensors (the sync writes into them in place)
        self._params = self.llm.apply_model(lambda m: dict(m.named_parameters()))[0]
        if sharded:
            self._load_through_vllm(model)
        self._plan, uncovered = direct_sync_plan(self._params, merged_layers(model))
        self.direct_sync_uncovered = uncovered  # non-empty: every sync goes through vLLM's loader
        self.last_sync_s: float | None = None
        self.last_sync_method: str | None = None

    def kv_cache_group_sizes(self) -> list[int]:
        """Layers per KV-cache group of the engine's scheduler (`kv_group_per_kind`: one group per layer kind)."""
        groups = self.llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_config.kv_cache_groups
        return [len(g.layer_names) for g in groups]

    def close(self) -> None:
        """Shut the in-process engine core down and drop the engine (dropping the `LLM` alone kept its memory: 49 GiB
        still allocated after a 0.35-share engine in bench_rollout)."""
        import gc

        llm, self.llm = self.llm, None
        self._params, self._plan = {}, []
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            del llm
        gc.collect()
        torch.cuda.empty_cache()
        self._tmp.cleanup()

    def sync_weights(self, model, method: str = "auto") -> None:
        """Push `model`'s current weights into the engine in place (no re-export). `method`: "direct" (a copy per
        vLLM parameter, see `direct_sync_plan`), "loader" (vLLM's `load_weights`, then a check that every vLLM
        parameter was written), or "auto" (direct when the plan covers every parameter). Raises `WeightSyncError`
        naming the tensor that failed."""
        if method not in ("auto", "direct", "loader"):
            raise ValueError(f"sync method is {method!r}; expected 'auto', 'direct' or 'loader'")
        if method == "direct" and self.direct_sync_uncovered:
            raise WeightSyncError(f"direct sync cannot write {len(self.direct_sync_uncovered)} vLLM parameters, e.g. "
                                  f"{self.direct_sync_uncovered[:4]} (no trainer tensor equals them)")
        direct = method == "direct" or (method == "auto" and not self.direct_sync_uncovered)
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            if direct:
                self._copy_direct(model)
            else:
                self._load_through_vllm(model)
        torch.cuda.synchronize()
        self.last_sync_s = time.perf_counter() - start
        self.last_sync_method = "direct" if direct else "loader"
        self.llm.reset_prefix_cache()

    def _copy_direct(self, model) -> None:
        copy_direct(self._params, self._plan, merged_layers(model))

    def _load_through_vllm(self, model) -> None:
        last = [None]

        def stream():
            for name, tensor in vllm_checkpoint_tensors(model):
                last[0] = name
                yield name, tensor

        try:
            loaded = self.llm.apply_model(lambda m: m.load_weights(stream()))[0]
        except Exception as err:
            raise WeightSyncError(f"weight sync into vLLM failed at tensor '{last[0]}': "
                                  f"{type(err).__name__}: {err}") from err
        missing = set(self._params) - set(loaded or ())
        if missing:
            raise WeightSyncError(f"weight sync left {len(missing)} vLLM parameters unwritten, e.g. "
                                  f"{sorted(missing)[:4]} (names the trainer's model does not provide)")

    # SamplingParams fields that keep the per-token host work small (module docstring, host work): token ids out,
    # no text; log-probs in vLLM's flat container
    LEAN_OUTPUTS = dict(detokenize=False, flat_logprobs=True)

    def run(self, token_ids: list[list[int]], params, pause_gc: bool = True) -> list:
        """vLLM's `generate` on token-id prompts (one `RequestOutput` each), the garbage collector paused while the
        engine steps unless `pause_gc` is False."""
        from vllm.inputs import TokensPrompt

        with gc_paused() if pause_gc else contextlib.nullcontext():
            return self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in token_ids], params, use_tqdm=False)

    def generate(self, prompts: list, n: int, sampling: SamplingOptions) -> RolloutBatch:
        from vllm import SamplingParams

        ids = encode_prompts(self.tokenizer, prompts)
        eos = eos_ids(self.tokenizer)
        params = SamplingParams(n=n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                                max_tokens=sampling.max_new_tokens, stop_token_ids=eos, logprobs=0,
                                **self.LEAN_OUTPUTS)
        start = time.perf_counter()
        outputs = self.run(ids, params)
        seconds = time.perf_counter() - start
        prompt_ids, completions, logprobs, reasons = [], [], [], []
        for p, out in zip(ids, outputs):
            for c in sorted(out.outputs, key=lambda c: c.index):
                tokens, lp = list(c.token_ids), sampled_logprobs(c)
                reason = "eos" if c.finish_reason == "stop" else "length"  # vLLM also stops on the config's EOS
                cut = repetition_cut(lp, sampling.repetition_stop_k, sampling.repetition_stop_p)
                if cut is not None and not (reason == "eos" and cut == len(tokens)):  # EOS first, as online
                    tokens, lp, reason = tokens[:cut], lp[:cut], "repetition"
                prompt_ids.append(p)
                completions.append(tokens)
                logprobs.append(lp)
                reasons.append(reason)
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True) if self.tokenizer else [""] * len(
            completions)
        generated = sum(len(c) for c in completions)
        # the engine's own speed for this call (bench_rollout reads it; the GRPO trainer times its steps itself)
        metrics = {**stop_metrics(reasons), "rollout/seconds": seconds,
                   "rollout/tokens_per_s": generated / max(seconds, 1e-9)}
        return RolloutBatch(prompt_ids, completions, logprobs, texts, reasons, n=n, metrics=metrics)

    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[list[float]]:
        """The engine's log-probs (temperature 1) of given completions, teacher-forced: for checking a weight sync
        against the trainer on fixed sequences."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        outputs = self.run([p + c for p, c in zip(prompt_ids, completion_ids)], params)
        return [[out.prompt_logprobs[len(p) + t][tok].logprob for t, tok in enumerate(c)]
                for p, c, out in zip(prompt_ids, completion_ids, outputs)]


def repetition_cut(logprobs: list[float], k: int | None, p: float) -> int | None:
    """Length after the M1 §3 early stop: the index just past the first run of `k` consecutive tokens each with
    probability > `p`, or None (no such run, or the rule is off). Matches the transformers backend's online rule.

    >>> repetition_cut([-2.0, -0.001, -0.001, -0.001, -3.0], k=3, p=0.99)
    4
    """
    if not k:
        return None
    threshold, run = math.log(p), 0
    for t, lp in enumerate(logprobs):
        run = run + 1 if lp > threshold else 0
        if run >= k:
            return t + 1
    return None
