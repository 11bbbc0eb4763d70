"""SCALE-Route's installation: every routing hook of one ``ScaleModel``, installed per adapter, removed in one place.

Two rules decide, token by token, whether a token gets the widened model's computation or the base model's; this
module only installs them and keeps what they share:

- ``"learned"`` (the project's extension): a ``TokenRouter`` (``peft_scale.token_router``) per adapter, fitted once
  before training (``peft_scale.router_fitting.fit_router``), run by a forward pre-hook on decoder layer
  ``L = preserve_layers`` (``peft_scale.gate_hook``: where the decision is made and where it is applied), which
  turns its decisions into per-token gates on every contribution of the expansion to the original features.
  Several learned-route adapters active together share that hook and are routed jointly
  (``peft_scale.adapter_choice``).
- ``"cosine"`` (the paper's rule, full width only): a frozen slice of the original features enters at layer ``L``
  and hooks on the LM head route per token by ``cos(z_pres, z_adapt) >= tau`` (``peft_scale.cosine_routing``).

``Routing`` is owned by ``ScaleModel``. A learned router's numbers live in the first module it gates
(``layer.Linear.scale_router[adapter]``, inside the model, so that PEFT saves, loads and deletes it with its
adapter); ``Routing`` finds that module, installs one gate hook per decoder layer that routers read, and holds
what a forward pass shares: the gates in flight (``RouteGates``), the last pass's decisions (``RouteResult``,
``peft_scale.route_decisions``) and the smoothed routers' state along the sequence (``gate_hook.SequenceAverages``).
"""

from __future__ import annotations

import re
from typing import Optional

from torch import nn

from .cosine_routing import LMHeadRouter, PrependFrozenSlice
from .gate_hook import GateHook, SequenceAverages
from .route_decisions import RouteGates, RouteResult
from .token_router import TokenRouter


def decoder_layer_name(module_name: str, layer: int) -> Optional[str]:
    """``model.layers.10.mlp.down_proj`` -> ``model.layers.10`` for ``layer=10`` (``None`` for another layer)."""
    match = re.match(rf"^(.*?\.{layer})\.", module_name + ".")
    return match.group(1) if match else None


def router_site(model: nn.Module, consumers, layer: int) -> tuple[Optional[str], Optional[nn.Module]]:
    """``(name of decoder layer layer, the first gated module at or above it)`` where layer ``layer`` itself holds
    no gated module (a hybrid model's mamba or attention-only layer): the decoder layers are the ``nn.ModuleList``
    the gated modules' names index first. ``(None, None)`` where no gated module is at or above it."""
    found = []
    for name, module in consumers:
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part.isdigit() and isinstance(model.get_submodule(".".join(parts[:i])), nn.ModuleList):
                found.append((int(part), ".".join(parts[:i]), module))
                break
    above = [site for site in found if site[0] >= layer]
    if not above:
        return None, None
    _, layers, holder = min(above, key=lambda site: site[0])
    return f"{layers}.{layer}", holder


class Routing:
    """Every routing hook of one ``ScaleModel``: installed per adapter, removed in one place.

    Args:
        active_configs: returns the configs of the active adapters (for the cosine threshold).
        configs: returns every adapter's config, by name (to check a mix of active adapters).
    """

    def __init__(self, active_configs, configs) -> None:
        self.active_configs = active_configs
        self.configs = configs
        self.gates = RouteGates()
        self.last: Optional[RouteResult] = None
        # skip an FFN-mode adapter's products in an inference pass that sends it no token (``GateHook._idle``);
        # False computes them anyway (times the gate's zeros), e.g. to measure what the skip saves
        self.skip_idle = True
        self._handles: dict[str, list] = {}  # adapter -> its hook handles (a learned router's: in _layer_hooks)
        self._gate_hooks: dict[str, GateHook] = {}  # adapter -> the gate hook of the layer its router reads
        self._layer_hooks: dict[str, tuple[GateHook, object]] = {}  # decoder layer name -> (gate hook, handle)
        self._head_router: Optional[LMHeadRouter] = None
        # smoothed learned routers (``RouterConfig.smoothing > 0``): the 2-D attention_mask of the model call in flight
        # (captured by hooks on the whole model), and each adapter's moving average as the last cached call left it
        self.averages = SequenceAverages()

    def install(self, model: nn.Module, adapter_name: str, config, features: int, decoder) -> None:
        """Install the rule of ``config`` for ``adapter_name``. ``features``: ``d``, the original stream's width;
        ``decoder``: the family's ``DecoderLayout`` (full width; the learned rule finds layer ``preserve_layers``
        from the names of the modules it gates)."""
        layer = config.preserve_layers
        if config.route_rule == "cosine":
            self._install_cosine(model, adapter_name, config, features, decoder)
            return
        consumers = [
            (name, module)
            for name, module in model.named_modules()
            if adapter_name in getattr(module, "route_gated", {}) and module.route_gated[adapter_name]
        ]
        # the router lives in the first module it gates in layer L
        layer_name, holder = next(
            ((found, module) for name, module in consumers if (found := decoder_layer_name(name, layer)) is not None),
            (None, None),
        )
        if layer_name is None:  # layer L widens nothing (a hybrid's mamba layer): the first gated module above holds it
            layer_name, holder = router_site(model, consumers, layer)
        if layer_name is None:
            raise ValueError(
                f"SCALE: the learned router of adapter {adapter_name!r} reads the stream entering decoder layer "
                f"{layer} (preserve_layers), but no widened module was found in that layer or above it: set "
                "preserve_layers below the last layer with an FFN."
            )
        if adapter_name not in holder.scale_router:
            device = next(holder.get_base_layer().parameters()).device  # (an experts module has no .weight)
            holder.scale_router[adapter_name] = TokenRouter(features, config.router.hidden, device=device)
        if layer_name not in self._layer_hooks:  # one hook per layer: the routers reading it decide together
            layers = model.get_submodule(layer_name.rsplit(".", 1)[0])
            hook = GateHook(self, model.get_submodule(layer_name), layer, layers)
            handle = hook.layer.register_forward_pre_hook(hook, with_kwargs=True)
            self._layer_hooks[layer_name] = (hook, handle)
        hook = self._layer_hooks[layer_name][0]
        hook.holders[adapter_name] = holder
        self.averages.watch_model(model)  # (for RouterConfig.smoothing, which may be set on the config later)
        if config.hidden_expansion == 0:
            hook.ffn_only.add(adapter_name)
        self._handles[adapter_name] = []
        self._gate_hooks[adapter_name] = hook

    def _install_cosine(self, model, adapter_name, config, features, decoder) -> None:
        """The frozen slice enters at layer ``preserve_layers``; the LM head routes."""
        handles = []
        num_layers = len(model.get_submodule(decoder.layers))
        if config.preserve_layers < num_layers:
            layer = model.get_submodule(f"{decoder.layers}.{config.preserve_layers}")
            hook = PrependFrozenSlice(layer.get_submodule(decoder.input_norm), features)
            handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        if self._head_router is None:
            self._head_router = LMHeadRouter(model.get_output_embeddings(), self)
        self._handles[adapter_name] = handles

    def routers(self) -> dict[str, TokenRouter]:
        """Adapter name -> its learned router."""
        return {name: hook.holders[name].scale_router[name] for name, hook in self._gate_hooks.items()}

    def router_layer(self, adapter_name: str) -> nn.Module:
        """The decoder layer whose input the learned router of ``adapter_name`` reads."""
        if adapter_name not in self._gate_hooks:
            raise ValueError(f"SCALE: adapter {adapter_name!r} has no learned router (learned: {list(self._gate_hooks)}).")
        return self._gate_hooks[adapter_name].layer

    def remove(self, adapter_names=None) -> None:
        """Remove the hooks of ``adapter_names`` (default: all); the LM-head hooks go with the last adapter."""
        for name in list(self._handles if adapter_names is None else adapter_names):
            for handle in self._handles.pop(name, []):
                handle.remove()
            self.gates.gates.pop(name, None)
            self.averages.forget(name)
            hook = self._gate_hooks.pop(name, None)
            if hook is not None:
                hook.holders.pop(name, None)
                hook.ffn_only.discard(name)
        for layer_name, (hook, handle) in list(self._layer_hooks.items()):
            if not hook.holders:  # the last router reading this layer is gone
                handle.remove()
                hook.copy.remove()
                del self._layer_hooks[layer_name]
        if not self._gate_hooks:
            self.averages.unwatch()
        if not self._handles and self._head_router is not None:
            self._head_router.remove()
            self._head_router = None
