"""One GPU, world size 1: the SFT stage with DeepSpeed ZeRO-3 and without, then the two final/ checkpoints compared
(same loader, plain AutoModelForCausalLM) and the numbers written to OUT/zero3_ws1.json.

    python3 -m bench.zero3_ws1 --out bench/results [--model configs/tiny/base] [--steps 20]
    (CPU smoke run, DeepSpeed's CPU accelerator: DS_ACCELERATOR=cpu ... --steps 4)

Both runs: the same stage YAML (the 548M bench model's or the tiny one's), the same seed and data, bf16 off (fp32
weights both ways, so a gap is DeepSpeed's and not a dtype's). ZeRO-3 at world size 1 still partitions (one
partition), gathers for each forward and saves through `stage3_gather_16bit_weights_on_model_save`, so this checks
the gather-at-save path and DeepSpeed's optimizer wrapper against plain torch AdamW. Needs deepspeed (with
DS_ACCELERATOR=cuda) and the rest of the GPU image's wheels; not run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ZERO3_FP32 = {  # configs/deepspeed/zero3.json with bf16 off: compare like with like
    "bf16": {"enabled": False},
    "zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                          "stage3_gather_16bit_weights_on_model_save": True},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
}


def stage_yaml(path: Path, model: str, out: Path, steps: int, deepspeed: Path | None) -> Path:
    ds = f", deepspeed: {deepspeed}" if deepspeed else ""
    path.write_text(f"""
output_dir: {out}
model: {{path: {model}, dtype: float32, fp32_lm_head: true, router_aux_loss_coef: 0.0}}
data:
  builtin: {{arithmetic: {{n: 4000, max_operand: 20}}, safety: {{n: 300}}}}
  max_length: 512
training: {{max_steps: {steps}, learning_rate: 1.0e-3, batch_size: 4, logging_steps: 1, save_steps: {steps // 2},
           adam_epsilon: 1.0e-8{ds}}}
eval: {{sets: {{arithmetic: {{n: 32, max_operand: 20}}}}, max_new_tokens: 16, batch_size: 32}}
""")
    return path


def run_stage(config: Path) -> float:
    t0 = time.time()
    # torchrun even for one process: DeepSpeed finds its rank and master address in the launcher's environment (with
    # none it falls back to MPI discovery, which needs mpi4py); both runs are launched the same way
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m",
                    "pipelines", "sft", "--config", str(config)], check=True,
                   env={**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cuda")})
    return time.time() - t0


def compare(a: Path, b: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    ma = AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32).state_dict()
    mb = AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32).state_dict()
    assert ma.keys() == mb.keys(), sorted(set(ma) ^ set(mb))
    gaps = {k: float((ma[k] - mb[k]).abs().max()) for k in ma}
    worst = max(gaps, key=gaps.get)
    return {"files_plain": sorted(p.name for p in a.iterdir()), "files_zero3": sorted(p.name for p in b.iterdir()),
            "same_files": sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir()),
            "max_abs_gap": gaps[worst], "worst_tensor": worst,
            "rel_l2_gap": float(sum(((ma[k] - mb[k]) ** 2).sum() for k in ma).sqrt()
                                / sum((ma[k] ** 2).sum() for k in ma).sqrt())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--model", default="configs/tiny/base")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--work", default="/tmp/zero3_ws1")
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ds = work / "zero3_fp32.json"
    ds.write_text(json.dumps(ZERO3_FP32))
    seconds = {}
    for name, ds_file in (("plain", None), ("zero3", ds)):
        config = stage_yaml(work / f"{name}.yaml", args.model, work / name, args.steps, ds_file)
        seconds[name] = round(run_stage(config), 1)
    result = {"model": args.model, "steps": args.steps, "seconds": seconds,
              **compare(work / "plain" / "final", work / "zero3" / "final")}
    for name in ("plain", "zero3"):
        metrics = json.loads((work / name / "metrics.json").read_text())
        result[f"loss_last_{name}"] = metrics["train"].get("loss/last")
        result[f"after_{name}"] = metrics["after"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "zero3_ws1.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0 if result["same_files"] else 1


if __name__ == "__main__":
    sys.exit(main())
