"""The KV one block of a model takes, from its config.json: what a NIXL transfer must move (SPEC §4.1).

bytes per block = layers x 2 (K and V) x KV heads x head dim x the cache dtype's bytes x block
size. A transfer of fewer bytes than its blocks take is a partial transfer; more is a wrong
layout or a bad metric. The cache dtype is the engine's `--kv-cache-dtype`, which vLLM defaults
("auto") to the model's `--dtype`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

DTYPE_BYTES = {"float32": 4, "fp32": 4, "float": 4, "float16": 2, "fp16": 2, "half": 2, "bfloat16": 2, "bf16": 2,
               "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "int8": 1}


class GeometryError(ValueError):
    pass


def text_config(config: dict) -> dict:
    """A multimodal model's language half carries the KV geometry."""
    return config.get("text_config") or config


def kv_block_bytes(config: dict, dtype: str, block_size: int) -> int:
    cfg = text_config(config)
    missing = [k for k in ("num_hidden_layers", "num_attention_heads") if k not in cfg]
    if missing:
        raise GeometryError(f"config.json has no {', '.join(missing)}: the KV geometry cannot be read")
    if dtype not in DTYPE_BYTES:
        raise GeometryError(f"cache dtype {dtype!r} has no known size; known: {', '.join(sorted(DTYPE_BYTES))}")
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * 2 * kv_heads * head_dim * DTYPE_BYTES[dtype] * block_size


def model_kv_block_bytes(model_dir: str | Path, dtype: str, block_size: int) -> int:
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise GeometryError(f"{path}: cannot read the model's config: {exc}") from None
    return kv_block_bytes(config, dtype, block_size)


def blocks_for(tokens: float, block_size: int) -> int:
    """The blocks that hold `tokens` prompt tokens: the partial last one too."""
    return math.ceil(tokens / block_size)
