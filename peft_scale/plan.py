"""The expansion plan: for the whole model, built once per adapter (``plan_model``), how wide each side of every
targeted module grows and which blocks exist; and the whole-model checks that come before any module is touched
(``find_ffn_blocks``: every MLP is widened whole, with projections SCALE can read).

The variants are a policy on one thing, the ``W12`` blocks (new -> original features):

- SCALE-Preserve: no ``W12`` anywhere; the original features are the base model's forever.
- SCALE-Adapt: ``W12`` in the layers from ``preserve_layers`` up, in ``adapt_modules``.
- SCALE-Route: Adapt's body, switched per token. Learned rule: every ``W12`` and the LM head's new block are
  gated by the router's decision. Cosine rule: the layers from ``preserve_layers`` up also carry a frozen
  slice, a copy of the original features (at evaluation, or always with ``route_in_training``), so the final norm can
  hand the LM head both the base model's hidden state and the adapted one.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Optional

from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from torch import nn

from .architectures import (
    FFN_EXPANSION_MULTIPLES,
    FFN_LAYOUTS,
    FULL_WIDTH_LAYOUTS,
    FULL_WIDTH_REFUSED,
    LEARNED_ROUTE_REFUSED,
    DecoderLayout,
    module_name_matches,
)
from .config import ScaleConfig
from .experts import UnsupportedExperts, experts_layout
from .ffn_detection import join_split_mlps
from .quantized import check_layer, weight_shape

ATTENTION_ROLES = ("query", "key_value", "attention_output")
NORM_ROLES = ("norm", "query_norm", "key_norm", "final_norm")  # the roles a split norm takes (peft_scale.norm)
FFN_ROLES = ("ffn_input", "ffn_output")
LINEAR_ROLES = ATTENTION_ROLES + FFN_ROLES  # the roles a layer.Linear takes (the others: embedding, norms)


@dataclass(frozen=True)
class ModulePlan:
    # embedding | norm | query_norm | key_norm | final_norm | query | key_value | attention_output | ffn_input |
    # ffn_output
    role: str
    in_expansion: int = 0
    out_expansion: int = 0
    open_w12: bool = False
    frozen_slice: str = "off"  # cosine rule: does the input carry the frozen slice [x_pres; ...]: off | eval | always
    routing: str = "off"  # final norm only: emit both heads' inputs (cosine rule)
    route_gated: bool = False  # learned rule: the router's gate multiplies this module's W12 (or the head's P)
    out_parts: int = 1  # packed projections in the output (Phi-3's gate_up_proj: 2); linear roles only


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
            ("query_norm", [decoder.query_norm] if decoder.query_norm else []),
            ("key_norm", [decoder.key_norm] if decoder.key_norm else []),
            ("embedding", [decoder.embedding]),
            ("query", [decoder.query]),
            ("key_value", [decoder.key, decoder.value]),
            ("attention_output", [decoder.attention_output]),
        ):
            if module_name_matches(key, names):
                return role
    return "ffn_output" if module_name_matches(key, config.ffn_output_modules) else "ffn_input"


def config_model_type(model: nn.Module) -> Optional[str]:
    return getattr(getattr(model, "config", None), "model_type", None)


def fused_parts(config: ScaleConfig, key: str) -> int:
    """How many projections the module called ``key`` packs in its output (``ffn_fused_modules``; 1 if none)."""
    for name, parts in (config.ffn_fused_modules or {}).items():
        if module_name_matches(key, [name]):
            return parts
    return 1


@dataclass(frozen=True)
class ModelPlan:
    """What SCALE does to one model for one adapter, decided once: the widths, the decoder layout (full width), the
    number of layers and, for SCALE-Route, where routing starts. ``module(key)`` reads off one module's part.

    Build it with ``plan_model``, which also checks what can be checked from the config alone."""

    config: ScaleConfig
    widths: Widths
    decoder: Optional[DecoderLayout]  # full width only: the family's decoder layout
    num_layers: Optional[int]
    ffn_multiples: tuple[tuple[str, int], ...] = ()  # (MLP suffix, experts it holds): ``ffn_multiples``

    @property
    def route_mode(self) -> str:
        """When the cosine rule's frozen slice and two heads apply: ``"always"`` or ``"eval"``."""
        return "always" if self.config.route_in_training else "eval"

    @property
    def cosine(self) -> bool:
        return self.config.variant == "route" and self.config.route_rule == "cosine"

    @property
    def learned(self) -> bool:
        return self.config.variant == "route" and self.config.route_rule == "learned"

    @property
    def routed_layers(self) -> bool:
        """Whether any decoder layer is at or above ``preserve_layers`` (where routing starts)."""
        return self.num_layers is not None and self.config.preserve_layers < self.num_layers

    def role(self, key: str) -> str:
        return module_role(self.config, self.decoder, key)

    def module(self, key: str) -> ModulePlan:
        """What SCALE does to the module called ``key``."""
        config, widths = self.config, self.widths
        role = self.role(key)
        index = layer_index(key)
        upper = (index or 0) >= config.preserve_layers  # at or above L_fp (a module outside any layer list counts as 0)
        copy = self.route_mode if self.cosine and upper else "off"

        if role in ("embedding", "norm"):
            return ModulePlan(role, out_expansion=widths.hidden, frozen_slice=copy)
        if role in ("query_norm", "key_norm"):  # over a whole projection's output: split by its new features
            width = widths.query if role == "query_norm" else widths.key_value
            return ModulePlan(role, out_expansion=width, frozen_slice=copy)
        if role == "final_norm":
            copy = self.route_mode if self.cosine and self.routed_layers else "off"
            routing = self.route_mode if self.cosine else "off"
            return ModulePlan(
                role, out_expansion=widths.hidden, frozen_slice=copy, routing=routing, route_gated=self.learned
            )

        # an MLP holding several experts side by side gets ffn_expansion per expert (FFN_EXPANSION_MULTIPLES)
        ffn = widths.ffn * next(
            (count for suffix, count in self.ffn_multiples if module_name_matches(key.rpartition(".")[0], [suffix])), 1
        )
        in_expansion, out_expansion = {
            "query": (widths.hidden, widths.query),
            "key_value": (widths.hidden, widths.key_value),
            "attention_output": (widths.query, widths.hidden),
            "ffn_input": (widths.hidden, ffn),
            "ffn_output": (ffn, widths.hidden),
        }[role]
        kind_open = config.adapt_modules == "all" or role in (
            ATTENTION_ROLES if config.adapt_modules == "attention" else FFN_ROLES
        )
        open_w12 = config.variant != "preserve" and upper and kind_open
        return ModulePlan(
            role,
            in_expansion,
            out_expansion,
            open_w12=open_w12,
            frozen_slice=copy,
            route_gated=self.learned and open_w12,
            out_parts=fused_parts(config, key),
        )

    def experts_module(self, key: str) -> ModulePlan:
        """What SCALE does to the fused-experts module called ``key`` (``peft_scale.experts``): every expert gets
        ``ffn_expansion`` neurons, with ``W12`` (and the learned route's gate) as in an FFN output projection."""
        ffn = self.module(key)  # an FFN role: open_w12 and route_gated follow the FFN policy
        return replace(ffn, role="experts", in_expansion=self.widths.ffn, out_expansion=self.widths.ffn, out_parts=1)

    def find_ffn_blocks(self, model: nn.Module) -> list[list[int]]:
        """Group the matched modules by MLP (their parent module) and check each MLP is widened whole, and that every
        module to widen is a layer SCALE can read (``peft_scale.quantized.check_layer``). Run before any module is
        touched, so a bad config leaves the model as it was.

        Returns the distinct ``[input, intermediate]`` sizes of the matched FFNs.
        """
        config = self.config
        blocks: dict[str, dict[str, list]] = defaultdict(lambda: {"inputs": [], "outputs": []})
        tuner_layers = [name + "." for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
        linear = []  # (key, base layer) of every module that becomes a linear SCALE layer
        experts = {}  # key -> ExpertsLayout of every fused-experts module matched (its own whole FFN)
        for key, module in model.named_modules():
            if not key or any(key.startswith(prefix) for prefix in tuner_layers):
                continue
            if not check_target_module_exists(config, key):
                continue
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if self._matched_experts(key, base, experts):
                continue
            if self.role(key) in LINEAR_ROLES:
                linear.append((key, base))
            if config.hidden_expansion and not module_name_matches(key, FFN_LAYOUTS[config_model_type(model)].target_modules):
                continue  # full width: the attention, norms and embedding are checked by the head layout instead
            role = "outputs" if module_name_matches(key, config.ffn_output_modules) else "inputs"
            blocks[key.rpartition(".")[0]][role].append((key, base))

        blocks = join_split_mlps(blocks)
        if not blocks and not experts:
            linear_names = sorted({key.rpartition(".")[2] for key, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise ValueError(
                f"SCALE: no module of {type(model).__name__} matches target_modules={sorted(config.target_modules)}"
                f"{' (after exclude_modules / layers_to_transform)' if config.exclude_modules or config.layers_to_transform is not None else ''}. "
                f"Linear layers in this model are named: {linear_names}."
            )
        for parent, block in blocks.items():
            inputs, outputs = block["inputs"], block["outputs"]
            if len(outputs) != 1 or not inputs:
                raise ValueError(
                    f"SCALE widens each MLP whole: its input projections get new output rows and its one output "
                    f"projection gets the matching input columns. In {parent!r} the targets matched input projections "
                    f"{[k for k, _ in inputs]} and output projections {[k for k, _ in outputs]} "
                    f"(ffn_output_modules={config.ffn_output_modules}). Check target_modules, exclude_modules and "
                    "ffn_output_modules so that every MLP is matched with all of its projections or not at all."
                )
        for key, base in linear:
            check_layer(base, key)  # a Linear / Conv1D, plain or quantized by bitsandbytes
        shapes = {(layout.hidden, layout.intermediate) for layout in experts.values()}
        for block in blocks.values():
            inputs, outputs = block["inputs"], block["outputs"]
            out_key, out_module = outputs[0]
            hidden, intermediate = weight_shape(out_module)
            shapes.add((hidden, intermediate))
            for key, module in inputs:
                produced = weight_shape(module)[0]
                parts = fused_parts(config, key)
                if produced != parts * intermediate:
                    raise ValueError(
                        f"SCALE: {key!r} produces {produced} features but {out_key!r} reads {intermediate}"
                        f"{f' ({parts} packed projections expected)' if parts > 1 else ''}. They are not the input and "
                        "output of one FFN: check target_modules, ffn_output_modules and ffn_fused_modules."
                    )
        return sorted(map(list, shapes))


    def _matched_experts(self, key: str, base: nn.Module, experts: dict) -> bool:
        """Whether the matched module ``key`` is a fused-experts module (recorded in ``experts``; checked here: an
        experts module SCALE cannot read and full width are refused)."""
        try:
            layout = experts_layout(base)
        except UnsupportedExperts as error:
            raise ValueError(f"SCALE: target {key!r}: {error}") from None
        if layout is None:
            return False
        if self.config.hidden_expansion:
            raise ValueError(
                f"Full-width SCALE does not widen mixture-of-experts layers ({key!r}): use FFN mode (ffn_expansion "
                "alone), which widens every expert."
            )
        experts[key] = layout
        return True


def plan_model(config: ScaleConfig, model_config) -> ModelPlan:
    """The plan of the whole model for ``config`` (whose module names ``ScaleModel`` has filled in already).

    Checks, in this order: the learned route has layers to route above ``preserve_layers`` (and, in FFN mode, widens
    only the MLPs from there up: this sets ``config.layers_to_transform``), and ``hidden_expansion`` is whole heads.

    Raises:
        ValueError: either check fails; the message gives the valid values.
    """
    num_layers = getattr(model_config, "num_hidden_layers", None)
    if config.variant == "route" and config.route_rule == "learned":
        check_learned_route_family(getattr(model_config, "model_type", None))
        plan_learned_route(config, num_layers)
    widths = expansion_widths(config, model_config)  # raises if the width does not fit the head layout
    decoder = FULL_WIDTH_LAYOUTS.get(getattr(model_config, "model_type", None)) if config.hidden_expansion else None
    return ModelPlan(config, widths, decoder, num_layers, ffn_multiples(model_config))


def plan_module(config: ScaleConfig, model_config, key: str, num_layers: Optional[int]) -> ModulePlan:
    """What SCALE does to the module called ``key`` (one module of ``ModelPlan.module``; kept for callers of the
    per-module form). Unlike ``plan_model`` it changes nothing in ``config``."""
    decoder = FULL_WIDTH_LAYOUTS.get(getattr(model_config, "model_type", None)) if config.hidden_expansion else None
    widths = expansion_widths(config, model_config) if config.hidden_expansion else Widths(0, config.ffn_expansion, 0, 0)
    return ModelPlan(config, widths, decoder, num_layers, ffn_multiples(model_config)).module(key)


def ffn_multiples(model_config) -> tuple[tuple[str, int], ...]:
    """``(MLP suffix, number of experts)`` of the MLPs of this family that hold several experts' neurons side by side
    (``architectures.FFN_EXPANSION_MULTIPLES``): each of those experts gets ``ffn_expansion`` new neurons."""
    fields = FFN_EXPANSION_MULTIPLES.get(getattr(model_config, "model_type", None), {})
    return tuple((suffix, getattr(model_config, field)) for suffix, field in fields.items())


def plan_learned_route(config: ScaleConfig, num_layers: Optional[int]) -> None:
    """The learned router reads the stream entering layer ``preserve_layers``; check there is something above it to
    route, and in FFN mode widen only the MLPs from that layer up (a new neuron below it has no ``W12``, so it could
    never reach the output)."""
    if num_layers is not None and config.preserve_layers >= num_layers:
        raise ValueError(
            f"ScaleConfig(variant='route', preserve_layers={config.preserve_layers}) leaves nothing to widen: the "
            f"model has {num_layers} layers, and the learned route opens W12 from layer preserve_layers up. Choose "
            f"preserve_layers below {num_layers} (e.g. {num_layers // 3}: the router reads the stream entering that "
            "layer, where a third of the model has already contextualised each token)."
        )
    if config.hidden_expansion or num_layers is None:
        return
    upper = list(range(config.preserve_layers, num_layers))
    if config.layers_to_transform is None:
        config.layers_to_transform = upper
    elif not set(config.layers_to_transform) <= set(upper) or config.preserve_layers not in config.layers_to_transform:
        raise ValueError(
            f"ScaleConfig(variant='route', layers_to_transform={sorted(config.layers_to_transform)}): with the learned "
            f"route, the router reads the stream entering layer preserve_layers={config.preserve_layers}, and only "
            "layers from there up can be widened. Include that layer and none below it, or leave layers_to_transform "
            f"unset (it then widens layers {config.preserve_layers}-{num_layers - 1})."
        )


def full_width_targets(model_type: str) -> set[str]:
    return set(FFN_LAYOUTS[model_type].target_modules + FULL_WIDTH_LAYOUTS[model_type].target_modules)


def check_learned_route_family(model_type: Optional[str]) -> None:
    """Refuse, with the reason, a family the learned router cannot route (``LEARNED_ROUTE_REFUSED``).

    Raises:
        ValueError: it cannot; the message says why and what works instead.
    """
    if model_type in LEARNED_ROUTE_REFUSED:
        raise ValueError(
            f"SCALE's learned router (ScaleConfig(router=RouterConfig(...))) cannot route model_type {model_type!r}: "
            f"{LEARNED_ROUTE_REFUSED[model_type]}. Use FFN mode without a router (ScaleConfig(ffn_expansion=...), "
            "no router=), which widens this family's MLPs for every token."
        )


def check_full_width_family(model_type: Optional[str]) -> None:
    """Refuse, with the reason, a family whose decoder cannot be widened in full (``FULL_WIDTH_REFUSED``).

    Raises:
        ValueError: it cannot; the message says why and that FFN mode works.
    """
    if model_type in FULL_WIDTH_REFUSED:
        raise ValueError(
            f"Full-width SCALE (hidden_expansion > 0) cannot widen model_type {model_type!r}: "
            f"{FULL_WIDTH_REFUSED[model_type]}. Use FFN mode (ffn_expansion alone, hidden_expansion=0), which "
            "widens only the MLPs."
        )
