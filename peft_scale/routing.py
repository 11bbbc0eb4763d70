"""SCALE-Route: two heads from one forward pass, and the per-token cosine rule between them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RouteResult:
    """What the last routed forward pass produced (``ScaleModel.last_routing``).

    Attributes:
        preservation_logits: ``z_pres = W_out norm(x_pres)``: the base model's own logits, computed from the
            preservation copy that only frozen base weights touched.
        adaptation_logits: ``z_adapt = W_out norm(x) + W_out P rms(x_up) g_up``: the widened model's logits.
        to_preservation: boolean mask, ``True`` where ``cos(z_pres, z_adapt) >= threshold`` and the output is
            ``z_pres``.
    """

    preservation_logits: torch.Tensor
    adaptation_logits: torch.Tensor
    to_preservation: torch.Tensor


def route(preservation: torch.Tensor, adaptation: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: the preservation logits where ``cos(z_pres, z_adapt) >= threshold``, else the adaptation logits.

    No router parameters and no auxiliary loss: where the adapted model still agrees with the base model in
    direction, the token gets exactly the base model's prediction.
    """
    to_preservation = F.cosine_similarity(preservation.float(), adaptation.float(), dim=-1) >= threshold
    return torch.where(to_preservation.unsqueeze(-1), preservation, adaptation), to_preservation


class LMHeadRouter:
    """Hooks on the (untouched) LM head that turn ``[h_pres; h_adapt]`` into routed logits.

    The final ``ScaleNorm`` emits twice the hidden width when routing applies. The pre-hook reshapes that to
    ``(..., 2, d)`` so the head computes both logits in one call; the forward hook applies ``route``. A
    hidden state of the plain width passes through untouched, so the hooks cost nothing when not routing.
    """

    def __init__(self, head: nn.Module, threshold_of_active_adapter):
        self.hidden = head.weight.shape[1]
        self.threshold_of_active_adapter = threshold_of_active_adapter
        self.last: RouteResult | None = None
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
        routed, to_preservation = route(preservation, adaptation, self.threshold_of_active_adapter())
        self.last = RouteResult(preservation.detach(), adaptation.detach(), to_preservation)
        return routed

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
