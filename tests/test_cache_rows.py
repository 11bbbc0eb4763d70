"""``peft_scale.cache_rows``: the rows a transformers cache's row operation keeps, as indices (what the smoothed
routers' states and the preservation copy's cache rows follow)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from peft_scale.cache_rows import ROW_OPERATIONS, kept_rows


def test_kept_rows_of_each_operation():
    assert kept_rows("reorder_cache", torch.tensor([2, 0, 1]), rows=3).tolist() == [2, 0, 1]
    assert kept_rows("reorder_cache", [1, 1, 0], rows=3).tolist() == [1, 1, 0]  # beams may repeat a row
    assert kept_rows("batch_select_indices", torch.tensor([True, False, True]), rows=3).tolist() == [0, 2]
    assert kept_rows("batch_select_indices", torch.tensor([2]), rows=3).tolist() == [2]
    assert kept_rows("batch_repeat_interleave", 2, rows=3).tolist() == [0, 0, 1, 1, 2, 2]


def test_kept_rows_are_long_indices():
    for operation, argument in [
        ("reorder_cache", torch.tensor([1, 0], dtype=torch.int32)),
        ("batch_select_indices", torch.tensor([False, True])),
        ("batch_repeat_interleave", 3),
    ]:
        assert kept_rows(operation, argument, rows=2, device="cpu").dtype == torch.long


@pytest.mark.parametrize(
    ("operation", "argument"),
    [
        ("reorder_cache", torch.tensor([3, 0, 0, 2])),
        ("batch_select_indices", torch.tensor([1, 3])),
        ("batch_select_indices", torch.tensor([True, False, False, True])),
        ("batch_repeat_interleave", 2),
    ],
)
def test_kept_rows_are_the_rows_a_dynamic_cache_keeps(operation, argument):
    """Each of ``ROW_OPERATIONS`` applied to a transformers ``DynamicCache`` whose row ``i`` holds ``i``."""
    assert operation in ROW_OPERATIONS
    cache = DynamicCache()
    values = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 2, 3, 8).contiguous()  # (batch, kv_heads, seq, head_dim)
    cache.update(values, values.clone(), layer_idx=0)
    getattr(cache, operation)(argument)
    kept = cache.layers[0].keys[:, 0, 0, 0].long()
    assert kept.tolist() == kept_rows(operation, argument, rows=4).tolist()
