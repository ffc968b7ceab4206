"""GPU benchmark of the context-parallel code path (alignment.context_parallel) on one GPU, against the plain path in
the same run.

    make bench-cp                                             # writes bench/results/context_parallel.{json,md}
    python -m bench.bench_context_parallel --out DIR [--quick]

The 548M model (configs/548m/model.yaml; bf16, the fast path: fla_fused lightning layers, fused loss, gradient
checkpointing), one fwd + bwd per step (no optimizer: its cost does not depend on the split), rows of documents of
at most `--doc-tokens` tokens (a 1M-token document is one row of 1M). Two measurements:

1. **World size 1**: the same rows through the plain path and through the context-parallel code with a real NCCL
   group of one (`set_context_parallel` + `context_parallel_loss`: the plan's position-id gather, the per-layer
   state all-gather and K/V gather, the exchange's arithmetic), at 32K to 1M tokens: the overhead of the code path
   itself, and the loss of both (equal up to kernel rounding).
2. **One rank's compute of R**: the last rank of R (its slice of T/R tokens continues a document from the earlier
   ranks, so it pays the whole state correction and attends to the document's keys on earlier slices), with the
   collectives replaced by copies of its own tensors (same shapes and work, no communication; values are not a real
   row's): step time against the plain path on T/R tokens. What this leaves out is the communication, which only a
   multi-GPU run measures (the multi-GPU issue).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from alignment import context_parallel as cp  # noqa: E402
from alignment import kernels, modeling  # noqa: E402
from bench.bench_train import GIB, MODEL_YAML, environment, free_memory, is_oom, sync_time  # noqa: E402
from alignment.reporting import write_json_atomic  # noqa: E402

K = 1024


def rows(T: int, doc_tokens: int, vocab: int, seed: int = 0):
    """One row of T tokens: documents of `doc_tokens` (the last one shorter)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [min(doc_tokens, T - s) for s in range(0, T, doc_tokens)]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    return torch.randint(3, vocab, (1, T), generator=gen).cuda(), pos.cuda()


def build():
    with torch.device("cuda"):
        model = modeling.load_model(modeling.ModelOptions(path=MODEL_YAML, dtype="bfloat16",
                                                          gradient_checkpointing=True), seed=0)
    return model.train()


def timed(step, warmup: int, iters: int) -> dict:
    """Median step seconds (synchronised wall time), peak memory and the step's loss."""
    try:
        loss = None
        for _ in range(warmup):
            loss = step()
        torch.cuda.reset_peak_memory_stats()
        times = [sync_time(step) for _ in range(iters)]
        return {"step_s": sorted(times)[len(times) // 2], "peak_gib": torch.cuda.max_memory_allocated() / GIB,
                "loss": loss}
    except Exception as err:  # noqa: BLE001 - an OOM is a result here
        if not is_oom(err):
            raise
        return {"error": "OOM: " + str(err).splitlines()[0][:200]}
    finally:
        free_memory()


def fwd_bwd(model, loss_fn):
    def step():
        loss = loss_fn()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss.detach())
    return step


def world_size_one(model, lengths, doc_tokens, warmup, iters, out: list, saved) -> list[dict]:
    group = dist.group.WORLD
    for T in lengths:
        ids, pos = rows(T, doc_tokens, model.config.vocab_size)
        cp.set_context_parallel(model, None)
        plain = timed(fwd_bwd(model, lambda: kernels.causal_lm_loss(model, ids, ids, pos)), warmup, iters)
        cp.set_context_parallel(model, group)
        split = timed(fwd_bwd(model, lambda: cp.context_parallel_loss(model, ids, ids, pos, group)), warmup, iters)
        cp.set_context_parallel(model, None)
        row = {"tokens": T, "plain": plain, "cp_world_size_1": split}
        if "step_s" in plain and "step_s" in split:
            row["overhead"] = split["step_s"] / plain["step_s"]
        out.append(row)
        saved()
        print(f"world size 1: {row}", flush=True)
        del ids, pos
    return out


class EmulatedRanks:
    """Rank `rank` of `size` on one device: the position-id gather returns the whole row (known here), the
    activation gathers repeat this rank's tensor `size` times (shapes and work of a real rank, not its values)."""

    def __init__(self, position_ids, rank: int, size: int):
        self.position_ids, self.rank, self.size = position_ids, rank, size

    def __enter__(self):
        self.saved = modeling.context_parallel_plan, cp.gather_sequence
        modeling.context_parallel_plan = lambda pos, group: cp.rows_plan(self.position_ids, self.rank, self.size)
        cp.gather_sequence = lambda x, context, dim: torch.cat([x] * context.size, dim=dim)
        return self

    def __exit__(self, *exc):
        modeling.context_parallel_plan, cp.gather_sequence = self.saved


def one_rank_of_r(model, cases, doc_tokens, warmup, iters, out: list, saved) -> list[dict]:
    for T, R in cases:
        ids, pos = rows(T, doc_tokens, model.config.vocab_size)
        L = T // R
        local_ids, local_pos = cp.split_rows(ids, R - 1, R), cp.split_rows(pos, R - 1, R)
        plain_ids, plain_pos = rows(L, doc_tokens, model.config.vocab_size)
        plain = timed(fwd_bwd(model, lambda: kernels.causal_lm_loss(model, plain_ids, plain_ids, plain_pos)),
                      warmup, iters)
        cp.set_context_parallel(model, "emulated")
        with EmulatedRanks(pos, R - 1, R):
            split = timed(fwd_bwd(model, lambda: kernels.lm_loss(
                model.model(input_ids=local_ids, position_ids=local_pos).last_hidden_state,
                model.lm_head.weight, cp.split_rows(cp.shifted_targets(ids), R - 1, R))), warmup, iters)
        cp.set_context_parallel(model, None)
        row = {"tokens": T, "ranks": R, "slice_tokens": L, "plain_on_slice": plain, "last_rank": split}
        if "step_s" in plain and "step_s" in split:
            row["ratio"] = split["step_s"] / plain["step_s"]
        out.append(row)
        saved()
        print(f"one rank of R: {row}", flush=True)
        del ids, pos, local_ids, local_pos
    return out


def markdown(res: dict) -> str:
    fmt = lambda r, key: f"{r[key]:.3f}" if key in r else r.get("error", "-")  # noqa: E731
    lines = [f"# Context-parallel code path on one GPU ({res['environment']['gpu']})", "",
             f"548M model, bf16, fast path, gradient checkpointing, fwd + bwd; documents of at most "
             f"{res['doc_tokens'] // K}K tokens. Written by `bench/bench_context_parallel.py`.", "",
             "## World size 1: plain path vs the context-parallel code (NCCL group of one)", "",
             "| tokens | plain s | CP s | CP / plain | plain peak GiB | CP peak GiB | plain loss | CP loss |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["world_size_1"]:
        p, c = r["plain"], r["cp_world_size_1"]
        lines.append(f"| {r['tokens'] // K}K | {fmt(p, 'step_s')} | {fmt(c, 'step_s')} | "
                     f"{r.get('overhead', float('nan')):.3f} | {fmt(p, 'peak_gib')} | {fmt(c, 'peak_gib')} | "
                     f"{fmt(p, 'loss')} | {fmt(c, 'loss')} |")
    lines += ["", "## The last rank of R, collectives replaced by local copies (compute only)", "",
              "| row tokens | R | slice tokens | plain on the slice s | last rank s | ratio | last rank peak GiB |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["one_rank_of_r"]:
        p, c = r["plain_on_slice"], r["last_rank"]
        lines.append(f"| {r['tokens'] // K}K | {r['ranks']} | {r['slice_tokens'] // K}K | {fmt(p, 'step_s')} | "
                     f"{fmt(c, 'step_s')} | {r.get('ratio', float('nan')):.3f} | {fmt(c, 'peak_gib')} |")
    return "\n".join(lines) + "\n"


def save(res, out_dir: Path, start: float):
    res["elapsed_s"] = time.time() - start
    write_json_atomic(out_dir / "context_parallel.json", res)
    tmp = out_dir / ".context_parallel.md.tmp"
    tmp.write_text(markdown(res))
    os.replace(tmp, out_dir / "context_parallel.md")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results", help="directory for context_parallel.{json,md}")
    ap.add_argument("--quick", action="store_true", help="small sizes: check the script end to end")
    ap.add_argument("--lengths", default="32768,131072,1048576", help="world-size-1 row lengths")
    ap.add_argument("--ranks", default="1048576:2,1048576:8,262144:8", help="TOKENS:R cases of the last-rank run")
    ap.add_argument("--doc-tokens", type=int, default=131072, help="longest document of a row")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or not kernels.fla_available():
        sys.exit("bench_context_parallel needs a CUDA GPU and flash-linear-attention (pip install -e '.[gpu]')")
    kernels.limit_triton_autotuning()
    start, out_dir = time.time(), Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dist.init_process_group("nccl", init_method=f"file://{out_dir.resolve()}/.rendezvous", rank=0, world_size=1)
    lengths = [4096, 16384] if args.quick else [int(x) for x in args.lengths.split(",") if x]
    cases = [(16384, 2)] if args.quick else [tuple(int(v) for v in c.split(":")) for c in args.ranks.split(",")]
    warmup, iters = (1, 1) if args.quick else (1, 3)
    res = {"environment": environment(), "model_yaml": MODEL_YAML, "doc_tokens": args.doc_tokens,
           "quick": args.quick}
    model = build()
    res["world_size_1"], res["one_rank_of_r"] = [], []
    saved = lambda: save(res, out_dir, start)  # noqa: E731 - after every row: a run cut short keeps what it measured
    world_size_one(model, lengths, args.doc_tokens, warmup, iters, res["world_size_1"], saved)
    one_rank_of_r(model, cases, args.doc_tokens, warmup, iters, res["one_rank_of_r"], saved)
    dist.destroy_process_group()
    (out_dir / ".rendezvous").unlink(missing_ok=True)
    print(markdown(res), flush=True)


if __name__ == "__main__":
    main()
