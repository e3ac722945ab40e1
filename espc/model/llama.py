"""A Llama-family decoder in plain PyTorch: RMSNorm, RoPE (theta, linear or llama3 scaling),
grouped-query attention and a SwiGLU MLP, configured by `espc.frontend.spec.ModelSpec`.

`Llama.forward` is the single-process forward over one token sequence; built in float64 it is
the reference the distributed backend is tested against. Parallelism is applied from outside
(`espc.backend.lower`): the lowering calls these modules for the embedding, norms,
projections (`Attention.qkv`, `o_proj`), MLP and `lm_head`, and substitutes elastic
sequence-parallel attention for `Attention.forward`. Parameter names follow Hugging Face's
Llama so checkpoints map one to one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from espc.frontend.spec import LinearRopeScaling, Llama3RopeScaling, ModelSpec

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))  # fp16/bf16 norm in fp32
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def rope_frequencies(spec: ModelSpec) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in float64, with the spec's RoPE scaling applied."""
    dim = spec.head_dim
    inv_freq = 1.0 / spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    scaling = spec.rope_scaling
    if isinstance(scaling, LinearRopeScaling):
        inv_freq = inv_freq / scaling.factor
    elif isinstance(scaling, Llama3RopeScaling):
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate between.
        low_wavelen = scaling.original_max_context / scaling.low_freq_factor
        high_wavelen = scaling.original_max_context / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (scaling.original_max_context / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        mixed = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        inv_freq = torch.where((wavelen >= high_wavelen) & (wavelen <= low_wavelen), mixed, inv_freq)
    return inv_freq


class Rotary(nn.Module):
    """cos/sin tables for arbitrary global token positions (striped layouts need no arange)."""

    inv_freq: torch.Tensor  # registered as a buffer in __init__

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.register_buffer("inv_freq", rope_frequencies(spec), persistent=False)

    def forward(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Angles in float64: at position 4096 a float32 angle is already off by ~2e-4 rad.
        angles = pos.to(torch.float64)[:, None] * self.inv_freq.to(device=pos.device, dtype=torch.float64)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [n, heads, head_dim] by the per-token angles (half-split layout, as HF Llama)."""
    first, second = x.chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = spec.heads, spec.kv_heads, spec.head_dim
        self.q_proj = nn.Linear(spec.hidden, spec.heads * spec.head_dim, bias=False)
        self.k_proj = nn.Linear(spec.hidden, spec.kv_heads * spec.head_dim, bias=False)
        self.v_proj = nn.Linear(spec.hidden, spec.kv_heads * spec.head_dim, bias=False)
        self.o_proj = nn.Linear(spec.heads * spec.head_dim, spec.hidden, bias=False)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Projections of [n, hidden] tokens: q [n, heads, D], k and v [n, kv_heads, D], roped."""
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.heads, self.head_dim)
        k = self.k_proj(x).view(n, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.kv_heads, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Causal self-attention of one sequence (the reference path)."""
        q, k, v = self.qkv(x, cos, sin)
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            is_causal=True, enable_gqa=True,
        )
        return self.o_proj(o[0].transpose(0, 1).reshape(x.shape[0], -1))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden, spec.ffn, bias=False)
        self.up_proj = nn.Linear(spec.hidden, spec.ffn, bias=False)
        self.down_proj = nn.Linear(spec.ffn, spec.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden, spec.norm_eps)
        self.self_attn = Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden, spec.norm_eps)
        self.mlp = MLP(spec)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab, spec.hidden)
        self.rotary = Rotary(spec)
        self.layers = nn.ModuleList(Block(spec) for _ in range(spec.layers))
        self.norm = RMSNorm(spec.hidden, spec.norm_eps)
        self.lm_head = nn.Linear(spec.hidden, spec.vocab, bias=False)
        if spec.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [n, vocab] for every position of one sequence of token ids [n]."""
        x = self.embed_tokens(tokens)
        cos, sin = self.rotary(torch.arange(tokens.shape[0], device=tokens.device), x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


def build_model(
    spec: ModelSpec, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> Llama:
    """The model of `spec` with its `random:<seed>` weights, in `dtype` (default: the spec's).

    Weights are drawn in float32 on the CPU from the seed and then cast, so every dtype and
    device gets the same values (a float64 copy is the reference of a float32 run). On the
    `meta` device nothing is allocated: the lowering only needs the module structure.
    """
    dtype = dtype or _DTYPES[spec.dtype]
    if str(device) == "meta":
        with torch.device("meta"):
            return Llama(spec).to(dtype)
    seed = spec.random_seed
    if seed is None:
        raise NotImplementedError(
            f"model weights {spec.weights!r}: build_model draws random:<seed> weights; load checkpoints with espc.runtime.weights.load_model"
        )
    model = Llama(spec)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
            elif name == "embed_tokens.weight":
                param.copy_(torch.randn(param.shape, generator=generator))
            else:  # a Linear [out, in]: unit-variance outputs for unit-variance inputs
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(param.shape[1]))
    model = model.to(device=device, dtype=dtype).eval()
    # `.to(dtype)` casts buffers too; RoPE's frequencies must stay float64 (see Rotary).
    model.rotary.inv_freq = rope_frequencies(spec).to(device)
    return model
