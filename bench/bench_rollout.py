"""GPU rollout benchmark: vLLM (stock and with this toolkit's engine patches) vs transformers `generate`, in one run.

    make bench-rollout                                   # on a GPU machine: bench/results/rollout_bench.{json,md}
    python -m bench.bench_rollout --out DIR [--quick]    # --quick: batch 8, 16 tokens, a smoke test of the script

For the 548M MiniMax config (configs/548m/model.yaml; random weights, bf16, seed 0, LM head scaled by 5 so that
sampled tokens are not near-uniform), bench/README.md explains each measurement:
1. generation tokens/s, 128-token random prompts + 128 new tokens (EOS ignored), temperature 1, batch 64 and 256:
   transformers `generate` on `load_model`'s model and on stock transformers (same weights), stock vLLM
   (`engine_patches=()`), patched vLLM with vLLM's own KV-cache groups, patched vLLM (the default); warm (one short
   warm-up generate, then the median of 3 timed); and a decode-only figure per batch: ms/step =
   (t(128 new) - t(1 new)) / 127.
2. a torch-profiler (CUDA activity) capture of one generate (batch 256, 16 new tokens) per generator: top kernels;
   and the host side of a vLLM decode step: for the patched engine, tokens/s with vLLM's own output handling vs the
   backend's (flat log-probs, garbage collector paused); for every engine, a cProfile of one generate.
3. weight sync: perturb the trainer's weights, `sync_weights` 5 times through vLLM's loader (also timing the
   checkpoint-layout tensors alone) and 5 times the default (direct) way, check that both write the same bits, and with
   vLLM's prompt log-probs of fixed completions that the engine now computes the perturbed model.
4. train/rollout log-prob mismatch on 64 vLLM completions of 128 tokens, teacher-forced through the trainer side:
   stock transformers (bf16 / FP32 LM head) vs stock vLLM (before), ours (default kernel / torch lightning kernel)
   vs patched vLLM (after).
5. the same mismatch after fitting the trainer's model to a Markov chain (structured, peaked next-token distributions
   as a trained LM has) and syncing it into the patched engine.
One vLLM engine is alive at a time (stock, patched with vLLM's own groups, then patched; `--engines` picks others).
Results are written after every section; a section that fails records its error and the next one runs; sections
that would overrun `--budget-s` are skipped with the reason.
Without CUDA or vLLM (CPU CI) only the transformers path runs (on configs/tiny/model.yaml) and the rest is recorded
as skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import os
import platform
import pstats
import random
import statistics
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

# vLLM reads these at import: engine core in this process (in-place weight sync), no flashinfer sampler (not shipped
# with the device bundle). The allocator stays torch's default (bench_train, imported below, would turn expandable
# segments on for long training contexts; vLLM on this model was tested without them).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from alignment import kernels  # noqa: E402
from alignment.modeling import (ModelOptions, PackedLightningAttention, PackedSoftmaxAttention,  # noqa: E402
                                load_model, stock_model_copy)
from alignment.reporting import write_json_atomic  # noqa: E402
from alignment.rollout.base import SamplingOptions, logprob_mismatch  # noqa: E402
from alignment.rollout.vllm_backend import ENGINE_PATCHES  # noqa: E402 - vLLM itself is imported on first use
from bench.bench_train import MODEL_YAML, free_memory, package_versions, top_kernels  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = str(ROOT / "configs" / "model" / "tiny.yaml")
LM_HEAD_SCALE = 5.0  # random LM head x5: logits spread enough that sampling is not near-uniform (as the vLLM probe)
NOISE = 0.05  # weight-sync check: noise of 0.05 x each parameter's std (0.05 absolute for constant ones, the norms)
ENGINE_KWARGS = dict(gpu_memory_utilization=0.35, max_model_len=1024, max_num_seqs=256, enforce_eager=False, seed=0)
# name: (engine patches, further vLLM arguments). "patched": the backend's default. "patched_vllm_groups": without
# kv_group_per_kind (vLLM's own KV-cache groups: what that patch gives). "prefill_only": the batched prefill alone
# (what the numerics cost in speed). "patched_async" (slower in the 2026-12-02 run): vLLM's async scheduling, meant
# to overlap a step's host work with the GPU.
ENGINES = {"stock": ((), {}), "prefill_only": (("batched_prefill",), {}),
           "patched_vllm_groups": (tuple(p for p in ENGINE_PATCHES if p != "kv_group_per_kind"), {}),
           "patched_async": (ENGINE_PATCHES, {"async_scheduling": True}),
           "patched": (ENGINE_PATCHES, {})}
# "patched" last: its weight-sync and fitted-model sections change the trainer's weights
DEFAULT_ENGINES = ("stock", "patched_vllm_groups", "patched")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
START = time.time()


@dataclass(frozen=True)
class Sizes:
    batches: tuple[int, ...] = (64, 256)  # the last one also gives the decode-only figure and the profile
    prompt_len: int = 128
    new_tokens: int = 128
    warmup_tokens: int = 8
    profile_tokens: int = 16
    mismatch_n: int = 64
    sync_n: int = 16
    repeats: int = 3  # timed generates per figure (the median is reported): one ~1.5 s generate varied ±30% run to run
    host_rounds: int = 2  # rounds of the host section's output-handling variants (bench_host)


FULL, QUICK = Sizes(), Sizes(batches=(8,), prompt_len=16, new_tokens=16, warmup_tokens=4, profile_tokens=4,
                             mismatch_n=8, sync_n=4, repeats=1)


class GCClock:
    """Seconds Python's cyclic garbage collector has run in this process (through `gc.callbacks`)."""

    def __init__(self):
        self.seconds, self.collections, self._start = 0.0, 0, None
        gc.callbacks.append(self._event)

    def _event(self, phase, info):
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self.collections += 1
            self._start = None


GC_CLOCK = GCClock()


def log(msg) -> None:
    print(f"[{time.time() - START:6.1f} s] {msg}", flush=True)


def timed(fn):
    """(seconds, fn()) with the device synchronised on both sides."""
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def watchdog(seconds: float):
    """Exit the process `seconds` after it started, whatever hangs (a vLLM engine step or teardown): every finished
    measurement is already on disk."""
    def fire():
        log(f"watchdog: {seconds:.0f} s passed, exiting (the hung section is marked 'running' in the results)")
        os._exit(3)

    timer = threading.Timer(max(0.0, START + seconds - time.time()), fire)
    timer.daemon = True
    timer.start()


def random_prompts(n: int, length: int, vocab: int, seed: str) -> list[list[int]]:
    """Random token ids in [3, vocab). Every generate call gets its own prompts (its own seed): vLLM's prefix cache
    must not serve a timed call from an earlier one."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


class Run:
    """The results dict, its files, and the time budget; `section` runs one measurement in isolation."""

    def __init__(self, out_dir: Path, budget_s: float):
        self.out_dir, self.start, self.deadline = out_dir, START, START + budget_s
        self.res = {"sections": {}, "throughput": {}, "decode": {}, "engines": {}, "profile": {}, "mismatch": {}}

    def left(self) -> float:
        return self.deadline - time.time()

    def section(self, name: str, fn, need_s: float = 0.0, skip: str | None = None):
        """fn()'s value, or None when skipped (`skip` reason, or fewer than `need_s` seconds of budget left) or
        failed (error and traceback tail recorded). Results are saved either way."""
        if skip is None and self.left() < need_s:
            skip = f"time budget: {self.left():.0f} s left, needs ~{need_s:.0f} s"
        entry = self.res["sections"][name] = {"status": "skipped", "reason": skip} if skip else {"status": "running"}
        out = None
        if skip:
            log(f"{name}: skipped ({skip})")
        else:
            log(f"{name} ...")
            self.save()  # a hang leaves this section marked "running"
            t0 = time.time()
            try:
                out = fn()
                entry["status"] = "ok"
            except Exception as err:  # noqa: BLE001 - one failed measurement must not lose the others
                entry.update(status="error", error=f"{type(err).__name__}: {err}"[:1500],
                             traceback=traceback.format_exc()[-3000:])
                log(f"{name}: ERROR {type(err).__name__}: {str(err)[:400]}")
            entry["seconds"] = round(time.time() - t0, 1)
        self.save()
        return out

    def save(self):
        self.res["elapsed_s"] = round(time.time() - self.start, 1)
        self.res["ratios"] = throughput_ratios(self.res["throughput"])
        write_json_atomic(self.out_dir / "rollout_bench.json", self.res)
        tmp = self.out_dir / ".rollout_bench.md.tmp"
        tmp.write_text(markdown(self.res))
        os.replace(tmp, self.out_dir / "rollout_bench.md")


def environment() -> dict:
    gpu = DEVICE == "cuda"
    return {"gpu": torch.cuda.get_device_name(0) if gpu else "none (CPU)", "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "gpu_mem_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if gpu else None,
            **package_versions(("transformers", "triton", "vllm", "fla-core"))}


# ---- the trainer-side model ---------------------------------------------------------------------------------------

def round_fp32_params_to_bf16_(model):
    """The FP32 LM head holds bf16-exact values after this, so the bf16 engine gets bit-identical weights and the
    mismatch measures numerics only, not the export's rounding."""
    for p in model.parameters():
        if p.dtype == torch.float32:
            p.copy_(p.to(torch.bfloat16))


@torch.no_grad()
def build_model(run: Run, yaml: str):
    with torch.device(DEVICE):
        model = load_model(ModelOptions(path=yaml, dtype="bfloat16"), seed=0).eval()
    model.lm_head.weight.mul_(LM_HEAD_SCALE)
    round_fp32_params_to_bf16_(model)
    run.res["model"] = {
        "yaml": os.path.relpath(yaml, ROOT), "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "lightning_kernel": kernels.resolve_lightning_kernel("auto", torch.device(DEVICE)),
        "lm_head": f"{type(model.lm_head).__name__} ({model.lm_head.weight.dtype}), weights x{LM_HEAD_SCALE}",
        # a bf16 model also holds RoPE's inv_freq in bf16 (`.to(dtype)` casts buffers): a mismatch source to watch
        "rope_inv_freq_dtype": str(model.model.rotary_emb.inv_freq.dtype)}
    return model


def hf_generate(model, prompts, new_tokens: int) -> int:
    """transformers `generate`, EOS suppressed (min = max new tokens); returns the number of generated tokens."""
    ids = torch.tensor(prompts, device=DEVICE)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                         top_k=0, top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                         output_router_logits=False)
    return (out.shape[1] - ids.shape[1]) * ids.shape[0]


@torch.no_grad()
def teacher_forced_logp(model, prompts, completions, head=None):
    """(B, C) log softmax(logits.float())[token] at each completion token (temperature 1), and the (B, C) mask;
    `head` maps the final hidden states to logits (default: the model's own LM head). All prompts have one length."""
    P, C = len(prompts[0]), max(len(c) for c in completions)
    ids = torch.tensor([p + c + [0] * (C - len(c)) for p, c in zip(prompts, completions)], device=DEVICE)
    mask = torch.tensor([[1] * len(c) + [0] * (C - len(c)) for c in completions], dtype=torch.bool)
    h = model.model(input_ids=ids, use_cache=False).last_hidden_state[:, P - 1 : P + C - 1]  # (B, C, hidden)
    logits = (head or model.lm_head)(h).float()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, P:, None]).squeeze(-1).cpu(), mask


def padded(rows: list[list[float]]) -> torch.Tensor:
    out = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.float32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
    return out


@contextlib.contextmanager
def lightning_kernel(model, kernel: str):
    """Switch the model's lightning kernel in place (what `ModelOptions.lightning_kernel` sets in `load_model`)."""
    mods = [m for m in model.modules() if isinstance(m, (PackedLightningAttention, PackedSoftmaxAttention))]
    old = [m.lightning_kernel for m in mods]
    for m in mods:
        m.lightning_kernel = kernel
    try:
        yield
    finally:
        for m, k in zip(mods, old):
            m.lightning_kernel = k


@torch.no_grad()
def perturb_(model, scale: float, seed: int):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    for p in model.parameters():
        std = float(p.float().std()) if p.numel() > 1 else 0.0
        sigma = scale * std if std > 1e-6 else scale
        p.add_((torch.randn(p.shape, generator=gen, device=p.device) * sigma).to(p.dtype))
    round_fp32_params_to_bf16_(model)


# ---- vLLM ----------------------------------------------------------------------------------------------------------

def bench_stock_generate(run: Run, model, sizes: Sizes, vocab: int, profile: bool = True):
    """The same weights in stock transformers (`stock_model_copy`), generating the same way: is the toolkit's model
    slower per decode step than stock? (Stock MiniMax decoding restarts positions after the prompt, see
    `alignment.modeling.MiniMaxDecodeCache`: wrong tokens, the same work.)"""
    with torch.device(DEVICE):
        stock = stock_model_copy(model)
    bench_generate(run, "transformers_stock", lambda p, n: hf_generate(stock, p, n), sizes, vocab, need_s=60)
    if DEVICE == "cuda" and profile:
        bench_profile(run, "transformers_stock", lambda p, n: hf_generate(stock, p, n), sizes, vocab)
    del stock


def vllm_unavailable(run: Run) -> str | None:
    """None when vLLM and the backend import on a CUDA machine, else why not."""
    if DEVICE != "cuda":
        return "no CUDA GPU (vLLM sections run on the GPU machine only)"
    try:
        t, _ = timed(lambda: __import__("vllm"))
        from alignment.rollout import vllm_backend  # noqa: F401
    except Exception as err:  # noqa: BLE001
        return f"vLLM not importable: {type(err).__name__}: {err}"[:500]
    run.res["environment"]["vllm_import_s"] = round(t, 1)
    return None


def vllm_generate(worker, prompts, new_tokens: int, flat_logprobs: bool = True, pause_gc: bool = True) -> int:
    """One generate on the worker's engine, EOS ignored, the sampled token's log-prob requested (as a rollout does).
    The defaults are the backend's (`VLLMRollout.run`, `LEAN_OUTPUTS`); False, False is vLLM's own way (a dict and a
    `Logprob` per token, the garbage collector on)."""
    from vllm import SamplingParams

    outputs = worker.LEAN_OUTPUTS if flat_logprobs else {"detokenize": False}
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, min_tokens=new_tokens, max_tokens=new_tokens,
                            ignore_eos=True, logprobs=0, **outputs)
    outs = worker.run(prompts, params, pause_gc=pause_gc)
    return sum(len(o.outputs[0].token_ids) for o in outs)


def vllm_prompt_logprobs(worker, prompts, completions) -> torch.Tensor:
    """The engine's log-probs of given completions (prompt log-probs of prompt + completion), (B, C) padded."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=1.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
    outs = worker.run([p + c for p, c in zip(prompts, completions)], params)
    return padded([[o.prompt_logprobs[len(p) + t][tok].logprob for t, tok in enumerate(c)]
                   for o, p, c in zip(outs, prompts, completions)])


def sample(worker, prompts, sizes: Sizes):
    batch = worker.generate(prompts, n=1, sampling=SamplingOptions(temperature=1.0, max_new_tokens=sizes.new_tokens))
    return batch.completion_ids, padded(batch.logprobs), batch


# ---- measurements --------------------------------------------------------------------------------------------------

def timed_tokens_per_s(gen, B: int, sizes: Sizes, vocab: int, seed: str) -> dict:
    """Median of `sizes.repeats` timed gen(prompts, new_tokens) calls at batch B, and the garbage collector's share."""
    prompts = random_prompts(B, sizes.prompt_len, vocab, seed=seed)
    gc_s, gc_n = GC_CLOCK.seconds, GC_CLOCK.collections
    runs = [timed(lambda: gen(prompts, sizes.new_tokens)) for _ in range(sizes.repeats)]
    sec, n = statistics.median(t for t, _ in runs), runs[0][1]
    return {"batch": B, "seconds": sec, "seconds_each": [t for t, _ in runs], "gen_tokens": n,
            "gen_tokens_per_s": n / sec, "total_tokens_per_s": (n + B * sizes.prompt_len) / sec,
            "gc_s_per_generate": (GC_CLOCK.seconds - gc_s) / len(runs),
            "gc_collections_per_generate": (GC_CLOCK.collections - gc_n) / len(runs)}


def bench_generate(run: Run, backend: str, gen, sizes: Sizes, vocab: int, need_s: float = 0.0):
    """gen(prompts, new_tokens) -> generated tokens. Warm tokens/s per batch, and decode ms/step per batch."""
    rows = run.res["throughput"].setdefault(backend, {})
    decode = run.res["decode"].setdefault(backend, {})
    N = sizes.new_tokens
    for i, B in enumerate(sizes.batches):
        if i and run.left() < need_s:
            rows[str(B)] = {"batch": B, "skipped": f"time budget: {run.left():.0f} s left"}
            continue
        gen(random_prompts(B, sizes.prompt_len, vocab, seed=f"warmup {B}"), sizes.warmup_tokens)
        r = rows[str(B)] = timed_tokens_per_s(gen, B, sizes, vocab, seed=f"timed {B}")
        log(f"{backend} batch {B}: {r['gen_tokens_per_s']:,.0f} gen tokens/s (median of "
            f"{', '.join(f'{t:.2f}' for t in r['seconds_each'])} s; GC {r['gc_s_per_generate']:.3f} s each)")
        t1, _ = timed(lambda: gen(random_prompts(B, sizes.prompt_len, vocab, seed=f"one token {B}"), 1))
        decode[str(B)] = {"batch": B, "new_tokens": N, "t1_s": t1, "tN_s": r["seconds"],
                          "ms_per_decode_step": 1e3 * (r["seconds"] - t1) / (N - 1)}
        run.save()


def bench_host(run: Run, name: str, worker, sizes: Sizes, vocab: int, compare_outputs: bool):
    """Where a decode step's host time goes. With `compare_outputs`: tokens/s per batch with vLLM's own output handling
    (a dict and a `Logprob` object per sampled token, the garbage collector on), with the flat log-prob container alone,
    and with both of the backend's settings (flat container, collector paused), in `sizes.host_rounds` rounds whose
    order alternates (A B C, C B A: a drift of the engine's speed over its life falls on every variant alike; the
    2026-12-02 runs measured them once each in a fixed order, and the last came out ~20% slower). Then a cProfile of
    one generate the backend's way at the first batch: the functions with the most time of their own."""
    variants = {"vllm_defaults": (False, False), "flat_logprobs": (True, False), "backend": (True, True)}
    out = run.res.setdefault("host", {})[name] = {"variants": {}}
    for r in range(sizes.host_rounds if compare_outputs else 0):
        for key in list(variants)[:: 1 if r % 2 == 0 else -1]:
            flat, pause = variants[key]
            gen = lambda p, n: vllm_generate(worker, p, n, flat_logprobs=flat, pause_gc=pause)  # noqa: E731
            rows = out["variants"].setdefault(key, {"flat_logprobs": flat, "pause_gc": pause})
            for B in sizes.batches:
                got = timed_tokens_per_s(gen, B, sizes, vocab, seed=f"host {key} {B}")
                row = rows.setdefault(str(B), {"batch": B, "rounds": []})
                row["rounds"].append(got)
                row["gen_tokens_per_s"] = statistics.mean(g["gen_tokens_per_s"] for g in row["rounds"])
                row["gc_s_per_generate"] = statistics.mean(g["gc_s_per_generate"] for g in row["rounds"])
                row["gc_collections_per_generate"] = statistics.mean(g["gc_collections_per_generate"]
                                                                     for g in row["rounds"])
                log(f"host {name} {key} batch {B}, round {r + 1}: {got['gen_tokens_per_s']:,.0f} gen tokens/s, "
                    f"GC {got['gc_s_per_generate']:.3f} s per generate")
            run.save()
    B, N = sizes.batches[0], sizes.new_tokens // 2
    prompts = random_prompts(B, sizes.prompt_len, vocab, seed="host profile")
    prof = cProfile.Profile()
    prof.enable()
    wall, _ = timed(lambda: vllm_generate(worker, prompts, N))
    prof.disable()
    stats = pstats.Stats(prof)
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:25]  # (file, line, fn): (cc, nc, tt, ct, callers)
    out["cprofile"] = {"batch": B, "new_tokens": N, "wall_s_profiled": wall, "total_tt_s": stats.total_tt,
                       "top_by_own_time": [{"function": f"{short_path(f)}:{line}({fn})", "calls": nc,
                                            "own_ms_per_step": 1e3 * tt / N, "cumulative_ms_per_step": 1e3 * ct / N}
                                           for (f, line, fn), (_, nc, tt, ct, _) in rows]}


def short_path(path: str) -> str:
    for marker in ("site-packages/", "vx_site/", "/work/", "/alignment/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def bench_profile(run: Run, name: str, gen, sizes: Sizes, vocab: int):
    """Top CUDA kernels of one gen(prompts, new_tokens) call at the last batch, and the device time per step."""
    from torch.profiler import ProfilerActivity, profile

    B, N = sizes.batches[-1], sizes.profile_tokens
    gen(random_prompts(B, sizes.prompt_len, vocab, seed="profile warmup"), N)  # same shapes
    prompts = random_prompts(B, sizes.prompt_len, vocab, seed="profile")
    with profile(activities=[ProfilerActivity.CUDA], record_shapes=False, with_stack=False) as prof:
        wall, _ = timed(lambda: gen(prompts, N))
    rows, total_ms = top_kernels(prof.events())
    run.res["profile"][name] = {"batch": B, "prompt_len": sizes.prompt_len, "new_tokens": N, "wall_s": wall,
                                "total_cuda_ms": total_ms, "steps": N, "cuda_ms_per_step": total_ms / N,
                                "note": "the one prefill step is included in the total", "top_kernels": rows}


def bench_mismatch(run: Run, name: str, worker, model, sizes: Sizes, vocab: int):
    """vLLM samples (temperature 1) scored by the trainer side: stock transformers vs stock vLLM (before), ours vs
    patched vLLM (after)."""
    prompts = random_prompts(sizes.mismatch_n, sizes.prompt_len, vocab, seed="mismatch")
    completions, rollout, batch = sample(worker, prompts, sizes)
    info = {"completions": len(completions), "mean_len": statistics.mean(map(len, completions)),
            "engine_tokens_per_s": batch.metrics.get("rollout/tokens_per_s"),
            **{k.split("/")[1]: v for k, v in batch.metrics.items() if k.startswith("rollout/stop_")}}
    ours = f"ours (load_model, FP32 LM head, {run.res['model']['lightning_kernel']} kernel)"
    if name == "stock":
        with torch.device(DEVICE):
            stock = stock_model_copy(model)
        w = stock.lm_head.weight
        trainers = {"a_stock_bf16_head": ("stock transformers, bf16 LM head", stock, None),
                    "b_stock_fp32_head": ("stock transformers, FP32 LM head", stock,
                                          lambda h: F.linear(h.float(), w.float()))}
    elif name == "patched":
        trainers = {"c_ours": (ours, model, None), "d_ours_torch_kernel": ("ours, lightning_kernel: torch", model, None)}
    else:  # an engine variant: is it still the same network?
        trainers = {f"c_ours_vs_{name}": (ours, model, None)}
    for key, (desc, tmodel, head) in trainers.items():
        with lightning_kernel(model, "torch") if key.endswith("torch_kernel") else contextlib.nullcontext():
            train, mask = teacher_forced_logp(tmodel, prompts, completions, head)
        run.res["mismatch"][key] = {"trainer": desc, "engine": f"vLLM {name}", **info,
                                    "tokens": int(mask.sum()), **logprob_mismatch(train, rollout, mask)}
        log(f"mismatch {key}: {run.res['mismatch'][key]}")
        run.save()


def bench_weight_sync(run: Run, worker, model, sizes: Sizes, vocab: int):
    """Perturb the trainer, sync 5 times, and score fixed completions before/after with the engine's prompt
    log-probs: after the sync they must match the perturbed trainer and differ from before."""
    from alignment.rollout.vllm_backend import vllm_checkpoint_tensors

    prompts = random_prompts(sizes.sync_n, sizes.prompt_len, vocab, seed="weight sync")
    completions, sampled, _ = sample(worker, prompts, sizes)
    mask = padded([[1.0] * len(c) for c in completions]).bool()
    before = vllm_prompt_logprobs(worker, prompts, completions)
    perturb_(model, NOISE, seed=123)
    train, _ = teacher_forced_logp(model, prompts, completions)
    out = run.res["weight_sync"] = {"noise": f"{NOISE} x each parameter's std", "completions": len(completions),
                                    "tokens": int(mask.sum())}
    out["direct_sync_uncovered"] = worker.direct_sync_uncovered
    loader, export = [], []
    for _ in range(5):  # vLLM's own loader, as before the direct sync existed
        worker.sync_weights(model, method="loader")
        loader.append(worker.last_sync_s)
        export.append(timed(lambda: sum(1 for _ in vllm_checkpoint_tensors(model)))[0])
    out["export_s"] = export  # building the checkpoint-layout tensors alone; the rest of a loader sync is vLLM's
    by_loader = {n: p.clone() for n, p in worker._params.items()}
    times = []
    for _ in range(5):  # the default: direct copies when the plan covers every parameter
        worker.sync_weights(model)
        times.append(worker.last_sync_s)
    out["method"] = worker.last_sync_method
    out["direct_equals_loader"] = all(torch.equal(p, by_loader[n]) for n, p in worker._params.items())
    del by_loader
    after = vllm_prompt_logprobs(worker, prompts, completions)
    out.update(loader_sync_s=loader, loader_sync_s_median=statistics.median(loader),
               sync_s=times, sync_s_median=statistics.median(times),
               synced_trainer_vs_engine=logprob_mismatch(train, after, mask),
               stale_trainer_vs_engine_before_sync=logprob_mismatch(train, before, mask),
               engine_after_vs_before=logprob_mismatch(after, before, mask),
               engine_prompt_vs_sampled_logprobs_before=logprob_mismatch(before, sampled, mask))
    key = "mismatch/logp_abs_mean"
    out["took_effect"] = out["synced_trainer_vs_engine"][key] < 0.5 * out["engine_after_vs_before"][key]
    log(f"weight sync: {out}")


class MarkovChain:
    """A sparse random Markov chain over `vocab` token ids: each token has `fanout` likely successors (probability
    `stick` in all, uniform among them), otherwise any token of the vocabulary. A model fitted to it has peaked,
    structured next-token distributions, as a trained LM does — random weights give chaotic ones whose log-probs
    swing with every bf16 rounding, which is a poor stand-in for what a GRPO run samples from."""

    def __init__(self, vocab: int, seed: int = 0, fanout: int = 4, stick: float = 0.9):
        self.gen = torch.Generator().manual_seed(seed)
        self.vocab, self.stick = vocab, stick
        self.succ = torch.randint(3, vocab, (vocab, fanout), generator=self.gen)

    def sample(self, n: int, length: int) -> torch.Tensor:
        out = torch.empty(n, length, dtype=torch.long)
        out[:, 0] = torch.randint(3, self.vocab, (n,), generator=self.gen)
        for t in range(1, length):
            pick = self.succ[out[:, t - 1], torch.randint(0, self.succ.shape[1], (n,), generator=self.gen)]
            noise = torch.randint(3, self.vocab, (n,), generator=self.gen)
            out[:, t] = torch.where(torch.rand(n, generator=self.gen) < self.stick, pick, noise)
        return out


def bench_trained_mismatch(run: Run, worker, model, sizes: Sizes, steps: int = 150, vocab: int = 2000):
    """Fit the trainer's model to a Markov chain (`MarkovChain`, AdamW, `steps` steps of 16 x 256 tokens), sync it into
    the engine, sample continuations of in-distribution prompts and teacher-force them: the mismatch of a model whose
    distributions have structure, next to the random-weights figures."""
    chain = MarkovChain(vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        ids = chain.sample(16, 256).to(DEVICE)
        loss = kernels.causal_lm_loss(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    del opt
    with torch.no_grad():
        round_fp32_params_to_bf16_(model)
    worker.sync_weights(model)
    prompts = chain.sample(sizes.mismatch_n, sizes.prompt_len).tolist()
    completions, rollout, _ = sample(worker, prompts, sizes)
    train, mask = teacher_forced_logp(model, prompts, completions)
    chosen = [t for c in completions for t in c]
    run.res["mismatch"]["e_ours_trained"] = {
        "trainer": f"ours, fitted to a Markov chain ({steps} AdamW steps, loss {losses[0]:.2f} -> {losses[-1]:.2f})",
        "engine": "vLLM patched, after sync", "tokens": int(mask.sum()), "train_loss": [losses[0], losses[-1]],
        "sync_s": worker.last_sync_s, "in_vocab_share": sum(t < vocab for t in chosen) / max(1, len(chosen)),
        **logprob_mismatch(train, rollout, mask)}
    log(f"trained mismatch: {run.res['mismatch']['e_ours_trained']}")


def build_engine(run: Run, name: str, model):
    from alignment.rollout.vllm_backend import VLLMRollout

    patches, extra = ENGINES[name]
    kwargs = {**ENGINE_KWARGS, "engine_patches": patches, **extra}
    sec, worker = timed(lambda: VLLMRollout(model, None, **kwargs))
    run.res["engines"][name] = {**kwargs, "init_s": sec}
    run.res["engines"][name]["kv_cache_group_sizes"] = worker.kv_cache_group_sizes()
    log(f"{name} engine: {run.res['engines'][name]}")
    return worker


def run_engine(run: Run, name: str, model, sizes: Sizes, vocab: int, skip: str | None, throughput_only: bool = False):
    """Build one engine, run its sections (each skipped with the reason when there is no engine or too little time
    is left), free it. `throughput_only`: tokens/s, and for an engine variant its mismatch (same network?)."""
    worker = None
    gen = lambda p, n: vllm_generate(worker, p, n)  # noqa: E731 - the engine is built below
    reference = name in ("stock", "patched")  # the before/after engines; the others are variants
    sections = {"throughput": (40, lambda: bench_generate(run, f"vllm_{name}", gen, sizes, vocab, need_s=20))}
    if not throughput_only:  # name: (seconds of budget it needs, measurement)
        sections["host"] = (90 if name == "patched" else 10, lambda: bench_host(
            run, name, worker, sizes, vocab, compare_outputs=name == "patched"))
        if reference:
            sections["profile"] = (25, lambda: bench_profile(run, name, gen, sizes, vocab))
    if reference != throughput_only:  # complete runs: the before/after rows; quick runs: is a variant the same network?
        sections["mismatch"] = (25, lambda: bench_mismatch(run, name, worker, model, sizes, vocab))
    if name == "patched" and not throughput_only:  # last of all: they change the trainer's weights
        sections["weight_sync"] = (20, lambda: bench_weight_sync(run, worker, model, sizes, vocab))
        sections["trained_mismatch"] = (40, lambda: bench_trained_mismatch(
            run, worker, model, sizes, steps=150 if sizes is FULL else 5, vocab=min(2000, vocab)))
    worker = run.section(f"{name}/build", lambda: build_engine(run, name, model), need_s=100, skip=skip)
    try:
        for sub, (need_s, fn) in sections.items():
            run.section(f"{name}/{sub}", fn, need_s, skip=None if worker else f"no {name} engine")
    finally:
        if worker is not None:  # one engine alive at a time
            worker.close()
            worker = None
            free_memory()
            run.res["engines"][name]["gpu_mem_allocated_after_close_gib"] = torch.cuda.memory_allocated() / 2**30


# ---- report --------------------------------------------------------------------------------------------------------

def throughput_ratios(thr: dict) -> dict:
    """{"<generator>/<baseline>": {batch: tokens/s ratio}} against both transformers generators: our backend's
    model ("transformers") and stock `MiniMaxForCausalLM` on the same weights ("transformers_stock")."""
    out = {}
    for base_name in ("transformers", "transformers_stock"):
        base = thr.get(base_name, {})
        out.update({f"{name}/{base_name}": {b: r["gen_tokens_per_s"] / base[b]["gen_tokens_per_s"]
                                            for b, r in rows.items() if "gen_tokens_per_s" in r
                                            and "gen_tokens_per_s" in base.get(b, {})}
                    for name, rows in thr.items() if name != base_name})
    return out


def markdown(res: dict) -> str:
    env, cfg = res.get("environment", {}), res.get("config", {})
    m = res.get("model", {})
    out = ["# Rollout benchmark: vLLM (stock / patched) vs transformers generate\n",
           f"{env.get('gpu')}, torch {env.get('torch')}, transformers {env.get('transformers')}, vLLM "
           f"{env.get('vllm')}, triton {env.get('triton')}, fla {env.get('fla_core')}; model {m.get('yaml')} "
           f"({m.get('params_M')}M params, bf16, seed 0, {m.get('lm_head')}); prompts {cfg.get('prompt_len')} + "
           f"{cfg.get('new_tokens')} new tokens, temperature 1; total {res.get('elapsed_s', 0):.0f} s"
           f"{' (--quick)' if cfg.get('quick') else ''}.\n",
           "| section | status | s | note |", "|---|---|---|---|"]
    for name, s in res["sections"].items():
        note = s.get("reason") or s.get("error", "")
        out.append(f"| {name} | {s['status']} | {s.get('seconds', '')} | {note[:100].replace('|', '/')} |")
    if res["throughput"]:
        out += ["\n## Generation throughput (warm, EOS ignored)\n",
                "| backend | batch | gen tokens | s | gen tokens/s | vs our transformers backend | "
                "vs stock transformers |", "|---|---|---|---|---|---|---|"]
        for backend, rows in res["throughput"].items():
            for b, r in rows.items():
                if "skipped" in r:
                    out.append(f"| {backend} | {b} | {r['skipped']} | | | | |")
                    continue
                ratios = [res["ratios"].get(f"{backend}/{base}", {}).get(b)
                          for base in ("transformers", "transformers_stock")]
                out.append(f"| {backend} | {b} | {r['gen_tokens']} | {r['seconds']:.2f} | "
                           f"{r['gen_tokens_per_s']:,.0f} | " + " | ".join(f"{x:.2f}×" if x else "" for x in ratios)
                           + " |")
    if res["decode"]:
        out += ["\nDecode only: ms/step = (t(N new) − t(1 new)) / (N − 1); t(1 new) is mostly the prefill.\n",
                "| backend | batch | t(1 new) s | t(N new) s | ms/decode step |", "|---|---|---|---|---|"]
        out += [f"| {k} | {d['batch']} | {d['t1_s']:.3f} | {d['tN_s']:.3f} (N={d['new_tokens']}) | "
                f"{d['ms_per_decode_step']:.2f} |" for k, rows in res["decode"].items() for d in rows.values()]
    if res["engines"]:
        out.append("\nEngine init: " + ", ".join(f"{k} {e['init_s']:.0f} s" for k, e in res["engines"].items()))
    ws = res.get("weight_sync")
    if ws and "sync_s" in ws:
        key = "mismatch/logp_abs_mean"
        loader = (f" vLLM's loader (`method=\"loader\"`): median {ws['loader_sync_s_median']:.3f} s of "
                  f"{', '.join(f'{t:.3f}' for t in ws['loader_sync_s'])} s; after it, the default sync writes the "
                  f"same bits: **{ws['direct_equals_loader']}**." if "loader_sync_s" in ws else "")
        out += ["\n## Weight sync\n",
                f"Default sync ({ws.get('method', 'loader')}): median {ws['sync_s_median']:.3f} s of "
                f"{', '.join(f'{t:.3f}' for t in ws['sync_s'])} s.{loader} Trainer "
                f"perturbed by {ws['noise']}; {ws['tokens']} tokens of {ws['completions']} fixed completions; "
                f"took effect: **{ws['took_effect']}**"
                + (f"; building the checkpoint-layout tensors alone: median {statistics.median(ws['export_s']):.3f} s"
                   if ws.get("export_s") else "") + ".\n",
                "| comparison | mean abs Δlogp | max | prob corr |", "|---|---|---|---|"]
        for k in ("synced_trainer_vs_engine", "stale_trainer_vs_engine_before_sync", "engine_after_vs_before",
                  "engine_prompt_vs_sampled_logprobs_before"):
            r = ws[k]
            out.append(f"| {k} | {r[key]:.4f} | {r['mismatch/logp_abs_max']:.3f} | {r['mismatch/prob_corr']:.5f} |")
    if res["mismatch"]:
        out += ["\n## Train/rollout log-prob mismatch (vLLM samples, teacher-forced by the trainer side)\n",
                "| case | trainer side | engine | tokens | mean abs Δlogp | max | prob corr |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {k} | {r['trainer']} | {r['engine']} | {r['tokens']} | {r['mismatch/logp_abs_mean']:.4f} | "
                f"{r['mismatch/logp_abs_max']:.3f} | {r['mismatch/prob_corr']:.5f} |"
                for k, r in res["mismatch"].items()]
    for name, h in res.get("host", {}).items():
        out.append(f"\n## Host work, vLLM {name}\n")
        if h["variants"]:
            out += ["Output handling and the garbage collector (mean of the rounds; rounds in alternating order):\n",
                    "| output handling | batch | gen tokens/s | by round | GC s per generate | GC collections |",
                    "|---|---|---|---|---|---|"]
        out += [f"| {key} | {b} | {r['gen_tokens_per_s']:,.0f} | "
                f"{' / '.join(format(g['gen_tokens_per_s'], ',.0f') for g in r.get('rounds', []))} | "
                f"{r['gc_s_per_generate']:.3f} | {r['gc_collections_per_generate']:.0f} |"
                for key, rows in h["variants"].items() for b, r in rows.items() if isinstance(r, dict)]
        cp = h.get("cprofile")
        if cp:
            out += [f"\ncProfile of one generate, the backend's way: batch {cp['batch']}, {cp['new_tokens']} new "
                    f"tokens, {cp['wall_s_profiled']:.2f} s under the profiler; per decode step:\n",
                    "| function | calls | own ms | cumulative ms |", "|---|---|---|---|"]
            out += [f"| `{r['function'][-90:]}` | {r['calls']} | {r['own_ms_per_step']:.3f} | "
                    f"{r['cumulative_ms_per_step']:.3f} |" for r in cp["top_by_own_time"]]
    for name, p in res["profile"].items():
        out += [f"\n## Profile, {name}: batch {p['batch']}, {p['new_tokens']} new tokens\n",
                f"Total CUDA time {p['total_cuda_ms']:.1f} ms = {p['cuda_ms_per_step']:.2f} ms per step (prefill "
                f"included); wall {p['wall_s']:.2f} s.\n", "| kernel | total ms | calls | ms/call |",
                "|---|---|---|---|"]
        out += [f"| `{k['name']}` | {k['total_ms']:.2f} | {k['count']} | {k['ms_per_call']:.4f} |"
                for k in p["top_kernels"]]
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results", help="directory for rollout_bench.json / rollout_bench.md")
    ap.add_argument("--quick", action="store_true", help="batch 8, 16 tokens: check the script end to end")
    ap.add_argument("--model", default=None, help="model YAML (default: the 548M config on a GPU, tiny on CPU)")
    ap.add_argument("--budget-s", type=float, default=480, help="skip sections that would end later than this")
    ap.add_argument("--full-autotune", action="store_true", help="fla's full Triton autotuning (see bench_train)")
    ap.add_argument("--hard-limit-s", type=float, default=540, help="exit after this long even if a section hangs")
    ap.add_argument("--throughput-only", action="store_true",
                    help="only tokens/s (stock transformers as the baseline) and each engine variant's mismatch: "
                         "for comparing engine variants quickly, not a complete run")
    ap.add_argument("--engines", nargs="*", default=list(DEFAULT_ENGINES), choices=list(ENGINES),
                    help=f"vLLM engines to measure, in this order (default: {' '.join(DEFAULT_ENGINES)})")
    args = ap.parse_args(argv)
    watchdog(args.hard_limit_s)
    sizes = QUICK if args.quick else FULL
    run = Run(Path(args.out), args.budget_s)
    if DEVICE == "cuda" and kernels.fla_available() and not args.full_autotune:
        kernels.limit_triton_autotuning()  # the trainer's fla prefill: seconds, not minutes, of tuning
    yaml = args.model or (MODEL_YAML if DEVICE == "cuda" else TINY_YAML)
    run.res.update(environment=environment(), config={**asdict(sizes), "quick": args.quick, "device": DEVICE,
                   "budget_s": args.budget_s, "lm_head_scale": LM_HEAD_SCALE, "temperature": 1.0, "seed": 0,
                   "engine_kwargs": ENGINE_KWARGS, "engine_patches": {k: ENGINES[k] for k in args.engines},
                   "autotuning": "full" if args.full_autotune else "limited (kernels.limit_triton_autotuning)"})
    log(run.res["environment"])

    model = run.section("setup", lambda: build_model(run, yaml))
    if model is not None:
        vocab = model.config.vocab_size
        quick_skip = "--throughput-only" if args.throughput_only else None
        run.section("transformers/throughput", lambda: bench_generate(
            run, "transformers", lambda p, n: hf_generate(model, p, n), sizes, vocab, need_s=260), skip=quick_skip)
        run.section("transformers/profile", lambda: bench_profile(
            run, "transformers", lambda p, n: hf_generate(model, p, n), sizes, vocab), need_s=260,
            skip=quick_skip or (None if DEVICE == "cuda" else "CUDA activity: GPU only"))
        free_memory()
        run.section("transformers_stock/throughput", lambda: bench_stock_generate(
            run, model, sizes, vocab, profile=not args.throughput_only), need_s=60)
        free_memory()
        skip = vllm_unavailable(run)
        for name in args.engines:
            run_engine(run, name, model, sizes, vocab, skip, throughput_only=args.throughput_only)
    run.save()
    print(markdown(run.res), flush=True)
    log("done")
    os._exit(0)  # vLLM's teardown can hang; every result is on disk


if __name__ == "__main__":
    main()
