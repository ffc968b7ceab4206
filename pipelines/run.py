"""The staged pipeline: the whole MiniMax-01 post-training recipe as one resumable run [01 §5, Table 7].

    make pipeline                                   # configs/tiny/pipeline.yaml (what `make demo` runs)
    python -m pipelines pipeline --config configs/tiny/pipeline.yaml [--from dpo] [--only grpo] [--check]

A pipeline YAML lists stages in order; each names its stage YAML and dotted overrides. The runner
1. validates every stage up front with the stage's own `check` (unknown keys, missing files, built-in task options,
   reward specs, stage order, lengths above the model's positions), so a typo in the last stage fails before the
   first one trains;
2. runs the stages in order, each starting from the previous policy stage's `final/` checkpoint (`start_from`); a DPO
   stage gets the data spec (`data.builtin`, `data.files`, `seed`) of the SFT stage it names in `data_from` as its
   prompts, since DPO samples prompts SFT trained on [01 §5.4.1];
3. records status, timings and metrics in `<output_root>/manifest.json` (atomic writes) and skips finished stages on a
   re-run — a stage whose `final/metrics.json` exists is done, unless it started from another checkpoint than the
   one the pipeline now hands it or that checkpoint was rebuilt since (then it runs again); an interrupted stage
   resumes from its last complete Trainer checkpoint (alignment/checkpointing.py: optimizer, scheduler, RNG and
   data position restored);
4. writes `<output_root>/report.md` and `report.png` (every stage's key metrics before/after, its training curves)
   after each stage, next to each stage's own TensorBoard logs.

Across GPUs: `make pipeline NPROC=8` = `torchrun --nproc-per-node 8 -m pipelines pipeline --config ...`; every rank
runs the runner, the main process alone writes the manifest and the report, and each stage's DeepSpeed file
(`training.deepspeed`) is the Trainer's to load (pipelines/common.py: one writer, gathered `final/`).

String overrides may name another stage's checkpoint as `{stage_name}` — e.g. the reward model a later stage
scores with: `set: {rewards.reward_model.path: "{rm}"}`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from alignment.config import ConfigError, from_dict, load_config, read_yaml
from alignment.distributed import fresh_deepspeed_state, is_main
from alignment.reporting import write_json_atomic
from pipelines.common import check_eval_files, check_launch
from pipelines.stages import KINDS, stage_module

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclass
class StageSpec:
    name: str
    kind: Literal[tuple(KINDS)]  # a stage module of pipelines.stages
    config: str  # the stage YAML (run alone with `python -m pipelines <kind> --config ...`)
    set: dict = field(default_factory=dict)  # dotted overrides of that YAML
    # Which checkpoint the stage starts from: "previous" (the last policy stage before it; none for the first stage,
    # which keeps its YAML's model.path), "config" (keep the YAML's), or a stage name.
    start_from: str = "previous"
    # A policy stage hands its checkpoint to the next; a reward-model stage does not.
    policy: bool = True
    # DPO only: the SFT stage whose `data.builtin`, `data.files` and `seed` become this stage's `prompts` (default:
    # the last SFT stage before it; "config" keeps the YAML's prompts).
    data_from: str | None = None


@dataclass
class PipelineConfig:
    stages: list[StageSpec]
    output_root: str = "runs/pipeline"  # stage NAME writes to <output_root>/NAME
    title: str = "MiniMax post-training pipeline"
    seed: int | None = None  # when set, every stage's seed
    # Dotted overrides applied to every stage whose config has that top-level section (e.g. model.dtype: bfloat16).
    shared: dict = field(default_factory=dict)


@dataclass
class Stage:
    spec: StageSpec
    cfg: object
    out: Path

    @property
    def final(self) -> Path:
        return self.out / "final"

    @property
    def done(self) -> bool:
        return (self.final / "metrics.json").is_file()

    def stale(self) -> str | None:
        """Why a finished stage no longer fits the pipeline (None when it does): it started from another checkpoint,
        or its input checkpoint was rebuilt after it finished."""
        recorded = json.loads((self.final / "metrics.json").read_text()).get("config", {}).get("model", {}).get("path")
        if recorded != str(self.cfg.model.path):
            return f"it started from {recorded}, the pipeline now hands it {self.cfg.model.path}"
        source = Path(self.cfg.model.path, "metrics.json")
        if source.is_file() and source.stat().st_mtime > (self.final / "metrics.json").stat().st_mtime:
            return f"its input {self.cfg.model.path} was rebuilt after it finished"
        return None


def main(argv: list[str] | None = None, stage: str = "pipeline") -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines pipeline",
        description="Run the MiniMax-01 post-training stages (SFT -> long SFT -> DPO -> long DPO -> GRPO) from one "
        "pipeline YAML, handing each stage's final checkpoint to the next. Finished stages are skipped on a re-run; "
        "an interrupted stage resumes from its last complete checkpoint. Writes <output_root>/manifest.json, "
        "report.md and report.png.",
    )
    parser.add_argument("--config", required=True, help="pipeline YAML, e.g. configs/tiny/pipeline.yaml")
    parser.add_argument("--from", dest="start", metavar="STAGE", help="skip the stages before STAGE")
    parser.add_argument("--only", metavar="STAGE", help="run just STAGE (its input checkpoint must exist)")
    parser.add_argument("--check", action="store_true", help="validate the pipeline and exit")
    args = parser.parse_args(argv)
    try:
        stages = plan(args.config)
        selected = select(stages, args.start, args.only)
        if args.check:
            print(f"{args.config}: OK ({', '.join(s.spec.name for s in stages)})")
            return 0
        for stage in selected:
            check_launch(stage.cfg, stage.spec.config)
        run(args.config, stages, selected)
    except (ConfigError, ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def plan(path: str | Path) -> list[Stage]:
    """Load and validate the whole pipeline before anything runs; errors name the file and key."""
    pipe = from_dict(PipelineConfig, read_yaml(path), source=str(path))
    if not pipe.stages:
        raise ConfigError(f"{path}: 'stages' is empty")
    names = [s.name for s in pipe.stages]
    for i, spec in enumerate(pipe.stages):
        if names.count(spec.name) > 1:
            raise ConfigError(f"{path}: stages[{i}].name '{spec.name}' is used twice")
    root = Path(pipe.output_root)
    stages: list[Stage] = []
    for i, spec in enumerate(pipe.stages):
        where = f"{path}: stages[{i}] ({spec.name})"
        module = stage_module(spec.kind)
        earlier = {s.spec.name: s for s in stages}
        overrides = {k: v for k, v in pipe.shared.items() if k.split(".")[0] in module.Config.__dataclass_fields__}
        overrides.update(_handed_data(spec, stages, where))
        overrides.update({k: _resolve(v, earlier, f"{where}.set.{k}") for k, v in spec.set.items()})
        overrides["output_dir"] = str(root / spec.name)
        if pipe.seed is not None:
            overrides["seed"] = pipe.seed
        source = _start_checkpoint(spec, stages, where)
        if source is not None:
            overrides["model.path"] = str(source.final)
        try:
            cfg = load_config(spec.config, module.Config, overrides)
            module.check(cfg, spec.config, produced={s.final for s in stages})
            check_eval_files(cfg, spec.config)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        except ImportError as err:  # a stage's extra (vLLM) missing: still say which stage needs it
            raise ImportError(f"{where}: {err}") from None
        stages.append(Stage(spec, cfg, root / spec.name))
    return stages


def _earlier(name: str, stages: list[Stage], where: str, key: str) -> Stage:
    found = [s for s in stages if s.spec.name == name]
    if not found:
        raise ConfigError(f"{where}: {key} '{name}' is not an earlier stage "
                          f"(stages run in order; earlier: {', '.join(s.spec.name for s in stages) or 'none'})")
    return found[0]


def _start_checkpoint(spec: StageSpec, stages: list[Stage], where: str) -> Stage | None:
    if spec.start_from == "config":
        return None
    if spec.start_from == "previous":
        policies = [s for s in stages if s.spec.policy]
        return policies[-1] if policies else None
    return _earlier(spec.start_from, stages, where, "start_from")


def _handed_data(spec: StageSpec, stages: list[Stage], where: str) -> dict:
    """A DPO stage's prompts = the data spec of an earlier SFT stage (`data_from`), as overrides."""
    if spec.kind != "dpo" or spec.data_from == "config":
        if spec.data_from not in (None, "config"):
            raise ConfigError(f"{where}: data_from is for DPO stages (kind {spec.kind} has no prompts to hand over)")
        return {}
    if spec.data_from is None:
        sft = [s for s in stages if s.spec.kind == "sft"]
        if not sft:
            return {}
        source = sft[-1]
    else:
        source = _earlier(spec.data_from, stages, where, "data_from")
        if source.spec.kind != "sft":
            raise ConfigError(f"{where}: data_from '{spec.data_from}' is a {source.spec.kind} stage, not an SFT stage")
    data = source.cfg.data
    return {"prompts.builtin": data.builtin, "prompts.files": list(data.files), "prompts.seed": source.cfg.seed}


def _resolve(value, earlier: dict[str, Stage], key: str):
    """'{rm}' -> the rm stage's final checkpoint (only earlier stages can be named)."""
    if not isinstance(value, str):
        return value

    def sub(match):
        if match.group(1) not in earlier:
            raise ConfigError(f"{key}: '{{{match.group(1)}}}' does not name an earlier stage")
        return str(earlier[match.group(1)].final)

    return _PLACEHOLDER.sub(sub, value)


def select(stages: list[Stage], start: str | None, only: str | None) -> list[Stage]:
    names = [s.spec.name for s in stages]
    for flag, name in (("--from", start), ("--only", only)):
        if name is not None and name not in names:
            raise ConfigError(f"{flag} {name}: no such stage (stages: {', '.join(names)})")
    if only:
        return [s for s in stages if s.spec.name == only]
    return stages[names.index(start):] if start else stages


def run(path, stages: list[Stage], selected: list[Stage]) -> dict:
    """Run the selected stages in order; returns the manifest (which, like the report, only the main process
    writes: every rank keeps the same record, so any of them could)."""
    from alignment.reporting import pipeline_report as write_report

    def save(manifest):
        if is_main():
            write_json_atomic(manifest_path, manifest)

    def pipeline_report(root, stages):
        return write_report(root, stages) if is_main() else root / "report.md"

    root = stages[0].out.parent
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest.update(config=str(path), stages=manifest.get("stages", {}))
    for stage in stages:
        manifest["stages"].setdefault(stage.spec.name, {"kind": stage.spec.kind, "status": "pending"})
    for i, stage in enumerate(selected, 1):
        record = manifest["stages"][stage.spec.name]
        record.update(kind=stage.spec.kind, output_dir=str(stage.out), start=str(stage.cfg.model.path))
        banner = f"[pipeline {i}/{len(selected)}] {stage.spec.name} ({stage.spec.kind})"
        stale = stage.stale() if stage.done else None
        if stage.done and not stale:
            print(f"{banner}: finished earlier, skipped")
            record.update(status="done", checkpoint=str(stage.final))
            continue
        if stale:
            print(f"{banner}: finished earlier but {stale}: running it again")
        if not Path(stage.cfg.model.path).exists():
            raise FileNotFoundError(f"{stage.spec.name}: input checkpoint {stage.cfg.model.path} does not exist; "
                                    "run the earlier stages first")
        print(f"{banner}: starting from {stage.cfg.model.path}")
        record.update(status="running", started=time.strftime("%Y-%m-%d %H:%M:%S"))
        save(manifest)
        t0 = time.time()
        fresh_deepspeed_state()
        try:
            stage_module(stage.spec.kind).run(stage.cfg, overwrite=bool(stale))
        except BaseException as err:
            record.update(status="failed", error=f"{type(err).__name__}: {err}")
            save(manifest)
            raise
        record.update(status="done", checkpoint=str(stage.final), seconds=round(time.time() - t0, 1))
        save(manifest)
        pipeline_report(root, [(s.spec.name, s.out) for s in stages])
    save(manifest)
    report = pipeline_report(root, [(s.spec.name, s.out) for s in stages])
    print(f"[pipeline] done: {report}")
    return manifest


if __name__ == "__main__":
    sys.exit(main())
