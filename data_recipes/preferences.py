"""The built-in preference set for reward-model training and evaluation: rows of `prompt`, `chosen`, `rejected`
(conversational, as TRL's RewardTrainer takes them) plus `category` and the task columns.

Categories follow the paper's reward sources [01 §5.2]:
    math          verifier-correct vs incorrect arithmetic answers (the rule reward, learned)
    safety        harmful prompt: safe refusal vs compliance (the harmless reward)
    over_refusal  benign look-alike ("kill a Python process"): helpful answer vs needless refusal — the helpfulness
                  principles the paper adds to its safety rules so that unreasonable refusals are not rewarded
    general       on-topic vs off-topic helpful answer to a benign question, and the right vs a wrong value in a
                  key→value lookup (general helpfulness)

Length is decoupled from the label on purpose: both sides draw their wording (bare / restated / verbose) independently,
so a reward model cannot score well by preferring longer answers, and the evaluation can measure how much it does
(M1: reward models prefer longer outputs). The compliance texts are generic openers with no harmful content.

Held-out pairs come from the task suite's held-out problems and safety combinations, never seen in training.
"""

from __future__ import annotations

import random

from pathlib import Path

from data_recipes.io import DataError, read_rows
from data_recipes.specs import check_builtin
from data_recipes.tasks import BENIGN, REFUSALS, WORDS, _safety_combos, arithmetic_examples, retrieval_examples

CATEGORIES = ("math", "safety", "over_refusal", "general")
CATEGORY = ("preference category", "preference categories")  # what a name of PREFERENCE_BUILDERS names

LONG_REFUSALS = [
    "I'm sorry, but I can't help with that. It could put people in danger.",
    "I cannot help with that request, because it could cause real harm to others.",
    "I won't help with that. If someone is in danger, please contact the local authorities.",
]
COMPLIANCE = [
    "Sure, here is how.",
    "Of course. Step one is easy.",
    "Sure! First get the materials, then follow the steps below one by one.",
    "Yes, I can explain it. Start with the basics, then move on to the harder part.",
    "Here you go: it takes a few steps, and I will walk you through each of them carefully.",
]
MATH_STYLES = ["{r}", "{a} {op} {b} = {r}", "The answer is {r}.", "{a} {op} {b} = {r}, so the answer is {r}."]


def _msg(role: str, content: str) -> list[dict]:
    return [{"role": role, "content": content}]


def _pair(category: str, question: str, chosen: str, rejected: str, task: str, answer: str,
          harmful: bool = False) -> dict:
    return {"prompt": _msg("user", question), "chosen": _msg("assistant", chosen),
            "rejected": _msg("assistant", rejected), "category": category, "task": task, "answer": answer,
            "harmful": harmful}


def math_pairs(n: int, seed: int, split: str = "train", max_operand: int = 20) -> list[dict]:
    """Correct vs wrong result (off by 1-10 either way), each side in an independently drawn wording."""
    rng = random.Random(f"pref-math:{split}:{seed}")
    pairs = []
    for row in arithmetic_examples(n, seed, split, max_operand=max_operand):
        a, op, b = row["messages"][1]["content"].split(" = ")[0].split()
        r = int(row["answer"])
        wrong = r + rng.choice([-1, 1]) * rng.randint(1, 10)
        if wrong < 0:
            wrong = r + rng.randint(1, 10)
        good = rng.choice(MATH_STYLES).format(a=a, op=op, b=b, r=r)
        bad = rng.choice(MATH_STYLES).format(a=a, op=op, b=b, r=wrong)
        pairs.append(_pair("math", row["messages"][0]["content"], good, bad, "arithmetic", row["answer"]))
    return pairs


def _refusal(rng: random.Random) -> str:
    return rng.choice(REFUSALS + LONG_REFUSALS)


def safety_pairs(n: int, seed: int, split: str = "train") -> list[dict]:
    """Harmful prompt: a refusal (short or long) is chosen over compliance (short or long)."""
    rng = random.Random(f"pref-safety:{split}:{seed}")
    harmful = [q for q, is_harmful, _ in _safety_combos(split) if is_harmful]
    return [_pair("safety", q, _refusal(rng), rng.choice(COMPLIANCE), "safety", "", harmful=True)
            for q in (rng.choice(harmful) for _ in range(n))]


def over_refusal_pairs(n: int, seed: int, split: str = "train") -> list[dict]:
    """Benign look-alike prompt: the helpful answer is chosen over a needless refusal (short or long)."""
    rng = random.Random(f"pref-over-refusal:{split}:{seed}")
    benign = [(q, reply) for q, is_harmful, reply in _safety_combos(split) if not is_harmful]
    pairs = []
    for _ in range(n):
        q, reply = rng.choice(benign)
        pairs.append(_pair("over_refusal", q, reply, _refusal(rng), "safety", reply))
    return pairs


def general_pairs(n: int, seed: int, split: str = "train", n_pairs: int | list[int] = (2, 4)) -> list[dict]:
    """Half on-topic vs off-topic answers to benign questions (another category's helpful reply), half key→value
    lookups where the right value beats another value from the same haystack (same length, same format)."""
    rng = random.Random(f"pref-general:{split}:{seed}")
    benign = [(q, reply) for q, is_harmful, reply in _safety_combos(split) if not is_harmful]
    replies = sorted({reply for _, _, reply in BENIGN})
    n_lookup = n // 2
    pairs = []
    for row in retrieval_examples(n_lookup, seed, n_pairs=n_pairs, split=split):
        question, reply = row["messages"][0]["content"], row["messages"][1]["content"]
        values = [item.split("=")[1].strip()
                  for item in question.split("\n")[0][len("Data: "):].rstrip(".").split("; ")]
        others = [v for v in values if v != row["answer"]]
        wrong = rng.choice(others) if others else rng.choice([w for w in WORDS if w not in values])
        pairs.append(_pair("general", question, reply, reply.replace(row["answer"], wrong), "retrieval",
                           row["answer"]))
    for _ in range(n - n_lookup):
        q, reply = rng.choice(benign)
        pairs.append(_pair("general", q, reply, rng.choice([r for r in replies if r != reply]), "safety", reply))
    return pairs


PREFERENCE_BUILDERS = {"math": math_pairs, "safety": safety_pairs, "over_refusal": over_refusal_pairs,
                       "general": general_pairs}


def build_preferences(spec: dict[str, dict], seed: int, split: str = "train",
                      files: list[str] | tuple[str, ...] = ()) -> list[dict]:
    """Preference rows per category plus the rows of user `files` (see `load_preference_file`), shuffled: `spec`
    maps category -> builder kwargs, e.g. {"math": {"n": 1000}, "safety": {"n": 400}, "over_refusal": {"n": 400},
    "general": {"n": 400}}.

    >>> rows = build_preferences({"safety": {"n": 2}}, seed=0)
    >>> sorted(rows[0]), rows[0]["category"], rows[0]["harmful"]
    (['answer', 'category', 'chosen', 'harmful', 'prompt', 'rejected', 'task'], 'safety', True)
    """
    check_builtin(spec, PREFERENCE_BUILDERS, "build_preferences", "spec", noun=CATEGORY)
    rows = []
    for category, kwargs in spec.items():
        rows += PREFERENCE_BUILDERS[category](**{"seed": seed, "split": split, **kwargs})
    for path in files:
        rows += load_preference_file(path)
    random.Random(f"pref-shuffle:{split}:{seed}").shuffle(rows)
    return rows


def _turns(value, where: str, field: str, role: str) -> list[dict]:
    """A string, or a list of {role, content} messages, as chat messages."""
    if isinstance(value, str):
        return _msg(role, value)
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {field} is {type(value).__name__}; expected a string or a non-empty message list")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
            raise DataError(f"{where}: {field}[{i}] must be an object with string role and content")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def load_preference_file(path: str | Path) -> list[dict]:
    """Rows of a user .jsonl / .json / .parquet preference file: `prompt`, `chosen`, `rejected` (strings or
    message lists) and an optional `category` (default "general"); errors name the file, row and field."""
    path = Path(path)
    rows = []
    for n, row in read_rows(path):
        where = f"{path} row {n}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: row is {type(row).__name__}; expected an object")
        for key in ("prompt", "chosen", "rejected"):
            if key not in row:
                raise DataError(f"{where}: {key} is missing")
        category = row.get("category", "general")
        if not isinstance(category, str):
            raise DataError(f"{where}: category is {type(category).__name__}; expected a string")
        rows.append({"prompt": _turns(row["prompt"], where, "prompt", "user"),
                     "chosen": _turns(row["chosen"], where, "chosen", "assistant"),
                     "rejected": _turns(row["rejected"], where, "rejected", "assistant"),
                     "category": category, "task": "user", "answer": "", "harmful": False})
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


# -- DPO preference files (TRL's preference format) ------------------------------------------------------------------

PLAIN, CONVERSATIONAL = "plain", "conversational"  # TRL's "standard" and "conversational" preference formats


def _is_empty(value) -> bool:
    return (isinstance(value, str) and not value.strip()) or (isinstance(value, list) and not value)


def _dpo_side(value, where: str, key: str):
    """One of prompt / chosen / rejected: a non-empty string (plain) or a checked message list (conversational)."""
    from data_recipes.io import check_messages

    if _is_empty(value):
        raise DataError(f"{where}: {key} is empty")
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise DataError(f"{where}: {key} is {type(value).__name__}; expected a string (plain) or a list of messages "
                        "(conversational)")
    return check_messages(value, where, key)


def _split_implicit_prompt(chosen: list[dict], rejected: list[dict], where: str):
    """TRL's implicit prompt: the longest run of messages both conversations start with (`trl.extract_prompt`)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise DataError(f"{where}: no prompt, and chosen and rejected share no leading message to take it from "
                        "(give a prompt, or full conversations that start with the same turns)")
    return chosen[:n], chosen[n:], rejected[n:]


def check_dpo_row(row, where: str) -> dict:
    """One preference row in TRL's format, checked: {prompt, chosen, rejected} all strings (plain: the text is
    trained on as is, no chat template) or all message lists (conversational; the prompt may be left out when chosen
    and rejected are whole conversations sharing their first turns, as TRL accepts). Returns {prompt, chosen,
    rejected} (conversational: `data_recipes.io.check_messages` form; chosen and rejected then start and end
    with an assistant turn, and may hold tool calls, tool results and further assistant turns
    between). A missing key, a wrong type, an empty value, chosen == rejected, or a `tools` column (tool schemas are
    not rendered yet) is a DataError naming `where` and the key."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: row is {type(row).__name__}; expected an object with prompt, chosen, rejected")
    for key in ("chosen", "rejected"):
        if key not in row or row[key] is None:
            raise DataError(f"{where}: {key} is missing")
    if row.get("tools") is not None:
        raise DataError(f"{where}: tools: tool schemas are not rendered by the DPO stage yet; describe the tools in "
                        "a system message of the prompt")
    chosen, rejected = _dpo_side(row["chosen"], where, "chosen"), _dpo_side(row["rejected"], where, "rejected")
    if type(chosen) is not type(rejected):
        raise DataError(f"{where}: chosen is {'text' if isinstance(chosen, str) else 'a message list'} but rejected "
                        f"is {'text' if isinstance(rejected, str) else 'a message list'}; give both in one format")
    if row.get("prompt") is None:
        if isinstance(chosen, str):
            raise DataError(f"{where}: prompt is missing (an implicit prompt is only taken from conversations: "
                            "plain texts would be split at a common character prefix)")
        prompt, chosen, rejected = _split_implicit_prompt(chosen, rejected, where)
    else:
        prompt = _dpo_side(row["prompt"], where, "prompt")
        if type(prompt) is not type(chosen):
            raise DataError(f"{where}: prompt is {'text' if isinstance(prompt, str) else 'a message list'} but "
                            f"chosen is {'text' if isinstance(chosen, str) else 'a message list'}; give all three "
                            "in one format")
    if chosen == rejected:
        raise DataError(f"{where}: chosen == rejected; a pair must say which response is preferred")
    if isinstance(prompt, list):
        if prompt[-1]["role"] == "assistant":
            raise DataError(f"{where}: prompt[{len(prompt) - 1}].role is 'assistant'; the prompt must end with the "
                            "turn the responses answer (user, tool or system)")
        for key, side in (("chosen", chosen), ("rejected", rejected)):
            if not side:
                raise DataError(f"{where}: {key} is empty once the shared prompt is taken off (it equals the prompt)")
            if side[0]["role"] != "assistant":
                raise DataError(f"{where}: {key}[0].role is {side[0]['role']!r}; a response starts with an "
                                "assistant turn")
            if side[-1]["role"] != "assistant":
                raise DataError(f"{where}: {key}[{len(side) - 1}].role is {side[-1]['role']!r}; a response ends "
                                "with an assistant turn")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def load_dpo_preferences(path: str | Path) -> tuple[list[dict], str]:
    """(rows, format) of a user .jsonl / .json / .parquet preference file for DPO (`check_dpo_row` each), format
    "plain" or "conversational"; one file is in one format (a row in the other is an error naming it), as a
    `datasets` column is. Other columns are dropped (TRL reads only these three)."""
    from data_recipes.io import read_rows

    path = Path(path)
    rows, kind, first = [], None, None
    for n, raw in read_rows(path):
        where = f"{path} row {n}"
        row = check_dpo_row(raw, where)
        row_kind = PLAIN if isinstance(row["prompt"], str) else CONVERSATIONAL
        if kind is None:
            kind, first = row_kind, n
        elif row_kind != kind:
            raise DataError(f"{where}: a {row_kind} row in a {kind} file (row {first} is {kind}); one file, one "
                            "format")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows, kind
