"""The one SGLang CPU kernel op a served request needs, in plain torch, for SGLang on CPU in CI.

Installed only into the SGLang venv by `.ci/install-sglang`; nothing of the harness imports it.
SGLang's CPU kernels (`sgl-kernel`'s CPU build) are not on PyPI, and the `sgl-kernel` /
`sglang-kernel` wheels there are CUDA-only (importing them fails on `common_ops`). With
`SGLANG_USE_CPU_ENGINE=1`, sglang 0.5.23 imports these names from `sgl_kernel` when its modules
load (listed by importing the server's modules against a recording stub):

- `assign_req_to_token_pool_cpu` (`srt/mem_cache/allocation.py`), called on every allocation:
  implemented below, with the semantics of the Triton kernel it stands in for
  (`assign_req_to_token_pool` in the same file);
- `copy_all_layer_kv_cache_cpu` (`kernels/ops/kvcache/cache_move.py`), which copies KV by raw
  data pointers, and six speculative-decoding ops: not provided. Each raises, naming itself, if
  SGLang ever calls it, so a path that needs one fails loudly instead of computing wrong KV.
"""

from __future__ import annotations

import torch


def assign_req_to_token_pool_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                                 start_offset: torch.Tensor, end_offset: torch.Tensor,
                                 out_cache_loc: torch.Tensor, pool_len: int) -> None:
    """For request i of the batch: req_to_token[req_pool_indices[i], start_offset[i]:end_offset[i]]
    takes the next end_offset[i] - start_offset[i] entries of out_cache_loc, the requests' slices
    lying one after another in batch order. `pool_len` is req_to_token's row length."""
    spans = list(zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()))
    for _, start, end in spans:  # all checked before any row is written
        if not 0 <= start <= end <= pool_len:
            raise ValueError(f"slots {start}:{end} do not fit a request row of {pool_len}")
    taken = 0
    for row, start, end in spans:
        req_to_token[row, start:end] = out_cache_loc[taken:taken + end - start].to(req_to_token.dtype)
        taken += end - start


def _not_provided(name: str):
    def op(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name} is not provided by the CPU test shim "
                                  "(harness/engines/sglang_cpu/sgl_kernel): this SGLang path needs SGLang's "
                                  "own CPU kernels")
    op.__name__ = name
    return op


for _name in ("copy_all_layer_kv_cache_cpu", "assign_draft_cache_locs_contiguous_cpu", "assign_extend_cache_locs_cpu",
              "build_tree_kernel_efficient_cpu", "fill_accept_out_cache_loc_cpu", "fill_bonus_tokens_cpu",
              "verify_tree_greedy_cpu"):
    globals()[_name] = _not_provided(_name)
