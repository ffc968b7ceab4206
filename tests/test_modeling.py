"""The model wrapper: packing safety, equivalence with stock transformers, options, save/load."""

import pytest
import torch
from transformers import AutoModelForCausalLM, MiniMaxForCausalLM

from alignment.config import ConfigError
from alignment.lightning import document_ids, lightning_attention, naive_lightning_attention
from alignment.modeling import LoraOptions, ModelOptions, load_model, stock_model_copy

TINY = "configs/tiny/model.yaml"


@pytest.fixture(scope="module")
def model():
    return load_model(TINY, seed=0).eval()


def random_packed_row(gen, n_docs, vocab, block_size):
    """3+ documents of random lengths (some longer than a lightning block) packed into one row."""
    lengths = [int(x) for x in torch.randint(5, 2 * block_size, (n_docs,), generator=gen)]
    docs = [torch.randint(3, vocab, (1, n), generator=gen) for n in lengths]
    ids = torch.cat(docs, dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    return docs, ids, position_ids


@pytest.mark.parametrize("seed, padded", [(0, False), (1, False), (2, False), (3, True), (4, True)])
def test_packed_documents_match_running_each_alone(model, seed, padded):
    """Packed row (documents of random lengths, random tokens) vs each document alone, float32. `padded` adds right
    padding and a 2D attention mask, which takes the masked path instead of per-document attention."""
    cfg = model.config
    assert {"linear_attention", "full_attention"} <= set(cfg.layer_types)
    gen = torch.Generator().manual_seed(seed)
    docs, ids, position_ids = random_packed_row(gen, 3 + seed, cfg.vocab_size, cfg.block_size)
    mask = None
    if padded:
        ids = torch.cat([ids, torch.zeros(1, 7, dtype=torch.long)], dim=1)
        position_ids = torch.cat([position_ids, torch.zeros(1, 7, dtype=torch.long)], dim=1)
        mask = (torch.arange(ids.shape[1]) < ids.shape[1] - 7).long()[None]
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=position_ids, attention_mask=mask).logits
        start = 0
        for doc in docs:
            alone = model(input_ids=doc).logits
            n = doc.shape[1]
            assert (packed[:, start : start + n] - alone).abs().max() < 1e-4
            start += n


def test_stock_transformers_leaks_across_packed_documents(model):
    """Why the wrapper exists: the same packed row through stock transformers does not match."""
    stock = stock_model_copy(model)
    gen = torch.Generator().manual_seed(0)
    docs, ids, position_ids = random_packed_row(gen, 3, model.config.vocab_size, model.config.block_size)
    with torch.no_grad():
        packed = stock(input_ids=ids, position_ids=position_ids, attention_mask=torch.ones_like(ids)).logits
        n0 = docs[0].shape[1]
        later = packed[:, n0 : n0 + docs[1].shape[1]]
        assert (later - stock(input_ids=docs[1]).logits).abs().max() > 1e-3


def test_unpacked_document_matches_stock_transformers(model):
    stock = stock_model_copy(model)
    ids = torch.randint(3, model.config.vocab_size, (2, 150), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        theirs = stock(input_ids=ids).logits
    assert (ours - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("block_size", [4, 7, 32, 256])
def test_blockwise_lightning_matches_quadratic_reference(block_size):
    gen = torch.Generator().manual_seed(0)
    B, H, T, D = 2, 3, 41, 8
    q, k, v = (torch.randn(B, H, T, D, generator=gen, dtype=torch.float64) for _ in range(3))
    slope = torch.rand(H, generator=gen, dtype=torch.float64)
    position_ids = torch.tensor([list(range(10)) + list(range(25)) + list(range(6)), list(range(41))])
    docs = document_ids(position_ids)
    assert docs[0].tolist() == [0] * 10 + [1] * 25 + [2] * 6 and docs[1].max() == 0
    out, state = lightning_attention(q, k, v, slope, docs, block_size)
    assert (out - naive_lightning_attention(q, k, v, slope, docs)).abs().max() < 1e-10
    # the final state holds only the last document: Σ_s λ^(T-1-s) k_sᵀ v_s over its tokens
    decay = torch.exp(-slope.reshape(1, H, 1) * torch.arange(5, -1, -1, dtype=torch.float64))[..., None]  # (1,H,6,1)
    expected = torch.matmul((k[0:1, :, -6:] * decay).transpose(-1, -2), v[0:1, :, -6:])
    assert (state[0:1] - expected).abs().max() < 1e-10


def test_prefill_state_matches_stock(model):
    """The recurrent state our prefill hands to the decode step is the one stock transformers builds."""
    stock = stock_model_copy(model)
    ids = torch.randint(3, model.config.vocab_size, (2, 90), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = model(input_ids=ids, use_cache=True).past_key_values
        theirs = stock(input_ids=ids, use_cache=True).past_key_values
    for layer, kind in enumerate(model.config.layer_types):
        if kind == "linear_attention":
            assert (ours.get_linear_cache(layer) - theirs.get_linear_cache(layer)).abs().max() < 1e-5


def test_cached_decoding_equals_full_forward(model):
    """Decode steps see the right positions. Stock transformers reads the cache length from layer 0 - a lightning
    layer holding no keys - so its decode steps restart RoPE at position 0 and drift from the full forward."""
    ids = torch.randint(3, model.config.vocab_size, (1, 60), generator=torch.Generator().manual_seed(6))
    stock = stock_model_copy(model)
    with torch.no_grad():
        gaps = []
        for m in (model, stock):
            full = m(input_ids=ids).logits
            cache = m(input_ids=ids[:, :-3], use_cache=True).past_key_values
            steps = [m(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1]
                     for t in range(57, 60)]
            gaps.append((torch.stack(steps, 1) - full[:, 57:]).abs().max())
        assert gaps[0] < 1e-5 and gaps[1] > 10 * gaps[0], gaps  # (random weights barely use position)
        # and generate() (greedy) agrees with a plain argmax loop over full forwards
        out = model.generate(ids[:, :20], max_new_tokens=8, do_sample=False, output_router_logits=False,
                             pad_token_id=0, eos_token_id=None)
        seq = ids[:, :20]
        for _ in range(8):
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


def test_save_load_with_plain_transformers(model, tmp_path):
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is MiniMaxForCausalLM
    ids = torch.randint(3, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() < 1e-5
    again = load_model(str(tmp_path)).eval()  # and our loader reads the same directory
    with torch.no_grad():
        assert (again(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() < 1e-5


def test_options_lora_targets_fp32_head_rope_aux(tmp_path):
    opts = ModelOptions(path=TINY, dtype="bfloat16", rope_theta=5e6, router_aux_loss_coef=0.02,
                        lora=LoraOptions(r=4, alpha=8))
    model = load_model(opts)
    cfg = model.config
    assert cfg.rope_parameters["rope_theta"] == 5e6
    assert cfg.router_aux_loss_coef == 0.02 and cfg.output_router_logits
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    for target in ("qkv_proj", "output_gate", "out_proj", "q_proj", "o_proj", "experts"):
        assert any(target in n for n in trainable), target
    assert not any("mlp.gate." in n for n in trainable)  # the router is never adapted
    ids = torch.randint(3, cfg.vocab_size, (1, 20))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.float32  # FP32 LM head in a bf16 model
    assert out.aux_loss is not None and out.aux_loss > 0
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n)


def test_bad_model_yaml_names_file_and_key(tmp_path):
    bad = tmp_path / "model.yaml"
    bad.write_text("hidden_size: 64\nnum_layerz: 2\n")
    with pytest.raises(ConfigError, match=r"model\.yaml.*num_layerz"):
        load_model(str(bad))
    with pytest.raises(ConfigError, match="neither a checkpoint directory"):
        load_model(str(tmp_path / "missing"))


def _grads(model, **inputs):
    model.zero_grad()
    out = model(**inputs)
    out.logits.float().square().mean().backward()  # a loss touching every position
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradients_match_stock_and_packed_gradients_match_documents_alone():
    """Training, not only inference: on one unpacked document the wrapper's parameter gradients equal stock
    transformers'; on a packed row, each document's loss gives the same gradients as that document run alone."""
    model = load_model(ModelOptions(path=TINY, router_aux_loss_coef=0.0), seed=0).train()
    stock = stock_model_copy(model).train()
    gen = torch.Generator().manual_seed(5)
    docs, ids, position_ids = random_packed_row(gen, 3, model.config.vocab_size, model.config.block_size)
    ours, ref = _grads(model, input_ids=docs[0]), _grads(stock, input_ids=docs[0])
    assert max(float((ours[n] - ref[n]).abs().max()) for n in ref) < 1e-5

    n0 = docs[0].shape[1]
    model.zero_grad()
    logits = model(input_ids=ids, position_ids=position_ids).logits
    logits[:, n0 : n0 + docs[1].shape[1]].float().square().mean().backward()  # the second document's loss only
    packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    alone = _grads(model, input_ids=docs[1])
    # MoE routing sees the same tokens either way; experts not chosen by any token of doc 1 get no gradient alone
    for n, g in alone.items():
        assert (packed[n] - g).abs().max() < 1e-5, n
