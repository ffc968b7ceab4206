"""GPU: does the trainer compute the network a released MiniMax-Text-01 checkpoint describes? The independent
reference is vLLM's `MiniMaxText01ForCausalLM`, written for the released checkpoints, run stock (no engine patches).

    python -m bench.released_vllm --out bench/results      # bench/results/released_vllm.{json,md}

For each config in `CONFIGS` (random bf16 weights; both layer kinds in a non-alternating order, RoPE on half of each
head, residual factors different per kind): a checkpoint in the released layout (`tests/fixtures/make_released_tiny`
`write_checkpoint`, then `alignment.released.export_released`, whose config class lets vLLM read the remote-code
config with trust_remote_code), loaded by vLLM and by `alignment.modeling.load_model`, on the same files:
1. log-probs of the same token rows (16 random rows, 40-600 tokens, so lightning blocks of 256 are crossed): vLLM's
   prompt log-probs against our teacher-forced log-probs, ours in bf16 (the CUDA fast path) and in fp32 (torch
   kernels). The yardstick for "bf16 noise" is ours-bf16 against ours-fp32, measured in the same run. A negative
   control: ours with RoPE over the whole head (what transformers' in-tree MiniMax computes from these files).
2. greedy generations (8 prompts, 32 new tokens): vLLM against our `generate` (fp32 and bf16), and ours bf16
   against ours fp32 as the yardstick: tokens that agree and the agreeing prefix.
3. the stage checkpoint: `save_pretrained` of our loaded model (a stage's `final/`, transformers' layout) served by
   vLLM gives the released directory's log-probs (the saved config carries every field vLLM reads).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
from make_released_tiny import Shape, write_checkpoint  # noqa: E402

from alignment.modeling import ModelOptions, load_model  # noqa: E402
from alignment.released import export_released  # noqa: E402
from alignment.reporting import write_json_atomic, write_text_atomic  # noqa: E402

CONFIGS = {
    "A: 6 layers [0,0,1,0,0,1], 4x64 heads (GQA 2), RoPE 32/64, 4 experts":
        Shape(kinds=(0, 0, 1, 0, 0, 1), hidden=256, ffn=256, heads=4, kv_heads=2, head_dim=64, rotary_dim=32,
              experts=4, vocab=2048, factors=((3.5566, 1.0), (2.0, 0.7), (1.5, 1.2))),
    "B: 8 layers [0,0,0,1,0,0,0,1], 4x128 heads (GQA 4), RoPE 64/128, 8 experts":
        Shape(kinds=(0, 0, 0, 1, 0, 0, 0, 1), hidden=512, ffn=384, heads=4, kv_heads=1, head_dim=128, rotary_dim=64,
              experts=8, vocab=4096),
}
ROWS, NEW_TOKENS = 16, 32
HEAD_STD = 4.0


def rows(vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(40, 600, ROWS).int().tolist()
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def vllm_engine(path: Path):
    import vllm

    return vllm.LLM(model=str(path), trust_remote_code=True, skip_tokenizer_init=True, dtype="bfloat16", seed=0,
                    gpu_memory_utilization=0.25, max_model_len=2048, enforce_eager=False)


def vllm_logprobs(llm, token_rows) -> list[torch.Tensor]:
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=r) for r in token_rows], params, use_tqdm=False)
    return [torch.tensor([o.prompt_logprobs[t][tok].logprob for t, tok in enumerate(r) if t > 0])
            for o, r in zip(outs, token_rows)]


def vllm_greedy(llm, prompts) -> list[list[int]]:
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@torch.no_grad()
def our_logprobs(model, token_rows) -> list[torch.Tensor]:
    out = []
    for r in token_rows:
        ids = torch.tensor([r], device="cuda")
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        out.append(logp[:-1].gather(-1, ids[0, 1:, None])[:, 0].cpu())
    return out


@torch.no_grad()
def our_greedy(model, prompts) -> list[list[int]]:
    out = []
    for p in prompts:
        ids = torch.tensor([p], device="cuda")
        gen = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             output_router_logits=False, pad_token_id=0, eos_token_id=None)
        out.append(gen[0, len(p):].tolist())
    return out


def compare(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict:
    x, y = torch.cat(a).double(), torch.cat(b).double()
    d = (x - y).abs()
    corr = torch.corrcoef(torch.stack([x.exp(), y.exp()]))[0, 1].item()
    return {"mean_abs_dlogp": round(d.mean().item(), 5), "max_abs_dlogp": round(d.max().item(), 4),
            "prob_correlation": round(corr, 6), "tokens": len(x)}


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Greedy continuations compared: tokens equal at the same position, and the agreeing prefix per prompt (after
    the first difference the two continue from different text)."""
    prefix = [next((i for i, (x, y) in enumerate(zip(g, h)) if x != y), NEW_TOKENS) for g, h in zip(a, b)]
    return {"tokens_equal": sum(x == y for g, h in zip(a, b) for x, y in zip(g, h)), "of": len(a) * NEW_TOKENS,
            "agreeing_prefix": prefix}


def load(path: Path, dtype: str, kernel: str, full_rope: bool = False):
    model = load_model(ModelOptions(path=str(path), dtype=dtype, lightning_kernel=kernel), tokenizer=None)
    if full_rope:  # transformers' in-tree MiniMax: RoPE over the whole head, whatever rotary_dim says
        from transformers.models.minimax.modeling_minimax import MiniMaxRotaryEmbedding

        model.config.rotary_dim = None
        model.model.config.rotary_dim = None
        model.model.rotary_emb = MiniMaxRotaryEmbedding(model.config)
    return model.cuda().eval()


def run_config(name: str, shape: Shape, work: Path, seed: int) -> dict:
    # weights ~ 1/sqrt(fan-in) (larger ones make a random network chaotic: bf16 rounding alone then moves log-probs
    # by nats), the LM head x4: peaked next-token distributions (~2.5-3 nats), as a trained model has
    raw = write_checkpoint(work / "raw", shape, std=1.0 / shape.hidden ** 0.5, head_std=HEAD_STD / shape.hidden ** 0.5,
                           seed=seed)
    released = export_released(raw, work / "released")
    token_rows = rows(shape.vocab, seed)
    prompts = [r[:48] for r in token_rows[:8]]
    res = {"shape": asdict(shape)}

    ours = {}
    for label, dtype, kernel in (("bf16", "bfloat16", "auto"), ("fp32", "float32", "torch")):
        model = load(released, dtype, kernel)
        ours[label] = our_logprobs(model, token_rows)
        ours[f"greedy_{label}"] = our_greedy(model, prompts)
        if label == "fp32":
            model.save_pretrained(work / "final")  # a stage's final/: transformers' layout
        del model
    model = load(released, "float32", "torch", full_rope=True)
    ours["full_rope"] = our_logprobs(model, token_rows)
    del model
    torch.cuda.empty_cache()

    t = time.time()
    llm = vllm_engine(released)
    res["vllm_init_s"] = round(time.time() - t, 1)
    theirs = vllm_logprobs(llm, token_rows)
    greedy = vllm_greedy(llm, prompts)
    del llm
    _free_vllm()
    llm = vllm_engine(work / "final")
    from_final = vllm_logprobs(llm, token_rows)
    del llm
    _free_vllm()

    res.update({
        "vllm_vs_ours_bf16": compare(theirs, ours["bf16"]),
        "vllm_vs_ours_fp32": compare(theirs, ours["fp32"]),
        "ours_bf16_vs_ours_fp32 (bf16 noise)": compare(ours["bf16"], ours["fp32"]),
        "vllm_vs_ours_full_head_rope (negative control)": compare(theirs, ours["full_rope"]),
        "vllm_final_dir_vs_vllm_released_dir": compare(from_final, theirs),
        "greedy vllm_vs_ours_fp32": agreement(greedy, ours["greedy_fp32"]),
        "greedy vllm_vs_ours_bf16": agreement(greedy, ours["greedy_bf16"]),
        "greedy ours_bf16_vs_ours_fp32 (bf16 noise)": agreement(ours["greedy_bf16"], ours["greedy_fp32"]),
    })
    print(name, json.dumps(res, indent=1), flush=True)
    return res


def _free_vllm():
    import gc

    gc.collect()
    torch.cuda.empty_cache()


def markdown(res: dict) -> str:
    lines = ["# Released-layout checkpoints: our trainer vs vLLM's MiniMaxText01ForCausalLM", "",
             f"`{res['command']}` on {res['device']}; vLLM {res['versions']['vllm']}, transformers "
             f"{res['versions']['transformers']}, torch {res['versions']['torch']}. Same released-layout files for "
             "both; vLLM stock (no engine patches), bf16. Log-probs of 16 random rows of 40-600 tokens.", "",
             "| config | comparison | mean \\|Δ log p\\| | max \\|Δ log p\\| | prob. correlation |",
             "|---|---|---:|---:|---:|"]
    for name, r in res["configs"].items():
        for key, v in r.items():
            if isinstance(v, dict) and "mean_abs_dlogp" in v:
                lines.append(f"| {name.split(':')[0]} | {key} | {v['mean_abs_dlogp']} | {v['max_abs_dlogp']} | "
                             f"{v['prob_correlation']} |")
    lines += ["", f"Greedy, 8 prompts of 48 tokens x {NEW_TOKENS} new tokens:", "",
              "| config | comparison | tokens equal | agreeing prefix per prompt |", "|---|---|---:|---|"]
    for name, r in res["configs"].items():
        for key, g in r.items():
            if key.startswith("greedy"):
                lines.append(f"| {name.split(':')[0]} | {key.removeprefix('greedy ')} | {g['tokens_equal']} / "
                             f"{g['of']} | {g['agreeing_prefix']} |")
    lines += ["", "Configs: " + "; ".join(res["configs"]) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results", help="directory for released_vllm.{json,md}")
    args = ap.parse_args(argv)
    import transformers
    import vllm

    res = {"command": "python -m bench.released_vllm --out " + args.out, "device": torch.cuda.get_device_name(),
           "versions": {"vllm": vllm.__version__, "transformers": transformers.__version__,
                        "torch": torch.__version__}, "configs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, shape) in enumerate(CONFIGS.items()):
            try:
                res["configs"][name] = run_config(name, shape, Path(tmp) / str(i), seed=i)
            except Exception as err:  # noqa: BLE001 - record it, try the next config
                import traceback

                traceback.print_exc()
                res["configs"][name] = {"error": f"{type(err).__name__}: {err}"}
    out = Path(args.out)
    write_json_atomic(out / "released_vllm.json", res)
    ok = {k: v for k, v in res["configs"].items() if "error" not in v}
    write_text_atomic(out / "released_vllm.md", markdown({**res, "configs": ok}))
    return 0 if len(ok) == len(CONFIGS) else 1


if __name__ == "__main__":
    sys.exit(main())
