"""Pretrain the tiny default's base checkpoint: causal-LM training on raw in-context lookup text.

    python -m pipelines.pretrain --out configs/model/tiny_base --device cuda      (make base)

Why this exists: the MiniMax-01 recipe post-trains a pretrained base [01 §5], and pretraining is where a model
learns to copy from its context (the lookup skill that long-context SFT then stretches to longer inputs). The
2M-parameter tiny model, from random weights, does not form that skill within a CPU budget (README, "What the tiny
model does not learn in CPU minutes"). So the tiny default starts from a base that this script pretrained once on
a GPU; the result is committed at `configs/model/tiny_base/` with its tokenizer and `pretrain_metrics.json`.

What the base sees: short haystacks only (`--pairs`, default 2-8 pairs, at most ~100 tokens), each followed by
`--questions` lookups in the task suite's words, with no chat template and nothing about arithmetic or safety;
stage I (SFT) teaches the chat format and the other tasks, stage II (long SFT) the 24-pair haystacks. Full
next-token loss on every token (a base model's objective), AdamW with warmup and cosine decay, gradient clipping.
Lookup accuracy (argmax on each answer's value token, held-out haystacks) is measured at several haystack sizes.
The script is plain torch + transformers, so it runs on the GPU image without trl or datasets; seeded, but GPU
kernels are not bit-deterministic, so a rebuild gives a different base with the same measured skill.
"""
from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch


def encode(tokenizer, docs: list[tuple[str, list]]):
    """Right-padded ids, attention mask and the answer-token positions of each document."""
    enc = tokenizer([text for text, _ in docs], add_special_tokens=False, return_offsets_mapping=True)
    width = max(len(ids) for ids in enc["input_ids"])
    ids = torch.full((len(docs), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(docs), width, dtype=torch.long)
    answers = []  # (row, position of the value token)
    for r, (row, offsets, (_, spans)) in enumerate(zip(enc["input_ids"], enc["offset_mapping"], docs)):
        ids[r, : len(row)], mask[r, : len(row)] = torch.tensor(row), 1
        starts = {tuple(span): t for t, span in enumerate(offsets)}
        for span in spans:
            if tuple(span) not in starts:
                raise ValueError(f"answer {span} is not one token in: {docs[r][0]!r}")
            answers.append((r, starts[tuple(span)]))
    return ids, mask, torch.tensor(answers)


def lm_loss(model, ids, mask):
    """Mean next-token cross-entropy over the real (unpadded) tokens."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


@torch.no_grad()
def lookup_accuracy(model, tokenizer, n_pairs: int, n: int = 256, device="cpu") -> float:
    """Share of held-out lookups whose value token is the argmax (one question per haystack of `n_pairs`)."""
    from data_recipes.tasks import lookup_documents

    ids, mask, answers = encode(tokenizer, lookup_documents(n, seed=n_pairs, n_pairs=n_pairs, questions=1,
                                                            split="heldout"))
    ids, mask = ids.to(device), mask.to(device)
    was_training = model.training
    model.eval()
    logits = model(input_ids=ids, attention_mask=mask).logits
    model.train(was_training)
    rows, pos = answers[:, 0].to(device), answers[:, 1].to(device)
    return (logits[rows, pos - 1].argmax(-1) == ids[rows, pos]).float().mean().item()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m pipelines.pretrain", description=__doc__.split("\n")[0],
                                 epilog="Writes <out>/ (safetensors + tokenizer + pretrain_metrics.json) atomically, "
                                        "and <out>.log/ (log_history.json, curves.png).")
    ap.add_argument("--model", default="configs/model/tiny.yaml", help="model YAML (fresh weights)")
    ap.add_argument("--out", default="runs/tiny/base", help="checkpoint directory to write")
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=128, help="documents per step")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    ap.add_argument("--warmup", type=float, default=0.1, help="share of steps with linear warmup")
    ap.add_argument("--pairs", type=int, nargs=2, default=(2, 8), metavar=("LO", "HI"), help="haystack sizes")
    ap.add_argument("--questions", type=int, default=4, help="lookups per document")
    ap.add_argument("--eval-pairs", type=int, nargs="+", default=[2, 4, 8, 16, 24])
    ap.add_argument("--eval-every", type=int, default=500, help="steps between lookup evaluations")
    ap.add_argument("--log-every", type=int, default=50, help="steps between loss log entries")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    from tqdm import tqdm

    from alignment.modeling import load_model, model_config_from_yaml
    from alignment.reporting import atomic_directory, plot_curves, write_json_atomic, write_log_history
    from alignment.tokenizer import build_tokenizer
    from data_recipes.tasks import lookup_documents

    out, log_dir = Path(args.out), Path(f"{args.out}.log")
    tokenizer = build_tokenizer(log_dir / "tokenizer", vocab_size=model_config_from_yaml(args.model).vocab_size)
    model = load_model(args.model, seed=args.seed).to(args.device).train()
    model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, int(args.warmup * args.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.1 + 0.45 * (
        1 + math.cos(math.pi * max(0, s + 1 - warmup) / max(1, args.steps - warmup)))))
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    def evaluate() -> dict:
        return {f"lookup@{n}": round(lookup_accuracy(model, tokenizer, n, device=args.device), 4)
                for n in args.eval_pairs}

    history, start = [{"step": 0, **evaluate()}], time.time()
    bar = tqdm(range(1, args.steps + 1), desc="pretrain", mininterval=5)
    for step in bar:
        docs = lookup_documents(args.batch, seed=rng.randrange(2**31), n_pairs=tuple(args.pairs),
                                questions=args.questions)
        ids, mask, _ = encode(tokenizer, docs)
        loss = lm_loss(model, ids.to(args.device), mask.to(args.device))
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        if step % args.log_every == 0 or step == args.steps:
            entry = {"step": step, "loss": round(loss.item(), 4), "grad_norm": round(grad_norm.item(), 4),
                     "learning_rate": schedule.get_last_lr()[0]}
            if step % args.eval_every == 0 or step == args.steps:
                entry.update(evaluate())
                print(f"step {step} ({time.time() - start:.0f} s): " + ", ".join(
                    f"{k} {v}" for k, v in entry.items() if k != "step"), flush=True)
            history.append(entry)
            bar.set_postfix(loss=entry["loss"])

    model.to("cpu")
    metrics = {"before": history[0], "after": history[-1], "args": vars(args), "seconds": round(time.time() - start)}
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "pretrain_metrics.json", metrics)
    write_log_history(log_dir, history)
    plot_curves(history, log_dir / "curves.png", keys=("loss", "lookup@4", "lookup@24", "learning_rate"))
    print(f"wrote {out} ({metrics['seconds']} s); lookup accuracy after: " + ", ".join(
        f"{k} {v}" for k, v in history[-1].items() if k.startswith("lookup")))
    return metrics


if __name__ == "__main__":
    main()
