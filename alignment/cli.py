"""`minimax-align STAGE --config FILE ...`: one command for every stage (each is also `python -m pipelines.STAGE`)."""

from __future__ import annotations

import importlib
import sys

# stage name -> pipeline module; long variants are configs of the same stage
STAGES = {"pipeline": "pipelines.run", "sft": "pipelines.sft", "long-sft": "pipelines.sft", "dpo": "pipelines.dpo",
          "long-dpo": "pipelines.dpo", "grpo": "pipelines.grpo", "rm": "pipelines.rm", "eval-rm": "pipelines.eval_rm"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        print("usage: minimax-align STAGE --config FILE [--set KEY=VALUE ...] [--overwrite]\n\n"
              "Stages of the MiniMax-01 post-training recipe:\n"
              "  pipeline   all stages in order, resumable   (e.g. configs/tiny/pipeline.yaml)\n"
              "  sft        stage I, short-context SFT       (e.g. configs/tiny/sft.yaml)\n"
              "  long-sft   stage II, long-context SFT       (e.g. configs/tiny/long_sft.yaml)\n"
              "  dpo        stage III, offline DPO           (e.g. configs/tiny/dpo.yaml)\n"
              "  long-dpo   stage IV, long offline DPO       (e.g. configs/tiny/long_dpo.yaml)\n"
              "  grpo       stage V, online modified GRPO    (e.g. configs/tiny/grpo.yaml)\n"
              "  rm         reward-model training            (e.g. configs/tiny/rm.yaml)\n"
              "  eval-rm    reward-model evaluation report   (e.g. configs/tiny/eval_rm.yaml)\n\n"
              "`minimax-align STAGE --help` lists the stage's options.")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return importlib.import_module(STAGES[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
