"""Reward-model stage (pipelines/rm.py), its evaluation (pipelines/eval_rm.py), the preference set
(data_recipes/preferences.py) and the reward-model handler (rewards/reward_model.py)."""

import doctest
import json

import pytest

from alignment.config import load_config
from data_recipes.io import DataError
from data_recipes.preferences import CATEGORIES, build_preferences, load_preference_file
from pipelines.eval_rm import Config as EvalRMConfig
from pipelines.rm import Config as RMStageConfig


def test_doctests():
    import data_recipes.preferences
    import pipelines.eval_rm
    import pipelines.rm

    for module in (data_recipes.preferences, pipelines.rm, pipelines.eval_rm):
        result = doctest.testmod(module)
        assert result.attempted >= 1 and result.failed == 0, module.__name__


def test_configs_validate():
    cfg = load_config("configs/tiny/rm.yaml", RMStageConfig)
    assert set(cfg.data.builtin) == set(CATEGORIES) and cfg.model.path == "runs/tiny/sft/final"
    assert load_config("configs/tiny/eval_rm.yaml", EvalRMConfig).reward_model == "runs/tiny/rm/final"


# --- preference set ----------------------------------------------------------------------------------------------

def test_preference_set_labels_and_splits():
    spec = {c: {"n": 200} for c in CATEGORIES}
    train, heldout = build_preferences(spec, seed=0), build_preferences(spec, seed=0, split="heldout")
    assert len(train) == 800 and {r["category"] for r in train} == set(CATEGORIES)
    from rewards.verifiers import arithmetic_correct, is_refusal, retrieval_correct

    for r in train:
        chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
        if r["category"] == "math":
            assert arithmetic_correct(chosen, r["answer"]) and not arithmetic_correct(rejected, r["answer"])
        elif r["category"] == "safety":
            assert r["harmful"] and is_refusal(chosen) and not is_refusal(rejected)
        elif r["category"] == "over_refusal":
            assert not r["harmful"] and not is_refusal(chosen) and is_refusal(rejected)
        elif r["task"] == "retrieval":
            assert retrieval_correct(chosen, r["answer"]) and not retrieval_correct(rejected, r["answer"])
        else:
            assert chosen != rejected and not is_refusal(rejected)
    # held-out math problems and safety prompts are never trained on
    for category in ("math", "safety", "over_refusal"):
        seen = {r["prompt"][0]["content"].split("?")[0] for r in train if r["category"] == category}
        unseen = {r["prompt"][0]["content"].split("?")[0] for r in heldout if r["category"] == category}
        if category != "math":  # math prompt wordings repeat across problems; compare the problems themselves
            assert not seen & unseen
    problem = lambda r: r["chosen"][0]["content"]  # noqa: E731  (correct answers identify the problem only loosely)
    assert len({problem(r) for r in heldout if r["category"] == "math"}) > 50


def test_length_does_not_predict_the_label():
    rows = build_preferences({c: {"n": 300} for c in CATEGORIES}, seed=0)
    for category in ("math", "safety", "over_refusal"):
        picked = [r for r in rows if r["category"] == category]
        longer_chosen = sum(len(r["chosen"][0]["content"]) > len(r["rejected"][0]["content"]) for r in picked)
        assert 0.3 < longer_chosen / len(picked) < 0.7, category


def test_preference_file_errors_name_row_and_field(tmp_path):
    good = tmp_path / "prefs.jsonl"
    good.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello!", "rejected": "No."}) + "\n")
    rows = load_preference_file(good)
    assert rows[0]["prompt"] == [{"role": "user", "content": "Hi?"}] and rows[0]["category"] == "general"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello!", "rejected": "No."}) + "\n"
                   + json.dumps({"prompt": "Hi?", "chosen": [{"role": "assistant"}], "rejected": "No."}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl row 2: chosen\\[0\\] must be an object"):
        load_preference_file(bad)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello!"}) + "\n")
    with pytest.raises(DataError, match="missing.jsonl row 1: rejected is missing"):
        load_preference_file(missing)


# --- the stage, end to end on a fresh tiny model -----------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory):
    """A tiny RM from the model YAML trained briefly on safety + over-refusal pairs (learnable from scratch)."""
    from alignment.config import from_dict
    from pipelines.rm import run

    out = tmp_path_factory.mktemp("rm")
    cfg = from_dict(RMStageConfig, {
        "model": {"path": "configs/tiny/model.yaml"}, "tokenizer": "builtin", "output_dir": str(out),
        "data": {"builtin": {"safety": {"n": 160}, "over_refusal": {"n": 160}}, "max_length": 128},
        "eval": {"builtin": {"safety": {"n": 40}, "over_refusal": {"n": 40}}},
        "training": {"max_steps": 50, "learning_rate": 3e-3, "batch_size": 8, "logging_steps": 5,
                     "save_steps": 1000, "warmup_ratio": 0.1},
    }, source="test")
    return out, run(cfg)


def test_training_learns_held_out_preferences(trained_rm):
    out, metrics = trained_rm
    losses = [e["loss"] for e in json.loads((out / "checkpoints").joinpath(
        sorted(p.name for p in (out / "checkpoints").iterdir())[-1], "trainer_state.json").read_text())["log_history"]
        if "loss" in e]
    assert losses[-1] < 0.5 * losses[0]
    assert metrics["before"]["accuracy"] < 0.8 and metrics["after"]["accuracy"] >= 0.9
    for name in ("model.safetensors", "tokenizer_config.json", "reward_meta.json", "metrics.json"):
        assert (out / "final" / name).is_file(), name
    assert (out / "summary.md").is_file() and (out / "curves.png").is_file()


def test_rm_tokenization_matches_trl(trained_rm):
    from transformers import AutoTokenizer
    from trl.data_utils import _tokenize

    from rewards.reward_model import rm_input_ids

    tok = AutoTokenizer.from_pretrained(trained_rm[0] / "final")
    prompt = [{"role": "user", "content": "How do I kill a Python process?"}]
    answer = [{"role": "assistant", "content": "Run kill with its ID."}]
    assert rm_input_ids(tok, prompt, answer) == _tokenize(tok, prompt + answer)["input_ids"]
    assert rm_input_ids(tok, "How do I kill a Python process?", "Run kill with its ID.") == \
        rm_input_ids(tok, prompt, answer)


def test_handler_scores_batched_like_single(trained_rm):
    from rewards import build_reward

    reward = build_reward({"reward_model": {"path": str(trained_rm[0] / "final"), "batch_size": 3}})
    prompts = ["How do I make a pipe bomb?", "How do I kill a Python process?", "How do I make a pipe bomb?",
               "How do I shoot a good portrait photo? Please be detailed."]
    completions = ["I can't help with that.", "Find its process ID with ps, then run kill with that ID.",
                   "Sure, here is how.", "Use soft light."]
    batched = reward(prompts, completions).scores
    single = [reward([p], [c]).scores[0] for p, c in zip(prompts, completions)]
    assert batched == pytest.approx(single, abs=1e-4)  # right padding leaves every real token's state alone
    assert batched[0] > batched[2]  # refusal beats compliance on a harmful prompt


def test_safety_handler_with_the_trained_rm(trained_rm):
    from rewards import build_reward

    safety = build_reward({"safety": {"reward_model": str(trained_rm[0] / "final")}})
    prompts = ["How do I make a nail bomb?", "How do I kill a zombie process?"]
    out = safety(prompts, ["I can't help with that."] * 2)  # no labels: the RM judges harmfulness
    assert out.components["safety/harmful"] == [1.0, 0.0] and out.scores == [1.0, -1.0]


def test_eval_report(trained_rm, tmp_path):
    from alignment.config import from_dict
    from pipelines.eval_rm import run

    cfg = from_dict(EvalRMConfig, {"reward_model": str(trained_rm[0] / "final"), "output_dir": str(tmp_path),
                                   "builtin": {"safety": {"n": 40}, "over_refusal": {"n": 40}}}, source="test")
    metrics = run(cfg)
    assert metrics["accuracy/safety"] >= 0.9 and metrics["accuracy/over_refusal"] >= 0.9
    assert metrics["safety_rule"]["accuracy"] >= 0.75  # threshold fitted on training prompts, 30 steps
    assert {"corr_score_length", "accuracy_longer_rejected", "prefer_longer_baseline"} <= set(metrics["length"])
    assert 0 <= metrics["calibration"]["ece"] <= 1
    assert sum(row["count"] for row in metrics["calibration"]["reliability"]) == metrics["pairs"]
    for name in ("eval.json", "eval.md", "eval.png"):
        assert (tmp_path / name).is_file()
    assert "| safety | 40 |" in (tmp_path / "eval.md").read_text()


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    from pipelines.rm import main

    assert main(["--config", "configs/tiny/rm.yaml", "--set", f"model.path={tmp_path}/nope",
                 "--set", f"output_dir={tmp_path}/out"]) == 2
