"""Narrow TRL trainer subclasses: only what the MiniMax recipe changes."""

from __future__ import annotations

from trl import SFTTrainer
from trl.trainer.utils import add_fused_lm_head

from alignment.modeling import FP32LMHead


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class MiniMaxSFTTrainer(SFTTrainer):
    """`SFTTrainer` whose chunked LM-head loss honours the FP32 LM head (MiniMax-M1 §3).

    TRL computes the SFT loss with its own fused, chunked LM head that reads `lm_head.weight` directly, so our
    `FP32LMHead.forward` never runs there. When the model has an FP32 head, re-install TRL's fused head with
    `cast_lm_head_to_fp32=True` (TRL's own switch for exactly this) instead of the default.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        base = _base(self.model)
        if isinstance(base.get_output_embeddings(), FP32LMHead):
            del base.forward  # drop TRL's instance-level patch, then patch again with the FP32 cast
            add_fused_lm_head(base, cast_lm_head_to_fp32=True, outputs=("log_probs", "entropy", "is_top1"))
