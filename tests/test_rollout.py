"""Rollout worker: per-token log-probs equal the trainer's, groups, EOS handling, repetition early stop, weight sync,
and the train-vs-rollout mismatch / importance-weight functions."""

import math

import pytest
import torch

from alignment.modeling import load_model
from alignment.rollout import SamplingOptions, build_rollout, encode_prompts, importance_weights, logprob_mismatch
from data_recipes.tokenizer import builtin_tokenizer

TINY = "configs/tiny/model.yaml"
PROMPTS = [[{"role": "user", "content": "What is 3 + 4?"}], [{"role": "user", "content": "Compute 12 - 5."}]]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return builtin_tokenizer(vocab_size=1024)


@pytest.fixture(scope="module")
def model():
    return load_model(TINY, seed=0).eval()


def teacher_forced_logp(model, prompt_ids, completion_ids, temperature):
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, output_router_logits=False).logits[0, len(prompt_ids) - 1 : -1]
    return torch.log_softmax(logits.float() / temperature, -1).gather(1, torch.tensor(completion_ids)[:, None])[:, 0]


def test_logprobs_match_the_trained_model_and_groups_are_prompt_major(model, tokenizer):
    torch.manual_seed(0)
    worker = build_rollout("transformers", model, tokenizer, batch_size=4)  # 6 rows: two generate batches
    batch = worker.generate(PROMPTS, n=3, sampling=SamplingOptions(temperature=0.7, max_new_tokens=12))
    assert len(batch) == 6 and batch.n == 3
    encoded = encode_prompts(tokenizer, PROMPTS)
    assert batch.prompt_ids == [encoded[0]] * 3 + [encoded[1]] * 3
    for p, c, lp, reason in zip(batch.prompt_ids, batch.completion_ids, batch.logprobs, batch.stop_reasons):
        assert len(c) == len(lp) > 0
        assert reason == ("eos" if c[-1] == tokenizer.eos_token_id else "length")
        assert tokenizer.pad_token_id not in c or reason != "eos"
        ref = teacher_forced_logp(model, p, c, 0.7)  # what the trainer computes, unpadded, no cache
        assert torch.allclose(torch.tensor(lp), ref, atol=1e-4), (lp, ref)
    assert batch.texts[0] == tokenizer.decode(batch.completion_ids[0], skip_special_tokens=True)


def test_eos_ends_a_completion(model, tokenizer):
    """Make <|im_end|> the only likely token: every completion is exactly [eos], stop reason eos."""
    confident = load_model(TINY, seed=0).eval()
    with torch.no_grad():
        confident.lm_head.weight.zero_()
        confident.lm_head.weight[tokenizer.eos_token_id] = 0
        confident.lm_head.weight[tokenizer.eos_token_id, 0] = 1e3  # huge logit on eos whenever h_0 > 0 ...
        confident.model.norm.weight.zero_()                         # ... so pin the final hidden state
        confident.model.norm.weight[0] = 1.0
    worker = build_rollout("transformers", confident, tokenizer)
    h = worker.generate(PROMPTS[:1], n=1, sampling=SamplingOptions(max_new_tokens=4))
    if h.completion_ids[0] != [tokenizer.eos_token_id]:  # the sign of h_0 decides; flip and retry
        with torch.no_grad():
            confident.lm_head.weight[tokenizer.eos_token_id, 0] = -1e3
        h = worker.generate(PROMPTS[:1], n=1, sampling=SamplingOptions(max_new_tokens=4))
    batch = worker.generate(PROMPTS, n=2, sampling=SamplingOptions(max_new_tokens=8))
    assert batch.completion_ids == [[tokenizer.eos_token_id]] * 4
    assert batch.stop_reasons == ["eos"] * 4 and batch.metrics["rollout/stop_eos"] == 1.0
    assert all(lp[0] > math.log(0.99) for lp in batch.logprobs)


def test_repetition_early_stop_cuts_after_k_confident_tokens(model, tokenizer):
    """At a near-greedy temperature almost every sampled token has p > 0.99 (under the temperature-T distribution
    the stop rule reads): with K = 4 a completion stops at the end of its first run of 4 confident tokens; with the
    rule off they run on."""
    worker = build_rollout("transformers", model, tokenizer)
    torch.manual_seed(0)
    sampling = dict(temperature=0.002, max_new_tokens=16, repetition_stop_k=4)
    stop = worker.generate(PROMPTS, n=4, sampling=SamplingOptions(**sampling, repetition_stop_p=0.99))
    reps = [i for i, r in enumerate(stop.stop_reasons) if r == "repetition"]
    assert len(reps) >= 6, stop.stop_reasons
    for i in reps:
        confident = [x > math.log(0.99) for x in stop.logprobs[i]]
        assert len(stop.completion_ids[i]) == len(confident) >= 4
        assert all(confident[-4:])  # the last K tokens were all confident ...
        assert not any(all(confident[j : j + 4]) for j in range(len(confident) - 4))  # ... the first such run
    assert stop.metrics["rollout/stop_repetition"] == len(reps) / 8
    free = worker.generate(PROMPTS, n=4, sampling=SamplingOptions(**{**sampling, "repetition_stop_k": None}))
    assert "repetition" not in free.stop_reasons
    assert max(len(c) for c in free.completion_ids) > 4


def test_sync_weights_switches_the_sampling_model(model, tokenizer):
    other = load_model(TINY, seed=7).eval()
    worker = build_rollout("transformers", model, tokenizer)
    torch.manual_seed(0)
    batch = worker.generate(PROMPTS[:1], n=1, sampling=SamplingOptions(max_new_tokens=6))
    worker.sync_weights(other)
    p, c = batch.prompt_ids[0], batch.completion_ids[0]
    assert worker.model is other
    assert not torch.allclose(teacher_forced_logp(other, p, c, 1.0), torch.tensor(batch.logprobs[0]), atol=1e-3)


def test_mismatch_metrics_and_importance_weights():
    train = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.8, 0.1, 0.3]]))
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    same = logprob_mismatch(train, train.clone(), mask)
    assert same["mismatch/logp_abs_mean"] == 0 and same["mismatch/prob_corr"] == pytest.approx(1.0)
    rollout = train.clone()
    rollout[0, 1] = math.log(0.5)  # one token: Δ = log 0.25 − log 0.5 = −log 2
    moved = logprob_mismatch(train, rollout, mask)
    assert moved["mismatch/logp_abs_max"] == pytest.approx(math.log(2))
    assert moved["mismatch/logp_abs_mean"] == pytest.approx(math.log(2) / 5)  # 5 unmasked tokens
    assert moved["mismatch/prob_corr"] < 1
    w = importance_weights(train, rollout, mask, level="token", cap=2.0)
    assert w[0, 1].item() == pytest.approx(0.5) and w[0, 0].item() == 1.0 and w[1, 2].item() == 1.0
    big = importance_weights(rollout, train, mask, level="token", cap=1.5)
    assert big[0, 1].item() == pytest.approx(1.5)  # ratio 2 truncated at the cap
    seq = importance_weights(train, rollout, mask, level="sequence")
    assert torch.allclose(seq[0], torch.full((3,), 0.5)) and torch.allclose(seq[1], torch.ones(3))


def test_bad_sampling_options():
    with pytest.raises(ValueError, match="temperature"):
        SamplingOptions(temperature=0)
    with pytest.raises(ValueError, match="repetition_stop_k"):
        SamplingOptions(repetition_stop_k=0)
    with pytest.raises(ValueError, match="unknown rollout backend"):
        build_rollout("nope", None, None)
