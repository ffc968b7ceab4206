"""Greedy generation for evaluation: batched, left-padded completions of chat prompts. Scoring them is the caller's
business (the task suite's held-out evaluation is `data_recipes.evaluation.evaluate`)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from alignment.modeling import warn_if_off_device


@torch.no_grad()
def generate_greedy(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, batch_size: int,
                    desc: str = "generate") -> list[str]:
    """Greedy completions of chat prompts (batched, left-padded; the model wrapper keeps pads out of the state)."""
    warn_if_off_device(model, desc)
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
