"""Loss functions: equivalence with TRL's GRPO/CISPO code path, and each MiniMax change on hand-built tokens."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl import GRPOTrainer

from alignment.losses import (LossOptions, aggregate, balanced_advantages, group_advantages, kl_k3, kl_minimax,
                              policy_loss, zero_variance_groups)


def trl_loss(logp, old_logp, adv, mask, loss_type="grpo", beta=0.0, ref_logp=None, eps_low=0.2, eps_high=0.2):
    """TRL 1.16's own `GRPOTrainer._compute_loss`, run on given tensors: a stand-in trainer whose log-prob forward
    returns `logp` (everything after that forward is TRL's code, untouched)."""
    B, T = logp.shape
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
        accelerator=SimpleNamespace(reduce=lambda x, reduction: x, gather=lambda x: x, num_processes=1),
    )
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old_logp, "num_items_in_batch": mask.sum()}
    if ref_logp is not None:
        inputs["ref_per_token_logps"] = ref_logp
    return GRPOTrainer._compute_loss(stub, None, inputs)


def random_batch(seed=0, B=6, T=7):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g) * 3).requires_grad_()
    old = (logp.detach() + torch.randn(B, T, generator=g) * 0.4).clamp(max=0)  # ratios well outside [0.8, 1.2]
    ref = (logp.detach() + torch.randn(B, T, generator=g) * 0.3).clamp(max=0)
    adv = torch.randn(B, generator=g)
    lengths = torch.tensor([7, 3, 5, 1, 6, 4])[:B]
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    return logp, old, ref, adv, mask


def grad_of(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


def test_all_changes_off_and_beta_zero_equals_trl_grpo():
    logp, old, _, adv, mask = random_batch()
    opts = LossOptions(drop_negative_high_ratio=False, kl="none", beta=0.0, aggregation="sequence_mean")
    ours, _ = policy_loss(logp, old, adv, mask, opts)
    theirs = trl_loss(logp, old, adv, mask)
    assert torch.allclose(ours, theirs, atol=1e-7)
    assert torch.allclose(grad_of(ours, logp), grad_of(theirs, logp), atol=1e-7)
    assert (old != logp.detach()).any()  # ratios != 1, so clipping is exercised


def test_k3_kl_with_beta_equals_trl_grpo_with_beta():
    logp, old, ref, adv, mask = random_batch(seed=1)
    opts = LossOptions(drop_negative_high_ratio=False, kl="k3", beta=0.1)
    ours, metrics = policy_loss(logp, old, adv, mask, opts, ref_logp=ref)
    theirs = trl_loss(logp, old, adv, mask, beta=0.1, ref_logp=ref)
    assert torch.allclose(ours, theirs, atol=1e-7)
    assert torch.allclose(grad_of(ours, logp), grad_of(theirs, logp), atol=1e-7)
    assert metrics["kl"] > 0


def test_cispo_equals_trl_cispo_and_its_formula():
    logp, old, _, adv, mask = random_batch(seed=2)
    opts = LossOptions(name="cispo", epsilon_low=None, epsilon_high=0.3, kl="none", aggregation="token_mean")
    ours, metrics = policy_loss(logp, old, adv, mask, opts)
    # TRL's cispo caps the weight at `epsilon_high` itself (absolute), M1 writes 1 + eps_high
    theirs = trl_loss(logp, old, adv, mask, loss_type="cispo", eps_high=1.3)
    assert torch.allclose(ours, theirs, atol=1e-7)
    # M1 §3: J = 1/Σ|o_i| Σ_i Σ_t sg(clip(r, ., 1+eps_high)) A log π; loss = -J
    w = torch.exp(logp.detach() - old).clamp(max=1.3)
    expected = -(w * adv[:, None] * logp * mask).sum() / mask.sum()
    assert torch.allclose(ours, expected, atol=1e-7)
    g = grad_of(ours, logp)
    assert torch.allclose(g, -(w * adv[:, None] * mask) / mask.sum(), atol=1e-7)
    clipped = (torch.exp(logp.detach() - old) > 1.3) & mask.bool()
    assert clipped.any() and (g[clipped] != 0).all()  # capped tokens keep their gradient (unlike PPO)
    assert metrics["clip_high"] > 0


def hand_tokens():
    """One row, three tokens: (r=2, A=-1) the bad case, (r=2, A=+1) clipped high, (r=1, A=-1) ordinary."""
    logp = torch.log(torch.tensor([[0.4, 0.4, 0.3]])).requires_grad_()
    old = torch.log(torch.tensor([[0.2, 0.2, 0.3]]))
    adv = torch.tensor([[-1.0, 1.0, -1.0]])
    return logp, old, adv, torch.ones(1, 3)


def test_drop_removes_large_ratio_negative_advantage_tokens_only():
    logp, old, adv, mask = hand_tokens()
    off = LossOptions(drop_negative_high_ratio=False, kl="none")
    on = LossOptions(drop_negative_high_ratio=True, kl="none")  # threshold 1 + 0.2
    loss_off, _ = policy_loss(logp, old, adv, mask, off)
    loss_on, metrics = policy_loss(logp, old, adv, mask, on)
    # per token (off): -min(2·-1, 1.2·-1) = 2 (unbounded in r), -min(2, 1.2) = -1.2, -min(-1, -1) = 1
    assert loss_off.item() == pytest.approx((2 - 1.2 + 1) / 3)
    # on: the first token leaves the loss and its normaliser
    assert loss_on.item() == pytest.approx((-1.2 + 1) / 2)
    g_off, g_on = grad_of(loss_off, logp)[0], grad_of(loss_on, logp)[0]
    # d(-r·A)/dlogp = -r·A: 2/3 for the bad token with standard clipping, exactly 0 when dropped
    assert g_off[0].item() == pytest.approx(2 / 3) and g_on[0].item() == 0.0
    assert g_off[1].item() == 0.0 and g_on[1].item() == 0.0  # positive advantage: clipped as usual, both ways
    assert g_on[2].item() == pytest.approx(1 / 2)  # ordinary token unchanged (normaliser 2 instead of 3)
    assert metrics["dropped"] == pytest.approx(1 / 3) and metrics["clip_high"] == pytest.approx(1 / 3)


def test_drop_threshold_is_configurable():
    logp, old, adv, mask = hand_tokens()
    loose = LossOptions(drop_negative_high_ratio=True, drop_ratio_threshold=3.0, kl="none")
    _, metrics = policy_loss(logp, old, adv, mask, loose)
    assert metrics["dropped"] == 0.0  # r = 2 < 3: kept


def test_minimax_kl_gradient_matches_formula_by_autograd():
    logp, _, ref, _, mask = random_batch(seed=3)
    term = kl_minimax(logp, ref)
    assert torch.allclose(term, (logp.exp() - ref.exp()) * logp)  # value: SG(π − π_ref)·log π
    (g,) = torch.autograd.grad(term.sum(), logp)
    assert torch.allclose(g, logp.detach().exp() - ref.exp())  # d/dlogp = π_θ − π_ref
    # inside the loss: with zero advantages only the KL term is left, β (π − π_ref) / (tokens of the row) / B
    opts = LossOptions(kl="minimax", beta=0.5, drop_negative_high_ratio=False)
    loss, _ = policy_loss(logp, logp.detach(), torch.zeros(len(logp)), mask, opts, ref_logp=ref)
    expected = 0.5 * (logp.detach().exp() - ref.exp()) * mask / mask.sum(1, keepdim=True) / len(logp)
    assert torch.allclose(grad_of(loss, logp), expected, atol=1e-7)
    # and it differs from the k3 gradient: the reformulation changes the update
    assert not torch.allclose(torch.autograd.grad(kl_k3(logp, ref).sum(), logp)[0], g)


def test_balanced_advantages_equal_totals_on_skewed_groups():
    rewards = torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0,    # 1 of 8 right
                            1, 1, 1, 1, 1, 1, 1, 0,       # 7 of 8 right
                            0.9, 0.2, 0.4, 0.4, 0.1, 0.3, 0.2, 0.5,  # continuous
                            1, 1, 1, 1, 1, 1, 1, 1])      # all right: no signal
    plain = group_advantages(rewards, 8, balanced=False).view(4, 8)
    adv = group_advantages(rewards, 8, balanced=True).view(4, 8)
    for g in range(3):
        pos, neg = adv[g][adv[g] > 0].sum(), -adv[g][adv[g] < 0].sum()
        assert pos.item() == pytest.approx(4.0) and neg.item() == pytest.approx(4.0)  # n/2 each side
        assert torch.equal(torch.sign(adv[g]), torch.sign(plain[g]))  # signs kept
    assert (adv[3] == 0).all()
    # within a side, proportions of the normalised advantages are kept
    g = 2
    pos = plain[g] > 0
    assert torch.allclose(adv[g][pos] / adv[g][pos].sum(), plain[g][pos] / plain[g][pos].sum())
    # unbalanced, the lone success of a skewed group outweighs a 7-of-8 group's lone failure in magnitude only by sign
    assert plain[0].abs().sum() == pytest.approx(plain[1].abs().sum())
    # symmetric binary group: ±1
    assert balanced_advantages(group_advantages(torch.tensor([1.0, 1, 0, 0]), 4), 4).tolist() == [1, 1, -1, -1]


def test_group_advantages_match_trl_formula():
    rewards = torch.tensor([1.0, 0, 0, 1, 0.5, 0.5, 0.5, 0.5])
    adv = group_advantages(rewards, 4)
    grouped = rewards.view(2, 4)
    expected = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)
    assert torch.allclose(adv, expected.view(-1))
    assert (adv[4:] == 0).all()


def test_zero_variance_groups_with_tolerance():
    rewards = torch.tensor([1.0, 1.0, 0.3, 0.3001, 0.0, 1.0])  # a reward model's near-ties count as equal
    assert zero_variance_groups(rewards, 2, tol=1e-3).tolist() == [True, True, False]
    assert zero_variance_groups(rewards, 2, tol=0.0).tolist() == [True, False, False]
    assert zero_variance_groups(rewards, 2, tol=2.0).tolist() == [True, True, True]


def test_aggregation_modes():
    per_token = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 0, 0, 0]])
    assert aggregate(per_token, mask, "sequence_mean").item() == pytest.approx((1 + 4) / 2)
    assert aggregate(per_token, mask, "token_mean").item() == pytest.approx(8 / 5)


def test_importance_weight_scales_the_policy_term():
    logp, old, _, adv, mask = random_batch(seed=4)
    opts = LossOptions(kl="none", drop_negative_high_ratio=False)
    w = torch.full_like(logp, 0.5)
    plain, _ = policy_loss(logp, old, adv, mask, opts)
    weighted, _ = policy_loss(logp, old, adv, mask, opts, is_weight=w)
    assert weighted.item() == pytest.approx(0.5 * plain.item())


def test_bad_options_fail_with_the_key():
    with pytest.raises(ValueError, match="drop_ratio_threshold"):
        LossOptions(drop_ratio_threshold=0.5)
    with pytest.raises(ValueError, match="unknown loss"):
        policy_loss(*random_batch()[:2], torch.zeros(6), torch.ones(6, 7), LossOptions(name="nope"))
    with pytest.raises(ValueError, match="needs ref_logp"):
        logp, old, _, adv, mask = random_batch()
        policy_loss(logp, old, adv, mask, LossOptions(kl="minimax", beta=0.1))


def test_cispo_by_default_is_m1s_objective():
    """`name: cispo` alone gives M1 §3's J: the IS weight capped above only, one mean over all tokens (1/Σ|o_i|);
    the grpo defaults (lower bound 0.2, per-completion means) would give another number on the same tokens."""
    logp = torch.log(torch.tensor([[0.1, 0.5, 0.6, 0.2], [0.3, 0.9, 0.5, 0.5]])).requires_grad_()
    old = torch.log(torch.tensor([[0.4, 0.2, 0.5, 0.5], [0.2, 0.3, 0.5, 0.5]]))  # ratios 0.25, 2.5, 1.2 | 1.5, 3
    adv = torch.tensor([1.0, -0.5])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])  # lengths 3 and 2
    opts = LossOptions(name="cispo", kl="none")
    assert (opts.epsilon_low, opts.aggregation) == (None, "token_mean")
    loss, _ = policy_loss(logp, old, adv, mask, opts)
    w = torch.exp(logp.detach() - old).clamp(max=1.2)  # r = 0.25 keeps its weight: no lower bound
    j = (w * adv[:, None] * logp * mask).sum() / mask.sum()
    assert torch.allclose(loss, -j, atol=1e-7)
    grpo_style, _ = policy_loss(logp, old, adv, mask, LossOptions(name="cispo", kl="none", epsilon_low=0.2,
                                                                  aggregation="sequence_mean"))
    assert abs(grpo_style.item() - loss.item()) > 0.05
    assert (LossOptions().epsilon_low, LossOptions().aggregation) == (0.2, "sequence_mean")  # grpo unchanged
