"""Streaming a ZeRO-3-partitioned policy out whole, a decoder layer at a time (`alignment.distributed.layer_groups`,
`alignment.distributed.merged_layers`): what the vLLM weight sync of a sharded policy reads.

On one process: the groups are the decoder layers (each with its adapters) and the other modules, and the direct
sync's plan and copies over streamed groups equal those over the whole tensor dict.

On 2 processes (torchrun, gloo, DeepSpeed ZeRO-3 on its CPU accelerator; skipped without DeepSpeed): after a real
optimizer step of the partitioned model (plain and with LoRA adapters on attention and experts), the streamed
weights equal, bit for bit, the same weights gathered all at once and merged in one process; while a group is out,
no parameter of any other group is whole on the rank (the most a rank ever holds whole is one group); and the
direct sync from the stream into a vLLM-shaped parameter set (the layout `tests/test_vllm_rollout.py` writes out
from vLLM 0.22.1's loader) is proved by its plan, then writes the next step's weights exactly. vLLM itself needs a
GPU: the engine side of this sync has not run here.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignment.distributed import layer_groups, layer_key, merged_layers, merged_parameters
from alignment.modeling import LoraOptions, ModelOptions, load_model
from alignment.rollout.vllm_backend import WeightSyncError, copy_direct, direct_sync_plan

ROOT = Path(__file__).resolve().parents[1]
TINY = "configs/tiny/model.yaml"


def tiny(lora: bool):
    return load_model(ModelOptions(path=TINY, lora=LoraOptions(r=4, experts=True) if lora else None), seed=0)


def perturb(model, scale: float = 0.05, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
def test_groups_are_the_layers_with_their_adapters(lora):
    model = tiny(lora)
    base = model.get_base_model() if lora else model
    groups = layer_groups(base.named_parameters())
    keys = [layer_key(group[0][0]) for group in groups]
    n_layers = base.config.num_hidden_layers
    assert keys == ["model.embed_tokens.weight", *(f"model.layers.{i}" for i in range(n_layers)), "model.norm.weight",
                    "lm_head.weight"]
    assert sum(len(g) for g in groups) == len(list(base.named_parameters()))
    if lora:  # each layer's adapters travel with the weights they change
        assert all(any("lora_A" in name for name, _ in g) for g in groups[1:1 + n_layers])
    streamed = [dict(g) for g in merged_layers(model)]
    assert [layer_key(next(iter(g))) for g in streamed] == keys
    assert not any("lora_" in name or "base_layer" in name for g in streamed for name in g)


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
def test_direct_sync_over_streamed_groups_equals_the_whole_dict(lora):
    from test_vllm_rollout import vllm_shaped_parameters

    model = tiny(lora)
    engine = vllm_shaped_parameters(model)
    whole = direct_sync_plan(engine, dict(merged_parameters(model)))
    streamed = direct_sync_plan(engine, merged_layers(model))
    assert streamed == whole and streamed[1] == [] and len(streamed[0]) == len(engine)

    perturb(model)
    assert copy_direct(engine, streamed[0], merged_layers(model)) == len(engine)
    for name, tensor in vllm_shaped_parameters(model).items():
        assert torch.equal(engine[name], tensor), name

    # a planned parameter whose layer the trainer no longer streams is named, not skipped
    with pytest.raises(WeightSyncError, match="unwritten.*model.layers.3"):
        copy_direct(engine, streamed[0], (g for g in merged_layers(model) if "model.layers.3.input_layernorm.weight"
                                          not in g))


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
def test_streamed_checkpoint_is_what_save_pretrained_writes(tmp_path, lora):
    """`save_streamed` (a ZeRO-3 stage's `final/`, written from the layer stream): one shard = save_pretrained's files
    (the merged model's, for LoRA) with the same tensors and config; shards of at most `max_shard_bytes` = the
    sharded layout, which plain `from_pretrained` loads to the same weights."""
    from itertools import chain

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from alignment.checkpointing import persistent_buffers, save_streamed
    from alignment.rollout.vllm_backend import vllm_checkpoint_tensors

    model = tiny(lora)
    if lora:
        perturb(model)  # adapters with non-zero deltas
    base = model.get_base_model() if lora else model
    ref = tmp_path / "ref"
    (copy.deepcopy(model).merge_and_unload() if lora else model).save_pretrained(ref, safe_serialization=True)
    for name, limit in (("one", 2**40), ("sharded", 2**21)):
        (tmp_path / name).mkdir()
        save_streamed(chain(vllm_checkpoint_tensors(model), persistent_buffers(base)), base, tmp_path / name,
                      max_shard_bytes=limit)
    one = tmp_path / "one"
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in ref.iterdir())
    for file in ("config.json", "generation_config.json"):
        assert json.loads((one / file).read_text()) == json.loads((ref / file).read_text()), file
    got, want = load_file(one / "model.safetensors"), load_file(ref / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((tmp_path / "sharded" / f).stat().st_size <= 2**21 + 2**16 for f in files)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").state_dict()
    reference = AutoModelForCausalLM.from_pretrained(ref).state_dict()
    assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in reference)


# -- two ranks, DeepSpeed ZeRO-3 -----------------------------------------------------------------------------------


def _deepspeed_runs_here() -> bool:
    from test_multiprocess import _deepspeed_runs_here as runs

    return runs()


@pytest.mark.skipif(not _deepspeed_runs_here(), reason="DeepSpeed not installed (pip install -e '.[deepspeed]')")
@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
def test_zero3_stream_on_two_ranks(tmp_path, lora):
    from test_multiprocess import ENV, free_port

    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           str(Path(__file__)), str(out), "lora" if lora else "plain"]
    result = subprocess.run(cmd, cwd=ROOT, env={**ENV, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    measured = json.loads(out.read_text())
    # every rank: the stream equals the one-process merge of the gathered weights, and never more than one group
    # was whole at once (the largest group is a decoder layer, well under half the model)
    assert measured["max_abs_gap"] == 0.0 and measured["max_abs_gap_after_sync"] == 0.0
    assert measured["peak_whole_numel"] <= measured["largest_group_numel"] < measured["total_numel"] / 2
    assert measured["others_whole_while_streaming"] == 0
    assert measured["planned"] == measured["engine_parameters"] and measured["uncovered"] == 0


def _worker(out: str, variant: str) -> None:
    """One rank of `test_zero3_stream_on_two_ranks`."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from test_vllm_rollout import vllm_shaped_parameters

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    lora = variant == "lora"
    model = tiny(lora)
    if lora:  # peft starts B at 0: give every adapter a non-zero delta
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable, lr=1e-2), config=config)
    policy = engine.module
    everything = list(policy.named_parameters())
    assert all(hasattr(p, "ds_id") for _, p in everything)  # partitioned: the case the stream is for

    def step(seed: int) -> None:
        ids = torch.randint(3, 1000, (1, 48), generator=torch.Generator().manual_seed(seed + rank))
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()

    def reference():
        """The policy's weights gathered all at once, merged in one process: a fresh copy of the model with the
        gathered values, through the unsharded path of `merged_parameters` (itself checked against peft's
        merge_and_unload in tests/test_vllm_rollout.py)."""
        with deepspeed.zero.GatheredParameters([p for _, p in everything]):
            values = {name: p.detach().clone() for name, p in everything}
        copy = tiny(lora)
        with torch.no_grad():
            for name, p in copy.named_parameters():
                p.copy_(values[name])
        return copy

    base = policy.get_base_model() if lora else policy
    groups = layer_groups(base.named_parameters())
    group_of = {id(p): i for i, g in enumerate(groups) for _, p in g}
    sizes = [sum(p.ds_numel for _, p in g) for g in groups]

    step(0)
    ref = reference()
    expected = dict(merged_parameters(ref))
    peak, others, gap = 0, 0, 0.0
    for i, group in enumerate(merged_layers(policy)):
        whole = [p for _, p in everything if p.ds_status == ZeroParamStatus.AVAILABLE]
        peak = max(peak, sum(p.ds_numel for p in whole))
        others += sum(group_of[id(p)] != i for p in whole)
        gap = max([gap, *(float((t - expected[n]).abs().max()) for n, t in group.items())])
        assert group.keys() <= expected.keys()

    # the direct sync: plan proved on the stream against an engine loaded with these weights, then the next
    # step's weights copied in from the stream
    fake_engine = vllm_shaped_parameters(ref)
    plan, uncovered = direct_sync_plan(fake_engine, merged_layers(policy))
    step(1)
    copy_direct(fake_engine, plan, merged_layers(policy))
    after = vllm_shaped_parameters(reference())
    gap_after = max(float((fake_engine[n].float() - t.float()).abs().max()) for n, t in after.items())
    result = dict(max_abs_gap=gap, max_abs_gap_after_sync=gap_after, peak_whole_numel=peak,
                  largest_group_numel=max(sizes), total_numel=sum(sizes), others_whole_while_streaming=others,
                  planned=len(plan), uncovered=len(uncovered), engine_parameters=len(fake_engine))
    results = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(results, result)
    if rank == 0:  # the worst of the ranks
        worst = {k: max(r[k] for r in results) if k != "planned" else min(r[k] for r in results) for k in result}
        Path(out).write_text(json.dumps(worst, indent=1))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # before exit: gloo's threads torn down at exit can abort the rank


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _worker(sys.argv[1], sys.argv[2])
