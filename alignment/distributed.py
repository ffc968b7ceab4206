"""The few cross-rank facts and moves a stage needs under `torchrun` / `accelerate launch`, on accelerate's own state.

One process (no launcher) is the default and everything here is then a no-op: `is_main()` is True, `barrier()`
returns, `main_computes(fn)` calls `fn`. Under a launcher, accelerate's `PartialState` owns the process group (the
same one the Trainer's `Accelerator` uses later, so nothing is initialised twice; on CPU it is gloo).

The rule every stage follows: one writer per file. The main process (global rank 0) writes metrics, reports,
manifests, pairs, prompt pools and `final/`; every rank reaches a `barrier()` before anyone reads what it wrote.
Work whose result every rank needs but only one should do (an evaluation of an unsharded model, building DPO pairs)
goes through `main_computes`, which runs it on rank 0 and broadcasts the picklable result.

A ZeRO-3 model (`is_sharded`) is never made whole at once: what needs its full weights (the vLLM weight sync,
`final/` of a LoRA policy) streams them with `merged_layers`, a decoder layer at a time (`layer_groups`, `gathered`).
"""

from __future__ import annotations

import contextlib
import os
import re


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


def prepare_zero_init(args) -> None:
    """Before a model loads under zero.Init (`training.zero_init`, with `args` the stage's TrainingArguments, whose
    DeepSpeed ZeRO-3 config is then the active one): the process group set up as the Trainer would set it up later,
    and DeepSpeed's communication on it; zero.Init reads the world size it partitions over from there (without it:
    world size 1 and a batch-size mismatch with the config)."""
    import deepspeed

    _ = args.device  # transformers' device set-up initialises the process group (accelerate)
    deepspeed.init_distributed()


@contextlib.contextmanager
def forward_ready(model, args):
    """Inside the block, `model` runs forwards and `generate` though it was loaded partitioned (zero.Init,
    `training.zero_init`) and its trainer's DeepSpeed engine, which would fetch each layer's weights for a
    forward, does not exist yet: a ZeRO-3 inference engine is built around it for the block (no optimizer:
    DeepSpeed's parameter-fetch hooks only, every rank taking part in each forward) and destroyed on exit, its hooks
    taken off the module so that the trainer's engine installs its own. The work a stage does before training (the
    'before' evaluation, DPO pairs, the GRPO prompt pool) runs on it this way, on every rank. TRL wraps a policy in
    the same kind of engine for DPO's precomputed reference log-probs (`trl.models.prepare_deepspeed`); the config
    is the stage's (`args`: its TrainingArguments, whose ZeRO-3 config is the active one), its training-only blocks
    dropped and its hidden-size `auto` values filled as transformers fills them. A model not partitioned: as is."""
    if not is_sharded(model):
        yield model
        return
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, config=inference_config(args.hf_deepspeed_config.config,
                                                                         model.config.hidden_size))
    training = model.training
    model.eval()
    try:
        yield model
    finally:
        engine.destroy()
        model.train(training)


def inference_config(config: dict, hidden_size: int) -> dict:
    """A training DeepSpeed config (transformers' `hf_deepspeed_config.config`: batch sizes filled, the hidden-size
    `auto`s not yet) for an engine without optimizer: no optimizer, scheduler or optimizer offload, one micro-batch,
    the hidden-size `auto`s as transformers' `trainer_config_finalize` fills them, everything else kept.

    >>> c = inference_config({"train_batch_size": 8, "optimizer": {"type": "AdamW"}, "zero_optimization": {
    ...     "stage": 3, "reduce_bucket_size": "auto", "stage3_param_persistence_threshold": 4096,
    ...     "offload_optimizer": {"device": "cpu"}}}, hidden_size=64)
    >>> c["zero_optimization"], c["train_micro_batch_size_per_gpu"], "optimizer" in c, "train_batch_size" in c
    ({'stage': 3, 'reduce_bucket_size': 4096, 'stage3_param_persistence_threshold': 4096}, 1, False, False)
    """
    import copy

    config = copy.deepcopy(config)
    for key in ("optimizer", "scheduler", "train_batch_size"):
        config.pop(key, None)
    config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    zero = config["zero_optimization"]
    zero.pop("offload_optimizer", None)
    fills = {"reduce_bucket_size": hidden_size * hidden_size,
             "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
             "stage3_param_persistence_threshold": 10 * hidden_size}
    zero.update({key: value for key, value in fills.items() if zero.get(key) == "auto"})
    return config


def local_numel(model) -> int:
    """Parameters this rank holds: its ZeRO-3 partitions' sizes, and every whole parameter."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())


def computed_once(model, fn):
    """`fn()` (work on a trained `model`: an evaluation, a fitted threshold) with one result on every rank. For a
    whole model the main process computes it alone and broadcasts it (the other ranks hold the same weights); a
    ZeRO-3-sharded one needs every rank in each forward (transformers' generate keeps them in step then), so every
    rank runs `fn` and the main process's result is the one kept."""
    return broadcast(fn()) if is_sharded(model) else main_computes(fn)


def fresh_deepspeed_state() -> None:
    """Forget the ZeRO-3 config an earlier stage's TrainingArguments left in this process (a pipeline runs its stages
    in one process). transformers keeps it globally, and while it is set every `from_pretrained` partitions the
    model as it loads (zero.Init) and every `generate` waits on the other ranks (synced_gpus): the next stage's model
    would load partitioned, and its main-process work on a whole model (the 'before' evaluation, DPO pairs, the
    GRPO prompt pool) would fail or hang. So every stage starts as it does alone: its model loads whole, its own
    trainer partitions it. (Loading partitioned, for a model no process can hold whole, is not built: that work
    would have to run on every rank.)"""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


@contextlib.contextmanager
def gathered(params):
    """Inside the block, the full values of those of `params` that are ZeRO-3 partitions (each rank all-gathers
    them; released again on exit, changes discarded); whole parameters as they are. The gather is a collective:
    every rank enters it with the same parameters in the same order."""
    shards = [p for p in params if hasattr(p, "ds_id")]
    if not shards:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(shards, modifier_rank=None):
        yield


_LAYER = re.compile(r"^(.*?\blayers\.\d+)\.")
# a wrapped parameter's own module path (peft's LoRA layers and parametrizations sit between module and weight)
_WRAPPED = re.compile(r"\.(?:base_layer|lora_[A-Za-z_]+|parametrizations)\b")


def layer_key(name: str) -> str:
    """The group a parameter `name` is gathered with (`layer_groups`): its decoder layer (`...layers.<i>`), else
    the module it belongs to with any adapter wrapping removed, else the name itself.

    >>> layer_key("model.layers.3.mlp.experts.gate_up_proj")
    'model.layers.3'
    >>> layer_key("lm_head.lora_A.default.weight"), layer_key("lm_head.base_layer.weight"), layer_key("model.norm.weight")
    ('lm_head', 'lm_head', 'model.norm.weight')
    """
    if match := _LAYER.match(name):
        return match.group(1)
    return _WRAPPED.split(name)[0]


def layer_groups(named) -> list[list[tuple[str, object]]]:
    """`named` (name, parameter) pairs grouped by `layer_key`, in their order: one group per decoder layer with its
    adapters, and one per other module. The unit a ZeRO-3 model is gathered in when it is streamed out whole (a
    weight sync, an export): at most one decoder layer's weights are ever whole at once on a rank."""
    groups: dict[str, list] = {}
    for name, param in named:
        groups.setdefault(layer_key(name), []).append((name, param))
    return list(groups.values())


def merged_layers(model):
    """One dict {transformers name: tensor} of base-model weights per decoder layer (and per other module, see
    `layer_groups`), in model order, active LoRA deltas added out of place (the model's own
    weights are not touched). A plain model's tensors are its parameters as they are.

    ZeRO-3 partitions are gathered one group at a time and released when the next group is asked for, so a rank
    never holds more than one decoder layer whole (the sync of a sharded policy; `layer_groups`): a dict is valid
    only until the iteration moves on (copy what you keep), and every rank must run the iteration to its end in
    step (each gather is a collective)."""
    import torch

    peft = hasattr(model, "get_base_model")
    base = model.get_base_model() if peft else model
    lora = _lora_layers(base) if peft else []
    with torch.no_grad():
        for group in layer_groups(base.named_parameters()):
            with gathered([p for _, p in group]):
                ids = {id(p) for _, p in group}
                deltas: dict[int, torch.Tensor] = {}
                for param_id, module, param in lora:
                    if param_id not in ids:
                        continue
                    for adapter in module.active_adapters:
                        if adapter in module.lora_A:
                            delta = module.get_delta_weight(adapter).to(param.dtype)
                            deltas[param_id] = deltas[param_id] + delta if param_id in deltas else delta
                merged = {}
                for name, param in group:
                    if "lora_" in name:
                        continue
                    clean = name.replace(".base_layer", "").replace(".parametrizations", "").replace(".original", "")
                    merged[clean] = param + deltas[id(param)] if id(param) in deltas else param
                yield merged


def _lora_layers(base) -> list:
    """[(id of the base weight, LoRA layer, base weight)] for the active, unmerged LoRA layers of `base`."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    found = []
    for module in base.modules():
        if isinstance(module, LoraLayer) and not module.merged and not module.disable_adapters:
            param = module.get_param() if isinstance(module, ParamWrapper) else module.get_base_layer().weight
            found.append((id(param), module, param))
    return found


def merged_parameters(model):
    """(name, tensor) of every base-model weight, LoRA merged: `merged_layers` flattened (the same validity rule for
    a ZeRO-3 model: a tensor lasts until its layer's group is left)."""
    for group in merged_layers(model):
        yield from group.items()
