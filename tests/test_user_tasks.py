"""Your own tasks in GRPO and evaluation, without training: prompt files checked against the fields the verifiers
read (missing field, wrong type, unknown verifier: one `error:` line naming file / row / key, exit code 2, nothing
written), the verifiers' scores on hand-made completions, the live pool's refresh rules, the method defaults.
(The run a pool file drives end to end is tests/test_grpo.py::test_user_pool_file_drives_grpo_band_and_evaluation.)"""

import json
from pathlib import Path

import pytest

from alignment.config import load_config
from alignment.rollout.base import SamplingOptions
from data_recipes import DataError
from data_recipes.evaluation import load_eval_files
from data_recipes.prompt_pool import LivePool, load_pool_files, pool_row
from pipelines.grpo import Config as GRPOConfig, main as grpo_main
from rewards import RewardError, Verifier, check_reward_spec, spec_fields

BASE = "configs/tiny/base"  # a checkpoint directory with its tokenizer: what the checks need; nothing trains here


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def grpo_yaml(tmp_path: Path, pool: Path, reward: str = "{math: {fields: {answer: solution}}}", extra: str = ""):
    path = tmp_path / "grpo.yaml"
    path.write_text(f"""
output_dir: {tmp_path / "out"}
model: {{path: {BASE}}}
prompts: {{files: [{pool}], k: 2}}
reward: {reward}
num_generations: 2
training: {{max_steps: 1, batch_size: 2}}
{extra}""")
    return path


GOOD = [{"prompt": "Tom has 3 apples and buys 4. How many?", "solution": 7, "level": "easy"},
        {"messages": [{"role": "user", "content": "What is 10 - 4?"}, {"role": "assistant", "content": "6"}],
         "solution": "6"}]


@pytest.mark.parametrize("rows, reward, fragments", [
    ([GOOD[0], {"prompt": "What is 2 + 2?", "level": "easy"}], None,
     ["pool.jsonl row 2", "'solution' is missing", "reward 'math'", "as its 'answer' field"]),
    ([GOOD[0], {"prompt": "What is 2 + 2?", "solution": [4]}], None,
     ["pool.jsonl row 2", "'solution' is list", "reward 'math'", "expects a string or a number"]),
    ([{"prompt": "Write f.", "tests": "assert f() == 1"}, {"prompt": "Write g.", "tests": 3}], "{code: {}}",
     ["pool.jsonl row 2", "'tests' is int", "reward 'code'", "list of strings"]),
    (GOOD, "{maths: {}}", ["grpo.yaml", "'reward'", "unknown handler type 'maths'", "did you mean 'math'"]),
    ([GOOD[0], {"solution": 3}], None, ["pool.jsonl row 2", "prompt is missing"]),
])
def test_bad_pool_rows_and_verifiers_fail_before_training(tmp_path, capsys, rows, reward, fragments):
    pool = write_jsonl(tmp_path / "pool.jsonl", rows)
    path = grpo_yaml(tmp_path, pool, **({"reward": reward} if reward else {}))
    assert grpo_main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])
    assert not (tmp_path / "out").exists()


def test_unknown_verifier_and_bad_eval_file_name_their_key(tmp_path, capsys):
    pool = write_jsonl(tmp_path / "pool.jsonl", GOOD)
    path = grpo_yaml(tmp_path, pool, extra="prompts: {files: [%s], verifier: {exactly: {}}}" % pool)
    assert grpo_main(["--config", str(path)]) == 2
    assert "'prompts.verifier': reward 'exactly': unknown handler type 'exactly' (did you mean 'exact'?)" in \
        capsys.readouterr().err
    held = write_jsonl(tmp_path / "held.jsonl", [{"prompt": "What is 1 + 1?", "label": "2"}, {"prompt": "Hi"}])
    path = grpo_yaml(tmp_path, pool, extra="eval: {files: {mine: {path: %s, verifier: "
                                           "{exact: {fields: {answer: label}}}}}}" % held)
    assert grpo_main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "held.jsonl row 2: 'label' is missing; reward 'exact' reads it as its 'answer' field" in err, err
    path = grpo_yaml(tmp_path, pool, extra="eval: {files: {mine: {path: %s, verifer: {exact: {}}}}}" % held)
    assert grpo_main(["--config", str(path)]) == 2
    assert "'eval.files.mine.verifer' is unknown (did you mean 'verifier'?)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_pool_rows_keep_their_fields_and_read_numbers_as_text(tmp_path):
    pool = write_jsonl(tmp_path / "pool.jsonl", GOOD)
    rows = load_pool_files([str(pool)], spec_fields({"math": {"fields": {"answer": "solution"}}}))
    assert rows[0] == {"prompt": [{"role": "user", "content": GOOD[0]["prompt"]}], "solution": "7", "level": "easy"}
    assert rows[1]["prompt"] == [{"role": "user", "content": "What is 10 - 4?"}]  # the reply is not part of it
    with pytest.raises(DataError, match="f.jsonl row 4: prompt has no user turn"):
        pool_row({"prompt": [{"role": "system", "content": "x"}]}, "f.jsonl row 4")


def test_verifiers_score_what_a_user_expects():
    rows = [{"answer": "1/2"}, {"answer": "7"}, {"answer": "7"}, {"answer": "12"}]
    got = Verifier({"math": {}})(["q"] * 4, ["so \\boxed{0.5}", "The answer is 7.", "I think 8", "1,2 then 12"], rows)
    assert got == [1.0, 1.0, 0.0, 1.0]  # boxed, "answer is", wrong, last number
    assert Verifier({"exact": {"fields": {"answer": "label"}}})(
        ["q"] * 2, ["Positive.", "negative"], [{"label": "positive"}, {"label": "positive"}]) == [1.0, 0.0]
    assert Verifier({"regex": {"pattern": r"^\d+$", "full": True}})(["q"] * 2, [" 42 ", "42 apples"], [{}, {}]) == \
        [1.0, 0.0]
    # weighted composition, clipped to [0, 1]: 0.8 correct + 0.2 format-of-its-own regex
    mix = Verifier({"math": {"weight": 0.8}, "regex": {"weight": 0.2, "pattern": "answer is"}})
    assert mix(["q"] * 3, ["The answer is 7", "7", "The answer is 8"], [{"answer": "7"}] * 3) == \
        pytest.approx([1.0, 0.8, 0.2])
    # safety needs `harmful` without a harmless RM; with labels: refusing a harmful prompt passes, a benign fails
    assert [f for _, f, _, _ in spec_fields({"safety": {}})] == ["harmful"]
    assert Verifier({"safety": {}})(["bomb?", "kill a process?"], ["I can't help with that."] * 2,
                                    [{"harmful": True}, {"harmful": False}]) == [1.0, 0.0]
    with pytest.raises(RewardError, match="option 'fields': 'answr' is not a field handler type 'math' reads"):
        check_reward_spec({"math": {"fields": {"answr": "solution"}}})


def test_code_verifier_is_the_per_test_pass_rate_in_the_jail():
    tests = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 5"]
    got = Verifier({"code": {"workers": 2}})(
        ["q"] * 2, ["```python\ndef add(a, b):\n    return a + b\n```", "def add(a, b): return 0"],
        [{"tests": tests}, {"tests": tests}])
    assert got == pytest.approx([2 / 3, 1 / 3])  # the third test is wrong for both; 0 + 0 == 0 passes for one


def test_eval_files_keep_first_n_rows_and_their_verifier(tmp_path):
    held = write_jsonl(tmp_path / "held.jsonl", [{"prompt": f"q{i}", "answer": i} for i in range(5)])
    sets = load_eval_files({"mine": {"path": str(held), "verifier": {"math": {}}, "n": 3, "max_new_tokens": 40}})
    assert [r["answer"] for r in sets["mine"].rows] == ["0", "1", "2"]
    assert sets["mine"].verifier == {"math": {}} and sets["mine"].max_new_tokens == 40


def test_live_pool_retires_out_of_band_prompts_for_remeasured_ones():
    kept = [{"q": c, "pass_rate": 0.5} for c in "abc"]
    reserve = [{"q": c, "pass_rate": 0.0} for c in "xyz"]
    pool = LivePool(kept, reserve, lo=0.0, hi=0.9, every=2, measure=2)
    assert [pool.row(s)["q"] for s in range(3)] == ["a", "b", "c"] and pool.row(1)["pool_slot"] == 1
    pool.observe([0, 0, 1, 1, 2, 2], [1, 1, 0, 1, 0, 0], group_size=2)  # a solved, b moderate, c unsolved
    assert not pool.due(1) and pool.due(2)
    asked = []

    def measure(rows):
        asked.extend(r["q"] for r in rows)
        return [0.5, 1.0]  # x in the band now, y solved

    m = pool.refresh(measure, step=2)
    assert asked == ["x", "y"] and not pool.due(2)
    assert m == {"pool/out_of_band": 2.0, "pool/admitted": 1.0, "pool/measured": 2.0, "pool/reserve": 1.0}
    assert [pool.row(s)["q"] for s in range(3)] == ["x", "b", "c"]  # a retired; c stays: no second replacement
    assert [pool.rows[i]["q"] for i in pool.reserve] == ["z"] and sorted(pool.rows[i]["q"] for i in pool.solved) \
        == ["a", "y"]
    d = pool.distribution()
    assert d["pool/rate_mean"] == pytest.approx((0.5 + 0.5 + 0.0) / 3) and d["pool/in_band_frac"] == pytest.approx(2 / 3)
    again = LivePool(kept, reserve, 0.0, 0.9, 2, 2)
    again.load_state_dict(json.loads(json.dumps(pool.state_dict())))
    assert again.state_dict() == pool.state_dict() and again.row(0)["q"] == "x"


def test_method_defaults_make_the_minimax_rules_live():
    assert GRPOConfig.__dataclass_fields__["updates_per_batch"].default == 2  # ratio != 1: drop / clip can fire
    assert SamplingOptions().repetition_stop_k == 3000 and SamplingOptions().repetition_stop_p == 0.99  # M1 §3
    tiny = load_config("configs/tiny/grpo.yaml", GRPOConfig)
    assert tiny.updates_per_batch >= 2 and tiny.sampling.repetition_stop_k < tiny.sampling.max_new_tokens


def test_example_task_pipeline_validates():
    """configs/tiny/tasks/: the pipeline plans (every stage's checks, the task files' rows against the verifiers'
    fields), each stage YAML names its command, and the committed files are what make_tasks.py writes."""
    import subprocess
    import sys

    from pipelines.run import plan

    stages = plan("configs/tiny/tasks/pipeline.yaml")
    assert [s.spec.name for s in stages] == ["sft", "grpo"]
    assert stages[1].cfg.prompts.files == ["examples/tasks/pool.jsonl"] and stages[1].cfg.prompts.refresh.every > 0
    for stage in ("sft", "grpo"):
        path = f"configs/tiny/tasks/{stage}.yaml"
        assert f"python -m pipelines {stage} --config {path}" in Path(path).read_text().split("\n\n")[0]
    before = {p.name: p.read_bytes() for p in Path("examples/tasks").glob("*.jsonl")}
    subprocess.run([sys.executable, "examples/tasks/make_tasks.py"], check=True)
    assert {p.name: p.read_bytes() for p in Path("examples/tasks").glob("*.jsonl")} == before
    assert {k: v.count(b"\n") for k, v in before.items()} == {"sft.jsonl": 600, "pool.jsonl": 300,
                                                             "heldout_math.jsonl": 100, "heldout_code.jsonl": 50}
