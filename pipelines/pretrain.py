"""Pretrain a base checkpoint (tiny, 7m): causal-LM training on raw lookup text and worked arithmetic.

    make base [SIZE=7m]   (two runs of this script; GPU recommended: ~12 / ~9 min on one H200; docs/bases.md)

Why this exists: the MiniMax-01 recipe post-trains a pretrained base [01 §5], and pretraining is where a model
learns to copy from its context (the lookup skill that long-context SFT then stretches to longer inputs) and the
arithmetic that SFT only puts into a chat format. The 2M-parameter tiny model, from random weights, does not form
the lookup skill within a CPU budget (docs/bases.md). So the tiny default starts from a base that this
script pretrained once on a GPU; the result is committed at `configs/tiny/base/` with its tokenizer and
`pretrain_metrics.json`; the one-GPU pipeline's 7M model likewise at `configs/7m/base/`.

What the base sees: short haystacks (`--pairs`, default 2-8 pairs, at most ~100 tokens), each followed by
`--questions` lookups in the task suite's words, and (`--arithmetic-share`) documents of worked problems
("12 + 7 = 19", train split only); no chat template and nothing about safety. Stage I (SFT) teaches the chat format
and the other tasks, stage II (long SFT) the 24-pair haystacks. Two phases, because mixing arithmetic in from the
start kept lookup at chance through 4,500 steps (arithmetic was learned by step 1,000 and the recall circuit did not
form): lookups only until the circuit forms, then `--model <phase 1 checkpoint>` with the mix. Full next-token loss
on every token (a base model's objective), AdamW with warmup and cosine decay, gradient clipping. Held-out accuracy
(teacher-forced: every answer token the argmax) is measured for lookups at several haystack sizes and for arithmetic.
Plain torch + transformers (no trl); seeded, but GPU kernels are not bit-deterministic, so a rebuild gives a
different base with the same measured skills.
"""
from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch


def encode(tokenizer, docs: list[tuple[str, list]]):
    """Right-padded ids, attention mask and each answer's token range (row, first, end) in its document."""
    enc = tokenizer([text for text, _ in docs], add_special_tokens=False, return_offsets_mapping=True)
    width = max(len(ids) for ids in enc["input_ids"])
    ids = torch.full((len(docs), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(docs), width, dtype=torch.long)
    answers = []
    for r, (row, offsets, (_, spans)) in enumerate(zip(enc["input_ids"], enc["offset_mapping"], docs)):
        ids[r, : len(row)], mask[r, : len(row)] = torch.tensor(row), 1
        starts = {start: t for t, (start, _) in enumerate(offsets)}
        ends = {end: t + 1 for t, (_, end) in enumerate(offsets)}
        for a, b in spans:
            if a not in starts or b not in ends:
                raise ValueError(f"answer {(a, b)} does not start and end on token boundaries in: {docs[r][0]!r}")
            answers.append((r, starts[a], ends[b]))
    return ids, mask, torch.tensor(answers)


def lm_loss(model, ids, mask):
    """Mean next-token cross-entropy over the real (unpadded) tokens."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


@torch.no_grad()
def answer_accuracy(model, tokenizer, docs, device="cpu", bf16: bool = False) -> float:
    """Share of answers whose every token is the argmax given the text before it (teacher-forced exact match)."""
    ids, mask, answers = encode(tokenizer, docs)
    ids, mask = ids.to(device), mask.to(device)
    was_training = model.training
    model.eval()
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        predicted = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
    model.train(was_training)
    hits = [bool((predicted[r, a - 1: b - 1] == ids[r, a:b]).all()) for r, a, b in answers.tolist()]
    return sum(hits) / len(hits)


def heldout_accuracy(model, tokenizer, args, device="cpu") -> dict:
    """Lookup accuracy at each of `args.eval_pairs` haystack sizes (one question per haystack) and, when the base
    also learns arithmetic, exact-match accuracy on held-out problems with operands up to 20 and up to 30."""
    from data_recipes.tasks import arithmetic_documents, lookup_documents

    sets = {f"lookup@{n}": lookup_documents(256, seed=n, n_pairs=n, questions=1, split="heldout")
            for n in args.eval_pairs}
    if args.arithmetic_share > 0:
        sets.update({f"arithmetic@{m}": arithmetic_documents(64, seed=m, lines=4, max_operand=m, split="heldout")
                     for m in (20, 30)})
    return {name: round(answer_accuracy(model, tokenizer, docs, device, getattr(args, "bf16", False)), 4)
            for name, docs in sets.items()}


def training_documents(rng: random.Random, args) -> list[tuple[str, list]]:
    """One step's documents: lookups, and `--arithmetic-share` of them worked arithmetic problems."""
    from data_recipes.tasks import arithmetic_documents, lookup_documents

    n_arithmetic = round(args.arithmetic_share * args.batch)
    docs = lookup_documents(args.batch - n_arithmetic, seed=rng.randrange(2**31), n_pairs=tuple(args.pairs),
                            questions=args.questions)
    if n_arithmetic:  # (no extra draw otherwise: a lookup-only run keeps the stream of tiny_base phase 1)
        docs += arithmetic_documents(n_arithmetic, seed=rng.randrange(2**31), max_operand=args.max_operand)
    return docs


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m pipelines.pretrain", description=__doc__.split("\n")[0],
                                 epilog="Writes <out>/ (safetensors + tokenizer + pretrain_metrics.json) atomically, "
                                        "and <out>.log/ (log_history.json, curves.png).")
    ap.add_argument("--model", default="configs/tiny/model.yaml",
                    help="model YAML (fresh weights), or a checkpoint directory (with its tokenizer) to continue")
    ap.add_argument("--out", default="runs/tiny/base", help="checkpoint directory to write")
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=128, help="documents per step")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    ap.add_argument("--warmup", type=float, default=0.1, help="share of steps with linear warmup")
    ap.add_argument("--pairs", type=int, nargs=2, default=(2, 8), metavar=("LO", "HI"), help="haystack sizes")
    ap.add_argument("--questions", type=int, default=4, help="lookups per document")
    ap.add_argument("--arithmetic-share", type=float, default=0.0,
                    help="share of each batch that is arithmetic documents (8 worked problems each)")
    ap.add_argument("--max-operand", type=int, default=30, help="largest operand of the arithmetic documents")
    ap.add_argument("--eval-pairs", type=int, nargs="+", default=[2, 4, 8, 16, 24])
    ap.add_argument("--eval-every", type=int, default=500, help="steps between held-out evaluations")
    ap.add_argument("--log-every", type=int, default=50, help="steps between loss log entries")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bf16", action="store_true",
                    help="bf16 autocast around the forward (fp32 weights and optimizer): for models of 100M+ on a GPU")
    ap.add_argument("--save-dtype", choices=("float32", "bfloat16"), default="float32",
                    help="dtype of the written weights (training is fp32 either way); bfloat16 halves a committed base")
    args = ap.parse_args(argv)

    from tqdm import tqdm

    from alignment.config import ConfigError
    from alignment.modeling import load_model, load_tokenizer, model_config_from_yaml
    from alignment.reporting import atomic_directory, plot_curves, write_json_atomic, write_log_history
    from data_recipes.tokenizer import builtin_tokenizer

    out, log_dir = Path(args.out), Path(f"{args.out}.log")
    try:
        if Path(args.model).is_dir():
            tokenizer = load_tokenizer(args.model, key="--model")
        else:
            tokenizer = builtin_tokenizer(vocab_size=model_config_from_yaml(args.model).vocab_size)
        model = load_model(args.model, seed=args.seed, tokenizer=tokenizer).to(args.device).train()
    except ConfigError as err:
        ap.error(f"--model: {err}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, int(args.warmup * args.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.1 + 0.45 * (
        1 + math.cos(math.pi * max(0, s + 1 - warmup) / max(1, args.steps - warmup)))))
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    history, start = [{"step": 0, **heldout_accuracy(model, tokenizer, args, args.device)}], time.time()
    bar = tqdm(range(1, args.steps + 1), desc="pretrain", mininterval=5)
    for step in bar:
        ids, mask, _ = encode(tokenizer, training_documents(rng, args))
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.bf16):
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
                entry.update(heldout_accuracy(model, tokenizer, args, args.device))
                print(f"step {step} ({time.time() - start:.0f} s): " + ", ".join(
                    f"{k} {v}" for k, v in entry.items() if k != "step"), flush=True)
            history.append(entry)
            bar.set_postfix(loss=entry["loss"])

    model.to("cpu", dtype=getattr(torch, args.save_dtype))
    metrics = {"before": history[0], "after": history[-1], "args": vars(args), "seconds": round(time.time() - start)}
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "pretrain_metrics.json", metrics)
    write_log_history(log_dir, history)
    plot_curves(history, log_dir / "curves.png",
                keys=("loss", "lookup@4", "lookup@24", "arithmetic@20", "learning_rate"))
    print(f"wrote {out} ({metrics['seconds']} s); held-out accuracy after: " + ", ".join(
        f"{k} {v}" for k, v in history[-1].items() if k.startswith(("lookup", "arithmetic"))))
    return metrics


if __name__ == "__main__":
    main()
