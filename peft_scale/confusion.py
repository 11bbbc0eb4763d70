"""``routing_confusion``: where a model's learned routers send the tokens of each of several data sets.

With one routed adapter per domain (``peft_scale.routing``: several learned-route adapters active together), what
matters is how well the routers tell the domains apart from each other and from what the base model must keep: a
share of Spanish tokens sent to the French adapter, or of English tokens sent to any adapter. ``fit_router``'s report
gives one router's held-out accuracy against its own old side and, as they stood when it was fitted, the share of
its held-out new tokens that each other fitted router claims (``RouterReport.claimed_by_other_adapters``). This
module runs the model itself on each data set, after every router is fitted, so the shares are exactly the decisions
the model makes in use.
"""

from __future__ import annotations

import torch
from torch import nn

from .router_fitting import TokenData, token_sequences
from .routing import Routing

BASE = "base"  # the key of the base model in the report


@torch.no_grad()
def routing_confusion(model: nn.Module, data: dict[str, TokenData], batch_size: int = 8) -> dict[str, dict[str, float]]:
    """The share of each data set's tokens that the model's active learned routers send to each adapter, and to
    the base model.

    Example, after fitting and training one adapter per domain::

        >>> model.base_model.set_adapter(["es", "fr"])
        >>> peft_scale.routing_confusion(model, {"es": spanish_ids, "fr": french_ids, "base": english_ids})
        {'es': {'es': 0.993, 'fr': 0.004, 'base': 0.003}, 'fr': {...}, 'base': {'es': 0.001, 'fr': 0.0, 'base': 0.999}}

    Each data set is run through the model as it is (its active adapters, in evaluation mode, without a cache;
    right-padded batches, the padding not counted), and each token is counted where ``ScaleModel.last_routing`` says
    it went. A diagonal near 1 means the domains are told apart; a domain whose tokens go to another domain's adapter
    calls for refitting a router with that domain's text among its other domains
    (``fit_router(model, its_data, old_data, other_domains={domain: that_data}, adapter_name=...)``).

    Args:
        model: a ``PeftModel`` (or ``ScaleModel``) with one or several learned-route adapters active.
        data: data set name -> token ids, in any form ``fit_router`` takes (``token_sequences``): a ``LongTensor``
            ``(n, seq)``, a list of 1-D token id sequences, a ``datasets.Dataset`` with ``input_ids`` or a list of
            dicts (an ``attention_mask`` removes padding).
        batch_size: sequences per forward pass.

    Returns:
        ``{data set name: {adapter name: share, ..., "base": share}}``, the active routed adapters in the model's
        order, then ``"base"``; each row sums to 1.

    Raises:
        TypeError: not a SCALE model, or data of an unsupported type.
        ValueError: no learned-route adapter active (or the adapters disabled), an adapter named ``"base"``, empty
            or malformed data (a tensor that is not 2-D integers, items that are not token id sequences) or token
            ids outside the vocabulary.
    """
    scale_model = getattr(model, "base_model", model)
    routing = scale_model.__dict__.get("_routing")
    if not isinstance(routing, Routing):
        raise TypeError(
            f"routing_confusion needs a model made by get_peft_model(model, ScaleConfig(...)), got {type(model).__name__}."
        )
    routers = scale_model.scale_router
    active = [name for name in scale_model.active_adapters if name in routers]
    if not active:
        raise ValueError(
            "routing_confusion: no learned-route adapter is active (active: "
            f"{scale_model.active_adapters}; learned-route adapters: {list(routers)}). Activate the adapters to compare, "
            "e.g. model.base_model.set_adapter(" + repr(list(routers)) + ")."
        )
    if BASE in active:
        raise ValueError(
            f"routing_confusion: an adapter is named {BASE!r}, the report's name for the base model; rename the adapter."
        )
    if not isinstance(data, dict) or not data:
        raise TypeError("routing_confusion: data must be a non-empty dict, data set name -> token ids.")
    vocab_size = getattr(getattr(scale_model.model, "config", None), "vocab_size", None)
    device = next(scale_model.model.parameters()).device
    was_training = scale_model.model.training
    scale_model.model.eval()
    confusion = {}
    try:
        for name, ids in data.items():
            sequences = token_sequences(
                ids, f"data[{name!r}]", vocab_size, caller="routing_confusion", if_empty="There is nothing to route."
            )
            counts = torch.zeros(len(active) + 1, dtype=torch.long)  # per adapter, then the base model
            for start in range(0, len(sequences), batch_size):
                batch = sequences[start : start + batch_size]
                length = max(len(row) for row in batch)
                input_ids = torch.zeros(len(batch), length, dtype=torch.long)
                mask = torch.zeros(len(batch), length, dtype=torch.bool)
                for row, seq in enumerate(batch):  # right padding: the real tokens keep their positions
                    input_ids[row, : len(seq)], mask[row, : len(seq)] = seq, True
                routing.last = None
                model(input_ids=input_ids.to(device), attention_mask=mask.long().to(device), use_cache=False)
                if routing.last is None or routing.last.choice is None:
                    raise ValueError(
                        "routing_confusion: the model made no learned routing decision; are its adapters disabled "
                        "(inside `with model.disable_adapter():`)? Call it with the routed adapters enabled."
                    )
                decided = routing.last
                choice = decided.choice.cpu()[mask]  # index in decided.adapters, -1: the base model
                for index, adapter in enumerate(decided.adapters):
                    counts[active.index(adapter)] += int((choice == index).sum())
                counts[-1] += int((choice < 0).sum())
            total = int(counts.sum())
            confusion[name] = {key: int(count) / total for key, count in zip([*active, BASE], counts.tolist())}
    finally:
        scale_model.model.train(was_training)
    return confusion
