"""Folding SCALE blocks into plain, wider ``Linear`` / ``Conv1D`` layers."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .quantized import bnb_kind, quantized_like, weight_rows


def _new_like(base: nn.Module, rows: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Module:
    """A module of the base's own class (``FalconLinear`` stays ``FalconLinear``; a bitsandbytes layer is
    requantised with its settings) holding ``rows``."""
    if bnb_kind(base) is not None:
        return quantized_like(base, rows, bias)
    out_features, in_features = rows.shape
    requires_grad = base.weight.requires_grad
    if isinstance(base, Conv1D):
        new = Conv1D(out_features, in_features)
        new.weight = nn.Parameter(rows.T.contiguous(), requires_grad=requires_grad)
    else:
        new = type(base)(in_features, out_features, bias=bias is not None, device="meta")
        new.weight = nn.Parameter(rows.contiguous(), requires_grad=requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.contiguous(), requires_grad=requires_grad)
    return new


@torch.no_grad()
def widened_copy(
    base: nn.Module,
    in_expansion: int,
    w12: Optional[torch.Tensor],
    w21: Optional[torch.Tensor],
    b21: Optional[torch.Tensor],
    w22: Optional[torch.Tensor],
    out_parts: int = 1,
) -> nn.Module:
    """Return a copy of ``base`` widened to the single matrix ``[[W, W12], [W21, W22]]`` (absent blocks are zero).

    The base may already be a widened copy (an earlier adapter merged into it): its extra input columns and
    output rows belong to that adapter, so this adapter's ``W21`` reads none of those columns and its ``W12``
    writes none of those rows (zeros there), exactly as in the unmerged forward, where adapters do not see
    each other's features. With ``out_parts``
    packed projections, each part gets its own new rows right after it, as in ``ScaleLayer.forward``.

    A bitsandbytes base is dequantised, widened and requantised (``peft_scale.quantized.quantized_like``).
    """
    weight = weight_rows(base)  # (out, in), dequantised for a quantized base
    dtype, device = weight.dtype, weight.device
    out_features, in_features = weight.shape
    part_out = out_features // out_parts
    new_in = in_features + in_expansion
    part_new = (w21.shape[0] // out_parts) if w21 is not None else 0
    rows = torch.zeros(out_parts * (part_out + part_new), new_in, dtype=dtype, device=device)
    bias = None
    if base.bias is not None:
        bias = torch.zeros(rows.shape[0], dtype=dtype, device=device)
    for p in range(out_parts):
        start = p * (part_out + part_new)
        old = slice(p * part_out, (p + 1) * part_out)
        rows[start : start + part_out, :in_features] = weight[old]
        if w12 is not None:
            # W12 feeds the original outputs only; rows an earlier merged adapter added get none of it.
            w12_part = w12.shape[0] // out_parts
            rows[start : start + w12_part, in_features:] = w12[p * w12_part : (p + 1) * w12_part].to(dtype)
        if bias is not None:
            bias[start : start + part_out] = base.bias[old]
        if w21 is not None:
            new = slice(p * part_new, (p + 1) * part_new)
            rows[start + part_out : start + part_out + part_new, : w21.shape[1]] = w21[new].to(dtype)
            if w22 is not None:
                rows[start + part_out : start + part_out + part_new, in_features:] = w22[new].to(dtype)
            if b21 is not None:
                bias[start + part_out : start + part_out + part_new] = b21[new].to(dtype)
    return _new_like(base, rows, bias)
