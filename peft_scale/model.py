"""``ScaleModel``: injects SCALE layers into a model and keeps the widened blocks in agreement."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import fields, replace
from typing import Optional

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .architectures import FFN_LAYOUTS, FULL_WIDTH_LAYOUTS, FfnLayout
from .config import ScaleConfig
from .embedding import Embedding
from .experts import (
    Experts,
    experts_layout,
    find_fused_experts,
    fused_expert_targets,
    merged_experts_size,
)
from .ffn_detection import DetectedFfn, find_ffn, hidden_size
from .layer import Linear, ScaleTunerLayer
from .merge import (
    check_mergeable,
    check_quantized_merge,
    merged_config_sizes,
    refuse_standard_checkpoint,
    refuse_unloadable_checkpoint,
)
from .norm import RMSNorm, split_norm_class
from .plan import (
    NORM_ROLES,
    ModelPlan,
    check_full_width_family,
    full_width_targets,
    fused_parts,
    plan_learned_route,
    plan_model,
)
from .plan import config_model_type  # noqa: F401  (was defined here; kept importable)
from .quantized import check_model_quantization
from .adapter_choice import check_routed_together, outranked_adapters
from .cosine_routing import fused_lm_head
from .route_decisions import RouteResult
from .routing import Routing


class ScaleModel(BaseTuner):
    """SCALE width expansion of a pre-trained model.

    FFN mode: every targeted MLP gets ``ffn_expansion`` new neurons (see ``peft_scale.layer.Linear``). Full width
    (``hidden_expansion > 0``): the embedding, every norm (``peft_scale.norm.RMSNorm``), attention (whole new heads) and the
    FFN widen together, and the final norm feeds the untouched LM head. The base weights are frozen; at
    initialisation the model computes exactly what the base model computes. ``peft_scale.plan`` decides, once
    per adapter for the whole model (``plan_model``), the widths and which ``W12`` blocks exist (the variant);
    ``peft_scale.merge`` holds the merge policy. This class injects the layers and keeps the adapters' books.

    Example::

        >>> import peft_scale
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_scale.ScaleConfig(ffn_expansion=64))
        >>> model.print_trainable_parameters()
    """

    prefix: str = "scale_"
    tuner_layer_cls = ScaleTunerLayer
    target_module_mapping = {model_type: layout.target_modules for model_type, layout in FFN_LAYOUTS.items()}

    # ------------------------------------------------------------------------------------------ injection

    def _prepare_adapter_config(
        self, peft_config: ScaleConfig, model_config: dict, expert_targets: tuple[str, ...] = ()
    ) -> ScaleConfig:
        """Fill in the module names: the family's FFN (``FFN_LAYOUTS``) and, on a mixture-of-experts model, its
        fused-experts modules (``expert_targets``, from ``peft_scale.experts.fused_expert_targets``; an experts module
        is its own whole FFN, so a model whose FFNs are all experts needs no ``ffn_output_modules``)."""
        model_type = model_config.get("model_type")
        layout: Optional[FfnLayout] = FFN_LAYOUTS.get(model_type)
        if peft_config.hidden_expansion:
            check_full_width_family(model_type)
            if model_type not in FULL_WIDTH_LAYOUTS:
                raise ValueError(
                    f"Full-width SCALE (hidden_expansion > 0) knows the decoder layout of {sorted(FULL_WIDTH_LAYOUTS)}, "
                    f"not of model_type {model_type!r}. For this architecture, use FFN mode (ffn_expansion alone)."
                )
            targets = full_width_targets(model_type)
            if peft_config.target_modules is not None and set(peft_config.target_modules) != targets:
                raise ValueError(
                    "Full-width SCALE widens every module that reads or writes the residual stream, so "
                    f"target_modules cannot be chosen (it is {sorted(targets)}); leave it unset."
                )
            if peft_config.layers_to_transform is not None or peft_config.exclude_modules:
                raise ValueError(
                    "Full-width SCALE widens the residual stream of every layer: layers_to_transform and "
                    "exclude_modules do not apply (use preserve_layers to keep the bottom layers' W12 at zero)."
                )
            peft_config.target_modules = targets
        num_layers = model_config.get("num_hidden_layers")
        if num_layers is not None and peft_config.preserve_layers > num_layers:
            raise ValueError(f"preserve_layers={peft_config.preserve_layers} exceeds the model's {num_layers} layers.")
        if layout is None and (peft_config.target_modules is None or peft_config.ffn_output_modules is None):
            layout = self._detected_layout(peft_config, experts_found=bool(expert_targets))
        if peft_config.target_modules is None:
            peft_config.target_modules = set(layout.target_modules if layout else ()) | set(expert_targets)
            peft_config.ffn_found_by = "table" if model_type in FFN_LAYOUTS else "shape"
        if peft_config.ffn_output_modules is None:
            if layout is None:  # every FFN of the model is a fused-experts module (its own whole FFN)
                peft_config.ffn_output_modules = []
            else:
                peft_config.ffn_output_modules = (
                    [layout.output_module] if isinstance(layout, FfnLayout) else list(layout.output_modules)
                )
        if peft_config.ffn_fused_modules is None:
            peft_config.ffn_fused_modules = dict(layout.fused_modules) if layout else {}
        return peft_config

    def _detected_layout(self, peft_config: ScaleConfig, experts_found: bool) -> Optional[DetectedFfn]:
        """The FFN found by its shape (``peft_scale.ffn_detection``), for a family the table does not list; ``None``
        when the model's only FFNs are fused-experts modules (``experts_found``)."""
        if peft_config.target_modules is not None:
            if experts_found:
                return None
            raise ValueError(
                f"SCALE: target_modules={sorted(peft_config.target_modules)} is set but ffn_output_modules is not, and "
                "this family is not in peft_scale.architectures.FFN_LAYOUTS: name the output projection(s) too, "
                "e.g. ffn_output_modules=['down_proj'], or leave both unset to find the FFN by its shape."
            )
        return find_ffn(self.model, experts_found=experts_found)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, state_dict=None, **kwargs) -> None:
        # The fields SCALE fills in (target modules, base FFN shapes, ...) describe this model. They are filled in on a
        # copy, so that the whole model is checked before the caller's object is touched; `_keep_passed_config` then
        # decides which object the adapter keeps.
        passed = self.peft_config[adapter_name]
        config = _callers_settings(passed)
        # the fused-experts modules: the names to target when none are given, else those of every experts module found
        # (one SCALE cannot read is refused by name when targeted: plan.find_ffn_blocks)
        if config.target_modules is None and not config.hidden_expansion:
            expert_targets = fused_expert_targets(model)
        else:
            expert_targets = tuple(name for names in find_fused_experts(model) for name in names)
        config = self._prepare_adapter_config(config, self.get_model_config(model), expert_targets)
        plan = plan_model(config, getattr(model, "config", None))  # the whole model's plan, checked from the config
        if _is_cosine_route(config) and any(_is_cosine_route(c) for n, c in self.peft_config.items() if n != adapter_name):
            raise ValueError(
                "Only one SCALE-Route adapter with the cosine rule per model: its hooks on the LM head serve one "
                "adapter (the learned rule has no such limit)."
            )
        if "_routing" not in self.__dict__:
            self._routing = Routing(self._active_configs, self._scale_configs)
        check_model_quantization(model)
        if state_dict is None:
            # Check the whole model before touching it, so a bad config leaves the model as it was.
            shapes = plan.find_ffn_blocks(model)
            if config.base_ffn_shapes is None:
                config.base_ffn_shapes = shapes
            elif sorted(map(list, config.base_ffn_shapes)) != shapes:
                raise ValueError(
                    f"This SCALE adapter was made for a base model whose FFNs have [input, intermediate] sizes "
                    f"{config.base_ffn_shapes}, but the FFNs of this {type(model).__name__} have {shapes}. Load the "
                    "adapter into the base model it was trained on"
                    f"{f' ({config.base_model_name_or_path!r})' if config.base_model_name_or_path else ''}."
                )
        shared = any(other is passed for name, other in self.peft_config.items() if name != adapter_name)
        self.peft_config[adapter_name] = config = _keep_passed_config(passed, config, shared)
        self._plans[adapter_name] = replace(plan, config=config)  # read by _create_and_replace, module by module
        super().inject_adapter(model, adapter_name, *args, state_dict=state_dict, **kwargs)
        if config.variant == "route":
            self._routing.install(model, adapter_name, config, hidden_size(model), plan.decoder)

    @property
    def _plans(self) -> dict[str, ModelPlan]:
        """Adapter name -> the ``ModelPlan`` its modules were built from."""
        return self.__dict__.setdefault("_scale_plans", {})

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        is_experts = isinstance(target, Experts) or experts_layout(target) is not None
        plan = self._plans[adapter_name]
        plan = plan.experts_module(current_key) if is_experts else plan.module(current_key)
        common = {"inference_mode": peft_config.inference_mode, "init_weights": peft_config.init_weights}
        if is_experts:  # a fused mixture-of-experts module (peft_scale.experts)
            cls, args = Experts, {
                "expansion": plan.out_expansion,
                "init": peft_config.init,
                "open_w12": plan.open_w12,
                "route_gated": plan.route_gated,
            }
        elif plan.role == "embedding":
            cls, args = Embedding, {"expansion": plan.out_expansion, "init": peft_config.init}
        elif plan.role in NORM_ROLES:
            base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
            cls = split_norm_class(base)  # RMSNorm-style or LayerNorm
            args = {"expansion": plan.out_expansion, "frozen_slice": plan.frozen_slice}
            if plan.role == "final_norm":
                args["routing"] = plan.routing
                args["route_gated"] = plan.route_gated
        else:
            cls, args = Linear, {
                "out_expansion": plan.out_expansion,
                "in_expansion": plan.in_expansion,
                "init": peft_config.init,
                "open_w12": plan.open_w12,
                "frozen_slice": plan.frozen_slice,
                "route_gated": plan.route_gated,
            }
        if isinstance(target, cls):
            target.update_layer(adapter_name, **args, **common)
            return
        if cls is Linear:
            args["out_parts"] = plan.out_parts
        if issubclass(cls, RMSNorm):
            args["final"] = plan.role == "final_norm"
        new_module = cls(target, adapter_name, **args, **common)
        if cls is not Embedding:
            new_module.route_gates = self._routing.gates
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        if isinstance(child, ScaleTunerLayer) and not isinstance(new_module, BaseTunerLayer):
            # Unloading: the module is already complete (merged: wider, or a SplitRMSNorm; unloaded: the pre-trained
            # layer); PEFT's version would copy the old base layer's weight onto it.
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    # -------------------------------------------------------------------------------------------- routing

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """PeftModel enters this around every forward pass, with the forward's keyword arguments."""
        if not kwargs.get("fused_lm_head") or "_routing" not in self.__dict__:
            yield
            return
        with fused_lm_head(self.model):
            yield

    def _active_configs(self) -> list[ScaleConfig]:
        return [self.peft_config[name] for name in self.active_adapters]

    def _scale_configs(self) -> dict[str, ScaleConfig]:
        return self.peft_config

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        """PEFT's ``set_adapter``, with one check first: several active adapters that include a learned-route adapter
        must all be learned-route adapters with one ``preserve_layers``, which are then routed together, per token
        (``peft_scale.adapter_choice.check_routed_together``; the model is left as it was when they are not)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        check_routed_together({name: self.peft_config[name] for name in names if name in self.peft_config})
        super().set_adapter(adapter_name, inference_mode=inference_mode)

    @property
    def scale_router(self) -> dict:
        """Adapter name -> ``TokenRouter`` of each learned-route adapter (``peft_scale.token_router``)."""
        routing = self.__dict__.get("_routing")
        return routing.routers() if routing is not None else {}

    def router_layer(self, adapter_name: str) -> nn.Module:
        """The decoder layer whose input (the base model's own stream) the learned router of ``adapter_name`` reads."""
        routing = self.__dict__.get("_routing")
        if routing is None:
            raise ValueError(f"SCALE: this model has no routed adapter, so {adapter_name!r} has no router layer.")
        return routing.router_layer(adapter_name)

    @property
    def last_routing(self) -> Optional[RouteResult]:
        """What the last routed forward pass decided, per token (SCALE-Route), else ``None``."""
        routing = self.__dict__.get("_routing")
        return routing.last if routing is not None else None

    def delete_adapter(self, adapter_name: str) -> None:
        if "_routing" in self.__dict__:
            self._routing.remove([adapter_name])
        super().delete_adapter(adapter_name)  # the router goes with the module that holds it
        self._plans.pop(adapter_name, None)
        # a router that outranked the deleted adapter's does not outrank a later adapter of the same name
        for config in self.peft_config.values():
            outranked = outranked_adapters(config)
            if adapter_name in outranked:
                config.router.outranks = [name for name in outranked if name != adapter_name]

    # ------------------------------------------------------------------------------------------- merging

    def _check_merge_allowed(self) -> None:
        """PEFT's checks, and: no full-width merge into a quantized base (``peft_scale.merge.check_quantized_merge``)."""
        super()._check_merge_allowed()
        check_quantized_merge([self.peft_config[name] for name in self.active_adapters], self.model)

    def _check_before_merging(self, adapter_names: Optional[list[str]], safe_merge: bool) -> list[ScaleConfig]:
        """The configs of the adapters to merge (default: the active ones), checked on the whole model before any
        module is merged: they exist, none is a route adapter (``check_mergeable``), and with ``safe_merge`` every
        block of every module is finite (PEFT's error; see ``ScaleTunerLayer.check_finite``)."""
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}.")  # as PEFT
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise ValueError(
                f"Cannot merge {unknown}: this model has no such adapter (it has {list(self.peft_config)})."
            )
        configs = [self.peft_config[name] for name in names]
        check_mergeable(configs)
        if safe_merge:
            for module in self.model.modules():
                if isinstance(module, ScaleTunerLayer):
                    for name in names:
                        module.check_finite(name)
        return configs

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """PEFT's ``merge_adapter``: every SCALE module swaps in its merged form (wider layers, a wider embedding, split
        norms), and ``unmerge_adapter`` swaps the pre-trained layers back, bit for bit. SCALE's checks come first."""
        self._check_before_merging(adapter_names, safe_merge)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        merging = self._check_before_merging(adapter_names, safe_merge) if merge else []
        new_sizes = []
        if merge and getattr(self.model, "config", None) is not None:
            new_sizes = merged_config_sizes(self.model, list(self.peft_config.values()), adapter_names)
        experts_size = merged_experts_size(self.model, adapter_names) if merge else None
        for _, config_field, new_size in new_sizes:
            if experts_size is not None and experts_size[0] == config_field and experts_size[1] != new_size:
                raise ValueError(
                    f"Cannot merge into a standard checkpoint: the dense MLPs and the experts share the config field "
                    f"{config_field!r} but would have sizes {new_size} and {experts_size[1]}. Keep the model unmerged "
                    "and save the adapter with save_pretrained."
                )
        if "_routing" in self.__dict__:
            self._routing.remove()
        model = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        for holder, config_field, new_size in new_sizes:  # the model's config or its text config
            setattr(holder, config_field, new_size)
        if experts_size is not None:
            setattr(model.config, *experts_size)
        if experts_size is not None or new_sizes:  # the merged config must build the merged shapes, or not be saved
            refuse_unloadable_checkpoint(model)
        if any(config.hidden_expansion for config in merging):
            refuse_standard_checkpoint(model)
        return model


# Kept importable from here under their old names (they moved to plan.py and merge.py).
_refuse_standard_checkpoint = refuse_standard_checkpoint
_fused_parts = fused_parts
_plan_learned_route = plan_learned_route


# On a config object SCALE filled in for a model: field -> the value the caller had set (not a dataclass field, so it
# is never saved).
_FILLED_IN = "_scale_filled_in"


def _callers_settings(config: ScaleConfig) -> ScaleConfig:
    """A copy of ``config`` with the fields SCALE filled in for a model back at the values the caller set."""
    settings = copy.deepcopy(config)
    for name, value in settings.__dict__.pop(_FILLED_IN, {}).items():
        setattr(settings, name, value)
    return settings


def _keep_passed_config(passed: ScaleConfig, filled: ScaleConfig, shared: bool) -> ScaleConfig:
    """The config object the adapter keeps: the one the caller passed, as in PEFT (``PeftModel.from_pretrained(...,
    config=cfg)`` holds ``cfg``, so later edits of ``cfg`` reach the model), with the fields SCALE filled in for this
    model (``filled``: filled in on the caller's settings) written into it.

    Unless SCALE must keep another object, ``filled`` (a copy):
    - ``passed`` already describes another model: one config object reused for a model from which other values follow
      (another architecture, other FFN sizes) would make the first model's config describe the second, which keeps the
      copy. Reused for a model from which the same values follow (reloading an adapter into the same base), ``passed``
      is kept, and both models hold it, as in PEFT.
    - ``shared``: another adapter of this model holds ``passed`` (``add_adapter(name, cfg)`` with the first adapter's
      ``cfg``). An adapter's config also records what was done to that adapter (``fit_router``'s ``router_report``),
      so two adapters of one model never share one object."""
    callers = _callers_settings(passed)
    derived = [f.name for f in fields(filled) if getattr(filled, f.name) != getattr(callers, f.name)]
    recorded = passed.__dict__.get(_FILLED_IN, {})
    describes_another = any(getattr(passed, name) != getattr(filled, name) for name in set(derived) | set(recorded))
    if shared or (recorded and describes_another):
        filled.__dict__[_FILLED_IN] = {name: copy.deepcopy(getattr(callers, name)) for name in derived}
        return filled
    for name in derived:
        if name not in recorded:
            recorded[name] = copy.deepcopy(getattr(callers, name))
        setattr(passed, name, getattr(filled, name))
    passed.__dict__[_FILLED_IN] = recorded
    return passed


def _is_cosine_route(config: ScaleConfig) -> bool:
    return config.variant == "route" and config.route_rule == "cosine"

