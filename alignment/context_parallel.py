"""Context parallelism: one packed row split along the sequence over the R ranks of a process group, exactly.

Stages II and IV of the recipe train on 1,032,192-token rows (MiniMax-01 Table 7; method.md "Long-context
extension"); MiniMax trained them with LASP+ (linear-attention sequence parallelism) and varlen ring attention.
Here each rank holds one contiguous slice of every row (`split_rows`: equal slices, so balanced by tokens) with the
row's own position ids, so document boundaries may fall anywhere, across slices included. The split is exact:

- **Lightning layers** are a linear recurrence with a constant per-head decay λ = exp(-slope) (alignment.lightning).
  Each rank runs the existing kernel on its slice with a zero initial state, which gives its outputs and the final
  state F_j of its last document. The true state entering slice r is
  `S_r = c_r · E_{r-1}`, `E_j = F_j + p_j · λ^L · E_{j-1}`, where c_r says that slice r's first token continues
  the document open at the end of slice r-1 and p_j that slice j starts no document (L = slice length). A query at
  local index i of slice r's first document then adds `λ^(i+1) · q · S_r` (the same inter-block term as the
  blockwise reference), and a document that starts on a rank gets nothing from before it.
  The exchange is one all-gather of the (B, H, D, D) final states per layer (`gather_states`), then every rank
  sums the prefix itself (`incoming_states`, R tiny element-wise steps). An all-gather moves (R-1)·B·H·D² values to
  every rank in one collective (NCCL: log R or R latency steps, bandwidth-optimal); a ring or a log-step scan of
  point-to-point sends moves fewer bytes but costs R - 1 or log₂R dependent latencies per layer, and the states are
  small: for the released model 64 heads × 128² × 4 bytes = 4 MiB per row and layer, 252 MiB received per layer at
  R = 64, against ~10¹² FLOPs of that layer's 16K-token slice. The backward is exact by autograd: the gradient of
  each S_r flows back to the ranks whose F_j it read (the gather's backward is a reduce-scatter).
- **Softmax layers** gather the row's keys and values (`gather_sequence`; one collective for both) and attend each
  local query to its own document's keys up to itself (`softmax_attention`): a document crossing into this slice
  from earlier ranks reads their keys, a causal mask aligned to the bottom right. Memory: every rank holds the whole
  row's K and V for the layer it is in (2 · T · H_kv · D values; 548M model at 1M tokens: 2 GiB in bf16), the price
  of the all-gather over a ring's two slices; docs/scaling.md has the model for both model sizes.
- **MoE, norms, projections** act per token: nothing to exchange. The router's load-balancing loss is computed on
  each rank's tokens (as on each micro-batch without context parallelism).
- **Loss**: targets are shifted on the whole row before the split (the last token of a slice predicts the first of
  the next), and each rank's summed token loss is divided by the whole row's target count (`context_parallel_loss`),
  so the sum over ranks of the losses, and of the gradients (`all_reduce_gradients`, or DDP with the loss scaled by
  R), is the single-process value.

R = 1 (no group) is the plain path. Rows must be unpadded packed rows (no attention mask): long SFT and long DPO
pack; `split_rows` pads a row whose length R does not divide with a one-token-per-position padding document whose
targets are ignored.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from alignment.kernels import lm_loss
from alignment.lightning import document_ids

IGNORE = -100


@dataclass
class ContextParallelPlan:
    """Where this rank's slice sits in the rows of one forward; built once per forward (`plan`) and read by every
    layer (the model's pre-hook passes it as the `context_parallel` keyword)."""

    group: dist.ProcessGroup | None
    rank: int
    size: int
    length: int  # L: tokens per slice
    docs: torch.Tensor  # (B, R·L) document ids of the whole rows
    continues: torch.Tensor  # (R, B) bool: slice j's first token continues the document open at the end of slice j-1
    passes: torch.Tensor  # (R, B) bool: slice j starts no document (a state entering it leaves it, decayed by λ^L)
    # host-side, so the layers need no device syncs: per row, this slice's documents as (first local token, end,
    # first key of the whole row), and the longest first document that continues from an earlier slice (0: none)
    segments: list[list[tuple[int, int, int]]]
    continued_tokens: int

    @property
    def start(self) -> int:
        return self.rank * self.length

    @property
    def local_docs(self) -> torch.Tensor:
        return self.docs[:, self.start : self.start + self.length]

    def lightning_exchange(self, out, q, final, slope):
        """`lightning_exchange` with this plan (what the model's lightning layers call)."""
        return lightning_exchange(out, q, final, slope, self)


def slice_flags(docs: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(continues, passes), each (R, B) bool, of rows with document ids `docs` (B, R·L) split into R slices.

    >>> docs = torch.tensor([[0, 0, 0, 0, 1, 1]])                 # slices [0 0] [0 0] [1 1]
    >>> [x[:, 0].tolist() for x in slice_flags(docs, 3)]
    [[False, True, False], [False, True, False]]
    """
    B, T = docs.shape
    L = T // size
    first, last = docs[:, ::L], docs[:, L - 1 :: L]  # (B, R)
    before = torch.cat([first[:, :1] - 1, last[:, :-1]], dim=1)  # the last id of the previous slice (none for 0)
    continues = first == before
    return continues.T.contiguous(), (continues & (first == last)).T.contiguous()


def plan(position_ids: torch.Tensor, group: dist.ProcessGroup | None) -> ContextParallelPlan:
    """The plan of one forward from this rank's `position_ids` (B, L) slice: one all-gather of the position ids
    (8 bytes a token), from which every rank derives the same document ids of the whole rows."""
    size = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    position_ids = position_ids.contiguous()
    if size > 1:
        parts = [torch.empty_like(position_ids) for _ in range(size)]
        dist.all_gather(parts, position_ids, group=group)
        position_ids = torch.cat(parts, dim=-1)
    return rows_plan(position_ids, rank, size, group)


def rows_plan(position_ids: torch.Tensor, rank: int, size: int, group=None) -> ContextParallelPlan:
    """The plan of rank `rank` of `size` from the whole rows' position ids (B, R·L) (what `plan` gathers)."""
    docs = document_ids(position_ids)
    continues, passes = slice_flags(docs, size)
    L = docs.shape[1] // size
    start, host = rank * L, docs.cpu()  # one device sync per forward
    segments, continued = [], 0
    for b, row in enumerate(host):
        ids, counts = torch.unique_consecutive(row[start : start + L], return_counts=True)
        ends = (counts.cumsum(0) + start).tolist()
        firsts = [start] + ends[:-1]
        keys = list(firsts)
        if start and row[start] == row[start - 1]:  # opened on an earlier slice: its keys start there
            keys[0] = int(torch.searchsorted(row, ids[0]))
            continued = max(continued, int(counts[0]))
        segments.append(list(zip(firsts, ends, keys)))
    return ContextParallelPlan(group, rank, size, L, docs, continues, passes, segments, continued)


class _GatherSequence(torch.autograd.Function):
    """All-gather along `dim` (rank order) whose backward sums the gradients of this rank's part over the group:
    reduce-scatter on NCCL, an all-reduce then this rank's slice elsewhere (gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group, dim: int):
        ctx.group, ctx.dim = group, dim
        size = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        size, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        parts = [p.contiguous() for p in grad.chunk(size, dim=ctx.dim)]
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            out = torch.empty_like(parts[rank])
            dist.reduce_scatter(out, parts, group=ctx.group)
            return out, None, None
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(size, dim=ctx.dim)[rank].contiguous(), None, None


def gather_sequence(x: torch.Tensor, context: ContextParallelPlan, dim: int) -> torch.Tensor:
    """The whole rows of a per-slice tensor: every rank's `x` concatenated along `dim`, differentiable."""
    if context.size == 1:
        return x
    return _GatherSequence.apply(x, context.group, dim)


def gather_states(final: torch.Tensor, context: ContextParallelPlan) -> torch.Tensor:
    """(R, B, H, D, D): every rank's final lightning state, differentiable."""
    return gather_sequence(final.unsqueeze(0), context, dim=0)


def incoming_states(finals: torch.Tensor, continues: torch.Tensor, passes: torch.Tensor, slope: torch.Tensor,
                    length: int) -> torch.Tensor:
    """(R, B, H, D, D) state entering each slice from the slices before it, from their final states `finals`
    (R, B, H, D, D, zero initial state each), the (R, B) flags of `slice_flags`, the (H,) decay rates and the slice
    length. Float32 at least. Every output is a weighted sum of all of `finals` (weights 0 included), so each rank's backward
    reaches the gather (a rank that skipped it would leave the others waiting in its collective)."""
    R = finals.shape[0]
    finals = finals.to(torch.promote_types(finals.dtype, torch.float32))
    decay = torch.exp(-slope.reshape(1, -1, 1, 1).to(finals.dtype) * length)  # (1, H, 1, 1): λ^L
    incoming, carried = [], torch.zeros_like(finals[0])
    for j in range(R):
        incoming.append(carried * continues[j].reshape(-1, 1, 1, 1))
        # state at the end of slice j: its own last document, plus what entered it if no document starts in it
        carried = finals[j] + carried * decay * passes[j].reshape(-1, 1, 1, 1)
    return torch.stack(incoming) + 0.0 * finals.sum()


def add_incoming_state(out: torch.Tensor, q: torch.Tensor, state: torch.Tensor, first_doc: torch.Tensor,
                       slope: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """out + λ^(i+1) · q_i · S for the queries of a slice's first document (the blockwise reference's inter-block
    term with the incoming state S). out, q: (B, L, H, D) (any strides); state (B, H, D, D), float32 or wider (the
    sum is computed in its dtype); n: the longest first document's length if known (else read from `first_doc`, a
    device sync);
    first_doc (B, L) bool (false everywhere in a row whose first document starts in the slice); slope (H,)."""
    # the longest first document (at least one token, so every rank's graph reaches the gather): only those
    # queries read the state
    n = max(int(first_doc.sum(1).max()) if n is None else n, 1)
    acc = state.dtype
    i = torch.arange(1, n + 1, device=q.device, dtype=acc)
    decay = torch.exp(-i[:, None] * slope.reshape(1, -1).to(acc))  # (n, H)
    weight = (decay[None] * first_doc[:, :n, None]).unsqueeze(-1)  # (B, n, H, 1)
    corr = torch.einsum("blhd,bhde->blhe", q[:, :n].to(acc) * weight, state)
    return torch.cat([out[:, :n] + corr.to(out.dtype), out[:, n:]], dim=1)


def lightning_exchange(out: torch.Tensor, q: torch.Tensor, final: torch.Tensor, slope: torch.Tensor,
                       context: ContextParallelPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """A lightning layer's slice outputs made exact: out, q (B, L, H, D); final (B, H, D, D), the slice's own final
    state (zero initial state; float32 preferred). Returns the corrected outputs and the state after the slice's
    last token (what a decode step continuing it would need)."""
    incoming = incoming_states(gather_states(final, context), context.continues, context.passes, slope,
                               context.length)[context.rank]
    r = context.rank
    first_doc = (context.local_docs == context.local_docs[:, :1]) & context.continues[r][:, None]
    out = add_incoming_state(out, q, incoming, first_doc, slope, context.continued_tokens)
    decay = torch.exp(-slope.reshape(1, -1, 1, 1).to(incoming.dtype) * context.length)
    final = final.to(incoming.dtype) + incoming * decay * context.passes[r].reshape(-1, 1, 1, 1)
    return out, final


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: ContextParallelPlan,
                      scale: float) -> torch.Tensor:
    """Causal softmax attention of this slice's queries within their documents across slices: q (B, H, L, D);
    k, v (B, H_kv, L, D) of this slice (RoPE applied). The row's keys and values are gathered in one collective,
    then `attend_slice`. Returns (B, H, L, D)."""
    k_all, v_all = gather_sequence(torch.stack([k, v]), context, dim=3)  # (B, H_kv, R·L, D) each
    return attend_slice(q, k_all, v_all, context, scale)


def attend_slice(q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, context: ContextParallelPlan,
                 scale: float) -> torch.Tensor:
    """This slice's queries q (B, H, L, D) against the whole rows' keys and values (B, H_kv, R·L, D): each local
    document attends to its keys from the document's start, wherever that is, up to each query. `causal_lower_right`
    aligns the causal mask to the last key (flash / memory-efficient kernels take it on GPU without materialising
    it); documents that start in the slice are plain causal."""
    from torch.nn.attention.bias import causal_lower_right

    H = q.shape[1]
    groups = H // k_all.shape[1]
    if groups > 1:
        k_all, v_all = (x.repeat_interleave(groups, dim=1) for x in (k_all, v_all))
    start, rows = context.start, []
    for b, segments in enumerate(context.segments):
        pieces = []
        for first, end, key in segments:
            qd = q[b : b + 1, :, first - start : end - start]
            kd, vd = k_all[b : b + 1, :, key:end], v_all[b : b + 1, :, key:end]
            mask = causal_lower_right(end - first, end - key) if key < first else None
            pieces.append(F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, is_causal=mask is None,
                                                         scale=scale))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0)


def split_rows(x: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This rank's contiguous slice of (B, T) rows (T divisible by R: `pad_rows` first).

    >>> split_rows(torch.arange(6)[None], 1, 3).tolist()
    [[2, 3]]
    """
    if x.shape[-1] % size:
        raise ValueError(f"context parallelism: a row of {x.shape[-1]} tokens does not split into {size} equal "
                         "slices (pad it with alignment.context_parallel.pad_rows)")
    L = x.shape[-1] // size
    return x[..., rank * L : (rank + 1) * L]


def pad_rows(input_ids, labels, position_ids, size: int, pad_id: int):
    """Rows padded at the end to a multiple of R tokens with a padding document (positions 0, 1, ...; labels
    ignored), so they split into equal slices and the padding attends only to itself."""
    extra = -input_ids.shape[-1] % size
    if not extra:
        return input_ids, labels, position_ids
    B = input_ids.shape[0]
    pad = lambda x, value: torch.cat([x, x.new_full((B, extra), value)], dim=-1)  # noqa: E731
    positions = torch.arange(extra, device=position_ids.device).expand(B, -1)
    return pad(input_ids, pad_id), pad(labels, IGNORE), torch.cat([position_ids, positions], dim=-1)


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Token t's target is label t + 1 of the whole row; the row's last token has none. Documents need no care:
    a document's last token's target is the next document's first token, which packing collators already mark
    ignored where they should (the same targets the single-process loss uses)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def context_parallel_loss(model, input_ids, labels, position_ids, group, impl: str = "auto") -> torch.Tensor:
    """This rank's share of the next-token loss of whole rows (every rank of `group` passes the same rows): the
    summed loss of its slice's targets over the whole rows' target count. Summed over the group, the losses and the
    gradients equal `causal_lm_loss` of one process. The model must have `set_context_parallel(model, group)`."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    targets = shifted_targets(labels)
    total = (targets != IGNORE).sum().clamp(min=1)
    local = split_rows(targets, rank, size)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.model(input_ids=split_rows(input_ids, rank, size), position_ids=split_rows(position_ids, rank, size),
                        use_cache=False).last_hidden_state
    count = (local != IGNORE).sum()
    return lm_loss(hidden, base.lm_head.weight, local, impl) * count / total


def set_context_parallel(model, group: dist.ProcessGroup | None) -> None:
    """Make `model`'s forwards context parallel over `group` (None: the plain path). Its inputs are then this rank's
    slices (`split_rows`) of unpadded packed rows."""
    from transformers.models.minimax import modeling_minimax as mm

    found = [m for m in model.modules() if isinstance(m, mm.MiniMaxModel)]
    if not found:
        raise TypeError("set_context_parallel: not a MiniMax model")
    for module in found:
        module.context_parallel_group = group


def all_reduce_gradients(model, group: dist.ProcessGroup) -> None:
    """Sum the parameter gradients over the context-parallel group (each rank holds its slice's part)."""
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)


def context_parallel_group(size: int) -> dist.ProcessGroup | None:
    """This rank's context-parallel group: consecutive ranks [g·R, (g+1)·R) of the world (every rank must call this,
    in the same order; None for R = 1). The world size must be a multiple of R."""
    if size == 1:
        return None
    if not dist.is_initialized() or dist.get_world_size() % size:
        world = dist.get_world_size() if dist.is_initialized() else 1
        raise ValueError(f"training.context_parallel: {size} needs a launch with a multiple of {size} processes, got {world} "
                         "(make STAGE NPROC=N, torchrun --nproc-per-node N)")
    groups = [dist.new_group(list(range(g, g + size))) for g in range(0, dist.get_world_size(), size)]
    return groups[dist.get_rank() // size]


# the batch keys a padding-free (packed) collator gives; any other sequence-shaped key is refused
ROW_KEYS = ("input_ids", "position_ids", "labels")
# document metadata of whole rows that TRL's packing collator adds (flash-attention varlen arguments, seq_idx):
# dropped, because the plan derives every slice's documents from the global position ids
DERIVED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


class ContextParallelTraining:
    """Mixin for a transformers `Trainer` subclass (SFT, DPO): each training step of one rank becomes R steps of the
    rank's context-parallel group, one per member's batch, each on this rank's slice of its rows.

    The data stay sharded as in data parallelism (each rank loads its own batches), so the global batch, the
    Trainer's token count `num_items_in_batch` and the learning-rate schedule are those of a data-parallel run of
    the same world: the group all-gathers its R batches, and for every batch each rank runs the Trainer's own
    `training_step` on its slice (`split_rows`; targets shifted on the whole row first, passed as TRL's
    `shift_labels`), so the loss normalisation, the FP32 head and the backward are the Trainer's. The slices' losses
    add up to the batch's loss, so the gradients summed over the world equal the data-parallel run's; DDP's
    all-reduce waits for the last of the R backwards (`no_sync` before). Per rank, a step holds one slice's
    activations at a time: L = T/R tokens.

    Only training steps are split: evaluation and generation see whole rows (`set_context_parallel` is on only
    inside `training_step`). The MoE load-balancing loss, where enabled, is computed per slice (each slice's own
    router statistics), so it is not exactly the whole row's.
    """

    context_parallel: dist.ProcessGroup | None = None  # set by the stage (`context_parallel_group`)

    def training_step(self, model, inputs, num_items_in_batch=None):
        group = self.context_parallel
        if group is None:
            return super().training_step(model, inputs, num_items_in_batch)
        if num_items_in_batch is None:  # the per-slice loss would be a per-slice mean
            raise ValueError("context parallelism needs the Trainer's token count (num_items_in_batch); this "
                             "trainer's loss does not take it")
        extra = sorted(k for k in inputs if k not in ROW_KEYS + DERIVED_KEYS)
        if extra or "position_ids" not in inputs:
            raise ValueError(f"context parallelism trains packed, padding-free rows (input_ids, position_ids, labels); "
                             f"this batch has {sorted(inputs)} (set data.packing: true)")
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        mine = {k: inputs[k].detach().cpu() for k in ROW_KEYS}
        batches = [None] * size
        dist.all_gather_object(batches, mine, group=group)
        pad_id = getattr(self.processing_class, "pad_token_id", None) or 0
        device = inputs["input_ids"].device
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        total = 0.0
        set_context_parallel(base, group)
        try:
            for j, batch in enumerate(batches):
                ids, labels, pos = pad_rows(batch["input_ids"], batch["labels"], batch["position_ids"], size, pad_id)
                local = {"input_ids": split_rows(ids, rank, size).to(device),
                         "position_ids": split_rows(pos, rank, size).to(device),
                         "shift_labels": split_rows(shifted_targets(labels), rank, size).to(device)}
                last = j == size - 1
                with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                    total = total + super().training_step(model, local, num_items_in_batch)
        finally:
            set_context_parallel(base, None)
        return total
