"""GPU fast path for the packing-safe MiniMax model: fused lightning attention, varlen softmax attention, and a loss
that never holds the full logits.

Lightning attention (`alignment.lightning`, method.md "The model family") is causal linear attention with a constant
per-head decay λ_h = exp(-slope_h) and no 1/√d scale:

    o_t = Σ_{s ≤ t, doc(s) = doc(t)}  λ_h^(t-s) · (q_t · k_s) · v_s

flash-linear-attention's `chunk_simple_gla` (Triton) computes simple gated linear attention,
`o_t = scale · Σ_{s ≤ t} exp(G_t - G_s) (q_t · k_s) v_s` with `G_t = Σ_{r ≤ t} g_r`; a data-independent per-head
log-decay `g_gamma` makes `G_t - G_s = (t - s) · g_gamma`. So lightning attention is exactly
`chunk_simple_gla(q, k, v, g_gamma=-slope, scale=1.0)`, and `cu_seqlens` (one entry per packed document, rows
flattened into one sequence) restarts the state at every document start as the CPU reference does. The slope is the
layer's float32 decay (`PackedLightningAttention.slope_fp32`; the `slope_rate` buffer is rounded in a bf16 model),
as in the torch reference and the vLLM rollout engine. `LightningChunk` runs fla's own kernels in that function's
order but keeps the forward's chunk states for the backward (fla recomputes them; bench/results/train_bench.md:
3.34 → 2.63 ms fwd+bwd at 32K tokens).

Around the kernel, the whole layer (`lightning_layer_fla`) moves each activation through memory once: one Triton
kernel applies the SiLU to the qkv projection and writes q, k, v straight into the (B, T, H, D) layout fla reads
(`silu_split_heads`; no transposes, no copies in fla's `input_guard`), fla's output (B, T, H, D) is already the
(B, T, H·D) row the norm wants, and fla's fused `rms_norm_gated` computes transformers'
`sigmoid(gate) · RMSNorm(o)` in one pass (fp32 inside, one rounding). The projections stay transformers' modules.

Softmax layers of packed, unpadded rows use torch's flash-attention varlen kernel (`torch.nn.attention.varlen`) with
the same document boundaries; elsewhere they keep the per-document SDPA loop of `alignment.modeling`.

Loss: at long lengths the logits dominate memory (vocab 32000 × 4 bytes = 128 KB per token in fp32), so
`lm_loss` computes linear + cross-entropy chunk by chunk — Liger-Kernel's fused linear cross-entropy on CUDA when it
is installed, else a plain-torch loop whose chunks are recomputed in backward (`chunked_cross_entropy`).

The CPU reference (`alignment.lightning.lightning_attention`) stays the ground truth; `resolve_lightning_kernel`
picks the path (`ModelOptions.lightning_kernel`: auto = the fused layer on CUDA when the package is installed).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.models.minimax import modeling_minimax as mm

try:  # CUDA machines (torch's CUDA wheels bring Triton); the CPU path never needs it
    import triton
    import triton.language as tl
except ImportError:
    triton = None

LIGHTNING_KERNELS = ("auto", "torch", "fla", "fla_fused")
GPU_EXTRA_HINT = "install the GPU extra: pip install -e '.[gpu]' (flash-linear-attention)"


@cache
def fla_available() -> bool:
    return importlib.util.find_spec("fla") is not None


@cache
def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def check_lightning_kernel(kernel: str) -> None:
    """Fail before any work when the option names an unknown kernel or one whose package is missing."""
    if kernel not in LIGHTNING_KERNELS:
        raise ValueError(f"lightning_kernel: '{kernel}' is not one of {', '.join(LIGHTNING_KERNELS)}")
    if kernel.startswith("fla") and not fla_available():
        raise ImportError(f"lightning_kernel: '{kernel}' needs the flash-linear-attention package; {GPU_EXTRA_HINT}, "
                          "or set lightning_kernel: auto")


def resolve_lightning_kernel(kernel: str, device: torch.device) -> str:
    """The kernel for tensors on `device`: auto = fla_fused on CUDA when flash-linear-attention is installed, else
    torch."""
    check_lightning_kernel(kernel)
    if kernel == "auto":
        return "fla_fused" if device.type == "cuda" and fla_available() else "torch"
    if kernel.startswith("fla") and device.type != "cuda":
        raise ValueError(f"lightning_kernel: '{kernel}' runs on CUDA tensors only, got {device.type} "
                         "(use 'auto' to fall back to the torch reference)")
    return kernel


def limit_triton_autotuning(num_warps: int = 4, num_stages: int = 2, max_configs: int = 4,
                            full_up_to: int = 8) -> None:
    """Make Triton's autotuner (flash-linear-attention's kernels use it) try fewer configurations: kernels with at
    most `full_up_to` configurations are tuned fully (cheap: fla's output, gradient and norm kernels), larger spaces
    (fla's 48-configuration state kernels `chunk_fwd_h` / `chunk_bwd_dh`) at most `max_configs`, those with
    `num_warps` / `num_stages` when there are any (one per tile shape). Full tuning is minutes per shape on a fresh
    machine: a long training run amortises that (fla caches the results on disk), a benchmark or test on a
    short-lived GPU machine cannot. Opt-in, process-wide (or ALIGNMENT_LIMIT_AUTOTUNE=1 in the environment, read
    at import); without it a user gets fla's full tuning."""
    from triton.runtime.autotuner import Autotuner

    if getattr(Autotuner, "_limited", False):
        return
    prune = Autotuner.prune_configs

    def limited(self, kwargs):
        configs = prune(self, kwargs)
        if len(configs) <= full_up_to:
            return configs
        preferred = [c for c in configs if c.num_warps == num_warps and c.num_stages == num_stages]
        return (preferred or [c for c in configs if c.num_warps == num_warps] or configs)[:max_configs]

    Autotuner.prune_configs = limited
    Autotuner._limited = True


if triton is not None and os.environ.get("ALIGNMENT_LIMIT_AUTOTUNE") == "1":
    limit_triton_autotuning()


def packed_cu_seqlens(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Document boundaries of packed rows (B, T), rows flattened into one sequence of B·T tokens.

    Returns `cu_seqlens` (N + 1,) int64 on the device (every row start is a boundary too), its CPU copy (one device
    sync, so the kernels need none), and for each row the index of its last document (B,).

    >>> cu, cu_cpu, last = packed_cu_seqlens(torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]]))
    >>> cu.tolist(), last.tolist()
    ([0, 2, 5, 6, 8, 10], [1, 4])
    """
    B, T = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    cu = F.pad(starts.flatten().nonzero().flatten(), (0, 1), value=B * T)
    last = starts.sum(1).cumsum(0) - 1
    return cu, cu.cpu(), last


# the keyword arguments `LightningChunk` passes to each of fla's kernels (fla 0.6's signatures)
_FLA_KWARGS = {
    "fwd_h": {"k", "v", "g", "g_gamma", "gk", "gv", "h0", "output_final_state", "cu_seqlens", "chunk_size",
              "states_in_fp32"},
    "fwd_o": {"q", "k", "v", "h", "g", "g_gamma", "scale", "cu_seqlens", "chunk_size", "chunk_indices"},
    "bwd_dh": {"q", "k", "v", "g", "g_gamma", "gk", "gv", "do", "h0", "dht", "scale", "cu_seqlens", "chunk_size",
               "states_in_fp32"},
    "bwd_dqkwg": {"q", "k", "v", "h", "g", "g_gamma", "do", "dh", "scale", "cu_seqlens", "chunk_size",
                  "chunk_indices"},
    "bwd_dv": {"q", "k", "g", "g_gamma", "do", "dh", "scale", "cu_seqlens", "chunk_size", "chunk_indices"},
}


@cache
def _fla_chunk_ops():
    """fla's kernels behind `chunk_simple_gla` (fla.ops.common), or None where an fla lays them out otherwise (other
    modules or keyword arguments than fla 0.6's): then `chunk_simple_gla` itself runs."""
    try:
        from fla.ops.common.chunk_h import chunk_bwd_dh, chunk_fwd_h
        from fla.ops.common.chunk_o import chunk_bwd_dqkwg, chunk_bwd_dv, chunk_fwd_o
        from fla.ops.utils import prepare_chunk_indices
        from fla.ops.utils.constant import RCP_LN2
    except ImportError:
        return None
    ops = dict(fwd_h=chunk_fwd_h, fwd_o=chunk_fwd_o, bwd_dh=chunk_bwd_dh, bwd_dqkwg=chunk_bwd_dqkwg,
               bwd_dv=chunk_bwd_dv)
    if any(not names <= set(inspect.signature(ops[op]).parameters) for op, names in _FLA_KWARGS.items()):
        return None
    return {**ops, "chunk_indices": prepare_chunk_indices, "rcp_ln2": RCP_LN2}


class LightningChunk(torch.autograd.Function):
    """fla's `ChunkSimpleGLAFunction` for a constant decay (`g_gamma`, no initial state), keeping the forward's
    per-chunk states for the backward. fla recomputes them there in float32 (`chunk_fwd_h`, a sequential pass over
    the chunks: 0.54 of its 3.0 device-ms fwd+bwd at 32K tokens, H16 × D128), but its gradient kernel rounds them to
    the inputs' dtype before every use, so the forward's bf16 states give the same gradients. Costs the states' memory
    between forward and backward: T/64 × H × D² values (268 MB at 32K for H16 × D128)."""

    @staticmethod
    def forward(ctx, q, k, v, g_gamma, cu_seqlens, cu_seqlens_cpu, output_final_state: bool):
        ops = _fla_chunk_ops()
        ctx.set_materialize_grads(False)  # an unused final state gets no zero gradient to push through
        indices = None if cu_seqlens is None else ops["chunk_indices"](cu_seqlens, 64, cu_seqlens_cpu=cu_seqlens_cpu)
        g_gamma = g_gamma * ops["rcp_ln2"]  # fla's kernels use exp2
        common = dict(g=None, g_gamma=g_gamma, cu_seqlens=cu_seqlens, chunk_size=64)
        h, final = ops["fwd_h"](k=k, v=v, gk=None, gv=None, h0=None, output_final_state=output_final_state,
                                states_in_fp32=False, **common)
        out = ops["fwd_o"](q=q, k=k, v=v, h=h, scale=1.0, chunk_indices=indices, **common)
        ctx.save_for_backward(q, k, v, g_gamma, h, cu_seqlens, indices)
        return out, final

    @staticmethod
    def backward(ctx, d_out, d_final):
        ops = _fla_chunk_ops()
        q, k, v, g_gamma, h, cu_seqlens, indices = ctx.saved_tensors
        d_out = d_out.contiguous()
        common = dict(g=None, g_gamma=g_gamma, cu_seqlens=cu_seqlens, chunk_size=64)
        dh, _ = ops["bwd_dh"](q=q, k=k, v=v, gk=None, gv=None, do=d_out, h0=None, dht=d_final, scale=1.0,
                              states_in_fp32=True, **common)
        dq, dk, _, _ = ops["bwd_dqkwg"](q=q, k=k, v=v, h=h, do=d_out, dh=dh, scale=1.0, chunk_indices=indices,
                                        **common)
        dv = ops["bwd_dv"](q=q, k=k, do=d_out, dh=dh, scale=1.0, chunk_indices=indices, **common)
        return dq.to(q), dk.to(k), dv.to(v), None, None, None, None


def _chunk_lightning(q, k, v, g_gamma, output_state: bool, cu_seqlens=None, cu_seqlens_cpu=None):
    """(out, final states): `LightningChunk` where fla has the kernels it calls, else `chunk_simple_gla`."""
    if _fla_chunk_ops() is not None:
        return LightningChunk.apply(q.contiguous(), k.contiguous(), v.contiguous(), g_gamma, cu_seqlens,
                                    cu_seqlens_cpu, output_state)
    from fla.ops.simple_gla import chunk_simple_gla

    return chunk_simple_gla(q, k, v, g_gamma=g_gamma, scale=1.0, output_final_state=output_state,
                            cu_seqlens=cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu)


def lightning_attention_fla_bthd(q, k, v, slope, doc_ids=None, output_state: bool = True, state_dtype=None):
    """Lightning attention on flash-linear-attention's `chunk_simple_gla` in fla's own layout.

    q, k, v: (B, T, H, D), contiguous (otherwise fla copies them); slope: H values (any shape); doc_ids: (B, T) or
    None. Returns out (B, T, H, D) in v's dtype and, if `output_state`, the (B, H, D, D) state after each row's last
    document (of that document only; in `state_dtype`, default v's), else None.
    """
    B, T, H, D = q.shape
    g_gamma = -slope.reshape(H).float()  # log decay per step: λ = exp(-slope)
    if doc_ids is None:
        out, state = _chunk_lightning(q, k, v, g_gamma, output_state)
    else:
        cu, cu_cpu, last = packed_cu_seqlens(doc_ids)
        q, k, v = (x.reshape(1, B * T, H, D) for x in (q, k, v))  # rows flattened: a view, no copy
        out, states = _chunk_lightning(q, k, v, g_gamma, output_state, cu, cu_cpu)
        out = out.reshape(B, T, H, D)
        state = states[last] if output_state else None  # (B, H, D, D): each row's last document
    return out.to(v.dtype), None if state is None else state.to(state_dtype or v.dtype)


def lightning_attention_fla(q, k, v, slope, doc_ids=None, output_state: bool = True, state_dtype=None):
    """`alignment.lightning.lightning_attention` on fla (same arguments and results; the state is None unless
    `output_state`): q, k, v (B, H, T, D) -> out (B, H, T, D), state (B, H, D, D). The transposes to fla's layout
    cost a copy of each input; the model's layer avoids them (`lightning_layer_fla`)."""
    out, state = lightning_attention_fla_bthd(*(x.transpose(1, 2) for x in (q, k, v)), slope, doc_ids,
                                              output_state, state_dtype)
    return out.transpose(1, 2), state


if triton is not None:
    @triton.jit
    def _silu_split_fwd_kernel(x, q, k, v, rows, D: tl.constexpr, BR: tl.constexpr):
        """x: (rows, 3·D) with rows = B·T·H (each head's [q | k | v]); q, k, v: (rows, D) = silu of each third."""
        r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)
        c = tl.arange(0, D)
        mask = (r < rows)[:, None]
        src = x + r[:, None] * (3 * D) + c[None, :]
        dst = r[:, None] * D + c[None, :]
        a = tl.load(src, mask=mask).to(tl.float32)
        tl.store(q + dst, (a * tl.sigmoid(a)).to(q.dtype.element_ty), mask=mask)
        a = tl.load(src + D, mask=mask).to(tl.float32)
        tl.store(k + dst, (a * tl.sigmoid(a)).to(k.dtype.element_ty), mask=mask)
        a = tl.load(src + 2 * D, mask=mask).to(tl.float32)
        tl.store(v + dst, (a * tl.sigmoid(a)).to(v.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_grad(x, grad, dx, wide, narrow, mask):
        """dx = grad · silu'(x), silu'(a) = s · (1 + a · (1 - s)), s = sigmoid(a) (torch's formula)."""
        a = tl.load(x + wide, mask=mask).to(tl.float32)
        g = tl.load(grad + narrow, mask=mask).to(tl.float32)
        s = tl.sigmoid(a)
        tl.store(dx + wide, (g * s * (1 + a * (1 - s))).to(dx.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_split_bwd_kernel(x, dq, dk, dv, dx, rows, D: tl.constexpr, BR: tl.constexpr):
        """dx (rows, 3·D) = [dq | dk | dv] · silu'(x)."""
        r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)
        c = tl.arange(0, D)
        mask = (r < rows)[:, None]
        wide = r[:, None] * (3 * D) + c[None, :]
        narrow = r[:, None] * D + c[None, :]
        _silu_grad(x, dq, dx, wide, narrow, mask)
        _silu_grad(x, dk, dx, wide + D, narrow, mask)
        _silu_grad(x, dv, dx, wide + 2 * D, narrow, mask)


def _silu_split_grid(rows: int, D: int) -> tuple[int, int]:
    BR = max(1, 4096 // D)  # 4K elements of each of q, k, v per program
    return BR, triton.cdiv(rows, BR)


class SiluSplitHeads(torch.autograd.Function):
    """(B, T, H·3·D) qkv projection -> silu'd q, k, v, each (B, T, H, D) contiguous: one read, three writes (and one
    pass back), where silu + split + fla's contiguous copies read and write the activation twice each way."""

    @staticmethod
    def forward(ctx, qkv, heads: int, head_dim: int):
        x = qkv.contiguous()
        B, T, _ = x.shape
        q, k, v = (x.new_empty(B, T, heads, head_dim) for _ in range(3))
        rows = B * T * heads
        BR, grid = _silu_split_grid(rows, head_dim)
        with torch.cuda.device(x.device):  # Triton launches on the current device
            _silu_split_fwd_kernel[(grid,)](x, q, k, v, rows, D=head_dim, BR=BR)
        ctx.save_for_backward(x)
        ctx.head_dim = head_dim
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        (x,) = ctx.saved_tensors
        D = ctx.head_dim
        rows = x.numel() // (3 * D)
        shape = (*x.shape[:2], x.shape[2] // (3 * D), D)
        dq, dk, dv = (x.new_zeros(shape) if g is None else g.contiguous() for g in (dq, dk, dv))
        dx = torch.empty_like(x)
        BR, grid = _silu_split_grid(rows, D)
        with torch.cuda.device(x.device):
            _silu_split_bwd_kernel[(grid,)](x, dq, dk, dv, dx, rows, D=D, BR=BR)
        return dx, None, None


def silu_split_heads(qkv: torch.Tensor, heads: int, head_dim: int, act=F.silu):
    """`act(qkv)` split into q, k, v of (B, T, H, D), contiguous, from a (B, T, H·3·D) projection laid out per head as
    [q | k | v] (transformers' MiniMax lightning layer). Fused Triton kernel for SiLU on CUDA with a power-of-two
    head dim; otherwise the same function in torch ops."""
    silu = act is F.silu or isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"  # transformers' own
    if silu and triton is not None and qkv.is_cuda and head_dim & (head_dim - 1) == 0:
        return SiluSplitHeads.apply(qkv, heads, head_dim)
    B, T, _ = qkv.shape
    return tuple(x.contiguous() for x in act(qkv).view(B, T, heads, 3 * head_dim).split(head_dim, dim=-1))


def lightning_layer_fla(layer: mm.MiniMaxLightningAttention, hidden_states, attention_mask=None, doc_ids=None,
                        output_state: bool = True, context=None):
    """The fast path of a whole transformers `MiniMaxLightningAttention` layer (prefill / training, no cached
    state): `out_proj(sigmoid(output_gate(x)) · RMSNorm(lightning(silu(qkv_proj(x)))))`, the same math as
    transformers' forward, with the element-wise work fused (module docstring). hidden_states (B, T, hidden);
    doc_ids (B, T) or None; `context`: an `alignment.context_parallel.ContextParallelPlan` when the rows are one
    rank's slices (the incoming state is added before the norm). Returns the layer output (B, T, hidden) and the
    state (B, H, D, D) or None."""
    from fla.modules.norm.fused_norm_gate import rms_norm_gated

    B, T, _ = hidden_states.shape
    H, D = layer.num_attention_heads, layer.head_dim
    q, k, v = silu_split_heads(layer.qkv_proj(hidden_states), H, D, layer.act_fn)
    if attention_mask is not None:  # padding rows: the same zeroing transformers applies to the activations
        q, k, v = (mm.apply_mask_to_padding_states(x.view(B, T, H * D), attention_mask).view(B, T, H, D)
                   for x in (q, k, v))
    slope = layer.slope_fp32(q.device)
    if context is None:
        out, state = lightning_attention_fla_bthd(q, k, v, slope, doc_ids, output_state)
    else:
        out, state = lightning_attention_fla_bthd(q, k, v, slope, doc_ids, True, torch.float32)
        out, state = context.lightning_exchange(out, q, state, slope)
    norm = layer.norm
    gated = rms_norm_gated(out.reshape(B, T, H * D), layer.output_gate(hidden_states), norm.weight, None,
                           activation="sigmoid", eps=norm.variance_epsilon)
    return layer.out_proj(gated), state


@cache
def _varlen_attn():
    """torch's flash varlen attention and the keyword that makes it causal (torch 2.10 `is_causal`, later
    `window_size=(-1, 0)`), or None when this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return varlen_attn, causal, "enable_gqa" in params, "scale" in params


def varlen_softmax_available(kernel: str, q: torch.Tensor) -> bool:
    """Whether packed softmax layers take the varlen kernel: the fast path is on (`kernel` resolves to fla), the
    tensors are CUDA fp16/bf16 (flash attention's dtypes) and this torch has `varlen_attn`."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _varlen_attn() is not None
            and resolve_lightning_kernel(kernel, q.device).startswith("fla"))


def varlen_softmax_attention(q, k, v, doc_ids, scale: float) -> torch.Tensor:
    """Causal softmax attention within each packed document: q (B, H, T, D), k/v (B, H_kv, T, D) -> (B, H, T, D).

    One flash varlen call over all documents of all rows (instead of one SDPA call per document)."""
    varlen_attn, causal, has_gqa, has_scale = _varlen_attn()
    B, H, T, D = q.shape
    if k.shape[1] != H and not has_gqa:
        k, v = (x.repeat_interleave(H // x.shape[1], dim=1) for x in (k, v))
    extra = {"enable_gqa": True} if k.shape[1] != H else {}
    if has_scale:
        extra["scale"] = scale
    elif abs(scale - D**-0.5) > 1e-12:
        raise ValueError(f"this torch's varlen_attn has no scale argument and the layer's scaling {scale} is not "
                         "1/sqrt(head_dim)")
    cu, cu_cpu, _ = packed_cu_seqlens(doc_ids)
    cu = cu.to(torch.int32)
    longest = int((cu_cpu[1:] - cu_cpu[:-1]).max())
    flat = [x.transpose(1, 2).reshape(B * T, x.shape[1], D) for x in (q, k, v)]  # (B·T, heads, D)
    out = varlen_attn(*flat, cu, cu, longest, longest, **causal, **extra)
    return out.reshape(B, T, H, D).transpose(1, 2)


def _chunk_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    logits = F.linear(hidden.to(weight.dtype), weight).float()  # (n, V), this chunk only
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")


def chunked_cross_entropy(hidden, weight, labels, chunk_tokens: int = 8192, ignore_index: int = -100):
    """Mean cross-entropy of `hidden @ weight.T` against `labels` over non-ignored tokens, `chunk_tokens` rows at a
    time; each chunk's logits are recomputed in backward (activation checkpointing), so at most one chunk of logits
    and its gradient exist at once. hidden (..., H), weight (V, H), labels (...) -> scalar."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_ce_sum, h[piece], weight, y[piece], ignore_index, use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(h[piece], weight, y[piece], ignore_index)
    return total / (y != ignore_index).sum().clamp(min=1)


def lm_loss(hidden, weight, labels, impl: str = "auto", ignore_index: int = -100) -> torch.Tensor:
    """LM-head + cross-entropy without the full logits. `impl`: 'liger' (Liger-Kernel's fused linear cross-entropy,
    CUDA), 'chunked' (`chunked_cross_entropy`), 'auto' (liger on CUDA when installed). The hidden states are cast to
    the head's dtype, so an FP32 head (MiniMax-M1 §3) computes its logits in fp32 either way."""
    if impl == "auto":
        impl = "liger" if hidden.is_cuda and liger_available() else "chunked"
    if impl == "chunked":
        return chunked_cross_entropy(hidden, weight, labels, ignore_index=ignore_index)
    if impl != "liger":
        raise ValueError(f"loss impl '{impl}' is not one of auto, liger, chunked")
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    h = hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype)
    return LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index)(weight, h, labels.reshape(-1))


def causal_lm_loss(model, input_ids, labels=None, position_ids=None, attention_mask=None, impl: str = "auto"):
    """Next-token loss of a `MiniMaxForCausalLM` (or a peft wrapper of one) computed with `lm_loss`: the same value
    as `model(input_ids, labels=labels).loss` without materialising (B, T, V) logits. `labels` default to
    `input_ids`; -100 marks ignored tokens. The MoE load-balancing loss is not included."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                        use_cache=False).last_hidden_state  # (B, T, H)
    labels = input_ids if labels is None else labels
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # token t predicts t + 1; the last predicts nothing
    return lm_loss(hidden, base.lm_head.weight, targets, impl)
