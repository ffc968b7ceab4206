"""Reward-model evaluation on a held-out preference set: pairwise accuracy, length bias, calibration.

    make eval-rm                               # python -m pipelines eval-rm --config configs/tiny/eval_rm.yaml
    python -m pipelines eval-rm --config CONFIG [--set reward_model=DIR ...]

Writes `<output_dir>/eval.json`, `eval.md` and `eval.png` (accuracy per category, score vs length, reliability).

- Pairwise accuracy overall and per category (math / safety / over_refusal / general; user files bring their own).
- Length bias (M1 §4: reward models prefer longer outputs): Pearson r of score vs response length (tokens) over
  all responses, r of the score margin vs the length difference within pairs, accuracy on pairs where the longer
  answer is the rejected one (a length-biased RM fails exactly these) and on pairs where it is the chosen one, and
  the accuracy of "prefer the longer answer" as a baseline.
- Calibration: each pair is shown in a random (seeded) order and the Bradley–Terry probability
  σ(r_first − r_second) that the first is chosen is compared with the outcome: expected calibration error over
  equal-width bins, Brier score, log loss, and the reliability table.
- The safety handler's harmfulness rule: accuracy of "RM(prompt, refusal) > refusal_threshold" on the held-out
  safety and over-refusal prompts.
"""

from __future__ import annotations

import json
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from alignment.config import ConfigError, to_dict
from alignment.schema import DataSource
from pipelines.common import check_builtin, check_files, stage_main

DESCRIPTION = "Writes <output_dir>/eval.json, eval.md and eval.png: accuracy per category, length bias, calibration."


@dataclass
class Config(DataSource):
    # `builtin`: held-out preference pairs, category -> builder kwargs (data_recipes/preferences.py, held-out split);
    # `files`: local .jsonl / .parquet files of {prompt, chosen, rejected[, category]}.
    # The reward model directory (make rm's <output_dir>/final), with its tokenizer.
    reward_model: str = ""
    max_length: int = 256
    batch_size: int = 64
    calibration_bins: int = 10
    output_dir: str = "runs/rm_eval"
    seed: int = 0
    title: str = "Reward model evaluation"

    def __post_init__(self):
        super().__post_init__()
        if not self.reward_model:
            raise ValueError("reward_model: give the reward model directory (make rm's <output_dir>/final)")
        if self.calibration_bins < 2:
            raise ValueError(f"calibration_bins must be >= 2, got {self.calibration_bins}")


def main(argv: list[str] | None = None, stage: str = "eval-rm") -> int:
    return stage_main(argv, stage=stage)


def check(cfg: Config, source: str, produced: set) -> None:
    """Inputs, before any work: the reward model directory (with its tokenizer), pair files and categories."""
    path = Path(cfg.reward_model)
    if path not in produced and not (path / "tokenizer_config.json").is_file():
        why = "no tokenizer in it (no tokenizer_config.json)" if path.is_dir() else "does not exist"
        raise ConfigError(f"{source}: 'reward_model': '{path}' {why}; give a reward model directory (make rm)")
    check_files(cfg.files, source, "files")
    check_builtin(cfg.builtin, source, "builtin", registry="preferences")


def run(cfg: Config) -> dict:
    """The report; under a launcher the main process alone scores and writes it (there is nothing to shard: one
    pass over the held-out pairs), every rank returns its metrics."""
    from alignment.distributed import main_computes

    return main_computes(lambda: _report(cfg))


def _report(cfg: Config) -> dict:
    from alignment.reporting import write_json_atomic, write_text_atomic
    from data_recipes.preferences import build_preferences
    from pipelines.rm import tokenize_pairs
    from rewards.reward_model import RewardModel, pairwise_accuracy, score_pairs

    rows = build_preferences(cfg.builtin, cfg.seed, "heldout", cfg.files)
    rm = RewardModel(cfg.reward_model, batch_size=cfg.batch_size)
    rows, n_dropped = tokenize_pairs(rows, rm.tokenizer, cfg.max_length)
    if not rows:
        raise ValueError(f"no held-out pairs within max_length={cfg.max_length} tokens")
    chosen, rejected = score_pairs(rm.model, rows, rm.pad_token_id, cfg.batch_size)
    prompt_len = [_prompt_length(rm.tokenizer, r) for r in rows]
    len_c = [len(r["chosen_ids"]) - p for r, p in zip(rows, prompt_len)]
    len_r = [len(r["rejected_ids"]) - p for r, p in zip(rows, prompt_len)]

    metrics = {"reward_model": cfg.reward_model, "pairs": len(rows), "dropped_too_long": n_dropped}
    metrics.update(pairwise_accuracy(chosen, rejected, [r["category"] for r in rows]))
    metrics["length"] = length_metrics(chosen, rejected, len_c, len_r)
    metrics["calibration"] = calibration_metrics(chosen, rejected, cfg.calibration_bins, cfg.seed)
    metrics["safety_rule"] = _harmfulness_rule(rm, rows, Path(cfg.reward_model))
    metrics["config"] = to_dict(cfg)

    out = Path(cfg.output_dir)
    write_json_atomic(out / "eval.json", metrics)
    write_text_atomic(out / "eval.md", report_markdown(cfg.title, metrics))
    plot_report(metrics, chosen, rejected, len_c, len_r, out / "eval.png")
    print(f"[{cfg.title}] accuracy {metrics['accuracy']:.3f} "
          + " ".join(f"{k.split('/')[1]}={v:.3f}" for k, v in metrics.items() if k.startswith("accuracy/"))
          + f"; longer-rejected accuracy {metrics['length']['accuracy_longer_rejected']}; "
          f"ECE {metrics['calibration']['ece']:.3f}; wrote {out}/eval.{{json,md,png}}")
    return metrics


def _prompt_length(tokenizer, row) -> int:
    return len(tokenizer.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True,
                                             return_dict=True)["input_ids"])


def length_metrics(chosen, rejected, len_c, len_r) -> dict:
    """Length-bias figures (see the module docstring); accuracies are None where no pair qualifies.

    >>> m = length_metrics([2.0, 1.0], [1.0, 2.0], [5, 5], [3, 9])
    >>> m["accuracy_longer_rejected"], m["accuracy_longer_chosen"], m["prefer_longer_baseline"]
    (0.0, 1.0, 0.5)
    """
    from rewards.monitor import pearson

    def acc(pairs):
        return sum(c > r for c, r in pairs) / len(pairs) if pairs else None

    pairs = list(zip(chosen, rejected, len_c, len_r))
    longer_rejected = [(c, r) for c, r, lc, lr in pairs if lr > lc]
    longer_chosen = [(c, r) for c, r, lc, lr in pairs if lc > lr]
    baseline = sum(1.0 if lc > lr else 0.5 if lc == lr else 0.0 for _, _, lc, lr in pairs) / len(pairs)
    return {
        "corr_score_length": pearson(chosen + rejected, [float(n) for n in len_c + len_r]),
        "corr_margin_length_diff": pearson([c - r for c, r in zip(chosen, rejected)],
                                           [float(a - b) for a, b in zip(len_c, len_r)]),
        "accuracy_longer_rejected": acc(longer_rejected),
        "accuracy_longer_chosen": acc(longer_chosen),
        "pairs_longer_rejected": len(longer_rejected),
        "pairs_longer_chosen": len(longer_chosen),
        "prefer_longer_baseline": baseline,
        "mean_length_chosen": sum(len_c) / len(len_c),
        "mean_length_rejected": sum(len_r) / len(len_r),
    }


def calibration_metrics(chosen, rejected, bins: int = 10, seed: int = 0) -> dict:
    """ECE, Brier and log loss of the Bradley–Terry probabilities, pairs in random order.

    >>> m = calibration_metrics([0.0] * 4, [0.0] * 4, bins=2)
    >>> m["ece"], m["brier"]
    (0.0, 0.25)
    """
    rng = random.Random(f"calibration:{seed}")
    probs, labels = [], []
    for c, r in zip(chosen, rejected):
        first_is_chosen = rng.random() < 0.5
        a, b = (c, r) if first_is_chosen else (r, c)
        probs.append(1.0 / (1.0 + math.exp(-max(min(a - b, 50.0), -50.0))))
        labels.append(1.0 if first_is_chosen else 0.0)
    # with ties (p = 0.5 exactly) any outcome is as good as calibrated; count them as the half they predict
    n = len(probs)
    table = []
    ece = 0.0
    for k in range(bins):
        lo, hi = k / bins, (k + 1) / bins
        idx = [i for i, p in enumerate(probs) if lo <= p < hi or (k == bins - 1 and p == 1.0)]
        if not idx:
            continue
        conf = sum(probs[i] for i in idx) / len(idx)
        freq = sum(labels[i] if probs[i] != 0.5 else 0.5 for i in idx) / len(idx)
        ece += len(idx) / n * abs(conf - freq)
        table.append({"bin": [lo, hi], "count": len(idx), "mean_probability": conf, "frequency": freq})
    eps = 1e-12
    return {
        "ece": ece,
        "brier": sum((p - y) ** 2 for p, y in zip(probs, labels)) / n,
        "log_loss": -sum(y * math.log(p + eps) + (1 - y) * math.log(1 - p + eps) for p, y in zip(probs, labels)) / n,
        "reliability": table,
    }


def _harmfulness_rule(rm, rows, rm_dir: Path) -> dict | None:
    """Held-out accuracy of the safety handler's rule 2: RM(prompt, refusal) > refusal_threshold."""
    from rewards.safety import CANONICAL_REFUSAL, labelled_prompts

    meta = rm_dir / "reward_meta.json"
    labelled = labelled_prompts(rows)
    if not labelled or not meta.is_file():
        return None
    threshold = json.loads(meta.read_text())["refusal_threshold"]
    prompts = sorted(labelled)
    scores = rm.score(prompts, [CANONICAL_REFUSAL] * len(prompts))
    correct = [(s > threshold) == labelled[p] for s, p in zip(scores, prompts)]
    return {"refusal_threshold": threshold, "prompts": len(prompts), "accuracy": sum(correct) / len(correct)}


def report_markdown(title: str, m: dict) -> str:
    def f(x):
        return "n/a" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)

    lines = [f"# {title}", "", f"Reward model: `{m['reward_model']}`; {m['pairs']} held-out pairs.", "",
             "| category | pairs | pairwise accuracy |", "|---|---:|---:|",
             f"| **all** | {m['pairs']} | **{f(m['accuracy'])}** |",
             f"| mean over categories | | {f(m['accuracy_category_mean'])} |"]
    for category, count in m["pairs_per_category"].items():
        lines.append(f"| {category} | {count} | {f(m[f'accuracy/{category}'])} |")
    L = m["length"]
    lines += ["", "## Length bias", "", "| figure | value |", "|---|---:|",
              f"| r(score, length) over all responses | {f(L['corr_score_length'])} |",
              f"| r(score margin, length difference) within pairs | {f(L['corr_margin_length_diff'])} |",
              f"| accuracy where the longer answer is rejected ({L['pairs_longer_rejected']} pairs) | "
              f"{f(L['accuracy_longer_rejected'])} |",
              f"| accuracy where the longer answer is chosen ({L['pairs_longer_chosen']} pairs) | "
              f"{f(L['accuracy_longer_chosen'])} |",
              f"| 'prefer the longer answer' baseline | {f(L['prefer_longer_baseline'])} |",
              f"| mean length chosen / rejected (tokens) | {L['mean_length_chosen']:.1f} / "
              f"{L['mean_length_rejected']:.1f} |"]
    C = m["calibration"]
    lines += ["", "## Calibration (Bradley–Terry probability, pairs in random order)", "",
              f"ECE {f(C['ece'])}, Brier {f(C['brier'])}, log loss {f(C['log_loss'])}.", "",
              "| bin | pairs | mean p | observed |", "|---|---:|---:|---:|"]
    for row in C["reliability"]:
        lines.append(f"| {row['bin'][0]:.1f}–{row['bin'][1]:.1f} | {row['count']} | {row['mean_probability']:.3f} "
                     f"| {row['frequency']:.3f} |")
    if m.get("safety_rule"):
        s = m["safety_rule"]
        lines += ["", "## Safety handler's harmfulness rule", "",
                  f"RM(prompt, refusal) > {s['refusal_threshold']:.3f} classifies {s['prompts']} held-out prompts "
                  f"as harmful / benign with accuracy {f(s['accuracy'])}."]
    lines += ["", "Plot: eval.png (accuracy per category, score vs length, reliability diagram)."]
    return "\n".join(lines) + "\n"


def plot_report(m: dict, chosen, rejected, len_c, len_r, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from alignment.reporting import save_figure

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    cats = list(m["pairs_per_category"])
    axes[0].bar(["all"] + cats, [m["accuracy"]] + [m[f"accuracy/{c}"] for c in cats], color="tab:blue")
    axes[0].axhline(0.5, color="gray", ls="--", lw=1)
    axes[0].set_ylim(0, 1)
    axes[0].set_title("pairwise accuracy (held-out)")
    axes[1].scatter(len_c, chosen, s=8, alpha=0.5, label="chosen")
    axes[1].scatter(len_r, rejected, s=8, alpha=0.5, label="rejected")
    axes[1].set_xlabel("response length (tokens)")
    axes[1].set_ylabel("RM score")
    axes[1].set_title(f"score vs length (r = {m['length']['corr_score_length']:.2f})")
    axes[1].legend()
    table = m["calibration"]["reliability"]
    axes[2].plot([0, 1], [0, 1], color="gray", ls="--", lw=1)
    axes[2].plot([r["mean_probability"] for r in table], [r["frequency"] for r in table], marker="o")
    axes[2].set_xlabel("predicted P(first is chosen)")
    axes[2].set_ylabel("observed frequency")
    axes[2].set_title(f"reliability (ECE = {m['calibration']['ece']:.3f})")
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
