"""Config loading: every shipped YAML validates; bad input names the file and the key; the stage registry."""

import re
from pathlib import Path

import pytest

from alignment.config import ConfigError, load_config
from alignment.modeling import model_config_from_yaml
from pipelines.run import plan
from pipelines.sft import Config as SFTStageConfig
from pipelines.stages import STAGES, stage_module

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SIZES = sorted(p for p in CONFIGS.iterdir() if p.is_dir() and p.name != "deepspeed")
# a released checkpoint, its data and reward model are local files the user brings: the only allowed complaint
USER_FILES = r"does not exist|not found|no tokenizer in"


def stage_yamls():
    return sorted(p for size in SIZES for p in size.glob("*.yaml") if p.stem not in ("model", "pipeline"))


def test_each_size_has_its_model_and_pipeline():
    assert [p.name for p in SIZES] == ["548m", "7m", "minimax_text_01", "tiny"]
    for size in SIZES:
        assert (size / "pipeline.yaml").is_file()
        assert (size / "model.yaml").is_file() or size.name == "minimax_text_01"  # the released checkpoint's own


@pytest.mark.parametrize("path", stage_yamls(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_stage_config_validates_and_names_its_command(path):
    """Each stage YAML loads into its stage's config (the file stem is the stage: long_sft -> long-sft), passes the
    stage's input checks up to files the user brings, and its header gives the command that runs it."""
    module = stage_module(path.stem.replace("_", "-"))
    cfg = load_config(path, module.Config)
    try:
        module.check(cfg, str(path), produced=set())
    except ConfigError as err:
        assert re.search(USER_FILES, str(err)), err
    header = path.read_text().split("\n\n")[0]
    assert f"--config {path.relative_to(ROOT)}" in header, header


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*/pipeline.yaml")), ids=lambda p: p.parent.name)
def test_every_pipeline_config_validates(path):
    """Pipelines for real checkpoints name local paths that do not exist here: that must be the only complaint.
    Every stage of a size's pipeline reads that size's stage YAMLs (none is an override of another size's)."""
    try:
        stages = plan(path)
    except ConfigError as err:
        assert re.search(USER_FILES, str(err)), err
        stages = None
    except ImportError as err:  # a GPU pipeline on a machine without the `gpu` extra: refused up front, with the hint
        assert "pip install -e '.[gpu]'" in str(err), err
        stages = None
    text = path.read_text()
    assert f"--config {path.relative_to(ROOT)}" in text.split("\n\n")[0]
    configs = re.findall(r"config: (\S+?\.yaml)", text)
    assert configs and all(c.startswith(f"configs/{path.parent.name}/") for c in configs), configs
    if stages is not None:
        assert all(s.cfg.output_dir.startswith(str(s.out.parent)) for s in stages)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*/model.yaml")), ids=lambda p: p.parent.name)
def test_every_model_config_builds(path):
    cfg = model_config_from_yaml(path)
    assert "linear_attention" in cfg.layer_types and "full_attention" in cfg.layer_types


def test_registry_serves_cli_runner_and_makefile():
    """One registry: every stage has a module with Config/check/run/main, the Makefile has a target per stage that
    calls `python -m pipelines <stage>`, and `--help` lists them all."""
    import subprocess
    import sys

    makefile = (ROOT / "Makefile").read_text()
    for name, stage in STAGES.items():
        module = stage_module(name)
        attrs = ("main",) if name == "pipeline" else ("Config", "check", "run", "main", "DESCRIPTION")
        assert all(hasattr(module, attr) for attr in attrs), name
        assert (ROOT / stage.example).is_file()
        assert re.search(rf"^{name}: setup\n\t\$\(LAUNCH\) -m pipelines {name} --config ", makefile, re.M), name
    out = subprocess.run([sys.executable, "-m", "pipelines", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and all(f"  {name} " in out.stdout for name in STAGES), out.stdout
    bad = subprocess.run([sys.executable, "-m", "pipelines", "sfft"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "unknown stage 'sfft'" in bad.stderr


def write(tmp_path, text):
    path = tmp_path / "stage.yaml"
    path.write_text(text)
    return path


GOOD = """
model: {path: configs/tiny/model.yaml}
data: {builtin: {arithmetic: {n: 10}}}
training: {learning_rate: 1e-3}
"""


def test_good_config_and_yaml_float_strings(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), SFTStageConfig)
    assert cfg.training.learning_rate == 1e-3 and cfg.data.max_length == 512


@pytest.mark.parametrize(
    "text, pattern",
    [
        (GOOD.replace("learning_rate", "learnin_rate"), r"stage\.yaml: unknown key 'training\.learnin_rate' "
                                                        r"\(did you mean 'training\.learning_rate'\?\)"),
        (GOOD + "extra: 1\n", r"stage\.yaml: unknown key 'extra'"),
        (GOOD.replace("1e-3", "fast"), r"stage\.yaml: 'training\.learning_rate' = 'fast' must be float"),
        (GOOD.replace("1e-3", "-1"), r"stage\.yaml: training: training\.learning_rate must be > 0"),
        (GOOD + "eval: {max_new_tokens: [1]}\n", r"'eval\.max_new_tokens' = \[1\] must be int"),
        (GOOD.replace("{path: configs/tiny/model.yaml}", "{dtype: float32}"),
         r"stage\.yaml: missing required key 'model\.path'"),
        (GOOD + "training: {lr_schedule: wavy}\n", r"'training\.lr_schedule' = 'wavy'; expected one of"),
        (GOOD.replace("{builtin: {arithmetic: {n: 10}}}", "{max_length: 64}"),
         r"stage\.yaml: data: give at least one of 'builtin' or 'files'"),
        ("model: [1, 2\n", r"stage\.yaml: invalid YAML"),
        (GOOD.replace("{learning_rate: 1e-3}", "{learning_rate: 1e-3, zero_init: true}"),
         r"training\.zero_init loads the model partitioned by DeepSpeed ZeRO-3: set training\.deepspeed"),
    ],
)
def test_bad_configs_name_file_and_key(tmp_path, text, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(write(tmp_path, text), SFTStageConfig)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml", SFTStageConfig)


@pytest.mark.parametrize(
    "stage, overrides, pattern",
    [
        ("long-sft", {"training.context_parallel": 2, "data.packing": False}, r"splits packed rows: set data\.packing"),
        ("dpo", {"training.context_parallel": 2}, r"'training\.context_parallel: 2': .* has no context parallelism"),
        ("grpo", {"training.context_parallel": 4}, r"'training\.context_parallel: 4': .* has no context parallelism"),
        ("rm", {"training.deepspeed": "configs/deepspeed/zero3.json", "training.zero_init": True},
         r"'training\.zero_init': .* does not load partitioned yet \(SFT, long SFT, DPO and GRPO do\)"),
        ("dpo", {"training.deepspeed": "configs/deepspeed/zero3.json", "training.zero_init": True,
                 "model.lora": {"r": 4}}, r"'training\.zero_init' loads a checkpoint directory partitioned, without"),
        ("sft", {"training.deepspeed": "configs/deepspeed/zero3.json", "training.zero_init": True,
                 "model.path": "configs/tiny/model.yaml"}, r"'training\.zero_init' loads a checkpoint directory"),
    ],
)
def test_context_parallel_only_where_a_stage_has_it(stage, overrides, pattern):
    """Long SFT splits packed rows only; stages without context parallelism refuse it before any work; likewise
    loading partitioned (zero_init: not in RM; from a checkpoint directory, without LoRA)."""
    module = stage_module(stage)
    path = CONFIGS / "tiny" / f"{stage.replace('-', '_')}.yaml"
    cfg = load_config(path, module.Config, overrides)
    with pytest.raises(ConfigError, match=pattern):
        module.check(cfg, str(path), produced={Path(cfg.model.path)})


@pytest.mark.parametrize("size", ["tiny", "7m"])
def test_committed_base_is_its_sizes_model(size):
    """configs/<size>/base (`make base SIZE=<size>`) has the architecture of configs/<size>/model.yaml, loads through
    the one loader as float32 master weights (the 7m base is stored in bf16), and its recorded pretraining learned
    held-out arithmetic."""
    import json

    import torch

    from alignment.modeling import ModelOptions, load_model, load_tokenizer

    base = CONFIGS / size / "base"
    fresh = model_config_from_yaml(CONFIGS / size / "model.yaml")
    model = load_model(ModelOptions(path=str(base), dtype="float32"), tokenizer=load_tokenizer(str(base)))
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "layer_types", "head_dim",
                "num_attention_heads", "num_key_value_heads", "num_local_experts", "num_experts_per_tok"):
        assert getattr(model.config, key) == getattr(fresh, key), key
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    after = json.loads((base / "pretrain_metrics.json").read_text())["after"]
    assert after["arithmetic@20"] > 0.8, after
