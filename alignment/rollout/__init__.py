"""Rollout workers: sampled completions with per-token log-probs, behind one interface (see `base`).

    worker = build_rollout("transformers", model, tokenizer)      # or "vllm" (GPU, the `gpu` extra)
    batch = worker.generate(prompts, n=8, sampling=SamplingOptions(temperature=1.0, max_new_tokens=32))
    worker.sync_weights(model)

Backends by name in `BACKENDS`; the vLLM one is imported only when asked for (`vllm_backend`).
"""

from alignment.rollout.base import (RolloutBatch, RolloutWorker, SamplingOptions, encode_prompts, importance_weights,
                                    logprob_mismatch)
from alignment.rollout.transformers_backend import TransformersRollout


def _vllm_rollout(model, tokenizer, **kwargs):
    from alignment.rollout.vllm_backend import VLLMRollout

    return VLLMRollout(model, tokenizer, **kwargs)


BACKENDS = {"transformers": TransformersRollout, "vllm": _vllm_rollout}


def build_rollout(backend: str, model, tokenizer, **kwargs) -> RolloutWorker:
    """A rollout worker by backend name (kwargs go to the backend, e.g. batch_size)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown rollout backend {backend!r}; known: {', '.join(BACKENDS)}")
    return BACKENDS[backend](model, tokenizer, **kwargs)


__all__ = ["BACKENDS", "RolloutBatch", "RolloutWorker", "SamplingOptions", "TransformersRollout", "build_rollout",
           "encode_prompts", "importance_weights", "logprob_mismatch"]
