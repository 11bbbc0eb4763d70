"""The policy of a whole-model merge, checked by ``ScaleModel`` before anything is folded.

What cannot be merged (``check_mergeable``: a routed adapter; ``check_quantized_merge``: full width into a quantized
base), the intermediate sizes the merged model's config records (``merged_config_sizes``), and what the merged model
may not do afterwards (``refuse_standard_checkpoint``, ``refuse_unloadable_checkpoint``). Each layer class folds its
own blocks (its ``_merged_module``): ``layer.widened_copy`` (one layer's block matrix as one wider ``Linear`` /
``Conv1D``), ``norm.SplitRMSNorm``, ``experts.Experts``.
"""

from __future__ import annotations

import copy
import warnings
from collections import defaultdict
from typing import Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .architectures import DERIVED_SIZES, FFN_LAYOUTS, INTERMEDIATE_SIZE_FIELDS, module_name_matches
from .ffn_detection import intermediate_size_fields
from .layer import Linear
from .quantized import bnb_kind, has_quantized_layers, weight_shape


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
    ``peft_scale.ffn_detection.intermediate_size_fields``, or, for a family whose code derives the size from other
    fields (``architectures.DERIVED_SIZES``: LFM2, Moshi, GPT-NeoX-Japanese, Aria), the values of those fields.

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
        derived = DERIVED_SIZES.get(getattr(config, "model_type", None))
        if layout is None and derived is not None and derived.size(config) == base:
            values = derived.fields(config, next(iter(merged)))
            if values is None:
                raise ValueError(
                    f"Cannot merge: {type(config).__name__} derives the intermediate size from other fields "
                    f"({derived.rule}), and no value of them gives the merged size {next(iter(merged))}, so the "
                    "merged checkpoint could not record the wider FFN. Keep the model unmerged and save the adapter "
                    "with save_pretrained."
                )
            fields += [(config, name, value) for name, value in values.items()]
            continue
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


def refuse_unloadable_checkpoint(model: nn.Module) -> None:
    """After a merge that wrote the config's FFN sizes: if the merged model's config would build other shapes than it
    holds, its ``save_pretrained`` raises instead of writing a checkpoint that does not load (and a warning says so
    now).

    This happens where a family derives another module's size from the field the merge wrote: DeepSeek-style shared
    experts are ``moe_intermediate_size * n_shared_experts`` wide, and a merge that widened the experts but not the
    shared experts by the same factor leaves them at another size. Run after every merge that wrote a config field,
    it also checks the fields written by the rules of ``architectures.DERIVED_SIZES``."""
    with torch.device("meta"):  # shapes only: no memory, nothing drawn
        skeleton = type(model)._from_config(copy.deepcopy(model.config))
    built = {name: tuple(p.shape) for name, p in skeleton.named_parameters()}
    held = {name: tuple(p.shape) for name, p in model.named_parameters()}
    for name, module in model.named_modules():
        if bnb_kind(module) is not None:  # packed 4-bit storage: the matrix's (out, in) is what the config builds
            held[f"{name}.weight"] = weight_shape(module)
    mismatched = [
        f"{name}: {shape} (the config builds {built[name]})"
        for name, shape in held.items()
        if name in built and shape != built[name]
    ]
    if not mismatched:
        return
    why = (
        f"the merged {type(model).__name__}'s config builds other shapes than the merged model holds ("
        f"{'; '.join(mismatched[:3])}{' ...' if len(mismatched) > 3 else ''}): the family derives these sizes from the "
        "config fields the merge wrote"
    )
    warnings.warn(f"SCALE: this merged model cannot be saved as a standard checkpoint: {why}.")

    def save_pretrained(*args, **kwargs):
        raise ValueError(
            f"Cannot save this merged SCALE model as a checkpoint: {why}, so the checkpoint would not load. Use it in "
            "memory, or save the adapter (PeftModel.save_pretrained before merging)."
        )

    model.save_pretrained = save_pretrained
    model.push_to_hub = save_pretrained
