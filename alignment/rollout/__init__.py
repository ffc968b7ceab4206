"""Rollout workers: sampled completions with per-token log-probs, behind one interface (see `base`).

    worker = build_rollout("transformers", model, tokenizer)
    batch = worker.generate(prompts, n=8, sampling=SamplingOptions(temperature=1.0, max_new_tokens=32))
    worker.sync_weights(model)

Backends by name in `BACKENDS`; `vllm` registers itself in its own module (GPU, lazy import) when it lands.
"""

from alignment.rollout.base import (RolloutBatch, RolloutWorker, SamplingOptions, importance_weights,
                                    logprob_mismatch)
from alignment.rollout.transformers_backend import TransformersRollout

BACKENDS = {"transformers": TransformersRollout}


def build_rollout(backend: str, model, tokenizer, **kwargs) -> RolloutWorker:
    """A rollout worker by backend name (kwargs go to the backend, e.g. batch_size)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown rollout backend {backend!r}; known: {', '.join(BACKENDS)}")
    return BACKENDS[backend](model, tokenizer, **kwargs)


__all__ = ["BACKENDS", "RolloutBatch", "RolloutWorker", "SamplingOptions", "TransformersRollout", "build_rollout",
           "importance_weights", "logprob_mismatch"]
