"""GRPO stage: the trainer's online filter (drop zero-variance groups, refill), a tiny run that moves its reward,
the stage pipeline end to end (prompt pool -> train -> before/after metrics), and config validation."""

import json
import random
import time
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, PreTrainedModel
from trl import GRPOConfig
from trl.trainer import grpo_trainer as trl_grpo

from alignment.config import ConfigError, load_config
from alignment.losses import LossOptions, group_advantages, zero_variance_groups
from alignment.reporting import pipeline_report
from alignment.modeling import LoraOptions, PackedLightningAttention, apply_lora, load_model
from alignment.rollout import SamplingOptions, build_rollout
from data_recipes.tokenizer import builtin_tokenizer
from alignment.timing import PHASES
from alignment.trainers import DynamicSamplingOptions, MiniMaxGRPOTrainer, Round, grpo_trl_settings
from data_recipes.tasks import arithmetic_examples
from pipelines.grpo import Config as GRPOStageConfig, _trl_args, run

TINY = "configs/tiny/model.yaml"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return builtin_tokenizer(vocab_size=1024)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    """A tiny model taught (plain teacher forcing, ~10 s) the arithmetic problems with operands <= 3, so that it
    answers some right: GRPO needs a policy with moderate success rates."""
    torch.manual_seed(0)
    model = load_model(TINY, seed=0)
    model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    rows = arithmetic_examples(2000, seed=0, max_operand=3)
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"] for r in rows]
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    model.train()
    for step in range(60):
        batch = texts[step * 32 : (step + 1) * 32]
        width = max(map(len, batch))
        ids = torch.tensor([t + [tokenizer.pad_token_id] * (width - len(t)) for t in batch])
        mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def grpo_args(tmp_path, **kw):
    defaults = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, num_generations=4,
                    max_completion_length=12, learning_rate=1e-2, max_steps=1, logging_steps=1, report_to=[],
                    use_cpu=True, save_strategy="no", beta=0.0, remove_unused_columns=False, seed=0,
                    adam_beta2=0.95, adam_epsilon=1e-15)
    return GRPOConfig(**{**defaults, **kw})


def make_trainer(tmp_path, model, tokenizer, dataset, reward, dynamic, loss=None, success_fn=None, ref_model=None,
                 rollout=None, **kw):
    return MiniMaxGRPOTrainer(
        model=model, reward_funcs=reward, args=grpo_args(tmp_path, **kw), train_dataset=dataset,
        processing_class=tokenizer, loss=loss or LossOptions(kl="none"), sampling=SamplingOptions(max_new_tokens=12),
        rollout=rollout or build_rollout("transformers", model, tokenizer), dynamic_sampling=dynamic,
        success_fn=success_fn, ref_model=ref_model)


def flat_or_varied(n: int) -> Dataset:
    kinds = ["flat", "varied"] * (n // 2)
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"{k} {i}"}] for i, k in enumerate(kinds)],
                              "kind": kinds})


def kind_reward(prompts, completions, kind, **_):
    """0.5 for every completion of a 'flat' prompt (zero variance), a random score for 'varied' ones."""
    return [0.5 if k == "flat" else random.random() for k in kind]


def test_online_filter_drops_zero_variance_groups_and_refills(tmp_path, tokenizer):
    random.seed(0)
    torch.manual_seed(0)
    data = flat_or_varied(40)
    trainer = make_trainer(tmp_path, load_model(TINY), tokenizer, data, kind_reward,
                           DynamicSamplingOptions(enabled=True, max_refills=6))
    trainer.model.train()
    rows = [dict(data[i]) for i in (0, 1, 2, 4) for _ in range(4)]  # 3 flat groups, 1 varied group
    batch = trainer._generate_and_score_completions(rows)
    prompts = tokenizer.batch_decode(batch["prompt_ids"], skip_special_tokens=True)
    assert len(prompts) == 16 and all("varied" in p for p in prompts)  # refilled with informative groups only
    adv = batch["advantages"].view(4, 4)
    assert (adv.abs().sum(1) > 0).all()
    assert batch["num_items_in_batch"] == batch["completion_mask"].sum()
    m = trainer._metrics["train"]
    assert m["dynamic/refills"][-1] >= 1 and m["dynamic/zero_var_fill_frac"][-1] == 0
    assert 0 < m["dynamic/dropped_frac"][-1] < 1
    assert m["dynamic/kept_frac"][-1] == pytest.approx(1 - m["dynamic/dropped_frac"][-1])

    # no refills allowed: the batch keeps its size, informative groups first, then zero-advantage fill
    trainer.dynamic = DynamicSamplingOptions(enabled=True, max_refills=0)
    batch = trainer._generate_and_score_completions(rows)
    prompts = tokenizer.batch_decode(batch["prompt_ids"], skip_special_tokens=True)
    assert len(prompts) == 16 and all("varied" in p for p in prompts[:4])
    assert (batch["advantages"][4:] == 0).all()
    assert m["dynamic/zero_var_fill_frac"][-1] == 0.75 and m["dynamic/refills"][-1] == 0


def even_token_reward(prompts, completions, completion_ids, **_):
    """Share of even token ids in the completion: a dense signal a random policy can climb quickly."""
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def test_round_returns_rewards_advantages_and_kept_groups_that_agree(tmp_path, tokenizer):
    random.seed(0)
    torch.manual_seed(0)
    data = flat_or_varied(8)
    returned = {}  # what each reward function gave TRL, to check the round's weighted sum against

    def kind_score(prompts, completions, kind, **_):
        returned["kind"] = kind_reward(prompts, completions, kind)
        return returned["kind"]

    def even_if_varied(prompts, completions, completion_ids, kind, **_):
        even = even_token_reward(prompts, completions, completion_ids)
        returned["even"] = [e if k == "varied" else 0.0 for e, k in zip(even, kind)]
        return returned["even"]

    seen = []

    def success(rows, completions):
        seen.extend(completions)
        return [row["kind"] == "varied" for row in rows]

    trainer = make_trainer(tmp_path, load_model(TINY), tokenizer, data, [kind_score, even_if_varied],
                           DynamicSamplingOptions(enabled=False), success_fn=success, reward_weights=[1.0, 0.5])
    trainer.model.train()
    rows = [dict(data[i]) for i in range(4) for _ in range(4)]  # flat, varied, flat, varied groups
    r = trainer._round(rows)
    assert isinstance(r, Round) and r.group_size == 4
    expected = torch.tensor(returned["kind"]) + 0.5 * torch.tensor(returned["even"])
    assert torch.allclose(r.rewards, expected)  # TRL's weighted sum of exactly what the functions returned
    assert trainer._metrics["train"]["reward"][-1] == pytest.approx(r.rewards.mean().item())  # TRL's own log
    assert torch.equal(r.advantages, group_advantages(r.rewards, 4, "group", balanced=True))
    assert torch.equal(r.batch["advantages"], r.advantages)
    assert torch.equal(r.zero_variance, zero_variance_groups(r.rewards, 4, trainer.dynamic.tolerance))
    assert r.zero_variance.tolist() == [True, False, True, False] and torch.equal(r.kept, ~r.zero_variance)
    adv = r.advantages.view(4, 4)
    assert (adv[r.zero_variance] == 0).all() and (adv[r.kept].abs().sum(1) > 0).all()
    assert r.lengths == r.batch["completion_mask"].sum(1).tolist() and len(r.lengths) == 16
    assert r.success == [0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4
    # success_fn gets the completion as TRL gives it: conversational prompts -> a list of messages
    assert len(seen) == 16 and all(isinstance(c, list) and c[0]["role"] == "assistant" for c in seen)
    assert not hasattr(trainer, "_round_log")


def test_grpo_trl_settings_give_trl_only_what_it_reads(tmp_path, tokenizer, checkpoint):
    sampling = SamplingOptions(temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=12)
    on = grpo_trl_settings(LossOptions(kl="minimax", beta=0.04, epsilon_high=0.28), sampling)
    assert on == {"beta": 0.04, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "max_completion_length": 12}
    assert grpo_trl_settings(LossOptions(kl="none", beta=0.04), sampling)["beta"] == 0.0
    assert grpo_trl_settings(LossOptions(kl="k3", beta=0.0), sampling)["beta"] == 0.0
    assert LossOptions(kl="k3", beta=0.1).uses_kl and not LossOptions(kl="none", beta=0.1).uses_kl

    # the stage's GRPOConfig: those settings; what only TRL's own loss / advantages read stays at TRL's default
    cfg = load_config(stage_yaml(tmp_path, checkpoint), GRPOStageConfig,
                      {"loss.epsilon_low": 0.1, "loss.epsilon_high": 0.28, "advantages.scale": "batch",
                       "sampling.temperature": 0.9})
    args = _trl_args(cfg, tmp_path / "checkpoints", [1.0], load_model(checkpoint).config)
    default = GRPOConfig(output_dir=str(tmp_path / "default"), use_cpu=True)
    assert (args.beta, args.temperature, args.max_completion_length) == (0.04, 0.9, 12)
    assert (args.epsilon, args.epsilon_high, args.scale_rewards, args.loss_type) == (
        default.epsilon, default.epsilon_high, default.scale_rewards, default.loss_type)

    # the trainer refuses a GRPOConfig that disagrees with its loss / sampling
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": "hi"}]] * 4})
    for loss, kw in ((LossOptions(kl="minimax", beta=0.04), {"beta": 0.0}), (LossOptions(kl="none"), {"beta": 0.04}),
                     (LossOptions(kl="none"), {"temperature": 0.5})):
        with pytest.raises(ValueError, match="grpo_trl_settings"):
            make_trainer(tmp_path, load_model(TINY), tokenizer, data, even_token_reward, None, loss=loss, **kw)


def test_given_reference_model_is_the_reference_and_trl_loads_none(tmp_path, tokenizer, monkeypatch):
    torch.manual_seed(0)
    model, ref = load_model(TINY, seed=0), load_model(TINY, seed=0)  # same weights

    def no_loading(*args, **kwargs):
        raise AssertionError("TRL loaded a model from disk")

    monkeypatch.setattr(trl_grpo, "create_model_from_path", no_loading)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(no_loading))
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Say something {i}."}] for i in range(8)]})
    args = grpo_args(tmp_path, beta=0.04)
    trainer = MiniMaxGRPOTrainer(
        model=model, reward_funcs=even_token_reward, args=args, train_dataset=data, processing_class=tokenizer,
        loss=LossOptions(kl="minimax", beta=0.04), sampling=SamplingOptions(max_new_tokens=12),
        rollout=build_rollout("transformers", model, tokenizer), ref_model=ref)
    assert trainer.ref_model is ref and trainer.beta == 0.04 and args.beta == 0.04
    assert any(isinstance(m, PackedLightningAttention) for m in ref.modules())  # packing-safe
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())

    # TRL scores the given reference: with the policy's weights, the policy's log-probs
    trainer.model.train()
    b = trainer._round([dict(data[i]) for i in range(4) for _ in range(4)]).batch
    ids = torch.cat([b["prompt_ids"], b["completion_ids"]], 1)
    attention = torch.cat([b["prompt_mask"], b["completion_mask"]], 1)
    with torch.no_grad():
        logp, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention,
                                                                b["completion_ids"].size(1), batch_size=16)
    mask = b["completion_mask"].bool()
    assert torch.allclose(b["ref_per_token_logps"][mask], logp[mask], atol=1e-5)

    # a reference the loss does not use is refused
    with pytest.raises(ValueError, match="ref_model"):
        make_trainer(tmp_path, load_model(TINY), tokenizer, data, even_token_reward, None,
                     loss=LossOptions(kl="none"), ref_model=load_model(TINY))


def test_tiny_grpo_run_climbs_its_reward_with_all_changes_on(tmp_path, tokenizer, checkpoint):
    torch.manual_seed(0)
    model = load_model(str(checkpoint))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Say something {i}."}] for i in range(64)]})
    loss = LossOptions(drop_negative_high_ratio=True, kl="minimax", beta=0.04, aggregation="sequence_mean")
    trainer = make_trainer(tmp_path, model, tokenizer, data, even_token_reward,
                           DynamicSamplingOptions(enabled=True), loss=loss, max_steps=16, beta=0.04, learning_rate=3e-3,
                           num_iterations=2)  # two updates per rollout batch: ratios != 1, so clipping is live
    trainer.train()
    history = trainer.state.log_history
    rewards = [e["reward"] for e in history if "reward" in e]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.05, rewards
    assert trainer.ref_model is not None  # beta > 0: TRL built the reference model from the checkpoint
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("lm_head" in k for k in changed) and any("layers.0" in k for k in changed)
    logged = set().union(*history)
    for key in ("kl", "entropy", "dropped", "clip_high", "dynamic/kept_frac", "mismatch/prob_corr",
                "completions/mean_length", "rollout/stop_eos", "policy_loss"):
        assert key in logged, key
    gap = [e["mismatch/logp_abs_mean"] for e in history if "mismatch/logp_abs_mean" in e]
    assert max(gap) < 1e-2  # transformers rollouts sample from the trained model itself


class SlowWorker:
    """A rollout worker whose generate and weight sync each take a known extra time (a sleep), and whose batches
    carry a clock of their own, as the vLLM worker's do."""

    def __init__(self, worker, generate_s: float, sync_s: float):
        self.worker, self.generate_s, self.sync_s = worker, generate_s, sync_s

    def generate(self, prompts, n, sampling):
        time.sleep(self.generate_s)
        batch = self.worker.generate(prompts, n, sampling)
        batch.metrics.update({"rollout/seconds": 1.0, "rollout/tokens_per_s": 1.0})
        return batch

    def sync_weights(self, model):
        time.sleep(self.sync_s)
        self.worker.sync_weights(model)


def slow_kind_reward(prompts, completions, kind, **_):
    """`kind_reward` after 0.05 s: scoring time the step must attribute to `reward`."""
    time.sleep(0.05)
    return kind_reward(prompts, completions, kind)


def test_every_step_logs_where_its_time_goes(tmp_path, tokenizer):
    """Each step's `time/*` metrics: every phase on every step, the phases adding up to the step, and the known
    sleeps of the rollout (0.03 s per round), the weight sync (0.02 s per step) and the reward (0.05 s per round)
    found in their own phases; the KL reference and the rollout-correction log-probs timed apart."""
    random.seed(0)
    torch.manual_seed(0)
    model = load_model(TINY, seed=0)
    worker = SlowWorker(build_rollout("transformers", model, tokenizer), generate_s=0.03, sync_s=0.02)
    trainer = make_trainer(tmp_path, model, tokenizer, flat_or_varied(40), slow_kind_reward,
                           DynamicSamplingOptions(enabled=True, max_refills=2), rollout=worker,
                           loss=LossOptions(kl="minimax", beta=0.04), ref_model=load_model(TINY, seed=0), beta=0.04,
                           max_steps=3)
    trainer.train()
    steps = [e for e in trainer.state.log_history if "loss" in e]
    assert len(steps) == 3
    for e in steps:
        parts = [e[f"time/{p}_s"] for p in PHASES]
        assert all(t >= 0 for t in parts) and e["time/step_s"] > 0, e
        # exclusive phases: they add up to the step (float rounding aside), none counted twice
        assert sum(parts) == pytest.approx(e["time/step_s"], rel=1e-6, abs=1e-9)
        assert 0 <= e["time/rollout_frac"] <= 1
        assert e["time/rollout_frac"] == pytest.approx(e["time/rollout_s"] / e["time/step_s"])
        rounds = 1 + e["dynamic/refills"]  # each round: one generate call, one reward call
        assert e["time/rollout_s"] >= 0.03 * rounds and e["time/reward_s"] >= 0.05 * rounds, e
        assert e["time/sync_s"] >= 0.02  # one sync per optimizer step, not inside `rollout`
        assert e["time/ref_logprobs_s"] > 0 and e["time/old_logprobs_s"] > 0 and e["time/train_s"] > 0
        # every generated token counted: TRL's mean completion length per round x 16 completions x rounds
        assert e["rollout/generated_tokens"] == pytest.approx(e["completions/mean_length"] * 16 * rounds)
        assert e["time/tokens_per_s"] == pytest.approx(e["rollout/generated_tokens"] / e["time/rollout_s"])
    # the worker's own clock is not logged beside the step's (its other metrics are)
    assert not any("rollout/seconds" in e or "rollout/tokens_per_s" in e for e in trainer.state.log_history)
    assert all("rollout/stop_length" in e for e in steps)


def test_reference_forward_is_told_from_the_policy_forward_under_lora():
    """With LoRA TRL scores the reference with the policy itself, inside `use_adapter` (adapter off, or the frozen
    "ref" adapter): those no-grad forwards are `ref_logprobs`, the others `old_logprobs`."""
    from trl.trainer.utils import use_adapter

    policy = apply_lora(load_model(TINY, seed=0), LoraOptions())
    trainer = SimpleNamespace(ref_model=None, accelerator=SimpleNamespace(unwrap_model=lambda m: m))
    scores_reference = MiniMaxGRPOTrainer._scores_reference.__get__(trainer)
    assert not scores_reference(policy)
    with use_adapter(policy, adapter_name=None):
        assert scores_reference(policy)
    assert not scores_reference(policy)
    policy.add_adapter("ref", policy.peft_config["default"])
    with use_adapter(policy, adapter_name="ref"):
        assert scores_reference(policy)
    assert not scores_reference(policy)
    trainer.ref_model = ref = load_model(TINY, seed=0)
    assert scores_reference(ref) and not scores_reference(policy)


def stage_yaml(tmp_path, checkpoint, extra=""):
    path = tmp_path / "grpo.yaml"
    path.write_text(f"""
output_dir: {tmp_path / "run"}
model: {{path: {checkpoint}}}
prompts:
  builtin: {{arithmetic: {{n: 200, max_operand: 3}}}}
  k: 8
sampling: {{max_new_tokens: 12, repetition_stop_k: 10}}
num_generations: 4
loss: {{beta: 0.04}}
training: {{max_steps: 4, learning_rate: 1.0e-3, batch_size: 16, logging_steps: 1, save_steps: 100}}
eval:
  sets: {{arithmetic: {{n: 20, max_operand: 3}}}}
  max_new_tokens: 12
{extra}""")
    return path


def test_stage_end_to_end(tmp_path, checkpoint):
    cfg = load_config(stage_yaml(tmp_path, checkpoint), GRPOStageConfig)
    metrics = run(cfg)
    out = tmp_path / "run"
    assert (out / "final" / "model.safetensors").is_file() and (out / "summary.md").is_file()
    assert "length-bias alarm" in (out / "summary.md").read_text()  # its state is reported, raised or not
    assert AutoModelForCausalLM.from_pretrained(out / "final") is not None
    saved = json.loads((out / "metrics.json").read_text())
    assert "arithmetic/accuracy" in saved["before"] and "arithmetic/accuracy" in saved["after"]
    assert saved["train"]["global_step"] == 4 and saved["prompt_pool"]["kept"] > 0
    # the step-time split: updates_per_batch 2 (the default) generates on steps 1 and 3 only
    history = [e for e in json.loads((out / "log_history.json").read_text()) if "time/step_s" in e]
    assert [e["step"] for e in history] == [1, 2, 3, 4]
    assert [e["time/rollout_s"] > 0 for e in history] == [True, False, True, False]
    assert [e["step"] for e in history if "time/tokens_per_s" in e] == [1, 3]
    split = saved["train"]["step_time"]
    assert split["steps"] == 4 and set(split["mean_s"]) == {*PHASES, "step"}
    assert split["mean_s"]["step"] == pytest.approx(sum(e["time/step_s"] for e in history) / 4)
    assert sum(split["share"].values()) == pytest.approx(1.0)  # the phases add up to the steps
    assert 0 < split["share"]["rollout"] < 1 and split["tokens_per_s"] > 0
    assert split["tokens_per_s"] == pytest.approx(sum(e["rollout/generated_tokens"] for e in history)
                                                  / sum(e["time/rollout_s"] for e in history))
    assert {"time/step_s/last", "time/rollout_frac/last"} <= set(saved["train"])
    summary = (out / "summary.md").read_text()
    assert "**step time**: " in summary and "generated tokens/s" in summary
    report = pipeline_report(tmp_path, [("grpo", out)]).read_text()  # the pipeline report quotes it too
    assert "**grpo step time**: " in report
    pool = [json.loads(line) for line in (out / "prompt_pool.jsonl").read_text().splitlines()]
    assert pool and all(0 < p["pass_rate"] < 0.9 for p in pool)
    assert len(pool) == saved["prompt_pool"]["kept"]
    assert run(cfg) == metrics  # finished: not redone without --overwrite


def test_configs_validate(tmp_path, checkpoint):
    cfg = load_config("configs/tiny/grpo.yaml", GRPOStageConfig)
    assert cfg.loss.drop_negative_high_ratio and cfg.loss.kl == "minimax" and cfg.advantages.balanced
    assert cfg.training.adam_beta2 == 0.95 and cfg.training.adam_epsilon == 1e-15
    with pytest.raises(ConfigError, match="loss.bta"):
        load_config(stage_yaml(tmp_path, checkpoint), GRPOStageConfig, {"loss.bta": 0.1})
    with pytest.raises(ConfigError, match="multiple of num_generations"):
        load_config(stage_yaml(tmp_path, checkpoint), GRPOStageConfig, {"training.batch_size": 10})
    with pytest.raises(ConfigError, match="loss.name"):
        load_config(stage_yaml(tmp_path, checkpoint), GRPOStageConfig, {"loss.name": "ppo"})


def test_user_pool_file_drives_grpo_band_and_evaluation(tmp_path, checkpoint):
    """A pool file of the user's own rows (prompt text + a custom `solution` column, read by `math` through its
    `fields` option) goes through the offline band, trains at the GRPO defaults (updates_per_batch 2: the drop rule
    fires), is refreshed online, and an eval file scored by the same verifier is reported before/after."""
    from alignment.evaluation import generate_greedy
    from data_recipes.prompt_pool import load_pool_files
    from rewards import Verifier

    rows = {r["messages"][0]["content"]: r["answer"] for r in arithmetic_examples(600, seed=5, max_operand=3)}
    user = [{"prompt": q, "solution": int(a), "source": "mine"} for q, a in rows.items()]
    pool_file, held_file = tmp_path / "pool.jsonl", tmp_path / "held.jsonl"
    pool_file.write_text("".join(json.dumps(r) + "\n" for r in user[:-8]))
    held_file.write_text("".join(json.dumps(r) + "\n" for r in user[-8:]))
    path = tmp_path / "grpo.yaml"
    path.write_text(f"""
output_dir: {tmp_path / "run"}
model: {{path: {checkpoint}}}
prompts: {{files: [{pool_file}], k: 4, refresh: {{every: 2, measure: 8}}}}
reward: {{math: {{fields: {{answer: solution}}}}}}
sampling: {{max_new_tokens: 12, repetition_stop_k: 10}}
num_generations: 4
training: {{max_steps: 4, learning_rate: 5.0e-3, batch_size: 16, logging_steps: 1, save_steps: 2}}
eval:
  files: {{mine: {{path: {held_file}, verifier: {{math: {{fields: {{answer: solution}}}}}}}}}}
  max_new_tokens: 12
""")
    cfg = load_config(path, GRPOStageConfig)
    assert cfg.updates_per_batch == 2  # the default
    metrics = run(cfg)
    out = tmp_path / "run"
    # the offline band over the user's rows, by the user's verifier: kept rows carry their field and rate
    pool = [json.loads(line) for line in (out / "prompt_pool.jsonl").read_text().splitlines()]
    reserve = [json.loads(line) for line in (out / "prompt_pool_reserve.jsonl").read_text().splitlines()]
    assert pool and all(0 < p["pass_rate"] < 0.9 and p["source"] == "mine" for p in pool)
    assert all(p["pass_rate"] == 0.0 for p in reserve)
    assert {p["prompt"][0]["content"]: p["solution"] for p in pool} == \
        {q: str(a) for q, a in rows.items() if q in {p["prompt"][0]["content"] for p in pool}}
    assert len(pool) + len(reserve) + metrics["prompt_pool"]["at_or_above_hi"] == metrics["prompt_pool"]["scored"]
    history = json.loads((out / "log_history.json").read_text())
    assert max(e.get("dropped", 0.0) for e in history) > 0  # change 1 fired at the default
    assert any("pool/rate_mean" in e for e in history) and any("pool/measured" in e for e in history)
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "pool_state.json").read_text())
    assert len(state["slots"]) == len(pool) and state["counts"]["measured"] == min(8, len(reserve))
    # evaluation: the reported held-out number is the verifier's mean over the final model's greedy answers
    final = load_model(str(out / "final"))
    held = load_pool_files([str(held_file)])
    texts = generate_greedy(final, tokenizer_of(out / "final"), [r["prompt"] for r in held], 12, 32)
    expected = sum(Verifier(cfg.eval.files["mine"]["verifier"])([r["prompt"] for r in held], texts, held)) / 8
    assert metrics["after"]["mine/accuracy"] == pytest.approx(expected)
    assert "mine/accuracy" in metrics["before"]


def tokenizer_of(path):
    from alignment.modeling import load_tokenizer

    return load_tokenizer(path)
