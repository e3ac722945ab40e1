"""Checkpoint loading: Hugging Face Llama checkpoints against transformers' own model, and the
errors for checkpoints that are missing, malformed or describe another model.

transformers' LlamaForCausalLM is the independent implementation: every loaded parameter
must equal its tensor bit for bit, and our logits must match its logits. Its RMSNorm, RoPE
angles and softmax run in float32 even in a float64 model, so float64 runs agree only to
float32 rounding: both dtypes use the float32 tolerance.
"""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tolerances import TOLERANCES

from espc.frontend.spec import ModelSpec
from espc.model.llama import build_model
from espc.runtime.weights import CheckpointError, load_model, model_spec_from_hf_config

# A transformers >= 5 config.json of a tiny GQA model with odd sizes.
TINY_CONFIG = {
    "model_type": "llama",
    "hidden_size": 40,
    "intermediate_size": 56,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 10,
    "vocab_size": 67,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0},
    "dtype": "float32",
}
LLAMA3_ROPE = {
    "rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0,
    "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
}


def spec_of(directory: Path, config: dict = TINY_CONFIG) -> ModelSpec:
    """The spec of a checkpoint; float32 because a float64 checkpoint has no spec dtype."""
    return ModelSpec(**model_spec_from_hf_config(config, weights=str(directory), dtype="float32"))


def hf_checkpoint(directory: Path, dtype: torch.dtype, max_shard_size: str = "1GB", **config):
    """A randomly initialised transformers Llama saved with save_pretrained, and the model.

    Norm weights are drawn around 1 and projections at unit output variance (transformers'
    0.02 init gives near-constant logits, and all-ones norms would hide a swapped norm).
    """
    transformers = pytest.importorskip("transformers")
    fields = {k: v for k, v in TINY_CONFIG.items() if k not in ("model_type", "rope_parameters", "dtype")}
    rope = config.pop("rope_parameters", TINY_CONFIG["rope_parameters"])
    hf_config = transformers.LlamaConfig(**fields | {"rope_parameters": rope} | config)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_config).to(dtype).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn(param.shape))
            elif name.endswith("embed_tokens.weight"):
                param.copy_(torch.randn(param.shape))
            else:
                param.copy_(torch.randn(param.shape) / math.sqrt(param.shape[1]))
    model.save_pretrained(directory, safe_serialization=True, max_shard_size=max_shard_size)
    return model


@pytest.mark.parametrize(
    "dtype, config",
    [
        (torch.float64, {}),
        (torch.float32, {}),
        (torch.float64, {"rope_parameters": LLAMA3_ROPE}),
        (torch.float64, {"rope_parameters": {"rope_type": "linear", "rope_theta": 5000.0, "factor": 2.0}}),
        (torch.float64, {"tie_word_embeddings": True}),
    ],
    ids=["float64", "float32", "llama3-rope", "linear-rope", "tied"],
)
def test_matches_transformers(tmp_path, dtype, config):
    hf = hf_checkpoint(tmp_path, dtype, **config)
    spec = spec_of(tmp_path, json.loads((tmp_path / "config.json").read_text()))
    ours = load_model(spec, dtype=dtype)
    assert not ours.training and ours.dtype == dtype
    hf_state = hf.state_dict()
    for name, param in ours.named_parameters():
        assert torch.equal(param, hf_state[name if name == "lm_head.weight" else f"model.{name}"]), name
    if spec.tie_embeddings:
        assert ours.lm_head.weight is ours.embed_tokens.weight
    for n in (1, 7, 33):
        tokens = torch.randint(0, spec.vocab, (n,), generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            expected = hf(tokens[None]).logits[0]
            torch.testing.assert_close(ours(tokens), expected, **TOLERANCES[torch.float32])


def test_sharded_checkpoint(tmp_path):
    hf = hf_checkpoint(tmp_path, torch.float32, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    ours = load_model(spec_of(tmp_path), dtype=torch.float32)
    tokens = torch.arange(11) * 5 % TINY_CONFIG["vocab_size"]
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens[None]).logits[0], **TOLERANCES[torch.float32])


def write_checkpoint(directory: Path, config: dict = TINY_CONFIG) -> dict[str, torch.Tensor]:
    """config.json and model.safetensors of random weights in HF naming; returns the tensors."""
    directory.mkdir(exist_ok=True)
    spec = spec_of(directory, config).model_copy(update={"weights": "random:3"})
    state = {
        name if name == "lm_head.weight" else f"model.{name}": param.detach()
        for name, param in build_model(spec).named_parameters()
    }
    save_file(state, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config))
    return state


def test_loads_written_checkpoint_relative_to_base_dir(tmp_path):
    state = write_checkpoint(tmp_path / "ckpt")
    model = load_model(spec_of(Path("ckpt")), base_dir=tmp_path)
    assert torch.equal(model.layers[1].mlp.up_proj.weight, state["model.layers.1.mlp.up_proj.weight"])
    assert model.rotary.inv_freq.dtype == torch.float64


def test_random_weights_are_build_model(tmp_path):
    spec = spec_of(tmp_path).model_copy(update={"weights": "random:5"})
    loaded, built = load_model(spec), build_model(spec)
    for (name, a), (_, b) in zip(loaded.named_parameters(), built.named_parameters()):
        assert torch.equal(a, b), name


def test_spec_from_transformers_4_config():
    """Older config.json: rope_theta and rope_scaling at the top level, no head_dim."""
    config = {
        "hidden_size": 64, "num_attention_heads": 8, "num_hidden_layers": 3, "intermediate_size": 160,
        "vocab_size": 300, "rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 4.0},
        "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "torch_dtype": "bfloat16",
    }
    fields = model_spec_from_hf_config(config, max_context=16384)
    assert fields == {
        "layers": 3, "hidden": 64, "heads": 8, "kv_heads": 8, "head_dim": 8, "ffn": 160, "vocab": 300,
        "rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 4.0}, "norm_eps": 1e-5,
        "tie_embeddings": False, "max_context": 16384, "dtype": "bfloat16",
    }
    llama3 = model_spec_from_hf_config(TINY_CONFIG | {"rope_parameters": LLAMA3_ROPE})["rope_scaling"]
    assert llama3 == {
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_context": 64,
    }


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint directory {tmp_path / 'nope'} does not exist")):
        load_model(spec_of(tmp_path / "nope"))


def test_missing_config(tmp_path):
    write_checkpoint(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_model(spec_of(tmp_path))


def test_missing_safetensors(tmp_path):
    write_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        load_model(spec_of(tmp_path))


def test_config_mismatch_names_field_and_values(tmp_path):
    write_checkpoint(tmp_path)
    spec = spec_of(tmp_path).model_copy(update={"kv_heads": 4})
    with pytest.raises(CheckpointError, match=r"config\.json: num_key_value_heads is 2, but the spec has kv_heads = 4"):
        load_model(spec)
    spec = spec_of(tmp_path, TINY_CONFIG | {"rope_parameters": LLAMA3_ROPE})
    with pytest.raises(CheckpointError, match=r"rope_scaling is None, but the spec has rope_scaling = \{'type': 'llama3'"):
        load_model(spec)


def test_unsupported_architecture(tmp_path):
    write_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG | {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(CheckpointError, match=r"config\.json: rope type 'yarn' is not supported"):
        load_model(spec_of(tmp_path))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("model.layers.1.mlp.up_proj.weight"), r"tensor model\.layers\.1\.mlp\.up_proj\.weight is missing"),
        (
            lambda s: s.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(40, 40)}),
            r"model\.safetensors: model\.layers\.0\.self_attn\.k_proj\.weight has shape \(40, 40\), the spec needs \(20, 40\)",
        ),
        (
            lambda s: s.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(56, 40)}),
            r"model\.safetensors: unexpected tensor model\.layers\.2\.mlp\.up_proj\.weight",
        ),
    ],
    ids=["missing", "shape", "unexpected"],
)
def test_tensor_errors(tmp_path, edit, message):
    state = write_checkpoint(tmp_path)
    edit(state)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        load_model(spec_of(tmp_path))


def test_tied_checkpoint_ignores_stored_lm_head(tmp_path):
    """Some exports keep lm_head.weight next to tied embeddings; transformers ignores it too."""
    tied = TINY_CONFIG | {"tie_word_embeddings": True}
    state = write_checkpoint(tmp_path, tied)
    save_file(state | {"lm_head.weight": torch.zeros(67, 40)}, tmp_path / "model.safetensors")
    model = load_model(spec_of(tmp_path, tied))
    assert torch.equal(model.lm_head.weight, load_file(tmp_path / "model.safetensors")["model.embed_tokens.weight"])
