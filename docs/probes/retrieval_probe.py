"""CPU probe: how many steps the tiny MiniMax model needs before key→value retrieval rises above chance.

    OMP_NUM_THREADS=1 python docs/probes/retrieval_probe.py --format kv --steps 12000 --pairs 2 2 --lr 1e-3

From random weights (configs/tiny/model.yaml), retrieval only: "Data: apple = river; tiger = lamp. Q: tiger? A: tiger ="
→ " lamp" (format `kv`) or with the value first, "lamp is tiger" (format `vk`). Only the value token is supervised;
batches of 32 (`--batch`), AdamW (betas 0.9 / 0.95), 10% linear warmup, gradient clipping at 1.0. Held-out
accuracy (argmax at the answer position, 256 fixed questions) is printed ten times (`--log-every`). `--train
recall` trains on dense multi-query recall instead (haystacks whose pairs recur, every recurring value supervised)
and still evaluates on the questions. docs/probes/README.md reports what it measured.
"""
import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from alignment.modeling import load_model  # noqa: E402
from alignment.tokenizer import build_tokenizer  # noqa: E402
from data_recipes.tasks import WORDS  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--format", choices=("kv", "vk"), default="kv")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--pairs", type=int, nargs=2, default=(2, 4), metavar=("LO", "HI"))
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch", type=int, default=32, help="questions per step")
    ap.add_argument("--log-every", type=int, default=0, help="steps between held-out evaluations (0: ten in all)")
    ap.add_argument("--model", default="configs/tiny/model.yaml")
    ap.add_argument("--warmup-pairs-steps", type=int, default=0,
                    help="curriculum: the first N steps with 1 pair per haystack (copy the only value), then --pairs")
    ap.add_argument("--key-vocab", type=int, default=0,
                    help="keys from the first N words only, values from the rest (0: both from all words)")
    ap.add_argument("--train", choices=("questions", "recall"), default="questions",
                    help="recall: haystacks whose pairs recur (k = v; ... k = v), every recurring value supervised "
                         "(dense multi-query recall); held-out accuracy is still on the questions")
    ap.add_argument("--mentions", type=int, default=16, help="recall: pair mentions per haystack")
    ap.add_argument("--eval-pairs", type=int, nargs="*", default=[],
                    help="after training: held-out accuracy on 256 questions at each of these haystack sizes")
    args = ap.parse_args()
    torch.manual_seed(0)
    tok = build_tokenizer(tempfile.mkdtemp(), vocab_size=1024)
    model = load_model(args.model, seed=0).train()

    def example(rng, pairs=None):
        k = rng.randint(*(pairs or args.pairs))
        if args.key_vocab:
            keys, values = rng.sample(WORDS[: args.key_vocab], k), rng.sample(WORDS[args.key_vocab :], k)
        else:
            words = rng.sample(WORDS, 2 * k)
            keys, values = words[:k], words[k:]
        q = rng.randrange(k)
        pair = "{a} = {b}" if args.format == "kv" else "{b} is {a}"
        haystack = "; ".join(pair.format(a=a, b=b) for a, b in zip(keys, values))
        ids = tok(f"Data: {haystack}. Q: {keys[q]}? A: {keys[q]} =", add_special_tokens=False)["input_ids"]
        return ids, tok(" " + values[q], add_special_tokens=False)["input_ids"][0]

    def batch(rng, n, pairs=None):
        rows = [example(rng, pairs) for _ in range(n)]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.zeros(n, width, dtype=torch.long)
        mask = torch.zeros(n, width, dtype=torch.long)
        for r, (row, _) in enumerate(rows):  # left padding: every answer is predicted at the last position
            ids[r, width - len(row):], mask[r, width - len(row):] = torch.tensor(row), 1
        return ids, mask, torch.tensor([answer for _, answer in rows])

    piece = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731

    def recall_batch(rng, n):
        """Rows of `--mentions` pair mentions over LO..HI distinct pairs (each pair first once, then at random);
        labels: the value token of every mention after a pair's first (-100 elsewhere)."""
        rows = []
        for _ in range(n):
            k = rng.randint(*args.pairs)
            words = rng.sample(WORDS, 2 * k)
            order = list(range(k))
            rng.shuffle(order)
            order += [rng.randrange(k) for _ in range(args.mentions - k)]
            ids, labels = piece("Data:"), [-100, -100]
            for m, i in enumerate(order):
                ids += piece(" " + words[i]) + piece(" =")
                value = piece(" " + words[k + i]) + piece(";")
                ids += value
                labels += [-100, -100, value[0] if m >= k else -100, -100]
            rows.append((ids, labels))
        width = max(len(ids) for ids, _ in rows)
        ids = torch.zeros(n, width, dtype=torch.long)
        labels = torch.full((n, width), -100, dtype=torch.long)
        for r, (row, lab) in enumerate(rows):
            ids[r, : len(row)], labels[r, : len(lab)] = torch.tensor(row), torch.tensor(lab)
        return ids, labels

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    train, (test_ids, test_mask, test_answers) = random.Random(1), batch(random.Random(999), 256)
    start = time.time()
    for step in range(1, args.steps + 1):
        opt.param_groups[0]["lr"] = args.lr * min(1.0, step / (0.1 * args.steps))
        if args.train == "recall":
            ids, labels = recall_batch(train, args.batch)
            logits = model(input_ids=ids).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels[:, 1:].flatten())
        else:
            ids, mask, answers = batch(train, args.batch, (1, 1) if step <= args.warmup_pairs_steps else None)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
            loss = torch.nn.functional.cross_entropy(logits.float(), answers)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % (args.log_every or max(1, args.steps // 10)) == 0:
            model.eval()
            with torch.no_grad():
                pred = model(input_ids=test_ids, attention_mask=test_mask).logits[:, -1].argmax(-1)
            model.train()
            print(f"step {step}: loss {loss.item():.3f}, held-out accuracy {(pred == test_answers).float().mean():.3f}"
                  f" ({time.time() - start:.0f} s)", flush=True)
    model.eval()
    for n in args.eval_pairs:  # does the circuit carry to longer haystacks? (chance: 1/n)
        ids, mask, answers = batch(random.Random(f"eval {n}"), 256, (n, n))
        with torch.no_grad():
            pred = model(input_ids=ids, attention_mask=mask).logits[:, -1].argmax(-1)
        print(f"{n} pairs: held-out accuracy {(pred == answers).float().mean():.3f} (chance {1 / n:.3f})", flush=True)


if __name__ == "__main__":
    main()
