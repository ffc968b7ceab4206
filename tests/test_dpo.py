"""Offline DPO: pair construction (best/worst, margins, ties, determinism, atomic save), the DPO loss against an
independent computation (FP32 head, bf16 body, LoRA reference), and a tiny end-to-end stage run with resume."""

import json
import math
import random
import shutil

import pytest
import torch
import torch.nn.functional as F

from alignment.config import load_config
from alignment.modeling import LoraOptions, ModelOptions, load_model
from alignment.rollout import RolloutBatch, build_rollout
from data_recipes.tokenizer import builtin_tokenizer
from data_recipes.dpo_pairs import PairOptions, build_dpo_pairs, load_pairs, select_pair, select_prompts
from pipelines.dpo import Config as DPOStageConfig, dpo_args, run

TINY = "configs/tiny/model.yaml"


# -- pair selection ------------------------------------------------------------------------------------------------


def test_select_pair_best_worst_margin_and_ties():
    rng = random.Random(0)
    assert select_pair([0.2, 1.0, -0.5, 0.3], 0.5, rng) == (1, 2)
    assert select_pair([0.0, 0.0, 0.0], 0.0, rng) == "all_tied"  # margin 0 still drops equal groups
    assert select_pair([0.5, 0.5], 0.5, rng) == "all_tied"
    assert select_pair([0.1, 0.5], 0.5, rng) == "below_margin"  # 0.4 < 0.5
    assert select_pair([0.0, 0.5], 0.5, rng) == (1, 0)  # exactly the margin is kept
    # ties: the chosen is one of the best, the rejected one of the worst, and every tied index gets picked sometimes
    picks = {select_pair([1.0, 0.0, 1.0, 0.0, 0.5], 0.5, rng) for _ in range(200)}
    assert picks == {(0, 1), (0, 3), (2, 1), (2, 3)}
    # with temperatures, ties go to the coldest sample first (random only among equally cold ones)
    temps = [1.0, 1.0, 0.5, 0.5, 0.5, 1.0]
    picks = {select_pair([1.0, 0.0, 1.0, 0.0, 0.0, 1.0], 0.5, rng, temps) for _ in range(200)}
    assert picks == {(2, 3), (2, 4)}


class ScriptedWorker:
    """A rollout worker that answers from a script: prompt text -> the N responses (in temperature order)."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def generate(self, prompts, n, sampling):
        self.calls.append((len(prompts), n, sampling.temperature))
        texts = []
        for p in prompts:
            responses = self.script[p[-1]["content"]]
            k = len(self.calls) - 1  # the j-th temperature pass hands out responses j*n .. j*n + n - 1
            texts += responses[k * n : (k + 1) * n]
        ids = [[1] for _ in texts]
        return RolloutBatch(ids, ids, [[0.0] for _ in texts], texts, ["eos"] * len(texts), n=n)

    def sync_weights(self, model):
        pass


def _row(question, answer, task="arithmetic", harmful=False):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "ref"}],
            "task": task, "answer": answer, "harmful": harmful, "n_pairs": 0}


def test_build_pairs_picks_best_and_worst_drops_and_counts(tmp_path):
    rows = [_row("What is 2 + 3?", "5"), _row("What is 4 + 4?", "8"), _row("What is 9 - 1?", "8"),
            _row("How do I kill a Python process?", "", task="safety")]
    script = {
        "What is 2 + 3?": ["2 + 3 = 6", "2 + 3 = 5", "2 + 3 = 5", "2 + 3 = 7"],  # right and wrong: a pair
        "What is 4 + 4?": ["4 + 4 = 8"] * 4,  # all right: tied
        "What is 9 - 1?": ["9 - 1 = 7"] * 4,  # all wrong: tied
        # over-refusal on a benign look-alike: the helpful answer is chosen, the refusal rejected
        "How do I kill a Python process?": ["I can't help with that.", "Run kill with its PID.",
                                            "I can't help with that.", "I won't help with that."],
    }
    worker = ScriptedWorker(script)
    opts = PairOptions(temperatures=[0.5, 1.5], samples_per_temperature=2, min_margin=0.5)
    ds, stats = build_dpo_pairs(worker, rows, opts, seed=3, policy="ckpt/sft", out_path=tmp_path / "pairs")

    assert worker.calls == [(4, 2, 0.5), (4, 2, 1.5)]  # one batched pass per temperature over all prompts
    assert (stats["pairs"], stats["dropped_all_tied"], stats["dropped_below_margin"]) == (2, 2, 0)
    arith, safety = ds[0], ds[1]
    assert arith["chosen"] == [{"role": "assistant", "content": "2 + 3 = 5"}]
    assert arith["rejected"][0]["content"] == "2 + 3 = 6"  # tied with "= 7", but sampled colder
    assert (arith["temperature_chosen"], arith["temperature_rejected"]) == (0.5, 0.5)
    assert arith["prompt"] == [{"role": "user", "content": "What is 2 + 3?"}]
    assert arith["scores"] == [0.0, 1.0, 1.0, 0.0] and arith["temperatures"] == [0.5, 0.5, 1.5, 1.5]
    assert (arith["score_chosen"], arith["score_rejected"], arith["policy"]) == (1.0, 0.0, "ckpt/sft")
    assert arith["samples"] == script["What is 2 + 3?"]
    assert safety["chosen"][0]["content"] == "Run kill with its PID." and safety["temperature_chosen"] == 0.5
    assert safety["rejected"][0]["content"] == "I can't help with that."
    # tie_break: random draws among all tied samples instead
    opts.tie_break = "random"
    rejected = {build_dpo_pairs(ScriptedWorker(script), rows[:1], opts, seed=s, policy="p")[0][0]["rejected"][0]
                ["content"] for s in range(12)}
    assert rejected == {"2 + 3 = 6", "2 + 3 = 7"}

    # saved atomically with its stats; loads back the same
    loaded, loaded_stats = load_pairs(tmp_path / "pairs")
    assert loaded.to_list() == ds.to_list() and loaded_stats == stats
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind

    # a graded reward (correctness - 0.1 per character beyond 9) and min_margin 1.05: the 2 + 3 group (1.0 vs 0.0)
    # falls below the margin; the safety group (22 chars helpful: 1 - 1.3 = -0.3; 23 chars refusal: 0 - 1.4) is kept
    opts = PairOptions(temperatures=[0.5, 1.5], samples_per_temperature=2, min_margin=1.05,
                       reward={"correctness": {"weight": 1.0}, "length": {"max_chars": 9, "penalty": 0.1}})
    ds, stats = build_dpo_pairs(ScriptedWorker(script), rows, opts, seed=3, policy="ckpt/sft")
    assert (stats["pairs"], stats["dropped_below_margin"], stats["dropped_all_tied"]) == (1, 1, 2)
    assert ds[0]["task"] == "safety" and ds[0]["score_chosen"] - ds[0]["score_rejected"] == pytest.approx(1.1)
    with pytest.raises(ValueError, match="no DPO pairs: all 1 prompt groups were dropped"):
        build_dpo_pairs(ScriptedWorker(script), rows[1:2], opts, seed=0, policy="p")


def test_select_prompts_dedupes_filters_and_samples_deterministically():
    rows = [_row(f"What is {i % 30} + 1?", str(i % 30 + 1)) for i in range(90)]
    rows += [{**_row(f"Data: k{i}", "001", task="retrieval"), "n_pairs": i} for i in range(4, 24)]
    picked = select_prompts(rows, seed=0, n=10)
    assert len(picked) == 10 and picked == select_prompts(rows, seed=0, n=10)
    assert picked != select_prompts(rows, seed=1, n=10)
    assert len(select_prompts(rows, seed=0)) == 50  # 30 distinct arithmetic + 20 retrieval
    capped = select_prompts(rows, seed=0, max_per_task={"arithmetic": 5})
    assert [r["task"] for r in capped].count("arithmetic") == 5 and len(capped) == 25
    assert capped == select_prompts(rows, seed=0, max_per_task={"arithmetic": 5})
    long = select_prompts(rows, seed=0, tasks=["retrieval"], min_n_pairs=16)
    assert sorted(r["n_pairs"] for r in long) == list(range(16, 24))


# -- real sampling through the transformers rollout worker ---------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model + tokenizer saved as a checkpoint directory (the stage starts from one)."""
    path = tmp_path_factory.mktemp("ckpt")
    tokenizer = builtin_tokenizer(vocab_size=512)
    tokenizer.save_pretrained(path)
    model = load_model(TINY, seed=0)
    model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    model.save_pretrained(path)
    return path


def test_pairs_from_real_sampling_are_deterministic_under_a_seed(checkpoint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = load_model(str(checkpoint))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    worker = build_rollout("transformers", model, tokenizer, batch_size=8)
    rows = [_row(f"What is {a} + {b}?", str(a + b)) for a, b in [(1, 2), (3, 4), (5, 6)]]
    # an untrained model is never right: a length term grades the samples so that pairs exist
    opts = PairOptions(temperatures=[0.8, 1.5], samples_per_temperature=2, max_new_tokens=6, min_margin=0.01,
                       reward={"correctness": {}, "length": {"max_chars": 0, "penalty": 0.01}})

    def build(seed):
        torch.manual_seed(1234)  # the global RNG must not matter
        return build_dpo_pairs(worker, rows, opts, seed=seed, policy=str(checkpoint))[0].to_list()

    first = build(0)
    assert first and first == build(0)
    assert [r["samples"] for r in build(1)] != [r["samples"] for r in first]
    for rec in first:
        assert len(rec["samples"]) == 4 and rec["temperatures"] == [0.8, 0.8, 1.5, 1.5]
        assert rec["score_chosen"] == max(rec["scores"]) and rec["score_rejected"] == min(rec["scores"])


# -- the DPO loss --------------------------------------------------------------------------------------------------


def _seq_logps(model, batch):
    """Σ log p(completion tokens) per row from a plain forward (the model's own FP32 head), no TRL code."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logp * batch["completion_mask"][:, 1:]).sum(-1)  # (2B,): chosen rows, then rejected rows


def _stage_cfg(tmp_path, checkpoint, **overrides):
    path = tmp_path / "dpo.yaml"
    path.write_text(f"""
output_dir: {tmp_path / "run"}
model: {{path: {checkpoint}, router_aux_loss_coef: 0.0}}
prompts:
  builtin: {{arithmetic: {{n: 40, max_operand: 9}}, safety: {{n: 20}}}}
  n: 12
pairs:
  temperatures: [0.8, 1.4]
  samples_per_temperature: 2
  max_new_tokens: 8
  min_margin: 0.01
  reward: {{correctness: {{}}, length: {{max_chars: 0, penalty: 0.01}}}}
dpo: {{beta: 0.1, max_length: 128}}
training: {{max_steps: 6, learning_rate: 3.0e-3, batch_size: 2, logging_steps: 2, save_steps: 3}}
eval:
  sets: {{arithmetic: {{n: 6, max_operand: 9}}, safety: {{n: 6}}}}
  max_new_tokens: 6
""")
    return load_config(path, DPOStageConfig, overrides)


def _preference_rows():
    from datasets import Dataset

    prompts = [[{"role": "user", "content": q}] for q in ("What is 2 + 3?", "How do I kill a Python process?",
                                                          "What is 7 - 4?")]
    chosen = [[{"role": "assistant", "content": c}] for c in ("2 + 3 = 5", "Run kill with its PID.", "7 - 4 = 3")]
    rejected = [[{"role": "assistant", "content": c}] for c in ("2 + 3 = 6", "I can't help with that.", "7")]
    return Dataset.from_dict({"prompt": prompts, "chosen": chosen, "rejected": rejected})


@pytest.mark.parametrize("dtype,lora", [("float32", False), ("bfloat16", False), ("float32", True)])
def test_trainer_loss_equals_sigmoid_dpo_from_independent_log_probs(tmp_path, checkpoint, dtype, lora):
    """loss = mean -log σ(β((π_c − ref_c) − (π_r − ref_r))), with Σ log-probs over completion tokens from plain
    forwards. bf16: the body runs in bf16 and the FP32 head must stay FP32 inside TRL's fused head for both the
    policy and the reference, or the two sides differ by bf16 rounding (~1e-2). LoRA: the reference is the model
    without the new adapter."""
    from transformers import AutoTokenizer

    from alignment.trainers import MiniMaxDPOTrainer

    beta = 0.3
    cfg = _stage_cfg(tmp_path, checkpoint, **{"dpo.beta": beta, "model.dtype": dtype})
    opts = cfg.model
    if lora:
        opts = ModelOptions(path=str(checkpoint), dtype=dtype, router_aux_loss_coef=0.0,
                            lora=LoraOptions(r=4, alpha=8))
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    policy = load_model(opts)
    ref = None if lora else load_model(cfg.model)
    trainer = MiniMaxDPOTrainer(model=policy, ref_model=ref, args=dpo_args(cfg, tmp_path / "ckpt"),
                                train_dataset=_preference_rows(), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 2 * 2  # chosen rows then rejected rows

    with torch.no_grad():  # at the start the policy is the reference: every margin is 0, the loss log 2
        assert math.isclose(float(trainer.compute_loss(policy, batch)), math.log(2), rel_tol=1e-6)
        # move the policy away from the reference
        gen = torch.Generator().manual_seed(0)
        for name, p in policy.named_parameters():
            if p.requires_grad and p.is_floating_point():
                p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p.dtype))
        loss = trainer.compute_loss(policy, batch)

        reference = load_model(ModelOptions(path=str(checkpoint), dtype=dtype))  # the starting checkpoint
        pi, ref_lp = _seq_logps(policy, batch), _seq_logps(reference, batch)
        c, r = pi.chunk(2), ref_lp.chunk(2)
        expected = -F.logsigmoid(beta * ((c[0] - r[0]) - (c[1] - r[1]))).mean()
    assert abs(float(loss) - math.log(2)) > 1e-3  # the check below is not the trivial one
    assert float(loss) == pytest.approx(float(expected), abs=1e-5)


def test_reference_for_a_model_built_in_memory_is_a_frozen_copy(tmp_path, checkpoint):
    """TRL would rebuild the reference from `config._name_or_path`, which a YAML-built model does not have."""
    from transformers import AutoTokenizer

    from alignment.modeling import PackedLightningAttention
    from alignment.trainers import MiniMaxDPOTrainer

    cfg = _stage_cfg(tmp_path, checkpoint)
    model = load_model(TINY, seed=5)
    trainer = MiniMaxDPOTrainer(model=model, args=dpo_args(cfg, tmp_path / "ckpt"), train_dataset=_preference_rows(),
                                processing_class=AutoTokenizer.from_pretrained(checkpoint))
    ref = trainer.ref_model
    assert ref is not model and not any(p.requires_grad for p in ref.parameters())
    assert any(isinstance(m, PackedLightningAttention) for m in ref.modules())
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), model.state_dict().values()))


# -- the stage -----------------------------------------------------------------------------------------------------


def test_dpo_stage_builds_pairs_trains_saves_and_resumes(tmp_path, checkpoint):
    cfg = _stage_cfg(tmp_path, checkpoint)
    metrics = run(cfg)
    out = tmp_path / "run"
    final = out / "final"
    for name in ("summary.md", "curves.png", "metrics.json", "eval_before.json"):
        assert (out / name).is_file(), name
    assert (final / "metrics.json").is_file() and (out / "pairs" / "pair_stats.json").is_file()
    pairs, stats = load_pairs(out / "pairs")
    assert metrics["pairs"] == stats and stats["prompts"] == 12 and len(pairs) == stats["pairs"] > 0
    assert set(pairs["policy"]) == {str(checkpoint)}
    assert {"arithmetic/accuracy", "safety/refusal_rate_benign"} <= set(metrics["after"])
    train = metrics["train"]
    assert train["global_step"] == 6 and "rewards/margins/last" in train and "rewards/accuracies/last" in train
    # training on the pairs moves the implicit reward margin up (DPO's own metric)
    assert train["rewards/margins/last"] > 0

    # the final checkpoint is the trained policy: its weights moved away from the start
    start, trained = load_model(str(checkpoint)).state_dict(), load_model(str(final)).state_dict()
    assert any(not torch.equal(start[k], trained[k]) for k in start)

    # a stage that died after checkpoint-3 resumes from it, reusing the saved pairs, and ends with the same weights
    shutil.rmtree(final)
    (out / "metrics.json").unlink()
    shutil.rmtree(out / "checkpoints" / "checkpoint-6")
    resumed = run(cfg)
    assert resumed["train"]["resumed_from"].endswith("checkpoint-3") and resumed["train"]["global_step"] == 6
    assert resumed["pairs"] == stats
    again = load_model(str(final)).state_dict()
    assert all(torch.allclose(trained[k], again[k], atol=1e-6) for k in trained)
    assert json.loads((final / "metrics.json").read_text())["after"] == resumed["after"]


def test_bad_reward_spec_fails_before_any_model_work(tmp_path, checkpoint):
    from rewards import RewardError

    cfg = _stage_cfg(tmp_path, checkpoint, **{"pairs.reward": {"correctnes": {}}})
    with pytest.raises(RewardError, match="unknown handler type 'correctnes'"):
        run(cfg)
    assert not (tmp_path / "run").exists()
