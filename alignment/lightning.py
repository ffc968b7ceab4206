"""Lightning attention as a small pure function, with per-document state reset for packed batches.

Lightning attention (MiniMax-01 report, §2.2; `../shared/docs/method.md`, "The model family") is causal linear
attention with a constant per-head decay `λ_h = exp(-slope_h)`:

    o_t = Σ_{s ≤ t, doc(s) = doc(t)}  λ^(t-s) · (q_t · k_s) · v_s              (no softmax, no 1/√d scale)

computed blockwise: inside a block a masked (QKᵀ ⊙ decay) V product, across blocks a recurrent (D × D) state
`S ← λ^L · S + Σ_j λ^(L-1-j) k_jᵀ v_j`. transformers' `MiniMaxLightningAttention` runs the same blockwise loop but
ignores document boundaries, so in a packed row the state leaks from one document into the next. Here the state is
reset at every document start; with a single document the result equals transformers' loop.

This is the CPU reference; a fused GPU kernel (flash-linear-attention's `chunk_simple_gla` with `cu_seqlens`) computes
the same function and can replace it.
"""

from __future__ import annotations

import math

import torch


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Index of the packed document each token belongs to, from `position_ids` (B, T) -> (B, T).

    A new document starts wherever the position does not continue the previous one (position[t] != position[t-1] + 1),
    the same rule transformers uses for packed softmax attention, so both layer types agree on the boundaries.

    >>> document_ids(torch.tensor([[0, 1, 2, 0, 1, 0]])).tolist()
    [[0, 0, 0, 1, 1, 2]]
    """
    starts = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1
    return starts.cumsum(-1)


def lightning_slopes(num_heads: int, layer_idx: int, num_layers: int, device=None) -> torch.Tensor:
    """(H,) float32 decay rates of one lightning layer, as the released MiniMax-Text-01 code (and vLLM) computes
    them: ALiBi's head slopes times `1 - i / (L - 1) + 1e-5` for layer i of L. ALiBi's slopes are 2^(-8(h+1)/H) for
    H a power of two; for other H, the nearest lower power of two's set followed by every other slope of the next
    one's. transformers' `MiniMaxLightningAttention.get_slope_rate` differs: 2^(-8(h+1)/H) for every H (1.29 nats
    of log-prob apart at 6 heads, tests/test_released_reference.py) and a layer factor `1 - i / (L - 1 + 1e-5) + 1e-5`
    (the last lightning layer of a model decays L / (L - 1) times as fast). Always float32: a bf16 model's
    `slope_rate` buffer is rounded (the decay per step up to 2⁻⁹ off, compounding over the sequence). The
    packing-safe layers, their decode buffers and the vLLM rollout engine all read this function.

    >>> [round(x, 6) for x in lightning_slopes(4, 0, 2).tolist()]
    [0.250003, 0.062501, 0.015625, 0.003906]
    >>> [round(x, 4) for x in lightning_slopes(6, 0, 2).tolist()]   # 4 heads' slopes, then 8 heads' odd ones
    [0.25, 0.0625, 0.0156, 0.0039, 0.5, 0.125]
    """

    def alibi(n: int) -> list[float]:
        if math.log2(n).is_integer():
            return [2 ** (-8 * (h + 1) / n) for h in range(n)]
        below = 2 ** math.floor(math.log2(n))
        return alibi(below) + alibi(2 * below)[0::2][: n - below]

    factor = 1 - layer_idx / max(num_layers - 1, 1) + 1e-5
    return torch.tensor(alibi(num_heads), dtype=torch.float64, device=device).mul(factor).float()


def lightning_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    block_size: int = 256,
    state_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise causal linear attention with decay, isolated per document.

    Args:
        q, k, v: (B, H, T, D) after the activation (MiniMax applies SiLU to the fused qkv projection).
        slope: (H,) decay rate per head, `λ_h = exp(-slope_h)` (transformers' `slope_rate` buffer, any shape
            that flattens to H).
        doc_ids: (B, T) document index per token (non-decreasing along T), or None for one document per row.
        block_size: tokens per block; the result does not depend on it (up to rounding).
        state_dtype: dtype of the returned state (default `v`'s; the context-parallel exchange keeps float32).

    Returns:
        out: (B, H, T, D) in the dtype of `v`.
        state: (B, H, D, D) recurrent state after the last token, covering only the last document of each row
            (what a decode step continuing that document needs).
    """
    B, H, T, D = q.shape
    dtype = v.dtype
    acc = torch.promote_types(dtype, torch.float32)  # accumulate in fp32 even for bf16 inputs
    slope = slope.reshape(1, H, 1, 1).to(acc)
    state = q.new_zeros(B, H, D, D, dtype=acc)
    outputs = []
    for start in range(0, T, block_size):
        end = min(start + block_size, T)
        L = end - start
        qb = q[:, :, start:end].to(acc)  # (B, H, L, D)
        kb = k[:, :, start:end].to(acc)
        vb = v[:, :, start:end].to(acc)
        idx = torch.arange(L, device=q.device, dtype=acc)

        # intra-block: (Q Kᵀ ⊙ λ^(i-j) ⊙ [j ≤ i] ⊙ [same doc]) V
        gap = idx[:, None] - idx[None, :]  # (L, L)
        decay = torch.exp(-slope * gap.clamp(min=0)) * (gap >= 0)  # (1, H, L, L)
        if doc_ids is not None:
            db = doc_ids[:, start:end]
            decay = decay * (db[:, :, None] == db[:, None, :])[:, None]  # (B, H, L, L)
        out = torch.matmul(torch.matmul(qb, kb.transpose(-1, -2)) * decay, vb)

        # inter-block: queries still in the document that was open before the block read the carried state.
        query_decay = torch.exp(-slope * (idx[:, None] + 1))  # (1, H, L, 1): λ^(i+1)
        if doc_ids is not None and start > 0:
            continues = (doc_ids[:, start:end] == doc_ids[:, start - 1 : start])[:, None, :, None]  # (B, 1, L, 1)
            query_decay = query_decay * continues
        out = out + torch.matmul(qb * query_decay, state)
        outputs.append(out.to(dtype))

        # carry the state of the block's last document: keys from earlier documents are dropped.
        key_decay = torch.exp(-slope * (L - 1 - idx[:, None]))  # (1, H, L, 1): λ^(L-1-j)
        block_decay = torch.exp(-slope * L)  # (1, H, 1, 1)
        if doc_ids is not None:
            in_last_doc = (doc_ids[:, start:end] == doc_ids[:, end - 1 : end])[:, None, :, None]  # (B, 1, L, 1)
            key_decay = key_decay * in_last_doc
            if start > 0:
                same_doc = (doc_ids[:, end - 1] == doc_ids[:, start - 1])[:, None, None, None]  # (B, 1, 1, 1)
                block_decay = block_decay * same_doc
        state = state * block_decay + torch.matmul((kb * key_decay).transpose(-1, -2), vb)
    return torch.cat(outputs, dim=2), state.to(state_dtype or dtype)


def naive_lightning_attention(q, k, v, slope, doc_ids=None) -> torch.Tensor:
    """Quadratic reference (T × T decay mask), for tests: o = (QKᵀ ⊙ λ^(t-s) ⊙ [s ≤ t] ⊙ [same doc]) V."""
    B, H, T, D = q.shape
    pos = torch.arange(T, device=q.device, dtype=q.dtype)
    gap = pos[:, None] - pos[None, :]
    mask = torch.exp(-slope.reshape(1, H, 1, 1).to(q.dtype) * gap.clamp(min=0)) * (gap >= 0)
    if doc_ids is not None:
        mask = mask * (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
    return torch.matmul(torch.matmul(q, k.transpose(-1, -2)) * mask, v)
