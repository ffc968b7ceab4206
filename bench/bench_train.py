"""GPU training benchmark of the fast path (alignment.kernels) against stock transformers, in one run on one GPU.

    make bench                                        # on a GPU machine: writes bench/results/train_bench.{json,md}
    python -m bench.bench_train --out DIR [--quick]   # --quick: small sizes, a smoke test of the whole script

Three measurements (bench/README.md explains each and records the results):
1. lightning attention fwd+bwd at 2K/8K/32K/128K tokens (16 heads x 128, bf16): transformers' `MiniMaxLightningAttention`
   (a Python loop over 256-token blocks) vs ours (`kernels.lightning_layer_fla`: fused SiLU/split into fla's layout,
   flash-linear-attention's chunk kernels with the forward's chunk states kept for the backward
   (`kernels.LightningChunk`), fused RMS norm + sigmoid gate), both as the full layer with identity
   projections and the gate's pre-activation as an input of its own (so the timed work is the attention itself plus
   the activation, output norm and gate); also ours
   unfused (the same kernel with torch's element-wise ops and layout copies around it, the previous fast path), the
   kernel alone on inputs already in its layout (ours, and fla's `chunk_simple_gla` as shipped, which recomputes
   the states), and SDPA flash softmax attention for scale; numerics vs a
   float64 reference, packed batch included; a torch-profiler breakdown (top kernels) of our layer and of the fla
   kernel at 32K.
2. train step (fwd + bwd + AdamW, gradient checkpointing, bf16) tokens/s and peak memory of the 548M MiniMax model
   (configs/548m/model.yaml) at 2K/8K/32K: stock transformers vs ours (`load_model`: fla + FP32 LM head + a loss that
   never holds the full logits), MFU from active parameters.
3. the longest context that trains (one step, batch 1, gradient checkpointing) for that model, ours vs stock.

Results are written after every section (a run cut short keeps what it measured). By default fla's Triton autotuning
is limited (`kernels.limit_triton_autotuning`: kernels with <= 8 configurations tuned fully, the two 48-configuration
state kernels at 4), so that a fresh device machine spends seconds, not minutes, compiling; `--full-autotune` gives
fla's full tuning, what a user's training run gets (results cached on disk after the first run).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # long contexts: less fragmentation

import torch
import torch.nn.functional as F
from torch import nn
from transformers import MiniMaxConfig, MiniMaxForCausalLM
from transformers.models.minimax import modeling_minimax as mm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from alignment import kernels  # noqa: E402
from alignment.lightning import lightning_attention  # noqa: E402
from alignment.modeling import ModelOptions, PackedLightningAttention, load_model, model_config_from_yaml  # noqa: E402
from alignment.reporting import write_json_atomic  # noqa: E402

MODEL_YAML = str(Path(__file__).resolve().parents[1] / "configs" / "548m" / "model.yaml")
PEAK_BF16_TFLOPS = 989.4  # H100 SXM dense bf16, datasheet (a measured 8192^3 matmul reaches ~798 on these machines)
GIB = 2**30
DEVICE = "cuda"  # a module constant so the script can be dry-run on CPU with stand-in kernels


def sync_time(fn) -> float:
    """Seconds of `fn()` with the device synchronised on both sides."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def median_ms(fn, warmup: int = 2, iters: int = 5) -> float:
    """Median of `iters` timed calls after `warmup` untimed ones (CUDA events)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    return float((a - ref).norm() / ref.norm())


def free_memory():
    gc.collect()
    torch.cuda.empty_cache()


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


# ---- 1. lightning attention ----------------------------------------------------------------------------------------

class GateInput(nn.Module):
    """Stands in for the output-gate projection: returns the (B, T, H·D) gate pre-activation handed to
    `layer_fwd_bwd`, a tensor of its own as a projection's output is. (Earlier runs took the first H·D columns of the
    qkv input instead: a strided copy and a scattered gradient that no real layer has, 0.7 of the fused layer's
    4.45 device-ms at 32K in the profiled run.)"""

    value = None

    def forward(self, x):
        return self.value


def attention_layer(H: int, D: int, ours: bool, dtype: torch.dtype, kernel: str = "fla_fused") -> nn.Module:
    """transformers' lightning layer (layer 0 of 16: the strongest decays) with identity projections: the input is
    the (B, T, 3·H·D) qkv pre-activation and the gate pre-activation comes separately (`GateInput`), so fwd+bwd
    times the attention, its activation, output norm and gate only. `ours` swaps in our layer class, as `load_model`
    does."""
    cfg = MiniMaxConfig(hidden_size=H * D, num_attention_heads=H, head_dim=D, num_hidden_layers=16,
                        layer_types=["linear_attention"] * 16, block_size=256)
    with torch.device(DEVICE):
        layer = mm.MiniMaxLightningAttention(cfg, layer_idx=0)
    layer.qkv_proj, layer.out_proj, layer.output_gate = nn.Identity(), nn.Identity(), GateInput()
    if ours:
        layer.__class__ = PackedLightningAttention
        layer.lightning_kernel = kernel
    return layer.to(dtype)


def random_doc_ids(gen, B, T, n_docs):
    rows = []
    for _ in range(B):
        starts = torch.zeros(T, dtype=torch.long)
        starts[torch.randperm(T - 1, generator=gen)[: n_docs - 1] + 1] = 1
        rows.append(starts.cumsum(0))
    return torch.stack(rows).to(DEVICE)


def unfused_lightning_layer(layer, x):
    """The previous fast path of a lightning layer, kept for comparison: torch's SiLU, the (B, H, T, D) transposes
    (fla's `input_guard` copies them back to contiguous), the fla kernel, transformers' fp32 RMS norm and sigmoid
    gate as separate ops. Same math as `kernels.lightning_layer_fla`."""
    B, T, _ = x.shape
    qkv = layer.act_fn(layer.qkv_proj(x))
    q, k, v = qkv.reshape(B, T, layer.num_attention_heads, 3 * layer.head_dim).transpose(1, 2).chunk(3, dim=-1)
    out, _ = kernels.lightning_attention_fla(q, k, v, layer.slope_fp32(x.device), None, False)
    out = layer.norm(out.transpose(1, 2).reshape(B, T, -1))
    return (layer.out_proj(torch.sigmoid(layer.output_gate(x)) * out),)


def layer_fwd_bwd(layer, x, gate, grad, docs=None):
    """One forward + backward of a bench layer; returns the output and the gradients of the qkv and gate inputs."""
    x, gate = (t.detach().requires_grad_() for t in (x, gate))
    layer.output_gate.value = gate
    out = layer(x, None, None, document_ids=docs)[0] if docs is not None else layer(x, None, None)[0]
    out.backward(grad)
    layer.output_gate.value = None
    return out.detach(), x.grad, gate.grad


def top_kernels(events, k: int = 15) -> tuple[list[dict], float]:
    """The k device activities (kernels, copies) with the most total time, and the total device ms."""
    from torch.autograd import DeviceType

    total: dict[str, list] = {}
    for e in events:
        if e.device_type == DeviceType.CUDA:
            acc = total.setdefault(e.name, [0.0, 0])
            acc[0] += e.time_range.elapsed_us() / 1e3
            acc[1] += 1
    rows = [{"name": name[:80], "total_ms": ms, "count": n, "ms_per_call": ms / n}
            for name, (ms, n) in sorted(total.items(), key=lambda kv: -kv[1][0])[:k]]
    return rows, sum(ms for ms, _ in total.values())


def profile_ms(fn, iters: int = 3) -> dict:
    """Device time per call of `fn` by kernel (torch profiler, CUDA activity), after one warm-up call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    rows, total = top_kernels(prof.events())
    return {"device_ms_per_iter": total / iters,
            "top_kernels": [{"name": r["name"], "ms_per_iter": r["total_ms"] / iters,
                             "calls_per_iter": r["count"] / iters} for r in rows]}


def bench_attention(lengths, numerics_lengths, H=16, D=128, profile_at: int = 32768) -> dict:
    from fla.ops.simple_gla import chunk_simple_gla

    gen = torch.Generator().manual_seed(0)
    profiles = {}
    stock, ours = attention_layer(H, D, False, torch.bfloat16), attention_layer(H, D, True, torch.bfloat16)
    slope = stock.slope_rate
    rows = []
    for T in lengths:
        x = torch.randn(1, T, 3 * H * D, generator=gen).bfloat16().to(DEVICE)
        gate = torch.randn(1, T, H * D, generator=gen).bfloat16().to(DEVICE)
        grad = torch.randn(1, T, H * D, generator=gen).bfloat16().to(DEVICE)
        # (1, T, H, D) contiguous: the layout the fused layer hands fla
        q, k, v = (F.silu(t).contiguous().requires_grad_() for t in x.view(1, T, H, 3 * D).split(D, dim=-1))
        g = grad.view(1, T, H, D)
        qh, kh, vh = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))  # SDPA's layout
        gh = g.transpose(1, 2)
        iters = 3 if T >= 65536 else 5

        def fla_core():
            out, _ = kernels.lightning_attention_fla_bthd(q, k, v, slope, None, False)
            out.backward(g)

        def fla_shipped():  # fla's own autograd function, which recomputes the chunk states in the backward
            out, _ = chunk_simple_gla(q, k, v, g_gamma=-slope.reshape(-1).float(), scale=1.0)
            out.backward(g)

        def sdpa():
            F.scaled_dot_product_attention(qh, kh, vh, is_causal=True).backward(gh)

        def unfused():
            x_, ours.output_gate.value = x.detach().requires_grad_(), gate.detach().requires_grad_()
            unfused_lightning_layer(ours, x_)[0].backward(grad)
            ours.output_gate.value = None

        row = {"tokens": T,
               "transformers_layer_ms": median_ms(lambda: layer_fwd_bwd(stock, x, gate, grad), iters=iters),
               "ours_layer_ms": median_ms(lambda: layer_fwd_bwd(ours, x, gate, grad), iters=iters),
               "ours_unfused_layer_ms": median_ms(unfused, iters=iters),
               "fla_kernel_ms": median_ms(fla_core, iters=iters),
               "fla_shipped_kernel_ms": median_ms(fla_shipped, iters=iters),
               "sdpa_flash_softmax_ms": median_ms(sdpa, iters=iters)}
        row["speedup"] = row["transformers_layer_ms"] / row["ours_layer_ms"]
        row["kernel_speedup"] = row["transformers_layer_ms"] / row["fla_kernel_ms"]
        if T == profile_at:  # where the device time of our layer goes, kernel by kernel
            profiles = {"ours_layer": profile_ms(lambda: layer_fwd_bwd(ours, x, gate, grad)),
                        "fla_kernel": profile_ms(fla_core)}
        rows.append(row)
        print(f"attention T={T}: {row}", flush=True)
        del x, gate, grad, q, k, v, g, qh, kh, vh, gh
        free_memory()
    return {"heads": H, "head_dim": D, "dtype": "bfloat16", "batch": 1, "timing": rows,
            "profile": {"tokens": profile_at, **profiles} if profiles else {},
            "numerics": attention_numerics(H, D, numerics_lengths)}


def attention_numerics(H, D, lengths) -> list[dict]:
    """Relative error (‖x - ref‖ / ‖ref‖) in bf16 against float64 references on the same inputs: the layers (output
    and input gradient) against transformers' layer in float64 (packed: our torch reference path in float64), and the
    fla kernel (output, state, q/k/v gradients) against `alignment.lightning.lightning_attention` in float64."""
    gen = torch.Generator().manual_seed(1)
    bf16 = {"transformers": attention_layer(H, D, False, torch.bfloat16),
            "ours": attention_layer(H, D, True, torch.bfloat16)}
    ref_stock = attention_layer(H, D, False, torch.float64)
    ref_packed = attention_layer(H, D, True, torch.float64, kernel="torch")
    slope64 = ref_stock.slope_rate
    cases = [(T, 1, 1) for T in lengths] + [(8192 if max(lengths) > 2048 else 2048, 2, 24)]
    if max(lengths) >= 32768:  # a few long packed documents
        cases.append((32768, 1, 3))
    rows = []
    for T, B, n_docs in cases:
        docs = random_doc_ids(gen, B, T, n_docs) if n_docs > 1 else None
        x64 = torch.randn(B, T, 3 * H * D, generator=gen, dtype=torch.float64).to(DEVICE)
        gate64 = torch.randn(B, T, H * D, generator=gen, dtype=torch.float64).to(DEVICE)
        g64 = torch.randn(B, T, H * D, generator=gen, dtype=torch.float64).to(DEVICE)
        row = {"tokens": T, "batch": B, "documents_per_row": n_docs}
        ref_layer = layer_fwd_bwd(ref_packed if docs is not None else ref_stock, x64, gate64, g64, docs)
        for name, layer in bf16.items():
            if name == "transformers" and docs is not None:
                continue  # transformers cannot isolate packed documents (tests/test_modeling.py)
            got = layer_fwd_bwd(layer, x64.bfloat16(), gate64.bfloat16(), g64.bfloat16(), docs)
            for what, a, b in zip(("out", "dx", "dgate"), got, ref_layer):
                row[f"{name}_layer_{what}"] = rel_err(a, b)
        # the kernel alone
        qkv = [F.silu(t).transpose(1, 2) for t in x64.view(B, T, H, 3 * D).split(D, dim=-1)]
        gk = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64).to(DEVICE)
        ins64 = [t.clone().requires_grad_() for t in qkv]
        ref, ref_state = lightning_attention(*ins64, slope64, docs)
        ref_grads = torch.autograd.grad(ref, ins64, gk)
        ins = [t.bfloat16().requires_grad_() for t in qkv]
        out, state = kernels.lightning_attention_fla(*ins, slope64, docs)  # same slopes: kernel error only
        grads = torch.autograd.grad(out, ins, gk.bfloat16())
        row.update(kernel_out=rel_err(out, ref), kernel_state=rel_err(state, ref_state),
                   **{f"kernel_d{n}": rel_err(a, b) for n, a, b in zip("qkv", grads, ref_grads)})
        rows.append(row)
        print(f"numerics: {row}", flush=True)
        del x64, gate64, g64, ref_layer, qkv, ins64, ins, ref, ref_grads, out, grads
        free_memory()
    return rows


# ---- 2 + 3. the 548M model -------------------------------------------------------------------------------------

def build(kind: str, **opts):
    """('stock' | 'ours') model in bf16 on the GPU with gradient checkpointing, and its AdamW (MiniMax-M1 betas)."""
    with torch.device(DEVICE):
        if kind == "stock":
            torch.manual_seed(0)
            model = MiniMaxForCausalLM(model_config_from_yaml(MODEL_YAML)).to(torch.bfloat16)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        else:
            model = load_model(ModelOptions(path=MODEL_YAML, dtype="bfloat16", gradient_checkpointing=True,
                                            **opts), seed=0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-15, fused=True)
    return model, opt


def step_fn(kind, model, opt, ids, position_ids=None, loss_impl="auto"):
    def step():
        if kind == "stock":
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        else:
            loss = kernels.causal_lm_loss(model, ids, position_ids=position_ids, impl=loss_impl)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def active_params(model) -> int:
    """Parameters one token passes through: all but the input embedding, experts counted at top_k / num_experts."""
    cfg = model.config
    total = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            continue
        total += p.numel() * (cfg.num_experts_per_tok / cfg.num_local_experts if ".experts." in name else 1)
    return int(total)


def flops_per_token(model, doc_len: float) -> float:
    """Model FLOPs per trained token (fwd + bwd = 3 × fwd, recomputation not counted): 6 · active params, plus
    softmax attention 6 · H · D · L (causal, mean context L/2 over a document of length L) per softmax layer, plus
    lightning attention 3 · H · (4 D² + 2 C D) per lightning layer (state read and update, C = 64-token chunks)."""
    cfg = model.config
    D = cfg.head_dim
    n_soft = cfg.layer_types.count("full_attention")
    n_lin = len(cfg.layer_types) - n_soft
    attn = n_soft * 6 * cfg.num_attention_heads * D * doc_len
    lin = n_lin * 3 * cfg.num_attention_heads * (4 * D * D + 2 * 64 * D)
    return 6 * active_params(model) + attn + lin


def bench_throughput(kind, model, opt, lengths, tokens_per_step, warmup, iters, packed=False, **step_opts):
    rows = []
    gen = torch.Generator().manual_seed(2)
    for T in lengths:
        B = max(1, tokens_per_step // T)
        ids = torch.randint(3, model.config.vocab_size, (B, T), generator=gen).to(DEVICE)
        position_ids, doc_len = None, float(T)
        if packed:  # one row of random-length documents
            docs = random_doc_ids(gen, B, T, max(2, T // 4096)).cpu()
            position_ids = torch.cat([torch.arange(n) for n in torch.unique_consecutive(docs[0], return_counts=True)[1]])
            lens = torch.unique_consecutive(docs[0], return_counts=True)[1].double()
            doc_len = float((lens**2).sum() / lens.sum())
            position_ids = position_ids[None].expand(B, -1).to(DEVICE)
        step = step_fn(kind, model, opt, ids, position_ids, **step_opts)
        row = {"tokens": T, "batch": B, "packed": packed}
        try:
            losses = [step() for _ in range(warmup)]
            torch.cuda.reset_peak_memory_stats()
            times = [sync_time(lambda: losses.append(step())) for _ in range(iters)]
            sec = statistics.median(times)
            tok_s = B * T / sec
            row.update(step_s=sec, tokens_per_s=tok_s, peak_gib=torch.cuda.max_memory_allocated() / GIB,
                       loss_first=float(losses[0]), loss_last=float(losses[-1]),
                       mfu=tok_s * flops_per_token(model, doc_len) / (PEAK_BF16_TFLOPS * 1e12))
        except Exception as err:  # noqa: BLE001 - an OOM is a result here
            row.update(error=("OOM: " if is_oom(err) else "") + str(err).splitlines()[0][:300])
        rows.append(row)
        print(f"throughput {kind} {step_opts or ''}: {row}", flush=True)
        opt.zero_grad(set_to_none=True)
        del ids, step
        free_memory()
    return rows


def longest_context(kind, model, opt, lengths, deadline):
    """One training step (fwd + bwd + AdamW, batch 1) at each length, ascending, until the first failure. A length
    is skipped when the previous step's time, scaled quadratically (the softmax layers), would overrun `deadline`."""
    rows, last = [], None
    for T in lengths:
        if last is not None and time.time() + 1.2 * last[1] * (T / last[0]) ** 2 > deadline:
            rows.append({"tokens": T, "error": "not run: would overrun the benchmark's time budget"})
            break
        ids = torch.randint(3, model.config.vocab_size, (1, T)).to(DEVICE)
        step = step_fn(kind, model, opt, ids)
        torch.cuda.reset_peak_memory_stats()
        row = {"tokens": T}
        try:
            row["step_s"] = sync_time(step)
            row["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
            last = (T, row["step_s"])
        except Exception as err:  # noqa: BLE001
            row["error"] = ("OOM: " if is_oom(err) else "") + str(err).splitlines()[0][:300]
        rows.append(row)
        print(f"longest {kind}: {row}", flush=True)
        opt.zero_grad(set_to_none=True)
        del ids, step
        free_memory()
        if "error" in row:
            break
    return rows


# ---- report -----------------------------------------------------------------------------------------------------------

def markdown(res: dict) -> str:
    env = res["environment"]
    out = [f"# Training benchmark: fast path vs stock transformers\n",
           f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, "
           f"fla {env['fla']}, liger-kernel {env['liger_kernel']}; Triton autotuning {res.get('autotuning')}; "
           f"total {res.get('elapsed_s', 0):.0f} s.\n"]
    att = res.get("attention")
    if att:
        out += [f"## 1. Lightning attention fwd+bwd (H{att['heads']} × D{att['head_dim']}, bf16, batch 1)\n",
                "| tokens | transformers layer ms | ours layer ms | layer speedup | ours unfused layer ms | "
                "kernel ms | kernel vs transformers layer | fla `chunk_simple_gla` as shipped ms | "
                "SDPA flash softmax ms |", "|---|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['tokens']} | {r['transformers_layer_ms']:.2f} | {r['ours_layer_ms']:.2f} | {r['speedup']:.1f}× "
                f"| {r['ours_unfused_layer_ms']:.2f} | {r['fla_kernel_ms']:.2f} | {r['kernel_speedup']:.1f}× "
                f"| {r.get('fla_shipped_kernel_ms', float('nan')):.2f} | {r['sdpa_flash_softmax_ms']:.2f} |"
                for r in att["timing"]]
        out += ["\nNumerics, relative error vs float64 (bf16 inputs):\n",
                "| tokens × batch | docs/row | transformers layer out / dx / dgate | ours layer out / dx / dgate | "
                "fla kernel out / state / dq / dk / dv |", "|---|---|---|---|---|"]

        def layer_errors(r, name):
            return " / ".join(f"{r[f'{name}_layer_{w}']:.1e}" for w in ("out", "dx", "dgate") if f"{name}_layer_{w}" in r)

        for r in att["numerics"]:
            stock = layer_errors(r, "transformers") if "transformers_layer_out" in r else "n/a (leaks across documents)"
            out.append(f"| {r['tokens']} × {r['batch']} | {r['documents_per_row']} | {stock} | "
                       f"{layer_errors(r, 'ours')} | {r['kernel_out']:.1e} / "
                       f"{r['kernel_state']:.1e} / {r['kernel_dq']:.1e} / {r['kernel_dk']:.1e} / "
                       f"{r['kernel_dv']:.1e} |")
        for what, p in att.get("profile", {}).items():
            if what == "tokens":
                continue
            out += [f"\nProfile, {what.replace('_', ' ')} fwd+bwd at {att['profile']['tokens']} tokens: "
                    f"{p['device_ms_per_iter']:.2f} device ms per call.\n",
                    "| kernel | ms per call | launches per call |", "|---|---|---|"]
            out += [f"| `{k['name']}` | {k['ms_per_iter']:.3f} | {k['calls_per_iter']:.0f} |" for k in p["top_kernels"]]
    thr = res.get("throughput")
    if thr:
        out += [f"\n## 2. Train step, 548M MiniMax ({thr['active_params'] / 1e6:.0f}M active), bf16, gradient "
                "checkpointing, AdamW\n",
                "| variant | tokens × batch | tokens/s | step s | peak GiB | MFU | vs stock |", "|---|---|---|---|---|---|---|"]
        stock = {r["tokens"]: r for r in thr.get("stock", []) if "tokens_per_s" in r}
        for variant, rows in sorted(thr.items(), key=lambda kv: kv[0] != "stock"):  # stock first
            if not isinstance(rows, list):
                continue
            for r in rows:
                if "error" in r:
                    out.append(f"| {variant} | {r['tokens']} × {r['batch']} | {r['error'][:60]} | | | | |")
                    continue
                ratio = (f"{r['tokens_per_s'] / stock[r['tokens']]['tokens_per_s']:.2f}×"
                         if r["tokens"] in stock and not r.get("packed") else "")
                out.append(f"| {variant} | {r['tokens']} × {r['batch']} | {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} "
                           f"| {r['peak_gib']:.1f} | {100 * r['mfu']:.1f}% | {ratio} |")
    lng = res.get("longest")
    if lng:
        out += ["\n## 3. Longest context that trains (batch 1, one fwd+bwd+AdamW step)\n",
                "| model | tokens | result | step s | peak GiB |", "|---|---|---|---|---|"]
        for kind, rows in sorted(lng.items(), key=lambda kv: kv[0] != "stock"):
            if not rows:  # not tried in this run
                continue
            for r in rows:
                ok = "error" not in r
                out.append(f"| {kind} | {r['tokens']} | {'trains' if ok else r['error'][:70]} | "
                           f"{r.get('step_s', float('nan')):.2f} | {r.get('peak_gib', float('nan')):.1f} |")
            best = max([r["tokens"] for r in rows if "error" not in r], default=0)
            out.append(f"| **{kind} longest** | **{best}** | | | |")
    return "\n".join(out) + "\n"


def save(res, out_dir: Path, start: float, name: str = "train_bench"):
    res["elapsed_s"] = time.time() - start
    write_json_atomic(out_dir / f"{name}.json", res)
    tmp = out_dir / f".{name}.md.tmp"
    tmp.write_text(markdown(res))
    os.replace(tmp, out_dir / f"{name}.md")


def package_versions(names) -> dict:
    """{name with '_' for '-': installed version or None}."""
    import importlib.metadata as md

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {n.replace("-", "_"): version(n) for n in names}


def environment() -> dict:
    return {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "python": platform.python_version(),
            **package_versions(("triton", "transformers", "liger-kernel")),
            "fla": package_versions(["fla-core"])["fla_core"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results", help="directory for train_bench.json / train_bench.md")
    ap.add_argument("--quick", action="store_true", help="small sizes: check the script end to end")
    ap.add_argument("--budget-s", type=float, default=480, help="no longest-context trial that would end later")
    ap.add_argument("--full-autotune", action="store_true",
                    help="let fla's kernels try all their Triton configurations (minutes per shape on a fresh machine)")
    ap.add_argument("--attention-lengths", default="2048,8192,32768,131072", help="section 1 token counts")
    ap.add_argument("--numerics-lengths", default="2048,8192,32768", help="section 1 numerics token counts")
    ap.add_argument("--kinds", default="stock,ours", help="models for sections 2 and 3 (comma list; '' skips them)")
    ap.add_argument("--stock-longest", default="131072,262144", help="section 3 lengths tried for stock")
    ap.add_argument("--ours-longest", default="262144,524288,1048576", help="section 3 lengths tried for ours")
    ap.add_argument("--no-variants", action="store_true", help="skip section 2's extra variants of ours")
    ap.add_argument("--name", default="train_bench", help="results file stem (NAME.json, NAME.md)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or not kernels.fla_available():
        sys.exit("bench_train needs a CUDA GPU and flash-linear-attention (pip install -e '.[gpu]')")
    if not args.full_autotune:
        kernels.limit_triton_autotuning()
    out_dir, start = Path(args.out), time.time()
    deadline = start + args.budget_s
    res = {"environment": environment(), "model_yaml": MODEL_YAML, "quick": args.quick,
           "autotuning": "full (fla's default)" if args.full_autotune else
           "limited (kernels.limit_triton_autotuning: <= 8 configurations tuned fully, larger spaces 4)"}
    print(res["environment"], flush=True)

    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    res["attention"] = bench_attention([2048, 8192] if args.quick else ints(args.attention_lengths),
                                       [2048] if args.quick else ints(args.numerics_lengths),
                                       profile_at=8192 if args.quick else 32768)
    save(res, out_dir, start, args.name)
    print(f"[{time.time() - start:.0f} s] attention done", flush=True)

    lengths = [2048] if args.quick else [2048, 8192, 32768]
    tokens_per_step = 8192 if args.quick else 32768
    warmup, iters = (1, 2) if args.quick else (1, 3)
    trials = {"stock": [16384] if args.quick else ints(args.stock_longest),
              "ours": [32768] if args.quick else ints(args.ours_longest)}
    thr = {}
    res["throughput"], res["longest"] = thr, {}
    for kind in [k for k in args.kinds.split(",") if k]:
        model, opt = build(kind)
        thr["active_params"] = active_params(model)
        thr[kind] = bench_throughput(kind, model, opt, lengths, tokens_per_step, warmup, iters)
        if kind == "ours" and not args.no_variants:
            top = lengths[-1:]
            thr["ours, packed rows"] = bench_throughput(kind, model, opt, top, tokens_per_step, warmup, iters,
                                                        packed=True)
            thr["ours, plain-torch chunked loss"] = bench_throughput(kind, model, opt, top, tokens_per_step, warmup,
                                                                     iters, loss_impl="chunked")
        save(res, out_dir, start, args.name)
        print(f"[{time.time() - start:.0f} s] {kind} throughput done", flush=True)
        res["longest"][kind] = longest_context(kind, model, opt, trials[kind], deadline)
        save(res, out_dir, start, args.name)
        print(f"[{time.time() - start:.0f} s] {kind} longest done", flush=True)
        del model, opt
        free_memory()
    # the FP32 LM head's cost (fp32 matmuls) at the longest length
    if not args.quick and not args.no_variants and time.time() < deadline:
        model, opt = build("ours", fp32_lm_head=False)
        thr["ours, bf16 LM head"] = bench_throughput("ours", model, opt, lengths[-1:], tokens_per_step, warmup, iters)
        save(res, out_dir, start, args.name)
        del model, opt
        free_memory()
    # the kernel without the fused element-wise work around it (`fla`, the older path)
    if not args.no_variants and time.time() < deadline:
        model, opt = build("ours", lightning_kernel="fla")
        thr["ours, unfused lightning layer (fla)"] = bench_throughput("ours", model, opt, lengths, tokens_per_step,
                                                                      warmup, iters)
        save(res, out_dir, start, args.name)
    print(markdown(res))


if __name__ == "__main__":
    main()
