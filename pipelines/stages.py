"""The one stage registry: what `python -m pipelines STAGE`, the `minimax-align` command, the pipeline runner, the
Makefile targets and every `--help` read.

Each stage module (`pipelines/<module>.py`) exposes `Config` (its config dataclass), `check(cfg, source, produced)`
(input validation before any work: files, built-in task options, reward specs, the starting checkpoint) and
`run(cfg, overwrite=False) -> metrics`; `pipelines.common.stage_main` gives it its command line. `TOOLS` are commands
beside the stages (their module's own `main(argv, stage)`), e.g. `export`.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    module: str  # pipelines.<module>
    summary: str  # one line for --help
    example: str  # the tiny model's YAML for it
    kind: str | None = None  # pipeline YAML `kind` this stage runs as (None: not a pipeline stage)


# CLI name -> stage; long variants are configs of the same module [01 Table 7]
STAGES = {
    "pipeline": Stage("run", "all stages in order, resumable", "configs/tiny/pipeline.yaml"),
    "sft": Stage("sft", "stage I, short-context SFT", "configs/tiny/sft.yaml", kind="sft"),
    "long-sft": Stage("sft", "stage II, long-context SFT", "configs/tiny/long_sft.yaml"),
    "dpo": Stage("dpo", "stage III, offline DPO on reward-scored pairs", "configs/tiny/dpo.yaml", kind="dpo"),
    "long-dpo": Stage("dpo", "stage IV, long-context offline DPO", "configs/tiny/long_dpo.yaml"),
    "grpo": Stage("grpo", "stage V, online modified GRPO", "configs/tiny/grpo.yaml", kind="grpo"),
    "rm": Stage("rm", "reward-model training", "configs/tiny/rm.yaml", kind="rm"),
    "eval-rm": Stage("eval_rm", "reward-model evaluation report", "configs/tiny/eval_rm.yaml"),
}
# commands that are not recipe stages (their own arguments, no stage YAML)
TOOLS = {
    "export": Stage("export", "a checkpoint in the released MiniMax-Text-01 layout", "runs/tiny/grpo/final OUT"),
}
# pipeline YAML `kind` -> stage module
KINDS = {stage.kind: stage.module for stage in STAGES.values() if stage.kind}


def stage_module(name: str):
    """The module of a stage, by CLI name or pipeline kind."""
    stage = STAGES.get(name) or TOOLS.get(name)
    return importlib.import_module(f"pipelines.{stage.module if stage else KINDS[name]}")


def usage() -> str:
    def rows(table):
        return "\n".join(f"  {name:<10} {stage.summary:<46} (e.g. {stage.example})" for name, stage in table.items())

    return ("usage: python -m pipelines STAGE --config FILE [--set KEY=VALUE ...] [--overwrite]\n"
            "       (or: minimax-align STAGE ...; make <stage>)\n\n"
            f"Stages of the MiniMax-01 post-training recipe:\n{rows(STAGES)}\n\n"
            f"Tools:\n{rows(TOOLS)}\n\n"
            "`python -m pipelines STAGE --help` lists the stage's (or tool's) options.")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in STAGES and argv[0] not in TOOLS:
        print(f"error: unknown stage {argv[0]!r}; stages: {', '.join(STAGES)}; tools: {', '.join(TOOLS)}\n\n"
              f"{usage()}", file=sys.stderr)
        return 2
    return stage_module(argv[0]).main(argv[1:], stage=argv[0])
