"""Crash-safe, resumable Trainer checkpoints: a `checkpoint-N` directory either is complete or does not exist, and
resuming from it restores every weight.

transformers' `Trainer._save_checkpoint` writes model, optimizer, scheduler, RNG and trainer state straight into
`checkpoint-N`; a crash half-way leaves a directory that `get_last_checkpoint` happily resumes from (and then fails,
or worse, loads a model without its optimizer). `SafeCheckpoints` makes the parent write into a staging directory
(`<output_dir>/.staging/checkpoint-N`) and renames it into place only when every file is written — a rename within
one filesystem is atomic — then applies `save_total_limit` to the real directory. Leftover staging from a crash is
removed at the next save or by `clean_staging`.

Resume state (optimizer, scheduler, RNG, data position) is transformers' own: `resume_from_checkpoint` restores them
and skips the batches already seen, so a resumed run follows the same data order as an uninterrupted one. The model
weights are not: transformers 5 saves MiniMax in the original checkpoint layout (`block_sparse_moe.experts.E.w1/w2/w3`,
`block_sparse_moe.gate`) but `Trainer._load_from_checkpoint` reads the file back with a non-strict `load_state_dict`
and no layout conversion, so every expert and router weight is silently left as it was at the start of the stage.
`SafeCheckpoints` loads them through `from_pretrained` (which converts) and copies them in strictly.

Fault injection for crash tests: `ALIGNMENT_KILL_AT=save:N` SIGKILLs the process half-way through writing checkpoint
N (model written, optimizer not yet), `ALIGNMENT_KILL_AT=step:N` right after optimizer step N, `ALIGNMENT_KILL_AT=trained`
once training has finished (its last checkpoint written, the final evaluation not yet), `ALIGNMENT_KILL_AT=saving`
half-way through writing the stage's `final/`. It only ever kills
the process that sets it, and is read nowhere else. Under a launcher every rank inherits it: `ALIGNMENT_KILL_RANK=R`
restricts it to global rank R (the launcher then takes the other ranks down, as it does for any dead rank).

Several ranks (torchrun, DeepSpeed): every rank writes its own part of `checkpoint-N` into the same staging directory
(its RNG state; under ZeRO-3 its optimizer and parameter partitions), the main process alone cleans staging and
renames, with a barrier on either side, so a checkpoint is complete for every rank or absent for all.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints

from alignment.distributed import is_main
from alignment.modeling import make_packing_safe

STAGING = ".staging"
KILL_ENV = "ALIGNMENT_KILL_AT"
KILL_RANK_ENV = "ALIGNMENT_KILL_RANK"


def _kill_requested(kind: str, step: int | None = None) -> bool:
    if os.environ.get(KILL_RANK_ENV, os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return False
    return os.environ.get(KILL_ENV, "") == (kind if step is None else f"{kind}:{step}")


def kill_if_requested(point: str) -> None:
    """SIGKILL this process at a named point of a stage when `ALIGNMENT_KILL_AT=<point>` (crash tests)."""
    if _kill_requested(point):
        os.kill(os.getpid(), signal.SIGKILL)


def clean_staging(output_dir: str | Path) -> None:
    """Remove half-written checkpoints left by a crash."""
    shutil.rmtree(Path(output_dir) / STAGING, ignore_errors=True)


def last_checkpoint(output_dir: str | Path) -> str | None:
    """The newest complete `checkpoint-N` in `output_dir` (staging never counts), or None."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    if is_main():  # staging is never read, so the other ranks need not wait for its removal
        clean_staging(output_dir)
    return get_last_checkpoint(str(output_dir))


class _KillAfterStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if _kill_requested("step", state.global_step):
            os.kill(os.getpid(), signal.SIGKILL)


class SafeCheckpoints:
    """Trainer mixin (put it first in the bases): checkpoints are staged then renamed into place, and resuming
    loads every weight (strictly, through the checkpoint-layout conversion)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if os.environ.get(KILL_ENV):
            self.add_callback(_KillAfterStep())

    def _save_checkpoint(self, model, trial):
        run_dir = Path(super()._get_output_dir(trial=trial))
        staging = run_dir / STAGING
        if self.args.should_save:
            clean_staging(run_dir)
        self.accelerator.wait_for_everyone()  # no rank writes into staging before a crash's leftovers are gone
        self._staging_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)  # writes staging/checkpoint-N via _get_output_dir below
        finally:
            self._staging_dir = None
        name = f"checkpoint-{self.state.global_step}"
        self.accelerator.wait_for_everyone()  # every rank's shards are in staging before the rename
        if self.args.should_save:
            target = run_dir / name
            if target.exists():  # a re-save of the same step (e.g. after a resume): replace it
                shutil.rmtree(target)
            os.replace(staging / name, target)
            clean_staging(run_dir)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint)

    def _get_output_dir(self, trial):
        staging = getattr(self, "_staging_dir", None)
        return staging if staging else super()._get_output_dir(trial=trial)

    def _save_optimizer_and_scheduler(self, output_dir):
        if _kill_requested("save", self.state.global_step):  # model files are written, optimizer is not
            os.kill(os.getpid(), signal.SIGKILL)
        super()._save_optimizer_and_scheduler(output_dir)

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint,
                             trial):
        # transformers resumed from a checkpoint at the last step (a run killed during its final evaluation or save)
        # still enters the epoch loop and trains one step past max_steps before it checks for the end; start
        # "after the last epoch" instead, so the resumed run ends with the uninterrupted run's weights.
        epochs_trained, steps_in_epoch = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial)
        if resume_from_checkpoint is not None and self.state.global_step >= max_steps:
            return num_train_epochs, 0
        return epochs_trained, steps_in_epoch

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = model if model is not None else self.model
        plain = (Path(resume_from_checkpoint, "config.json").is_file() and not hasattr(model, "peft_config")
                 and not self.is_deepspeed_enabled and not self.is_fsdp_enabled)
        if not plain:  # adapters, DeepSpeed and FSDP checkpoints keep their own loaders and layouts
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        saved = type(model).from_pretrained(resume_from_checkpoint, dtype=next(model.parameters()).dtype)
        model.load_state_dict(make_packing_safe(saved).state_dict(), strict=True)  # same saved tensors both sides


# -- a checkpoint written from a stream (ZeRO-3: never the whole model in one host's memory) -----------------------


def persistent_buffers(model):
    """(name, buffer) of `model`'s buffers that `save_pretrained` writes (the persistent ones: MiniMax's lightning
    decay buffers). Buffers are never ZeRO-3 partitions: every rank holds them whole."""
    for prefix, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                yield f"{prefix}.{name}" if prefix else name, buffer


def save_streamed(tensors, model, out_dir: str | Path | None, max_shard_bytes: int = 5 * 2**30) -> None:
    """A checkpoint written from a stream of (name, tensor) in the checkpoint layout (for a ZeRO-3 model,
    `vllm_checkpoint_tensors` gathers them a decoder layer at a time), holding at most one shard of copies in host
    memory: `model.safetensors` when one shard of `max_shard_bytes` holds everything (the file `save_pretrained`
    writes), else `model-0000i-of-0000N.safetensors` with `model.safetensors.index.json` (transformers' sharded
    layout), then `model`'s config.json (its dtype: the weights') and generation_config.json. Every rank must consume
    the stream to its end (each gather in it is a collective); a rank with `out_dir=None` writes nothing."""
    import copy
    import json
    from collections import Counter

    from safetensors.torch import save_file

    out = Path(out_dir) if out_dir is not None else None
    shards: list[tuple[Path, list[str]]] = []
    current: dict = {}
    size = total = 0
    dtypes: Counter = Counter()

    def flush():
        nonlocal current, size
        if current:
            path = out / f".shard-{len(shards):05d}.safetensors"
            save_file(current, str(path), metadata={"format": "pt"})
            shards.append((path, list(current)))
        current, size = {}, 0

    for name, tensor in tensors:
        if out is None:
            continue
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[name] = tensor.detach().to("cpu", copy=True).contiguous()  # the stream's tensor lasts its group
        size, total = size + nbytes, total + nbytes
        if tensor.is_floating_point():
            dtypes[tensor.dtype] += tensor.numel()
    if out is None:
        return
    flush()
    if len(shards) == 1:
        shards[0][0].rename(out / "model.safetensors")
    else:
        weight_map = {}
        for i, (path, names) in enumerate(shards, 1):
            final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            path.rename(out / final)
            weight_map.update(dict.fromkeys(names, final))
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    if dtypes:
        config.dtype = dtypes.most_common(1)[0][0]
    config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(out)
