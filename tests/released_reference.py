"""A float64 forward of the released MiniMax-Text-01 / MiniMax-M1 network, written from the released remote code
(`modeling_minimax_text_01.py`), for checking that our loader computes it. Plain torch on one unbatched sequence: it
uses neither transformers' MiniMax classes nor anything in `alignment/`, and takes the weights under their released
names with the released config.json as a dict.

What it follows in the released code:
- `MiniMaxText01DecoderLayer.forward` with `postnorm: true`: the residual is the *normed* input, scaled by
  `layernorm_{linear,full}_attention_alpha` (by layer kind) / `layernorm_mlp_alpha`, the branch by the `_beta`s.
- `MiniMaxText01RMSNorm`: eps `rms_norm_eps` for the input / post-attention / final norms; the lightning output norm
  is built without an eps, so it gets the class default 1e-6.
- `MiniMaxText01Model._build_slope_tensor` (ALiBi's `get_slopes`, with the workaround for a head count that is not a
  power of two) and the per-layer factor `1 - i / (num_layers - 1) + 1e-5` from `MiniMaxText01Model.forward`.
- `MiniMaxText01LightningAttention.inference`: `silu(qkv_proj(x))` split per head as [q | k | v]; the attention is
  written here as one decayed causal T x T matrix, sum_{s<=t} exp(-slope (t - s)) (q_t . k_s) v_s, not the
  released blockwise loop (independence from every blockwise kernel is the point); then norm, sigmoid output gate,
  out_proj.
- `MiniMaxText01Attention` + `apply_rotary_pos_emb`: RoPE on the first `rotary_dim` dims of each head only (NeoX
  halves within them, base `rope_theta`), the rest passed through; GQA by repeating K/V heads (`repeat_kv`); scale
  1/sqrt(head_dim); no biases.
- `MiniMaxText01SparseMoeBlock`: softmax router, top-k renormalised to sum 1, experts w2(silu(w1 x) * w3 x).
Left out, as the loader refuses them: a shared expert (`shared_intermediate_size` > 0) and the pre-norm decoder.
"""

import math

import torch
import torch.nn.functional as F


def get_slopes(n: int) -> list[float]:
    """The released per-head decay rates before the layer factor (ALiBi's slopes).

    >>> get_slopes(4)
    [0.25, 0.0625, 0.015625, 0.00390625]
    >>> get_slopes(6)  # 4 heads' ladder, then every other rung of 8 heads'
    [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]
    """
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**j for j in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + get_slopes(2 * closest)[0::2][: n - closest]


def layer_slopes(n_heads: int, layer: int, n_layers: int) -> torch.Tensor:
    """(H,) float64 decay rates of lightning layer `layer`."""
    return torch.tensor(get_slopes(n_heads), dtype=torch.float64) * (1 - layer / (n_layers - 1) + 1e-5)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def lightning_attention(w: dict, x: torch.Tensor, slopes: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    T = x.shape[0]
    qkv = F.silu(x @ w["qkv_proj.weight"].T).view(T, n_heads, 3 * head_dim)
    q, k, v = qkv.split(head_dim, dim=-1)  # (T, H, D) each: per head [q | k | v]
    pos = torch.arange(T, dtype=torch.float64)
    dist = pos[:, None] - pos[None, :]  # (T, T): t - s
    decay = torch.exp(-slopes[:, None, None] * dist.clamp(min=0)) * (dist >= 0)  # (H, T, T), causal
    scores = torch.einsum("thd,shd->hts", q, k) * decay
    out = torch.einsum("hts,shd->thd", scores, v).reshape(T, n_heads * head_dim)
    out = rms_norm(out, w["norm.weight"], 1e-6)
    out = torch.sigmoid(x @ w["output_gate.weight"].T) * out
    return out @ w["out_proj.weight"].T


def rotary(x: torch.Tensor, rotary_dim: int, base: float) -> torch.Tensor:
    """x (T, heads, D): NeoX RoPE on x[..., :rotary_dim] at positions 0..T-1; the remaining dims unchanged."""
    pos = torch.arange(x.shape[0], dtype=torch.float64)
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)  # (rotary_dim / 2,)
    angle = torch.cat([pos[:, None] * inv_freq] * 2, dim=-1)[:, None, :]  # (T, 1, rotary_dim)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = rot.chunk(2, dim=-1)
    rot = rot * angle.cos() + torch.cat([-x2, x1], dim=-1) * angle.sin()
    return torch.cat([rot, rest], dim=-1)


def softmax_attention(w: dict, x: torch.Tensor, n_heads: int, n_kv: int, head_dim: int, rotary_dim: int,
                      base: float) -> torch.Tensor:
    T = x.shape[0]
    q = rotary((x @ w["q_proj.weight"].T).view(T, n_heads, head_dim), rotary_dim, base)
    k = rotary((x @ w["k_proj.weight"].T).view(T, n_kv, head_dim), rotary_dim, base)
    v = (x @ w["v_proj.weight"].T).view(T, n_kv, head_dim)
    groups = n_heads // n_kv  # repeat_kv: query head h reads K/V head h // groups
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(head_dim)  # (H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    p = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    out = torch.einsum("hts,shd->thd", p, v).reshape(T, n_heads * head_dim)
    return out @ w["o_proj.weight"].T


def moe(w: dict, x: torch.Tensor, n_experts: int, top_k: int) -> torch.Tensor:
    p = (x @ w["gate.weight"].T).softmax(-1)  # (T, E)
    top_p, top_i = p.topk(top_k, dim=-1)
    top_p = top_p / top_p.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for e in range(n_experts):  # every expert on every token, weighted by its (possibly zero) routing weight
        weight = (top_p * (top_i == e)).sum(-1, keepdim=True)  # (T, 1)
        w1, w2, w3 = (w[f"experts.{e}.{n}.weight"] for n in ("w1", "w2", "w3"))
        out = out + weight * ((F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T)
    return out


def under(weights: dict, prefix: str) -> dict:
    """The tensors named `prefix...`, keyed by the rest of their names."""
    return {name[len(prefix):]: t for name, t in weights.items() if name.startswith(prefix)}


def reference_logits(weights: dict[str, torch.Tensor], config: dict, input_ids: torch.Tensor) -> torch.Tensor:
    """(T, vocab) float64 logits of the released network on one sequence `input_ids` (T,), positions 0..T-1."""
    W = {name: t.double() for name, t in weights.items()}
    n_layers, n_heads = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads", n_heads)
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    rotary_dim = config.get("rotary_dim", head_dim)
    base, eps = float(config.get("rope_theta", 10000.0)), config["rms_norm_eps"]

    def factor(name):  # the released layer reads each with getattr(config, ..., 1)
        return config.get(f"layernorm_{name}", 1)

    x = W["model.embed_tokens.weight"][input_ids]  # (T, hidden)
    for i, kind in enumerate(config["attn_type_list"]):
        layer = under(W, f"model.layers.{i}.")
        attn = under(layer, "self_attn.")
        h = rms_norm(x, layer["input_layernorm.weight"], eps)  # postnorm: the residual is h, not x
        if kind == 0:
            a = lightning_attention(attn, h, layer_slopes(n_heads, i, n_layers), n_heads, head_dim)
            alpha, beta = factor("linear_attention_alpha"), factor("linear_attention_beta")
        else:
            a = softmax_attention(attn, h, n_heads, n_kv, head_dim, rotary_dim, base)
            alpha, beta = factor("full_attention_alpha"), factor("full_attention_beta")
        x = h * alpha + a * beta
        h = rms_norm(x, layer["post_attention_layernorm.weight"], eps)
        m = moe(under(layer, "block_sparse_moe."), h, config["num_local_experts"], config["num_experts_per_tok"])
        x = h * factor("mlp_alpha") + m * factor("mlp_beta")
    x = rms_norm(x, W["model.norm.weight"], eps)
    head = W["model.embed_tokens.weight"] if config.get("tie_word_embeddings") else W["lm_head.weight"]
    return x @ head.T
