"""Released MiniMax-Text-01 / M1 checkpoints (remote-code layout) through the one loader: the config's layer kinds,
residual factors and partial RoPE become the network transformers' MiniMax computes, weights load under their
released names, and partial RoPE keeps packing, cached decoding and the save round trip exact."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import MiniMaxConfig, MiniMaxForCausalLM

from alignment.config import ConfigError
from alignment.lightning import lightning_slopes
from alignment.modeling import PartialRotaryEmbedding, apply_rotary, load_model
from alignment.released import DECAY_BUFFERS

DECAY_SUFFIXES = tuple(f".{name}" for name in DECAY_BUFFERS)  # recomputed from the config, not saved

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


def released_decay(stock):
    """Stock transformers' model with the released decay rates (its own per-layer factor makes the last lightning
    layer decay L / (L - 1) times as fast: `alignment.lightning.lightning_slopes`)."""
    for layer in stock.model.layers:
        attn = layer.self_attn
        if hasattr(attn, "slope_rate"):
            slope = lightning_slopes(attn.num_attention_heads, attn.layer_idx, attn.num_hidden_layers)[:, None, None]
            for name, value in zip(DECAY_BUFFERS, (slope, *attn.decay_factors(slope))):
                getattr(attn, name).copy_(value)
    return stock


def test_released_layout_loads_as_the_network_it_describes(checkpoints):
    """attn_type_list, the residual factors and every weight are taken; with rotary_dim = head_dim the logits are
    stock transformers' on the same weights (given the released decay rates)."""
    stock, dirs = checkpoints
    model = load_model(dirs["released_full"], tokenizer=None).eval()
    stock = released_decay(copy.deepcopy(stock))
    assert model.config.layer_types == stock.config.layer_types
    assert [model.config.linear_attn_alpha_factor, model.config.mlp_beta_factor] == [ALPHA, BETA]
    theirs = {name: value for name, value in stock.state_dict().items() if not name.endswith(DECAY_SUFFIXES)}
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


# -- the committed released-layout fixture (tests/fixtures/make_released_tiny.py): check, round trip, export --------

FIXTURE = Path(__file__).parent / "fixtures" / "released_tiny"


def file_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {name: t for file in sorted(directory.glob("*.safetensors")) for name, t in load_file(file).items()}


def test_the_fixture_is_a_sharded_released_checkpoint_the_loader_reads():
    index = json.loads((FIXTURE / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2 and set(index["weight_map"]) == set(file_tensors(FIXTURE))
    model = load_model(FIXTURE, tokenizer=None)
    assert model.config.layer_types == ["linear_attention", "linear_attention", "full_attention", "linear_attention"]
    assert model.config.rotary_dim == 8 and model.config.mlp_alpha_factor == 3.5566
    ours = {n: p for n, p in model.state_dict().items()}
    assert ours["model.layers.2.self_attn.q_proj.weight"].dtype == torch.float32  # upcast from the bf16 files
    assert torch.equal(ours["model.layers.2.self_attn.q_proj.weight"].bfloat16(),
                       file_tensors(FIXTURE)["model.layers.2.self_attn.q_proj.weight"])


def test_released_load_save_export_round_trips_bit_exactly(tmp_path):
    """released -> load (bf16, as released) -> save (a stage's final/) -> export -> the released files' tensors and
    network fields, bit for bit; the final/ has no decay buffers and reloads to the same logits."""
    from alignment.modeling import ModelOptions
    from alignment.released import export_released

    model = load_model(ModelOptions(path=str(FIXTURE), dtype="bfloat16"), tokenizer=None).eval()
    final = tmp_path / "final"
    model.save_pretrained(final)
    saved = file_tensors(final)
    assert not any(name.endswith(DECAY_SUFFIXES) for name in saved)  # weights only (vLLM's loader has no buffers)
    out = export_released(final, tmp_path / "released")
    original, exported = file_tensors(FIXTURE), file_tensors(out)
    assert set(exported) == set(original)
    assert all(torch.equal(exported[n], original[n]) and exported[n].dtype == original[n].dtype for n in original)
    theirs, ours = (json.loads((d / "config.json").read_text()) for d in (FIXTURE, out))
    skip = {"auto_map", "transformers_version", "shared_moe_mode"}  # code, not network
    assert {k: v for k, v in ours.items() if k not in skip} == {k: v for k, v in theirs.items() if k not in skip}
    assert ours["auto_map"] == {"AutoConfig": "configuration_minimax_text_01.MiniMaxText01Config"}
    ids = torch.randint(0, 514, (1, 50))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        for path in (final, out):
            again = load_model(ModelOptions(path=str(path), dtype="bfloat16"), tokenizer=None).eval()
            assert torch.equal(again(input_ids=ids).logits, reference), path
            fresh = again.model.layers[0].self_attn
            assert torch.equal(fresh.slope_rate, model.model.layers[0].self_attn.slope_rate)  # recomputed on load


def test_the_export_config_class_reads_back_through_autoconfig(tmp_path):
    """Without MiniMax's remote code the export ships a config class, so AutoConfig (and vLLM) can read it."""
    from transformers import AutoConfig

    from alignment.released import export_released

    out = export_released(FIXTURE, tmp_path / "out", dtype="float32")
    config = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert config.model_type == "minimax_text_01" and config.attn_type_list == [0, 0, 1, 0]
    assert config.rotary_dim == 8 and config.layernorm_full_attention_alpha == 3.5566
    assert all(t.dtype == torch.float32 for t in file_tensors(out).values())
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()


def test_export_cli_and_its_errors(tmp_path, capsys):
    from pipelines.stages import main

    assert main(["export", str(FIXTURE), str(tmp_path / "a"), "--shard-gb", "0.0002"]) == 0  # ~210 KB shards
    assert len(list((tmp_path / "a").glob("model-*.safetensors"))) >= 3
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "b")]) == 2
    assert "is not a checkpoint directory (no config.json)" in capsys.readouterr().err
    assert main(["export", str(FIXTURE), str(tmp_path / "c"), "--code-from", str(FIXTURE)]) == 2
    assert "not a released MiniMax checkpoint directory with its remote code" in capsys.readouterr().err
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "config.json").write_text((FIXTURE / "config.json").read_text())
    from safetensors.torch import save_file
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 2)}, str(adapter / "model.safetensors"))
    assert main(["export", str(adapter), str(tmp_path / "d")]) == 2
    assert "tensor 'base_model.model.lm_head.lora_A.weight' has no place in the released layout" in \
        capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "d").exists()  # nothing half-written


def test_export_ships_the_released_remote_code_when_given(tmp_path):
    from alignment.released import export_released

    code = tmp_path / "released_code"
    code.mkdir()
    (code / "config.json").write_text((FIXTURE / "config.json").read_text())
    (code / "modeling_minimax_text_01.py").write_text("# MiniMax's modeling code\n")
    (code / "configuration_minimax_text_01.py").write_text("# MiniMax's config code\n")
    out = export_released(FIXTURE, tmp_path / "out", code_from=code)
    assert json.loads((out / "config.json").read_text())["auto_map"] == \
        json.loads((FIXTURE / "config.json").read_text())["auto_map"]
    assert (out / "modeling_minimax_text_01.py").read_text() == "# MiniMax's modeling code\n"


def released_workdir(root: Path, checkpoint: Path) -> Path:
    """The layout configs/minimax_text_01 expects, in `root`: the released checkpoint at checkpoints/MiniMax-Text-01
    (and at checkpoints/reward_model, for configs that name one), the user's chat and preference files under data/."""
    (root / "checkpoints").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "configs").symlink_to(Path(__file__).parents[1] / "configs")
    for name in ("MiniMax-Text-01", "reward_model"):
        (root / "checkpoints" / name).symlink_to(checkpoint)
    row = {"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]}
    for name in ("sft_short.jsonl", "sft_long.jsonl"):
        (root / "data" / name).write_text(json.dumps(row) + "\n")
    pair = {"prompt": row["messages"][:1], "chosen": row["messages"][1:],
            "rejected": [{"role": "assistant", "content": "6"}]}
    (root / "data" / "preferences.jsonl").write_text(json.dumps(pair) + "\n")  # the rm stage's data
    return root


def test_the_minimax_text_01_pipeline_checks_against_a_released_checkpoint(tmp_path, monkeypatch, capsys):
    from pipelines.run import main

    monkeypatch.chdir(released_workdir(tmp_path / "ok", FIXTURE))
    assert main(["--config", "configs/minimax_text_01/pipeline.yaml", "--check"]) == 0
    assert "OK (sft, rm, long_sft, dpo, long_dpo, grpo)" in capsys.readouterr().out

    broken = tmp_path / "broken_checkpoint"
    broken.mkdir()
    for f in FIXTURE.iterdir():
        (broken / f.name).symlink_to(f.resolve())
    (broken / "config.json").unlink()
    (broken / "config.json").write_text(json.dumps({**json.loads((FIXTURE / "config.json").read_text()),
                                                    "postnorm": False}))
    monkeypatch.chdir(released_workdir(tmp_path / "bad", broken))
    assert main(["--config", "configs/minimax_text_01/pipeline.yaml", "--check"]) == 2
    err = capsys.readouterr().err
    assert "stages[0] (sft)" in err and "'postnorm' is False: only the released post-norm decoder" in err


def test_sft_on_the_released_checkpoint_masks_its_marker_less_template_and_hands_off(tmp_path):
    """Stage I on the released fixture with its own tokenizer (a chat template without generation markers): the
    loss covers exactly each reply and its end-of-turn token, the stage trains, and its final/ loads in plain
    transformers and back through the loader as the trained network."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from alignment.config import load_config
    from alignment.modeling import load_tokenizer
    from alignment.trainers import MiniMaxSFTTrainer
    from pipelines.sft import Config, _trl_args, run

    tokenizer = load_tokenizer(FIXTURE)
    assert "generation -%}" not in tokenizer.chat_template and "generation %}" not in tokenizer.chat_template
    yaml = tmp_path / "sft.yaml"
    yaml.write_text(f"""
output_dir: {tmp_path / "run"}
model: {{path: {FIXTURE}}}
data:
  builtin: {{arithmetic: {{n: 200}}}}
  max_length: 256
training: {{max_steps: 12, learning_rate: 3.0e-3, batch_size: 2, logging_steps: 2, save_steps: 12}}
eval:
  sets: {{arithmetic: {{n: 4}}}}
  max_new_tokens: 4
""")
    cfg = load_config(yaml, Config)
    convs = [[{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5"},
              {"role": "user", "content": "And 4 - 1?"}, {"role": "assistant", "content": "4 - 1 = 3"}]]
    trainer = MiniMaxSFTTrainer(model=load_model(FIXTURE, tokenizer=tokenizer), args=_trl_args(cfg, tmp_path / "c"),
                                train_dataset=Dataset.from_dict({"messages": convs}), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert tokenizer.decode(ids[labels != -100]) == "2 + 3 = 5<end_of_sentence>4 - 1 = 3<end_of_sentence>"

    metrics = run(cfg)
    assert metrics["train"]["loss/last"] < metrics["train"]["loss/first"]
    final = tmp_path / "run" / "final"
    saved = json.loads((final / "config.json").read_text())
    assert saved["rotary_dim"] == 8 and saved["postnorm"] is True and saved["mlp_alpha_factor"] == 3.5566
    plain = AutoModelForCausalLM.from_pretrained(final)  # loads; computes full-head RoPE (transformers has no other)
    assert plain.config.layer_types == load_model(FIXTURE, tokenizer=None).config.layer_types
    again = load_model(final, tokenizer=None).eval()
    weights = {n: p for n, p in plain.named_parameters()}
    assert all(torch.equal(p, weights[n]) for n, p in again.named_parameters())
    assert load_tokenizer(final).chat_template == tokenizer.chat_template
