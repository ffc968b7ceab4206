"""Router replay ("R3"): record which experts every token is routed to, and run a forward under given routes.

Why: in a Mixture-of-Experts model a large share of the train/rollout log-prob mismatch is routing. The trainer
recomputes a completion's log-probs with a full-sequence forward, the rollout engine produced them with a prefill
and cached decode steps (other kernels, other reduction orders, bf16 noise); a token whose top-k gate scores are
close to a tie then goes to other experts in the two, and its hidden state, and every later position's through
attention, differ by far more than rounding. Replaying the rollout's routes in the trainer (verl, NeMo-RL, slime and
AReaL call it R3, "rollout routing replay") removes that part of the gap. MiniMax-01 / M1 do not describe it: it
targets the training/inference probability gap M1 §3 measures and narrows with an FP32 LM head (that fix is
`alignment.modeling.FP32LMHead`; this one is separate and off by default).

    with record_routes(model) as log:             # the experts every MoE layer used, per forward call
        model(input_ids=ids, attention_mask=mask)
    routes = log.routes(batch_size=ids.shape[0])  # (B, T, L, K) expert indices; L = MoE layers, K = top-k
    with replay_routes(model, routes) as own:     # every MoE layer uses `routes` instead of its own top-k
        out = model(input_ids=ids, attention_mask=mask)
    own.routes(ids.shape[0])                      # what the routers themselves chose meanwhile (route_mismatch)

What a replayed MoE layer computes: the router still computes its logits and softmax probabilities from the current
hidden state; the experts are the given indices, and their gate weights are the current probabilities at those
indices renormalised over the k (as transformers' `MiniMaxTopKRouter` renormalises its own top-k), so the gradient
reaches the router weight through the gate weights, as in R3. A position whose given routes are negative (-1:
padding, or a position the rollout engine never ran) routes by its own top-k. The router logits themselves are
left alone, so the load-balancing aux loss (transformers recomputes its top-k from the recorded logits) keeps
measuring the router's own preferences. Replaying a model's own recorded routes reproduces its forward bit for bit.

Positions: a forward over B rows of T tokens calls each router once with B * T rows, so `routes` must give exactly
the rows of the forwards run under it, in the same (B, T) layout (the trainer's: left-padded prompts, right-padded
completions, `layout_routes`; a packed row works the same way, routes being positional). A decode step calls each
router with B rows; `RouteLog.routes` concatenates a prefill and its decode steps along T.

Gradient checkpointing: the backward recomputes each checkpointed decoder layer after the replay context has
closed; the layer's recompute is given the routes its forward used through torch's `context_fn` (non-reentrant
checkpointing only; reentrant checkpointing is refused under replay).

Not here yet: the vLLM engine side (recording routes inside vLLM's fused MoE); `alignment.rollout.vllm_backend`
returns `routes=None`, and `rollout.router_replay` with `backend: vllm` is refused at config check.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext

import torch
from transformers.models.minimax import modeling_minimax as mm
from transformers.modeling_layers import GradientCheckpointingLayer


def moe_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's MoE routers (transformers' `MiniMaxTopKRouter`, one per decoder layer), in layer order; works
    through peft / DDP / DeepSpeed wrappers (`modules()` reaches inside them)."""
    return [m for m in model.modules() if isinstance(m, mm.MiniMaxTopKRouter)]


class RouteLog:
    """The expert indices one router call returned, per layer: `calls[l]` is a list of (rows, K) tensors."""

    def __init__(self, n_layers: int):
        self.calls: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]

    def routes(self, batch_size: int) -> torch.Tensor:
        """(B, T, L, K) int64: each layer's calls as (B, T_call, K) blocks concatenated along T (a prefill, then
        its decode steps); raises if a layer saw no call or the layers saw different numbers of positions."""
        per_layer = []
        for layer, calls in enumerate(self.calls):
            if not calls:
                raise ValueError(f"no router call was recorded for MoE layer {layer}")
            per_layer.append(torch.cat([c.reshape(batch_size, -1, c.shape[-1]) for c in calls], dim=1))
        if len({p.shape for p in per_layer}) > 1:
            raise ValueError(f"the MoE layers saw different numbers of positions: {[p.shape for p in per_layer]}")
        return torch.stack(per_layer, dim=2)


def _route_hook(router, args, output):
    """Forward hook on every router (installed once, `_install`): a no-op unless a `record_routes` or
    `replay_routes` context set the router's attributes."""
    given, own_log = router.__dict__.get("_route_replay") or (None, None)
    used_log = router.__dict__.get("_route_record")
    if given is None and used_log is None:
        return None
    logits, scores, own = output  # (N, E), (N, K) fp32, (N, K)
    if own_log is not None:
        own_log.append(own.detach())
    if given is not None:
        if given.shape != own.shape:
            raise ValueError(f"router replay: this router call routes {tuple(own.shape)} (rows, k) but the given "
                             f"routes hold {tuple(given.shape)}; replay_routes takes the (B, T, L, K) routes of exactly "
                             "the forward run under it")
        given = given.to(own.device)
        replay = (given >= 0).all(dim=-1, keepdim=True)  # (N, 1): rows with routes to replay
        idx = torch.where(replay, given, own)
        # gate weights: the current router's probabilities at the replayed experts, renormalised (the router's own
        # top-k normalisation), so the router gets its gradient; rows routed by themselves keep their own scores
        top = torch.softmax(logits.float(), dim=-1).gather(-1, idx)
        scores = torch.where(replay, top / top.sum(dim=-1, keepdim=True), scores).to(scores.dtype)
        own, output = idx, (logits, scores, idx)
    if used_log is not None:
        used_log.append(own.detach())
    return output


def _install(routers) -> None:
    for router in routers:
        if not getattr(router, "_route_hooked", False):
            router.register_forward_hook(_route_hook)
            router._route_hooked = True


@contextmanager
def _router_state(routers, name: str, values):
    """Set `name` on each router for the block, restoring what was there before (contexts nest)."""
    before = [r.__dict__.get(name) for r in routers]
    for r, v in zip(routers, values):
        r.__dict__[name] = v
    try:
        yield
    finally:
        for r, v in zip(routers, before):
            if v is None:
                r.__dict__.pop(name, None)
            else:
                r.__dict__[name] = v


@contextmanager
def record_routes(model: torch.nn.Module):
    """Record, for every router call under the block, the expert indices the experts were given (the router's own
    top-k, or the replayed routes inside `replay_routes`). Yields a `RouteLog`."""
    routers = moe_routers(model)
    _install(routers)
    log = RouteLog(len(routers))
    with _router_state(routers, "_route_record", log.calls):
        yield log


@contextmanager
def replay_routes(model: torch.nn.Module, routes: torch.Tensor, log_own: bool = True):
    """Run the forwards under the block with `routes` (B, T, L, K) as every MoE layer's experts (negative rows:
    the layer's own top-k), see the module docstring. Yields a `RouteLog` of the routers' own top-k choices
    (`log_own=False`: an empty one; a training forward has no use for them)."""
    routers = moe_routers(model)
    if routes.dim() != 4 or routes.shape[2] != len(routers):
        raise ValueError(f"replay_routes: routes must be (B, T, L, K) with L = {len(routers)} MoE layers, got "
                         f"{tuple(routes.shape)}")
    _install(routers)
    flat = routes.reshape(-1, *routes.shape[2:]).long()  # (B*T, L, K), a router call's row order
    own = RouteLog(len(routers))
    state = [(flat[:, i], own.calls[i] if log_own else None) for i in range(len(routers))]
    with _router_state(routers, "_route_replay", state), _checkpoints_replaying(model):
        yield own


@contextmanager
def _checkpoints_replaying(model: torch.nn.Module):
    """For the block, each checkpointing decoder layer hands its recompute (in the backward, after the block)
    the replay state its forward saw, through the checkpoint's `context_fn`."""
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.training
              and getattr(m, "gradient_checkpointing", False) and moe_routers(m)]
    saved = []
    for layer in layers:
        func = layer.__dict__.get("_gradient_checkpointing_func")
        if func is None:
            continue
        if getattr(func, "keywords", {}).get("use_reentrant", True) is not False or \
                "context_fn" in getattr(func, "keywords", {}):
            raise ValueError("router replay under gradient checkpointing needs non-reentrant checkpointing "
                             "(gradient_checkpointing_kwargs={'use_reentrant': False}, as load_model sets it)")
        saved.append((layer, func))
        layer._gradient_checkpointing_func = functools.partial(_checkpoint_with_routes, func, moe_routers(layer))
    try:
        yield
    finally:
        for layer, func in saved:
            layer._gradient_checkpointing_func = func


def _checkpoint_with_routes(checkpoint, routers, function, *args, **kwargs):
    # the layer's routes at forward time; its recompute replays them and logs nothing (the forward logged)
    state = [r.__dict__.get("_route_replay") for r in routers]
    recompute_state = [None if s is None else (s[0], None) for s in state]

    def context_fn():
        return nullcontext(), _router_state(routers, "_route_replay", recompute_state)

    return checkpoint(function, *args, context_fn=context_fn, **kwargs)


def layout_routes(routes: list[torch.Tensor], prompt_lengths: list[int], prompt_width: int,
                  completion_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-completion routes ([prompt + completion tokens, L, K] each, prompt first) in the trainer's batch layout:
    (B, P, L, K) prompt routes, left-padded like TRL's `prompt_ids`, and (B, C, L, K) completion routes,
    right-padded like `completion_ids`; -1 (route by the model's own top-k) at the padding.

    >>> r = torch.arange(3 * 1 * 2, dtype=torch.int16).view(3, 1, 2)   # 2 prompt tokens + 1 completion token
    >>> p, c = layout_routes([r], [2], prompt_width=3, completion_width=2)
    >>> p[0, :, 0].tolist(), c[0, :, 0].tolist()
    ([[-1, -1], [0, 1], [2, 3]], [[4, 5], [-1, -1]])
    """
    L, K = routes[0].shape[1:]
    prompt = torch.full((len(routes), prompt_width, L, K), -1, dtype=routes[0].dtype)
    completion = torch.full((len(routes), completion_width, L, K), -1, dtype=routes[0].dtype)
    for b, (r, n) in enumerate(zip(routes, prompt_lengths)):
        if n:
            prompt[b, prompt_width - n:] = r[:n]
        tail = r[n:n + completion_width]
        completion[b, :len(tail)] = tail
    return prompt, completion


def route_mismatch(given: torch.Tensor, own: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(differing, total) routing decisions: over the (token, layer) rows of `given` (B, T, L, K) that hold routes
    (>= 0), how many of its K experts are not among `own`'s top-k there (the order within the k does not matter).

    >>> given = torch.tensor([[[[0, 1]], [[2, 3]], [[-1, -1]]]])        # 3 tokens, 1 layer, k = 2
    >>> own = torch.tensor([[[[1, 0]], [[2, 0]], [[1, 2]]]])
    >>> [int(x) for x in route_mismatch(given, own)]                     # token 1's expert 3; token 2 not counted
    [1, 4]
    """
    rows = (given >= 0).all(dim=-1)  # (B, T, L)
    found = (given[..., :, None] == own.to(given.device)[..., None, :]).any(dim=-1)  # (B, T, L, K)
    return (~found & rows[..., None]).sum(), rows.sum() * given.shape[-1]
