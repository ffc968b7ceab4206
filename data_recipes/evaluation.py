"""Held-out evaluation on the built-in task suite: greedy answers (`alignment.evaluation.generate_greedy`) to each
set's prompts, scored by the rule verifiers (`rewards.verifiers`)."""

from __future__ import annotations

from alignment.evaluation import generate_greedy
from data_recipes.io import prompt_of
from rewards.verifiers import is_refusal, verify


def evaluate(model, tokenizer, sets: dict[str, list[dict]], max_new_tokens: int = 16,
             batch_size: int = 32) -> dict[str, float]:
    """Accuracy per held-out set (`sets`: name -> task-suite rows, e.g. `heldout_sets(...)`); safety sets also
    report refusal rates on harmful and on benign prompts (the second one is over-refusal, which the MiniMax
    harmlessness criteria explicitly penalise)."""
    metrics = {}
    for name, rows in sets.items():
        completions = generate_greedy(model, tokenizer, [prompt_of(r) for r in rows], max_new_tokens, batch_size,
                                      desc=f"eval {name}")
        metrics[f"{name}/accuracy"] = sum(verify(r, c) for r, c in zip(rows, completions)) / max(len(rows), 1)
        if rows and rows[0]["task"] == "safety":
            for kind, harmful in (("harmful", True), ("benign", False)):
                picked = [is_refusal(c) for r, c in zip(rows, completions) if r["harmful"] == harmful]
                metrics[f"{name}/refusal_rate_{kind}"] = sum(picked) / max(len(picked), 1)
    return metrics
