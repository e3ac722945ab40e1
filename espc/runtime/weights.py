"""Model weights: `random:<seed>` or a Hugging Face Llama checkpoint directory.

A checkpoint directory holds `config.json` and either `model.safetensors` or shards listed
in `model.safetensors.index.json` (what `save_pretrained` writes). The config is checked
against the spec before any tensor is read, so a spec that describes another model fails
with the field and both values instead of a shape error deep in the load. Tensors are read
one at a time into a module allocated without initialisation, so peak memory is the model
plus one tensor. With tensor parallelism a rank reads only its shard of each sharded tensor
(`espc.backend.tensor_parallel.param_shard`, a slice of the safetensors file), so it never
holds the whole checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from espc.backend.tensor_parallel import TPShard, param_shard, shard_model, tp_shard
from espc.frontend.spec import ModelSpec
from espc.model.llama import Llama, Rotary, build_model

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# The ModelSpec fields checked against config.json, each with the LlamaConfig key it comes from.
_CONFIG_KEYS = {
    "layers": "num_hidden_layers",
    "hidden": "hidden_size",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "ffn": "intermediate_size",
    "vocab": "vocab_size",
    "rope_theta": "rope_theta",
    "rope_scaling": "rope_scaling",
    "norm_eps": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
}


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed, or does not match the spec's model."""


def model_spec_from_hf_config(config: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """The ModelSpec fields of a Hugging Face LlamaConfig dict (the contents of config.json).

    Reads both config layouts: transformers < 5 (`rope_theta` and `rope_scaling` at the top
    level, scaling keyed `rope_type` or the older `type`) and >= 5 (`rope_parameters`).
    Missing keys take LlamaConfig's defaults. `max_context` is `max_position_embeddings`;
    `dtype` is the checkpoint's when it is one the spec accepts. `overrides` (for example
    `weights=` the directory, or a longer `max_context`) replace the derived fields.
    Raises ValueError for what the runtime's model cannot compute: another activation,
    biased projections, or a RoPE type other than default, linear and llama3.
    """
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act is {config['hidden_act']!r}; the Llama model computes 'silu' only")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise ValueError(f"{key} is true; the Llama model has no projection biases")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    heads = config.get("num_attention_heads", 32)
    hidden = config.get("hidden_size", 4096)
    fields: dict[str, Any] = {
        "layers": config.get("num_hidden_layers", 32),
        "hidden": hidden,
        "heads": heads,
        "kv_heads": config.get("num_key_value_heads") or heads,
        "head_dim": config.get("head_dim") or hidden // heads,
        "ffn": config.get("intermediate_size", 11008),
        "vocab": config.get("vocab_size", 32000),
        "rope_theta": float(config.get("rope_theta", rope.get("rope_theta", 10000.0))),
        "rope_scaling": _rope_scaling(rope),
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "max_context": config.get("max_position_embeddings", 2048),
    }
    dtype = config.get("dtype") or config.get("torch_dtype")
    if dtype in ("float32", "float16", "bfloat16"):
        fields["dtype"] = dtype
    return fields | overrides


def _rope_scaling(rope: dict[str, Any]) -> dict[str, Any] | None:
    """The spec's `rope_scaling` table of an HF rope_scaling / rope_parameters dict."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    try:
        if kind == "default":
            return None
        if kind == "linear":
            return {"type": "linear", "factor": float(rope["factor"])}
        if kind == "llama3":
            return {
                "type": "llama3",
                "factor": float(rope["factor"]),
                "low_freq_factor": float(rope["low_freq_factor"]),
                "high_freq_factor": float(rope["high_freq_factor"]),
                "original_max_context": rope["original_max_position_embeddings"],
            }
    except KeyError as key:
        raise ValueError(f"rope type {kind!r} needs {key}") from None
    raise ValueError(f"rope type {kind!r} is not supported (default, linear and llama3 are)")


def load_model(
    spec: ModelSpec,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    base_dir: Path | None = None,
    tp: int = 1,
    tp_rank: int = 0,
) -> Llama:
    """The model of `spec` in `dtype` (default: the spec's) on `device`, in eval mode; with
    `tp` > 1, TP rank `tp_rank`'s shard of it (`espc.backend.tensor_parallel`).

    `random:<seed>` weights and the `meta` device go to `build_model` (then `shard_model`).
    Otherwise `weights` is a checkpoint directory; a relative one resolves against
    `base_dir` (the spec file's directory), as trace paths do. Raises CheckpointError
    naming the file and what is wrong.
    """
    if spec.random_seed is not None or str(device) == "meta":
        return shard_model(build_model(spec, dtype=dtype, device=device), tp, tp_rank)
    directory = checkpoint_dir(spec, base_dir)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist (weights = {spec.weights!r})")
    _check_config(spec, directory / "config.json")

    with torch.device("meta"):  # structure only: no memory, no random init to overwrite
        model = shard_model(Llama(spec).to(dtype or getattr(torch, spec.dtype)), tp, tp_rank)
    model.to_empty(device=device)
    if spec.tie_embeddings:  # to_empty gives each module its own copy of a shared parameter
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary = Rotary(spec).to(device)  # computed, not stored: float64 frequencies
    _load_tensors(spec, directory, model, tp_shard(spec, tp, tp_rank))
    return model.eval()


def checkpoint_dir(spec: ModelSpec, base_dir: Path | None = None) -> Path:
    """The checkpoint directory of `spec.weights`, a relative one resolved against `base_dir`."""
    directory = Path(spec.weights).expanduser()
    return base_dir / directory if base_dir is not None and not directory.is_absolute() else directory


def _check_config(spec: ModelSpec, path: Path) -> None:
    """Raise CheckpointError unless config.json describes the spec's architecture."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path.parent}: config.json is missing")
    try:
        expected = model_spec_from_hf_config(json.loads(path.read_text()))
    except ValueError as error:  # malformed JSON, or an architecture the model cannot run
        raise CheckpointError(f"checkpoint {path}: {error}") from None
    for field, key in _CONFIG_KEYS.items():
        ours = getattr(spec, field)
        if field == "rope_scaling" and ours is not None:
            ours = ours.model_dump()
        if ours != expected[field]:
            raise CheckpointError(
                f"checkpoint {path}: {key} is {expected[field]!r}, but the spec has {field} = {ours!r}"
            )


def _shard_files(directory: Path) -> list[Path]:
    """The safetensors files of the checkpoint: the index's shards, or model.safetensors."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"checkpoint {index}: not a safetensors index ({error!r})") from None
        files = sorted({directory / name for name in weight_map.values()})
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"checkpoint {index}: lists shard {file.name}, which is missing")
        return files
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    raise CheckpointError(
        f"checkpoint {directory}: no {SINGLE_FILE} or {INDEX_FILE} "
        "(PyTorch .bin checkpoints are not read; re-save with save_pretrained(safe_serialization=True))"
    )


def _load_tensors(spec: ModelSpec, directory: Path, model: Llama, shard: TPShard) -> None:
    """Copy every checkpoint tensor, or the slice of it that `shard` holds, into its
    parameter (casting), checking names and the checkpoint's whole shapes.

    Skipped, as transformers skips them: stored `rotary_emb.inv_freq` buffers of old
    checkpoints, and `lm_head.weight` when the embeddings are tied.
    """
    with torch.device("meta"):  # the whole model's shapes, whatever this rank holds of them
        shapes = {name: tuple(p.shape) for name, p in Llama(spec).named_parameters()}
    params = {("" if name == "lm_head.weight" else "model.") + name: p for name, p in model.named_parameters()}
    loaded: dict[str, Path] = {}
    with torch.no_grad():
        for file in _shard_files(directory):
            with safe_open(file, framework="pt") as tensors:
                for name in tensors.keys():
                    if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and spec.tie_embeddings):
                        continue
                    param = params.get(name)
                    if param is None:
                        raise CheckpointError(f"checkpoint {file}: unexpected tensor {name}, not a parameter of the spec's model")
                    if name in loaded:
                        raise CheckpointError(f"checkpoint {file}: {name} is also in {loaded[name].name}")
                    stored = tensors.get_slice(name)
                    shape, local = tuple(stored.get_shape()), name.removeprefix("model.")
                    if shape != shapes[local]:
                        raise CheckpointError(
                            f"checkpoint {file}: {name} has shape {shape}, the spec needs {shapes[local]}"
                        )
                    piece = param_shard(spec, shard, local) if shard.tp > 1 else None
                    if piece is None:
                        param.copy_(tensors.get_tensor(name))
                    else:  # read only this rank's rows (dim 0) or columns (dim 1)
                        dim, start, stop = piece
                        param.copy_(stored[start:stop] if dim == 0 else stored[:, start:stop])
                    loaded[name] = file
    missing = sorted(params.keys() - loaded.keys())
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint {directory}: tensor {missing[0]}{more} is missing")
