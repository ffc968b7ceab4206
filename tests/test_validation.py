"""Validation before work, as a new user meets it: each bad input is one `error:` line naming the file and the dotted
key (or the row), exit code 2, and nothing written; and a stage killed after its last checkpoint resumes to the
uninterrupted result."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from alignment.config import ConfigError
from pipelines.run import plan

ROOT = Path(__file__).resolve().parents[1]
TINY = "configs/tiny/model.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def sft_yaml(tmp: Path, data: str = "builtin: {arithmetic: {n: 120}, safety: {n: 40}}", name: str = "sft.yaml",
             steps: int = 4) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / name
    path.write_text(f"""
output_dir: {tmp / "out"}
tokenizer: builtin
model: {{path: {TINY}}}
data:
  {data}
  max_length: 256
training: {{max_steps: {steps}, learning_rate: 3.0e-3, batch_size: 2, logging_steps: 1, save_steps: 2}}
eval:
  sets: {{arithmetic: {{n: 8}}}}
  max_new_tokens: 8
""")
    return path


def cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env or ENV, timeout=600)


def assert_one_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


@pytest.mark.parametrize("value, fragments", [
    ("{arithmetic: {n: ten}}", ["'data.builtin.arithmetic.n' = 'ten' must be int"]),
    ("{arithmetic: {nn: 10}}", ["'data.builtin.arithmetic.nn'", "did you mean 'n'"]),
    ("{arithmetc: {n: 10}}", ["'data.builtin.arithmetc'", "did you mean 'arithmetic'"]),
])
def test_builtin_task_options_are_checked_before_work(tmp_path, value, fragments):
    path = sft_yaml(tmp_path)
    result = cli("sft", "--config", path, "--set", f"data.builtin={value}")
    assert_one_error(result, str(path), *fragments)
    assert not (tmp_path / "out").exists()


def test_eval_set_options_are_checked(tmp_path):
    path = sft_yaml(tmp_path)
    result = cli("sft", "--config", path, "--set", "eval.sets={retrieval@8: {task: retrieval, n: 4, n_pairz: 8}}")
    assert_one_error(result, str(path), "'eval.sets.retrieval@8.n_pairz'", "did you mean 'n_pairs'")
    assert not (tmp_path / "out").exists()


def pipeline_yaml(tmp: Path, dpo: str = "", late: str = "") -> Path:
    sft_yaml(tmp)
    (tmp / "dpo.yaml").write_text(f"""
model: {{path: does/not/matter}}
prompts: {{builtin: {{arithmetic: {{n: 50}}}}}}
pairs: {{temperatures: [1.0], samples_per_temperature: 2, max_new_tokens: 8}}
training: {{max_steps: 1, batch_size: 2}}
{dpo}""")
    path = tmp / "pipeline.yaml"
    path.write_text(f"""
output_root: {tmp / "run"}
stages:
  - {{name: sft, kind: sft, config: {tmp / "sft.yaml"}}}
  - {{name: dpo, kind: dpo, config: {tmp / "dpo.yaml"}, data_from: config{late}}}
""")
    return path


@pytest.mark.parametrize("dpo, late, fragments", [
    # a later stage's bad task option: --check fails, so no earlier stage trains before the crash
    ("", ", set: {prompts.builtin: {arithmetic: {n: ten}}}", ["stages[1] (dpo)", "'prompts.builtin.arithmetic.n'"]),
    ("prompts: {builtin: {arithmetic: {n: 5}}, files: [missing.jsonl]}", "",
     ["stages[1] (dpo)", "dpo.yaml", "'prompts.files[0]'", "missing.jsonl", "not found"]),
    ("pairs: {reward: {reward_model: {path: no/such/rm}}}", "",
     ["stages[1] (dpo)", "'pairs.reward'", "reward 'reward_model'", "option 'path'", "no/such/rm", "not found"]),
    ("", ", start_from: config, set: {model.path: configs/tiny/model.yaml}",
     ["stages[1] (dpo)", "'model.path' is the model YAML", "starts from a trained checkpoint"]),
])
def test_pipeline_check_catches_every_stage_up_front(tmp_path, dpo, late, fragments):
    path = pipeline_yaml(tmp_path, dpo, late)
    with pytest.raises(ConfigError) as err:
        plan(path)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))
    result = cli("pipeline", "--config", path, "--check")
    assert_one_error(result, *fragments)
    assert not (tmp_path / "run").exists()  # no manifest, no stage directory


def test_dpo_from_a_model_yaml_or_a_missing_checkpoint_writes_nothing(tmp_path):
    pipeline_yaml(tmp_path)
    dpo = tmp_path / "dpo.yaml"
    result = cli("dpo", "--config", dpo, "--set", f"output_dir={tmp_path / 'dpo_out'}", "--set", f"model.path={TINY}")
    assert_one_error(result, str(dpo), "'model.path' is the model YAML", "starts from a trained checkpoint")
    result = cli("dpo", "--config", dpo, "--set", f"output_dir={tmp_path / 'dpo_out'}",
                 "--set", "model.path=runs/nowhere/sft/final")
    assert_one_error(result, str(dpo), "'model.path': 'runs/nowhere/sft/final' does not exist",
                     "run the stage that writes it first")
    assert result.stderr.count("runs/nowhere/sft/final") == 1  # says what is missing, not "e.g. <the same path>"
    assert not (tmp_path / "dpo_out").exists()


def test_missing_file_names_config_and_key_and_a_fixed_input_then_runs(tmp_path):
    """A missing file, then a malformed row, then a non-UTF-8 byte: each one error naming file and key or row, and
    no stage_config.json left behind to refuse the fixed run with "holds an unfinished run"."""
    data = tmp_path / "chats.jsonl"
    path = sft_yaml(tmp_path, data=f"files: [{data}]")
    assert_one_error(cli("sft", "--config", path), str(path), "'data.files[0]'", str(data), "not found")
    good = json.dumps({"messages": [{"role": "user", "content": "What is 1 + 1?"},
                                    {"role": "assistant", "content": "1 + 1 = 2"}]})
    data.write_text(good + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert_one_error(cli("sft", "--config", path), f"{data} row 2", "assistant")
    data.write_bytes((good + "\n").encode() * 2 + b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    assert_one_error(cli("sft", "--config", path), f"{data} row 3", "not valid UTF-8")
    assert not (tmp_path / "out").exists()
    data.write_text((good + "\n") * 20)
    fixed = cli("sft", "--config", path)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert (tmp_path / "out" / "final" / "metrics.json").is_file()


@pytest.mark.parametrize("kill_at", ["trained", "saving"])
def test_killed_after_the_last_checkpoint_resumes_to_the_uninterrupted_result(tmp_path, kill_at):
    """SIGKILL during the final evaluation (`trained`) or half-way through writing final/ (`saving`): the re-run
    trains no step past the last checkpoint, ends with the uninterrupted run's weights and metrics, and leaves no
    temp directory."""
    reference = cli("sft", "--config", sft_yaml(tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr[-2000:]
    path = sft_yaml(tmp_path / "killed")
    killed = cli("sft", "--config", path, env={**ENV, "ALIGNMENT_KILL_AT": kill_at})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    out = tmp_path / "killed" / "out"
    assert (out / "checkpoints" / "checkpoint-4").is_dir() and not (out / "final" / "metrics.json").exists()
    resumed = cli("sft", "--config", path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ref, got = (json.loads((p / "metrics.json").read_text()) for p in (tmp_path / "ref" / "out", out))
    assert got["train"]["global_step"] == ref["train"]["global_step"] == 4
    assert got["after"] == ref["after"] and got["train"]["loss/last"] == ref["train"]["loss/last"]
    w_ref, w = (load_file(p / "final" / "model.safetensors") for p in (tmp_path / "ref" / "out", out))
    assert all(bool((w_ref[k] == w[k]).all()) for k in w_ref)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], list(out.iterdir())
