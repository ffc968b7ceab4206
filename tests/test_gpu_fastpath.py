"""The GPU fast path (alignment.kernels) against the CPU reference.

The GPU tests need CUDA and flash-linear-attention; they are skipped elsewhere (CPU CI) and run on a GPU machine with
`python -m pytest -q tests/test_gpu_fastpath.py`. The dispatch and loss tests run everywhere.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import MiniMaxConfig

from alignment import kernels
from alignment.lightning import document_ids, lightning_attention
from alignment.modeling import ModelOptions, PackedLightningAttention, load_model

TINY = "configs/tiny/model.yaml"
ON_GPU = torch.cuda.is_available() and kernels.fla_available()
gpu = pytest.mark.skipif(not ON_GPU, reason="GPU fast path: needs a CUDA device and flash-linear-attention "
                                            "(the `gpu` extra); CPU machines run the torch reference instead")
if ON_GPU:  # a few Triton configurations per kernel: full autotuning takes minutes per shape on a fresh machine
    kernels.limit_triton_autotuning()


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    return float((a - ref).norm() / ref.norm())


def random_doc_ids(gen, B, T, max_docs):
    """(B, T) document ids with random boundaries: some documents of one token, some longer than a 64-token chunk."""
    rows = []
    for _ in range(B):
        cuts = torch.randperm(T - 1, generator=gen)[: int(torch.randint(0, max_docs, (1,), generator=gen))] + 1
        starts = torch.zeros(T, dtype=torch.long)
        starts[cuts] = 1
        rows.append(starts.cumsum(0))
    return torch.stack(rows)


# ---- everywhere -------------------------------------------------------------------------------------------------

def test_cu_seqlens_from_document_ids():
    docs = document_ids(torch.tensor([[0, 1, 0, 1, 2], [0, 0, 1, 0, 1]]))  # [[0,0,1,1,1], [0,1,1,2,2]]
    cu, cu_cpu, last = kernels.packed_cu_seqlens(docs)
    assert cu.tolist() == cu_cpu.tolist() == [0, 2, 5, 6, 8, 10]  # row 2 starts a new sequence at 5
    assert last.tolist() == [1, 4]


def test_kernel_option_dispatch_and_errors():
    assert kernels.resolve_lightning_kernel("torch", torch.device("cuda")) == "torch"
    assert kernels.resolve_lightning_kernel("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="lightning_kernel.*'flash'"):
        kernels.check_lightning_kernel("flash")
    if not kernels.fla_available():
        with pytest.raises(ImportError, match=r"lightning_kernel: 'fla'.*gpu"):
            load_model(ModelOptions(path=TINY, lightning_kernel="fla"))
    else:
        with pytest.raises(ValueError, match="CUDA"):
            kernels.resolve_lightning_kernel("fla", torch.device("cpu"))


def test_silu_split_heads_layout():
    """q, k, v come out contiguous in fla's (B, T, H, D) layout, each head's thirds of the projection, silu'd (the
    torch fallback here; the fused kernel on CUDA is checked against it below)."""
    B, T, H, D = 2, 5, 3, 4
    qkv = torch.randn(B, T, H * 3 * D)
    q, k, v = kernels.silu_split_heads(qkv, H, D)
    per_head = F.silu(qkv).view(B, T, H, 3, D)
    for i, x in enumerate((q, k, v)):
        assert x.shape == (B, T, H, D) and x.is_contiguous()
        assert torch.equal(x, per_head[:, :, :, i])


def test_chunked_cross_entropy_matches_full_logits():
    """Value and gradients equal plain cross-entropy over full logits; bf16 hidden, fp32 head, ignored tokens."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 50, 16, generator=gen).bfloat16().requires_grad_()
    weight = torch.randn(40, 16, generator=gen).requires_grad_()
    labels = torch.randint(0, 40, (3, 50), generator=gen)
    labels[0, :7] = -100
    loss = kernels.chunked_cross_entropy(hidden, weight, labels, chunk_tokens=32)  # 150 tokens: 5 chunks
    ref = F.cross_entropy(F.linear(hidden.float(), weight).reshape(-1, 40), labels.reshape(-1))
    assert abs(loss.item() - ref.item()) < 1e-5
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-5


def test_causal_lm_loss_equals_model_loss():
    model = load_model(TINY, seed=0)
    ids = torch.randint(3, model.config.vocab_size, (2, 70), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :10] = -100
    ours = kernels.causal_lm_loss(model, ids, labels, impl="chunked")
    assert abs(ours.item() - model(input_ids=ids, labels=labels).loss.item()) < 1e-5


# ---- GPU ----------------------------------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("seed, packed", [(0, False), (1, True), (2, True), (3, True)])
def test_fla_equals_reference_forward_and_gradients(seed, packed):
    """Random bf16 inputs, MiniMax slopes (strong and weak decay), random document boundaries: output, final state
    and q/k/v gradients of the fla path vs the blockwise reference in fp32 on the same inputs; rel err < 1e-2."""
    gen = torch.Generator().manual_seed(seed)
    B, H, T, D = 2, 16, 700 + 97 * seed, 64  # the benchmark model's heads (shared Triton tuning)
    base = 2 ** (-8 / H)
    slope = base ** torch.arange(1, H + 1) * (1 - seed / 4)  # layer-position factor as in transformers
    q, k, v = (F.silu(torch.randn(B, H, T, D, generator=gen)).bfloat16().cuda() for _ in range(3))
    docs = random_doc_ids(gen, B, T, 12).cuda() if packed else None
    grad_out = torch.randn(B, H, T, D, generator=gen).bfloat16().cuda()

    def run(fn, dtype):
        inputs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        out, state = fn(*inputs, slope.cuda(), docs)
        grads = torch.autograd.grad(out, inputs, grad_out.to(dtype))
        return out, state, grads

    out, state, grads = run(kernels.lightning_attention_fla, torch.bfloat16)
    ref_out, ref_state, ref_grads = run(lightning_attention, torch.float32)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rel_err(out, ref_out) < 1e-2
    assert rel_err(state, ref_state) < 1e-2
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-2


@pytest.fixture
def tiny_gpu_yaml(tmp_path):
    """The tiny model with 16 heads of 64 (the benchmark model's lightning shape, so Triton tunes one shape)."""
    text = open(TINY).read().replace("num_attention_heads: 4", "num_attention_heads: 16")
    path = tmp_path / "tiny_gpu.yaml"
    path.write_text(text.replace("head_dim: 32", "head_dim: 64"))
    return str(path)


@gpu
@pytest.mark.parametrize("fast", ["fla", "fla_fused"])
def test_model_fast_path_equals_reference_path(tiny_gpu_yaml, fast):
    """A small model on CUDA in bf16, packed rows: fla lightning + varlen softmax vs the torch reference path, same
    weights. Logits and all parameter gradients together within rel err 2e-2 (both bf16, rounding differently; a
    near-tie in MoE routing can flip, so each single parameter's gradient gets 1e-1 - a document leak or a wrong
    decay gives errors of order 1)."""
    gen = torch.Generator().manual_seed(7)
    models = {}
    for kernel in (fast, "torch"):
        with torch.device("cuda"):
            models[kernel] = load_model(ModelOptions(path=tiny_gpu_yaml, dtype="bfloat16", lightning_kernel=kernel),
                                        seed=0)
    cfg = models[fast].config
    lengths = [int(n) for n in torch.randint(1, 3 * cfg.block_size, (9,), generator=gen)]
    ids = torch.randint(3, cfg.vocab_size, (1, sum(lengths)), generator=gen).cuda()
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    results = {}
    for kernel, model in models.items():
        out = model(input_ids=ids, position_ids=position_ids, labels=ids)
        out.loss.backward()
        results[kernel] = out.logits.float(), {n: p.grad.float() for n, p in model.named_parameters()}
    assert rel_err(results[fast][0], results["torch"][0]) < 2e-2
    names = list(results["torch"][1])
    flat = {k: torch.cat([results[k][1][n].flatten() for n in names]) for k in results}
    assert rel_err(flat[fast], flat["torch"]) < 2e-2
    for name in names:
        assert rel_err(results[fast][1][name], results["torch"][1][name]) < 1e-1, name


@gpu
@pytest.mark.parametrize("fast", ["fla", "fla_fused"])
def test_fast_path_left_padded_batch_equals_reference(tiny_gpu_yaml, fast):
    """Left-padded rows with an attention mask (how GRPO and DPO batch prompts): on the real tokens the fast path's
    logits equal the torch reference path's (bf16, rel err < 2e-2), and each row equals itself run unpadded."""
    gen = torch.Generator().manual_seed(11)
    models = {}
    for kernel in (fast, "torch"):
        with torch.device("cuda"):
            models[kernel] = load_model(ModelOptions(path=tiny_gpu_yaml, dtype="bfloat16", lightning_kernel=kernel),
                                        seed=0).eval()
    vocab = models[fast].config.vocab_size
    lengths = [150, 37, 90]
    width = max(lengths)
    rows = [torch.randint(3, vocab, (n,), generator=gen) for n in lengths]
    ids = torch.stack([torch.cat([torch.zeros(width - n, dtype=torch.long), r]) for n, r in zip(lengths, rows)]).cuda()
    mask = torch.stack([torch.cat([torch.zeros(width - n), torch.ones(n)]) for n in lengths]).long().cuda()
    with torch.no_grad():
        logits = {k: m(input_ids=ids, attention_mask=mask).logits.float() for k, m in models.items()}
        for i, n in enumerate(lengths):
            real = slice(width - n, width)
            assert rel_err(logits[fast][i, real], logits["torch"][i, real]) < 2e-2, i
            alone = models[fast](input_ids=rows[i][None].cuda()).logits.float()[0]
            assert rel_err(logits[fast][i, real], alone) < 2e-2, i


@gpu
def test_fast_path_packed_documents_match_each_alone(tiny_gpu_yaml):
    """Document isolation on the fast path: every packed document gets the logits it gets alone (bf16)."""
    with torch.device("cuda"):
        model = load_model(ModelOptions(path=tiny_gpu_yaml, dtype="bfloat16"), seed=0).eval()
    gen = torch.Generator().manual_seed(3)
    lengths = [int(n) for n in torch.randint(5, 200, (5,), generator=gen)]
    docs = [torch.randint(3, model.config.vocab_size, (1, n), generator=gen).cuda() for n in lengths]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    with torch.no_grad():
        packed = model(input_ids=torch.cat(docs, 1), position_ids=position_ids).logits.float()
        start = 0
        for doc in docs:
            alone = model(input_ids=doc).logits.float()
            assert rel_err(packed[:, start : start + doc.shape[1]], alone) < 2e-2
            start += doc.shape[1]


@gpu
@pytest.mark.parametrize("impl", ["liger", "chunked"])
def test_gpu_loss_matches_full_logits(impl):
    if impl == "liger" and not kernels.liger_available():
        pytest.skip("liger-kernel not installed")
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 3000, 256, generator=gen).bfloat16().cuda().requires_grad_()
    weight = (torch.randn(5000, 256, generator=gen) * 0.05).cuda().requires_grad_()  # fp32 head
    labels = torch.randint(0, 5000, (2, 3000), generator=gen).cuda()
    labels[:, :100] = -100
    loss = kernels.lm_loss(hidden, weight, labels, impl)
    ref = F.cross_entropy(F.linear(hidden.float(), weight).reshape(-1, 5000), labels.reshape(-1))
    assert abs(loss.item() - ref.item()) < 1e-3 * ref.item()
    for g, r in zip(torch.autograd.grad(loss, (hidden, weight)), torch.autograd.grad(ref, (hidden, weight))):
        assert rel_err(g, r) < 1e-2


@gpu
def test_fused_silu_split_matches_torch():
    """The Triton SiLU/split kernel vs torch's silu + split, forward and backward, bf16: equal up to the last bit's
    rounding (rel err < 1e-3; one bf16 ulp is 4e-3), every element written (outputs start as garbage)."""
    gen = torch.Generator().manual_seed(4)
    B, T, H, D = 2, 333, 16, 64
    x = (3 * torch.randn(B, T, H * 3 * D, generator=gen)).bfloat16().cuda().requires_grad_()
    grads = [torch.randn(B, T, H, D, generator=gen).bfloat16().cuda() for _ in range(3)]
    ours = kernels.silu_split_heads(x, H, D)
    x_ref = x.detach().requires_grad_()
    ref = [t.contiguous() for t in F.silu(x_ref).view(B, T, H, 3 * D).split(D, dim=-1)]
    for a, b in zip(ours, ref):
        assert a.is_contiguous() and torch.isfinite(a).all() and rel_err(a, b) < 1e-3
    (dx,) = torch.autograd.grad(ours, x, grads)
    (dx_ref,) = torch.autograd.grad(ref, x_ref, grads)
    assert torch.isfinite(dx).all() and rel_err(dx, dx_ref) < 1e-3


@gpu
@pytest.mark.parametrize("packed", [False, True])
def test_fused_lightning_layer_equals_reference(packed):
    """The whole fused layer (`kernels.lightning_layer_fla`: SiLU/split kernel, fla attention, fla's fused RMS norm +
    sigmoid gate) in bf16 vs transformers' math on the torch reference in fp32, same weights and fp32 slopes: output,
    final state, and the gradients of the input and of every parameter (norm weight included), rel err < 1e-2."""
    cfg = MiniMaxConfig(hidden_size=256, num_attention_heads=16, head_dim=64, num_hidden_layers=4,
                        layer_types=["linear_attention"] * 4, block_size=256)
    torch.manual_seed(5)
    layer = PackedLightningAttention(cfg, layer_idx=1)
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5)  # not the all-ones init: a norm-weight mix-up must show
    fast = copy.deepcopy(layer).cuda().bfloat16()
    ref = copy.deepcopy(layer).cuda()
    gen = torch.Generator().manual_seed(6)
    B, T, H, D = 2, 777, 16, 64
    x = torch.randn(B, T, 256, generator=gen).cuda()
    grad_out = torch.randn(B, T, 256, generator=gen).cuda()
    docs = random_doc_ids(gen, B, T, 10).cuda() if packed else None

    x_fast = x.bfloat16().requires_grad_()
    out, state = kernels.lightning_layer_fla(fast, x_fast, None, docs, True)
    grads = torch.autograd.grad(out, [x_fast, *fast.parameters()], grad_out.bfloat16())

    x_ref = x.clone().requires_grad_()
    qkv = F.silu(ref.qkv_proj(x_ref)).view(B, T, H, 3 * D).transpose(1, 2)
    o, ref_state = lightning_attention(*qkv.split(D, dim=-1), ref.slope_fp32(x.device), docs, ref.block_size)
    ref_out = ref.out_proj(torch.sigmoid(ref.output_gate(x_ref)) * ref.norm(o.transpose(1, 2).reshape(B, T, H * D)))
    ref_grads = torch.autograd.grad(ref_out, [x_ref, *ref.parameters()], grad_out)

    assert out.dtype == torch.bfloat16 and rel_err(out, ref_out) < 1e-2
    assert rel_err(state, ref_state) < 1e-2
    names = ["input"] + [n for n, _ in fast.named_parameters()]
    for name, g, r in zip(names, grads, ref_grads):
        assert rel_err(g, r) < 1e-2, name
