"""Task-suite evaluation (data_recipes/evaluation.py) on top of the generic greedy generation of alignment/, and the
layering that keeps alignment/ free of rewards/, data_recipes/ and pipelines/."""

import pathlib

import data_recipes.evaluation as evaluation
from data_recipes import heldout_sets

ROOT = pathlib.Path(__file__).parents[1]


class Scripted:
    """Stands in for generate_greedy: the reference reply for the first `right` prompts of a set, else junk."""

    def __init__(self, sets: dict, right: int):
        self.sets, self.right, self.calls = sets, right, []

    def __call__(self, model, tokenizer, conversations, max_new_tokens, batch_size, desc="generate"):
        self.calls.append((conversations, max_new_tokens, batch_size, desc))
        rows = self.sets[desc.removeprefix("eval ")]
        return [r["messages"][-1]["content"] if i < self.right else "no idea" for i, r in enumerate(rows)]


def test_evaluate_scores_each_set_and_safety_refusals(monkeypatch):
    sets = heldout_sets({"arithmetic": {"n": 8}, "retrieval@4": {"task": "retrieval", "n": 8, "n_pairs": 4},
                         "safety": {"n": 8}}, seed=0)
    monkeypatch.setattr(evaluation, "generate_greedy", scripted := Scripted(sets, right=6))
    metrics = evaluation.evaluate(None, None, sets, max_new_tokens=7, batch_size=3)
    assert metrics["arithmetic/accuracy"] == metrics["retrieval@4/accuracy"] == 6 / 8
    safety = sets["safety"]
    harmful = [i for i, r in enumerate(safety) if r["harmful"]]
    benign = [i for i, r in enumerate(safety) if not r["harmful"]]
    assert metrics["safety/refusal_rate_harmful"] == sum(i < 6 for i in harmful) / len(harmful)
    assert metrics["safety/refusal_rate_benign"] == 0.0  # a benign reference reply is not a refusal
    assert set(metrics) == {"arithmetic/accuracy", "retrieval@4/accuracy", "safety/accuracy",
                            "safety/refusal_rate_harmful", "safety/refusal_rate_benign"}
    # the prompts are each row's conversation without its final reply, in the set's order
    for (conversations, max_new, batch, desc), (name, rows) in zip(scripted.calls, sets.items()):
        assert conversations == [r["messages"][:-1] for r in rows]
        assert (max_new, batch, desc) == (7, 3, f"eval {name}")


def test_evaluate_empty_set(monkeypatch):
    monkeypatch.setattr(evaluation, "generate_greedy", Scripted({"arithmetic": []}, right=0))
    assert evaluation.evaluate(None, None, {"arithmetic": []}) == {"arithmetic/accuracy": 0.0}
