"""Writes the example task files of this directory (deterministic under SEED; the .jsonl files are committed):

    .venv/bin/python examples/tasks/make_tasks.py

- `sft.jsonl`       400 maths word problems (operands <= 30) + 200 Python function problems, as chat `messages` with
                    the reply (stage I data: the reply restates the sum as an equation, or writes the function)
- `pool.jsonl`      300 maths word problems (operands <= 30) as `prompt` + `answer` (a number): the GRPO pool,
                    filtered by success rate with the `math` verifier (configs/tiny/tasks/grpo.yaml)
- `heldout_math.jsonl` 100 maths word problems (operands <= 30), `prompt` + `answer`, none in the files above
- `heldout_code.jsonl`  50 Python function problems, `prompt` + `tests` (three asserts each), none in sft.jsonl

Problems are small on purpose: the tiny model (2M parameters) answers word problems by restating "a + b = c" and
writes one-line functions; the held-out sets measure whether a stage moves that, per set.
"""

import json
import random
from pathlib import Path

SEED = 22
HERE = Path(__file__).resolve().parent
NAMES = ["Ann", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jade"]
THINGS = ["apples", "coins", "books", "shells", "stamps", "marbles", "cards", "pens"]
ADD = ["{n} has {a} {t} and gets {b} more. How many {t} does {n} have now?",
       "{n} had {a} {t}. A friend gave {n} {b} more. How many {t} does {n} have?"]
SUB = ["{n} has {a} {t} and gives away {b}. How many {t} are left?",
       "{n} had {a} {t} and lost {b}. How many {t} does {n} have now?"]
FUNCS = [("add_{k}", "returns x plus {k}", "x + {k}", lambda x, k: x + k),
         ("times_{k}", "returns x times {k}", "x * {k}", lambda x, k: x * k),
         ("minus_{k}", "returns x minus {k}", "x - {k}", lambda x, k: x - k)]


def word_problem(rng: random.Random, max_operand: int) -> tuple[str, str, int]:
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    add = rng.random() < 0.5
    if not add and a < b:
        a, b = b, a
    text = rng.choice(ADD if add else SUB).format(n=rng.choice(NAMES), t=rng.choice(THINGS), a=a, b=b)
    result = a + b if add else a - b
    return text, f"{a} {'+' if add else '-'} {b} = {result}", result


def code_problem(kind: int, k: int) -> tuple[str, str, list[str]]:
    name, says, body, fn = FUNCS[kind]
    name = name.format(k=k)
    prompt = f"Write a Python function {name}(x) that {says.format(k=k)}."
    solution = f"def {name}(x):\n    return {body.format(k=k)}"
    tests = [f"assert {name}({x}) == {fn(x, k)}" for x in (1, 4, 7)]
    return prompt, solution, tests


def unique(rng, make, n: int, taken: set) -> list:
    out = []
    while len(out) < n:
        item = make(rng)
        if item[0] not in taken:
            taken.add(item[0])
            out.append(item)
    return out


def main() -> None:
    rng = random.Random(SEED)
    taken: set = set()
    heldout_math = unique(rng, lambda r: word_problem(r, 30), 100, taken)
    pool = unique(rng, lambda r: word_problem(r, 30), 300, taken)
    sft_math = unique(rng, lambda r: word_problem(r, 30), 400, taken)
    # code: k 0..9 of each kind for SFT (with repeats of the 30 problems), k 10..29 held out
    sft_code = [code_problem(rng.randrange(3), rng.randrange(10)) for _ in range(200)]
    heldout_code = [code_problem(kind, k) for kind, k in
                    rng.sample([(kind, k) for kind in range(3) for k in range(10, 30)], 50)]

    def write(name: str, rows: list[dict]) -> None:
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    sft = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
           for q, a, _ in sft_math + sft_code]
    rng.shuffle(sft)
    write("sft.jsonl", sft)
    write("pool.jsonl", [{"prompt": q, "answer": r, "kind": "word_problem"} for q, _, r in pool])
    write("heldout_math.jsonl", [{"prompt": q, "answer": r} for q, _, r in heldout_math])
    write("heldout_code.jsonl", [{"prompt": q, "tests": t} for q, _, t in heldout_code])


if __name__ == "__main__":
    main()
