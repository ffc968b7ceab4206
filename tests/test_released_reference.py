"""The one loader computes the released MiniMax-Text-01 network: tiny random checkpoints written directly in the
released layout (two safetensors shards + index, remote-code config.json; no transformers involved), loaded with
`load_model` in float32, against the float64 forward in `tests/released_reference.py` (written from the released
modeling code). Sequences run past the 256-token lightning block, so the blockwise kernel carries state across."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignment.modeling import load_model
from fixtures.make_released_tiny import Shape, write_checkpoint  # tests/ is on sys.path (rootdir-less import)
from released_reference import layer_slopes, reference_logits

TOL = 1e-4  # max |Δ log p|, float32 model vs float64 reference

# Residual factors (Shape.factors order): the lightning pair is the releases' (3.5566, 1.0); the other two differ
# from it and from each other, so a factor read for the wrong layer kind (or not at all) shows.
FACTORS = {"linear_attention": (3.5566, 1.0), "full_attention": (2.25, 0.8), "mlp": (1.75, 1.2)}

SHAPES = {
    # softmax layer 2 only; the last layer is lightning
    "a": Shape(kinds=(0, 0, 1, 0), hidden=64, heads=4, kv_heads=2, head_dim=16, rotary_dim=8, experts=4, ffn=96,
               vocab=96, rope_theta=10000.0, factors=tuple(FACTORS.values())),
    # heads * head_dim (256) != hidden_size (128), as in the releases (64 * 128 vs 6144); the released rope_theta
    "b": Shape(kinds=(0, 1, 0, 0, 0, 1), hidden=128, heads=8, kv_heads=4, head_dim=32, rotary_dim=16, experts=8,
               ffn=64, vocab=128, rope_theta=10000000.0, factors=tuple(FACTORS.values())),
    # a head count that is not a power of two: the released slopes take ALiBi's workaround
    "six_heads": Shape(kinds=(0, 1, 0), hidden=96, heads=6, kv_heads=3, head_dim=16, rotary_dim=8, experts=4, ffn=64,
                       vocab=96, rope_theta=10000.0, factors=tuple(FACTORS.values())),
}
LENGTHS = {"a": (40, 300), "b": (300, 77), "six_heads": (300,)}


def write_random_checkpoint(path: Path, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """A float32 random checkpoint of SHAPES[name] in the released layout (tests/fixtures/make_released_tiny: two
    shards + index, remote-code config.json), and its config and tensors as read back from the files. Matrices
    with std 1/sqrt(fan_in): attention and experts move log p by whole nats (the last test) while float32 stays
    within ~3e-6 of float64; at std 0.2 the tiny network is so sensitive that float32 rounding alone moves log p by
    1.3e-3 (config b)."""
    write_checkpoint(path, SHAPES[name], seed=list(SHAPES).index(name), std=1.0, dtype=torch.float32, fan_in=True)
    tensors = {n: t for file in sorted(path.glob("*.safetensors")) for n, t in load_file(file).items()}
    return json.loads((path / "config.json").read_text()), tensors


def transformers_names(weights: dict) -> dict[str, torch.Tensor]:
    """The released tensors as transformers' MiniMax holds them: the router as `mlp.gate`, each layer's experts fused
    into `mlp.experts.gate_up_proj` (E, 2 ffn, hidden) = [w1; w3] and `mlp.experts.down_proj` (E, hidden, ffn) = w2."""
    out, experts = {}, {}
    for name, t in weights.items():
        m = re.fullmatch(r"(model\.layers\.\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight", name)
        if m:
            experts.setdefault(m[1], {})[int(m[2]), m[3]] = t
        else:
            out[name.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = t
    for layer, ws in experts.items():
        E = 1 + max(e for e, _ in ws)
        out[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([ws[e, "w1"], ws[e, "w3"]])
                                                               for e in range(E)])
        out[f"{layer}.mlp.experts.down_proj"] = torch.stack([ws[e, "w2"] for e in range(E)])
    return out


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """name -> (config dict, released weights, loaded model), built on first use."""
    cache = {}

    def get(name):
        if name not in cache:
            path = tmp_path_factory.mktemp(f"released_{name}")
            config, weights = write_random_checkpoint(path, name)
            cache[name] = config, weights, load_model(path, tokenizer=None).eval()
        return cache[name]

    return get


def max_logp_gap(model, weights, config, lengths, seed=0) -> float:
    g = torch.Generator().manual_seed(seed)
    gap = 0.0
    for T in lengths:
        ids = torch.randint(0, config["vocab_size"], (T,), generator=g)
        with torch.no_grad():
            ours = model(input_ids=ids[None]).logits[0].double().log_softmax(-1)
        ref = reference_logits(weights, config, ids).log_softmax(-1)
        gap = max(gap, (ours - ref).abs().max().item())
    return gap


def test_every_released_tensor_is_loaded(released):
    """The model's parameters are exactly the files' tensors under transformers' names: none left at random init,
    none in the files unused."""
    for name in ("a", "b"):
        _, weights, model = released(name)
        expected = transformers_names(weights)
        params = dict(model.named_parameters())
        assert set(params) == set(expected)
        assert all(torch.equal(params[n].detach(), t) for n, t in expected.items())


@pytest.mark.parametrize("name", [
    "a", "b",
    "six_heads",  # ALiBi's slopes for a head count that is not a power of two (transformers' formula differs)
])
def test_load_model_computes_the_released_network(released, name):
    """log-softmax of `load_model`'s float32 logits within TOL of the float64 reference's, on sequences of which one
    crosses a lightning block."""
    config, weights, model = released(name)
    assert max(LENGTHS[name]) > model.config.block_size
    gap = max_logp_gap(model, weights, config, LENGTHS[name])
    assert gap < TOL, f"max |Δ log p| = {gap:.3g}"


def test_lightning_layers_decay_at_the_released_rates(released):
    """Each lightning layer's decay rates, as its forward and its decode step use them, against the released formula
    (transformers' `get_slope_rate` has `1 - i / (L - 1 + 1e-5) + 1e-5`: the last layer 4/3 as fast here)."""
    config, _, model = released("a")
    H, L = config["num_attention_heads"], config["num_hidden_layers"]
    for i, kind in enumerate(config["attn_type_list"]):
        if kind == 0:
            layer = model.model.layers[i].self_attn
            torch.testing.assert_close(layer.slope_fp32("cpu").double(), layer_slopes(H, i, L), rtol=1e-6, atol=0,
                                       msg=f"layer {i}")
            torch.testing.assert_close(layer.slope_rate.flatten().double(), layer_slopes(H, i, L), rtol=1e-6, atol=0,
                                       msg=f"layer {i} decode buffer")


@pytest.mark.parametrize("change", [
    pytest.param({"rotary_dim": 16}, id="rope_on_the_whole_head"),
    pytest.param({f"layernorm_{k}_{ab}": 1.0 for k in FACTORS for ab in ("alpha", "beta")}, id="no_residual_factors"),
    pytest.param({"layernorm_full_attention_alpha": 3.5566, "layernorm_full_attention_beta": 1.0},
                 id="full_attention_read_as_lightning_factors"),
])
def test_the_reference_tells_a_different_network_apart(released, change):
    """The comparison above would catch each of these: the reference on a changed config is far from the model."""
    config, weights, model = released("a")
    assert max_logp_gap(model, weights, {**config, **change}, (40,)) > 1e-2
