"""Router replay (alignment.routing): replaying a model's own routes is its plain forward bit for bit; replaying
other routes makes every MoE layer use exactly those experts (forward, gradient-checkpoint recompute, gradients to
the router); the transformers rollout records prefill + decode routes equal to what a full forward over prompt +
completion routes; a tiny GRPO run with replay on trains and logs `rollout/route_mismatch` (~0 on CPU fp32); and in
bf16 replay narrows the train/rollout |Δ log p| (numbers printed: `pytest -s`)."""

import copy
import math

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig

from alignment.config import ConfigError, load_config
from alignment.losses import LossOptions
from alignment.modeling import ModelOptions, load_model, load_tokenizer
from alignment.rollout import SamplingOptions, TransformersRollout, build_rollout
from alignment.routing import layout_routes, moe_routers, record_routes, replay_routes, route_mismatch
from alignment.trainers import DynamicSamplingOptions, MiniMaxGRPOTrainer, _batch_routes
from data_recipes.tasks import arithmetic_examples
from pipelines.grpo import Config as GRPOStageConfig

TINY = "configs/tiny/model.yaml"
BASE = "configs/tiny/base"  # the shipped pretrained tiny model: fitted routers, as in a real run


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(BASE)


def padded_rows(seed: int = 0, vocab: int = 1024):
    """Three rows of random tokens in the trainer's layout: a left-padded one, a right-padded one, a full one."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 24), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    mask[1, -5:] = 0
    return ids, mask


def forward_routes(model, ids, mask):
    with torch.no_grad(), record_routes(model) as log:
        logits = model(input_ids=ids, attention_mask=mask).logits
    return logits, log.routes(ids.shape[0])


def test_replaying_own_routes_is_the_plain_forward():
    model = load_model(TINY, seed=0).eval()
    ids, mask = padded_rows()
    plain, routes = forward_routes(model, ids, mask)
    L, K = model.config.num_hidden_layers, model.config.num_experts_per_tok
    assert routes.shape == (3, 24, L, K) and len(moe_routers(model)) == L
    with torch.no_grad(), replay_routes(model, routes) as own:
        replayed = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(replayed, plain)  # bit for bit, fp32
    assert torch.equal(own.routes(3), routes)  # the routers' own choices, logged meanwhile, are the same
    # -1 rows route by the model's own top-k: all -1 is the plain forward too
    with torch.no_grad(), replay_routes(model, torch.full_like(routes, -1)):
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, plain)
    # a replay must cover exactly the forward's rows
    with pytest.raises(ValueError, match="router replay"), torch.no_grad(), replay_routes(model, routes[:2]):
        model(input_ids=ids, attention_mask=mask)


def test_replaying_other_routes_uses_exactly_them_and_trains_the_router():
    torch.manual_seed(0)
    model = load_model(TINY, seed=0).train()
    other = copy.deepcopy(model).eval()
    with torch.no_grad():
        for router in moe_routers(other):
            router.weight.add_(torch.randn_like(router.weight) * router.weight.std())
    ids, mask = padded_rows(1)
    plain, own = forward_routes(model.eval(), ids, mask)
    _, given = forward_routes(other, ids, mask)
    given[2, :4] = -1  # some positions left to the model's own routing
    assert 0.2 < float(route_mismatch(given, own)[0]) / given[..., 0].numel() / 2

    seen = []  # what the experts themselves are handed
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(args[1])) for m in model.modules()
             if type(m).__name__ == "MiniMaxExperts"]
    with torch.no_grad(), replay_routes(model, given), record_routes(model) as used:
        replayed = model(input_ids=ids, attention_mask=mask).logits
    for h in hooks:
        h.remove()
    used = used.routes(3)
    experts = torch.stack([s.reshape(3, 24, -1) for s in seen], dim=2)
    assert torch.equal(experts, used)
    assert torch.equal(used[(given >= 0).all(-1)], given[(given >= 0).all(-1)])
    # the -1 positions route by themselves: row 2's first 4 tokens see only each other (causal), so their routes are
    # the plain forward's
    assert torch.equal(used[2, :4], own[2, :4])
    assert (replayed - plain).abs().max() > 1e-3

    # gradients reach every router through the replayed gate weights; with gradient checkpointing the backward's
    # recompute replays the same routes (after the context has closed), so the gradients are the same
    def grads(checkpointing: bool):
        m = copy.deepcopy(model).train()
        if checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with replay_routes(m, given, log_own=False):
            out = m(input_ids=ids, attention_mask=mask).logits
        torch.log_softmax(out, -1)[..., 5].sum().backward()
        return [r.weight.grad.clone() for r in moe_routers(m)]

    plain_grads, checkpointed = grads(False), grads(True)
    assert all(g.abs().sum() > 0 for g in plain_grads)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(plain_grads, checkpointed))


def test_rollout_routes_are_the_full_forward_routes(tokenizer):
    """Prefill over left-padded prompts of different lengths, then cached decode steps, completions of different
    lengths (the repetition stop ends some early): each completion's recorded routes equal, position by position,
    those of one forward over its prompt + completion, and those of the trainer's padded batch (fp32)."""
    torch.manual_seed(0)
    model = load_model(ModelOptions(path=BASE, device="cpu"), tokenizer=tokenizer).eval()
    worker = TransformersRollout(model, tokenizer, record_routes=True)
    prompts = [r["messages"][:1] for r in arithmetic_examples(4, seed=3, max_operand=20)]
    prompts.append([{"role": "user", "content": "What is 2 + 2? Answer with the number and explain it."}])
    batch = worker.generate(prompts, n=2, sampling=SamplingOptions(max_new_tokens=14, repetition_stop_k=2,
                                                                    repetition_stop_p=0.6))
    lengths = [len(c) for c in batch.completion_ids]
    assert len({len(p) for p in batch.prompt_ids}) > 1 and len(set(lengths)) > 1, lengths
    L, K = model.config.num_hidden_layers, model.config.num_experts_per_tok
    longest = max(lengths)
    for p, c, r in zip(batch.prompt_ids, batch.completion_ids, batch.routes):
        assert r.dtype == torch.int16 and r.shape == (len(p) + len(c), L, K)
        ran = (r >= 0).all(-1).all(-1)
        # every position the engine ran; the last token only when generation went on after it
        assert ran[:-1].all() and bool(ran[-1]) == (len(c) < longest)
        _, full = forward_routes(model, torch.tensor([p + c]), None)
        assert torch.equal(r[ran].long(), full[0][ran])
    # the trainer's layout: left-padded prompts, right-padded completions, one forward
    P, C = max(map(len, batch.prompt_ids)), longest
    prompt_routes, completion_routes = layout_routes(batch.routes, [len(p) for p in batch.prompt_ids], P, C)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (P - len(p)) + p + c + [pad] * (C - len(c))
                        for p, c in zip(batch.prompt_ids, batch.completion_ids)])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * (len(p) + len(c)) + [0] * (C - len(c))
                         for p, c in zip(batch.prompt_ids, batch.completion_ids)])
    given = torch.cat([prompt_routes, completion_routes], 1)
    _, own = forward_routes(model, ids, mask)
    differing, total = route_mismatch(given, own)
    assert int(differing) == 0 and int(total) == (sum(map(len, batch.prompt_ids)) + sum(lengths)) * L * K \
        - sum(len(c) == longest for c in batch.completion_ids) * L * K


def grpo_args(tmp_path, **kw):
    defaults = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, num_generations=4,
                    max_completion_length=12, learning_rate=3e-3, max_steps=2, logging_steps=1, report_to=[],
                    use_cpu=True, save_strategy="no", beta=0.0, remove_unused_columns=False, seed=0,
                    adam_beta2=0.95, adam_epsilon=1e-15, num_iterations=2,
                    bf16=False)  # TRL's default is bf16 autocast, even on CPU: fp32 here, as the stage sets it
    return GRPOConfig(**{**defaults, **kw})


def digit_reward(prompts, completions, **_):
    """Share of digits in the completion text: varied rewards within a group, from the first step."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


def test_tiny_grpo_run_with_router_replay(tmp_path, tokenizer):
    torch.manual_seed(0)
    # gradient checkpointing on: the loss's backward recomputes the MoE layers under the replayed routes
    model = load_model(ModelOptions(path=BASE, device="cpu", gradient_checkpointing=True), tokenizer=tokenizer)
    routers_before = [r.weight.detach().clone() for r in moe_routers(model)]
    data = Dataset.from_dict({"prompt": [r["messages"][:1] for r in arithmetic_examples(64, seed=0, max_operand=9)]})
    sampling = SamplingOptions(max_new_tokens=12, repetition_stop_k=None)
    trainer = MiniMaxGRPOTrainer(
        model=model, reward_funcs=digit_reward, args=grpo_args(tmp_path), train_dataset=data,
        processing_class=tokenizer, loss=LossOptions(kl="none"), sampling=sampling,
        rollout=build_rollout("transformers", model, tokenizer, record_routes=True),
        dynamic_sampling=DynamicSamplingOptions(enabled=True), router_replay=True)
    trainer.train()
    history = trainer.state.log_history
    losses = [e["loss"] for e in history if "loss" in e]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert any("reward" in e for e in history) and any("aux_loss" in e for e in history)
    mismatch = [e["rollout/route_mismatch"] for e in history if "rollout/route_mismatch" in e]
    assert mismatch and max(mismatch) < 1e-3, mismatch  # the trainer's own routers agree (fp32, same weights)
    assert max(e["mismatch/logp_abs_mean"] for e in history if "mismatch/logp_abs_mean" in e) < 1e-4
    assert any(not torch.equal(a, r.weight) for a, r in zip(routers_before, moe_routers(model)))

    # the wiring: a batch's routes are what the π_old pass and the loss's forward route by
    trainer.model.train()
    batch = trainer._generate_and_score_completions([dict(data[i]) for i in range(4) for _ in range(4)])
    routes = _batch_routes(batch)
    assert routes is not None and routes.shape[:2] == (16, batch["prompt_ids"].size(1) + batch["completion_ids"].size(1))
    other = torch.where(routes >= 0, (routes + 1) % model.config.num_local_experts, routes)
    part = {k: v[:4] if isinstance(v, torch.Tensor) and v.dim() else v for k, v in batch.items()}
    part["prompt_routes"], part["completion_routes"] = other[:4].split(
        [batch["prompt_ids"].size(1), batch["completion_ids"].size(1)], dim=1)
    with record_routes(model) as used:
        trainer._old_logps(part, other[:4])
    assert torch.equal(used.routes(4)[(other[:4] >= 0).all(-1)], other[:4][(other[:4] >= 0).all(-1)].long())
    with record_routes(model) as used:
        trainer._compute_loss(trainer.model, part)
    assert torch.equal(used.routes(4)[(other[:4] >= 0).all(-1)], other[:4][(other[:4] >= 0).all(-1)].long())


def test_router_replay_option(tmp_path):
    path = tmp_path / "grpo.yaml"
    path.write_text(f"""
output_dir: {tmp_path / "run"}
model: {{path: {BASE}}}
prompts: {{builtin: {{arithmetic: {{n: 20}}}}}}
rollout: {{router_replay: true}}
""")
    cfg = load_config(path, GRPOStageConfig)
    assert cfg.rollout.router_replay and cfg.rollout.worker_kwargs(0)["record_routes"]
    assert not load_config(path, GRPOStageConfig, {"rollout.router_replay": False}).rollout.worker_kwargs(0)[
        "record_routes"]
    with pytest.raises(ConfigError, match="rollout.router_replay"):  # the vLLM worker records no routes yet
        load_config(path, GRPOStageConfig, {"rollout.backend": "vllm"})
    with pytest.raises(ValueError, match="router_replay"):
        MiniMaxGRPOTrainer(model=load_model(TINY), reward_funcs=digit_reward, args=grpo_args(tmp_path),
                           train_dataset=Dataset.from_dict({"prompt": ["a"] * 4}), loss=LossOptions(kl="none"),
                           sampling=SamplingOptions(max_new_tokens=12), router_replay=True)


def test_bf16_mismatch_with_and_without_replay(tokenizer):
    """The fitted tiny model in bfloat16 on CPU: rollout log-probs (prefill + cached decode) against a trainer-style
    full forward over prompt + completion, with and without the rollout's routes. Replay removes the routing flips
    (a fraction of a percent of the decisions) and the log-prob error they cause; what is left is bf16 numerics."""
    model = load_model(ModelOptions(path=BASE, dtype="bfloat16", device="cpu"), tokenizer=tokenizer).eval()
    worker = TransformersRollout(model, tokenizer, record_routes=True)
    pad = tokenizer.pad_token_id
    sums = {"plain": 0.0, "replay": 0.0, "tokens": 0, "flips": 0, "decisions": 0}
    for seed in (0, 1):
        torch.manual_seed(seed)
        prompts = [r["messages"][:1] for r in arithmetic_examples(32, seed=seed, max_operand=9)]
        batch = worker.generate(prompts, n=2, sampling=SamplingOptions(max_new_tokens=24, repetition_stop_k=None))
        P, C = max(map(len, batch.prompt_ids)), max(map(len, batch.completion_ids))
        ids = torch.tensor([[pad] * (P - len(p)) + p + c + [pad] * (C - len(c))
                            for p, c in zip(batch.prompt_ids, batch.completion_ids)])
        mask = torch.tensor([[0] * (P - len(p)) + [1] * (len(p) + len(c)) + [0] * (C - len(c))
                             for p, c in zip(batch.prompt_ids, batch.completion_ids)])
        rollout_logp = torch.tensor([lp + [0.0] * (C - len(lp)) for lp in batch.logprobs])
        keep = mask[:, P:].bool()
        given = torch.cat(layout_routes(batch.routes, [len(p) for p in batch.prompt_ids], P, C), 1)

        def logp(routing):
            with torch.no_grad(), routing as log:
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
            return torch.log_softmax(logits[:, P - 1:-1], -1).gather(-1, ids[:, P:, None])[..., 0], log

        plain, own = logp(record_routes(model))
        replayed, _ = logp(replay_routes(model, given))
        sums["plain"] += float((plain - rollout_logp).abs()[keep].sum())
        sums["replay"] += float((replayed - rollout_logp).abs()[keep].sum())
        sums["tokens"] += int(keep.sum())
        flips, decisions = route_mismatch(given, own.routes(len(ids)))
        sums["flips"] += int(flips)
        sums["decisions"] += int(decisions)
    plain, replay = sums["plain"] / sums["tokens"], sums["replay"] / sums["tokens"]
    print(f"\nbf16 CPU, {sums['tokens']} completion tokens: routing decisions differing {sums['flips']} of "
          f"{sums['decisions']}; mean |Δ log p| train vs rollout: without replay {plain:.5f}, with replay {replay:.5f}")
    assert sums["flips"] > 0  # bf16 does flip routes here
    assert replay <= plain
