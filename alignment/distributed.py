"""The few cross-rank facts and moves a stage needs under `torchrun` / `accelerate launch`, on accelerate's own state.

One process (no launcher) is the default and everything here is then a no-op: `is_main()` is True, `barrier()`
returns, `main_computes(fn)` calls `fn`. Under a launcher, accelerate's `PartialState` owns the process group (the
same one the Trainer's `Accelerator` uses later, so nothing is initialised twice; on CPU it is gloo).

The rule every stage follows: one writer per file. The main process (global rank 0) writes metrics, reports,
manifests, pairs, prompt pools and `final/`; every rank reaches a `barrier()` before anyone reads what it wrote.
Work whose result every rank needs but only one should do (an evaluation of an unsharded model, building DPO pairs)
goes through `main_computes`, which runs it on rank 0 and broadcasts the picklable result.
"""

from __future__ import annotations

import os


def _state():
    import torch
    from accelerate import PartialState

    # cpu=True on a machine without CUDA, as the stages' TrainingArguments ask (use_cpu): without it accelerate
    # sets up no process group on CPU at all (gloo), and PartialState keeps the first call's settings
    return PartialState(cpu=not torch.cuda.is_available())


def launched() -> bool:
    """True under a multi-process launcher (torchrun / accelerate launch set WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world_size() -> int:
    return _state().num_processes if launched() else 1


def rank() -> int:
    return _state().process_index if launched() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Every rank waits here until all have arrived (a no-op in one process)."""
    if launched():
        _state().wait_for_everyone()


def broadcast(obj, src: int = 0):
    """`obj` as rank `src` has it, on every rank (picklable objects; a no-op in one process)."""
    if not launched():
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=src)
    return box[0]


def main_computes(fn):
    """`fn()` run on the main process only, its result broadcast to every rank. For work on an unsharded model
    (every rank holds the same weights): the other ranks would only repeat it, and repeat its file writes."""
    result = fn() if is_main() else None
    return broadcast(result)


def is_sharded(model) -> bool:
    """True when `model`'s parameters are DeepSpeed ZeRO-3 partitions (each rank holds a slice; a forward needs
    every rank, so work on it cannot run on the main process alone)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def computed_once(model, fn):
    """`fn()` (work on a trained `model`: an evaluation, a fitted threshold) with one result on every rank. For a
    whole model the main process computes it alone and broadcasts it (the other ranks hold the same weights); a
    ZeRO-3-sharded one needs every rank in each forward (transformers' generate keeps them in step then), so every
    rank runs `fn` and the main process's result is the one kept."""
    return broadcast(fn()) if is_sharded(model) else main_computes(fn)
