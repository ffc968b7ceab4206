"""Reward-model handler: a sequence-classification model (one logit per sequence) scoring (prompt, completion).

The model loads through the toolkit's one loader (`alignment.modeling.load_model(..., head="score")`: the same
packing-safe attention as the policy). `rm_input_ids` is the one tokenisation used for training (pipelines/rm.py
pre-tokenises with it) and for scoring, so the handler sees sequences exactly as trained: the chat template over
prompt + assistant turn, as TRL's RewardTrainer renders conversational pairs. The score is read at the last
non-pad token; batches are right-padded, which leaves every real token's state untouched in both attention kinds.
"""

from __future__ import annotations

from pathlib import Path

from rewards.base import RewardOutput, completion_text, path_options, prompt_messages


def rm_input_ids(tokenizer, prompt, completion) -> list[int]:
    """Token ids of prompt + assistant completion through the chat template (TRL's conversational rendering)."""
    messages = prompt_messages(prompt) + [{"role": "assistant", "content": completion_text(completion)}]
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


def score_ids(model, sequences: list[list[int]], pad_token_id: int, batch_size: int = 64) -> list[float]:
    """One reward per token sequence: batched, right-padded, no grad, on the model's device."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores: list[float] = []
    # sort by length so batches pad little; restore the order at the end
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(sequences[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
                mask[row, : len(sequences[i])] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            scores += logits[:, 0].float().tolist()
    model.train(was_training)
    out = [0.0] * len(sequences)
    for i, s in zip(order, scores):
        out[i] = s
    return out


def score_pairs(model, rows: list[dict], pad_token_id: int, batch_size: int) -> tuple[list[float], list[float]]:
    """(chosen scores, rejected scores) of pairs tokenised into `chosen_ids` / `rejected_ids`."""
    scores = score_ids(model, [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows], pad_token_id,
                       batch_size)
    return scores[: len(rows)], scores[len(rows):]


def pairwise_accuracy(chosen: list[float], rejected: list[float], categories: list[str]) -> dict:
    """Pairwise accuracy (chosen strictly above rejected: ties count as wrong) overall and per category, the
    unweighted mean over categories (as RewardBench reports it: independent of the set's mix), and the counts.

    >>> m = pairwise_accuracy([1.0, 0.0, 2.0], [0.0, 1.0, 1.0], ["a", "a", "b"])
    >>> m["accuracy/a"], m["accuracy_category_mean"], m["pairs_per_category"]
    (0.5, 0.75, {'a': 2, 'b': 1})
    """
    wins = [c > r for c, r in zip(chosen, rejected)]
    out = {"accuracy": sum(wins) / len(wins), "pairs_per_category": {}}
    for category in sorted(set(categories)):
        picked = [w for w, k in zip(wins, categories) if k == category]
        out[f"accuracy/{category}"] = sum(picked) / len(picked)
        out["pairs_per_category"][category] = len(picked)
    out["accuracy_category_mean"] = sum(out[f"accuracy/{c}"] for c in out["pairs_per_category"]) / len(
        out["pairs_per_category"])
    return out


class RewardModel:
    """A loaded reward model with its tokenizer: `rm.score(prompts, completions) -> list[float]`."""

    def __init__(self, path: str | Path, batch_size: int = 64, device: str | None = None, dtype: str = "float32",
                 max_length: int | None = None):
        from alignment.modeling import ModelOptions, load_model, load_tokenizer

        path = Path(path)
        self.path, self.batch_size, self.max_length = path, batch_size, max_length
        self.tokenizer = load_tokenizer(path, key=f"reward model '{path}'")
        self.model = load_model(ModelOptions(path=str(path), dtype=dtype, device=device or "auto"), head="score",
                                tokenizer=self.tokenizer)
        self.model.eval()
        self.pad_token_id = self.model.config.pad_token_id

    def score(self, prompts, completions) -> list[float]:
        seqs = [rm_input_ids(self.tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]
        if self.max_length is not None:  # keep the end: the score is read at the last token
            seqs = [s[-self.max_length:] for s in seqs]
        return score_ids(self.model, seqs, self.pad_token_id, self.batch_size)


@path_options("path")
def reward_model(path: str, batch_size: int = 64, device: str | None = None, dtype: str = "float32",
                 max_length: int | None = None, normalize: bool = False):
    """Scores from a sequence-classification RM in a local directory (e.g. `make rm`'s runs/tiny/rm/final).

    normalize: standardise scores within each call (zero mean, unit variance over the batch) — RM logits have an
    arbitrary offset and scale, which otherwise sets the reward's weight against rule rewards.
    """
    rm = RewardModel(path, batch_size=batch_size, device=device, dtype=dtype, max_length=max_length)

    def reward_model(prompts, completions, **fields) -> RewardOutput:
        raw = rm.score(prompts, completions)
        scores = raw
        if normalize and len(raw) > 1:
            mean = sum(raw) / len(raw)
            std = (sum((s - mean) ** 2 for s in raw) / len(raw)) ** 0.5
            scores = [(s - mean) / (std + 1e-6) for s in raw]
        return RewardOutput(scores, {"reward_model": scores, "reward_model/raw": raw})

    return reward_model
