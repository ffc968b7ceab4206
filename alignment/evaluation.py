"""Held-out evaluation used by every stage: greedy answers to the task suite, scored by the rule verifiers."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from rewards.verifiers import is_refusal, verify


@torch.no_grad()
def generate_greedy(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, batch_size: int,
                    desc: str = "generate") -> list[str]:
    """Greedy completions of chat prompts (batched, left-padded; the model wrapper keeps pads out of the state)."""
    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    outputs = []
    for start in tqdm(range(0, len(conversations), batch_size), desc=desc, leave=False):
        prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                   for c in conversations[start : start + batch_size]]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        # no router logits while decoding: transformers' aux loss breaks on cached steps, and it is unused here
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, output_router_logits=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        outputs += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    model.train(was_training)
    return outputs


def evaluate(model, tokenizer, sets: dict[str, list[dict]], max_new_tokens: int = 16,
             batch_size: int = 32) -> dict[str, float]:
    """Accuracy per held-out set; safety sets also report refusal rates on harmful and on benign prompts
    (the second one is over-refusal, which the MiniMax harmlessness criteria explicitly penalise)."""
    metrics = {}
    for name, rows in sets.items():
        completions = generate_greedy(model, tokenizer, [r["messages"][:-1] for r in rows], max_new_tokens,
                                      batch_size, desc=f"eval {name}")
        metrics[f"{name}/accuracy"] = sum(verify(r, c) for r, c in zip(rows, completions)) / max(len(rows), 1)
        if rows and rows[0]["task"] == "safety":
            for kind, harmful in (("harmful", True), ("benign", False)):
                picked = [is_refusal(c) for r, c in zip(rows, completions) if r["harmful"] == harmful]
                metrics[f"{name}/refusal_rate_{kind}"] = sum(picked) / max(len(picked), 1)
    return metrics
