"""The rule for several learned-route adapters active together: which adapter a token goes to.

With one adapter per domain active together (``model.base_model.set_adapter(["es", "fr"])``), every router decides
on the same token, at the same layer, and the choice is made once, for all of them (``choose_adapters``, run by the
one gate hook of layer ``L``, ``peft_scale.gate_hook``): per token, the adapter whose router scores highest among
those at or above their own threshold gets the token (gate 1 for it), every other adapter gets gate 0, and a token
no router claims gets the base model's computation.

Outranking: a router fitted with another adapter's domain among its ``other_domains`` (named by that adapter's name,
recorded in ``RouterConfig.outranks``) *outranks* that adapter's router, unless that one was fitted against it too
(``outranking``): where both claim a token, it goes to the outranking one. It learned to tell the two domains
apart; the outranked one, fitted before the other domain existed, never saw it, and its confidence on it says
nothing (such a router can claim most of the other domain's text). So an earlier adapter's router need not be
refitted: it keeps every decision it made on its own domain except on the tokens the later router claims.

Why the result is exact: every widened module already sums the adapters' contributions, each times its own gate, so
a token routed to ``es`` is computed exactly as with ``es`` active alone (``fr``'s new features are computed but
reach nothing), and a token routed to none exactly as the base model. This needs every router to decide before any
gated module runs, so the adapters must share ``preserve_layers``, and it cannot hold with an adapter that is not
learned-route in the mix (it changes every token): ``check_routed_together`` refuses both.
"""

from __future__ import annotations

from typing import Optional

import torch


def choose_adapters(
    scores: list[torch.Tensor], claims: list[torch.Tensor], outranks: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The joint rule of several learned routers: per token, the index of the adapter whose score is highest among
    those whose router claims the token (score at or above its own threshold), or ``-1`` (the base model) when none
    does. A tie goes to the adapter that comes first. ``scores`` and ``claims``: one ``(batch, seq)`` tensor per
    adapter; returns ``(batch, seq)`` long.

    ``outranks``: ``(adapters, adapters)`` bool (``outranking``), ``[i, j]`` when adapter ``i``'s router outranks
    ``j``'s: a claim of ``j`` is dropped where ``i`` claims the token too, before the highest score is taken. (A
    cycle, ``a`` over ``b`` over ``c`` over ``a``, could drop every claim of a token: there the plain rule decides.)"""
    scores, claims = torch.stack(scores), torch.stack(claims)  # (adapters, batch, seq)
    eligible = claims
    if outranks is not None:
        # beaten[j]: some claimant i outranks j: (i, j, batch, seq) -> any over i
        beaten = (claims.unsqueeze(1) & outranks.to(claims.device)[:, :, None, None]).any(0)
        kept = claims & ~beaten
        eligible = torch.where(kept.any(0), kept, claims)
    best = scores.masked_fill(~eligible, -1.0).argmax(0)  # a score is a probability: -1 is below any claim
    return torch.where(claims.any(0), best, torch.full_like(best, -1))


def outranked_adapters(config) -> list[str]:
    """The adapters whose domains this adapter's router was fitted against as ``other_domains`` (by their names),
    as ``fit_router`` recorded them (``RouterConfig.outranks``)."""
    router = getattr(config, "router", None)
    return list(router.outranks) if router is not None else []


def outranking(names: list[str], configs: dict) -> Optional[torch.Tensor]:
    """``(len(names), len(names))`` bool for ``choose_adapters``: ``[i, j]`` when ``names[i]``'s router was fitted
    with ``names[j]``'s domain among its ``other_domains`` and ``names[j]``'s was not fitted with ``names[i]``'s
    (fitted against each other, both learned the difference: the scores decide). ``None`` when no pair is."""
    knows = [set(outranked_adapters(configs[name])) for name in names]
    rows = [[name_j in knows[i] and name_i not in knows[j] for j, name_j in enumerate(names)]
            for i, name_i in enumerate(names)]  # fmt: skip
    # (a tensor only where some adapter outranks another: the common case builds none per forward pass)
    return torch.tensor(rows) if any(map(any, rows)) else None


def is_learned_route(config) -> bool:
    return config.variant == "route" and config.route_rule == "learned"


def check_routed_together(configs: dict) -> None:
    """Refuse a set of adapters (name -> ``ScaleConfig``, active together) that holds a learned-route adapter and
    cannot be routed exactly: one that is not learned-route (it changes every token, so no token would get the base
    model's computation or a single domain's), or learned-route adapters whose routers read different layers."""
    learned = {name: config for name, config in configs.items() if is_learned_route(config)}
    if len(configs) < 2 or not learned:
        return
    others = {
        name: f"{config.variant} (cosine rule)" if config.variant == "route" else config.variant
        for name, config in configs.items()
        if name not in learned
    }
    if others:
        described = ", ".join(f"{name!r} ({variant})" for name, variant in others.items())
        raise ValueError(
            f"SCALE: the learned-route adapter(s) {sorted(learned)} cannot be active together with {described}: an "
            "adapter that is not routed by a learned router changes every token (a cosine-route adapter must be active "
            "alone), so the tokens the routers send to the base model, or to one domain's adapter, would not get its "
            f"computation. Activate the learned-route adapters alone (model.base_model.set_adapter({sorted(learned)})), "
            "or make the others learned-route adapters: ScaleConfig(variant='route', route_rule='learned', "
            "preserve_layers=...) and peft_scale.fit_router(model, its_data, adapter_name=...)."
        )
    layers = {name: config.preserve_layers for name, config in learned.items()}
    if len(set(layers.values())) > 1:
        raise ValueError(
            f"SCALE: learned-route adapters active together must have the same preserve_layers, but these differ: "
            f"{layers}. Each router reads the stream entering layer preserve_layers, and every router must have decided "
            "before any routed module runs: a router reading a higher layer would see a stream that the other adapters' "
            "expansions have already changed, and the per-token choice between them could not be made. Create the "
            f"adapters with one preserve_layers (e.g. {min(layers.values())} for all) and fit their routers, or "
            "activate them one at a time."
        )
