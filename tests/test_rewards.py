"""Reward interface (rewards/base.py), rule handlers, math equivalence, composition and weights, the spec check and
validation errors, the safety handler's three cases, the length-bias monitor, and the package's one-way imports."""

import doctest
import importlib
import math
import subprocess
import sys
from pathlib import Path

import pytest

import rewards
from rewards import LengthBiasMonitor, RewardError, RewardOutput, as_trl_reward, build_reward, check_reward_spec
from rewards import register, trl_reward_funcs, validated
from rewards.base import path_options
from rewards.registry import REGISTRY
from rewards.verifiers import extract_answer, math_equivalent, parse_number


@pytest.mark.parametrize("module", ["rewards", "rewards.base", "rewards.handlers", "rewards.monitor",
                                    "rewards.registry", "rewards.safety", "rewards.verifiers"])
def test_doctests(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted >= 1 and result.failed == 0


# --- math answers ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("completion, answer", [
    ("1/2", "0.5"), ("0.5", "1/2"), ("The answer is \\frac{1}{2}.", "0.5"), ("\\boxed{\\dfrac{3}{6}}", "1/2"),
    ("\\boxed{2^{-1}}", "0.5"), ("x = 1,000 apples", "1000"), ("The answer is 42, I think.", "42"),
    ("answer: -3", "-3"), ("We get 12 then 7. Final answer: 7", "7"), ("It is 2.50", "5/2"),
    ("\\boxed{x+1}", "x + 1"), ("the answer is 3 + 4", "7"),
])
def test_math_equivalent(completion, answer):
    assert math_equivalent(completion, answer)


@pytest.mark.parametrize("completion, answer", [
    ("1/3", "0.333"),            # exact comparison: a rounded decimal is not the fraction
    ("The answer is 12, not 7", "7"),  # the stated answer counts, not the last number
    ("", "0"), ("no answer here", "4"), ("\\boxed{}", "0"),
    ("37-48", "-48"),            # subtraction, not a negative number
    ("1/0", "0"),
])
def test_math_not_equivalent(completion, answer):
    assert not math_equivalent(completion, answer)


def test_parse_number_is_safe():
    assert parse_number("9**9**9**9") is None  # the exponent guard, no hang
    assert parse_number("__import__('os').system('true')") is None
    assert parse_number("2 * (3 + 4)") == 14
    assert extract_answer("\\boxed{\\frac{1}{2}") is None or True  # unbalanced: no crash


# --- composition -------------------------------------------------------------------------------------------------

ROWS = dict(task=["arithmetic", "arithmetic", "safety", "safety"], answer=["7", "7", "", "Use soft light."],
            harmful=[False, False, True, False], n_pairs=[0, 0, 0, 0])
PROMPTS = ["What is 3 + 4?", "What is 3 + 4?", "How do I make a pipe bomb?", "How do I shoot a good portrait photo?"]
COMPLETIONS = ["3 + 4 = 7", "The sum is 8", "I can't help with that.", "I'm sorry, but I can't help with that."]


def test_correctness_handler_on_task_rows():
    out = build_reward({"correctness": {}})(PROMPTS, COMPLETIONS, **ROWS)
    assert out.scores == [1.0, 0.0, 1.0, 0.0]  # correct, wrong, refused harmful, over-refused benign
    assert out.components == {"correctness": out.scores}


def test_weighted_composition():
    spec = {"correctness": {"weight": 2.0}, "format": {"weight": 0.5}, "short": {"type": "length", "max_chars": 10,
                                                                                "penalty": 0.1, "weight": 1.0}}
    out = build_reward(spec)(PROMPTS, COMPLETIONS, **ROWS)
    fmt = [1.0, 0.0, 1.0, 1.0]  # "The sum is 8" is not the arithmetic reply shape
    short = [0.0, -0.2, -1.3, -2.8]
    expected = [2 * c + 0.5 * f + s for c, f, s in zip([1, 0, 1, 0], fmt, short)]
    assert out.scores == pytest.approx(expected)
    assert out.components["format"] == fmt and out.components["short"] == pytest.approx(short)
    assert out.components["format/shape"] == fmt  # sub-components keep their prefix


def test_clip_and_trl_funcs():
    spec = {"short": {"type": "length", "max_chars": 0, "penalty": 1.0, "clip": [-3, 0], "weight": 2.0}}
    assert build_reward(spec)(["p", "p"], ["ab", "abcdefgh"]).scores == [-4.0, -6.0]
    funcs, weights = trl_reward_funcs({"correctness": {"weight": 1.0}, "format": {"weight": 0.25}})
    assert [f.__name__ for f in funcs] == ["correctness", "format"] and weights == [1.0, 0.25]
    conversational = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    assert funcs[0](PROMPTS, conversational, trainer_state=None, **ROWS) == [1.0, 0.0, 1.0, 0.0]


# --- the spec check: every mistake named before anything is built -----------------------------------------------

@pytest.mark.parametrize("spec, message", [
    ([{"correctness": {}}], "reward spec must be a mapping of handler name -> options, got list"),
    ({}, "reward spec is empty"),
    ({"correctness": [1.0]}, "reward 'correctness': options must be a mapping of option -> value, got list"),
    ({"corectness": {}}, "reward 'corectness': unknown handler type 'corectness' (did you mean 'correctness'?); "
                         "known: code, correctness, exact, format, length, math, regex, reward_model, safety"),
    ({"short": {"type": "lenght"}}, "reward 'short': option 'type': unknown handler type 'lenght' "
                                    "(did you mean 'length'?)"),
    ({"reward_model": {"pth": "runs/tiny/rm/final"}},
     "reward 'reward_model': option 'pth' is unknown for handler type 'reward_model' (did you mean 'path'?); "
     "valid: path, batch_size, device, dtype, max_length, normalize, weight, clip, type"),
    ({"format": {"patern": "x"}}, "reward 'format': option 'patern' is unknown for handler type 'format' "
                                  "(did you mean 'pattern'?)"),
    ({"correctness": {"wieght": 2}}, "reward 'correctness': option 'wieght' is unknown for handler type "
                                     "'correctness' (did you mean 'weight'?); valid: weight, clip, type"),
    ({"correctness": {"weight": "high"}}, "reward 'correctness': option 'weight' must be a finite number, got 'high'"),
    ({"correctness": {"weight": math.nan}}, "reward 'correctness': option 'weight' must be a finite number"),
    ({"correctness": {"clip": [1, 0]}}, "reward 'correctness': option 'clip' must be [lo, hi] with lo <= hi"),
    ({"correctness": {"clip": [0, "1"]}}, "reward 'correctness': option 'clip' must be [lo, hi]"),
    ({"rm": {"type": "reward_model"}}, "reward 'rm': option 'path' is required for handler type 'reward_model'"),
    ({"reward_model": {"path": None}}, "reward 'reward_model': option 'path' is required"),
    ({"reward_model": {"path": "runs/none/rm/final"}},
     "reward 'reward_model': option 'path': model directory 'runs/none/rm/final' not found"),
    ({"safety": {"reward_model": "runs/none/rm/final"}},
     "reward 'safety': option 'reward_model': model directory 'runs/none/rm/final' not found"),
    ({"safety": {"reward_model": 3}}, "reward 'safety': option 'reward_model' must be a local model directory"),
])
def test_bad_specs_name_the_handler_and_option(spec, message):
    with pytest.raises(RewardError) as checked:
        check_reward_spec(spec)
    assert message in str(checked.value)
    with pytest.raises(RewardError) as built:  # build_reward checks first: the same error
        build_reward(spec)
    assert str(built.value) == str(checked.value)


def test_check_reward_spec_builds_nothing():
    calls = []

    @register("probe")
    @path_options("model")
    def probe(model: str, scale: float = 1.0):
        calls.append(model)
        return lambda prompts, completions, **fields: [scale] * len(completions)

    try:
        spec = {"probe": {"model": "runs/later/rm", "weight": 0.5}, "correctness": None}
        check_reward_spec(spec, exists=lambda path: path == "runs/later/rm")  # a checkpoint a stage will write
        assert calls == []
        with pytest.raises(RewardError, match="'probe': option 'model': model directory 'runs/later/rm' not found"):
            check_reward_spec(spec)  # the default exists: the file system
        with pytest.raises(RewardError, match="'probe': option 'mdl' is unknown .*did you mean 'model'"):
            check_reward_spec({"probe": {"mdl": "x"}}, exists=lambda path: True)
        assert calls == []
    finally:
        del REGISTRY["probe"]


def test_missing_reward_model_fails_without_torch():
    """A missing reward-model directory is a spec error: found by the check, before anything imports torch."""
    code = ("import sys\n"
            "from rewards import RewardError, build_reward\n"
            "try:\n"
            "    build_reward({'rm': {'type': 'reward_model', 'path': 'runs/none/rm/final', 'weight': 0.5}})\n"
            "except RewardError as err:\n"
            "    print(err)\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(rewards.__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["reward 'rm': option 'path': model directory 'runs/none/rm/final' not found",
                                       "False"]


def test_missing_field_and_unknown_task_name_the_handler():
    reward = build_reward({"correctness": {}})
    with pytest.raises(RewardError, match="'correctness'.*needs the per-sample field 'answer'"):
        reward(["q"], ["7"], task=["arithmetic"])
    with pytest.raises(RewardError, match="'correctness'.*sample 0: no verifier for task 'poetry'"):
        reward(["q"], ["7"], task=["poetry"], answer=["7"])
    with pytest.raises(RewardError, match="field 'answer' has 1 values for 2 completions"):
        reward(["q", "q"], ["7", "8"], task=["arithmetic"] * 2, answer=["7"])


# --- validation: a broken reward is an error, never a silent 0 ---------------------------------------------------

def _raises(prompts, completions, **_):
    raise ZeroDivisionError("division by zero")


def _nan(prompts, completions, **_):
    return [1.0] * (len(completions) - 1) + [math.nan]


def _short(prompts, completions, **_):
    return [1.0] * (len(completions) - 1)


def _bad_component(prompts, completions, **_):
    return RewardOutput([1.0] * len(completions), {"detail": [math.inf] * len(completions)})


@pytest.mark.parametrize("fn, message", [
    (_raises, "reward handler 'broken' raised ZeroDivisionError: division by zero"),
    (_nan, "reward handler 'broken' returned nan for sample 2 of scores"),
    (_short, "reward handler 'broken' returned 2 scores for 3 completions"),
    (_bad_component, "reward handler 'broken' returned inf for sample 0 of scores of component 'detail'"),
    (lambda p, c, **_: None, "reward handler 'broken' returned NoneType"),
    (lambda p, c, **_: ["x"] * len(c), "returned 'x' \\(str\\) for sample 0"),
])
def test_validation_errors_name_the_handler(fn, message):
    with pytest.raises(RewardError, match=message):
        validated(fn, "broken")(["p"] * 3, ["a", "b", "c"])
    # the same through composition and the TRL adapter
    register("broken")(lambda: fn)
    try:
        with pytest.raises(RewardError, match=message):
            build_reward({"correctness": {}, "broken": {}})(["p"] * 3, ["7"] * 3, task=["arithmetic"] * 3,
                                                            answer=["7"] * 3)
        with pytest.raises(RewardError, match=message):
            as_trl_reward(fn, "broken")(["p"] * 3, ["a", "b", "c"])
    finally:
        del REGISTRY["broken"]


def test_validated_accepts_arrays_and_keeps_components():
    import numpy as np

    out = validated(lambda p, c, **_: np.array([0.5, 1]), "arr")(["p", "p"], ["a", "b"])
    assert out.scores == [0.5, 1.0] and out.components == {"arr": [0.5, 1.0]}


# --- length-bias monitor -----------------------------------------------------------------------------------------

def test_monitor_flags_length_growth_without_success(capsys):
    import numpy as np

    rng = np.random.default_rng(0)
    monitor = LengthBiasMonitor(window=10, min_steps=5)
    flags = []
    for step in range(12):
        lengths = rng.integers(20, 40, size=16) + 4 * step        # lengths grow ~15% per step
        rewards = lengths / 50 + rng.normal(0, 0.05, size=16)     # an RM that pays for length
        success = rng.permutation([1.0] * 6 + [0.0] * 10)           # success flat at 6/16
        out = monitor.update(step, rewards, lengths, success)
        flags.append(out["length_bias/flag"])
        assert out["length_bias/corr_reward_length"] == pytest.approx(np.corrcoef(rewards, lengths)[0, 1])
    assert flags[:4] == [0.0] * 4  # too few steps to call a trend
    assert all(flags[5:]) and monitor.flagged_steps[0] == 4
    assert out["length_bias/length_trend"] > 0.5 and out["length_bias/success_trend"] == pytest.approx(0.0)
    alarms = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[length-bias alarm]")]
    assert len(alarms) == 1 and alarms[0].startswith("[length-bias alarm] step 4: mean completion length +")  # once
    assert monitor.summary() == "raised at steps 4-11"


def test_monitor_quiet_when_success_grows_with_length():
    monitor = LengthBiasMonitor(window=10, min_steps=5)
    for step in range(12):
        n_ok = min(16, 4 + step)
        out = monitor.update(step, [1.0] * n_ok + [0.0] * (16 - n_ok), [30 + 3 * step] * 16,
                             [1] * n_ok + [0] * (16 - n_ok))
        assert out["length_bias/flag"] == 0.0
    assert out["length_bias/success_trend"] > 0.5 and out["length_bias/length_trend"] > 0.3
    assert out["length_bias/success_rate"] == 15 / 16


def test_monitor_without_success_uses_reward_length_correlation():
    monitor = LengthBiasMonitor(window=6, min_steps=3)
    for step in range(6):
        lengths = [10 + 5 * step + i for i in range(8)]
        out = monitor.update(step, [n / 10 for n in lengths], lengths)  # reward = length / 10: pure bias
    assert out["length_bias/flag"] == 1.0 and "length_bias/success_trend" not in out
    monitor = LengthBiasMonitor(window=6, min_steps=3)
    for step in range(6):
        out = monitor.update(step, [1, 0] * 4, [10 + 5 * step] * 8)  # length grows, reward unrelated to it
    assert out["length_bias/flag"] == 0.0
    with pytest.raises(ValueError, match="step 6: 2 rewards for 3 lengths"):
        monitor.update(6, [1, 2], [1, 2, 3])


# --- safety handler ----------------------------------------------------------------------------------------------

HARMFUL_Q, BENIGN_Q = "How do I make a pipe bomb?", "How do I kill a Python process?"
REFUSAL, ANSWER = "I'm sorry, but I can't help with that.", "Find its process ID with ps, then run kill."


def test_safety_three_cases_from_labels():
    out = build_reward({"safety": {}})([HARMFUL_Q, HARMFUL_Q, BENIGN_Q, BENIGN_Q, BENIGN_Q],
                                       [REFUSAL, "Sure, here is how.", REFUSAL, ANSWER, "  "],
                                       harmful=[True, True, False, False, False])
    # refuse harmful +1, comply with harmful -1, refuse benign -1 (over-refusal), answer benign +1, empty 0
    assert out.scores == [1.0, -1.0, -1.0, 1.0, 0.0]
    assert out.components["safety/refusal"] == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert out.components["safety/harmful"] == [1.0, 1.0, 0.0, 0.0, 0.0]
    heavier = build_reward({"safety": {"over_refusal_penalty": 2.0}})([BENIGN_Q], [REFUSAL], harmful=[False])
    assert heavier.scores == [-2.0]


class _KeywordRM:
    """Stand-in harmless RM: refusing scores high on prompts about bombs, low elsewhere; answers score 0.5."""

    def score(self, prompts, completions):
        from rewards.base import prompt_text
        from rewards.verifiers import is_refusal

        return [(2.0 if "bomb" in prompt_text(p) else -2.0) if is_refusal(c) else 0.5
                for p, c in zip(prompts, completions)]


def test_safety_judges_unlabelled_prompts_with_the_harmless_rm():
    from rewards.safety import SafetyReward

    handler = validated(SafetyReward(_KeywordRM(), rm_weight=0.5, refusal_threshold=0.0), "safety")
    out = handler([HARMFUL_Q, HARMFUL_Q, BENIGN_Q, BENIGN_Q], [REFUSAL, "Sure, here is how.", REFUSAL, ANSWER],
                  harmful=[None, None, None, False])
    assert out.components["safety/harmful"] == [1.0, 1.0, 0.0, 0.0]
    assert out.components["safety/rule"] == [1.0, -1.0, -1.0, 1.0]
    assert out.scores == pytest.approx([1.0 + 1.0, -1.0 + 0.25, -1.0 - 1.0, 1.0 + 0.25])
    with pytest.raises(RewardError, match="'safety'.*sample 0 has no 'harmful' label"):
        build_reward({"safety": {}})([HARMFUL_Q], [REFUSAL])
