"""What every stage file shares: its command line, and the finished / resumable output-directory check."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml

from alignment.config import ConfigError, load_config, to_dict
from alignment.reporting import write_json_atomic


def stage_main(argv, *, prog: str, description: str, config_cls, run, example: str, errors: tuple = (),
               trains: bool = True) -> int:
    """`python -m pipelines.<stage> --config FILE [--set KEY=VALUE ...] [--overwrite]`: load + validate the YAML,
    run the stage, and turn bad input into one `error:` line and exit code 2. `trains=False` (an evaluation, which
    always rewrites its report) has no `--overwrite`."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help=f"stage YAML, e.g. {example}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted, YAML value), e.g. --set training.max_steps=10")
    if trains:
        parser.add_argument("--overwrite", action="store_true",
                            help="train again even if <output_dir>/final exists (it is replaced only when done)")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    try:
        cfg = load_config(args.config, config_cls, overrides)
        run(cfg, overwrite=args.overwrite) if trains else run(cfg)
    except (ConfigError, ValueError, FileNotFoundError, *errors) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


MAY_CHANGE = ("training", "eval", "title", "output_dir")  # config sections a resumed run may change


def prepare_output(cfg, overwrite: bool) -> dict | None:
    """Before a stage runs in `cfg.output_dir`: the metrics of a finished stage (its `final/metrics.json`, written
    last) when there is one and not `overwrite`; otherwise None, after making sure what is there can be resumed.

    A re-run resumes from the checkpoints, cached evaluation, pairs or prompt pools in the output directory, so they
    must come from the same inputs: the config is recorded in `stage_config.json` and a run whose model, tokenizer,
    data, rewards or seed differ is refused (resuming another model's checkpoint would silently mix weights and
    tokenizers); training length, LR, logging and evaluation may change between runs. `--overwrite` clears
    everything but `final/`, which is replaced only when the new run finishes.
    """
    out = Path(cfg.output_dir)
    done = out / "final" / "metrics.json"
    if done.is_file() and not overwrite:
        print(f"{done.parent} is complete; nothing to do (pass --overwrite to train again)")
        return json.loads(done.read_text())
    record = out / "stage_config.json"
    current = {k: v for k, v in json.loads(json.dumps(to_dict(cfg), default=str)).items() if k not in MAY_CHANGE}
    if overwrite:
        for child in out.iterdir() if out.is_dir() else []:
            if child.name != "final":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    elif record.is_file() and json.loads(record.read_text()) != current:
        old = json.loads(record.read_text())
        changed = sorted(_diff_keys(old, current))
        raise ConfigError(f"{out} holds an unfinished run with a different config (changed: {', '.join(changed)}); "
                          "pass --overwrite to start again, or use another output_dir")
    write_json_atomic(record, current)
    return None


def _diff_keys(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b)) for k in _diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


def cached_eval_before(out: Path, evaluate_fn) -> dict:
    """The stage's held-out metrics before training, computed once and kept in `<out>/eval_before.json` across
    resumes (the 'before' model is the stage's input, not a half-trained checkpoint)."""
    path = out / "eval_before.json"
    if path.is_file():
        return json.loads(path.read_text())
    before = evaluate_fn()
    write_json_atomic(path, before)
    return before


def save_stage(cfg, model, tokenizer, metrics: dict, history: list, curve_keys: tuple, notes: dict,
               extra_files: dict | None = None, heading: str = "held-out metrics") -> None:
    """The end of every training stage: `<output_dir>/final` written atomically (LoRA merged; `metrics.json` last,
    its presence marks a finished checkpoint; `extra_files` = {name: json data} beside it), then metrics.json,
    log_history.json, curves.png (the `curve_keys` found in the log) and summary.md in the output dir."""
    from alignment.reporting import atomic_directory, plot_curves, summary_markdown, write_log_history

    out = Path(cfg.output_dir)
    final = out / "final"
    with atomic_directory(final) as tmp:
        to_save = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        to_save.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, data in (extra_files or {}).items():
            write_json_atomic(tmp / name, data)
        write_json_atomic(tmp / "metrics.json", metrics)
    write_json_atomic(out / "metrics.json", metrics)
    write_log_history(out, history)
    plotted = plot_curves(history, out / "curves.png", keys=curve_keys)
    notes = {**notes, "curves": f"curves.png ({', '.join(plotted)})", "checkpoint": str(final)}
    (out / "summary.md").write_text(summary_markdown(f"{cfg.title}: {heading}", metrics["before"], metrics["after"],
                                                     notes))
    print(f"[{cfg.title}] wrote {final}, {out / 'summary.md'}")


def train_resuming(trainer, out: Path, title: str):
    """`trainer.train()` from the last complete checkpoint in `<out>/checkpoints`, if there is one; returns the
    train result and that checkpoint (None for a fresh start)."""
    from alignment.checkpointing import last_checkpoint

    last = last_checkpoint(out / "checkpoints")
    if last:
        print(f"[{title}] resuming from {last}")
    return trainer.train(resume_from_checkpoint=last), last


def series_ends(history: list[dict], keys) -> dict:
    """`{key}/first` and `{key}/last` of each series logged in a Trainer's log history (keys never logged are left
    out)."""
    ends = {}
    for key in keys:
        series = [e[key] for e in history if key in e]
        if series:
            ends[f"{key}/first"], ends[f"{key}/last"] = series[0], series[-1]
    return ends
