"""The cosine rule (the paper's SCALE-Route, full width only): per token, the base model's logits or the adapted ones,
chosen by how far the adapted model has turned away from the base model.

A *frozen slice* ``x_pres``, a copy of the original features, is prepended to the stream at the entry of layer
``L = preserve_layers`` (``PrependFrozenSlice``): ``[x; x_up] -> [x_pres; x; x_up]``. Only frozen base weights touch
it (every widened module computes ``[W x_pres + b; y; y_up]``, every split norm ``norm(x_pres)`` in front), so
after the last layer it is exactly the base model's hidden state. The final norm emits both heads' inputs
``[norm(x_pres); out]``, and hooks on the untouched LM head (``LMHeadRouter``) compute both logits in one call and
route per token (``route``)::

    logits_t = z_pres_t    where cos(z_pres_t, z_adapt_t) >= tau,    z_adapt_t elsewhere

No router parameters and no auxiliary loss: where the adapted model still agrees with the base model in direction,
the token gets exactly the base model's prediction. The slice and the two heads apply at evaluation, or always with
``ScaleConfig(route_in_training=True)`` (``mode_applies``); each module's ``frozen_slice[adapter]`` and the final
norm's ``routing[adapter]`` hold that mode (``peft_scale.plan``). (Not to be confused with the learned rule's
preservation copy, ``peft_scale.preservation_copy``, which stacks the base model's stream along the batch.)
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .route_decisions import RouteResult


def mode_applies(mode: str, training: bool) -> bool:
    """The cosine rule's modes (frozen slice, routing): ``"always"``, ``"eval"`` (when not training) or ``"off"``."""
    return mode == "always" or (mode == "eval" and not training)


def cosine_threshold(configs: list) -> float:
    """``tau`` of the cosine rule, from the active adapters' configs: its adapter must be active alone."""
    routes = [c for c in configs if c.variant == "route" and c.route_rule == "cosine"]
    if len(routes) != 1 or len(configs) != 1:
        raise RuntimeError(
            f"SCALE-Route with the cosine rule needs its adapter active alone; active: {len(configs)} adapters."
        )
    return routes[0].route_threshold


def route(preservation: torch.Tensor, adaptation: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: the preservation logits where ``cos(z_pres, z_adapt) >= threshold``, else the adaptation logits.

    No router parameters and no auxiliary loss: where the adapted model still agrees with the base model in
    direction, the token gets exactly the base model's prediction.
    """
    to_preservation = F.cosine_similarity(preservation.float(), adaptation.float(), dim=-1) >= threshold
    return torch.where(to_preservation.unsqueeze(-1), preservation, adaptation), to_preservation


class LMHeadRouter:
    """Hooks on the (untouched) LM head that turn ``[h_pres; h_adapt]`` into routed logits (the cosine rule).

    The final ``peft_scale.norm.RMSNorm`` emits twice the hidden width when routing applies. The pre-hook reshapes that to
    ``(..., 2, d)`` so the head computes both logits in one call; the forward hook applies ``route``. A
    hidden state of the plain width passes through untouched, so the hooks cost nothing when not routing.
    """

    def __init__(self, head: nn.Module, routing):
        self.hidden = head.weight.shape[1]
        self.routing = routing
        self._split = False  # set by the pre-hook for the call it reshaped
        self._handles = [
            head.register_forward_pre_hook(self._split_heads),
            head.register_forward_hook(self._route),
        ]

    def _split_heads(self, module, args):
        hidden = args[0]
        self._split = hidden.shape[-1] == 2 * self.hidden
        if not self._split:
            return None
        return (hidden.unflatten(-1, (2, self.hidden)), *args[1:])  # (..., 2, d): [h_pres, h_adapt]

    def _route(self, module, args, logits):
        if not self._split:
            return None
        self._split = False
        preservation, adaptation = logits.unbind(-2)
        routed, to_preservation = route(preservation, adaptation, cosine_threshold(self.routing.active_configs()))
        self.routing.last = RouteResult(to_preservation, preservation.detach(), adaptation.detach())
        return routed

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class PrependFrozenSlice:
    """Forward pre-hook of the first routed decoder layer: ``[x; x_up] -> [x_pres; x; x_up]``, the frozen slice.

    Below this layer no ``W12`` exists, so ``x`` is still exactly the base model's hidden state and can seed the
    frozen slice. The first SCALE module of the layer to read its input (the input norm, or a projection in a
    family without one) says whether the slice is wanted (``carries_frozen_slice``: route adapter active, mode).
    """

    def __init__(self, reader: nn.Module, features: int) -> None:
        self.reader = reader
        self.features = features  # d, the width of x

    def __call__(self, module, args, kwargs):
        if not self.reader.carries_frozen_slice():
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden = torch.cat([hidden[..., : self.features], hidden], dim=-1)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}


@contextmanager
def fused_lm_head(model: nn.Module):
    """TRL's fused LM head multiplies the backbone's last hidden state by ``lm_head.weight`` itself, so the
    cosine rule's hooks on the head never run: give it the adaptation path alone, at the base width (every module's
    frozen slice and two-head output switched off for the call). (The learned rule keeps the base width and needs
    nothing here.)"""
    saved = []
    for module in model.modules():
        for attr in ("frozen_slice", "routing"):
            modes = getattr(module, attr, None) if hasattr(module, "route_gated") else None
            if isinstance(modes, dict) and modes:
                saved.append((modes, dict(modes)))
                modes.update(dict.fromkeys(modes, "off"))
    try:
        yield
    finally:
        for modes, original in saved:
            modes.update(original)
