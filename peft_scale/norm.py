"""Split normalisation for a widened residual stream."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layer import ScaleTunerLayer, init_like_linear


def rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as Llama computes it: statistics in fp32, gain applied in the input dtype."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return gain * x.to(dtype)


def layer_norm(x: torch.Tensor, gain: torch.Tensor, bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension, as ``nn.LayerNorm`` computes it."""
    return F.layer_norm(x, (x.shape[-1],), gain.to(x.dtype), None if bias is None else bias.to(x.dtype), eps)


@torch.no_grad()
def effective_gain(norm: nn.Module, eps: float) -> torch.Tensor:
    """The per-feature gain an RMSNorm-style layer applies, read off its output on a row of ones (whose mean square
    is 1): ``w`` for Llama's RMSNorm, ``1 + w`` for Gemma's, whatever the family's convention."""
    weight = norm.weight
    ones = torch.ones(1, weight.shape[0], device=weight.device, dtype=weight.dtype)
    return norm(ones)[0].float() * math.sqrt(1 + eps)


def norm_epsilon(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        if isinstance(getattr(norm, name, None), float):
            return getattr(norm, name)
    raise TypeError(f"Cannot find the epsilon of {type(norm).__name__}; SCALE splits RMSNorm-style layers only.")


class RMSNorm(nn.Module, ScaleTunerLayer):
    """An RMSNorm over the widened stream ``[x; x_up]``, normalising each slice on its own.

        out = [ norm(x) ; rms(x_up) * g_up ]

    ``norm(x)`` is the base layer applied to the original slice alone, with its own weights: normalising
    over ``[x; x_up]`` together would let the new features change the original ones through the shared
    statistic, and the original computation would be lost (the method note's preservation condition 1).
    The new slice gets its own statistic and its own trainable gain ``g_up`` (``scale_gain``), which starts
    at the mean of the base's *effective* gain (``effective_gain``) so the new features enter at the scale of the
    old ones. The gain is a plain one, ``rms(x_up) * g_up``, whatever the base's convention: Gemma's norms compute
    ``x (1 + w)``, and there ``g_up`` starts at the mean of ``1 + w`` (a plain gain is what the merged
    ``SplitRMSNorm`` holds, and needs no family knowledge).

    The same split serves every norm of the residual stream, in front of a sublayer or on its output before the
    residual addition (Gemma 2/3, OLMo 2), and OLMo 2's query/key norms over the whole projection width (there the
    new slice is the new heads' features). ``LayerNorm`` below is the split for ``nn.LayerNorm``.

    The *final* norm also feeds the untouched LM head (``final=True``). It returns the base width::

        out = norm(x) + P rms(x_up) g_up,       logits = W_out out = W_out norm(x) + (W_out P) rms(x_up) g_up

    i.e. the LM head's new block is ``W_out_up = W_out P`` (``scale_head`` is ``P``, ``d x d_up``, zero at
    initialisation). The head module is never wrapped, so TRL's fused LM head, which multiplies the last hidden
    state by ``lm_head.weight`` directly, still works.

    With the learned route (``route_gated[adapter]``), the new block is gated per token by the router's gate (0/1,
    or in ``[0, 1]`` with a soft gate): ``out = norm(x) + g P rms(x_up) g_up``, so a token routed to the base model
    gets the base model's logits.

    With the frozen slice (SCALE-Route, cosine rule) the input is ``[x_pres; x; x_up]`` and the output gains
    ``norm(x_pres)`` in front. When ``routing`` applies, the final norm returns ``[norm(x_pres); out]`` (twice
    the base width) and the LM-head hooks of ``peft_scale.cosine_routing`` turn that into the two heads' logits.

    Args:
        base_layer: the model's RMSNorm (weight ``d``, epsilon).
        adapter_name: name of the first adapter.
        expansion: ``d_up``, the width of the new slice.
        final: whether this is the norm in front of the LM head.
        init_weights: ``False`` draws ``P`` at random instead of zero (``ScaleConfig.init_weights``).
    """

    adapter_layer_names = ("scale_gain", "scale_head")
    other_param_names = ("expansion", "frozen_slice", "routing", "route_gated")
    _kind = "norm"

    def __init__(self, base_layer: nn.Module, adapter_name: str, expansion: int, final: bool = False, **kwargs):
        super().__init__()
        self._init_tuner_state(base_layer, adapter_name)
        self.features = base_layer.weight.shape[0]
        self.eps = norm_epsilon(base_layer)
        self.final = final
        self.scale_gain = nn.ParameterDict()
        self.scale_head = nn.ParameterDict()
        self.expansion: dict[str, int] = {}
        self.frozen_slice: dict[str, str] = {}
        self.routing: dict[str, str] = {}
        self.route_gated: dict[str, bool] = {}
        self.update_layer(adapter_name, expansion, **kwargs)

    def update_layer(
        self,
        adapter_name: str,
        expansion: int,
        frozen_slice: str = "off",
        routing: str = "off",
        route_gated: bool = False,
        init_weights: bool = True,
        inference_mode=False,
    ) -> None:
        weight = self.base_layer.weight
        self.scale_gain[adapter_name] = nn.Parameter(torch.empty(expansion, device=weight.device, dtype=weight.dtype))
        if self.final:
            self.scale_head[adapter_name] = nn.Parameter(
                torch.empty(self.features, expansion, device=weight.device, dtype=weight.dtype)
            )
        self.expansion[adapter_name] = expansion
        self.frozen_slice[adapter_name] = frozen_slice
        self.routing[adapter_name] = routing
        self.route_gated[adapter_name] = bool(route_gated and self.final)
        self.reset_scale_parameters(adapter_name, init_weights)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def reset_scale_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        """``g_up`` at the mean base gain; ``P`` at zero, or with ``init_weights=False`` drawn like ``W12`` (as a fresh
        ``nn.Linear`` over the widened stream ``d + d_up`` draws its weight; ``ScaleConfig.init_weights``)."""
        gain = self.scale_gain[adapter_name]
        if self._materialised(gain):
            gain.fill_(self._base_gain().mean().item())
        if adapter_name in self.scale_head:
            self.scale_head[adapter_name].zero_()  # zero: the logits start as the base model's
            if not init_weights:
                init_like_linear(self.scale_head[adapter_name], self.features + self.expansion[adapter_name])

    def _base_gain(self) -> torch.Tensor:
        return effective_gain(self.base_layer, self.eps)

    def _normalise_new(self, name: str, x_up: torch.Tensor) -> torch.Tensor:
        """The new slice of adapter ``name``: ``rms(x_up) * g_up``."""
        return rms_norm(x_up, self.scale_gain[name], self.eps)

    def routes(self) -> bool:
        """Whether this final norm emits both heads' inputs ``[norm(x_pres); out]``."""
        return self.final and self._mode_applies(self.routing)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()
        active = self._active_scale_adapters()
        if self.disable_adapters or not active or self.merged:
            return self.base_layer(x, *args, **kwargs)  # merged: a SplitRMSNorm over the adapters merged
        copy = self.carries_frozen_slice()
        widths = self._check_stream(x, self.features, copy, {name: self.expansion[name] for name in active})
        x_pres, x, x_ups = self._split_stream(x, widths, copy)
        preserved = self.base_layer(x_pres) if copy else None
        original = self.base_layer(x)  # norm(x): the base norm over the original slice only
        new = [  # rms(x_up) * g_up, per adapter
            self._normalise_new(name, x_up).to(original.dtype) for name, x_up in zip(active, x_ups)
        ]
        if self.final:
            out = original
            for name, x_up in zip(active, new):
                head = self.scale_head[name]
                from_new = F.linear(x_up.to(head.dtype), head).to(out.dtype)  # + P rms(x_up) g_up (x g when routed)
                out = out + (from_new * self.route_gates.get(name, x) if self.route_gated[name] else from_new)
            if self.routes():
                return torch.cat([preserved if copy else original, out], dim=-1)  # (..., 2d)
            return out  # (..., d): what the LM head and TRL expect
        return torch.cat([original, *new] if preserved is None else [preserved, original, *new], dim=-1)

    def _merged_module(self, adapter_names: list[str]) -> nn.Module:
        """A norm over two slices has no single-module equivalent: the merged form is a plain ``SplitRMSNorm``."""
        heads = [self.scale_head[name].detach() for name in adapter_names] if self.final else None
        gains = [self.scale_gain[name].detach() for name in adapter_names]
        return SplitRMSNorm(self._pretrained_layer(), gains, self.eps, heads)


class LayerNorm(RMSNorm):
    """The split of an ``nn.LayerNorm`` over the widened stream ``[x; x_up]``::

        out = [ LN(x) ; (x_up - mean(x_up)) / sqrt(var(x_up) + eps) * g_up + b_up ]

    ``LN(x)`` is the base layer over the original slice alone: its mean and variance are over the original
    features only, so the original slice is exactly the base model's. The new slice is a LayerNorm of its own, with
    its own mean and variance and a trainable affine (``scale_gain``, and ``scale_bias`` when the base has a bias).
    Its own statistics rather than the original slice's: with the original slice's, the new features' scale would
    follow the original features', and the new slice could not be normalised in itself. ``g_up`` starts at the
    mean of the base weight, ``b_up`` at zero (the new features start centred). Everything else (the final norm's
    ``P``, routing, the frozen slice) is ``RMSNorm``'s.
    """

    adapter_layer_names = ("scale_gain", "scale_bias", "scale_head")

    def update_layer(self, adapter_name: str, expansion: int, **kwargs) -> None:
        if "scale_bias" not in self._modules:  # (the first adapter: RMSNorm's __init__ calls this)
            self.scale_bias = nn.ParameterDict()
        bias = self.base_layer.bias
        if bias is not None:
            self.scale_bias[adapter_name] = nn.Parameter(torch.empty(expansion, device=bias.device, dtype=bias.dtype))
        super().update_layer(adapter_name, expansion, **kwargs)

    @torch.no_grad()
    def reset_scale_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        super().reset_scale_parameters(adapter_name, init_weights)
        if adapter_name in self.scale_bias:
            self.scale_bias[adapter_name].zero_()

    def _base_gain(self) -> torch.Tensor:
        return self.base_layer.weight.float()

    def _normalise_new(self, name: str, x_up: torch.Tensor) -> torch.Tensor:
        return layer_norm(x_up, self.scale_gain[name], self.scale_bias.get(name), self.eps)

    def _merged_module(self, adapter_names: list[str]) -> nn.Module:
        heads = [self.scale_head[name].detach() for name in adapter_names] if self.final else None
        gains = [self.scale_gain[name].detach() for name in adapter_names]
        biases = [self.scale_bias[name].detach() if name in self.scale_bias else None for name in adapter_names]
        return SplitLayerNorm(self._pretrained_layer(), gains, self.eps, heads, biases)


def split_norm_class(base: nn.Module) -> type:
    """The split-norm class for a base norm: ``LayerNorm`` for an ``nn.LayerNorm``, else ``RMSNorm``."""
    return LayerNorm if isinstance(base, nn.LayerNorm) else RMSNorm


class SplitRMSNorm(nn.Module):
    """The merged form of ``RMSNorm``: a plain module, kept after ``merge_and_unload`` (it cannot be written
    into a standard checkpoint of the base architecture, whose norm spans the whole hidden size)."""

    def __init__(self, base: nn.Module, gains: list[torch.Tensor], eps: float, heads: Optional[list[torch.Tensor]]):
        super().__init__()
        self.base = base
        self.gains = nn.ParameterList([nn.Parameter(g, requires_grad=False) for g in gains])
        self.heads = nn.ParameterList([nn.Parameter(h, requires_grad=False) for h in heads]) if heads else None
        self.eps = eps

    def _normalise_new(self, index: int, x_up: torch.Tensor) -> torch.Tensor:
        return rms_norm(x_up, self.gains[index], self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.base.weight.shape[0]
        pieces = x.split([d] + [g.shape[0] for g in self.gains], dim=-1)
        original = self.base(pieces[0].contiguous())
        new = [self._normalise_new(index, p).to(original.dtype) for index, p in enumerate(pieces[1:])]
        if self.heads is None:
            return torch.cat([original, *new], dim=-1)
        for head, x_up in zip(self.heads, new):
            original = original + F.linear(x_up.to(head.dtype), head).to(original.dtype)
        return original


class SplitLayerNorm(SplitRMSNorm):
    """The merged form of ``LayerNorm`` (see ``SplitRMSNorm``)."""

    def __init__(self, base, gains, eps, heads, biases: list[Optional[torch.Tensor]]):
        super().__init__(base, gains, eps, heads)
        has_bias = base.bias is not None
        self.biases = nn.ParameterList([nn.Parameter(b, requires_grad=False) for b in biases]) if has_bias else None

    def _normalise_new(self, index: int, x_up: torch.Tensor) -> torch.Tensor:
        return layer_norm(x_up, self.gains[index], self.biases[index] if self.biases else None, self.eps)


# The name before 0.2, kept for user code, the tests and pickled modules (see ``layer.ScaleLayer``).
ScaleNorm = RMSNorm
