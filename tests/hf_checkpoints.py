"""Random Hugging Face Llama checkpoints written to disk: the independent model that espc's
checkpoint loading and generation are compared against."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch


def random_llama(directory: Path, *, intermediate_size: int, kv_heads: int, seed: int):
    """A 2-layer GQA LlamaForCausalLM (hidden 48, 4 query heads of 12, vocabulary 300) with
    unit-variance layer outputs — so its logits are far from ties and greedy tokens are a
    stable comparison — saved as safetensors in `directory`. Returns (config, model)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=48, intermediate_size=intermediate_size, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, head_dim=12, vocab_size=300, max_position_embeddings=256, rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 1.0 if "embed" in name or "norm" in name else 1 / math.sqrt(param.shape[-1])
            param.copy_(torch.randn(param.shape) * scale + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(directory, safe_serialization=True)
    return config, model


def greedy_continuation(model, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy tokens after `prompt` (no pad or EOS inference: every token counts)."""
    with torch.no_grad():
        generated = model.generate(
            torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
        )
    return generated[0, len(prompt):].tolist()
