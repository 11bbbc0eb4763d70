"""What generation's row operations on a transformers cache keep, as row indices.

Beam search reorders a cache's rows (``reorder_cache(beam_idx)``), contrastive search selects and repeats them
(``batch_select_indices(indices)``, ``batch_repeat_interleave(repeats)``). State that SCALE keeps per row beside a
cache (a smoothed router's average, ``peft_scale.gate_hook.SequenceAverages``; the preservation copy's second half of the rows,
``peft_scale.preservation_copy``) must follow the same rows: both express each operation as the rows it keeps.
"""

from __future__ import annotations

import torch

ROW_OPERATIONS = ("reorder_cache", "batch_select_indices", "batch_repeat_interleave")


def kept_rows(operation: str, argument, rows: int, device=None) -> torch.Tensor:
    """The rows (long, in their new order) that the cache row ``operation`` (one of ``ROW_OPERATIONS``) called with
    ``argument`` keeps of a cache of ``rows`` rows. ``batch_select_indices`` may be given a boolean mask."""
    if operation == "batch_repeat_interleave":
        return torch.arange(rows, device=device).repeat_interleave(argument)
    index = torch.as_tensor(argument, device=device)
    return (index.nonzero().squeeze(-1) if index.dtype == torch.bool else index).long()
