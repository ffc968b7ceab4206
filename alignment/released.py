"""The released MiniMax-Text-01 / MiniMax-M1 checkpoint layout, read (`released_config`) and written (`export_released`).

The released checkpoints ship a `config.json` for MiniMax's remote code (`model_type` `minimax_text_01` or
`minimax_m1`): layer kinds as `attn_type_list` (0 lightning, 1 softmax), the DeepNorm-style residual factors as
`layernorm_{linear_attention,full_attention,mlp}_{alpha,beta}`, `postnorm: true`, RoPE on the first `rotary_dim` dims
of each head (64 of 128), no block-size key (the released code tiles lightning attention in blocks of 256). On disk the
tensors have the same names in both layouts: transformers' MiniMax converts the released per-expert
`block_sparse_moe.experts.E.w1/w2/w3` into its fused expert tensors when it loads and back when it saves. What differs
is config.json, and the lightning decay buffers older toolkit checkpoints carry (`DECAY_BUFFERS`; the released files
and vLLM's loader have none; transformers recomputes them on load).

So reading is a config translation (the loader, `alignment.modeling.load_model`, then builds transformers' network
with partial RoPE), and writing is: the tensors copied shard by shard (never the whole model in memory), the decay
buffers left out, and the released config.json written from the model's config. Round trip: released -> load -> save
-> export gives the released files' tensors bit for bit (tests/test_released.py).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

from transformers import MiniMaxConfig

from alignment.config import ConfigError

MODEL_TYPES = {  # released model_type -> (architecture, remote-code config module, config class)
    "minimax_text_01": ("MiniMaxText01ForCausalLM", "configuration_minimax_text_01", "MiniMaxText01Config"),
    "minimax_m1": ("MiniMaxM1ForCausalLM", "configuration_minimax_m1", "MiniMaxM1Config"),
}
RENAMES = {  # released residual-factor keys -> MiniMaxConfig fields
    "layernorm_linear_attention_alpha": "linear_attn_alpha_factor",
    "layernorm_linear_attention_beta": "linear_attn_beta_factor",
    "layernorm_full_attention_alpha": "full_attn_alpha_factor",
    "layernorm_full_attention_beta": "full_attn_beta_factor",
    "layernorm_mlp_alpha": "mlp_alpha_factor", "layernorm_mlp_beta": "mlp_beta_factor",
}
# released keys that describe the code, not the network (read here or by nothing that changes the result)
IGNORED = {"architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
           "postnorm", "attn_type_list", "rope_theta", "rotary_dim", "shared_intermediate_size", "shared_moe_mode"}
# MiniMaxConfig fields written to the released config.json under their own names
COPIED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "head_dim", "num_local_experts", "num_experts_per_tok", "vocab_size", "max_position_embeddings",
          "rms_norm_eps", "hidden_act", "tie_word_embeddings", "bos_token_id", "eos_token_id",
          "router_aux_loss_coef", "router_jitter_noise", "output_router_logits", "sliding_window",
          "attention_dropout", "initializer_range", "use_cache")
BLOCK_SIZE = 256  # the released code's lightning block (no config key)
# transformers' lightning layers register these as buffers; they are functions of the config, not weights
DECAY_BUFFERS = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")
# every tensor name of a released checkpoint
TENSOR_NAME = re.compile(
    r"(lm_head\.weight|model\.(embed_tokens|norm)\.weight|model\.layers\.\d+\.("
    r"(input|post_attention)_layernorm\.weight|"
    r"self_attn\.(qkv_proj|output_gate|norm|out_proj|q_proj|k_proj|v_proj|o_proj)\.weight|"
    r"block_sparse_moe\.(gate\.weight|experts\.\d+\.w[123]\.weight)))")


def head_dim(config) -> int:
    """Dims per attention head: `config.head_dim`, else hidden_size / heads (as transformers' MiniMax reads it)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rotary_dim(config) -> int:
    """How many leading dims of each head RoPE rotates: `config.rotary_dim` (the released MiniMax-Text-01 / M1: 64 of
    128), else the whole head (transformers' MiniMax)."""
    return getattr(config, "rotary_dim", None) or head_dim(config)


def released_config(data: dict, source: str) -> MiniMaxConfig:
    """A `MiniMaxConfig` for the network a released checkpoint's config.json describes: layer kinds from
    `attn_type_list`, the residual factors, `rotary_dim` (kept on the config: `alignment.modeling.apply_rotary`),
    block size 256. The released decoder is post-norm (`postnorm: true`), the only form transformers' MiniMax
    computes; a field this does not know, a pre-norm checkpoint, a shared expert or `layer_types` contradicting
    `attn_type_list` fails naming the field."""
    valid = {f.name for f in dataclasses.fields(MiniMaxConfig)}
    unknown = sorted(k for k in data if k not in valid and k not in RENAMES and k not in IGNORED)
    if unknown:
        raise ConfigError(f"{source}: field(s) {', '.join(unknown)} of the released config are not understood here "
                          "(a MiniMax-Text-01 / M1 variant this loader does not know)")
    if data.get("postnorm") is not True:
        raise ConfigError(f"{source}: 'postnorm' is {data.get('postnorm')!r}: only the released post-norm decoder "
                          "(postnorm: true) is supported")
    if data.get("shared_intermediate_size", 0) not in (0, None, [0] * len(data.get("attn_type_list", []))):
        raise ConfigError(f"{source}: 'shared_intermediate_size' = {data['shared_intermediate_size']!r}: shared experts "
                          "are not supported")
    kinds = data.get("attn_type_list")
    if not isinstance(kinds, list) or any(k not in (0, 1) for k in kinds):
        raise ConfigError(f"{source}: 'attn_type_list' must be a list of 0 (lightning) / 1 (softmax), got {kinds!r}")
    n_layers = data.get("num_hidden_layers", len(kinds))
    if len(kinds) != n_layers:
        raise ConfigError(f"{source}: 'attn_type_list' has {len(kinds)} entries for num_hidden_layers {n_layers}")
    layer_types = ["full_attention" if k else "linear_attention" for k in kinds]
    if data.get("layer_types") not in (None, layer_types):
        raise ConfigError(f"{source}: 'layer_types' contradicts 'attn_type_list'")
    fields = {k: v for k, v in data.items() if k in valid and k != "layer_types"}
    fields.update({RENAMES[k]: v for k, v in data.items() if k in RENAMES})
    fields.update(layer_types=layer_types, num_hidden_layers=n_layers, block_size=BLOCK_SIZE,
                  rope_parameters={"rope_type": "default", "rope_theta": float(data.get("rope_theta", 10000.0))})
    config = MiniMaxConfig(**fields)
    width = head_dim(config)
    dim = data.get("rotary_dim", width)
    if not (isinstance(dim, int) and 0 < dim <= width and dim % 2 == 0):
        raise ConfigError(f"{source}: 'rotary_dim' = {dim!r} must be an even number of dims within head_dim {width}")
    config.rotary_dim = dim
    return config


def checkpoint_config(path: Path) -> MiniMaxConfig | None:
    """The `MiniMaxConfig` of a checkpoint directory in either layout: transformers' (`model_type: minimax`) or the
    released one (`released_config`); None for another architecture."""
    try:
        data = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path / 'config.json'}: invalid JSON: {err}") from None
    if data.get("model_type") in MODEL_TYPES:
        return released_config(data, str(path / "config.json"))
    return MiniMaxConfig.from_pretrained(path) if data.get("model_type") == "minimax" else None


def released_json(config: MiniMaxConfig, model_type: str = "minimax_text_01") -> dict:
    """The released config.json for `config` (the inverse of `released_config`; `auto_map` is added by the export).

    >>> cfg = MiniMaxConfig(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"], head_dim=128,
    ...                     mlp_alpha_factor=3.5)
    >>> cfg.rotary_dim = 64
    >>> data = released_json(cfg)
    >>> data["attn_type_list"], data["rotary_dim"], data["layernorm_mlp_alpha"], data["postnorm"]
    ([0, 1], 64, 3.5, True)
    """
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"model type {model_type!r} is not a released MiniMax layout; known: {', '.join(MODEL_TYPES)}")
    rope = config.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"rope_parameters {rope}: the released code has plain RoPE only (no '{rope['rope_type']}' "
                          "scaling); export a checkpoint without RoPE scaling")
    data = {"architectures": [MODEL_TYPES[model_type][0]], "model_type": model_type,
            "attn_type_list": [1 if kind == "full_attention" else 0 for kind in config.layer_types],
            "postnorm": True, "rotary_dim": rotary_dim(config), "rope_theta": float(rope.get("rope_theta", 10000.0)),
            "shared_intermediate_size": 0}
    data.update({name: getattr(config, name) for name in COPIED})
    if config.pad_token_id is not None:  # the releases have none; a stage sets the tokenizer's
        data["pad_token_id"] = config.pad_token_id
    data["head_dim"] = head_dim(config)
    data.update({key: getattr(config, field) for key, field in RENAMES.items()})
    return data


# The remote-code config class the export writes when no released code directory is given: what AutoConfig (and
# so vLLM, with trust_remote_code) needs to read a model_type transformers does not know. Every field of config.json
# becomes an attribute, as in the released class.
CONFIG_MODULE = '''"""Config class for a MiniMax checkpoint in the released layout (written by the MiniMax post-training
toolkit's export). The network is described by the fields of config.json; see its `attn_type_list`, `rotary_dim`,
`postnorm` and `layernorm_*` entries."""

from transformers import PretrainedConfig


class {name}(PretrainedConfig):
    model_type = "{model_type}"
'''


def export_released(src: str | Path, out: str | Path, *, model_type: str | None = None, dtype: str | None = None,
                    code_from: str | Path | None = None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write the checkpoint directory `src` (a stage's `final/`, or any MiniMax checkpoint the loader reads) to `out`
    in the released layout, atomically: tensors copied shard by shard, all cast to `dtype` (default: the dtype in
    the source's config.json, so a stage checkpoint's FP32 LM head is rounded to the model's dtype, as the released
    files hold one), decay buffers left out, `model.safetensors.index.json`, the released config.json, the tokenizer
    and generation config copied. `code_from`: a released checkpoint directory whose remote code (`*.py`) and
    `auto_map` are copied, so `trust_remote_code` loaders run MiniMax's own modeling code; without it a config class
    of our own is written (enough for AutoConfig and vLLM, which has the network built in). `model_type`: default
    the source's (or `code_from`'s) released type, else minimax_text_01. Returns `out`."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from alignment.reporting import atomic_path

    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise ConfigError(f"export: '{src}' is not a checkpoint directory (no config.json)")
    if out.resolve() == src.resolve():
        raise ConfigError(f"export: the output directory '{out}' is the source itself")
    config = checkpoint_config(src)
    if config is None:
        raise ConfigError(f"{src / 'config.json'}: not a MiniMax checkpoint (model_type minimax, "
                          f"{', '.join(MODEL_TYPES)})")
    code = _released_code(Path(code_from)) if code_from is not None else None
    source = json.loads((src / "config.json").read_text())
    source_type = source.get("model_type")
    model_type = model_type or (code or {}).get("model_type") or \
        (source_type if source_type in MODEL_TYPES else "minimax_text_01")
    data = released_json(config, model_type)
    # one dtype for every tensor, as released: a stage checkpoint's FP32 LM head [M1 §3] is rounded to the model's
    dtype = dtype or source.get("dtype") or source.get("torch_dtype")
    cast = None if dtype is None else getattr(torch, dtype, None)
    if dtype is not None and not isinstance(cast, torch.dtype):
        raise ConfigError(f"export: dtype {dtype!r} is not a torch dtype (e.g. bfloat16, float32)")
    files = _weight_files(src)

    with atomic_path(out, directory=True) as tmp:
        shards, shard, size, total, stored = [], {}, 0, 0, None
        for file in files:
            with safe_open(str(file), "pt") as f:
                for name in f.keys():
                    if name.rsplit(".", 1)[-1] in DECAY_BUFFERS:
                        continue
                    if not TENSOR_NAME.fullmatch(name):
                        raise ConfigError(f"{file}: tensor '{name}' has no place in the released layout (an adapter "
                                          "or another architecture's checkpoint? export a merged MiniMax checkpoint)")
                    tensor = f.get_tensor(name)
                    stored = stored or tensor.dtype
                    tensor = tensor if cast is None else tensor.to(cast)
                    if shard and size + tensor.nbytes > max_shard_bytes:
                        shards.append(shard)
                        shard, size = {}, 0
                    shard[name] = tensor.contiguous()
                    size += tensor.nbytes
                    total += tensor.nbytes
        if shard:
            shards.append(shard)
        weight_map = {}
        for i, tensors in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
            tensors.clear()  # written: free the shard before the next one is read
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        data["torch_dtype"] = str(cast or stored).removeprefix("torch.")
        if code is not None:
            data["auto_map"] = code["auto_map"]
            for py in code["files"]:
                shutil.copy2(py, tmp / py.name)
        else:
            _, module, name = MODEL_TYPES[model_type]
            (tmp / f"{module}.py").write_text(CONFIG_MODULE.format(name=name, model_type=model_type))
            data["auto_map"] = {"AutoConfig": f"{module}.{name}"}
        (tmp / "config.json").write_text(json.dumps(data, indent=2) + "\n")
        for extra in sorted(src.iterdir()):  # tokenizer, generation config, chat template, stage metadata
            if extra.is_file() and extra.name != "config.json" and not extra.name.startswith("model") \
                    and not (tmp / extra.name).exists() and extra.suffix != ".py":
                shutil.copy2(extra, tmp / extra.name)
    return out


def _weight_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = json.loads(index.read_text())["weight_map"].values()
        except (json.JSONDecodeError, KeyError) as err:
            raise ConfigError(f"{index}: not a safetensors index ({err})") from None
        files = [src / name for name in dict.fromkeys(names)]
    else:
        files = sorted(src.glob("*.safetensors"))
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise ConfigError(f"export: '{src}' has no safetensors weights" + (f" (missing: {', '.join(missing)})"
                                                                          if missing else ""))
    return files


def _released_code(path: Path) -> dict:
    """The remote code of a released checkpoint directory: its `*.py` files, `auto_map` and `model_type`."""
    try:
        data = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"export --code-from: cannot read '{path / 'config.json'}' ({err})") from None
    files = sorted(path.glob("*.py"))
    if data.get("model_type") not in MODEL_TYPES or "auto_map" not in data or not files:
        raise ConfigError(f"export --code-from: '{path}' is not a released MiniMax checkpoint directory with its "
                          "remote code (needs model_type minimax_text_01 / minimax_m1, auto_map and *.py files)")
    return {"auto_map": data["auto_map"], "model_type": data["model_type"], "files": files}
