"""The staged pipeline runner: up-front validation, hand-off, skip-finished, and crash recovery under SIGKILL."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from alignment.config import ConfigError
from pipelines.run import plan, select

TINY = "configs/tiny/model.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_stage_yamls(tmp: Path) -> None:
    """Two small SFT stages (short, then 'long' from its checkpoint), a few optimizer steps each."""
    tmp.mkdir(parents=True, exist_ok=True)
    common = """
data:
  builtin: {arithmetic: {n: 200}, safety: {n: 60}}
  max_length: 256
eval:
  sets: {arithmetic: {n: 8}}
  max_new_tokens: 8
"""
    (tmp / "short.yaml").write_text(f"""
tokenizer: builtin
model: {{path: {TINY}}}
training: {{max_steps: 3, learning_rate: 3.0e-3, batch_size: 2, logging_steps: 1, save_steps: 2}}
{common}""")
    (tmp / "long.yaml").write_text(f"""
model: {{path: does/not/matter/the/runner/hands/it/off}}
training: {{max_steps: 6, learning_rate: 1.0e-3, lr_schedule: constant, batch_size: 2, logging_steps: 1,
           save_steps: 2, save_total_limit: 5}}
{common}""")


def pipeline_yaml(tmp: Path, root: str = "run", extra_stage: str = "", top: str = "") -> Path:
    write_stage_yamls(tmp)
    path = tmp / "pipeline.yaml"
    path.write_text(f"""
output_root: {tmp / root}
seed: 0
{top}
stages:
  - {{name: sft, kind: sft, config: {tmp / "short.yaml"}}}
  - {{name: long_sft, kind: sft, config: {tmp / "long.yaml"}, set: {{data.max_length: 320}}}}
{extra_stage}""")
    return path


def run_pipeline(path: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = dict(ENV, ALIGNMENT_KILL_AT=kill_at) if kill_at else ENV
    return subprocess.run([sys.executable, "-m", "pipelines", "pipeline", "--config", str(path)], env=env,
                          capture_output=True, text=True, timeout=600)


def final_weights(root: Path) -> dict:
    return load_file(root / "long_sft" / "final" / "model.safetensors")


def test_plan_hands_each_stage_the_previous_checkpoint(tmp_path):
    stages = plan(pipeline_yaml(tmp_path))
    assert [s.spec.name for s in stages] == ["sft", "long_sft"]
    assert stages[0].cfg.model.path == TINY  # the first stage keeps its YAML's model
    assert stages[1].cfg.model.path == str(tmp_path / "run" / "sft" / "final")
    assert stages[1].cfg.data.max_length == 320 and stages[1].cfg.output_dir == str(tmp_path / "run" / "long_sft")
    assert [s.spec.name for s in select(stages, "long_sft", None)] == ["long_sft"]


@pytest.mark.parametrize("case, match", [
    ("top", r"pipeline.yaml: unknown key 'stagez'"),
    ("stage_key", r"stages\[1\] \(long_sft\).*unknown key 'training.learning_rat'"),
    ("data_file", r"stages\[1\] \(long_sft\): .*long.yaml: 'data.files\[0\]': data file '.*missing.jsonl' not found"),
    ("order", r"stages\[2\] \(late\): start_from 'later' is not an earlier stage"),
    ("placeholder", r"stages\[2\] \(late\).set.tokenizer: '\{nope\}' does not name an earlier stage"),
    ("too_long", r"stages\[2\] \(late\): .*short.yaml: 'data.max_length' 8192 exceeds the model's "
                 r"max_position_embeddings 4096"),
    ("kind", r"stages\[2\].kind' = 'ppo'; expected one of"),
])
def test_broken_pipeline_fails_up_front_with_one_clear_error(tmp_path, case, match):
    extra = {
        "stage_key": "", "data_file": "", "top": "",
        "order": f"  - {{name: late, kind: sft, config: {tmp_path / 'long.yaml'}, start_from: later}}",
        "placeholder": f"  - {{name: late, kind: sft, config: {tmp_path / 'long.yaml'}, set: {{tokenizer: '{{nope}}'}}}}",
        "too_long": f"  - {{name: late, kind: sft, config: {tmp_path / 'short.yaml'}, start_from: config, "
                    f"set: {{data.max_length: 8192}}}}",
        "kind": f"  - {{name: late, kind: ppo, config: {tmp_path / 'long.yaml'}}}",
    }[case]
    path = pipeline_yaml(tmp_path, extra_stage=extra, top="stagez: []" if case == "top" else "")
    if case == "stage_key":
        (tmp_path / "long.yaml").write_text((tmp_path / "long.yaml").read_text().replace("learning_rate", "learning_rat"))
    if case == "data_file":
        text = (tmp_path / "long.yaml").read_text().replace("max_length: 256", f"max_length: 256\n  files: [{tmp_path / 'missing.jsonl'}]")
        (tmp_path / "long.yaml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        plan(path)
    if case == "data_file":  # the CLI too: exit code 2, one error line, nothing trained
        result = run_pipeline(path)
        assert result.returncode == 2 and result.stderr.count("error:") == 1, result.stderr
        assert "data.files[0]" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


def test_sigkill_mid_stage_and_mid_save_resume_to_the_same_result(tmp_path):
    """Reference run, then: SIGKILL after long-SFT step 5 (checkpoint-4 is its last) and SIGKILL half-way through
    writing long-SFT checkpoint-4 (model written, optimizer not). Each re-run skips the finished SFT stage, resumes
    long SFT from its last *complete* checkpoint, and ends where the uninterrupted run ended."""
    reference = run_pipeline(pipeline_yaml(tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    ref_root = tmp_path / "ref" / "run"
    ref_metrics = json.loads((ref_root / "long_sft" / "metrics.json").read_text())
    manifest = json.loads((ref_root / "manifest.json").read_text())
    assert [manifest["stages"][s]["status"] for s in ("sft", "long_sft")] == ["done", "done"]
    assert (ref_root / "report.md").is_file() and (ref_root / "report.png").is_file()

    for kill_at, resumed_from in (("step:5", "checkpoint-4"), ("save:4", "checkpoint-2")):
        tmp = tmp_path / kill_at.replace(":", "")
        path = pipeline_yaml(tmp)
        root = tmp / "run"
        killed = run_pipeline(path, kill_at=kill_at)
        assert killed.returncode == -signal.SIGKILL
        assert (root / "sft" / "final" / "metrics.json").is_file()  # stage 1 had finished
        assert not (root / "long_sft" / "final").exists()
        status = json.loads((root / "manifest.json").read_text())["stages"]["long_sft"]["status"]
        assert status == "running"  # SIGKILL leaves no chance to write 'failed': the manifest says where it was
        ckpts = sorted(p.name for p in (root / "long_sft" / "checkpoints").iterdir() if p.name.startswith("checkpoint"))
        assert ckpts[-1] == resumed_from  # the half-written checkpoint-4 never appears under its real name
        sft_mtime = (root / "sft" / "final" / "model.safetensors").stat().st_mtime

        resumed = run_pipeline(path)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "sft (sft): finished earlier, skipped" in resumed.stdout
        assert (root / "sft" / "final" / "model.safetensors").stat().st_mtime == sft_mtime
        metrics = json.loads((root / "long_sft" / "metrics.json").read_text())
        assert metrics["train"]["resumed_from"].endswith(resumed_from)
        assert metrics["train"]["global_step"] == 6
        # same seed, same data order, restored optimizer/scheduler/RNG: same end point (CPU float32)
        assert metrics["train"]["loss/last"] == pytest.approx(ref_metrics["train"]["loss/last"], abs=1e-4)
        ref_w, w = final_weights(ref_root), final_weights(root)
        assert max(float((ref_w[k] - w[k]).abs().max()) for k in ref_w) < 1e-4
        assert not (root / "long_sft" / "checkpoints" / ".staging").exists()


def test_resume_refuses_other_inputs_and_overwrite_starts_clean(tmp_path):
    """Checkpoints left by a run of another model must not be resumed silently; --overwrite clears them. The check
    (`finished`) writes nothing; the record is written by `claim`, once the stage's inputs have loaded."""
    from alignment.config import load_config
    from pipelines.common import claim, finished
    from pipelines.sft import Config as SFTStageConfig

    path = pipeline_yaml(tmp_path) and tmp_path / "short.yaml"
    cfg = load_config(path, SFTStageConfig, {"output_dir": str(tmp_path / "out")})
    assert finished(cfg, overwrite=False) is None and not (tmp_path / "out").exists()
    claim(cfg, overwrite=False)
    (tmp_path / "out" / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    longer = load_config(path, SFTStageConfig, {"output_dir": str(tmp_path / "out"), "training.max_steps": 9})
    assert finished(longer, overwrite=False) is None  # training length may change on resume
    other = load_config(path, SFTStageConfig, {"output_dir": str(tmp_path / "out"), "data.max_length": 300})
    with pytest.raises(ConfigError, match=r"different config \(changed: data.max_length\).*--overwrite"):
        finished(other, overwrite=False)
    assert finished(other, overwrite=True) is None
    assert (tmp_path / "out" / "checkpoints").exists()  # nothing is cleared before the inputs have loaded
    claim(other, overwrite=True)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_finished_stage_reruns_when_its_input_was_rebuilt(tmp_path):
    path = pipeline_yaml(tmp_path)
    assert run_pipeline(path).returncode == 0
    sft_metrics = tmp_path / "run" / "sft" / "final" / "metrics.json"
    os.utime(sft_metrics)  # as if stage I had been trained again
    again = run_pipeline(path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "sft (sft): finished earlier, skipped" in again.stdout
    assert "long_sft (sft): finished earlier but its input" in again.stdout and "running it again" in again.stdout
    long_final = tmp_path / "run" / "long_sft" / "final" / "metrics.json"
    assert long_final.stat().st_mtime > sft_metrics.stat().st_mtime


def test_readme_stage_table_is_a_pipeline_report():
    """README's results table is the demo's report pasted by `make readme-report`: pipeline_report's header, the tiny
    pipeline's stages in order, and every change equal to after - before (a typed table drifts; a pasted one not)."""
    from alignment.reporting import REPORT_BEGIN, REPORT_END

    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    rows = text.split(REPORT_BEGIN, 1)[1].split(REPORT_END, 1)[0].strip().splitlines()
    assert rows[:2] == ["| stage | metric | before | after | change |", "|---|---|---:|---:|---:|"]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]
    stages = [s.spec.name for s in plan(root / "configs" / "tiny" / "pipeline.yaml")]
    assert list(dict.fromkeys(c[0] for c in cells)) == stages
    for stage, metric, before, after, change in cells:
        assert float(change) == pytest.approx(float(after) - float(before), abs=1.5e-3), (stage, metric)
