"""The continual-learning methods compared in the evidence experiments, built from one base causal LM.

Both experiments (``benchmarks/biography`` and ``benchmarks/continual_pretraining``) go through
``prepare_method``, so every method of a run starts from the same base weights with one shared set of sizes
(``MethodSizes``), and "what trains" is defined in this one place:

============== ======================================================================================================
``full``       every weight trains.
``lora``       PEFT LoRA on every attention and MLP projection (``q/k/v/o``, ``gate/up/down``), the linear maps full-
               width SCALE widens. Rank: the one whose trainable parameter count is closest to ``scale_adapt``'s at the
               same sizes (LoRA's count is linear in the rank, ``r * sum(in + out)``). ``lora_alpha = 2 r``.
``freeze``     the SCALE paper's baseline: the token embedding and the bottom ``preserve_layers`` decoder layers frozen,
               the rest (upper layers, final norm, LM head) trains. With tied embeddings the LM head *is* the embedding
               and stays frozen.
``llama_pro``  LLaMA Pro depth expansion (``benchmarks/llama_pro.py``): ``llama_pro_blocks`` identity-initialised
               block copies inserted evenly; only they train.
``scale_ffn``  ``ScaleConfig(ffn_expansion=...)``: FFN mode, new FFN neurons in every layer, every ``W12`` trainable.
``scale_*``    full width, ``ScaleConfig(hidden_expansion=..., ffn_expansion=..., variant=...)``; ``preserve`` (no
               ``W12``), ``adapt`` and ``route`` (``W12`` trainable above ``preserve_layers``; the paper's cosine rule).
``scale_ffn_routed``  FFN mode with the learned router (``router=RouterConfig(...)``): new neurons in the layers
               from ``preserve_layers`` up, gated per token by a router fitted before training.
``scale_routed``      full width (the ``scale_route`` body) with the learned router instead of the cosine rule.
============== ======================================================================================================

The two learned-route methods (``ROUTED_METHODS``) need ``fit_method_router`` (``peft_scale.fit_router``) after
``prepare_method`` and before training; the experiments choose the data of both sides.

At initialisation every method except ``full``/``freeze`` computes exactly the base model's logits (``full`` and
``freeze`` *are* the base model). SCALE-Route routes between its preservation and adaptation heads only in eval
mode (``ScaleConfig.route_in_training=False``): put the model in ``eval()`` before evaluating it.

Replay (old data mixed into the new) is a data-side choice, not a method: ``mix_with_replay``, the examples'
``text_blocks.replay_mix``.
"""

from __future__ import annotations

import copy
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

# Replay is the examples' recipe (datasets.interleave_datasets), one implementation for the examples and benchmarks.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from text_blocks import replay_mix as mix_with_replay  # noqa: E402



def autocast(device: torch.device, precision: str):
    """The context both experiments train and evaluate in: bf16 autocast over fp32 weights (``"bf16"``: matmuls run
    in bf16, AdamW updates of small learning rates survive in the fp32 weights), or plain fp32 (``"fp32"``)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"precision={precision!r}: choose 'fp32' or 'bf16'.")
    return nullcontext()


METHODS = ("full", "lora", "freeze", "llama_pro", "scale_ffn", "scale_preserve", "scale_adapt", "scale_route")
SCALE_VARIANTS = {"scale_preserve": "preserve", "scale_adapt": "adapt", "scale_route": "route"}
# Learned-route methods: the router must be fitted (fit_method_router) before the model trains or is evaluated.
ROUTED_METHODS = ("scale_ffn_routed", "scale_routed")
README_ROUTED_LR = 3e-3  # the learning rate the README's first routed example trains at (its *_defaults rows)
# The learned router's settings before peft-scale 0.2 (0.1.0's defaults; RouterConfig's differ): the rows measured
# before 0.2 name them, so that they stay the rows that were measured (RouterConfig's own defaults: the *_defaults rows)
ROUTER_0_1_0 = {"smoothing": 0.0, "gate": "hard", "preservation_copy": False, "calibrate_on": "held_out",
                "max_old_error": 0.01}  # fmt: skip
# ScaleConfig options that FFN mode rejects; MethodSizes.scale_options leaves them out of scale_ffn's config.
FULL_WIDTH_ONLY_OPTIONS = ("adapt_modules", "route_threshold", "route_in_training")
# The linear maps of a Llama-family decoder layer: what LoRA adapts and what full-width SCALE widens.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class MethodSizes:
    """One set of sizes shared by every method of a run.

    Args:
        ffn_expansion: new FFN neurons per layer (every SCALE method).
        hidden_expansion: ``d_up``, new residual-stream features of the full-width SCALE variants (a whole number of
            heads per key-value head times the head size).
        preserve_layers: SCALE-Adapt/Route: the bottom layers whose ``W12`` stay at zero; Freeze: the bottom layers
            that are frozen (the same "bottom layers are the base model's" budget for both).
        llama_pro_blocks: LLaMA Pro: number of copied blocks inserted (must divide the number of layers).
        scale_options: extra ``ScaleConfig`` fields for every ``scale_*`` method, for ablations (e.g.
            ``{"adapt_modules": "attention"}``, ``{"init": "normal"}``, ``{"route_threshold": 0.9}``); the routed
            methods' ``router`` (a ``RouterConfig`` or a dict of its fields; absent: ``RouterConfig()``).
    """

    ffn_expansion: int
    hidden_expansion: int
    preserve_layers: int
    llama_pro_blocks: int
    scale_options: dict = field(default_factory=dict)


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameter elements with ``requires_grad`` (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def scale_config(name: str, sizes: MethodSizes):
    """The ``ScaleConfig`` of a ``scale_*`` method."""
    import peft_scale  # noqa: F401  (registers SCALE with PEFT)
    from peft_scale import ScaleConfig

    routed = name in ROUTED_METHODS
    # the router is the routed methods' only: the others leave it out (one --scale-option set serves every method)
    options = {k: v for k, v in sizes.scale_options.items() if routed or k != "router"}
    if routed:  # a router makes the adapter a learned-route one (RouterConfig() when none is given)
        options = {"preserve_layers": sizes.preserve_layers, "router": {}, **options}
    if name in ("scale_ffn", "scale_ffn_routed"):
        options = {k: v for k, v in options.items() if k not in FULL_WIDTH_ONLY_OPTIONS}
        return ScaleConfig(ffn_expansion=sizes.ffn_expansion, **options)
    if name == "scale_routed":
        options = {k: v for k, v in options.items() if k not in ("route_threshold", "route_in_training")}
        return ScaleConfig(hidden_expansion=sizes.hidden_expansion, ffn_expansion=sizes.ffn_expansion, **options)
    return ScaleConfig(
        hidden_expansion=sizes.hidden_expansion,
        ffn_expansion=sizes.ffn_expansion,
        variant=SCALE_VARIANTS[name],
        preserve_layers=sizes.preserve_layers,
        **{"route_rule": "cosine", **options},  # scale_route is the paper's SCALE-Route: the cosine rule
    )


def lora_parameters_per_rank(model: nn.Module) -> int:
    """LoRA's trainable count at rank 1 on ``PROJECTIONS``: ``A`` is ``r x in``, ``B`` is ``out x r``."""
    return sum(
        module.in_features + module.out_features
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS
    )


def matching_lora_rank(model: nn.Module, sizes: MethodSizes) -> int:
    """The LoRA rank whose trainable count is closest to ``scale_adapt``'s at ``sizes`` (at least 1).

    ``scale_adapt`` is built on a copy of ``model`` to count its parameters exactly (embedding columns, norm gains
    and the LM head's new block included).
    """
    from peft import get_peft_model

    target = trainable_parameters(get_peft_model(copy.deepcopy(model), scale_config("scale_adapt", sizes)))
    return max(1, round(target / lora_parameters_per_rank(model)))


def _freeze_bottom(model: nn.Module, num_layers: int) -> nn.Module:
    for param in model.parameters():
        param.requires_grad_(True)
    frozen = [model.get_input_embeddings(), *model.model.layers[:num_layers]]
    for module in frozen:
        for param in module.parameters():
            param.requires_grad_(False)
    return model


def prepare_method(name: str, model: nn.Module, sizes: MethodSizes, adapter_name: str = "default") -> nn.Module:
    """Turn ``model`` (a Llama-family causal LM, modified in place: pass a copy) into method ``name``.

    Returns the model to train: a ``PeftModel`` for ``lora`` and ``scale_*`` (its adapter named ``adapter_name``),
    ``model`` itself otherwise, with ``requires_grad`` set on exactly the method's trainable parameters (see the
    module docstring). Evaluate ``scale_route`` in ``eval()`` mode, where it routes.
    """
    if name not in METHODS + ROUTED_METHODS:
        raise ValueError(f"Unknown method {name!r}: choose one of {list(METHODS + ROUTED_METHODS)}.")
    num_layers = model.config.num_hidden_layers
    if sizes.preserve_layers > num_layers:
        raise ValueError(f"MethodSizes.preserve_layers={sizes.preserve_layers} exceeds the model's {num_layers} layers.")

    if name == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    if name == "freeze":
        return _freeze_bottom(model, sizes.preserve_layers)
    if name == "llama_pro":
        from benchmarks.llama_pro import expand_depth

        return expand_depth(model, sizes.llama_pro_blocks)

    from peft import LoraConfig, get_peft_model

    if name == "lora":
        rank = matching_lora_rank(model, sizes)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(PROJECTIONS))
        return get_peft_model(model, config, adapter_name=adapter_name)
    return get_peft_model(model, scale_config(name, sizes), adapter_name=adapter_name)


def fit_method_router(model: nn.Module, new_data, old_data=None, **fit_kwargs):
    """Fit the learned router of a ``ROUTED_METHODS`` model (``peft_scale.fit_router``); returns its report.

    ``old_data=None`` samples the old side from the base model (``peft_scale.BaseModelSamples()``); the router's
    settings are the adapter's ``RouterConfig`` (``MethodSizes.scale_options["router"]``)."""
    from peft_scale import fit_router

    return fit_router(model, new_data, old_data, progress=False, **fit_kwargs)


__all__ = [
    "METHODS",
    "ROUTED_METHODS",
    "README_ROUTED_LR",
    "ROUTER_0_1_0",
    "fit_method_router",
    "MethodSizes",
    "PROJECTIONS",
    "lora_parameters_per_rank",
    "matching_lora_rank",
    "mix_with_replay",
    "prepare_method",
    "scale_config",
    "trainable_parameters",
]
