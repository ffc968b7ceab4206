"""The recipe on 2 processes (torchrun, gloo, CPU) against 1 process with the same global batch: SFT -> DPO -> GRPO
from the tiny base, a few steps each.

- one pipeline run on 2 ranks ends with the final metrics and weights of the 1-process run (float tolerance: `TOL`),
  every stage's `final/` complete (the files a 1-process run writes) and loadable by plain AutoModelForCausalLM;
- SIGKILL of rank 1 mid-GRPO (right after optimizer step 5), then a re-run, ends where the uninterrupted run ends;
- DeepSpeed ZeRO-3 (CPU accelerator, gloo; `make setup` installs DeepSpeed): SFT -> DPO -> GRPO on 2 ranks ends
  with the 1-process metrics and gathered checkpoints, loaded whole and partitioned (`training.zero_init`); LoRA on
  a ZeRO-3 base (SFT, DPO) writes the 1-process merged checkpoint.

Per-rank batches are the global batch / 2 (each rank a contiguous block of it; GRPO: one group of G per rank). GRPO
samples with `rollout.seed_groups` (each group under its own seed), without which each rank's sampler stream would
make the rollouts, not the training, differ from one process's. Dynamic sampling is on (max_refills 1), so the
cross-rank refill is part of what must match.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# Measured, 2 ranks vs 1 (float32, CPU; README's multi-GPU section): metrics agree to ~3e-5 relative; weights to
# ||w2 - w1|| / ||w1 - w_start|| = 3e-4 .. 4.3e-4, max |w2 - w1| = 7.2e-4 (lr 1e-3). What differs is the summation order
# of the gradient all-reduce and of per-rank batch shapes (~1e-7 relative on the gradients); Adam's normalised update
# turns that into up to one step (lr) on the few elements whose gradient is itself near cancellation.
TOL = 1e-4  # metrics: |a - b| <= max(TOL, TOL * |a|)
WEIGHT_REL_TOL = 2e-3  # ||w2 - w1|| / ||w1 - w_start||
WEIGHT_ABS_TOL = 1e-3  # max |w2 - w1|: at most one Adam step (lr 1e-3) on any element
STAGES = ("sft", "dpo", "grpo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_pipeline(tmp: Path, nproc: int, start: Path | str = "configs/tiny/base", deepspeed: str | None = None,
                   stages=STAGES, lora: bool = False) -> Path:
    """Stage YAMLs whose per-rank batch is the global batch / nproc, and the pipeline over them from `start`; every
    stage under the `deepspeed` file when given, with LoRA adapters (attention and experts) when `lora`."""
    tmp.mkdir(parents=True, exist_ok=True)
    per = {"sft": 4 // nproc, "dpo": 4 // nproc, "grpo": 8 // nproc}
    ds = f", deepspeed: {deepspeed}" if deepspeed else ""
    lo = ", lora: {r: 4, alpha: 8, experts: true}" if lora else ""
    (tmp / "sft.yaml").write_text(f"""
model: {{path: {start}, dtype: float32, fp32_lm_head: true, router_aux_loss_coef: 0.0{lo}}}
data:
  builtin: {{arithmetic: {{n: 3000, max_operand: 10}}, safety: {{n: 200}}}}
  max_length: 256
training: {{max_steps: 4, learning_rate: 1.0e-3, batch_size: {per["sft"]}, logging_steps: 1, save_steps: 2, adam_epsilon: 1.0e-8{ds}}}
eval: {{sets: {{arithmetic: {{n: 16, max_operand: 10}}}}, max_new_tokens: 16, batch_size: 16}}
""")
    (tmp / "dpo.yaml").write_text(f"""
model: {{path: set/by/the/runner, dtype: float32, fp32_lm_head: true, router_aux_loss_coef: 0.0{lo}}}
prompts: {{builtin: {{}}, max_per_task: {{arithmetic: 32, safety: 8}}}}
pairs:
  temperatures: [0.8, 1.4]
  samples_per_temperature: 3
  max_new_tokens: 12
  min_margin: 0.5
  reward: {{correctness: {{weight: 1.0}}}}
  rollout: {{batch_size: 64}}
dpo: {{beta: 0.5, sft_weight: 0.0, max_length: 256}}
training: {{max_steps: 2, learning_rate: 1.0e-4, batch_size: {per['dpo']}, logging_steps: 1, save_steps: 1, adam_epsilon: 1.0e-8{ds}}}
eval: {{sets: {{arithmetic: {{n: 16, max_operand: 10}}}}, max_new_tokens: 16, batch_size: 16}}
""")
    (tmp / "grpo.yaml").write_text(f"""
model: {{path: set/by/the/runner, dtype: float32, fp32_lm_head: true, router_aux_loss_coef: 0.0{lo}}}
prompts: {{builtin: {{arithmetic: {{n: 40, max_operand: 10}}}}, seed: 1, k: 4, lo: 0.0, hi: 1.0}}
sampling: {{temperature: 1.0, max_new_tokens: 10, repetition_stop_k: 12, repetition_stop_p: 0.99}}
rollout: {{backend: transformers, batch_size: 64, seed_groups: true}}
num_generations: 4
# one update per rollout batch (the default is 2): a rollout every step, so these 6 steps see refill rounds
updates_per_batch: 1
reward: {{correctness: {{weight: 1.0}}}}
loss: {{name: grpo, kl: minimax, beta: 0.0}}
dynamic_sampling: {{enabled: true, max_refills: 1}}
training: {{max_steps: 6, learning_rate: 1.0e-4, batch_size: {per['grpo']}, logging_steps: 1, save_steps: 2, adam_epsilon: 1.0e-8{ds}}}
length_monitor_window: 0
eval: {{sets: {{arithmetic: {{n: 16, max_operand: 10}}}}, max_new_tokens: 16, batch_size: 16}}
""")
    lines = [f"  - {{name: {name}, kind: {name}, config: {tmp / f'{name}.yaml'}}}" for name in stages]
    path = tmp / "pipeline.yaml"
    path.write_text(f"output_root: {tmp / 'run'}\nseed: 0\nstages:\n" + "\n".join(lines) + "\n")
    return path


def launch(path: Path, nproc: int, kill: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m pipelines pipeline` on `nproc` processes (torchrun, as `make pipeline NPROC=2` runs it)."""
    cmd = [sys.executable, "-m", "pipelines", "pipeline", "--config", str(path)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(free_port()), "-m", "pipelines", "pipeline", "--config", str(path)]
    env = {**ENV, **(env or {})}
    if kill:
        env.update(ALIGNMENT_KILL_AT=kill, ALIGNMENT_KILL_RANK="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def weights(final: Path) -> dict:
    return load_file(final / "model.safetensors")


def max_gap(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def norm_gap(a: dict, b: dict) -> float:
    return float(torch.sqrt(sum(((a[k].float() - b[k].float()) ** 2).sum() for k in a)))


def assert_same_weights(final: Path, reference: Path, start: Path, where: str) -> None:
    w, ref, w0 = weights(final), weights(reference), weights(start)
    assert max_gap(w, ref) < WEIGHT_ABS_TOL, where
    assert norm_gap(w, ref) < WEIGHT_REL_TOL * norm_gap(ref, w0), where


def compared(metrics: dict) -> dict:
    """The final metrics a run must reproduce: held-out results and the first/last value of every training curve
    but the wall times (`time/*`)."""
    train = {k: v for k, v in metrics["train"].items()
             if k.endswith(("/first", "/last")) and not k.startswith("time/")}
    return {"after": metrics["after"], "before": metrics["before"], "global_step": metrics["train"]["global_step"],
            **train}


def assert_same_metrics(a: dict, b: dict, where: str) -> None:
    ca, cb = compared(a), compared(b)
    assert ca.keys() == cb.keys(), where
    for key in ca:
        if isinstance(ca[key], dict):
            assert ca[key] == cb[key], f"{where}: {key}"
        else:
            assert ca[key] == pytest.approx(cb[key], abs=TOL, rel=TOL), f"{where}: {key}"


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """The tiny base after 80 SFT steps in one process: a start that answers some arithmetic (DPO pairs, GRPO
    prompts in the pass-rate band), shared by every run below. The compared runs train a few steps from it:
    float differences between 1 and 2 ranks (all-reduce order, per-rank batch shapes) are ~1e-7 per step, but
    grow over long runs (Adam's eps 1e-15 turns noise-sized gradients into full-size updates)."""
    tmp = tmp_path_factory.mktemp("warm")
    path = write_pipeline(tmp, 1, stages=("sft",))
    text = (tmp / "sft.yaml").read_text().replace("max_steps: 4, learning_rate: 1.0e-3",
                                                  "max_steps: 80, learning_rate: 2.0e-3, warmup_ratio: 0.1")
    (tmp / "sft.yaml").write_text(text.replace("logging_steps: 1, save_steps: 2", "logging_steps: 10, save_steps: 80"))
    result = launch(path, 1)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "run" / "sft" / "final"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, warm):
    tmp = tmp_path_factory.mktemp("nproc1")
    result = launch(write_pipeline(tmp, 1, warm), 1)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "run"


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, warm):
    tmp = tmp_path_factory.mktemp("nproc2")
    result = launch(write_pipeline(tmp, 2, warm), 2)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "run"


def test_two_ranks_end_where_one_process_ends(warm, one_process, two_processes):
    from transformers import AutoModelForCausalLM

    for stage in STAGES:
        m1 = json.loads((one_process / stage / "metrics.json").read_text())
        m2 = json.loads((two_processes / stage / "metrics.json").read_text())
        assert_same_metrics(m1, m2, stage)
        final1, final2 = one_process / stage / "final", two_processes / stage / "final"
        # complete: the same files as one process (rank 1 wrote none of them, nor replaced any)
        assert sorted(p.name for p in final1.iterdir()) == sorted(p.name for p in final2.iterdir())
        assert_same_weights(final2, final1, warm, stage)
        model = AutoModelForCausalLM.from_pretrained(final2)
        assert sum(p.numel() for p in model.parameters()) > 0
    grpo = json.loads((two_processes / "grpo" / "metrics.json").read_text())["train"]
    # the cross-rank refill was exercised: some batch needed one
    history = json.loads((two_processes / "grpo" / "log_history.json").read_text())
    assert any(e.get("dynamic/refills", 0) > 0 for e in history), history
    assert grpo["global_step"] == 6
    manifest = json.loads((two_processes / "manifest.json").read_text())
    assert [manifest["stages"][s]["status"] for s in STAGES] == ["done"] * 3
    assert not list(two_processes.glob("**/.*.tmp*"))  # no writer left a temp file behind


def test_sigkill_of_one_rank_mid_grpo_then_rerun_ends_where_the_uninterrupted_run_ends(tmp_path, warm,
                                                                                      two_processes):
    path = write_pipeline(tmp_path, 2, warm)
    root = tmp_path / "run"
    killed = launch(path, 2, kill="step:5")  # only GRPO reaches step 5 (SFT 4 steps, DPO 2)
    assert killed.returncode != 0
    assert (root / "dpo" / "final" / "metrics.json").is_file() and not (root / "grpo" / "final").exists()
    ckpts = sorted(p.name for p in (root / "grpo" / "checkpoints").iterdir() if p.name.startswith("checkpoint"))
    assert ckpts[-1] == "checkpoint-4"
    resumed = launch(path, 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "grpo (grpo): starting from" in resumed.stdout and "dpo (dpo): finished earlier, skipped" in resumed.stdout
    metrics = json.loads((root / "grpo" / "metrics.json").read_text())
    assert metrics["train"]["resumed_from"].endswith("checkpoint-4")
    reference = json.loads((two_processes / "grpo" / "metrics.json").read_text())
    assert_same_metrics(reference, metrics, "grpo (resumed)")
    # a resumed 2-rank run is the same computation as the uninterrupted one (same shapes, same reduction order)
    assert max_gap(weights(root / "grpo" / "final"), weights(two_processes / "grpo" / "final")) < 1e-6


def _deepspeed_runs_here() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _deepspeed_runs_here(),
                    reason="DeepSpeed not installed (pip install -e '.[deepspeed]'; ~2 min on CPU when it is)")
def test_deepspeed_zero3_pipeline_on_two_ranks_ends_where_one_process_ends(tmp_path, warm, one_process):
    """SFT -> DPO (live reference, prepared by DeepSpeed too) -> GRPO (transformers rollouts on the partitioned
    policy, dynamic sampling), every stage under ZeRO-3 on 2 ranks: each stage's metrics and gathered `final/` are the
    1-process run's, and each stage's checkpoints hold one optimizer partition per rank."""
    from transformers import AutoModelForCausalLM

    path = write_pipeline(tmp_path, 2, warm, deepspeed=str(ROOT / "configs/deepspeed/zero3.json"))
    result = launch(path, 2, env={"DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in STAGES:
        final, reference = tmp_path / "run" / stage / "final", one_process / stage / "final"
        assert sorted(p.name for p in final.iterdir()) == sorted(p.name for p in reference.iterdir()), stage
        assert_same_weights(final, reference, warm, f"{stage} (ZeRO-3)")
        m1 = json.loads((reference.parent / "metrics.json").read_text())
        m2 = json.loads((final.parent / "metrics.json").read_text())
        assert_same_metrics(m1, m2, f"{stage} (ZeRO-3)")
        ckpt = max((tmp_path / "run" / stage / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name[11:]))
        assert len(list(ckpt.glob("global_step*/*optim_states.pt"))) == 2, stage  # one partition per rank
    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "grpo" / "final")


@pytest.mark.skipif(not _deepspeed_runs_here(),
                    reason="DeepSpeed not installed (pip install -e '.[deepspeed]'; ~1 min on CPU when it is)")
def test_lora_under_zero3_on_two_ranks_writes_the_one_process_merged_checkpoint(tmp_path, warm):
    """LoRA adapters (attention and experts) on a ZeRO-3-partitioned base, SFT then DPO (its reference: the base
    with the adapters off): `final/` is merged from the partitions a decoder layer at a time
    (`alignment.distributed.merged_layers`) and is the 1-process run's merged checkpoint (same files and
    tensors, the weights within the data-parallel tolerances)."""
    stages = ("sft", "dpo")
    runs = {}
    for nproc, ds in ((1, None), (2, str(ROOT / "configs/deepspeed/zero3.json"))):
        path = write_pipeline(tmp_path / f"nproc{nproc}", nproc, warm, deepspeed=ds, stages=stages, lora=True)
        result = launch(path, nproc, env={"DS_ACCELERATOR": "cpu"})
        assert result.returncode == 0, result.stderr[-3000:]
        runs[nproc] = tmp_path / f"nproc{nproc}" / "run"
    for stage in stages:
        final, reference = runs[2] / stage / "final", runs[1] / stage / "final"
        assert sorted(p.name for p in final.iterdir()) == sorted(p.name for p in reference.iterdir()), stage
        w, ref = weights(final), weights(reference)
        assert w.keys() == ref.keys() and not any("lora" in k for k in w), stage
        assert_same_weights(final, reference, warm, f"{stage} (LoRA, ZeRO-3)")
        assert max_gap(w, weights(warm)) > 0, stage  # the adapters' update reached the merged weights
        assert_same_metrics(json.loads((reference.parent / "metrics.json").read_text()),
                            json.loads((final.parent / "metrics.json").read_text()), f"{stage} (LoRA, ZeRO-3)")


@pytest.mark.skipif(not _deepspeed_runs_here(),
                    reason="DeepSpeed not installed (pip install -e '.[deepspeed]'; ~1 min on CPU when it is)")
def test_pipeline_loaded_partitioned_on_two_ranks_ends_where_one_process_ends(tmp_path, warm, one_process):
    """`training.zero_init: true` in every stage: SFT, DPO (and its live reference) and GRPO load their checkpoint
    under zero.Init on 2 ZeRO-3 ranks (each rank holds about half of the weights from the load on), and the work
    before training (the before-evaluation, DPO's pair sampling, GRPO's prompt pool) runs on the partitioned model
    with every rank taking part (`alignment.distributed.forward_ready`). Rank 1 is SIGKILLed mid-GRPO and the
    pipeline re-run (GRPO resumes from its checkpoint into a model loaded partitioned again). Each stage's metrics
    and `final/` are the 1-process run's."""
    path = write_pipeline(tmp_path, 2, warm, deepspeed=str(ROOT / "configs/deepspeed/zero3.json"))
    for stage in STAGES:
        yaml = tmp_path / f"{stage}.yaml"
        yaml.write_text(yaml.read_text().replace("adam_epsilon: 1.0e-8,", "adam_epsilon: 1.0e-8, zero_init: true,"))
    killed = launch(path, 2, kill="step:5", env={"DS_ACCELERATOR": "cpu"})
    assert killed.returncode != 0 and not (tmp_path / "run" / "grpo" / "final").exists()
    result = launch(path, 2, env={"DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    grpo = json.loads((tmp_path / "run" / "grpo" / "metrics.json").read_text())
    assert grpo["train"]["resumed_from"].endswith("checkpoint-4")
    held = re.findall(r"\[(\w+)\] loaded partitioned \(zero\.Init\): this rank holds ([\d,]+) of ([\d,]+) parameters",
                      killed.stdout + result.stdout)
    assert sorted(stage for stage, _, _ in held) == ["DPO", "DPO"] + ["GRPO"] * 4 + ["SFT", "SFT"], held
    for _, local, total in held:  # half of every partitioned weight; the small ones (norms) stay whole per rank
        assert int(local.replace(",", "")) < 0.6 * int(total.replace(",", ""))
    for stage in STAGES:
        final, reference = tmp_path / "run" / stage / "final", one_process / stage / "final"
        assert sorted(p.name for p in final.iterdir()) == sorted(p.name for p in reference.iterdir()), stage
        assert_same_weights(final, reference, warm, f"{stage} (zero.Init)")
        assert_same_metrics(json.loads((reference.parent / "metrics.json").read_text()),
                            json.loads((final.parent / "metrics.json").read_text()), f"{stage} (zero.Init)")
    # the sampled inputs are the 1-process run's: the same pairs, the same prompt pool (`policy`: the run's path)
    for name in ("dpo/pairs/pair_stats.json", "grpo/prompt_pool_stats.json"):
        got, ref = (json.loads((run / name).read_text()) for run in (tmp_path / "run", one_process))
        assert {**got, "policy": None} == {**ref, "policy": None}, name


def test_context_parallel_sft_on_two_ranks_ends_where_data_parallel_ends(tmp_path, warm, two_processes):
    """`training.context_parallel: 2` on 2 ranks: every packed row (256 tokens, documents across the slice boundary)
    split over both ranks, each rank's batches taken in turn (alignment.context_parallel.ContextParallelTraining).
    The same global batch as the data-parallel run, so the same loss curve, held-out results and weights, within
    the data-parallel tolerances (what differs is the order of additions). TRL's token accuracy and entropy are
    per-slice means there, so they are not compared."""
    path = write_pipeline(tmp_path, 2, warm, stages=("sft",))
    sft = tmp_path / "sft.yaml"
    sft.write_text(sft.read_text().replace("logging_steps: 1,", "logging_steps: 1, context_parallel: 2,"))
    result = launch(path, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    cp_run, dp_run = tmp_path / "run" / "sft", two_processes / "sft"
    got, ref = (json.loads((run / "metrics.json").read_text()) for run in (cp_run, dp_run))
    assert got["after"] == pytest.approx(ref["after"], abs=TOL)
    for key in ("loss/first", "loss/last", "global_step"):
        assert got["train"][key] == pytest.approx(ref["train"][key], abs=TOL, rel=TOL), key
    assert_same_weights(cp_run / "final", dp_run / "final", warm, "context-parallel SFT")


def test_grpo_under_zero3_keeps_parameters_up_to_the_lm_heads_size_whole(tmp_path):
    from types import SimpleNamespace

    from pipelines.grpo import zero3_with_whole_lm_head

    config = SimpleNamespace(vocab_size=1024, hidden_size=128)
    zero3 = ROOT / "configs/deepspeed/zero3.json"
    got = zero3_with_whole_lm_head(str(zero3), config)
    assert got["zero_optimization"]["stage3_param_persistence_threshold"] == 1024 * 128
    assert {k: v for k, v in got["zero_optimization"].items() if k != "stage3_param_persistence_threshold"} == {
        k: v for k, v in json.loads(zero3.read_text())["zero_optimization"].items()
        if k != "stage3_param_persistence_threshold"}
    larger = tmp_path / "larger.json"
    larger.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1e9}}))
    assert zero3_with_whole_lm_head(str(larger), config)["zero_optimization"][
        "stage3_param_persistence_threshold"] == 1e9
    zero2 = tmp_path / "zero2.json"
    zero2.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert zero3_with_whole_lm_head(str(zero2), config) == str(zero2)
    assert zero3_with_whole_lm_head(None, config) is None
