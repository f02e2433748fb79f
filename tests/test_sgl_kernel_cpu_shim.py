"""The plain-torch stand-in for SGLang's CPU kernel op (harness/engines/sglang_cpu/sgl_kernel).

It must do what the Triton kernel `assign_req_to_token_pool` (sglang 0.5.23,
srt/mem_cache/allocation.py) does: each request's row of the token pool takes its slice of the
batch's newly allocated slots, the slices lying one after another in batch order.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SHIM = Path(__file__).resolve().parents[1] / "harness" / "engines" / "sglang_cpu" / "sgl_kernel" / "__init__.py"


@pytest.fixture(scope="module")
def sgl_kernel():
    spec = importlib.util.spec_from_file_location("sgl_kernel_shim", SHIM)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc):
    """The Triton kernel's loop, program by program: program i skips the slots of programs < i."""
    for i in range(len(req_pool_indices)):
        skipped = int(sum(end_offset[j] - start_offset[j] for j in range(i)))
        for k in range(int(start_offset[i]), int(end_offset[i])):
            req_to_token[int(req_pool_indices[i]), k] = out_cache_loc[skipped + k - int(start_offset[i])]


def test_each_request_row_takes_its_slice_of_the_new_slots_in_batch_order(sgl_kernel):
    pool = torch.full((6, 40), -1, dtype=torch.int32)
    rows, starts, ends = torch.tensor([4, 1, 3]), torch.tensor([0, 7, 39]), torch.tensor([5, 30, 40])
    slots = torch.arange(100, 100 + 5 + 23 + 1, dtype=torch.int64)
    expected = pool.clone()
    reference(rows, expected, starts, ends, slots)
    sgl_kernel.assign_req_to_token_pool_cpu(rows, pool, starts, ends, slots, pool.shape[1])
    assert torch.equal(pool, expected)
    assert pool[1, 7:30].tolist() == list(range(105, 128)) and pool[1, :7].eq(-1).all()


def test_a_request_with_no_new_slots_changes_nothing(sgl_kernel):
    pool = torch.zeros((2, 8), dtype=torch.int32)
    sgl_kernel.assign_req_to_token_pool_cpu(torch.tensor([1]), pool, torch.tensor([3]), torch.tensor([3]),
                                            torch.tensor([], dtype=torch.int64), 8)
    assert pool.eq(0).all()


def test_slots_past_the_row_are_refused_before_anything_is_written(sgl_kernel):
    pool = torch.zeros((2, 8), dtype=torch.int32)
    with pytest.raises(ValueError, match="slots 6:9 do not fit a request row of 8"):
        sgl_kernel.assign_req_to_token_pool_cpu(torch.tensor([1, 0]), pool, torch.tensor([0, 6]), torch.tensor([2, 9]),
                                                torch.arange(5), 8)
    assert pool.eq(0).all()


def test_an_op_the_shim_does_not_provide_fails_naming_itself(sgl_kernel):
    with pytest.raises(NotImplementedError, match="copy_all_layer_kv_cache_cpu is not provided"):
        sgl_kernel.copy_all_layer_kv_cache_cpu(None, None, None, None)
