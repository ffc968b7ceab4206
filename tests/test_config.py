"""Config loading: every shipped YAML validates; bad input names the file and the key."""

from pathlib import Path

import pytest

import importlib

from alignment.config import ConfigError, load_config
from alignment.modeling import model_config_from_yaml
from pipelines.run import STAGE_KINDS, plan
from pipelines.sft import SFTStageConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def stage_class(path: Path):
    """configs/<kind>_*.yaml or configs/long_<kind>_*.yaml -> that stage's config class."""
    kind = path.stem.removeprefix("long_").split("_")[0]
    module, name = STAGE_KINDS[kind]
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS.glob("*.yaml") if not p.stem.startswith(("pipeline",
                                                                                                    "eval_"))),
                         ids=lambda p: p.name)
def test_every_stage_config_validates(path):
    cfg = load_config(path, stage_class(path))
    assert Path(cfg.model.path).suffix in (".yaml", "") or Path(cfg.model.path).is_dir()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("pipeline_*.yaml")), ids=lambda p: p.name)
def test_every_pipeline_config_validates(path, monkeypatch):
    """Pipelines for real checkpoints name local paths that do not exist here: that must be the only complaint."""
    try:
        stages = plan(path)
    except ConfigError as err:
        assert "does not exist and no earlier stage produces it" in str(err), err
        return
    assert stages and all(s.cfg.output_dir.startswith(str(s.out.parent)) for s in stages)


@pytest.mark.parametrize("path", sorted((CONFIGS / "model").glob("*.yaml")), ids=lambda p: p.name)
def test_every_model_config_builds(path):
    cfg = model_config_from_yaml(path)
    assert "linear_attention" in cfg.layer_types and "full_attention" in cfg.layer_types


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
        ("model: [1, 2\n", r"stage\.yaml: invalid YAML"),
    ],
)
def test_bad_configs_name_file_and_key(tmp_path, text, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(write(tmp_path, text), SFTStageConfig)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml", SFTStageConfig)
