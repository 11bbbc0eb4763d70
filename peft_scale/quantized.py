"""What SCALE reads of a frozen base layer, quantized or not: its true shape, its weight as a float matrix, the
dtype of the new blocks, the wider quantized layer a merge builds, and the check that the quantization is supported.

Supported: plain ``nn.Linear`` / ``transformers`` ``Conv1D`` layers, and bitsandbytes ``Linear4bit`` (nf4 or fp4,
with or without double quantisation, as ``BitsAndBytesConfig(load_in_4bit=True)`` makes them) and ``Linear8bitLt``
(``load_in_8bit=True``). A quantized layer stores a packed weight (4-bit: ``(out * in / 2, 1)`` bytes; 8-bit: int8
rows and one scale per row), so nothing of SCALE may read ``layer.weight`` as the matrix ``W``:

- the sizes come from the layer's ``out_features`` / ``in_features`` (``weight_shape``);
- the SVD initialisation of ``W21`` and merging read the dequantised weight (``weight_rows``);
- the new blocks are created in fp32 next to the frozen quantized weight (``adapter_dtype``), as PEFT's LoRA
  creates its blocks on a bitsandbytes base;
- the forward pass calls the quantized layer itself for ``W x + b``, so the original output is exactly the
  quantized base model's.

Nothing here imports bitsandbytes unless a layer is a bitsandbytes layer (it is an optional extra:
``pip install "peft-scale[quant]"``).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

SUPPORTED = (
    "plain nn.Linear / transformers Conv1D layers in any float dtype, and bitsandbytes quantization: "
    "BitsAndBytesConfig(load_in_4bit=True) (Linear4bit: nf4 or fp4, with or without double quantisation) and "
    "BitsAndBytesConfig(load_in_8bit=True) (Linear8bitLt)"
)
# `config.quantization_config.quant_method` values SCALE accepts: bitsandbytes, and GGUF, whose weights transformers
# dequantises to float on load (a GGUF layer left packed is caught by `check_layer`)
SUPPORTED_QUANT_METHODS = ("bitsandbytes", "gguf")
# bitsandbytes' quantized parameter classes (by name, as PEFT checks them, so that bitsandbytes need not be imported)
_BNB_PARAMS = {"Params4bit": "4bit", "Int8Params": "8bit"}


def bnb_kind(layer: nn.Module) -> Optional[str]:
    """``"4bit"`` / ``"8bit"`` for a bitsandbytes layer whose weight is quantized, else ``None``.

    (An 8-bit layer made with ``has_fp16_weights=True`` keeps a float weight: it is read as a plain one.)"""
    weight = getattr(layer, "weight", None)
    kind = _BNB_PARAMS.get(type(weight).__name__)
    if kind is None or weight.dtype.is_floating_point:
        return None
    return kind


def weight_shape(layer: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a ``Linear`` (bitsandbytes included) or ``Conv1D``: the matrix ``W``'s shape,
    not the packed weight's."""
    if bnb_kind(layer) is not None:
        return layer.out_features, layer.in_features
    weight = layer.weight
    return tuple(weight.shape[::-1]) if isinstance(layer, Conv1D) else tuple(weight.shape)


def weight_rows(layer: nn.Module) -> torch.Tensor:
    """The weight as an ``(out_features, in_features)`` float matrix: a view of a plain layer's (``Conv1D``
    transposed), a dequantised copy of a bitsandbytes layer's (in the dtype it was quantized from, fp32 for
    8-bit). Read it; it is never written back."""
    kind = bnb_kind(layer)
    if kind is None:
        return layer.weight.T if isinstance(layer, Conv1D) else layer.weight
    import bitsandbytes as bnb

    weight = layer.weight
    if kind == "4bit":
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks a 4-bit weight for AVX512-BF16 CPUs at its first no-grad forward in eval mode;
            # undo it, in place, as its own save and device moves do
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            data, state = _convert_weight_packed_for_cpu_inverse(data, state)
            weight.data, weight.quant_state = data, state
        return bnb.functional.dequantize_4bit(data, state).reshape(layer.out_features, layer.in_features)
    # 8-bit: int8 rows times one scale per row; the scales move from the weight to the layer's state at its first
    # forward
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, scales.to(weight.device))


def has_quantized_layers(model: nn.Module) -> bool:
    """Whether any layer of ``model`` holds a bitsandbytes-quantized weight."""
    return any(bnb_kind(module) is not None for module in model.modules())


def adapter_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype of the new blocks: the base weight's, or fp32 next to a quantized weight."""
    return torch.float32 if bnb_kind(layer) is not None else layer.weight.dtype


def quantized_like(base: nn.Module, rows: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Module:
    """A bitsandbytes layer of ``base``'s kind and settings holding ``rows`` (``(out, in)``, float), quantized.

    This is how a merge writes the widened matrix back into a quantized model (dequantise, merge, requantise, as
    PEFT merges LoRA into a bitsandbytes layer). Requantising is not exact: 4-bit blocks run over the flattened
    rows, so a row that gains columns shifts every later block, and 8-bit scales are per row; the merged layer
    differs from the unmerged one by the quantization error of the new matrix (measured: docs/quantized.md)."""
    import bitsandbytes as bnb

    warnings.warn(
        "Merging SCALE into a bitsandbytes layer dequantises it, widens it and requantises it: the merged model "
        "differs from the unmerged one by the quantization error of the widened matrices (4-bit blocks shift when a "
        "row gains columns). For a lossless merge, load the adapter onto the full-precision base and merge there.",
        UserWarning,
        stacklevel=2,
    )
    out_features, in_features = rows.shape
    device = base.weight.device
    has_bias = bias is not None
    if bnb_kind(base) == "4bit":
        old = base.weight
        new = bnb.nn.Linear4bit(
            in_features, out_features, bias=has_bias, compute_dtype=base.compute_dtype,
            compress_statistics=old.compress_statistics, quant_type=old.quant_type, quant_storage=old.quant_storage,
            device="meta",
        )
        new.weight = bnb.nn.Params4bit(
            rows.detach().to("cpu").contiguous(), requires_grad=False, blocksize=old.blocksize,
            compress_statistics=old.compress_statistics, quant_type=old.quant_type, quant_storage=old.quant_storage,
            module=new,
        ).to(device)
    else:
        new = bnb.nn.Linear8bitLt(
            in_features, out_features, bias=has_bias, has_fp16_weights=False, threshold=base.state.threshold,
            device="meta",
        )
        new.weight = bnb.nn.Int8Params(rows.detach().to("cpu").contiguous(), requires_grad=False).to(device)
    if has_bias:
        new.bias = nn.Parameter(bias.detach().contiguous(), requires_grad=False)
    return new.train(base.training)


# --------------------------------------------------------------------------------------------------- checking


def quant_method(model: nn.Module) -> Optional[str]:
    """The quantization method transformers recorded for ``model`` (``"bitsandbytes"``, ``"gptq"``, ``"awq"``,
    ``"torchao"``, ...), or ``None`` for a model it did not quantize."""
    config = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    if config is None:
        config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return None
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    return getattr(method, "value", method)


def check_model_quantization(model: nn.Module) -> None:
    """Raise if transformers quantized ``model`` with a method SCALE does not support."""
    method = quant_method(model)
    if method is not None and str(method) not in SUPPORTED_QUANT_METHODS:
        raise ValueError(
            f"SCALE cannot widen a model quantized with {method!r}: it must read each frozen layer's true shape and "
            f"dequantised weight. Supported: {SUPPORTED}. Load the model with "
            "quantization_config=BitsAndBytesConfig(load_in_4bit=True) (or load_in_8bit=True), or unquantized."
        )


def check_layer(layer: nn.Module, key: Optional[str] = None) -> None:
    """Raise if SCALE cannot widen ``layer`` (the module called ``key``): not a ``Linear``/``Conv1D``, or a weight
    quantized by something other than bitsandbytes (an integer weight, a tensor subclass such as torchao's)."""
    where = f" at {key!r}" if key else ""
    if not isinstance(layer, (nn.Linear, Conv1D)):
        raise TypeError(
            f"SCALE widens nn.Linear and transformers Conv1D layers, got {type(layer).__name__}{where} (from "
            f"{type(layer).__module__}). Supported: {SUPPORTED}. Remove this module from `target_modules`, or load "
            "the model with one of those."
        )
    if bnb_kind(layer) is not None:
        return
    weight = layer.weight
    module = type(weight).__module__
    plain = module == "torch" or module.startswith("torch.") or type(weight).__name__ in _BNB_PARAMS
    if not plain or not weight.dtype.is_floating_point or weight.dtype.itemsize < 2:  # int8, float8: scaled elsewhere
        raise TypeError(
            f"SCALE cannot widen {type(layer).__name__}{where}: its weight is a {module}.{type(weight).__name__} of "
            f"dtype {weight.dtype}, i.e. quantized or wrapped by something SCALE cannot read. Supported: {SUPPORTED}."
        )
