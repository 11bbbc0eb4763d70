"""Folding SCALE blocks into plain, wider ``Linear`` / ``Conv1D`` layers, and the policy of a whole-model merge.

- ``widened_copy``: one layer's block matrix as one wider layer (``peft_scale.layer.Linear.merge``).
- The merge policy, checked by ``ScaleModel`` before anything is folded: what cannot be merged
  (``check_mergeable``: a routed adapter; ``check_quantized_merge``: full width into a quantized base), the
  intermediate sizes the merged model's config records (``merged_config_sizes``), and what the merged model
  may not do afterwards (``refuse_standard_checkpoint``).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .architectures import FFN_LAYOUTS, INTERMEDIATE_SIZE_FIELDS, module_name_matches
from .ffn_detection import intermediate_size_fields
from .quantized import bnb_kind, has_quantized_layers, quantized_like, weight_rows, weight_shape


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
    packed projections, each part gets its own new rows right after it, as in ``peft_scale.layer.Linear.forward``.

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


# ------------------------------------------------------------------------------------------- merge policy


def check_quantized_merge(configs: list, model: nn.Module) -> None:
    """No full-width merge into a quantized base (``merge_adapter`` and ``merge_and_unload``).

    Merging requantises every widened projection, and in full width that is every projection of the model, each
    with new input columns that shift its 4-bit blocks over the original weights: on a tiny Llama the merged
    logits moved by up to 5x what quantizing the base had cost (FFN mode: below it, so FFN adapters merge)."""
    if any(config.hidden_expansion for config in configs) and has_quantized_layers(model):
        raise ValueError(
            "Cannot merge a full-width SCALE adapter into a bitsandbytes-quantized base: every widened projection "
            "would be requantised with the original weights in new blocks, which moves the logits by several times "
            "what quantizing the base cost (a merged full-width model is for use in memory only anyway). Keep it "
            "unmerged, or merge it on the full-precision base: "
            "PeftModel.from_pretrained(full_precision_base, adapter_folder).merge_and_unload()."
        )


def check_mergeable(merging: list) -> None:
    """A SCALE-Route adapter cannot be merged (either rule)."""
    routed = [config for config in merging if config.variant == "route"]
    if routed:
        why = (
            "its preservation head needs the frozen original weights apart from the new blocks, which merging "
            "folds together"
            if routed[0].route_rule == "cosine"
            else "its learned router's gate depends on the input (per token: the base model or the expansion), "
            "and a merged layer is one matrix for every token"
        )
        raise ValueError(
            f"Cannot merge a SCALE-Route adapter: {why}. Keep the model unmerged for routing (save the adapter "
            "with save_pretrained)."
        )


def _output_layers(model: nn.Module, configs: list) -> list[tuple[str, nn.Module]]:
    """Every FFN output projection of the model, widened or not (names from all adapters' configs)."""
    from .layer import Linear  # here, not at the top: layer.py imports this module for widened_copy

    names = {name for config in configs for name in (config.ffn_output_modules or [])}
    return [
        (key, module)
        for key, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D, Linear)) and module_name_matches(key, names)
    ]


def _merged_intermediate_sizes(
    model: nn.Module, configs: list, adapter_names: Optional[list[str]]
) -> dict[str, tuple[int, int]]:
    """Output projection name -> (its base intermediate size, its merged one)."""
    from .layer import Linear

    sizes = {}
    for key, module in _output_layers(model, configs):
        if isinstance(module, Linear):
            merging = adapter_names if adapter_names is not None else module.active_adapters
            merging = set(merging) | set(module.merged_adapters)
            added = sum(module.in_expansion.get(name, 0) for name in merging)
            sizes[key] = (module.in_features, module.in_features + added)
        else:
            sizes[key] = (weight_shape(module)[1],) * 2
    return sizes


def merged_config_sizes(
    model: nn.Module, configs: list, adapter_names: Optional[list[str]]
) -> list[tuple[object, str, int]]:
    """The config fields a merge updates, as ``(config, field, new value)``: the fields of each base intermediate size
    (a dense MLP and a mixture-of-experts' experts keep theirs in different fields), found by
    ``peft_scale.ffn_detection.intermediate_size_fields``.

    A standard checkpoint holds one size per field, so the merged FFNs of one base size must agree.

    Raises:
        ValueError: the merged FFNs of one base size would differ, or no config field holds a base size.
    """
    config = model.config
    layout = FFN_LAYOUTS.get(getattr(config, "model_type", None))
    by_base = defaultdict(lambda: defaultdict(list))
    for key, (base, merged) in _merged_intermediate_sizes(model, configs, adapter_names).items():
        by_base[base][merged].append(key)
    fields = []
    for base, merged in by_base.items():
        if len(merged) > 1:
            summary = "; ".join(f"{size}: {len(keys)} layers, e.g. {keys[0]!r}" for size, keys in merged.items())
            raise ValueError(
                "Cannot merge into a standard checkpoint: the merged FFNs would have different intermediate sizes "
                f"({summary}), and a {type(config).__name__} holds one size for all layers. Widen "
                "every layer (drop layers_to_transform / exclude_modules), or keep the model unmerged and save "
                "the adapter with save_pretrained."
            )
        found = intermediate_size_fields(config, base, layout.size_field if layout else None)
        if not found:
            raise ValueError(
                f"Cannot merge: no field of {type(config).__name__} holds the intermediate size {base} (tried "
                f"{list(INTERMEDIATE_SIZE_FIELDS)}, then the fields named like an FFN size whose value is {base}), so "
                "the merged checkpoint could not record the wider FFN. Keep the model unmerged and save the adapter "
                "with save_pretrained, or add the architecture to peft_scale.architectures.FFN_LAYOUTS with its "
                "size_field."
            )
        fields += [(holder, name, next(iter(merged))) for holder, name in found]
    names = [name for _, name, _ in fields]
    if len(set(names)) < len(names):
        raise ValueError(f"Cannot merge: one config field would have to hold two merged sizes ({names}).")
    return fields


# Here rather than in norm.py (whose SplitRMSNorm is the reason) or model.py (which calls it): it is the export
# side of a merge, like the intermediate size above: what a merged model can and cannot be written as. It acts on
# the unloaded base model (no SCALE module is left on it) by replacing that instance's save methods.
def refuse_standard_checkpoint(model: nn.Module) -> None:
    """A merged full-width model keeps split norms: no checkpoint of its architecture can hold it."""
    architecture = type(model).__name__

    def save_pretrained(*args, **kwargs):
        raise ValueError(
            f"This merged full-width SCALE model cannot be saved as a {architecture} checkpoint: its norms normalise "
            "the original and the new features separately (SplitRMSNorm, SplitLayerNorm), which the architecture's "
            "config cannot express, so the checkpoint would not load. Use it in memory for fast inference, and save "
            "the adapter instead: PeftModel.save_pretrained before merging."
        )

    model.save_pretrained = save_pretrained
    model.push_to_hub = save_pretrained
