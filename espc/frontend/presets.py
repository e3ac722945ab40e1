"""Built-in facts a spec can refer to by name: devices, model architectures, datasets.

Device figures are the dense bf16/fp16 peaks from the vendors' data sheets, as tabulated in
shared/anchors/README.md; `link_bandwidth` is one direction of one device's intra-node link
(NVLink, or PCIe where there is none). The cpu preset describes one worker process on a
small CPU host; `espc profile` measures the real figures for a machine.
"""

from __future__ import annotations

DEVICE_PRESETS: dict[str, dict] = {
    "A100-80G": {
        "kind": "cuda", "memory": "80GiB", "peak_flops": "312TFLOP/s",
        "memory_bandwidth": "2039GB/s", "link_bandwidth": "300GB/s",
    },
    "A100-40G": {
        "kind": "cuda", "memory": "40GiB", "peak_flops": "312TFLOP/s",
        "memory_bandwidth": "1555GB/s", "link_bandwidth": "300GB/s",
    },
    # The export variant of the A100: same chip, NVLink cut to 400 GB/s bidirectional.
    "A800-80G": {
        "kind": "cuda", "memory": "80GiB", "peak_flops": "312TFLOP/s",
        "memory_bandwidth": "2039GB/s", "link_bandwidth": "200GB/s",
    },
    "H100-80G": {
        "kind": "cuda", "memory": "80GiB", "peak_flops": "989TFLOP/s",
        "memory_bandwidth": "3350GB/s", "link_bandwidth": "450GB/s",
    },
    "H200-141G": {
        "kind": "cuda", "memory": "141GiB", "peak_flops": "989TFLOP/s",
        "memory_bandwidth": "4800GB/s", "link_bandwidth": "450GB/s",
    },
    # No NVLink: peers talk over PCIe 4.0 x16 (32 GB/s per direction).
    "L40S-48G": {
        "kind": "cuda", "memory": "48GB", "peak_flops": "362TFLOP/s",
        "memory_bandwidth": "864GB/s", "link_bandwidth": "32GB/s",
    },
    "cpu": {
        "kind": "cpu", "memory": "2GiB", "peak_flops": "50GFLOP/s",
        "memory_bandwidth": "10GB/s", "link_bandwidth": "5GB/s",
    },
}

DEVICE_ALIASES = {
    "A100": "A100-80G",
    "A800": "A800-80G",
    "H100": "H100-80G",
    "H200": "H200-141G",
    "L40S": "L40S-48G",
}

_LLAMA2_7B = {
    "arch": "llama", "layers": 32, "hidden": 4096, "heads": 32, "kv_heads": 32, "head_dim": 128,
    "ffn": 11008, "vocab": 32000, "rope_theta": 10000.0, "dtype": "float16", "max_context": 4096,
}
_LLAMA3_8B = {
    "arch": "llama", "layers": 32, "hidden": 4096, "heads": 32, "kv_heads": 8, "head_dim": 128,
    "ffn": 14336, "vocab": 128256, "rope_theta": 500000.0, "dtype": "bfloat16", "max_context": 8192,
}
_LLAMA3_70B = _LLAMA3_8B | {"layers": 80, "hidden": 8192, "heads": 64, "ffn": 28672}
_LLAMA31_SCALING = {
    "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_context": 8192,
}

MODEL_PRESETS: dict[str, dict] = {
    # The default of the CPU spec: GQA (4 query heads share 2 KV heads), a byte vocabulary.
    "tiny": {
        "arch": "llama", "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "head_dim": 16,
        "ffn": 176, "vocab": 256, "rope_theta": 10000.0, "dtype": "float32", "max_context": 4096,
    },
    "llama2-7b": _LLAMA2_7B,
    "llama2-13b": _LLAMA2_7B | {"layers": 40, "hidden": 5120, "heads": 40, "kv_heads": 40, "ffn": 13824},
    "llama2-70b": _LLAMA2_7B | {"layers": 80, "hidden": 8192, "heads": 64, "kv_heads": 8, "ffn": 28672},
    # LoongServe's model: the Llama-2-7B architecture trained to a 1M-token context.
    "lwm-text-1m": _LLAMA2_7B | {"rope_theta": 50000000.0, "max_context": 1048576},
    "llama3-8b": _LLAMA3_8B,
    "llama3-70b": _LLAMA3_70B,
    "llama3.1-8b": _LLAMA3_8B | {"rope_scaling": _LLAMA31_SCALING, "max_context": 131072},
    "llama3.1-70b": _LLAMA3_70B | {"rope_scaling": _LLAMA31_SCALING, "max_context": 131072},
}

# Input-length ranges (tokens) of the named workloads, as published (anchors/README.md).
DATASET_INPUT_RANGES: dict[str, tuple[int, int]] = {
    "sharegpt": (4, 2_300),
    "leval": (2_700, 210_500),
    "lveval": (15_100, 497_300),
    "mixed": (4, 497_300),
}

# The longest output (tokens) of each named workload's own output lengths: LoongServe caps
# ShareGPT and L-Eval answers at 1K; LV-Eval's answers are short phrases (workload.py).
DATASET_OUTPUT_MAX: dict[str, int] = {
    "sharegpt": 1_000,
    "leval": 1_000,
    "lveval": 500,
    "mixed": 1_000,
}
