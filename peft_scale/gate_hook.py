"""The learned rule's gate hook: where a token's routing decision is made, and where it is applied.

Made: in one forward pre-hook on decoder layer ``L = preserve_layers`` (``GateHook``, one per such layer, installed by
``peft_scale.routing.Routing.install``). Its input is the stream entering layer ``L``, still exactly the base model's
own hidden state (nothing below ``L`` is gated or opened), so the decision is made in the same forward pass, before
any module it gates runs: training, evaluation and ``generate()`` (with or without the KV cache: the router is per
token) all see the same decisions. Per active learned-route adapter the hook runs its ``TokenRouter``
(``peft_scale.token_router``) on that stream, on each token's own logit or on the moving average along the sequence
(``RouterConfig.smoothing``, ``peft_scale.smoothing``); with several adapters active it gives each token to one of
them (``peft_scale.adapter_choice.choose_adapters``). It turns the decisions into one gate per adapter
(``gate_values``), ``(batch, seq, 1)``, 0 or 1 (in ``[0, 1]`` with ``RouterConfig(gate="soft")``), and stores them in
the model's one ``RouteGates`` (``peft_scale.route_decisions``), with the pass's ``RouteResult`` (``last_routing``).

Applied: by every module that reads ``RouteGates`` (shared by reference), which multiplies each contribution of the
expansion to the original features by its adapter's gate::

    y   = W x + b + g W12 x_up              layer.Linear.forward (or layer.Linear._widened_linear: one autograd node)
    out = norm(x) + g P rms(x_up) g_up      norm.RMSNorm.forward (the final norm: the LM head's new block)
    y   = experts(x) + sum_a g_a experts_a(x)   experts.Experts.forward (the gate per token: Experts._token_gate)

A token with ``g = 0`` gets nothing of the expansion and gives it no gradient; a sequence whose tokens all have
``g = 0`` is computed exactly as the base model computes it. In an inference pass that sends no token to an FFN-mode
adapter, the hook marks it idle (``RouteGates.idle``) and those modules skip its products (``RouteGates.busy``).
(A token with ``g = 0`` in a mixed sequence still attends to earlier tokens whose states the expansion changed,
unless ``RouterConfig.preservation_copy`` carries the base model's stream beside the adapted one: the hook starts it,
``peft_scale.preservation_copy``.)

The cache state: with ``RouterConfig.smoothing > 0`` a decision depends on the preceding tokens, so the average is
carried from one cached call to the next with the cache object (``SequenceAverages``), and follows the cache's row
operations, or the continuation is refused: cached generation decides as the whole sequence does.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .adapter_choice import check_routed_together, choose_adapters, outranking
from .cache_rows import ROW_OPERATIONS, kept_rows
from .preservation_copy import PreservationCopy
from .route_decisions import RouteResult
from .smoothing import smooth_logits, smoothing_start
from .token_router import router_stream


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


class _MaskCapture:
    """Forward pre-hook of the whole model: its call's ``attention_mask`` (by keyword or at its ``position``) goes to
    ``SequenceAverages.attention_mask`` for the pass in flight; ``release`` (its forward hook) drops it after an
    inference call. (An object, not a closure, so that a deep copy of the model hooks the copy's state.)"""

    def __init__(self, averages: "SequenceAverages", position: Optional[int]) -> None:
        self.averages = averages
        self.position = position

    def __call__(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and self.position is not None and len(args) > self.position:
            mask = args[self.position]
        self.averages.attention_mask = mask if isinstance(mask, torch.Tensor) else None

    def release(self, module, args, kwargs, output):
        if not torch.is_grad_enabled():
            self.averages.attention_mask = None


class SequenceAverages:
    """The smoothed routers' state along the sequence (``RouterConfig.smoothing > 0``), one per ``Routing``.

    A smoothed decision needs, besides this call's logits, the padding of this call's rows and, when the call
    continues a cache, each row's average after the cached tokens. So it keeps: the 2-D ``attention_mask`` of the
    model call in flight (captured by hooks on the whole model, ``watch_model``: ``generate()`` calls the model
    itself, not ``ScaleModel.forward``), and each adapter's average as the last cached call left it, tied to that
    cache object (``_SmoothingState``). The cache's row operations (beam search, contrastive search) are patched on
    the cache instance so the averages follow its rows, and its ``crop`` invalidates them (``_track_cache``).
    """

    def __init__(self) -> None:
        self.attention_mask: Optional[torch.Tensor] = None
        self._mask_handles: list = []
        self._smoothing: dict[str, _SmoothingState] = {}  # adapter -> its average where the last cached call left it

    def forget(self, adapter_name: str) -> None:
        """Drop ``adapter_name``'s average (its router is being removed)."""
        self._smoothing.pop(adapter_name, None)

    def unwatch(self) -> None:
        """Remove the hooks on the whole model (the last learned router is gone)."""
        for handle in self._mask_handles:
            handle.remove()
        self._mask_handles, self.attention_mask = [], None

    def watch_model(self, model: nn.Module) -> None:
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
        self, adapter_name: str, logits: torch.Tensor, smoothing: float, cache, past: int, mask, start=None, fall=None,
        layer: int = 0,
    ) -> torch.Tensor:  # fmt: skip
        """``logits`` (batch, seq) of ``adapter_name``'s router, smoothed (``smooth_logits``, from ``start`` when given,
        falling with ``fall`` when given)
        over the preceding tokens of each row: those of this call and, when it continues a cache, those the cache
        holds (whose average the previous call on that cache left in ``self._smoothing``). Refuses a continuation it
        has no exact state for. ``layer``: the decoder layer the router reads (for the error)."""
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
                    f"decoder layer {layer}, but {problem}: the average of those tokens "
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
        averages = weakref.ref(self)

        def follow(method_name):
            method = getattr(cache, method_name, None)
            if method is None:
                return

            def wrapped(*args, **kwargs):
                result = method(*args, **kwargs)
                if averages() is not None:
                    argument = args[0] if args else next(iter(kwargs.values()), None)
                    averages()._states_follow(cache, method_name, argument)
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


class GateHook:
    """Forward pre-hook of decoder layer ``L``: the decision of every active learned router that reads this layer,
    stored in ``RouteGates`` (one gate per adapter). One hook per layer, shared by the adapters whose routers read it,
    so that several of them decide jointly (``choose_adapters``).

    Args:
        routing: the model's ``peft_scale.routing.Routing`` (its configs, gates, averages and ``last``).
        layer: decoder layer ``L``; index: ``L``; layers: the decoder's layer list (for the preservation copy).
    """

    def __init__(self, routing, layer: nn.Module, index: int, layers: nn.ModuleList) -> None:
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
        (``SequenceAverages.attention_mask``), over the cached tokens and these, or over these alone."""
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
        mask = self.routing.averages.attention_mask
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
            logits = self.routing.averages.smoothed(
                name, own, smoothing[name], *sequence, start=start, fall=configs[name].router.smoothing_fall,
                layer=self.index,
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
