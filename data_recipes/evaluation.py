"""Held-out evaluation: greedy answers (`alignment.evaluation.generate_greedy`) to each set's prompts, scored by the
built-in task suite's rule verifiers (`rewards.verifiers`) or, for your own evaluation files, by a named verifier.

Your own sets: a stage's `eval.files` maps a set name to `{path: FILE, verifier: REWARD SPEC, n: N,
max_new_tokens: T}`: FILE holds rows of `prompt` (or `messages`) plus the fields the verifier reads (checked row by
row before training, like a prompt pool: `data_recipes.prompt_pool.pool_row`); the verifier is a reward spec
(`rewards.Verifier`: its score clipped to [0, 1], e.g. `{math: {}}`, `{code: {}}`, `{exact: {fields: {answer:
label}}}`); `n` keeps the first N rows; `max_new_tokens` overrides `eval.max_new_tokens` for the set. Reported as
`{name}/accuracy`, the mean success (for a partial-credit verifier such as `code`, the mean per-test pass rate).
"""

from __future__ import annotations

from dataclasses import dataclass

from alignment.config import ConfigError, did_you_mean
from alignment.evaluation import generate_greedy
from data_recipes.io import prompt_of
from rewards.verifiers import is_refusal, verify

FILE_SET_KEYS = ("path", "verifier", "n", "max_new_tokens")


@dataclass
class FileSet:
    """One evaluation set from a file: its checked rows and the reward spec that scores them."""

    rows: list[dict]
    verifier: dict
    max_new_tokens: int | None = None


def load_eval_files(spec, source: str = "config", key: str = "eval.files") -> dict[str, FileSet]:
    """The evaluation sets of `spec` ({name: {path, verifier, n, max_new_tokens}}), every row checked against the
    fields its verifier reads. A bad entry is a ConfigError naming `source` and the dotted key; a bad row a
    DataError naming file, row, column and handler."""
    from data_recipes.prompt_pool import load_pool_files
    from rewards import RewardError, spec_fields

    if not isinstance(spec, dict):
        raise ConfigError(f"{source}: '{key}' must map a set name to {{path, verifier}}, got {type(spec).__name__}")
    sets = {}
    for name, entry in spec.items():
        where = f"{key}.{name}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{source}: '{where}' must be a mapping {{path: FILE, verifier: {{math: {{}}}}}}, "
                              f"got {type(entry).__name__}")
        for option in entry:
            if option not in FILE_SET_KEYS:
                raise ConfigError(f"{source}: '{where}.{option}' is unknown{did_you_mean(option, FILE_SET_KEYS)}; "
                                  f"valid: {', '.join(FILE_SET_KEYS)}")
        for option in ("path", "verifier"):
            if entry.get(option) is None:
                raise ConfigError(f"{source}: '{where}.{option}' is missing (a set from a file needs path and "
                                  "verifier)")
        if not isinstance(entry["path"], str):
            raise ConfigError(f"{source}: '{where}.path' must be a file path, got {entry['path']!r}")
        for option in ("n", "max_new_tokens"):
            value = entry.get(option)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{source}: '{where}.{option}' must be an integer >= 1, got {value!r}")
        try:
            reads = spec_fields(entry["verifier"])
        except RewardError as err:
            raise ConfigError(f"{source}: '{where}.verifier': {err}") from None
        rows = load_pool_files([entry["path"]], reads)[: entry.get("n")]
        sets[name] = FileSet(rows, dict(entry["verifier"]), entry.get("max_new_tokens"))
    return sets


def evaluate_files(model, tokenizer, sets: dict[str, FileSet], max_new_tokens: int = 16,
                   batch_size: int = 32) -> dict[str, float]:
    """`{name}/accuracy` per file set: the mean success of greedy completions by the set's verifier."""
    from rewards import Verifier

    metrics = {}
    for name, fs in sets.items():
        prompts = [prompt_of(r) for r in fs.rows]
        completions = generate_greedy(model, tokenizer, prompts, fs.max_new_tokens or max_new_tokens, batch_size,
                                      desc=f"eval {name}")
        scores = Verifier(fs.verifier)(prompts, completions, fs.rows)
        metrics[f"{name}/accuracy"] = sum(scores) / max(len(scores), 1)
    return metrics


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
