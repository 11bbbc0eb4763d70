"""The expansion plan: for every targeted module, how wide each side grows and which blocks exist.

The variants are a policy on one thing, the ``W12`` blocks (new -> original features):

- SCALE-Preserve: no ``W12`` anywhere; the original features are the base model's forever.
- SCALE-Adapt: ``W12`` in the layers from ``preserve_layers`` up, in ``adapt_modules``.
- SCALE-Route: Adapt's body, switched per token. Learned rule: every ``W12`` and the LM head's new block are
  gated by the router's decision. Cosine rule: the layers from ``preserve_layers`` up also carry a preservation
  copy of the original features (at evaluation, or always with ``route_in_training``), so the final norm can
  hand the LM head both the base model's hidden state and the adapted one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from .architectures import FFN_LAYOUTS, FULL_WIDTH_LAYOUTS, DecoderLayout, module_name_matches
from .config import ScaleConfig

ATTENTION_ROLES = ("query", "key_value", "attention_output")
FFN_ROLES = ("ffn_input", "ffn_output")
LINEAR_ROLES = ATTENTION_ROLES + FFN_ROLES  # the roles a ScaleLayer takes (the others: embedding, norms)


@dataclass(frozen=True)
class ModulePlan:
    role: str  # embedding | norm | final_norm | query | key_value | attention_output | ffn_input | ffn_output
    in_expansion: int = 0
    out_expansion: int = 0
    open_w12: bool = False
    preservation_copy: str = "off"  # does the input carry [x_pres; ...]: off | eval | always
    routing: str = "off"  # final norm only: emit both heads' inputs (cosine rule)
    route_gated: bool = False  # learned rule: the router's gate multiplies this module's W12 (or the head's P)


@dataclass(frozen=True)
class Widths:
    hidden: int  # d_up
    ffn: int  # I_up
    query: int  # new query features: whole heads, H_up * head_dim (= d_up)
    key_value: int  # new key/value features: KV_up * head_dim


def head_layout(model_config) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim) of a transformers config."""
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    return heads, kv_heads, head_dim


def expansion_widths(config: ScaleConfig, model_config) -> Widths:
    """The new widths, checking that ``hidden_expansion`` is whole heads in the base group ratio."""
    d_up = config.hidden_expansion
    if d_up == 0:
        return Widths(hidden=0, ffn=config.ffn_expansion, query=0, key_value=0)
    heads, kv_heads, head_dim = head_layout(model_config)
    step = head_dim * (heads // kv_heads)  # one new key/value head and its group of query heads
    if d_up % step:
        lower, upper = (d_up // step) * step, (d_up // step + 1) * step
        suggestion = f"{lower} or {upper}" if lower else f"{upper}"
        raise ValueError(
            f"hidden_expansion={d_up} does not fit the head layout: new features come as whole attention heads of "
            f"size {head_dim}, and under grouped-query attention ({heads} query heads over {kv_heads} key-value "
            f"heads) as whole groups of {heads // kv_heads} heads, i.e. multiples of {step}. Nearest valid sizes: "
            f"{suggestion}."
        )
    return Widths(hidden=d_up, ffn=config.ffn_expansion, query=d_up, key_value=d_up * kv_heads // heads)


def layer_index(key: str) -> Optional[int]:
    """The decoder-layer index in a module name (``model.layers.3.mlp.down_proj`` -> 3)."""
    match = re.search(r"\.(\d+)\.", f".{key}.")
    return int(match.group(1)) if match else None


def module_role(config: ScaleConfig, decoder: Optional[DecoderLayout], key: str) -> str:
    if decoder is not None:
        for role, names in (
            ("final_norm", [decoder.final_norm]),
            ("norm", decoder.norms),
            ("embedding", [decoder.embedding]),
            ("query", [decoder.query]),
            ("key_value", [decoder.key, decoder.value]),
            ("attention_output", [decoder.attention_output]),
        ):
            if module_name_matches(key, names):
                return role
    return "ffn_output" if module_name_matches(key, config.ffn_output_modules) else "ffn_input"


def plan_module(config: ScaleConfig, model_config, key: str, num_layers: Optional[int]) -> ModulePlan:
    """What SCALE does to the module called ``key``."""
    decoder = FULL_WIDTH_LAYOUTS.get(getattr(model_config, "model_type", None)) if config.hidden_expansion else None
    widths = expansion_widths(config, model_config) if config.hidden_expansion else Widths(0, config.ffn_expansion, 0, 0)
    role = module_role(config, decoder, key)
    index = layer_index(key)
    upper = (index or 0) >= config.preserve_layers  # at or above L_fp (a module outside any layer list counts as 0)
    route_mode = "always" if config.route_in_training else "eval"
    cosine = config.variant == "route" and config.route_rule == "cosine"
    learned = config.variant == "route" and config.route_rule == "learned"
    copy = route_mode if cosine and upper else "off"

    if role in ("embedding", "norm"):
        return ModulePlan(role, out_expansion=widths.hidden, preservation_copy=copy)
    if role == "final_norm":
        routed_layers = num_layers is not None and config.preserve_layers < num_layers
        copy = route_mode if cosine and routed_layers else "off"
        routing = route_mode if cosine else "off"
        return ModulePlan(
            role, out_expansion=widths.hidden, preservation_copy=copy, routing=routing, route_gated=learned
        )

    in_expansion, out_expansion = {
        "query": (widths.hidden, widths.query),
        "key_value": (widths.hidden, widths.key_value),
        "attention_output": (widths.query, widths.hidden),
        "ffn_input": (widths.hidden, widths.ffn),
        "ffn_output": (widths.ffn, widths.hidden),
    }[role]
    kind_open = config.adapt_modules == "all" or role in (
        ATTENTION_ROLES if config.adapt_modules == "attention" else FFN_ROLES
    )
    open_w12 = config.variant != "preserve" and upper and kind_open
    return ModulePlan(
        role, in_expansion, out_expansion, open_w12=open_w12, preservation_copy=copy, route_gated=learned and open_w12
    )


def full_width_targets(model_type: str) -> set[str]:
    return set(FFN_LAYOUTS[model_type].target_modules + FULL_WIDTH_LAYOUTS[model_type].target_modules)
