"""Released MiniMax-Text-01 / M1 checkpoints (remote-code layout) through the one loader: the config's layer kinds,
residual factors and partial RoPE become the network transformers' MiniMax computes, weights load under their
released names, and partial RoPE keeps packing, cached decoding and the save round trip exact."""

import json
import math

import pytest
import torch
from transformers import MiniMaxConfig, MiniMaxForCausalLM

from alignment.config import ConfigError
from alignment.modeling import PartialRotaryEmbedding, apply_rotary, load_model

LAYER_KINDS = [0, 0, 1, 0]  # not the alternating default: layer 2 is the only softmax layer
ALPHA, BETA = 3.5566, 1.0  # the releases' residual factors


def tiny_config(**extra) -> MiniMaxConfig:
    return MiniMaxConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                         num_experts_per_tok=2, max_position_embeddings=512, block_size=256,
                         layer_types=["full_attention" if k else "linear_attention" for k in LAYER_KINDS],
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
                         linear_attn_alpha_factor=ALPHA, linear_attn_beta_factor=BETA, full_attn_alpha_factor=ALPHA,
                         full_attn_beta_factor=BETA, mlp_alpha_factor=ALPHA, mlp_beta_factor=BETA,
                         initializer_range=0.2, **extra)  # weights large enough that attention moves the logits


def released_json(config: MiniMaxConfig, rotary_dim: int) -> dict:
    """config.json as the released checkpoints write it (remote code)."""
    return {"architectures": ["MiniMaxText01ForCausalLM"], "model_type": "minimax_text_01",
            "auto_map": {"AutoModelForCausalLM": "modeling_minimax_text_01.MiniMaxText01ForCausalLM"},
            "attn_type_list": LAYER_KINDS, "postnorm": True, "rotary_dim": rotary_dim, "rope_theta": 10000.0,
            "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads, "head_dim": config.head_dim,
            "num_local_experts": config.num_local_experts, "num_experts_per_tok": config.num_experts_per_tok,
            "vocab_size": config.vocab_size, "max_position_embeddings": config.max_position_embeddings,
            "rms_norm_eps": config.rms_norm_eps, "tie_word_embeddings": False, "hidden_act": "silu",
            "shared_intermediate_size": 0, "torch_dtype": "float32",
            **{f"layernorm_{kind}_{ab}": value for kind in ("linear_attention", "full_attention", "mlp")
               for ab, value in (("alpha", ALPHA), ("beta", BETA))}}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One random tiny model saved twice: transformers' layout and the released one (same weight files)."""
    torch.manual_seed(0)
    stock = MiniMaxForCausalLM(tiny_config()).eval()
    dirs = {}
    for name, rotary in (("hf", None), ("released_full", 16), ("released_half", 8)):
        path = tmp_path_factory.mktemp(name)
        stock.save_pretrained(path)
        if rotary is not None:
            (path / "config.json").write_text(json.dumps(released_json(stock.config, rotary)))
        dirs[name] = path
    return stock, dirs


def test_saved_weights_use_the_released_names(checkpoints):
    from safetensors import safe_open

    _, dirs = checkpoints
    with safe_open(dirs["released_half"] / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in names
    assert "model.layers.0.block_sparse_moe.gate.weight" in names
    assert {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.2.self_attn.q_proj.weight"} <= names


def test_released_layout_loads_as_the_network_it_describes(checkpoints):
    """attn_type_list, the residual factors and every weight are taken; with rotary_dim = head_dim the logits are
    stock transformers' on the same weights."""
    stock, dirs = checkpoints
    model = load_model(dirs["released_full"], tokenizer=None).eval()
    assert model.config.layer_types == stock.config.layer_types
    assert [model.config.linear_attn_alpha_factor, model.config.mlp_beta_factor] == [ALPHA, BETA]
    theirs = stock.state_dict()
    assert all(torch.equal(value, theirs[name]) for name, value in model.state_dict().items() if name in theirs)
    assert set(theirs) <= set(model.state_dict())
    ids = torch.randint(0, 96, (2, 40))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, stock(input_ids=ids).logits, atol=1e-5)


def reference_rotary(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, base: float) -> torch.Tensor:
    """float64 RoPE as the released code applies it: NeoX halves within the first `rotary_dim` dims, rest kept."""
    x = x.double().clone()
    half = rotary_dim // 2
    for i in range(half):
        theta = positions.double() * base ** (-2 * i / rotary_dim)  # (T,)
        a, b = x[..., i].clone(), x[..., i + half].clone()
        x[..., i] = a * torch.cos(theta) - b * torch.sin(theta)
        x[..., i + half] = b * torch.cos(theta) + a * torch.sin(theta)
    return x


def test_partial_rotary_matches_the_float64_formula():
    config = tiny_config()
    config.rotary_dim = 8
    rotary = PartialRotaryEmbedding(config)
    q, k = torch.randn(2, 4, 30, 16), torch.randn(2, 2, 30, 16)
    positions = torch.arange(30).expand(2, -1)
    cos, sin = rotary(q, positions)
    assert cos.shape[-1] == 8
    q_rot, k_rot = apply_rotary(q, k, cos, sin)
    assert torch.allclose(q_rot.double(), reference_rotary(q, torch.arange(30), 8, 10000.0), atol=1e-5)
    assert torch.allclose(k_rot.double(), reference_rotary(k, torch.arange(30), 8, 10000.0), atol=1e-5)
    assert torch.equal(q_rot[..., 8:], q[..., 8:])


@pytest.fixture(scope="module")
def half_rotary(checkpoints):
    return load_model(checkpoints[1]["released_half"], tokenizer=None).eval()


def test_partial_rotary_changes_only_the_softmax_layers_rope(checkpoints, half_rotary):
    full = load_model(checkpoints[1]["released_full"], tokenizer=None).eval()
    assert half_rotary.config.rotary_dim == 8 and isinstance(half_rotary.model.rotary_emb, PartialRotaryEmbedding)
    ids = torch.randint(0, 96, (1, 40))
    with torch.no_grad():
        a, b = half_rotary(input_ids=ids).logits, full(input_ids=ids).logits
    assert torch.allclose(a[:, 0], b[:, 0], atol=1e-5)  # position 0: no rotation either way
    assert (a - b).abs().max() > 1e-2  # a different network after position 0


def test_partial_rotary_keeps_packing_and_cached_decoding_exact(half_rotary):
    torch.manual_seed(1)
    docs = [torch.randint(0, 96, (n,)) for n in (11, 23, 7)]
    packed = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        logits = half_rotary(input_ids=packed, position_ids=positions).logits[0]
        alone = torch.cat([half_rotary(input_ids=d[None]).logits[0] for d in docs])
        assert (logits - alone).abs().max() < 1e-4
        prompt = docs[1][None, :12]
        out = half_rotary.generate(prompt, max_new_tokens=8, do_sample=False, output_router_logits=False,
                                   pad_token_id=0)
        teacher = half_rotary(input_ids=out[:, :-1]).logits.argmax(-1)[:, 11:]
    assert torch.equal(out[:, 12:], teacher)  # each cached step picks what the full forward picks


def test_a_stage_checkpoint_keeps_the_network(tmp_path, half_rotary):
    """final/ writes rotary_dim and postnorm (vLLM reads both) and loads back to the same logits."""
    half_rotary.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "minimax" and saved["rotary_dim"] == 8 and saved["postnorm"] is True
    again = load_model(tmp_path, tokenizer=None).eval()
    ids = torch.randint(0, 96, (1, 33))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, half_rotary(input_ids=ids).logits)


@pytest.mark.parametrize("change, match", [
    ({"sliding_windoww": 4}, r"field\(s\) sliding_windoww of the released config are not understood"),
    ({"postnorm": False}, r"'postnorm' is False: only the released post-norm decoder"),
    ({"attn_type_list": [0, 1]}, r"'attn_type_list' has 2 entries for num_hidden_layers 4"),
    ({"attn_type_list": [0, 2, 1, 0]}, r"'attn_type_list' must be a list of 0 \(lightning\) / 1 \(softmax\)"),
    ({"layer_types": ["full_attention"] * 4}, r"'layer_types' contradicts 'attn_type_list'"),
    ({"rotary_dim": 7}, r"'rotary_dim' = 7 must be an even number of dims within head_dim 16"),
    ({"shared_intermediate_size": 32}, r"shared experts are not supported"),
])
def test_released_fields_that_cannot_be_honoured_fail_by_name(checkpoints, tmp_path, change, match):
    stock, _ = checkpoints
    (tmp_path / "config.json").write_text(json.dumps({**released_json(stock.config, 8), **change}))
    with pytest.raises(ConfigError, match=match):
        load_model(tmp_path, tokenizer=None)


def test_rotary_frequencies_span_rotary_dim():
    config = tiny_config()
    config.rotary_dim = 8
    inv_freq, _ = PartialRotaryEmbedding.compute_default_rope_parameters(config)
    assert inv_freq.tolist() == pytest.approx([10000.0 ** (-2 * i / 8) for i in range(4)])
    assert not math.isclose(inv_freq[1], 10000.0 ** (-2 / 16))  # not the whole-head ladder


def test_reward_model_from_the_released_layout_is_the_same_network(checkpoints):
    """head="score" reads the released config too (layer kinds, partial RoPE): its body computes the causal LM's."""
    path = checkpoints[1]["released_half"]
    lm = load_model(path, tokenizer=None).eval()
    rm = load_model(path, head="score", tokenizer=None).eval()
    assert rm.config.layer_types == lm.config.layer_types and isinstance(rm.model.rotary_emb, PartialRotaryEmbedding)
    ids = torch.randint(0, 96, (1, 25))
    with torch.no_grad():
        assert torch.equal(rm.model(input_ids=ids).last_hidden_state, lm.model(input_ids=ids).last_hidden_state)
