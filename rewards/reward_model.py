"""Reward-model handler: a sequence-classification model (one logit per sequence) scoring (prompt, completion).

`load_reward_model` builds a `MiniMaxForSequenceClassification` from a MiniMax checkpoint directory (a causal-LM
checkpoint gets a fresh score head — how `make rm` starts from the SFT model) or a model YAML (fresh weights), with
the same packing-safe attention as the policy; any other local directory loads through
`AutoModelForSequenceClassification`. `rm_input_ids` is the one tokenisation used for training (pipelines/rm.py
pre-tokenises with it) and for scoring, so the handler sees sequences exactly as trained: the chat template over
prompt + assistant turn, as TRL's RewardTrainer renders conversational pairs. The score is read at the last
non-pad token; batches are right-padded, which leaves every real token's state untouched in both attention kinds.
"""

from __future__ import annotations

from pathlib import Path

from rewards.base import RewardOutput, completion_text, prompt_messages, register


def load_reward_model(path: str | Path, dtype: str = "float32", seed: int = 0):
    """A one-logit sequence-classification model from a checkpoint dir or a MiniMax model YAML."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, MiniMaxForSequenceClassification

    from alignment.config import ConfigError
    from alignment.modeling import make_packing_safe, model_config_from_yaml

    path = Path(path)
    torch_dtype = getattr(torch, dtype)
    if path.suffix in (".yaml", ".yml"):
        config = model_config_from_yaml(path)
        config.num_labels = 1
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = MiniMaxForSequenceClassification(config).to(torch_dtype)
    elif (path / "config.json").is_file():
        config = AutoConfig.from_pretrained(path)
        cls = MiniMaxForSequenceClassification if config.model_type == "minimax" else \
            AutoModelForSequenceClassification
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # the score head of a causal-LM checkpoint is initialised fresh
            model = cls.from_pretrained(path, num_labels=1, dtype=torch_dtype)
    else:
        raise ConfigError(f"reward model path '{path}' is neither a checkpoint directory (with config.json) nor a "
                          "model YAML")
    if model.config.num_labels != 1:
        raise ConfigError(f"{path}: a reward model needs num_labels=1, got {model.config.num_labels}")
    return make_packing_safe(model)


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


class RewardModel:
    """A loaded reward model with its tokenizer: `rm.score(prompts, completions) -> list[float]`."""

    def __init__(self, path: str | Path, batch_size: int = 64, device: str | None = None, dtype: str = "float32",
                 max_length: int | None = None):
        import torch
        from transformers import AutoTokenizer

        path = Path(path)
        if not (path / "tokenizer_config.json").is_file():
            raise FileNotFoundError(f"reward model '{path}': no tokenizer saved with it (tokenizer_config.json)")
        self.path, self.batch_size, self.max_length = path, batch_size, max_length
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = load_reward_model(path, dtype=dtype)
        self.model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.eval()
        pad = self.model.config.pad_token_id
        self.pad_token_id = self.tokenizer.pad_token_id if pad is None else pad

    def score(self, prompts, completions) -> list[float]:
        seqs = [rm_input_ids(self.tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]
        if self.max_length is not None:  # keep the end: the score is read at the last token
            seqs = [s[-self.max_length:] for s in seqs]
        return score_ids(self.model, seqs, self.pad_token_id, self.batch_size)


@register("reward_model")
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

    reward_model.rm = rm
    return reward_model
