"""Offline success-rate filtering: pass rates from k rollouts, the band keeps exactly the prompts inside it, the pool
file carries the rates."""

import pytest

from alignment.rollout.base import RolloutBatch, SamplingOptions
from data_recipes.prompt_pool import (PoolOptions, build_prompt_pool, exclude_prompts, filter_by_success_rate,
                                      load_pool, success_rates)
from data_recipes.sft_mix import build_sft_mix
from data_recipes.tasks import arithmetic_examples


class ScriptedWorker:
    """A rollout worker whose j-th sample for a prompt is right iff j < round(rate · n), rate read from a table."""

    def __init__(self, rate_of: dict[str, float]):
        self.rate_of, self.calls = rate_of, []

    def sync_weights(self, model):
        pass

    def generate(self, prompts, n, sampling):
        self.calls.append((len(prompts), n))
        texts = []
        for p in prompts:
            question = p[-1]["content"]
            right, answer = self.rate_of[question]
            texts += [f"= {answer}" if j < round(right * n) else "= -1" for j in range(n)]
        m = len(texts)
        return RolloutBatch([[0]] * m, [[1]] * m, [[0.0]] * m, texts, ["eos"] * m, n=n)


@pytest.fixture()
def rows():
    rows = arithmetic_examples(40, seed=3, max_operand=20)
    unique = {r["messages"][0]["content"]: r for r in rows}
    return list(unique.values())[:10]


def scripted(rows, rates):
    return ScriptedWorker({r["messages"][0]["content"]: (rate, r["answer"]) for r, rate in zip(rows, rates)})


RATES = [0.0, 0.125, 0.25, 0.5, 0.75, 0.875, 1.0, 0.0, 0.5, 1.0]


def test_success_rates_count_verifier_passes_over_k_samples(rows):
    worker = scripted(rows, RATES)
    assert success_rates(worker, rows, k=8, sampling=SamplingOptions()) == RATES
    assert worker.calls == [(10, 8)]  # one batched call, n = k per prompt


def test_band_keeps_exactly_the_prompts_inside(rows, tmp_path):
    worker = scripted(rows, RATES)
    opts = PoolOptions(builtin={"arithmetic": {}}, k=8, lo=0.0, hi=0.9)
    pool, stats = build_prompt_pool(worker, rows, opts, SamplingOptions(), tmp_path / "pool.jsonl")
    inside = [i for i, r in enumerate(RATES) if 0.0 < r < 0.9]
    assert pool["pass_rate"] == [RATES[i] for i in inside]
    assert [p[-1]["content"] for p in pool["prompt"]] == [rows[i]["messages"][0]["content"] for i in inside]
    assert all(p[-1]["role"] == "user" for p in pool["prompt"])  # the reference reply is not in the prompt
    assert pool["answer"] == [rows[i]["answer"] for i in inside]
    assert stats["kept"] == 6 and stats["scored"] == 10
    assert stats["below_or_at_lo"] == 2 and stats["at_or_above_hi"] == 2
    on_disk = load_pool(tmp_path / "pool.jsonl")
    assert on_disk["pass_rate"] == pool["pass_rate"] and on_disk["task"] == ["arithmetic"] * 6
    # a narrower band, and the cap
    narrow, _ = build_prompt_pool(scripted(rows, RATES), rows, PoolOptions(builtin={"a": {}}, lo=0.2, hi=0.6),
                                  SamplingOptions())
    assert narrow["pass_rate"] == [0.25, 0.5, 0.5]
    capped, _ = build_prompt_pool(scripted(rows, RATES), rows, PoolOptions(builtin={"a": {}}, max_prompts=2),
                                  SamplingOptions())
    assert len(capped) == 2


def test_duplicate_prompts_are_scored_once(rows):
    worker = scripted(rows, RATES)
    pool, stats = build_prompt_pool(worker, rows + rows[:4], PoolOptions(builtin={"a": {}}), SamplingOptions())
    assert stats["scored"] == 10 and worker.calls == [(10, 8)]


def test_empty_pool_and_bad_band_fail_clearly(rows):
    with pytest.raises(ValueError, match="prompt pool is empty"):
        build_prompt_pool(scripted(rows, [0.0] * 10), rows, PoolOptions(builtin={"a": {}}), SamplingOptions())
    with pytest.raises(ValueError, match="lo < hi"):
        PoolOptions(builtin={"a": {}}, lo=0.5, hi=0.5)
    with pytest.raises(ValueError, match="rows but"):
        filter_by_success_rate(rows, [0.5], 0, 1)


def test_prompts_seen_in_the_sft_mix_are_excluded():
    """Operands <= 20 are all in a 12000-row SFT mix; operands up to 30 mostly are not."""
    sft = [dict(r) for r in build_sft_mix({"arithmetic": {"n": 12000, "max_operand": 20}}, [], 0)]
    candidates = arithmetic_examples(300, seed=1, max_operand=30)
    fresh = exclude_prompts(candidates, sft)
    seen = {r["messages"][0]["content"] for r in sft}
    assert fresh and all(r["messages"][0]["content"] not in seen for r in fresh)
    assert len(fresh) == sum(r["messages"][0]["content"] not in seen for r in candidates)
    assert len(exclude_prompts(arithmetic_examples(300, seed=1, max_operand=20), sft)) < 10
