"""What a routed forward pass decides, as the rest of the package reads it.

Two records, one per reader:

- ``RouteResult``: what the last routed pass decided, per token (``ScaleModel.last_routing``), for the user and for
  ``routing_confusion`` / ``forgetting``. Written by the rule that decided: the learned rule's gate hook
  (``peft_scale.gate_hook``) or the cosine rule's LM-head hooks (``peft_scale.cosine_routing``).
- ``RouteGates``: the learned routers' gates of the pass in flight, one ``(batch, seq, 1)`` tensor per adapter. The
  gate hook of layer ``L = preserve_layers`` fills it before any gated module runs; every gated module (``layer.Linear``,
  the final ``norm.RMSNorm``, ``experts.Experts``) holds the same object by reference and multiplies its
  expansion's contribution by its adapter's gate. One object per ``ScaleModel`` (``Routing.gates``).

Both are plain containers: nothing here decides or applies anything, so every module that reads them can import
this one without importing the rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class RouteResult:
    """What the last routed forward pass decided (``ScaleModel.last_routing``).

    Attributes:
        to_preservation: boolean mask ``(batch, seq)``, ``True`` where the token got the base model's computation
            (cosine: ``cos(z_pres, z_adapt) >= threshold``; learned: the router's score below its threshold).
        preservation_logits: cosine rule only: ``z_pres = W_out norm(x_pres)``, the base model's own logits.
        adaptation_logits: cosine rule only: ``z_adapt = W_out norm(x) + W_out P rms(x_up) g_up``.
            Both are the LM head's outputs: a family's transform of the logits after the head (Gemma 2's softcapping,
            Granite's ``logits_scaling``) applies to the routed output only, which, elementwise, is the same as
            routing the transformed logits.
        scores: learned rule only: the router's probability that the token is new-domain text (the sigmoid of the
            smoothed logit with ``RouterConfig.smoothing > 0``; with several routed adapters: the highest of their
            routers' scores).
        adapters: learned rule only: the routed adapters that decided, in the order ``choice`` counts them.
        choice: learned rule only: ``(batch, seq)`` long, the index in ``adapters`` of the adapter each token went to,
            ``-1`` for the base model.
        adapter_scores: learned rule only: adapter name -> its router's score per token ``(batch, seq)``.
    """

    to_preservation: torch.Tensor
    preservation_logits: Optional[torch.Tensor] = None
    adaptation_logits: Optional[torch.Tensor] = None
    scores: Optional[torch.Tensor] = None
    adapters: tuple[str, ...] = ()
    choice: Optional[torch.Tensor] = None
    adapter_scores: dict[str, torch.Tensor] = field(default_factory=dict)

    def sent_to(self, adapter_name: Optional[str]) -> torch.Tensor:
        """Boolean mask ``(batch, seq)`` of the tokens that went to ``adapter_name`` (``None``: to the base model)."""
        if adapter_name is None:
            return self.to_preservation
        if adapter_name not in self.adapters:
            raise KeyError(
                f"SCALE: adapter {adapter_name!r} did not route this forward pass (the routed adapters were "
                f"{list(self.adapters)}); ask for one of them, or None for the base model."
            )
        return self.choice == self.adapters.index(adapter_name)


class RouteGates:
    """The learned routers' gates for the forward pass in flight, one ``(batch, seq, 1)`` tensor per adapter.

    Set at the entry of layer ``L`` by the router's hook, read by every gated module above it. One object per
    ``ScaleModel``, shared by reference with its modules.
    """

    def __init__(self) -> None:
        self.gates: dict[str, torch.Tensor] = {}
        # The adapters that no token of the forward pass in flight goes to, among those whose modules may then
        # compute as their base layers (FFN mode, inference): set with the gates by the router's hook.
        self.idle: frozenset[str] = frozenset()

    def busy(self, active: list[str], like: torch.Tensor) -> list[str]:
        """``active`` without the adapters that are idle in this forward pass (``like``: the module's input, whose
        leading shape must be the gates' for the decision to be this pass's)."""
        return [
            name for name in active
            if name not in self.idle or self.gates.get(name) is None or not _same_tokens(self.gates[name], like)
        ]  # fmt: skip

    def get(self, adapter_name: str, like: torch.Tensor) -> torch.Tensor:
        """The ``(batch, seq, 1)`` gate of ``adapter_name`` for a module input ``like``: of shape ``(batch, seq, in)``,
        or with the tokens flattened in order, ``(batch * seq, in)`` (an MoE block's shared expert, OPT's MLP)."""
        gate = self.gates.get(adapter_name)
        if gate is not None and gate.shape[:-1] != like.shape[:-1] and _same_tokens(gate, like):
            return gate.reshape(*like.shape[:-1], 1)
        if gate is None or gate.shape[:-1] != like.shape[:-1]:
            raise RuntimeError(
                f"SCALE: no routing decision of adapter {adapter_name!r} for this input of shape {tuple(like.shape)}: "
                "the router runs at the entry of decoder layer `preserve_layers`, which this forward pass did not go "
                "through. Call the whole model, not a single layer."
            )
        return gate


def _same_tokens(gate: torch.Tensor, like: torch.Tensor) -> bool:
    """Whether a module input ``like`` holds the gate's tokens: the same leading shape, or the same tokens
    flattened in order (``(batch * seq, in)``: the leading shape of the gate's, then one dimension)."""
    if gate.shape[:-1] == like.shape[:-1]:
        return True
    return like.dim() == 2 and like.shape[0] == gate[..., 0].numel()


NO_GATES = RouteGates()  # what a module not built by a ScaleModel reads (it is never gated)
