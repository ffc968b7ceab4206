"""The stage scaffolding every stage file shares, in the order a stage uses it:

    stage_main     the command line: load + validate the YAML, `check` the inputs, `run`; bad input -> one `error:`
                   line naming file and key, exit code 2, nothing written
    check_*        input checks that need no model: files, built-in task options, reward specs, the start checkpoint,
                   your evaluation files (`check_eval_files`, run for every stage)
    check_launch   at run time: the DeepSpeed file's package is installed and the combination is one that is built
    finished       a finished stage's metrics (nothing to do), or None after checking the output dir can be resumed
    claim          take the output directory: record the config (after the inputs loaded), point TensorBoard there
    stage_tokenizer / evaluate_sets / cached_eval_before / train_resuming
    finish         the metrics dict every stage writes, `final/` saved atomically, summary.md + curves.png

A stage reads top to bottom: `finished` -> build its data (errors name file and row) -> load model + tokenizer ->
`claim` -> evaluate before -> train -> evaluate after -> `finish`.

Under a launcher (`torchrun --nproc-per-node N -m pipelines STAGE ...`, what `make STAGE NPROC=N` runs) every rank runs
the same stage code; the main process is the one writer of every file here (`alignment.distributed`), evaluations
run once and are broadcast (`alignment.distributed.computed_once`, before and after training), and `finish` streams
ZeRO-3 partitions into one complete checkpoint: the same files a one-process run writes.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import sys
from pathlib import Path

import yaml

from alignment.config import ConfigError, load_config, to_dict
from alignment.distributed import barrier, computed_once, is_main
from alignment.reporting import write_json_atomic
from alignment.schema import TokenizerOptions

MAY_CHANGE = ("training", "eval", "title", "output_dir")  # config sections a resumed run may change


# -- command line ------------------------------------------------------------------------------------------------


def stage_main(argv, *, stage: str) -> int:
    """`python -m pipelines STAGE --config FILE [--set KEY=VALUE ...] [--overwrite]` for the registered `stage`."""
    from data_recipes import DataError
    from pipelines.stages import STAGES, stage_module
    from rewards import RewardError

    info, module = STAGES[stage], stage_module(stage)
    trains = "overwrite" in inspect.signature(module.run).parameters  # an evaluation always rewrites its report
    parser = argparse.ArgumentParser(prog=f"python -m pipelines {stage}",
                                     description=f"{info.summary[0].upper()}{info.summary[1:]} of the MiniMax-01 "
                                     f"recipe. {module.DESCRIPTION}")
    parser.add_argument("--config", required=True, help=f"stage YAML, e.g. {info.example}")
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
        cfg = load_config(args.config, module.Config, overrides)
        module.check(cfg, args.config, produced=set())
        check_eval_files(cfg, args.config)
        check_launch(cfg, args.config)
        module.run(cfg, overwrite=args.overwrite) if trains else module.run(cfg)
    except (ConfigError, DataError, RewardError, ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


# -- input checks (no model, no output written) ------------------------------------------------------------------


def _exists(path, produced: set) -> bool:
    return Path(path) in produced or Path(path).exists()


def check_files(paths, source: str, key: str) -> None:
    """Every data file named under `key` exists (its rows are checked when the stage reads it)."""
    for i, path in enumerate(paths or []):
        if not Path(path).is_file():
            raise ConfigError(f"{source}: '{key}[{i}]': data file '{path}' not found")


def check_model(cfg, source: str, produced: set, *, checkpoint: bool, what: str = "this stage",
                max_length: int | None = None, context_parallel: bool = False, zero_init: bool = False) -> None:
    """`model.path` exists now or is produced by an earlier pipeline stage; `checkpoint=True` (DPO, GRPO: they
    start from a trained model) refuses a model YAML, which would start from random weights; `max_length` (the
    stage's `data.max_length`) must fit the model's positions; `training.context_parallel` > 1 only where the
    stage has it (`context_parallel=True`: SFT); `training.zero_init` likewise (`zero_init=True`: SFT, DPO,
    GRPO), from a checkpoint directory and without LoRA."""
    split = getattr(getattr(cfg, "training", None), "context_parallel", 1)
    if getattr(getattr(cfg, "training", None), "zero_init", False):
        if not zero_init:
            raise ConfigError(f"{source}: 'training.zero_init': {what} does not load partitioned yet (SFT, long "
                              "SFT, DPO and GRPO do); set it to false")
        if Path(cfg.model.path).suffix in (".yaml", ".yml") or cfg.model.lora is not None:
            raise ConfigError(f"{source}: 'training.zero_init' loads a checkpoint directory partitioned, without "
                              "LoRA (model.path is a model YAML or model.lora is set: not built)")
    if split > 1 and not context_parallel:
        raise ConfigError(f"{source}: 'training.context_parallel: {split}': {what} has no context parallelism yet "
                          "(SFT and long SFT have it); set it to 1")
    path = Path(cfg.model.path)
    if path in produced:
        return
    if checkpoint and path.suffix in (".yaml", ".yml"):
        raise ConfigError(f"{source}: 'model.path' is the model YAML '{path}' (fresh weights), but {what} starts "
                          "from a trained checkpoint directory, e.g. the SFT stage's <output_dir>/final")
    if not path.exists():
        hint = (f"; {what} starts from a trained checkpoint: run the stage that writes it first, or point "
                "model.path at a local checkpoint directory") if checkpoint else ""
        raise ConfigError(f"{source}: 'model.path': '{path}' does not exist{hint}")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ConfigError(f"{source}: 'model.path': '{path}' is not a checkpoint directory (no config.json)")
    if not path.is_dir() and path.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"{source}: 'model.path': '{path}' is neither a checkpoint directory nor a model YAML")
    # the loader's own config readers: a bad model YAML key or released-config field fails here, before any work
    from alignment.modeling import model_config_from_yaml
    from alignment.released import checkpoint_config

    config = checkpoint_config(path) if path.is_dir() else model_config_from_yaml(path)
    positions = getattr(config, "max_position_embeddings", None)
    if max_length and positions and max_length > positions:
        raise ConfigError(f"{source}: 'data.max_length' {max_length} exceeds the model's max_position_embeddings "
                          f"{positions} (raise it in the model config or shorten the rows)")


def check_tokenizer(cfg, source: str, produced: set) -> None:
    """The tokenizer a stage will load exists: `tokenizer` (a directory, or `builtin`) or the checkpoint's own; and
    its `tokenizer.chat_template`, if any, is template text or a readable file."""
    opts = TokenizerOptions.of(getattr(cfg, "tokenizer", None))
    try:
        opts.template()
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    if opts.path == "builtin":
        return
    path, key = (opts.path, _path_key(cfg)) if opts.path else (cfg.model.path, "model.path")
    if Path(path) in produced:
        return
    if not Path(path, "tokenizer_config.json").is_file():
        raise ConfigError(f"{source}: '{key}': no tokenizer in '{path}' (no tokenizer_config.json; for a model YAML "
                          "with fresh weights set tokenizer: builtin)")


def check_reward(spec: dict, source: str, key: str, produced: set) -> None:
    """A reward spec's handlers and options, and the model directories they read, without loading any model."""
    from rewards import RewardError, check_reward_spec

    try:
        check_reward_spec(spec, exists=lambda path: _exists(path, produced))
    except RewardError as err:
        raise ConfigError(f"{source}: '{key}': {err}") from None


def check_builtin(spec: dict, source: str, key: str, registry: str = "tasks") -> None:
    """Built-in data options: task (or preference category) names, option names and types."""
    from data_recipes import check_builtin as check
    from data_recipes.preferences import CATEGORY, PREFERENCE_BUILDERS
    from data_recipes.tasks import TASKS

    if registry == "preferences":
        check(spec, PREFERENCE_BUILDERS, source, key, noun=CATEGORY)
    else:
        check(spec, TASKS, source, key, named_sets=registry == "eval")


def check_rollout(rollout) -> None:
    """A vLLM rollout backend (`RolloutOptions.backend`) needs vLLM and a GPU here: say so before any model work
    (ImportError / RuntimeError with the install hint, as `import_vllm` raises them)."""
    if rollout.backend == "vllm":
        from alignment.rollout.vllm_backend import import_vllm

        import_vllm()


def check_launch(cfg, source: str) -> None:
    """What only matters once a stage runs here (not part of `check`, which validates configs on any machine): a
    `training.deepspeed` file needs DeepSpeed installed (the `deepspeed` extra) and must be valid JSON."""
    path = getattr(getattr(cfg, "training", None), "deepspeed", None)
    if not path:
        return
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ImportError(f"{source}: 'training.deepspeed' names {path}, but DeepSpeed is not installed: "
                          "pip install -e '.[deepspeed]' (or drop the key for plain DDP)") from None
    try:
        json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{source}: 'training.deepspeed': {path} is not valid JSON: {err}") from None


# -- output directory --------------------------------------------------------------------------------------------


def _record(cfg) -> dict:
    return {k: v for k, v in json.loads(json.dumps(to_dict(cfg), default=str)).items() if k not in MAY_CHANGE}


def finished(cfg, overwrite: bool) -> dict | None:
    """The metrics of a finished stage (its `final/metrics.json`, written last) when there is one and not
    `overwrite`; otherwise None, after checking that what is in `cfg.output_dir` can be resumed. Writes nothing.

    A re-run resumes from the checkpoints, cached evaluation, pairs or prompt pools in the output directory, so they
    must come from the same inputs: the config is recorded in `stage_config.json` (by `claim`) and a run whose model,
    tokenizer, data, rewards or seed differ is refused (resuming another model's checkpoint would silently mix
    weights and tokenizers); training length, LR, logging and evaluation may change between runs.
    """
    out = Path(cfg.output_dir)
    done = out / "final" / "metrics.json"
    if done.is_file() and not overwrite:
        if is_main():
            print(f"{done.parent} is complete; nothing to do (pass --overwrite to train again)")
        return json.loads(done.read_text())
    record = out / "stage_config.json"
    recorded, current = (json.loads(record.read_text()) if record.is_file() else None), _record(cfg)
    if not overwrite and recorded is not None and recorded != current:
        changed = sorted(_diff_keys(recorded, current))
        raise ConfigError(f"{out} holds an unfinished run with a different config (changed: {', '.join(changed)}); "
                          "pass --overwrite to start again, or use another output_dir")
    return None


def claim(cfg, overwrite: bool) -> Path:
    """Take `cfg.output_dir` once the stage's inputs have loaded: `--overwrite` clears everything but `final/`
    (replaced only when the new run finishes), the config is recorded, TensorBoard logs go to `<out>/tensorboard`
    (transformers reads the variable when the trainer is built). The main process does both; every rank returns
    after they are done. Returns the output directory."""
    out = Path(cfg.output_dir)
    if is_main():
        if overwrite:
            for child in out.iterdir() if out.is_dir() else []:
                if child.name != "final":
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        write_json_atomic(out / "stage_config.json", _record(cfg))
    barrier()
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tensorboard")
    return out


def _diff_keys(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b)) for k in _diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


# -- model inputs and evaluation -----------------------------------------------------------------------------------


def stage_tokenizer(cfg):
    """The stage's tokenizer: `tokenizer.path` (or plain `tokenizer`) null -> the one saved with `model.path`;
    `builtin` -> the built-in BPE sized to the model YAML's vocabulary (deterministic under the seed, so a resume
    rebuilds the same one); otherwise a local tokenizer directory. `tokenizer.chat_template`, if given, replaces
    its chat template (and so is saved with it in `final/`)."""
    from alignment.modeling import load_tokenizer, model_config_from_yaml

    opts = TokenizerOptions.of(getattr(cfg, "tokenizer", None))
    template = opts.template()  # a bad template fails before a tokenizer is trained or loaded
    if opts.path == "builtin":
        from data_recipes.tokenizer import builtin_tokenizer

        path = cfg.model.path
        vocab = model_config_from_yaml(path).vocab_size if path.endswith((".yaml", ".yml")) else 512
        tokenizer = builtin_tokenizer(vocab_size=vocab, seed=cfg.seed)
    else:
        tokenizer = load_tokenizer(opts.path, key=_path_key(cfg)) if opts.path else load_tokenizer(cfg.model.path)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def _path_key(cfg) -> str:
    """The config key that names the tokenizer directory, for errors: `tokenizer` or `tokenizer.path`."""
    return "tokenizer.path" if isinstance(cfg.tokenizer, TokenizerOptions) else "tokenizer"


def evaluate_sets(model, tokenizer, sets: dict, opts) -> dict:
    """Held-out accuracy per set with the stage's `eval` options: the built-in `sets` (`data_recipes.evaluation.
    evaluate`), then each of `opts.files` scored by its verifier (`evaluate_files`; the files were checked by
    `check_eval_files` before the stage started)."""
    from data_recipes.evaluation import evaluate, evaluate_files, load_eval_files

    metrics = evaluate(model, tokenizer, sets, opts.max_new_tokens, opts.batch_size)
    if getattr(opts, "files", None):
        metrics.update(evaluate_files(model, tokenizer, load_eval_files(opts.files), opts.max_new_tokens,
                                      opts.batch_size))
    return metrics


def check_eval_files(cfg, source: str) -> None:
    """A stage's `eval.files` (every stage with an `eval` section): entries, verifier specs and every row against
    the fields its verifier reads, before any model loads."""
    files = getattr(getattr(cfg, "eval", None), "files", None)
    if files:
        from data_recipes.evaluation import load_eval_files

        load_eval_files(files, source, "eval.files")


def load_policy(cfg, tokenizer, trl_args):
    """The stage's model (`cfg.model`, through the one loader) and, with `training.zero_init`, its trainer's
    arguments (`trl_args()`), else None (the stage builds them when it builds its trainer).

    Loaded partitioned (`training.zero_init`): the arguments come first, so that their DeepSpeed ZeRO-3 config is
    the active one and transformers loads the checkpoint under zero.Init (each rank reads and keeps its slice of
    every weight), on the process group set up for it (`prepare_zero_init`); the stage's work before training then
    runs on every rank (`alignment.distributed.forward_ready`). Otherwise the arguments must wait: while a ZeRO-3
    config is active every load is partitioned and every `generate` waits on the other ranks, and the main
    process's work on the whole model (the 'before' evaluation, DPO pairs, the prompt pool) would hang."""
    from alignment.distributed import local_numel, prepare_zero_init
    from alignment.modeling import load_model

    args = None
    if cfg.training.zero_init:
        args = trl_args()
        prepare_zero_init(args)
    model = load_model(cfg.model, seed=cfg.seed, tokenizer=tokenizer)
    if args is not None:
        print(f"[{cfg.title}] loaded partitioned (zero.Init): this rank holds {local_numel(model):,} of "
              f"{sum(p.ds_numel for p in model.parameters()):,} parameters")
    return model, args


def every_rank_samples(args, backend: str) -> bool:
    """Whether a stage's sampling before training (DPO pairs, the GRPO prompt pool) runs on every rank: for a model
    loaded partitioned (`load_policy` returned its arguments) generating with the transformers backend, each forward
    needs every rank (they compute the same samples; the main process's are kept). A vLLM engine holds its own
    weights (every rank starts one): the main process samples alone, as it does on a whole model."""
    return args is not None and backend != "vllm"


def cached_eval_before(out: Path, model, evaluate_fn) -> dict:
    """The stage's held-out metrics before training, computed once and kept in `<out>/eval_before.json` across
    resumes (the 'before' model is the stage's input, not a half-trained checkpoint). Under a launcher every rank gets
    them: the main process computes them on a whole `model`; on one loaded partitioned (`training.zero_init`) every
    rank takes part and the main process's result is kept (`alignment.distributed.computed_once`); it alone writes."""
    path = Path(out) / "eval_before.json"
    if path.is_file():
        return json.loads(path.read_text())

    def compute():
        before = evaluate_fn()
        if is_main():
            write_json_atomic(path, before)
        return before

    return computed_once(model, compute)


def short(metrics: dict) -> str:
    """`key=0.123, ...` for one log line."""
    return ", ".join(f"{k}={v:.3f}" for k, v in metrics.items())


# -- training and the end of a stage -------------------------------------------------------------------------------


def train_resuming(trainer, cfg):
    """`trainer.train()` from the last complete checkpoint in `<output_dir>/checkpoints`, if there is one; returns
    the train result and that checkpoint (None for a fresh start). A checkpoint at the last step (killed during the
    final evaluation or save) means training is done: its weights are loaded and no step is trained again."""
    from alignment.checkpointing import kill_if_requested, last_checkpoint

    last = last_checkpoint(Path(cfg.output_dir) / "checkpoints")
    if last:
        print(f"[{cfg.title}] resuming from {last}")
    result = trainer.train(resume_from_checkpoint=last)
    kill_if_requested("trained")
    return result, last


def series_ends(history: list[dict], keys) -> dict:
    """`{key}/first` and `{key}/last` of each series logged in a Trainer's log history (keys never logged are left
    out)."""
    ends = {}
    for key in keys:
        series = [e[key] for e in history if key in e]
        if series:
            ends[f"{key}/first"], ends[f"{key}/last"] = series[0], series[-1]
    return ends


def finish(cfg, trainer, result, last, tokenizer, before: dict, after: dict, *, curve_keys: tuple,
           notes: dict | None = None, train: dict | None = None, extra: dict | None = None,
           extra_files: dict | None = None, heading: str = "held-out metrics") -> dict:
    """The end of every training stage: the metrics dict (`stage`, `before`, `after`, `train` = the trainer's result
    + `train` + the first/last value of each curve key, `extra` sections, `config`), then `<output_dir>/final`
    written atomically (LoRA merged; `extra_files` = {name: json data} beside it; `metrics.json` last, its presence
    marks a finished stage), metrics.json, log_history.json, curves.png and summary.md in the output dir.

    Under a launcher every rank calls it: a DeepSpeed (ZeRO-3) model's `final/` is streamed a decoder layer at a
    time (`alignment.checkpointing.save_streamed`: every rank gathers, LoRA merged out of place), the main process
    alone writes every file, and every rank returns once they are written."""
    from itertools import chain

    from alignment.checkpointing import kill_if_requested, persistent_buffers, save_streamed
    from alignment.rollout.vllm_backend import vllm_checkpoint_tensors
    from alignment.reporting import (atomic_directory, plot_curves, summary_markdown, write_log_history,
                                     write_text_atomic)

    history = trainer.state.log_history
    metrics = {"stage": cfg.title, "before": before, "after": after, **(extra or {}),
               "train": {**result.metrics, **(train or {}), "resumed_from": last,
                         "global_step": trainer.state.global_step, **series_ends(history, curve_keys)},
               "config": to_dict(cfg)}
    out = Path(cfg.output_dir)
    final = out / "final"
    model = trainer.model
    lora = hasattr(model, "merge_and_unload")
    # Under DeepSpeed (ZeRO-3: partitioned) the checkpoint is streamed a decoder layer at a time, LoRA merged out of
    # place: every rank gathers each layer, the main process writes shard by shard, so no host ever holds the whole
    # model (0.9 TB at 456B); what it writes equals save_pretrained's files (tests/test_weight_stream.py).
    streamed = trainer.is_deepspeed_enabled
    to_save = model.get_base_model() if streamed and lora else model

    def stream():
        return chain(vllm_checkpoint_tensors(model), persistent_buffers(to_save))

    if not is_main():
        if streamed:
            save_streamed(stream(), to_save, None)
        barrier()
        return metrics
    with atomic_directory(final) as tmp:
        if streamed:
            save_streamed(stream(), to_save, tmp)
        else:
            (model.merge_and_unload() if lora else model).save_pretrained(tmp, safe_serialization=True)
        kill_if_requested("saving")  # crash tests: half of final/ written
        tokenizer.save_pretrained(tmp)
        for name, data in (extra_files or {}).items():
            write_json_atomic(tmp / name, data)
        write_json_atomic(tmp / "metrics.json", metrics)
    write_json_atomic(out / "metrics.json", metrics)
    write_log_history(out, history)
    plotted = plot_curves(history, out / "curves.png", keys=curve_keys)
    loss = metrics["train"]
    notes = {**({"training loss": f"{loss['loss/first']} -> {loss['loss/last']}"} if "loss/first" in loss else {}),
             **(notes or {}), "curves": f"curves.png ({', '.join(plotted)})", "checkpoint": str(final)}
    write_text_atomic(out / "summary.md", summary_markdown(f"{cfg.title}: {heading}", before, after, notes))
    print(f"[{cfg.title}] wrote {final}, {out / 'summary.md'}")
    barrier()  # the other ranks return (and a pipeline moves on) only once final/ is complete
    return metrics
