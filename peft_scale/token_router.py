"""The learned router: a small classifier that says, per token, whether it is new-domain text.

It reads the stream entering decoder layer ``L = preserve_layers``. Nothing below ``L`` can change that stream (no
``W12`` exists there, and in FFN mode nothing is widened there), so it is the base model's own hidden state, and the
router can be fitted once, before training, on frozen features (``peft_scale.router_fitting.fit_router``), and
decide in the same forward pass, before any module it gates runs.

Its input is the stream's direction, not its scale (``rms_normalise``), standardised by the statistics of the data it
was fitted on; its output a probability, compared with its threshold. One router per learned-route adapter, held in
the first module it gates (``layer.Linear.scale_router[adapter]``), so that PEFT and transformers' ``load_adapter``
save, load and delete it with its adapter like any block. How its decision becomes a gate, and where that gate is
applied: ``peft_scale.gate_hook``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def rms_normalise(hidden: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``h / rms(h)`` in fp32, without a gain: the router sees the stream's direction, not its scale (which grows
    with depth and differs between families)."""
    hidden = hidden.float()
    return hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)


def router_stream(hidden: torch.Tensor, features: int) -> torch.Tensor:
    """What a learned router reads of a decoder layer's input: its first ``features`` (the original stream),
    ``(batch, seq, d)``. A family that carries several parallel copies of the stream, ``(batch, seq, n, d)``
    (DeepSeek V4's hyper-connections), gives their mean (at layer 0 the ``n`` copies are the embedding's)."""
    hidden = hidden[..., :features]
    return hidden.mean(dim=tuple(range(2, hidden.dim() - 1))) if hidden.dim() > 3 else hidden


class TokenRouter(nn.Module):
    """The learned rule: is this token new-domain text (-> the expansion) or not (-> the base model)?

        f = (rms_normalise(h) - mu) / sigma                 (h: the original stream entering layer L)
        p = sigmoid(w_out . gelu(W_in f + b_in) + b_out)    (RouterConfig.hidden > 0; a linear probe when 0)
        to the expansion  <=>  p >= threshold

    Every number is a buffer, not a parameter: the router is fitted by ``fit_router`` and then frozen (no optimizer
    sees it, PEFT's adapter switching never makes it trainable), and it is saved, loaded and deleted with its
    adapter. ``fitted`` is 0 until ``fit_router`` has run; a forward pass through an unfitted router is an error.
    ``start`` is the median logit of the old side's tokens, where a smoothed average starts with
    ``RouterConfig.smoothing_start="old"`` (0.1.0 adapters) (NaN in a router fitted before it existed).

    Args:
        features: ``d``, the width of the original stream.
        hidden: the MLP's hidden width (0: a linear probe).
    """

    def __init__(self, features: int, hidden: int, device=None) -> None:
        super().__init__()
        self.features = features
        self.hidden = hidden
        width = hidden or 1
        factory = {"device": device, "dtype": torch.float32}
        self.register_buffer("feature_mean", torch.zeros(features, **factory))
        self.register_buffer("feature_scale", torch.ones(features, **factory))
        self.register_buffer("w_in", torch.zeros(width, features, **factory))
        self.register_buffer("b_in", torch.zeros(width, **factory))
        self.register_buffer("w_out", torch.zeros(width, **factory))
        self.register_buffer("b_out", torch.zeros(1, **factory))
        self.register_buffer("threshold", torch.full((1,), 0.5, **factory))
        self.register_buffer("fitted", torch.zeros(1, **factory))
        self.register_buffer("start", torch.full((1,), math.nan, **factory))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # an adapter saved before ``start`` existed: its router loads whole, with the start unknown (NaN), instead
        # of PEFT warning about a missing key (only where this router's other numbers are being loaded)
        if prefix + "threshold" in state_dict and prefix + "start" not in state_dict:
            state_dict[prefix + "start"] = torch.full_like(self.start, math.nan)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted.item())

    def logits(self, hidden: torch.Tensor, params: Optional[dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """The router's logit per token, ``(...)`` for ``hidden`` of shape ``(..., d)``. ``params`` overrides the
        buffers (``fit_router`` trains copies of them)."""
        p = params or self._buffers  # (the module's own dict: no copy per call, which decoding would feel)
        f = (rms_normalise(hidden) - p["feature_mean"]) / p["feature_scale"]
        if self.hidden == 0:
            return f @ p["w_in"][0] + p["b_out"][0]
        return F.gelu(F.linear(f, p["w_in"], p["b_in"])) @ p["w_out"] + p["b_out"][0]

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(to_expansion, score)`` per token: the 0/1 decision and the probability it was made from."""
        score = torch.sigmoid(self.logits(hidden))
        return score >= self.threshold[0], score
