"""A DeepSpeed ZeRO-3 policy feeding an in-process vLLM engine, on one GPU (world size 1: every parameter is still a
ZeRO-3 partition, gathered for each forward). Skipped without a CUDA GPU, vLLM, flash-linear-attention and DeepSpeed;
each case runs in its own process under torchrun (DeepSpeed reads its rank from the launcher's environment).

- The engine `VLLMRollout` builds from the partitioned policy (dummy weights, then the stream of
  `alignment.distributed.merged_layers`, a decoder layer whole at a time) holds exactly the bits that the sync of the
  same weights from an unsharded copy writes; after a real DeepSpeed optimizer step the direct sync from the
  partitions and vLLM's own loader fed from them both write exactly what the unsharded sync writes. The three syncs
  are timed and printed; the engine's log-probs follow the trainer's.
- The GRPO stage with `training.deepspeed` (ZeRO-3) on vLLM rollouts, from `test_vllm_rollout`'s GPU-taught
  checkpoint: pool, steps with a sync from the partitions
  before each rollout, evaluation and a complete `final/`.

The CPU side of the stream (2 ranks, bit for bit against a one-process merge) is `tests/test_weight_stream.py`.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# gpu_checkpoint, tokenizer: fixtures (a GPU-taught chat checkpoint)
from test_vllm_rollout import gpu_checkpoint, grpo_on_vllm_config, tokenizer  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
BASE = "configs/7m/base"  # the committed 7M base: head_dim 64, as vLLM's MiniMax kernels want
HAS_ALL = torch.cuda.is_available() and all(importlib.util.find_spec(m) for m in ("vllm", "fla", "deepspeed"))
pytestmark = pytest.mark.skipif(not HAS_ALL, reason="needs a CUDA GPU, vLLM, flash-linear-attention and DeepSpeed "
                                                    "(the `gpu` and `deepspeed` extras)")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "ALIGNMENT_LIMIT_AUTOTUNE": "1", "DS_ACCELERATOR": "cuda",
       "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """One process under torchrun; past `timeout` the process is killed and the test fails with what it printed."""
    from test_multiprocess import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", str(free_port()),
           *args]
    try:
        return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        printed = [(t.decode() if isinstance(t, bytes) else t or "")[-4000:] for t in (err.stdout, err.stderr)]
        pytest.fail(f"{' '.join(args)}: still running after {timeout} s\n" + "\n".join(printed))


def test_engine_from_zero3_partitions_holds_the_unsharded_bits(tmp_path):
    out = tmp_path / "sync.json"
    proc = torchrun(str(Path(__file__)), str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    m = json.loads(out.read_text())
    print("ZeRO-3 -> vLLM at world size 1:", json.dumps(m))
    assert m["sharded"] and m["planned"] == m["engine_parameters"] and m["uncovered"] == 0
    assert m["initial_equal"] and m["changed_by_step"] > 0
    assert m["direct_equal"] and m["loader_equal"]
    assert m["mismatch"]["mismatch/prob_corr"] > 0.99 and m["mismatch"]["mismatch/logp_abs_mean"] < 0.05


def _sync_worker(out: str) -> None:
    """The process of `test_engine_from_zero3_partitions_holds_the_unsharded_bits`."""
    import time

    import deepspeed

    from alignment.distributed import is_sharded, merged_parameters
    from alignment.modeling import ModelOptions, load_model, load_tokenizer
    from alignment.rollout import logprob_mismatch
    from alignment.rollout.vllm_backend import VLLMRollout
    from test_vllm_rollout import padded, trainer_logprobs

    deepspeed.init_distributed(dist_backend="nccl")
    tokenizer = load_tokenizer(BASE)
    model = load_model(ModelOptions(path=BASE, dtype="bfloat16"), tokenizer=tokenizer)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                      config=config)
    policy = engine.module

    def unsharded():
        """The policy's weights gathered all at once into a plain (unpartitioned) copy of the model."""
        whole = {name: t.detach().clone() for name, t in merged_parameters(policy)}  # a tensor lasts its group
        plain = load_model(ModelOptions(path=BASE, dtype="bfloat16"), tokenizer=tokenizer).cuda()
        missing, unexpected = plain.load_state_dict(whole, strict=False)
        assert not unexpected and all("decay" in n or "slope" in n for n in missing), (missing, unexpected)
        return plain.eval()

    def snapshot(worker):
        return {name: p.detach().clone() for name, p in worker._params.items()}

    def equal(a, b):
        return all(torch.equal(a[n], b[n]) for n in a)

    result = {"sharded": is_sharded(policy)}
    start = time.perf_counter()
    worker = VLLMRollout(policy, tokenizer, gpu_memory_utilization=0.2, max_model_len=512, max_num_seqs=64)
    result["engine_start_s"] = round(time.perf_counter() - start, 1)
    try:
        result.update(engine_parameters=len(worker._params), planned=len(worker._plan),
                      uncovered=len(worker.direct_sync_uncovered))
        initial = snapshot(worker)  # dummy weights overwritten by the load through the stream
        worker.sync_weights(unsharded(), method="direct")
        result["initial_equal"] = equal(initial, snapshot(worker))

        # a real optimizer step of the partitioned policy
        ids = torch.randint(3, 1000, (1, 64), generator=torch.Generator().manual_seed(0)).cuda()
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()

        sync_s = {}
        worker.sync_weights(policy, method="direct")
        sync_s["zero3_direct"] = worker.last_sync_s
        from_partitions = snapshot(worker)
        result["changed_by_step"] = sum(not torch.equal(from_partitions[n], initial[n]) for n in initial)
        worker.sync_weights(policy, method="loader")
        sync_s["zero3_loader"] = worker.last_sync_s
        through_loader = snapshot(worker)
        plain = unsharded()
        worker.sync_weights(plain, method="direct")
        sync_s["unsharded_direct"] = worker.last_sync_s
        reference = snapshot(worker)
        result["direct_equal"] = equal(from_partitions, reference)
        result["loader_equal"] = equal(through_loader, reference)
        result["sync_s"] = {k: round(v, 4) for k, v in sync_s.items()}

        prompts = [[{"role": "user", "content": f"What is {a} + {b}?"}] for a in range(4) for b in range(4)]
        from alignment.rollout import SamplingOptions

        batch = worker.generate(prompts, n=1, sampling=SamplingOptions(temperature=1.0, max_new_tokens=12))
        rollout, mask = padded(batch.logprobs)
        train, _ = padded(trainer_logprobs(plain, batch.prompt_ids, batch.completion_ids))
        result["mismatch"] = logprob_mismatch(train, rollout, mask)
    finally:
        worker.close()
    Path(out).write_text(json.dumps(result))


def test_grpo_stage_under_zero3_on_vllm_rollouts(tmp_path, gpu_checkpoint):
    """`pipelines.grpo` with `training.deepspeed: configs/deepspeed/zero3.json` and `rollout.backend: vllm`, one
    process under torchrun: the engine starts from the partitioned policy and is synced from it before each rollout
    (timed in the step split); `final/` is a complete checkpoint whose weights moved.
    Not yet seen passing: its first run on one H200 (2026-12-04) was still going when the 7-minute limit of that
    device call killed it, and its output went with it (hence the timeout that fails with the output)."""
    from safetensors.torch import load_file

    config = grpo_on_vllm_config(tmp_path, gpu_checkpoint, gpu_memory_utilization=0.2, learning_rate="1.0e-4",
                                 training=", deepspeed: configs/deepspeed/zero3.json")
    proc = torchrun("-m", "pipelines.grpo", "--config", str(config))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    train = json.loads((tmp_path / "run" / "metrics.json").read_text())["train"]
    print("GRPO under ZeRO-3 on vLLM:", json.dumps(train.get("step_time")))
    assert train["global_step"] == 4 and 0 < train["step_time"]["mean_s"]["sync"] < 5
    start = load_file(str(gpu_checkpoint / "model.safetensors"))
    final = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert set(final) == set(start)
    assert any(not torch.equal(start[n].float(), final[n].float()) for n in start)


if __name__ == "__main__":
    _sync_worker(sys.argv[1])
