"""``ScaleModel``: injects SCALE layers into a model and keeps the widened blocks in agreement."""

from __future__ import annotations

import copy
from collections import defaultdict
from contextlib import contextmanager
from typing import Optional

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from torch import nn

from .architectures import FFN_LAYOUTS, FULL_WIDTH_LAYOUTS, INTERMEDIATE_SIZE_FIELDS, FfnLayout, module_name_matches
from .config import ScaleConfig
from .embedding import ScaleEmbedding
from .layer import ScaleLayer, ScaleTunerLayer
from .norm import ScaleNorm
from .plan import LINEAR_ROLES, expansion_widths, full_width_targets, module_role, plan_module
from .quantized import check_layer, check_model_quantization, has_quantized_layers, weight_shape
from .routing import RouteResult, Routing, check_routed_together


def _unknown_architecture_error(model_type: str, missing: str) -> ValueError:
    known = ", ".join(sorted(FFN_LAYOUTS))
    return ValueError(
        f"SCALE does not know where the FFN of model_type {model_type!r} is, so it cannot choose `{missing}`. "
        "Name the FFN projections yourself: for an MLP `down(act(gate(x)) * up(x))`, use "
        "ScaleConfig(ffn_expansion=..., target_modules=['gate', 'up', 'down'], ffn_output_modules=['down']) "
        "with your model's module names (add ffn_fused_modules={'gate_up': 2} for a fused [gate; up] projection). "
        f"Architectures with a built-in layout: {known}."
    )


class ScaleModel(BaseTuner):
    """SCALE width expansion of a pre-trained model.

    FFN mode: every targeted MLP gets ``ffn_expansion`` new neurons (see ``ScaleLayer``). Full width
    (``hidden_expansion > 0``): the embedding, every norm (``ScaleNorm``), attention (whole new heads) and the
    FFN widen together, and the final norm feeds the untouched LM head. The base weights are frozen; at
    initialisation the model computes exactly what the base model computes. ``peft_scale.plan`` decides, module
    by module, the widths and which ``W12`` blocks exist (the variant).

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

    def _prepare_adapter_config(self, peft_config: ScaleConfig, model_config: dict) -> ScaleConfig:
        model_type = model_config.get("model_type")
        layout: Optional[FfnLayout] = FFN_LAYOUTS.get(model_type)
        if peft_config.hidden_expansion:
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
        if peft_config.target_modules is None:
            if layout is None:
                raise _unknown_architecture_error(model_type, "target_modules")
            peft_config.target_modules = set(layout.target_modules)
        if peft_config.ffn_output_modules is None:
            if layout is None:
                raise _unknown_architecture_error(model_type, "ffn_output_modules")
            peft_config.ffn_output_modules = [layout.output_module]
        if peft_config.ffn_fused_modules is None:
            peft_config.ffn_fused_modules = dict(layout.fused_modules) if layout else {}
        return peft_config

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, state_dict=None, **kwargs) -> None:
        # Work on a copy: the fields filled in below describe this model, and the caller may reuse its config object
        # for another one.
        config = copy.deepcopy(self.peft_config[adapter_name])
        self.peft_config[adapter_name] = config
        config = self._prepare_adapter_config(config, self.get_model_config(model))
        if config.variant == "route" and config.route_rule == "learned":
            _plan_learned_route(config, getattr(getattr(model, "config", None), "num_hidden_layers", None))
        if config.hidden_expansion:
            expansion_widths(config, model.config)  # raises if the width does not fit the head layout
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
            shapes = self._find_ffn_blocks(model, config)
            if config.base_ffn_shapes is None:
                config.base_ffn_shapes = shapes
            elif sorted(map(list, config.base_ffn_shapes)) != shapes:
                raise ValueError(
                    f"This SCALE adapter was made for a base model whose FFNs have [input, intermediate] sizes "
                    f"{config.base_ffn_shapes}, but the FFNs of this {type(model).__name__} have {shapes}. Load the "
                    "adapter into the base model it was trained on"
                    f"{f' ({config.base_model_name_or_path!r})' if config.base_model_name_or_path else ''}."
                )
        super().inject_adapter(model, adapter_name, *args, state_dict=state_dict, **kwargs)
        if config.variant == "route":
            decoder = FULL_WIDTH_LAYOUTS.get(config_model_type(model)) if config.hidden_expansion else None
            self._routing.install(
                model, adapter_name, config, model.config.hidden_size, decoder.layers if decoder else None
            )

    @staticmethod
    def _find_ffn_blocks(model: nn.Module, config: ScaleConfig) -> list[list[int]]:
        """Group the matched modules by MLP (their parent module) and check each MLP is widened whole, and that every
        module to widen is a layer SCALE can read (``peft_scale.quantized.check_layer``).

        Returns the distinct ``[input, intermediate]`` sizes of the matched FFNs.
        """
        blocks: dict[str, dict[str, list]] = defaultdict(lambda: {"inputs": [], "outputs": []})
        tuner_layers = [name + "." for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
        decoder = FULL_WIDTH_LAYOUTS.get(config_model_type(model)) if config.hidden_expansion else None
        linear = []  # (key, base layer) of every module that becomes a ScaleLayer
        for key, module in model.named_modules():
            if not key or any(key.startswith(prefix) for prefix in tuner_layers):
                continue
            if not check_target_module_exists(config, key):
                continue
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if module_role(config, decoder, key) in LINEAR_ROLES:
                linear.append((key, base))
            if config.hidden_expansion and not module_name_matches(key, FFN_LAYOUTS[config_model_type(model)].target_modules):
                continue  # full width: the attention, norms and embedding are checked by the head layout instead
            role = "outputs" if module_name_matches(key, config.ffn_output_modules) else "inputs"
            blocks[key.rpartition(".")[0]][role].append((key, base))

        if not blocks:
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
        shapes = set()
        for block in blocks.values():
            inputs, outputs = block["inputs"], block["outputs"]
            out_key, out_module = outputs[0]
            hidden, intermediate = weight_shape(out_module)
            shapes.add((hidden, intermediate))
            for key, module in inputs:
                produced = weight_shape(module)[0]
                parts = _fused_parts(config, key)
                if produced != parts * intermediate:
                    raise ValueError(
                        f"SCALE: {key!r} produces {produced} features but {out_key!r} reads {intermediate}"
                        f"{f' ({parts} packed projections expected)' if parts > 1 else ''}. They are not the input and "
                        "output of one FFN: check target_modules, ffn_output_modules and ffn_fused_modules."
                    )
        return sorted(map(list, shapes))

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        plan = plan_module(peft_config, getattr(self.model, "config", None), current_key, self._num_layers())
        common = {"inference_mode": peft_config.inference_mode}
        if plan.role == "embedding":
            cls, args = ScaleEmbedding, {"expansion": plan.out_expansion, "init": peft_config.init}
        elif plan.role in ("norm", "final_norm"):
            cls, args = ScaleNorm, {"expansion": plan.out_expansion, "preservation_copy": plan.preservation_copy}
            if plan.role == "final_norm":
                args["routing"] = plan.routing
                args["route_gated"] = plan.route_gated
        else:
            cls, args = ScaleLayer, {
                "out_expansion": plan.out_expansion,
                "in_expansion": plan.in_expansion,
                "init": peft_config.init,
                "open_w12": plan.open_w12,
                "preservation_copy": plan.preservation_copy,
                "route_gated": plan.route_gated,
            }
        if isinstance(target, cls):
            target.update_layer(adapter_name, **args, **common)
            return
        if cls is ScaleLayer:
            args["out_parts"] = _fused_parts(peft_config, current_key)
        if cls is ScaleNorm:
            args["final"] = plan.role == "final_norm"
        new_module = cls(target, adapter_name, **args, **common)
        if cls is not ScaleEmbedding:
            new_module.route_gates = self._routing.gates
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        if isinstance(child, (ScaleEmbedding, ScaleNorm)) and not isinstance(new_module, BaseTunerLayer):
            # Unloading: the module is already complete (a merged, wider embedding or a SplitRMSNorm); PEFT's
            # version would copy the old base layer's weight onto it.
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def _num_layers(self) -> Optional[int]:
        return getattr(getattr(self.model, "config", None), "num_hidden_layers", None)

    # -------------------------------------------------------------------------------------------- routing

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """PeftModel enters this around every forward pass, with the forward's keyword arguments."""
        if not kwargs.get("fused_lm_head") or "_routing" not in self.__dict__:
            yield
            return
        with self._routing.fused_lm_head(self.model):
            yield

    def _active_configs(self) -> list[ScaleConfig]:
        return [self.peft_config[name] for name in self.active_adapters]

    def _scale_configs(self) -> dict[str, ScaleConfig]:
        return self.peft_config

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        """PEFT's ``set_adapter``, with one check first: several active adapters that include a learned-route adapter
        must all be learned-route adapters with one ``preserve_layers``, which are then routed together, per token
        (``peft_scale.routing.check_routed_together``; the model is left as it was when they are not)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        check_routed_together({name: self.peft_config[name] for name in names if name in self.peft_config})
        super().set_adapter(adapter_name, inference_mode=inference_mode)

    @property
    def scale_router(self) -> dict:
        """Adapter name -> ``TokenRouter`` of each learned-route adapter (``peft_scale.routing``)."""
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

    # ------------------------------------------------------------------------------------------- merging

    def _check_merge_allowed(self) -> None:
        """PEFT's checks, and: no full-width merge into a quantized base (``merge_adapter`` and ``merge_and_unload``).

        Merging requantises every widened projection, and in full width that is every projection of the model, each
        with new input columns that shift its 4-bit blocks over the original weights: on a tiny Llama the merged
        logits moved by up to 5x what quantizing the base had cost (FFN mode: below it, so FFN adapters merge)."""
        super()._check_merge_allowed()
        if any(self.peft_config[name].hidden_expansion for name in self.active_adapters) and has_quantized_layers(
            self.model
        ):
            raise ValueError(
                "Cannot merge a full-width SCALE adapter into a bitsandbytes-quantized base: every widened projection "
                "would be requantised with the original weights in new blocks, which moves the logits by several times "
                "what quantizing the base cost (a merged full-width model is for use in memory only anyway). Keep it "
                "unmerged, or merge it on the full-precision base: "
                "PeftModel.from_pretrained(full_precision_base, adapter_folder).merge_and_unload()."
            )

    def _output_layers(self) -> list[tuple[str, nn.Module]]:
        """Every FFN output projection of the model, widened or not (names from all adapters' configs)."""
        names = {name for config in self.peft_config.values() for name in (config.ffn_output_modules or [])}
        return [
            (key, module)
            for key, module in self.model.named_modules()
            if isinstance(module, (nn.Linear, ScaleLayer)) and module_name_matches(key, names)
        ]

    def _merged_intermediate_sizes(self, adapter_names: Optional[list[str]]) -> dict[str, int]:
        sizes = {}
        for key, module in self._output_layers():
            if isinstance(module, ScaleLayer):
                merging = adapter_names if adapter_names is not None else module.active_adapters
                merging = set(merging) | set(module.merged_adapters)
                sizes[key] = module.in_features + sum(module.in_expansion.get(name, 0) for name in merging)
            else:
                sizes[key] = weight_shape(module)[1]
        return sizes

    def _intermediate_size_field(self) -> Optional[str]:
        config = getattr(self.model, "config", None)
        if config is None:
            return None
        layout = FFN_LAYOUTS.get(getattr(config, "model_type", None))
        if layout is not None:
            return layout.size_field
        return next((name for name in INTERMEDIATE_SIZE_FIELDS if hasattr(config, name)), None)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        merging = [self.peft_config[name] for name in (adapter_names or self.active_adapters)] if merge else []
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
        config_field = self._intermediate_size_field()
        new_size = None
        if merge and getattr(self.model, "config", None) is not None:
            sizes = self._merged_intermediate_sizes(adapter_names)
            if len(set(sizes.values())) > 1:
                by_size = defaultdict(list)
                for key, size in sizes.items():
                    by_size[size].append(key)
                summary = "; ".join(f"{size}: {len(keys)} layers, e.g. {keys[0]!r}" for size, keys in by_size.items())
                raise ValueError(
                    "Cannot merge into a standard checkpoint: the merged FFNs would have different intermediate sizes "
                    f"({summary}), and a {type(self.model.config).__name__} holds one size for all layers. Widen "
                    "every layer (drop layers_to_transform / exclude_modules), or keep the model unmerged and save "
                    "the adapter with save_pretrained."
                )
            if sizes and config_field is None:
                raise ValueError(
                    f"Cannot merge: SCALE does not know which field of {type(self.model.config).__name__} holds the "
                    f"intermediate size (tried {list(INTERMEDIATE_SIZE_FIELDS)}). Add the architecture to "
                    "peft_scale.architectures.FFN_LAYOUTS."
                )
            new_size = next(iter(sizes.values()), None)
        elif not merge:
            # unload() gives back the pre-trained model: undo merges first so that every layer has its old shape.
            for module in self.model.modules():
                if isinstance(module, ScaleLayer) and module.merged:
                    module.unmerge()
        if "_routing" in self.__dict__:
            self._routing.remove()
        model = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        if new_size is not None:
            setattr(model.config, config_field, new_size)
        if any(config.hidden_expansion for config in merging):
            _refuse_standard_checkpoint(model)
        return model


def config_model_type(model: nn.Module) -> Optional[str]:
    return getattr(getattr(model, "config", None), "model_type", None)


def _refuse_standard_checkpoint(model: nn.Module) -> None:
    """A merged full-width model keeps split norms: no checkpoint of its architecture can hold it."""
    architecture = type(model).__name__

    def save_pretrained(*args, **kwargs):
        raise ValueError(
            f"This merged full-width SCALE model cannot be saved as a {architecture} checkpoint: its norms normalise "
            "the original and the new features separately (SplitRMSNorm), which the architecture's config cannot "
            "express, so the checkpoint would not load. Use it in memory for fast inference, and save the adapter "
            "instead: PeftModel.save_pretrained before merging."
        )

    model.save_pretrained = save_pretrained
    model.push_to_hub = save_pretrained


def _fused_parts(config: ScaleConfig, key: str) -> int:
    for name, parts in (config.ffn_fused_modules or {}).items():
        if module_name_matches(key, [name]):
            return parts
    return 1



def _is_cosine_route(config: ScaleConfig) -> bool:
    return config.variant == "route" and config.route_rule == "cosine"


def _plan_learned_route(config: ScaleConfig, num_layers: Optional[int]) -> None:
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
