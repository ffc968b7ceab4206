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
layer's own `slope_rate` buffer (so whatever rounding the model's dtype gave it is shared with transformers and the
reference); the RMS norm, sigmoid output gate and projections stay transformers' modules, untouched.

Softmax layers of packed, unpadded rows use torch's flash-attention varlen kernel (`torch.nn.attention.varlen`) with
the same document boundaries; elsewhere they keep the per-document SDPA loop of `alignment.modeling`.

Loss: at long lengths the logits dominate memory (vocab 32000 × 4 bytes = 128 KB per token in fp32), so
`lm_loss` computes linear + cross-entropy chunk by chunk — Liger-Kernel's fused linear cross-entropy on CUDA when it
is installed, else a plain-torch loop whose chunks are recomputed in backward (`chunked_cross_entropy`).

The CPU reference (`alignment.lightning.lightning_attention`) stays the ground truth; `resolve_lightning_kernel`
picks the path (`ModelOptions.lightning_kernel`: auto = fla on CUDA when the package is installed).
"""

from __future__ import annotations

import importlib.util
import inspect
from functools import cache

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LIGHTNING_KERNELS = ("auto", "torch", "fla")
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
    if kernel == "fla" and not fla_available():
        raise ImportError(f"lightning_kernel: 'fla' needs the flash-linear-attention package; {GPU_EXTRA_HINT}, "
                          "or set lightning_kernel: auto")


def resolve_lightning_kernel(kernel: str, device: torch.device) -> str:
    """'torch' or 'fla' for tensors on `device`: auto = fla on CUDA when flash-linear-attention is installed."""
    check_lightning_kernel(kernel)
    if kernel == "auto":
        return "fla" if device.type == "cuda" and fla_available() else "torch"
    if kernel == "fla" and device.type != "cuda":
        raise ValueError(f"lightning_kernel: 'fla' runs on CUDA tensors only, got {device.type} "
                         "(use 'auto' to fall back to the torch reference)")
    return kernel


def limit_triton_autotuning(num_warps: int = 4, num_stages: int = 2, max_configs: int = 4) -> None:
    """Make Triton's autotuner (flash-linear-attention's kernels use it) try at most `max_configs` configurations,
    those with `num_warps` / `num_stages` when there are any. fla tunes up to 48 configurations per kernel and per
    (heads, head dim, dtype, varlen) combination, minutes on a fresh machine; a long training run amortises that (the
    results are cached on disk), a benchmark or test on a short-lived GPU machine cannot. Opt-in, process-wide."""
    from triton.runtime.autotuner import Autotuner

    if getattr(Autotuner, "_limited", False):
        return
    prune = Autotuner.prune_configs

    def limited(self, kwargs):
        configs = prune(self, kwargs)
        preferred = [c for c in configs if c.num_warps == num_warps and c.num_stages == num_stages]
        return (preferred or [c for c in configs if c.num_warps == num_warps] or configs)[:max_configs]

    Autotuner.prune_configs = limited
    Autotuner._limited = True


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


def lightning_attention_fla(q, k, v, slope, doc_ids=None, output_state: bool = True):
    """`alignment.lightning.lightning_attention` on flash-linear-attention's `chunk_simple_gla` (same arguments and
    results; the state is None unless `output_state`).

    q, k, v: (B, H, T, D); slope: H values (any shape); doc_ids: (B, T) or None. Returns out (B, H, T, D) in v's
    dtype and the (B, H, D, D) state after each row's last document (of that document only).
    """
    from fla.ops.simple_gla import chunk_simple_gla

    B, H, T, D = q.shape
    g_gamma = -slope.reshape(H).float()  # log decay per step: λ = exp(-slope)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, T, H, D), fla's layout
    if doc_ids is None:
        out, state = chunk_simple_gla(q, k, v, g_gamma=g_gamma, scale=1.0, output_final_state=output_state)
    else:
        cu, cu_cpu, last = packed_cu_seqlens(doc_ids)
        q, k, v = (x.reshape(1, B * T, H, D) for x in (q, k, v))
        out, states = chunk_simple_gla(q, k, v, g_gamma=g_gamma, scale=1.0, output_final_state=output_state,
                                       cu_seqlens=cu, cu_seqlens_cpu=cu_cpu)
        out = out.reshape(B, T, H, D)
        state = states[last] if output_state else None  # (B, H, D, D): each row's last document
    return out.transpose(1, 2).to(v.dtype), None if state is None else state.to(v.dtype)


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
            and resolve_lightning_kernel(kernel, q.device) == "fla")


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
