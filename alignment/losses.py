"""Policy-gradient losses for the online RL stage, as pure functions on tensors (no trainer, no model).

Stage V of the MiniMax-01 recipe is GRPO with three changes [01 §5.4.2]; MiniMax-M1 adds CISPO as its successor
objective [M1 §3]. Everything here takes per-token log-probabilities that a trainer computed and returns
`(loss, metrics)`; the trainer (`alignment.trainers.MiniMaxGRPOTrainer`) only gathers the tensors.

Notation, shapes: B completions, T completion tokens.
    logp      (B, T)  log π_θ(o_t | s_t) of the sampled tokens, with gradient
    old_logp  (B, T)  log π_old at rollout time (no gradient); equal to `logp.detach()` on the first update
    ref_logp  (B, T)  log π_ref (no gradient), only for the KL term
    adv       (B,) or (B, T) advantages
    mask      (B, T)  1 for completion tokens that count, 0 for padding
    is_weight (B, T)  optional rollout-engine importance weight π_train / π_rollout (no gradient)
    r = exp(logp − old_logp), the importance ratio; SG(·) is a stop-gradient (`.detach()`).

The three GRPO changes, each a switch in `LossOptions`:
1. `drop_negative_high_ratio`: a token with A < 0 and r > c (c = `drop_ratio_threshold`, default 1 + ε_high) is
   **removed from the loss** (masked), instead of contributing the unbounded −r·A of one-sided PPO clipping.
   Tokens with A > 0 are clipped as in PPO.
2. `kl: minimax`: the KL penalty is KL(θ) = E_t[SG(π_θ − π_ref) · log π_θ] on the sampled token (probabilities, not
   log-probabilities): its gradient is (π_θ − π_ref) ∇log π_θ, a low-variance push toward π_ref. `kl: k3` is TRL's
   (and DeepSeek's) estimator exp(ref − logp) − (ref − logp) − 1, for comparison.
3. Balanced advantages (`balanced_advantages`, applied where advantages are estimated): see that function.

Departures / choices where the papers give no number: ε_low = ε_high = 0.2, c = 1 + ε_high (the exact region where
PPO's one-sided clip stops bounding the term), β = 0.04 for the KL in the tiny config. CISPO's ε_low defaults to no
lower bound, as in M1.

Aggregation is separate from the per-token terms [M1 §3, "sample-level loss with token-level normalisation"]:
`sequence_mean` (mean over each completion's tokens, then over completions: TRL's `grpo`) or `token_mean` (sum over
all tokens / number of tokens: TRL's `bnpo`/`dapo`, and the normalisation M1 uses for CISPO).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

Metrics = dict[str, float]


@dataclass
class LossOptions:
    # Objective: `grpo` (PPO-clipped surrogate with the MiniMax-01 changes) or `cispo` (MiniMax-M1).
    name: Literal["grpo", "cispo"] = "grpo"
    # PPO clip range [1 − epsilon_low, 1 + epsilon_high]. For cispo: the bounds of the clipped IS weight; None for
    # epsilon_low means no lower bound. "default": 0.2 for grpo, None for cispo (M1 §3: "effectively no lower bound").
    epsilon_low: float | None | Literal["default"] = "default"
    epsilon_high: float = 0.2
    # Change 1: drop (mask) tokens with a negative advantage and a ratio above drop_ratio_threshold
    # (None: 1 + epsilon_high). Off gives standard one-sided PPO clipping.
    drop_negative_high_ratio: bool = True
    drop_ratio_threshold: float | None = None
    # Change 2: `minimax` = SG(π_θ − π_ref)·log π_θ; `k3` = TRL's estimator; `none` = no KL (then beta is unused).
    kl: Literal["minimax", "k3", "none"] = "minimax"
    beta: float = 0.0
    # `sequence_mean`: per-completion token mean, then mean over completions (TRL grpo).
    # `token_mean`: one mean over all tokens of the batch (M1's token-level normalisation, 1/Σ|o_i|).
    # "default": sequence_mean for grpo, token_mean for cispo.
    aggregation: Literal["default", "sequence_mean", "token_mean"] = "default"

    def __post_init__(self):
        # `cispo` means M1's objective unless a field says otherwise: no lower bound, token-level normalisation.
        # (Resolved here, so configs and manifests record the values used.)
        if self.epsilon_low == "default":
            self.epsilon_low = None if self.name == "cispo" else 0.2
        if self.aggregation == "default":
            self.aggregation = "token_mean" if self.name == "cispo" else "sequence_mean"
        if self.epsilon_high <= 0 or (self.epsilon_low is not None and not 0 <= self.epsilon_low < 1):
            raise ValueError(f"loss.epsilon_low must be in [0, 1) or null and loss.epsilon_high > 0, got "
                             f"{self.epsilon_low}, {self.epsilon_high}")
        if self.drop_ratio_threshold is not None and self.drop_ratio_threshold <= 1:
            raise ValueError(f"loss.drop_ratio_threshold must be > 1, got {self.drop_ratio_threshold}")
        if self.beta < 0:
            raise ValueError(f"loss.beta must be >= 0, got {self.beta}")

    @property
    def uses_kl(self) -> bool:
        """Whether the loss has a KL term, hence needs the reference log-probs: the one place that decides it (the
        trainer, the TRL settings and the stage all ask this).

        >>> LossOptions(kl="minimax", beta=0.04).uses_kl, LossOptions(kl="none", beta=0.04).uses_kl
        (True, False)
        >>> LossOptions(kl="k3", beta=0.0).uses_kl
        False
        """
        return self.kl != "none" and self.beta > 0


# ---------------------------------------------------------------------------------------------------------------
# Advantages


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", balanced: bool = False,
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO group-normalised advantages: A_i = (R_i − mean_g R) / (std_g R + eps) over each group of `group_size`
    consecutive completions of one prompt (`scale`: `group` std, `batch` std, or `none`). Same numbers as TRL's
    `GRPOTrainer` (unbiased std, eps 1e-4). `balanced=True` then applies `balanced_advantages`.

    >>> [round(a, 4) for a in group_advantages(torch.tensor([1., 0., 0., 0.]), 4, balanced=True).tolist()]
    [2.0, -0.6667, -0.6667, -0.6667]
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries, "
                         f"got shape {tuple(rewards.shape)}")
    grouped = rewards.view(-1, group_size)  # (G, n)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        adv = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        adv = centred / (rewards.std() + eps)
    elif scale == "none":
        adv = centred
    else:
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    adv = adv.reshape(-1)
    return balanced_advantages(adv, group_size) if balanced else adv


def balanced_advantages(adv: torch.Tensor, group_size: int) -> torch.Tensor:
    """Balanced advantage estimation [01 §5.4.2, change 3]: positive and negative examples of a group contribute
    equally, and every group has the same absolute magnitude.

    The paper gives no formula; this one: in each group with P = Σ_{A_i>0} A_i and N = Σ_{A_i<0} |A_i|, rescale

        A_i ← A_i · n / (2P)   if A_i > 0,        A_i ← A_i · n / (2N)   if A_i < 0        (n = group size)

    so that Σ positive = Σ |negative| = n/2 in every group that has both signs; a group with one sign only (all
    rewards equal: zero advantages) is left at zero. Why: with group std normalisation a skewed group (1 success in
    8) gives the lone success A ≈ +2.5 and each failure ≈ −0.35; the totals already match (the mean is removed), but
    the *magnitude* depends on the skew and on reward scale. Fixing each side's total to n/2 makes every informative
    group push equally hard whatever its skew or reward range ("regulating the absolute magnitude of rewards across
    groups"), while keeping the sign and the within-side proportions of group normalisation. A symmetric binary group
    (half right) gets ±1 each, the usual unit scale of normalised advantages.
    A (B, T) token-level advantage is not supported: balance is defined per completion.

    >>> [round(a, 4) for a in balanced_advantages(torch.tensor([3., -1., -1., -1.]), 4).tolist()]
    [2.0, -0.6667, -0.6667, -0.6667]
    """
    grouped = adv.view(-1, group_size)
    pos, neg = grouped.clamp(min=0), grouped.clamp(max=0)
    half = group_size / 2
    pos_total, neg_total = pos.sum(1, keepdim=True), -neg.sum(1, keepdim=True)
    both = (pos_total > 0) & (neg_total > 0)
    scale_pos = torch.where(both, half / pos_total.clamp(min=1e-12), torch.zeros_like(pos_total))
    scale_neg = torch.where(both, half / neg_total.clamp(min=1e-12), torch.zeros_like(neg_total))
    return (pos * scale_pos + neg * scale_neg).reshape(adv.shape)


def zero_variance_groups(rewards: torch.Tensor, group_size: int, tol: float = 1e-6) -> torch.Tensor:
    """(n_groups,) bool: groups whose rewards all lie within `tol` of each other (max − min <= tol). Their GRPO
    advantages are zero, so they carry no gradient and only dilute the batch: DAPO-style dynamic sampling drops them
    [M1 §5]. A tolerance (not exact equality) so that continuous rewards, e.g. a reward model's, are handled.

    >>> zero_variance_groups(torch.tensor([1., 1., 0., 1., .5, .5]), 2).tolist()
    [True, False, True]
    """
    grouped = rewards.view(-1, group_size)
    return (grouped.max(1).values - grouped.min(1).values) <= tol


# ---------------------------------------------------------------------------------------------------------------
# Per-token terms (B, T) -> (B, T); aggregation is separate.


def _as_token_adv(adv: torch.Tensor) -> torch.Tensor:
    return adv.unsqueeze(1) if adv.dim() == 1 else adv  # (B, 1) broadcasts over T


def grpo_per_token(logp, old_logp, adv, epsilon_low: float, epsilon_high: float,
                   drop_threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clipped surrogate per token, −min(r·A, clip(r, 1−ε_low, 1+ε_high)·A), with change 1 when
    `drop_threshold` = c is given: tokens with A < 0 and r > c get a keep-mask of 0 (removed from the loss and its
    normaliser), so neither their value nor their gradient reaches the update.

    Returns (per_token_loss, keep (B, T) float, flags) where flags hold the bool masks for logging.
    """
    adv = _as_token_adv(adv)
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    flags = {"clip_low": (ratio < 1 - epsilon_low) & (adv < 0), "clip_high": (ratio > 1 + epsilon_high) & (adv > 0)}
    keep = torch.ones_like(per_token)
    if drop_threshold is not None:
        flags["dropped"] = (ratio.detach() > drop_threshold) & (adv < 0)
        keep = keep * (~flags["dropped"]).to(per_token.dtype)
    return per_token, keep, flags


def cispo_per_token(logp, old_logp, adv, epsilon_low: float | None, epsilon_high: float):
    """CISPO [M1 §3]: −SG(clip(r, 1−ε_low, 1+ε_high)) · A · log π_θ. Unlike PPO no token loses its gradient; only the
    IS weight is capped. ε_low None = no lower bound."""
    adv = _as_token_adv(adv)
    ratio = torch.exp(logp - old_logp).detach()
    weight = torch.clamp(ratio, min=None if epsilon_low is None else 1 - epsilon_low, max=1 + epsilon_high)
    flags = {"clip_high": ratio > 1 + epsilon_high}
    if epsilon_low is not None:
        flags["clip_low"] = ratio < 1 - epsilon_low
    return -weight * adv * logp, flags


def kl_minimax(logp, ref_logp):
    """Change 2 [01 §5.4.2]: SG(π_θ − π_ref) · log π_θ per token. Its value is not a divergence (log it via `kl_k3`);
    its gradient, (π_θ − π_ref)·∇log π_θ, pulls the sampled token's probability toward π_ref's."""
    return (torch.exp(logp) - torch.exp(ref_logp)).detach() * logp


def kl_k3(logp, ref_logp):
    """TRL / DeepSeekMath KL estimator exp(ref − logp) − (ref − logp) − 1 (>= 0)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


KL_TERMS: dict[str, Callable] = {"minimax": kl_minimax, "k3": kl_k3}


# ---------------------------------------------------------------------------------------------------------------
# Aggregation


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """`sequence_mean`: mean over each row's masked tokens, then over rows (rows with no token count as 0, as in
    TRL). `token_mean`: Σ masked / Σ mask over the whole batch."""
    mask = mask.to(per_token.dtype)
    if mode == "sequence_mean":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if mode == "token_mean":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    raise ValueError(f"aggregation must be 'sequence_mean' or 'token_mean', got {mode!r}")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    mask = mask.to(torch.float32)
    return float((x.float() * mask).sum() / mask.sum().clamp(min=1.0))


# ---------------------------------------------------------------------------------------------------------------
# Whole losses: one signature, found by name.


def grpo_loss(logp, old_logp, adv, mask, opts: LossOptions, ref_logp=None, is_weight=None):
    """MiniMax-01 modified GRPO [01 §5.4.2]:

        L = agg_t[ keep_t · ℓ_t · w_t + β · KL_t ],    ℓ_t = −min(r_t A, clip(r_t, 1−ε_low, 1+ε_high) A)

    keep_t = 0 for dropped tokens (change 1), KL_t per `opts.kl` (change 2), w_t the optional rollout IS weight.
    Dropped tokens leave the normaliser too (they are masked, not zeroed). With `drop_negative_high_ratio=False`,
    β = 0 and `sequence_mean` this is TRL's `loss_type="grpo"` exactly (tests/test_losses.py checks it).
    """
    eps_low = 1.0 if opts.epsilon_low is None else opts.epsilon_low  # None: no lower clip (ratios are >= 0)
    threshold = None
    if opts.drop_negative_high_ratio:
        threshold = opts.drop_ratio_threshold or 1 + opts.epsilon_high
    per_token, keep, flags = grpo_per_token(logp, old_logp, adv, eps_low, opts.epsilon_high, threshold)
    return _finish(per_token, keep, flags, logp, mask, opts, ref_logp, is_weight)


def cispo_loss(logp, old_logp, adv, mask, opts: LossOptions, ref_logp=None, is_weight=None):
    """CISPO [M1 §3]: J = 1/Σ|o_i| Σ_i Σ_t SG(clip(r_it, 1−ε_low, 1+ε_high)) Â_it log π_θ(o_it); the loss is −J
    (with `aggregation: token_mean`, M1's normalisation). No token is dropped; a KL term is added only if β > 0."""
    per_token, flags = cispo_per_token(logp, old_logp, adv, opts.epsilon_low, opts.epsilon_high)
    return _finish(per_token, torch.ones_like(per_token), flags, logp, mask, opts, ref_logp, is_weight)


def _finish(per_token, keep, flags, logp, mask, opts: LossOptions, ref_logp, is_weight):
    mask = mask.to(per_token.dtype)
    if is_weight is not None:
        per_token = per_token * is_weight.detach()
    if opts.uses_kl:
        if ref_logp is None:
            raise ValueError(f"loss.beta = {opts.beta} with kl = {opts.kl} needs ref_logp")
        per_token = per_token + opts.beta * KL_TERMS[opts.kl](logp, ref_logp)
    effective = mask * keep
    loss = aggregate(per_token, effective, opts.aggregation)
    metrics = {name: _masked_mean(flag.expand_as(mask), mask) for name, flag in flags.items()}
    if ref_logp is not None:
        metrics["kl"] = _masked_mean(kl_k3(logp.detach(), ref_logp), mask)
    return loss, metrics


LOSSES: dict[str, Callable] = {"grpo": grpo_loss, "cispo": cispo_loss}


def policy_loss(logp, old_logp, adv, mask, opts: LossOptions, ref_logp=None, is_weight=None):
    """The loss named by `opts.name` (see LOSSES): returns (scalar loss, metrics of floats)."""
    if opts.name not in LOSSES:
        raise ValueError(f"unknown loss {opts.name!r}; known: {', '.join(LOSSES)}")
    return LOSSES[opts.name](logp, old_logp, adv, mask, opts, ref_logp=ref_logp, is_weight=is_weight)

