"""Context parallelism (alignment.context_parallel): a packed row split over R ranks gives the single-process
logits, loss and gradients, with documents crossing the slice boundaries.

The state-passing math is checked in one process on emulated slices (float64, every R), and the whole model in
R = 2 and 4 real processes (torch.distributed, gloo) against one process, in float64: the split changes only the
order of additions, so the gap is rounding (< 1e-10 here)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from alignment import context_parallel as cp
from alignment import kernels
from alignment.kernels import causal_lm_loss
from alignment.lightning import document_ids, lightning_attention
from alignment.modeling import ModelOptions, load_model

TINY = "configs/tiny/model.yaml"
ON_GPU = torch.cuda.is_available() and kernels.fla_available()
gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device and flash-linear-attention (the `gpu` extra)")
if ON_GPU:
    kernels.limit_triton_autotuning()
# 96 tokens: documents start at 0, 24, 35, 85. At R = 4 (slices of 24) the first boundary is a document start,
# the second falls inside the 50-token document, which also covers the whole third slice; at R = 2 the boundary
# (48) falls inside it. Row 2: one document across every slice, then a short one.
LENGTHS = [[24, 11, 50, 11], [90, 6]]


def packed_rows(vocab: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(LENGTHS), sum(LENGTHS[0])), generator=gen)
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in LENGTHS])
    labels = ids.clone()
    labels[position_ids == 0] = cp.IGNORE  # a document's first token is no target (its predecessor is unrelated)
    labels[0, 40:45] = cp.IGNORE  # and a prompt span
    return ids, labels, position_ids


def torch_slice(q, k, v, slope, docs):
    return lightning_attention(q, k, v, slope, docs, block_size=7, state_dtype=torch.float64)


def emulated_lightning(q, k, v, slope, docs, R, local=torch_slice):
    """Lightning attention of the row split into R slices, each run alone by `local` (a kernel returning the
    slice's outputs and final state), then made exact with the exchange's pure parts (`incoming_states`,
    `add_incoming_state`): the computation R ranks do, in one process."""
    L = q.shape[2] // R
    cont, passes = cp.slice_flags(docs, R)
    outs, finals = [], []
    for r in range(R):
        piece = slice(r * L, (r + 1) * L)
        out, final = local(q[:, :, piece], k[:, :, piece], v[:, :, piece], slope, docs[:, piece])
        outs.append(out)
        finals.append(final)
    incoming = cp.incoming_states(torch.stack(finals), cont, passes, slope, L)
    fixed = []
    for r in range(R):
        local = docs[:, r * L : (r + 1) * L]
        first = (local == local[:, :1]) & cont[r][:, None]
        fixed.append(cp.add_incoming_state(outs[r].transpose(1, 2), q[:, :, r * L : (r + 1) * L].transpose(1, 2),
                                           incoming[r], first, slope).transpose(1, 2))
    return torch.cat(fixed, dim=2)


@pytest.mark.parametrize("R", [1, 2, 3, 4, 6])
def test_state_passing_equals_the_whole_row(R):
    """Outputs and the gradients of q, k, v (the state gradients cross slices) equal the unsplit reference."""
    gen = torch.Generator().manual_seed(R)
    B, H, T, D = 2, 3, 96, 8
    q, k, v = (torch.randn(B, H, T, D, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    slope = torch.tensor([0.5, 0.05, 1e-5], dtype=torch.float64)  # fast, slow and (last-layer-like) no decay
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in LENGTHS])
    docs = document_ids(position_ids)
    ref, _ = lightning_attention(q, k, v, slope, docs, block_size=16)
    split = emulated_lightning(q, k, v, slope, docs, R)
    assert (split - ref).abs().max() < 1e-10
    weights = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    g_ref = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    g_split = torch.autograd.grad((split * weights).sum(), (q, k, v))
    assert max(float((a - b).abs().max()) for a, b in zip(g_ref, g_split)) < 1e-10


def test_without_the_exchange_the_split_is_wrong():
    """The check above can fail: slices run alone (no incoming state) differ where a document crosses a boundary,
    and only there."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 96, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    slope = torch.tensor([0.01, 0.001], dtype=torch.float64)
    docs = document_ids(torch.cat([torch.arange(n) for n in LENGTHS[0]])[None])
    ref, _ = lightning_attention(q, k, v, slope, docs)
    alone = torch.cat([lightning_attention(q[:, :, s : s + 24], k[:, :, s : s + 24], v[:, :, s : s + 24], slope,
                                           docs[:, s : s + 24])[0] for s in range(0, 96, 24)], dim=2)
    gap = (alone - ref).abs().amax(dim=(0, 1, 3))
    assert gap[:48].max() < 1e-12  # slice 1 starts a document: nothing to pass
    assert gap[48:85].min() > 0 and gap[48:].max() > 1e-3  # the document from 35 to 85 continues into 2 and 3
    assert gap[85:].max() < 1e-12  # the last document starts on its rank


def per_document_attention(q, k, v, docs, scale):
    """Causal attention of whole rows document by document (the plain path's loop), GQA by repetition."""
    groups = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(groups, dim=1) for x in (k, v))
    rows = []
    for b in range(q.shape[0]):
        lengths = torch.unique_consecutive(docs[b], return_counts=True)[1].tolist()
        rows.append(torch.cat([F.scaled_dot_product_attention(*x, is_causal=True, scale=scale) for x in
                               zip(*(t[b : b + 1].split(lengths, dim=2) for t in (q, k, v)))], dim=2))
    return torch.cat(rows)


def emulated_softmax(q, k, v, position_ids, R, scale):
    """Each of R slices' queries against the whole rows' keys (`attend_slice`, what a rank runs after its gather)."""
    L = q.shape[2] // R
    return torch.cat([cp.attend_slice(q[:, :, r * L : (r + 1) * L], k, v, cp.rows_plan(position_ids, r, R), scale)
                      for r in range(R)], dim=2)


@pytest.mark.parametrize("R", [2, 4])
def test_softmax_slices_attend_across_boundaries(R):
    """Queries of a document that started on an earlier slice read its keys there (and only its keys): the split
    equals whole-row per-document attention, outputs and gradients, float64."""
    gen = torch.Generator().manual_seed(R)
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in LENGTHS])
    q = torch.randn(2, 4, 96, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 96, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    ref = per_document_attention(q, k, v, document_ids(position_ids), 0.3)
    split = emulated_softmax(q, k, v, position_ids, R, 0.3)
    assert (split - ref).abs().max() < 1e-12
    g_ref, g_split = (torch.autograd.grad(x.pow(2).sum(), (q, k, v)) for x in (ref, split))
    assert max(float((a - b).abs().max()) for a, b in zip(g_ref, g_split)) < 1e-12


def test_slice_flags_and_padding():
    docs = document_ids(torch.tensor([list(range(5)) + list(range(3))]))  # slices [0 0] [0 0] [0 1] [1 1]
    cont, passes = cp.slice_flags(docs, 4)
    assert cont[:, 0].tolist() == [False, True, True, True] and passes[:, 0].tolist() == [False, True, False, True]
    ids, labels, pos = cp.pad_rows(torch.ones(1, 7, dtype=torch.long), torch.ones(1, 7, dtype=torch.long),
                                   torch.arange(7)[None], 4, pad_id=0)
    assert ids.tolist() == [[1] * 7 + [0]] and labels[0, -1] == cp.IGNORE and pos[0].tolist() == list(range(7)) + [0]
    with pytest.raises(ValueError, match="7 tokens does not split into 4"):
        cp.split_rows(torch.zeros(1, 7), 0, 4)


def tiny_model(checkpointing: bool = False):
    model = load_model(ModelOptions(path=TINY, fp32_lm_head=False, gradient_checkpointing=checkpointing), seed=0)
    model.config._experts_implementation = "eager"  # torch's grouped GEMM has no float64
    return model.double().train()  # float64: the comparison sees rounding only; dropout is 0


def reference(checkpointing: bool = False):
    model = tiny_model(checkpointing)
    ids, labels, pos = packed_rows(model.config.vocab_size)
    loss = causal_lm_loss(model, ids, labels, pos, impl="chunked")
    loss.backward()
    with torch.no_grad():
        hidden = model.model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), hidden, grads


def _rank(rank: int, size: int, init: str, out: str, checkpointing: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    try:
        model = tiny_model(checkpointing)
        cp.set_context_parallel(model, dist.group.WORLD)
        ids, labels, pos = packed_rows(model.config.vocab_size)
        loss = cp.context_parallel_loss(model, ids, labels, pos, dist.group.WORLD, impl="chunked")
        loss.backward()
        cp.all_reduce_gradients(model, dist.group.WORLD)
        total = loss.detach().clone()
        dist.all_reduce(total)
        with torch.no_grad():
            hidden = model.model(input_ids=cp.split_rows(ids, rank, size),
                                 position_ids=cp.split_rows(pos, rank, size)).last_hidden_state
        parts = [torch.empty_like(hidden) for _ in range(size)]
        dist.all_gather(parts, hidden)
        if rank == 0:
            grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            torch.save({"loss": float(total), "hidden": torch.cat(parts, dim=1), "grads": grads}, out)
    finally:
        dist.destroy_process_group()


def run_ranks(size: int, tmp_path, checkpointing: bool = False) -> dict:
    out = str(tmp_path / f"cp{size}.pt")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_rank, args=(size, f"file://{tmp_path}/rendezvous{size}", out, checkpointing),
                       nprocs=size, start_method="spawn")
    return torch.load(out)


@pytest.fixture(scope="module")
def single():
    return reference()


@pytest.mark.parametrize("R, checkpointing", [(2, True), (4, False)])
def test_ranks_give_the_single_process_model(R, checkpointing, single, tmp_path):
    """Hidden states (so logits), the loss and every parameter's gradient of the tiny model (lightning and softmax
    layers, MoE) equal one process on the whole rows; R = 2 with gradient checkpointing (the exchange runs again in
    the recomputation)."""
    loss, hidden, grads = single
    got = run_ranks(R, tmp_path, checkpointing)
    assert abs(got["loss"] - loss) < 1e-10
    assert (got["hidden"] - hidden).abs().max() < 1e-10
    assert set(got["grads"]) == set(grads)
    worst = max(float((got["grads"][n] - g).abs().max() / g.abs().max().clamp(min=1e-30)) for n, g in grads.items())
    assert worst < 1e-9, worst


def test_one_rank_group_is_the_plain_path_bit_for_bit(tmp_path):
    """R = 1 through the context-parallel code (a group of one) gives the plain forward's bits."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/one", rank=0, world_size=1)
    try:
        model = load_model(TINY, seed=0).eval()
        ids, _, pos = packed_rows(model.config.vocab_size)
        with torch.no_grad():
            plain = model(input_ids=ids, position_ids=pos).logits
            cp.set_context_parallel(model, dist.group.WORLD)
            split = model(input_ids=ids, position_ids=pos).logits
    finally:
        dist.destroy_process_group()
    assert torch.equal(plain, split)


def test_padded_rows_are_refused(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pad", rank=0, world_size=1)
    try:
        model = load_model(TINY, seed=0)
        cp.set_context_parallel(model, dist.group.WORLD)
        ids = torch.ones(1, 8, dtype=torch.long)
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        with pytest.raises(ValueError, match="unpadded packed rows"):
            model(input_ids=ids, position_ids=torch.arange(8)[None], attention_mask=mask)
        with pytest.raises(ValueError, match="position_ids"):
            model(input_ids=ids)
    finally:
        dist.destroy_process_group()


# ---- GPU (one device) ---------------------------------------------------------------------------------------------

def rel_err(a, ref) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    return float((a - ref).norm() / ref.norm())


def gpu_rows(T: int, seed: int):
    """Two rows of T tokens with documents of 1 to T/2 tokens, boundaries anywhere."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(2):
        lengths, left = [], T
        while left:
            lengths.append(min(left, int(torch.randint(1, T // 2, (1,), generator=gen))))
            left -= lengths[-1]
        rows.append(torch.cat([torch.arange(n) for n in lengths]))
    return torch.stack(rows).cuda()


@gpu
@pytest.mark.parametrize("R", [2, 4])
def test_gpu_fla_slices_with_incoming_states_equal_the_reference(R):
    """fla's kernel on each slice (final state in float32) + the state exchange vs the torch reference on whole
    rows, bf16 inputs (the benchmark model's 16 heads of 64): outputs and q/k/v gradients within rel err 1e-2, while
    slices without the exchange are off by far more."""
    gen = torch.Generator().manual_seed(R)
    B, H, T, D = 2, 16, 2048, 64
    slope = (2 ** (-8 / H)) ** torch.arange(1, H + 1) * torch.linspace(1, 1e-5, H)
    q, k, v = (F.silu(torch.randn(B, H, T, D, generator=gen)).bfloat16().cuda() for _ in range(3))
    docs = document_ids(gpu_rows(T, R))
    weights = torch.randn(B, H, T, D, generator=gen).cuda()

    def fla_slice(q, k, v, slope, docs):
        return kernels.lightning_attention_fla(q, k, v, slope, docs, True, torch.float32)

    def run(fn, dtype):
        inputs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        out = fn(*inputs)
        return out, torch.autograd.grad((out.float() * weights).sum(), inputs)

    out, grads = run(lambda q, k, v: emulated_lightning(q, k, v, slope.cuda(), docs, R, fla_slice), torch.bfloat16)
    ref, ref_grads = run(lambda q, k, v: lightning_attention(q, k, v, slope.cuda(), docs)[0], torch.float32)
    assert rel_err(out, ref) < 1e-2
    assert max(rel_err(g, r) for g, r in zip(grads, ref_grads)) < 1e-2
    L = T // R
    alone = torch.cat([fla_slice(*(x[:, :, s : s + L] for x in (q, k, v)), slope.cuda(), docs[:, s : s + L])[0]
                       for s in range(0, T, L)], dim=2)
    assert rel_err(alone, ref) > 5e-2


@gpu
def test_gpu_softmax_slices_equal_whole_rows():
    """`attend_slice` on CUDA in bf16 (SDPA with the bottom-right causal bias) vs whole-row attention in fp32."""
    gen = torch.Generator().manual_seed(0)
    position_ids = gpu_rows(4096, 5)
    q = torch.randn(2, 16, 4096, 64, generator=gen).cuda()
    k, v = (torch.randn(2, 8, 4096, 64, generator=gen).cuda() for _ in range(2))
    ref = per_document_attention(q, k, v, document_ids(position_ids), 0.125)
    for R in (2, 8):
        split = emulated_softmax(*(x.bfloat16() for x in (q, k, v)), position_ids, R, 0.125)
        assert rel_err(split, ref) < 1e-2, R


@gpu
def test_gpu_model_through_the_context_parallel_path_at_world_size_1(tmp_path):
    """The 548M-shaped tiny model in bf16 on the fast path (fla_fused): loss and gradients through the
    context-parallel code (NCCL group of one) vs the plain path, rel err < 2e-2 (both bf16; the softmax layers run
    different kernels: SDPA per document vs flash varlen)."""
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/nccl", rank=0, world_size=1)
    try:
        text = open(TINY).read().replace("num_attention_heads: 4", "num_attention_heads: 16")
        (tmp_path / "m.yaml").write_text(text.replace("head_dim: 32", "head_dim: 64"))
        results = {}
        for mode in ("plain", "cp"):
            with torch.device("cuda"):
                model = load_model(ModelOptions(path=str(tmp_path / "m.yaml"), dtype="bfloat16"), seed=0)
            position_ids = gpu_rows(1024, 3)[:1]
            ids = torch.randint(3, model.config.vocab_size, position_ids.shape,
                                generator=torch.Generator().manual_seed(1)).cuda()
            if mode == "cp":
                cp.set_context_parallel(model, dist.group.WORLD)
                loss = cp.context_parallel_loss(model, ids, ids, position_ids, dist.group.WORLD)
            else:
                loss = causal_lm_loss(model, ids, ids, position_ids)
            loss.backward()
            results[mode] = float(loss.detach()), torch.cat([p.grad.float().flatten() for p in model.parameters()
                                                    if p.grad is not None])
        assert abs(results["cp"][0] - results["plain"][0]) < 1e-2 * results["plain"][0]
        assert rel_err(results["cp"][1], results["plain"][1]) < 2e-2
    finally:
        dist.destroy_process_group()
