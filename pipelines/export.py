"""Export a stage checkpoint in the released MiniMax-Text-01 / MiniMax-M1 layout, for serving stacks and tools that
read the released checkpoints (vLLM, SGLang, MiniMax's remote code).

    python -m pipelines export runs/minimax-text-01/grpo/final exports/grpo --dtype bfloat16 \\
        --code-from checkpoints/MiniMax-Text-01

What is written and why: `alignment.released.export_released`. A stage's `final/` already is a checkpoint vLLM and
this toolkit load as the same network; the export is for everything that expects the released file layout.
"""

from __future__ import annotations

import argparse
import sys

from alignment.config import ConfigError
from alignment.released import MODEL_TYPES

DESCRIPTION = ("Writes OUT (atomically): the checkpoint's tensors under the released names in safetensors shards "
               "with an index, the released config.json (attn_type_list, layernorm_* factors, postnorm, rotary_dim), "
               "the tokenizer and generation config.")


def main(argv: list[str] | None = None, stage: str = "export") -> int:
    parser = argparse.ArgumentParser(prog=f"python -m pipelines {stage}", description=(
        "Write a MiniMax checkpoint (a stage's final/, or any checkpoint the toolkit loads) in the released "
        f"MiniMax-Text-01 / M1 layout. {DESCRIPTION}"))
    parser.add_argument("checkpoint", help="checkpoint directory, e.g. runs/tiny/grpo/final")
    parser.add_argument("out", help="output directory (replaced only when the export is complete)")
    parser.add_argument("--dtype", help="cast every tensor to it, e.g. bfloat16 (the releases' dtype); default: the "
                        "checkpoint config's dtype")
    parser.add_argument("--code-from", metavar="DIR", help="a released checkpoint directory whose remote code "
                        "(*.py, auto_map) to ship, so trust_remote_code loaders run MiniMax's modeling code; without "
                        "it only a config class is written (enough for AutoConfig and vLLM)")
    parser.add_argument("--model-type", choices=sorted(MODEL_TYPES), help="released model type; default: the "
                        "source's or --code-from's, else minimax_text_01")
    parser.add_argument("--shard-gb", type=float, default=5.0, help="largest shard in GiB (default 5)")
    args = parser.parse_args(argv)
    from alignment.released import export_released

    try:
        out = export_released(args.checkpoint, args.out, model_type=args.model_type, dtype=args.dtype,
                              code_from=args.code_from, max_shard_bytes=int(args.shard_gb * 2**30))
    except (ConfigError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.checkpoint} -> {out} (released layout)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
