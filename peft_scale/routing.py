"""SCALE-Route: per token, the expansion or the base model. Both rules, and their installation, live here.

Two rules decide, token by token, whether a token gets the widened model's computation or the base model's:

- ``"learned"`` (``TokenRouter``, the project's extension): a small classifier reads the stream entering layer
  ``L = preserve_layers``. Nothing below ``L`` can change that stream (no ``W12`` exists there, and in FFN mode
  nothing is widened there), so it is the base model's own hidden state, and the router can be fitted once,
  before training, on frozen features (``peft_scale.router_fitting.fit_router``). Its decision is a *gate*
  ``g`` per token (0 or 1; with ``RouterConfig(gate="soft")`` in ``[0, 1]``, ``gate_values``) that multiplies every
  contribution of the expansion to the original features::

        y = W x + b + g * W12 x_up                 (every widened module with a W12 block)
        out = norm(x) + g * P rms(x_up) g_up       (the final norm: the LM head's new block)

  A token with ``g = 0`` gets nothing of the expansion and gives it no gradient; a sequence whose tokens all have
  ``g = 0`` is computed exactly as the base model computes it. (A token with ``g = 0`` in a mixed sequence still
  attends to earlier tokens whose states the expansion changed, unless ``RouterConfig.preservation_copy`` carries the base
  model's stream beside the adapted one: ``peft_scale.preservation_copy``.) The gate is computed in the same forward pass,
  at layer ``L``, before any gated module runs, so training, evaluation and ``generate()`` (with or without the
  KV cache: the router is per token) all see the same decisions. With ``RouterConfig.smoothing = a > 0`` the decision
  is on the moving average ``s_t = a s_{t-1} + (1 - a) l_t`` of the router's logits along the sequence
  (``smooth_logits``); its state is carried from one cached call to the next with the cache object
  (``Routing.smoothed``), so cached generation still decides as the whole sequence does, or refuses.
- ``"cosine"`` (the paper's rule, full width only): a preservation copy of the original features
  ``[x_pres; x; x_up]`` enters at layer ``L`` (only frozen base weights touch it), the final norm emits both
  heads' inputs, and hooks on the LM head route per token by ``cos(z_pres, z_adapt) >= tau``.

``Routing`` is the one object that installs and removes both rules' hooks; ``ScaleModel`` owns it. A learned
router's numbers live in the first module it gates (``peft_scale.layer.Linear.scale_router[adapter]``, inside the model, so that
PEFT and transformers' ``load_adapter`` save, load and delete it with its adapter like any block;
``ScaleModel.scale_router`` maps adapter names to them); the gates of the forward pass in flight live in one
``RouteGates``, which every gated module reads.

Several learned-route adapters active together (``model.base_model.set_adapter(["es", "fr"])``, one adapter per
domain) are routed jointly, in one place (``choose_adapters``, run by the one gate hook of layer ``L``): per token,
the adapter whose router scores highest among those at or above their own threshold gets the token (``g = 1`` for
it), every other adapter gets ``g = 0``, and a token no router claims gets the base model's computation. A router
fitted with another adapter's domain among its ``other_domains`` (named by that adapter's name) *outranks* that
adapter's router, unless that one was fitted against it too (``outranking``): where both claim a token, it goes to
the outranking one. It learned to tell the two domains apart; the outranked one, fitted before the other domain
existed, never saw it, and its confidence on it says nothing (measured on Spanish then French: a Spanish router
claimed 95.9% of French). So an earlier adapter's router need not be refitted: it keeps every decision it made
on its own domain except on the tokens the later router claims. Every
widened module already sums the adapters' contributions, each times its own gate, so a token routed to ``es`` is
computed exactly as with ``es`` active alone (``fr``'s new features are computed but reach nothing), and a token
routed to none exactly as the base model. This needs every router to decide before any gated module runs, so the
adapters must share ``preserve_layers``, and it cannot hold with an adapter that is not learned-route in the mix (it
changes every token): ``check_routed_together`` refuses both.
"""

from __future__ import annotations

import inspect
import math
import re
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .cache_rows import ROW_OPERATIONS, kept_rows
from .preservation_copy import PreservationCopy


def mode_applies(mode: str, training: bool) -> bool:
    """The cosine rule's modes (preservation copy, routing): ``"always"``, ``"eval"`` (when not training) or ``"off"``."""
    return mode == "always" or (mode == "eval" and not training)


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


# ----------------------------------------------------------------------------------------------- the learned rule


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
    index, layers, holder = min(above, key=lambda site: site[0])
    return f"{layers}.{layer}", holder


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


def gate_values(to_expansion: torch.Tensor, score: torch.Tensor, threshold: torch.Tensor, soft: bool, dtype):
    """The gate of one adapter, ``(batch, seq, 1)`` in ``dtype``, from its router's decisions and scores::

        hard:  g = 1                          where the token goes to the adapter's expansion
        soft:  g = (p - tau) / (1 - tau)      there (``RouterConfig.gate="soft"``)
        both:  g = 0                          elsewhere (the token computes the base model's function)

    ``to_expansion``: ``(batch, seq)`` bool; ``score``: ``p``, the (smoothed) router score, same shape;
    ``threshold``: ``tau``, a 0-d tensor."""
    if not soft:
        return to_expansion.unsqueeze(-1).to(dtype)
    # (a threshold of 1 leaves no room above it: the denominator is kept above 0, and such a token's g is 0)
    weight = ((score - threshold) / (1 - threshold).clamp_min(torch.finfo(score.dtype).eps)).clamp(0, 1)
    return (weight * to_expansion).unsqueeze(-1).to(dtype)


def smoothing_start(adapter_name: str, config, router: TokenRouter) -> Optional[torch.Tensor]:
    """The value adapter ``adapter_name``'s smoothed average starts from: ``router.start`` with
    ``RouterConfig.smoothing_start="old"`` (0.1.0 adapters), else ``None`` (the first token's own logit)."""
    if config.router.smoothing_start != "old":
        return None
    if math.isnan(float(router.start[0])):
        raise RuntimeError(
            f"SCALE adapter {adapter_name!r} has RouterConfig.smoothing_start='old', but its router was fitted before the "
            "start value existed (its `start` is unknown): call peft_scale.fit_router(model, new_data, ..., "
            f"adapter_name={adapter_name!r}) again, or set its config.router.smoothing_start='token'."
        )
    return router.start


def smooth_logits(
    logits: torch.Tensor,
    smoothing: float,
    mask: Optional[torch.Tensor] = None,
    last: Optional[torch.Tensor] = None,
    started: Optional[torch.Tensor] = None,
    start: Optional[torch.Tensor] = None,
    fall: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exponential moving average of a router's logits along the sequence (``RouterConfig.smoothing``)::

        s_0 = l_0,    s_t = a s_{t-1} + (1 - a) l_t        (a = smoothing; over one row's real tokens)

    or, with a ``start`` value ``c`` (a 0-d or ``(1,)`` tensor: ``RouterConfig.smoothing_start="old"`` (0.1.0 adapters)), ``s_-1 = c``:
    ``s_0 = a c + (1 - a) l_0``. With ``fall = f`` (``RouterConfig.smoothing_fall``) the coefficient depends on the
    direction: ``a_t = f`` where ``l_t < s_{t-1}`` (falling towards the base model), else ``a``.

    ``logits``: ``(batch, seq)``. ``mask``: ``(batch, seq)`` bool, ``False`` at padding: a pad token leaves the
    average as it is (and keeps its own logit), so a left-padded row starts at its first real token. ``last``,
    ``started``: ``(batch,)``, the state after the row's earlier tokens (a decoding step continues it); ``None``: a
    fresh start. Returns ``(smoothed, last, started)``, the state after these tokens.

    One step per position, the same operations for a whole sequence as for one token at a time, so cached decoding
    gets the very bits that the full sequence gives (a closed form would differ in the last bits, and a score at the
    threshold could flip).
    """
    batch, length = logits.shape
    a = float(smoothing)
    state = torch.zeros(batch, dtype=logits.dtype, device=logits.device) if last is None else last
    on = torch.zeros(batch, dtype=torch.bool, device=logits.device) if started is None else started
    out = torch.empty_like(logits)
    begin = None if start is None else a * start.reshape(()).to(logits.dtype)
    if fall is not None:  # the direction-dependent coefficient, as tensors (one where per step)
        rise_a, fall_a = (torch.tensor(x, dtype=logits.dtype, device=logits.device) for x in (a, float(fall)))
        origin = None if start is None else start.reshape(()).to(logits.dtype)
    for t in range(length):
        own = logits[:, t]
        if fall is None:
            first = own if begin is None else begin + (1 - a) * own
            step = torch.where(on, a * state + (1 - a) * own, first)
        else:
            # the previous value: the row's average, or before its first token the start (none: the token itself)
            previous = state if origin is None else torch.where(on, state, origin)
            coefficient = torch.where(own < previous, fall_a, rise_a)
            step = coefficient * previous + (1 - coefficient) * own
            if origin is None:
                step = torch.where(on, step, own)
        if mask is None:
            state, out[:, t] = step, step
            on = torch.ones_like(on)
        else:
            real = mask[:, t]
            state = torch.where(real, step, state)
            out[:, t] = torch.where(real, step, own)
            on = on | real
    return out, state, on


@dataclass
class _SmoothingState:
    """One adapter's moving average where a cached forward pass left it: its cache (weakly), the tokens the cache
    held at layer ``L`` after that pass, the batch size, and the state per row (``smooth_logits``)."""

    cache: object  # weakref.ref to the cache object
    consumed: int
    batch: int
    last: torch.Tensor
    started: torch.Tensor


CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")  # a decoder layer's cache, by family


def _layer_cache(args, kwargs):
    """The cache object a decoder layer received (by keyword, whatever the family calls it), or ``None``."""
    for name in CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


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


class _GateHook:
    """Forward pre-hook of decoder layer ``L``: the decision of every active learned router that reads this layer,
    stored in ``RouteGates`` (one gate per adapter). One hook per layer, shared by the adapters whose routers read it,
    so that several of them decide jointly (``choose_adapters``)."""

    def __init__(self, routing: "Routing", layer: nn.Module, index: int, layers: nn.ModuleList) -> None:
        self.routing = routing
        self.layer = layer  # the decoder layer this hook is on: its input is what the routers read
        self.index = index  # its index in the decoder (``preserve_layers``): the cache's layer to read lengths from
        # RouterConfig.preservation_copy: the base model's stream carried beside the adapted one from this layer up
        self.copy = PreservationCopy(layers, index)
        # adapter -> the gated module that holds its router; it says whether the adapter computes at all
        self.holders: dict[str, nn.Module] = {}
        # the FFN-mode adapters (hidden_expansion=0): their expansion lives inside the MLPs above this layer only, so
        # when no token goes to one of them its modules can compute as their base layers (``_idle``)
        self.ffn_only: set[str] = set()

    def _idle(self, names: list[str], to_adapter: list[torch.Tensor]) -> frozenset[str]:
        """The FFN-mode adapters among ``names`` that no token goes to (``to_adapter``: their 0/1 decisions), whose
        work is skipped in this forward pass: the widened MLPs then compute exactly what the gate would have let
        through (the base layer's output), without the new neurons' products.

        Only in inference (no gradient, not compiled) and only when the whole forward pass sends no token to the
        adapter (no gather of tokens): a decoding step on old text, an all-old prompt. Deciding costs one
        device-to-host read per forward pass; in training the products run as always (they are needed anyway for
        the batch's routed tokens, and a data-dependent branch would break ``torch.compile``'s graph)."""
        if not self.routing.skip_idle or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return frozenset()
        return frozenset(
            name for name, to_it in zip(names, to_adapter) if name in self.ffn_only and not bool(to_it.any())
        )

    def _active(self) -> list[str]:
        """The adapters of this hook that compute in this forward pass, in the model's order of active adapters."""
        holder = next(iter(self.holders.values()))
        if holder.disable_adapters:
            return []
        active = holder.active_adapters
        names = [name for name in active if name in self.holders]
        if names and len(active) > 1:  # a mix: check it is one the joint rule computes exactly
            check_routed_together({name: config for name, config in self.routing.configs().items() if name in active})
        return names

    def _sequence(self, args, kwargs, hidden):
        """What a smoothed router needs besides the logits: ``(cache, tokens already in it at this layer, padding
        mask of this call's tokens or None)``. The mask is the 2-D ``attention_mask`` the model was called with
        (``Routing.attention_mask``), over the cached tokens and these, or over these alone."""
        if hidden.dim() < 3:
            raise RuntimeError(
                f"SCALE: a smoothed learned router (RouterConfig.smoothing > 0) averages over the sequence, but decoder layer "
                f"{self.index} received hidden states of shape {tuple(hidden.shape)}, not (batch, seq, features)."
            )
        batch, length = hidden.shape[:2]
        cache = _layer_cache(args, kwargs)
        if cache is not None and not hasattr(cache, "get_seq_length"):
            raise RuntimeError(
                f"SCALE: a smoothed learned router (RouterConfig.smoothing > 0) carries its moving average with the cache, "
                f"but decoder layer {self.index} received a {type(cache).__name__}, not a transformers Cache. Pass a "
                "transformers Cache (e.g. DynamicCache), or no cache."
            )
        past = int(cache.get_seq_length(self.index)) if cache is not None else 0
        mask = self.routing.attention_mask
        if mask is not None:
            if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] not in (length, past + length):
                raise RuntimeError(
                    f"SCALE: a smoothed learned router (RouterConfig.smoothing > 0) reads the padding from the model's 2-D "
                    f"attention_mask (batch, tokens so far), but got one of shape {tuple(mask.shape)} for {batch} "
                    f"row(s) of {length} new token(s) after {past} cached: the moving average cannot tell real tokens "
                    "from padding. Pass attention_mask of shape (batch, cached + new tokens) (1 at real tokens), or none "
                    "for unpadded rows (a 4-D mask of packed sequences is not supported: use RouterConfig(smoothing=0))."
                )
            mask = mask[:, mask.shape[1] - length :].to(device=hidden.device, dtype=torch.bool)
        return cache, past, mask

    def _carry_copy(self, args, kwargs, hidden, names: list[str], configs: dict):
        """The preservation copy (``peft_scale.preservation_copy``) where an adapter of this pass asks for it and no
        gradient is recorded: the layer's new ``(args, kwargs)``, or ``None``."""
        cache = _layer_cache(args, kwargs)
        if torch.is_grad_enabled() or not any(configs[name].router.preservation_copy for name in names):
            self.copy.refuse_carried(cache)
            return None
        past = int(cache.get_seq_length(self.index)) if cache is not None else 0
        return self.copy.begin(
            args, kwargs, hidden, self.routing.last.to_preservation, self.routing.gates.gates, names, cache, past
        )

    def __call__(self, module, args, kwargs):
        names = self._active() if self.holders else []
        self.routing.gates.idle = frozenset()
        self.copy.batch = None  # (a pass that ended by an error may have left it set)
        if not names:
            self.copy.refuse_carried(_layer_cache(args, kwargs))
            return None
        routers = {name: self.holders[name].scale_router[name] for name in names}
        unfitted = [name for name, router in routers.items() if not router.is_fitted]
        if len(unfitted) == 1 and len(names) == 1:
            raise RuntimeError(
                f"SCALE adapter {unfitted[0]!r} routes with a learned router that has not been fitted. Call "
                "peft_scale.fit_router(model, new_data) before training or evaluating it (old_data=None samples the "
                "old side from the base model), or train with the Trainer and callbacks=[peft_scale.RouterFitCallback()]."
            )
        if unfitted:
            raise RuntimeError(
                f"SCALE adapters {unfitted} (active together with {[n for n in names if n not in unfitted]}) route with "
                "learned routers that have not been fitted. Call peft_scale.fit_router(model, its_data, "
                f"adapter_name={unfitted[0]!r}) for each of them (other_domains: the other adapters' text), or activate only "
                "fitted adapters."
            )
        hidden = args[0] if args else kwargs["hidden_states"]
        gates = self.routing.gates.gates
        configs = self.routing.configs()
        smoothing = {name: configs[name].router.smoothing for name in names}
        soft = {name: configs[name].router.gate == "soft" for name in names}
        sequence = self._sequence(args, kwargs, hidden) if any(smoothing.values()) else None

        def decide(name, router):  # (claim, score) per token: on the token's own logit, or on the smoothed one
            if not smoothing[name]:
                return router(router_stream(hidden, router.features))
            start = smoothing_start(name, configs[name], router)
            own = router.logits(router_stream(hidden, router.features))
            logits = self.routing.smoothed(
                name, own, smoothing[name], *sequence, start=start, fall=configs[name].router.smoothing_fall
            )
            score = torch.sigmoid(logits)
            return score >= router.threshold[0], score

        if len(names) == 1:  # one routed adapter: its router alone decides
            name = names[0]
            router = routers[name]
            with torch.no_grad():
                to_expansion, score = decide(name, router)
                gates[name] = gate_values(to_expansion, score, router.threshold[0], soft[name], hidden.dtype)
            self.routing.gates.idle = self._idle(names, [to_expansion])
            self.routing.last = RouteResult(
                to_preservation=~to_expansion, scores=score, adapters=(name,), choice=to_expansion.long() - 1,
                adapter_scores={name: score},
            )
            return self._carry_copy(args, kwargs, hidden, names, configs)
        with torch.no_grad():
            claims, scores = zip(*(decide(name, router) for name, router in routers.items()))
            # (batch, seq): adapter index, -1 for the base
            choice = choose_adapters(list(scores), list(claims), outranking(names, configs))
            for index, name in enumerate(names):
                threshold = routers[name].threshold[0]
                gates[name] = gate_values(choice == index, scores[index], threshold, soft[name], hidden.dtype)
        self.routing.gates.idle = self._idle(names, [choice == index for index in range(len(names))])
        self.routing.last = RouteResult(
            to_preservation=choice < 0, scores=torch.stack(scores).amax(0), adapters=tuple(names), choice=choice,
            adapter_scores=dict(zip(names, scores)),
        )
        return self._carry_copy(args, kwargs, hidden, names, configs)


# ------------------------------------------------------------------------------------------------ the cosine rule


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

    def __init__(self, head: nn.Module, routing: "Routing"):
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
        routed, to_preservation = route(preservation, adaptation, self.routing.cosine_threshold())
        self.routing.last = RouteResult(to_preservation, preservation.detach(), adaptation.detach())
        return routed

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class _CopyOriginalSlice:
    """Forward pre-hook of the first routed decoder layer (cosine rule): ``[x; x_up] -> [x_pres; x; x_up]``.

    Below this layer no ``W12`` exists, so ``x`` is still exactly the base model's hidden state and can seed the
    preservation copy. The first SCALE module of the layer to read its input (the input norm, or a projection in a
    family without one) says whether the copy is wanted (route adapter active, routing mode).
    """

    def __init__(self, reader: nn.Module, features: int) -> None:
        self.reader = reader
        self.features = features  # d, the width of x

    def __call__(self, module, args, kwargs):
        if not self.reader.carries_preservation_copy():
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden = torch.cat([hidden[..., : self.features], hidden], dim=-1)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}


# ------------------------------------------------------------------------------------------------ installation


class _MaskCapture:
    """Forward pre-hook of the whole model: its call's ``attention_mask`` (by keyword or at its ``position``) goes to
    ``Routing.attention_mask`` for the pass in flight; ``release`` (its forward hook) drops it after an inference
    call. (An object, not a closure, so that a deep copy of the model hooks the copy's ``Routing``.)"""

    def __init__(self, routing: "Routing", position: Optional[int]) -> None:
        self.routing = routing
        self.position = position

    def __call__(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and self.position is not None and len(args) > self.position:
            mask = args[self.position]
        self.routing.attention_mask = mask if isinstance(mask, torch.Tensor) else None

    def release(self, module, args, kwargs, output):
        if not torch.is_grad_enabled():
            self.routing.attention_mask = None


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
        # skip an FFN-mode adapter's products in an inference pass that sends it no token (``_GateHook._idle``);
        # False computes them anyway (times the gate's zeros), e.g. to measure what the skip saves
        self.skip_idle = True
        self._handles: dict[str, list] = {}  # adapter -> its hook handles (a learned router's: in _layer_hooks)
        self._gate_hooks: dict[str, _GateHook] = {}  # adapter -> the gate hook of the layer its router reads
        self._layer_hooks: dict[str, tuple[_GateHook, object]] = {}  # decoder layer name -> (gate hook, handle)
        self._head_router: Optional[LMHeadRouter] = None
        # smoothed learned routers (``RouterConfig.smoothing > 0``): the 2-D attention_mask of the model call in flight
        # (captured by hooks on the whole model), and each adapter's moving average as the last cached call left it
        self.attention_mask: Optional[torch.Tensor] = None
        self._mask_handles: list = []
        self._smoothing: dict[str, _SmoothingState] = {}

    # ------------------------------------------------------------- the smoothed router's sequence and cache state

    def _watch_model(self, model: nn.Module) -> None:
        """Hooks on the whole model that keep its call's ``attention_mask`` for the pass in flight (``generate()``
        calls the model itself, not ``ScaleModel.forward``). An inference call drops it when it ends, even by an
        error; a call with gradients keeps it until the next call, for a checkpointing that wraps the decoder layer's
        call, hooks included (``torch.utils.checkpoint`` around the module; transformers' own checkpoints only
        ``forward``), and so runs its gate hook again in the backward pass, after the call has returned."""
        if self._mask_handles:
            return
        parameters = list(inspect.signature(model.forward).parameters)
        capture = _MaskCapture(self, parameters.index("attention_mask") if "attention_mask" in parameters else None)
        self._mask_handles = [
            model.register_forward_pre_hook(capture, with_kwargs=True),
            model.register_forward_hook(capture.release, with_kwargs=True, always_call=True),
        ]

    def smoothed(
        self, adapter_name: str, logits: torch.Tensor, smoothing: float, cache, past: int, mask, start=None, fall=None
    ) -> torch.Tensor:
        """``logits`` (batch, seq) of ``adapter_name``'s router, smoothed (``smooth_logits``, from ``start`` when given,
        falling with ``fall`` when given)
        over the preceding tokens of each row: those of this call and, when it continues a cache, those the cache
        holds (whose average the previous call on that cache left in ``self._smoothing``). Refuses a continuation it
        has no exact state for."""
        batch, length = logits.shape
        last = started = None
        if past:
            state = self._smoothing.get(adapter_name)
            problem = None
            if state is None or state.cache() is not cache:
                problem = "no earlier call on this cache object went through this model's router"
            elif state.consumed < 0:
                problem = "the cache was cropped (cache.crop(), e.g. by assisted decoding) since the router last read it"
            elif state.consumed != past:
                problem = f"the router's state covers {state.consumed} tokens of it, not {past}"
            elif state.batch != batch:
                problem = f"the router's state has {state.batch} rows, this call {batch}"
            if problem:
                raise RuntimeError(
                    f"SCALE adapter {adapter_name!r} decides on its router's logit averaged over the preceding tokens "
                    f"(RouterConfig.smoothing={smoothing}), and this call continues a cache that holds {past} token(s) at "
                    f"decoder layer {self._gate_hooks[adapter_name].index}, but {problem}: the average of those tokens "
                    "is unknown, so the new tokens cannot be routed as the whole sequence would route them. Fill the "
                    "cache with this model in one run of calls in order (as generate() does, from an empty cache), or "
                    "pass the whole sequence without a cache (past_key_values/cache=None); assisted decoding rolls "
                    "the cache back and is not supported with RouterConfig.smoothing > 0."
                )
            last, started = state.last, state.started
        smoothed, last, started = smooth_logits(logits, smoothing, mask, last, started, start, fall)
        if cache is not None:
            self._track_cache(cache)
            self._smoothing[adapter_name] = _SmoothingState(weakref.ref(cache), past + length, batch, last, started)
        return smoothed

    def _track_cache(self, cache) -> None:
        """Make the routers' states follow what generation does to ``cache``'s rows: wrap, on this cache instance,
        ``reorder_cache`` (beam search), ``batch_select_indices`` and ``batch_repeat_interleave`` so the states do
        the same, and ``crop`` so that it invalidates them (a continuation then raises)."""
        if getattr(cache, "_scale_router_tracked", False):
            return
        routing = weakref.ref(self)

        def follow(method_name):
            method = getattr(cache, method_name, None)
            if method is None:
                return

            def wrapped(*args, **kwargs):
                result = method(*args, **kwargs)
                if routing() is not None:
                    argument = args[0] if args else next(iter(kwargs.values()), None)
                    routing()._states_follow(cache, method_name, argument)
                return result

            setattr(cache, method_name, wrapped)

        for method_name in (*ROW_OPERATIONS, "crop"):
            follow(method_name)
        cache._scale_router_tracked = True

    def _states_follow(self, cache, operation: str, argument) -> None:
        """Apply a cache's row operation (one of ``cache_rows.ROW_OPERATIONS``) to the states tied to it, or
        invalidate them (``"crop"``)."""
        for state in self._smoothing.values():
            if state.cache() is not cache:
                continue
            if operation == "crop":
                state.consumed = -1
                continue
            index = kept_rows(operation, argument, state.batch, state.last.device)
            state.last, state.started = state.last[index], state.started[index]
            state.batch = len(index)

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
            hook = _GateHook(self, model.get_submodule(layer_name), layer, layers)
            handle = hook.layer.register_forward_pre_hook(hook, with_kwargs=True)
            self._layer_hooks[layer_name] = (hook, handle)
        hook = self._layer_hooks[layer_name][0]
        hook.holders[adapter_name] = holder
        self._watch_model(model)  # (for RouterConfig.smoothing, which may be set on the config later)
        if config.hidden_expansion == 0:
            hook.ffn_only.add(adapter_name)
        self._handles[adapter_name] = []
        self._gate_hooks[adapter_name] = hook

    def _install_cosine(self, model, adapter_name, config, features, decoder) -> None:
        """The preservation copy enters at layer ``preserve_layers``; the LM head routes."""
        handles = []
        num_layers = len(model.get_submodule(decoder.layers))
        if config.preserve_layers < num_layers:
            layer = model.get_submodule(f"{decoder.layers}.{config.preserve_layers}")
            hook = _CopyOriginalSlice(layer.get_submodule(decoder.input_norm), features)
            handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        if self._head_router is None:
            self._head_router = LMHeadRouter(model.get_output_embeddings(), self)
        self._handles[adapter_name] = handles

    def cosine_threshold(self) -> float:
        configs = self.active_configs()
        routes = [c for c in configs if c.variant == "route" and c.route_rule == "cosine"]
        if len(routes) != 1 or len(configs) != 1:
            raise RuntimeError(
                f"SCALE-Route with the cosine rule needs its adapter active alone; active: {len(configs)} adapters."
            )
        return routes[0].route_threshold

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
            self._smoothing.pop(name, None)
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
            for handle in self._mask_handles:
                handle.remove()
            self._mask_handles, self.attention_mask = [], None
        if not self._handles and self._head_router is not None:
            self._head_router.remove()
            self._head_router = None

    @contextmanager
    def fused_lm_head(self, model: nn.Module):
        """TRL's fused LM head multiplies the backbone's last hidden state by ``lm_head.weight`` itself, so the
        cosine rule's hooks on the head never run: give it the adaptation path alone, at the base width. (The
        learned rule keeps the base width and needs nothing here.)"""
        saved = []
        for module in model.modules():
            for attr in ("preservation_copy", "routing"):
                modes = getattr(module, attr, None) if hasattr(module, "route_gated") else None
                if isinstance(modes, dict) and modes:
                    saved.append((modes, dict(modes)))
                    modes.update(dict.fromkeys(modes, "off"))
        try:
            yield
        finally:
            for modes, original in saved:
                modes.update(original)
