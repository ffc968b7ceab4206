"""The MiniMax model wrapper: one entry point, `load_model`, returning a packing-safe transformers model.

`load_model(spec, head=..., tokenizer=...)` takes a local checkpoint directory or a model YAML (architecture fields of
`MiniMaxConfig`) and returns a `transformers.MiniMaxForCausalLM` (or, `head="score"`, a one-logit reward model) whose
attention is packing-safe; `load_tokenizer(dir)` is its tokenizer counterpart. Every stage, the rollout workers, the
reward handlers and the bench scripts load through these two. What it changes, and why:

- Lightning layers: transformers' `MiniMaxLightningAttention` ignores `position_ids`, so in a packed row the recurrent
  state leaks from one document into the next. `PackedLightningAttention` computes the same blockwise math
  (`alignment.lightning.lightning_attention`) with the state reset at every document start.
- Softmax layers: on a packed row they attend document by document (`PackedSoftmaxAttention`); when the row also has
  padding, the causal mask is intersected with a same-document mask derived from `position_ids` (transformers only
  detects packing when no mask is given, and then only for softmax layers).
- Decoding: the cache reports its length from a softmax layer (`MiniMaxDecodeCache`); stock transformers reads the
  lightning layer 0, which holds no keys, and restarts positions at 0 after the prompt.
- Options (`ModelOptions`): LoRA via peft (attention + expert projections, never the router), FP32 LM head
  (MiniMax-M1 §3: training/inference probability correlation 0.987 -> 0.997), RoPE base override, gradient
  checkpointing, router aux-loss coefficient, and the device the model is placed on when loaded (`model.device`:
  the process's GPU by default, so evaluation, pair sampling and the success-rate pass run there before a trainer
  takes the model; `warn_if_off_device` says so when a model generates on the CPU beside a GPU).

The module classes are swapped in place (`module.__class__ = ...`); they add no parameters, so checkpoints keep the
stock layout and a plain `AutoModelForCausalLM.from_pretrained(dir)` loads what this toolkit saves.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import MiniMaxConfig, MiniMaxForCausalLM
from transformers.masking_utils import create_causal_mask, create_recurrent_attention_mask
from transformers.models.minimax import modeling_minimax as mm

from alignment.config import ConfigError, read_yaml
from alignment.kernels import (check_lightning_kernel, lightning_attention_fla, lightning_layer_fla,
                               resolve_lightning_kernel,
                               varlen_softmax_attention, varlen_softmax_available)
from alignment.context_parallel import lightning_exchange, plan as context_parallel_plan
from alignment.context_parallel import softmax_attention as context_parallel_softmax
from alignment.lightning import document_ids, lightning_attention, lightning_slopes
from alignment.released import DECAY_BUFFERS, MODEL_TYPES as RELEASED_MODEL_TYPES, checkpoint_config, head_dim, rotary_dim

# LoRA targets. Lightning layers: fused qkv, output gate, output projection; softmax layers: q/k/v/o; experts: the
# fused 3D expert weights (peft `target_parameters`). The router (`mlp.gate`) is left out on purpose: adapting it
# shifts the expert load and the aux loss, and it is tiny.
LORA_ATTENTION_TARGETS = ["qkv_proj", "output_gate", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj"]
LORA_EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@dataclass
class LoraOptions:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_ATTENTION_TARGETS))
    # Also adapt the experts (their weights are 3D parameters, targeted by name).
    experts: bool = True


@dataclass
class ModelOptions:
    # A model YAML (architecture only: fresh weights) or a local checkpoint directory.
    path: str
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["sdpa", "eager", "flex_attention", "flash_attention_2"] = "sdpa"
    # MiniMax-M1 §3: logits in FP32 cut the train/rollout probability mismatch.
    fp32_lm_head: bool = True
    # Override the RoPE base (MiniMax-01 keeps 10M through post-training); None keeps the checkpoint's.
    rope_theta: float | None = None
    gradient_checkpointing: bool = False
    # Weight of the MoE load-balancing loss added to the LM loss; None keeps the checkpoint's value.
    router_aux_loss_coef: float | None = None
    lora: LoraOptions | None = None
    # Lightning-layer kernel (alignment.kernels): "fla_fused" = flash-linear-attention's Triton kernel with the
    # SiLU/split, output norm and gate fused around it (CUDA, the `gpu` extra; packed softmax layers then use torch's
    # flash varlen kernel too; GPU-tested on packed and left-padded rows; bench/results/train_bench.md: layer 7.55 ->
    # 3.60 ms at 32K), "fla" = the same kernel with torch's element-wise ops around it, "torch" = the blockwise reference in
    # alignment.lightning, "auto" = fla_fused on CUDA when installed, else torch. Same math either way.
    lightning_kernel: Literal["auto", "torch", "fla", "fla_fused"] = "auto"
    # Where the loader places the model: "auto" = this process's GPU (cuda:LOCAL_RANK under a launcher) when CUDA is
    # available, else the CPU; "cpu" keeps it on the host (a model one GPU cannot hold, whose ZeRO-3 shards DeepSpeed
    # places); or a torch device ("cuda", "cuda:1"). Under an active ZeRO-3 config the model stays where it loaded.
    device: str = "auto"

    def __post_init__(self):
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ConfigError(f"model.device: {self.device!r} is not a device (auto, cpu, cuda, cuda:N)") from None


def resolve_device(name: str = "auto") -> torch.device:
    """The device `ModelOptions.device` names ("auto": this process's GPU if CUDA is available, else the CPU).

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device: {name} but this torch sees no CUDA device (torch {torch.__version__}); "
                          "use auto or cpu")
    return device


def _zero3_active() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


_warned: set[str] = set()


def warn_if_off_device(model: torch.nn.Module, what: str) -> None:
    """Warn once per `what` when `model` is about to generate on the CPU while a GPU is there (a model loaded with
    `device: cpu`, or moved back): generation there is tens of times slower, and looks like a stall."""
    if what in _warned or not torch.cuda.is_available() or _zero3_active():
        return
    param = next(model.parameters(), None)
    if param is not None and param.device.type == "cpu":
        _warned.add(what)
        warnings.warn(f"{what}: the model is on the CPU while CUDA is available; set model.device: auto (the "
                      "default) or cuda to run it on the GPU", stacklevel=2)


# Checkpoints of this toolkit and the released ones hold no lightning decay buffers (`make_packing_safe`): transformers
# recomputes them (`_init_weights`); its load report would otherwise list every lightning layer's as "newly
# initialized" on every load. A class attribute transformers reads for exactly this (its submodels inherit it).
mm.MiniMaxPreTrainedModel._keys_to_ignore_on_load_missing = [rf"self_attn\.({'|'.join(DECAY_BUFFERS)})$"]


class PackedLightningAttention(mm.MiniMaxLightningAttention):
    """transformers' lightning layer with document-isolated state (see `alignment.lightning`)."""

    lightning_kernel = "auto"  # set per model by `load_model` (ModelOptions.lightning_kernel)

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs):
        continuing = past_key_values is not None and past_key_values.get_linear_cache(self.layer_idx) is not None
        if continuing:  # decode step from a cached state: transformers' recurrent step is already exact
            return super().forward(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
        B, T, _ = hidden_states.shape
        docs = _layer_document_ids(kwargs, B)
        context = kwargs.get("context_parallel")  # this row is one rank's slice (alignment.context_parallel)
        kernel = resolve_lightning_kernel(self.lightning_kernel, hidden_states.device)
        if kernel == "fla_fused":  # the whole layer fused (alignment.kernels.lightning_layer_fla)
            out, state = lightning_layer_fla(self, hidden_states, attention_mask, docs, past_key_values is not None,
                                             context)
        else:
            qkv = self.act_fn(self.qkv_proj(hidden_states))
            qkv = mm.apply_mask_to_padding_states(qkv, attention_mask)
            q, k, v = qkv.reshape(B, T, self.num_attention_heads, 3 * self.head_dim).transpose(1, 2).chunk(3, dim=-1)
            slope = self.slope_fp32(q.device)
            # the exchange adds states in float32 at least (a bf16 state would be rounded before it is passed)
            state_dtype = None if context is None else torch.promote_types(q.dtype, torch.float32)
            if kernel == "fla":  # fla's chunk kernel for the attention; norm and gate below (measured in bench/)
                out, state = lightning_attention_fla(q, k, v, slope, docs, past_key_values is not None or
                                                     context is not None, state_dtype)
            else:
                out, state = lightning_attention(q, k, v, slope, docs, self.block_size, state_dtype)
            if context is not None:  # add the state entering this slice (in fla's (B, T, H, D) layout: views)
                out, state = lightning_exchange(out.transpose(1, 2), q.transpose(1, 2), state, slope, context)
                out = out.transpose(1, 2)
            out = self.norm(out.transpose(1, 2).reshape(B, T, -1))
            out = self.out_proj(torch.sigmoid(self.output_gate(hidden_states)) * out)
        if past_key_values is not None:
            past_key_values.set_linear_cache(self.layer_idx, state)
        return out, state

    def get_slope_rate(self, device=None) -> torch.Tensor:
        """(H, 1, 1) decay rates for transformers' buffers and decode step: the released formula
        (`alignment.lightning.lightning_slopes`), not transformers' (which differs for non-power-of-two heads)."""
        return lightning_slopes(self.num_attention_heads, self.layer_idx, self.num_hidden_layers, device)[:, None, None]

    def reset_decay_buffers(self) -> None:
        """Recompute the decay buffers (built by the stock class's formula) from `get_slope_rate`, in their dtype."""
        slope = self.get_slope_rate(self.slope_rate.device)
        for name, value in zip(DECAY_BUFFERS, (slope, *self.decay_factors(slope))):
            getattr(self, name).copy_(value)

    def slope_fp32(self, device) -> torch.Tensor:
        """This layer's decay rates in float32 (`alignment.lightning.lightning_slopes`), not the `slope_rate` buffer,
        which a bf16 model holds rounded; cached per device (a plain attribute, so `.to(dtype)` leaves it alone)."""
        cached = getattr(self, "_slope_fp32", None)
        if cached is None or cached.device != torch.device(device):
            cached = lightning_slopes(self.num_attention_heads, self.layer_idx, self.num_hidden_layers, device)
            self._slope_fp32 = cached
        return cached


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """RoPE on (B, H, T, D) queries and keys, over the first `cos.shape[-1]` dims of each head (NeoX halves within
    them), the rest passed through unchanged: the released models' partial rotary (vLLM's `get_rope` with
    `rotary_dim < head_size`). With cos/sin as wide as the head it is transformers' `apply_rotary_pos_emb` exactly.

    >>> q = torch.arange(8.0).view(1, 1, 1, 8)
    >>> cos, sin = torch.zeros(1, 1, 4), torch.ones(1, 1, 4)    # a quarter turn of the 4 rotated dims
    >>> apply_rotary(q, q, cos, sin)[0].flatten().tolist()        # (x0, x1, x2, x3) -> (-x2, -x3, x0, x1); 4..7 kept
    [-2.0, -3.0, 0.0, 1.0, 4.0, 5.0, 6.0, 7.0]
    """
    dim = cos.shape[-1]
    if dim == q.shape[-1]:
        return mm.apply_rotary_pos_emb(q, k, cos, sin)
    q_rot, k_rot = mm.apply_rotary_pos_emb(q[..., :dim], k[..., :dim], cos, sin)
    return torch.cat([q_rot, q[..., dim:]], dim=-1), torch.cat([k_rot, k[..., dim:]], dim=-1)


class PartialRotaryEmbedding(mm.MiniMaxRotaryEmbedding):
    """transformers' MiniMax rotary embedding with its frequency ladder over `rotary_dim` instead of the whole head
    (transformers' MiniMax reads no partial-rotary field): cos/sin are `rotary_dim` wide, for `apply_rotary`."""

    @staticmethod
    def compute_default_rope_parameters(config, device=None, seq_len=None, **kwargs):
        base = config.rope_parameters["rope_theta"]
        dim = rotary_dim(config)
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float)
                                   / dim))
        return inv_freq, 1.0


class PackedSoftmaxAttention(mm.MiniMaxAttention):
    """transformers' softmax layer with partial RoPE (`apply_rotary`); for a packed, unpadded prefill it attends
    document by document (causal SDPA on each slice: Σ len² work instead of a T × T same-document mask, which
    dominates CPU steps on packed rows). Every other case goes through transformers' attention interface, as the
    stock layer does."""

    lightning_kernel = "auto"  # the fast path (CUDA, half precision) uses one flash varlen call for all documents

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs):
        B, T, _ = hidden_states.shape
        docs = _layer_document_ids(kwargs, B)
        fresh = past_key_values is None or past_key_values.get_seq_length(self.layer_idx) == 0
        shape = (B, T, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)  # (B, H_kv, T, D)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        q, k = apply_rotary(q, k, *position_embeddings)
        context = kwargs.get("context_parallel")
        if context is not None:  # this row is one rank's slice: attend across slices (alignment.context_parallel)
            out = context_parallel_softmax(q, k, v, context, self.scaling)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, -1)), None
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        per_document = docs is not None and attention_mask is None and fresh and \
            self.config._attn_implementation in ("sdpa", "eager")
        if not per_document:
            kwargs.pop("document_ids", None)
            attend = mm.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                              mm.eager_attention_forward)
            out, weights = attend(self, q, k, v, attention_mask, dropout=0.0 if not self.training else
                                  self.attention_dropout, scaling=self.scaling,
                                  sliding_window=getattr(self.config, "sliding_window", None), **kwargs)
            return self.o_proj(out.reshape(B, T, -1).contiguous()), weights
        if varlen_softmax_available(self.lightning_kernel, q):
            out = varlen_softmax_attention(q, k, v, docs, self.scaling).transpose(1, 2).reshape(B, T, -1)
            return self.o_proj(out), None
        k, v = mm.repeat_kv(k, self.num_key_value_groups), mm.repeat_kv(v, self.num_key_value_groups)
        rows = []
        for b in range(B):
            lengths = torch.unique_consecutive(docs[b], return_counts=True)[1].tolist()
            pieces = [F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=self.scaling)
                      for qd, kd, vd in zip(*(x[b : b + 1].split(lengths, dim=2) for x in (q, k, v)))]
            rows.append(torch.cat(pieces, dim=2))
        out = torch.cat(rows, dim=0).transpose(1, 2).reshape(B, T, -1)  # (B, T, H·D)
        return self.o_proj(out), None


class MiniMaxDecodeCache(mm.MiniMaxCache):
    """transformers' `MiniMaxCache` answering "how many tokens are cached" from a softmax layer.

    `DynamicCache.get_seq_length()` reads layer 0 by default, and in MiniMax layer 0 is a lightning layer that keeps
    no keys, so stock decoding restarts positions (RoPE, mask offsets) at 0 after the prompt: greedy answers go wrong
    while teacher-forced logits look fine. Lightning layers have no length of their own, so any query about one is
    answered from the first softmax layer.
    """

    def __init__(self, layer_types: list[str]):
        super().__init__()
        self.full_attention_layer = layer_types.index("full_attention") if "full_attention" in layer_types else 0
        self.linear_layers = {i for i, kind in enumerate(layer_types) if kind == "linear_attention"}

    def _layer(self, layer_idx: int) -> int:
        return self.full_attention_layer if layer_idx in self.linear_layers else layer_idx

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(self._layer(layer_idx))

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return super().get_mask_sizes(query_length, self._layer(layer_idx))


def same_document_masks(model: mm.MiniMaxModel, args: tuple, kwargs: dict):
    """Forward pre-hook on `MiniMaxModel`: installs `MiniMaxDecodeCache` when a cache is wanted, and for a prefill
    computes the packed document ids once (`document_ids`, read by every layer). Packed unpadded rows need no mask
    (layers isolate documents themselves); packed padded rows get a causal ∧ same-document ∧ not-padding mask.
    With a context-parallel group set (`alignment.context_parallel.set_context_parallel`) the inputs are one rank's
    slices and the layers get the plan instead (`_context_parallel_kwargs`)."""
    group = getattr(model, "context_parallel_group", None)
    if group is not None:
        return args, _context_parallel_kwargs(model, group, kwargs)
    use_cache = kwargs.get("use_cache")
    if (model.config.use_cache if use_cache is None else use_cache) and kwargs.get("past_key_values") is None:
        kwargs = {**kwargs, "past_key_values": MiniMaxDecodeCache(model.config.layer_types)}
    position_ids, attention_mask = kwargs.get("position_ids"), kwargs.get("attention_mask")
    cache = kwargs.get("past_key_values")
    prefill = cache is None or cache.get_seq_length() == 0
    # flash-attention kernels isolate documents themselves from position_ids / cu_seq_lens.
    if position_ids is None or args or not prefill or isinstance(attention_mask, dict) \
            or model.config._attn_implementation.startswith("flash"):
        return args, kwargs
    inputs_embeds = kwargs.get("inputs_embeds")
    if inputs_embeds is None:
        inputs_embeds = model.embed_tokens(kwargs["input_ids"])
    docs = _packed_document_ids(position_ids, inputs_embeds.shape[0])
    kwargs = {**kwargs, "inputs_embeds": inputs_embeds, "input_ids": None, "document_ids": docs}
    if docs is None:
        return args, kwargs
    if attention_mask is None or bool(attention_mask.all()):
        # no padding: softmax layers attend per document (PackedSoftmaxAttention), lightning layers need no mask
        return args, {**kwargs, "attention_mask": {"full_attention": None, "linear_attention": None}}

    # padded packed rows: causal ∧ same-document ∧ not-padding mask. (The explicit 2D mask also keeps transformers'
    # own packing detection off; it would remap the indices `same_document` receives to in-document positions.)
    def same_document(batch_idx, head_idx, q_idx, kv_idx):
        return docs[batch_idx, q_idx] == docs[batch_idx, kv_idx]

    mask_kwargs = dict(config=model.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                       past_key_values=cache, position_ids=position_ids)
    masks = {
        "full_attention": create_causal_mask(**mask_kwargs, and_mask_function=same_document),
        "linear_attention": create_recurrent_attention_mask(**mask_kwargs),
    }
    return args, {**kwargs, "attention_mask": masks}


def _context_parallel_kwargs(model: mm.MiniMaxModel, group, kwargs: dict) -> dict:
    """The pre-hook's work for one rank's slices of packed rows (`alignment.context_parallel.set_context_parallel`):
    the plan, this slice's document ids, no masks (layers isolate documents themselves), no cache."""
    position_ids, attention_mask = kwargs.get("position_ids"), kwargs.get("attention_mask")
    if position_ids is None or kwargs.get("input_ids") is None and kwargs.get("inputs_embeds") is None:
        raise ValueError("context parallelism needs the rows' input_ids and position_ids as keywords (each rank "
                         "passes its slice of them)")
    if attention_mask is not None and not (isinstance(attention_mask, torch.Tensor) and bool(attention_mask.all())):
        raise ValueError("context parallelism takes unpadded packed rows: got an attention mask with padding "
                         "(pad with alignment.context_parallel.pad_rows instead)")
    if model.config._attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"context parallelism runs its own softmax attention; attn_implementation "
                         f"'{model.config._attn_implementation}' is not supported (use sdpa)")
    inputs_embeds = kwargs.get("inputs_embeds")
    if inputs_embeds is None:
        inputs_embeds = model.embed_tokens(kwargs["input_ids"])
    context = context_parallel_plan(position_ids.expand(inputs_embeds.shape[0], -1), group)
    return {**kwargs, "inputs_embeds": inputs_embeds, "input_ids": None, "past_key_values": None,
            "use_cache": False, "document_ids": context.local_docs, "context_parallel": context,
            "attention_mask": {"full_attention": None, "linear_attention": None}}


class FP32LMHead(torch.nn.Linear):
    """LM head computed in float32 whatever the model dtype (MiniMax-M1 §3)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states.float(), self.weight.float(), None if self.bias is None else self.bias.float())


def _packed_document_ids(position_ids: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
    """(B, T) document ids if any row holds more than one document, else None (the unpacked fast path)."""
    if position_ids is None or position_ids.shape[-1] < 2:
        return None
    docs = document_ids(position_ids.reshape(-1, position_ids.shape[-1]).expand(batch_size, -1))
    return docs if bool(docs[:, -1].any()) else None


def _layer_document_ids(layer_kwargs: dict, batch_size: int) -> torch.Tensor | None:
    """The document ids the model's pre-hook computed once for this forward, else derived from `position_ids`."""
    if "document_ids" in layer_kwargs:
        return layer_kwargs["document_ids"]
    return _packed_document_ids(layer_kwargs.get("position_ids"), batch_size)


def make_packing_safe(model: torch.nn.Module) -> torch.nn.Module:
    """Swap in the packing-safe attention layers, hook the mask builder, and give a `rotary_dim` config its partial
    RoPE (`PartialRotaryEmbedding`), for any MiniMax model: policy, reward model, a reference TRL rebuilt (in place;
    parameters untouched; the lightning decay buffers stop being saved, so checkpoints hold only weights)."""
    for module in model.modules():
        if isinstance(module, mm.MiniMaxModel) and rotary_dim(module.config) < head_dim(module.config) and \
                not isinstance(module.rotary_emb, PartialRotaryEmbedding):
            module.rotary_emb = PartialRotaryEmbedding(module.config).to(module.embed_tokens.weight.device)
        if type(module) is mm.MiniMaxLightningAttention:
            module.__class__ = PackedLightningAttention
            module.reset_decay_buffers()
            # the decay buffers are functions of the config, not weights: not saved (the released files and vLLM's
            # loader have none; transformers recomputes them when a checkpoint lacks them)
            module._non_persistent_buffers_set.update(DECAY_BUFFERS)
        elif type(module) is mm.MiniMaxAttention:
            module.__class__ = PackedSoftmaxAttention
        elif isinstance(module, mm.MiniMaxModel) and not getattr(module, "_same_document_masks", False):
            module.register_forward_pre_hook(same_document_masks, with_kwargs=True)
            module._same_document_masks = True
    return model


def model_config_from_yaml(path: str | Path) -> MiniMaxConfig:
    """A `MiniMaxConfig` from a model YAML. Keys are `MiniMaxConfig` fields, plus two shorthands:
    `rope_theta` (-> `rope_parameters`) and `full_attention_every: N` (layer i is softmax when (i+1) % N == 0, as in
    MiniMax-Text-01 with N = 8); `rotary_dim` (RoPE on that many leading dims of each head, as released: 64 of
    128) is kept on the config."""
    data = read_yaml(path)
    valid = {f.name for f in dataclasses.fields(MiniMaxConfig)} | {"rope_theta", "full_attention_every", "rotary_dim"}
    for key in data:
        if key not in valid:
            raise ConfigError(f"{path}: unknown model key '{key}' (not a MiniMaxConfig field)")
    every = data.pop("full_attention_every", None)
    if every is not None:
        if "layer_types" in data:
            raise ConfigError(f"{path}: give either 'layer_types' or 'full_attention_every', not both")
        n = data.get("num_hidden_layers", 32)
        data["layer_types"] = ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(n)]
    if "rope_theta" in data:
        data["rope_parameters"] = {"rope_type": "default", "rope_theta": float(data.pop("rope_theta"))}
    dim = data.pop("rotary_dim", None)
    try:
        config = MiniMaxConfig(**data)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path}: invalid model config: {err}") from None
    if dim is not None:
        config.rotary_dim = dim
    return config


def load_model(spec: str | Path | ModelOptions, seed: int = 0, *, head: Literal["lm", "score"] = "lm",
               tokenizer=None) -> torch.nn.Module:
    """The one model loader: policy, reference and reward models, from a checkpoint directory or a model YAML
    (fresh weights, seeded by `seed`), packing-safe.

    `head="lm"`: `MiniMaxForCausalLM` with the `ModelOptions` applied (FP32 LM head, LoRA, kernels, ...).
    `head="score"`: a one-logit sequence classifier (reward models): `MiniMaxForSequenceClassification` from a MiniMax
    checkpoint (a causal-LM checkpoint gets a fresh score head, seeded) or a model YAML; another architecture loads
    through `AutoModelForSequenceClassification`.
    `tokenizer` (from `load_tokenizer`, or the built-in one): checked against the model's vocabulary, and its pad /
    EOS ids written into the model's config and generation config - the one place that sets them.
    The model ends on `spec.device` (`resolve_device`; left where it loaded under an active ZeRO-3 config).
    """
    opts = spec if isinstance(spec, ModelOptions) else ModelOptions(path=str(spec))
    check_lightning_kernel(opts.lightning_kernel)
    path = Path(opts.path)
    dtype = getattr(torch, opts.dtype)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.path: '{path}' is not a checkpoint directory (no config.json)")
    elif path.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"model.path: '{path}' is neither a checkpoint directory nor a model YAML"
                          + ("" if path.exists() else " (it does not exist)"))
    if head == "score":
        model = _load_score_model(path, dtype, seed)
    elif head == "lm":
        model = _load_causal_lm(path, opts, dtype, seed)
    else:
        raise ValueError(f"head must be 'lm' or 'score', got {head!r}")
    if tokenizer is not None:
        _attach_tokenizer(model, tokenizer, path)
    device = resolve_device(opts.device)
    if device.type != "cpu" and not _zero3_active():
        model.to(device)
    return model


def _load_causal_lm(path: Path, opts: ModelOptions, dtype, seed: int) -> torch.nn.Module:
    config = checkpoint_config(path) if path.is_dir() else model_config_from_yaml(path)
    if config is None:
        raise ConfigError(f"{path / 'config.json'}: model_type is not a MiniMax model (expected minimax, "
                          f"{', '.join(RELEASED_MODEL_TYPES)})")
    if opts.rope_theta is not None:
        config.rope_parameters = {**(config.rope_parameters or {}), "rope_type": "default",
                                  "rope_theta": float(opts.rope_theta)}
    if opts.router_aux_loss_coef is not None:
        config.router_aux_loss_coef = opts.router_aux_loss_coef
        config.output_router_logits = opts.router_aux_loss_coef > 0

    if path.is_dir():
        model = MiniMaxForCausalLM.from_pretrained(path, config=config, dtype=dtype,
                                                   attn_implementation=opts.attn_implementation)
    else:
        config._attn_implementation = opts.attn_implementation
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = MiniMaxForCausalLM(config).to(dtype)
        # .to(dtype) also rounded RoPE's inverse frequencies (in bf16, ~0.3 rad of phase off by position 256);
        # from_pretrained and vLLM keep them in fp32: rebuild the (parameter-free) rotary module in fp32
        model.model.rotary_emb = mm.MiniMaxRotaryEmbedding(config)
    model.config.postnorm = True  # saved with every checkpoint: vLLM reads it (its default is a pre-norm network)
    make_packing_safe(model)
    for module in model.modules():
        if isinstance(module, (PackedLightningAttention, PackedSoftmaxAttention)):
            module.lightning_kernel = opts.lightning_kernel

    if opts.fp32_lm_head:
        if not config.tie_word_embeddings:
            model.lm_head.float()
        model.lm_head.__class__ = FP32LMHead
    if opts.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if opts.lora is not None:
        model = apply_lora(model, opts.lora)
    return model


def _load_score_model(path: Path, dtype, seed: int) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification, MiniMaxForSequenceClassification

    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the score head of a causal-LM checkpoint (or a fresh model) is initialised here
        config = checkpoint_config(path) if path.is_dir() else None
        if config is not None:  # a MiniMax checkpoint, either layout
            config.num_labels = 1
            model = MiniMaxForSequenceClassification.from_pretrained(path, config=config, dtype=dtype)
        elif path.is_dir():
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
        else:
            config = model_config_from_yaml(path)
            config.num_labels = 1
            model = MiniMaxForSequenceClassification(config).to(dtype)
    if model.config.num_labels != 1:
        raise ConfigError(f"{path}: a reward model needs num_labels=1, got {model.config.num_labels}")
    return make_packing_safe(model)


def _attach_tokenizer(model, tokenizer, path: Path) -> None:
    if tokenizer.pad_token_id is None:  # many released tokenizers have none; batching needs one
        tokenizer.pad_token = tokenizer.eos_token
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if len(tokenizer) > base.config.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model '{path}' has vocab_size "
                          f"{base.config.vocab_size}")
    for conf in (base.config, getattr(base, "generation_config", None)):
        if conf is not None:
            conf.pad_token_id, conf.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id


def load_tokenizer(path: str | Path, key: str = "model.path"):
    """The tokenizer saved in a local directory; `key` names the config key that pointed here in the error."""
    from transformers import AutoTokenizer

    if not Path(path, "tokenizer_config.json").is_file():
        raise ConfigError(f"{key}: no tokenizer in '{path}' (no tokenizer_config.json; for a model YAML with fresh "
                          "weights set tokenizer: builtin)")
    # A released checkpoint's config.json names MiniMax's remote code (auto_map): AutoTokenizer would read it through
    # AutoConfig and stop to ask whether to run that code. The tokenizer needs no model code; hand it the config.
    config = checkpoint_config(Path(path)) if Path(path, "config.json").is_file() else None
    return AutoTokenizer.from_pretrained(path, **({"config": config} if config is not None else {}))


def apply_lora(model: torch.nn.Module, lora: LoraOptions):
    """Wrap with a peft LoRA adapter on the attention and (optionally) expert projections, never the router."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
        target_modules=list(lora.target_modules),
        target_parameters=list(LORA_EXPERT_TARGETS) if lora.experts else None,
    )
    return get_peft_model(model, config)


def stock_model_copy(model: MiniMaxForCausalLM) -> MiniMaxForCausalLM:
    """The same weights in an unmodified transformers model (for equivalence tests and benchmarks)."""
    stock = MiniMaxForCausalLM(model.config).to(next(model.parameters()).dtype)
    missing, unexpected = stock.load_state_dict(model.state_dict(), strict=False)
    # the stock layers keep transformers' own decay buffers (its formula, `alignment.lightning.lightning_slopes`),
    # which `model` does not save
    assert not unexpected and all(name.rsplit(".", 1)[-1] in DECAY_BUFFERS for name in missing), (missing, unexpected)
    return stock.eval()
