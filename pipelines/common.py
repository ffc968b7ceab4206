"""What every stage file shares: its command line, and the finished-stage check."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from alignment.config import ConfigError, load_config


def stage_main(argv, *, prog: str, description: str, config_cls, run, example: str, errors: tuple = ()) -> int:
    """`python -m pipelines.<stage> --config FILE [--set KEY=VALUE ...] [--overwrite]`: load + validate the YAML,
    run the stage, and turn bad input into one `error:` line and exit code 2."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help=f"stage YAML, e.g. {example}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted, YAML value), e.g. --set training.max_steps=10")
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
        run(load_config(args.config, config_cls, overrides), overwrite=args.overwrite)
    except (ConfigError, ValueError, FileNotFoundError, *errors) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def finished_metrics(output_dir: str | Path, overwrite: bool) -> dict | None:
    """The metrics of a finished stage (its `final/metrics.json`, written last), unless `overwrite`."""
    done = Path(output_dir) / "final" / "metrics.json"
    if done.is_file() and not overwrite:
        print(f"{done.parent} is complete; nothing to do (pass --overwrite to train again)")
        return json.loads(done.read_text())
    return None
