"""The learned rule's preservation copy: the base model's stream, carried beside the adapted one, so that a token
routed to the base model gets the base model's logits inside a mixed sequence too (``RouterConfig.preservation_copy``).

The learned router's gate (``peft_scale.gate_hook``) makes a token routed to the base model (``g = 0``) compute its
widened modules as the base model does, but its attention still reads the keys and values of the earlier tokens,
and the expansion changed those of the tokens it got. So where a sequence switches from new-domain text to old,
the old tokens after the switch drift. The copy removes that term. At the entry
of layer ``L = preserve_layers``, where the stream is still exactly the base model's, the batch is stacked with
itself along the batch dimension::

    rows 0 .. B-1:   x        the adapted stream (gated as without the copy)
    rows B .. 2B-1:  x_pres   the copy: gate 0 for every adapter, so only frozen base weights touch it

Attention is computed per row, so a copy row attends to copy rows only: every layer computes the base model on
them, with the base model's keys and values. After the last decoder layer each token keeps one row::

    h_t = h_pres_t   where the token went to the base model,   h_adapt_t   elsewhere

so a token routed to the base model gets exactly the base model's hidden state (and logits), whatever came before
it, and a token routed to the expansion gets the numbers it gets without the copy. (The final norm and the LM
head see ``B`` rows and the ``B``-row gates again.)

Where it runs: only in passes that record no gradient (evaluation, ``generate()``). Training computes the adapted
rows alone, as without the copy: the copy has no trainable input, and a token's loss is on the adapted rows.

Its cost: the layers from ``L`` up run on ``2B`` rows. It is skipped while no token of the sequence has gone to
the expansion (the copy would equal the adapted rows): a pass without a cache that sends no token to it, and every
pass on a cache while all the cache's passes sent none. When a later pass on that cache first sends one, the
cache's rows from layer ``L`` up are duplicated: they are the base model's, exactly.

The cache (a ``DynamicCache`` of ``DynamicLayer`` s, or of a hybrid model's linear-attention layers, whose conv and
recurrent states are per row too; others are refused) holds ``2B`` rows in the layers from ``L``
up once the copy is carried; those layers' row operations (beam search's ``reorder_cache``, contrastive search's
``batch_select_indices`` / ``batch_repeat_interleave``) are wrapped to apply to both halves alike. A
``DynamicCache`` whose layers from ``L`` up are a family's own dynamic layers (DeepSeek V4's compressed attention:
state SCALE cannot double or reorder) takes the ``2B`` rows in the pass that fills it from empty, and continuing it
is refused. Tensors of ``B`` rows that the decoder layers receive by keyword (position embeddings, a 4-D attention
mask, position ids; an ALiBi bias of ``B x heads`` rows, per batch row) are stacked the same way for the layers
from ``L`` up. With ``output_hidden_states=True`` those layers' outputs
hold ``2B`` rows (the adapted ones, then the copy's), except the last, which is the selected one. (Not measured
under ``torch.compile``: there the copy is carried in every pass, without the skip's data-dependent read.)
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn

from .cache_rows import ROW_OPERATIONS, kept_rows

# what the cache object of a pass remembers (an attribute on it): "base" while every pass on it sent no token to
# the expansion (the copy not carried: its rows above L are the base model's), "carried" once the copy is
CACHE_STATE = "_scale_preservation_copy"


def _stacked(value, batch: int):
    """``value`` (a decoder layer's argument) with its ``batch`` rows stacked twice, where it has them: a tensor of
    two or more dimensions whose first is ``batch``, or a tuple or list of such (the position embeddings)."""
    if isinstance(value, torch.Tensor):
        return torch.cat([value, value]) if value.dim() >= 2 and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_stacked(item, batch) for item in value)
    if type(value).__name__ == "BlockMask":
        raise RuntimeError(
            "SCALE: RouterConfig.preservation_copy stacks the batch with the base model's copy, and a flex-attention "
            "BlockMask cannot be stacked. Load the model with attn_implementation='sdpa' or 'eager', or set "
            "RouterConfig(preservation_copy=False)."
        )
    return value


# keyword arguments of decoder layers whose rows are ``batch x heads`` (BLOOM's and Falcon's ALiBi bias,
# ``(batch * heads, 1, seq)``, batch-major): stacked per batch row, all heads of a row together
BATCH_TIMES_HEADS_KWARGS = ("alibi",)


def _stacked_batch_major(value, batch: int):
    """A ``(batch * k, ...)`` tensor, batch-major, with its ``batch`` row groups stacked twice."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] % batch == 0:
        grouped = value.reshape(batch, -1, *value.shape[1:])
        return torch.cat([grouped, grouped]).reshape(-1, *value.shape[1:])
    return _stacked(value, batch)


def _cache_layer_types():
    """The cache layer classes whose rows the copy can double, duplicate and follow: attention layers of a
    ``DynamicCache`` and the linear-attention / state-space layers of hybrid models (conv and recurrent states
    per row), alone or beside attention, and the placeholders of layers without a cache."""
    from transformers import cache_utils

    names = (
        "DynamicLayer", "DynamicSlidingWindowLayer", "LinearAttentionLayer", "LinearAttentionAndFullAttentionLayer",
        "LinearAttentionAndSlidingWindowAttentionLayer", "DummyLayer",
    )  # fmt: skip
    return tuple(getattr(cache_utils, name) for name in names if hasattr(cache_utils, name))


def _supported(cache, index: int) -> bool:
    from transformers.cache_utils import DynamicCache

    layers, supported = getattr(cache, "layers", None), _cache_layer_types()
    return isinstance(cache, DynamicCache) and layers is not None and all(type(l) in supported for l in layers[index:])


def _check_cache(cache, index: int) -> None:
    layers, supported = getattr(cache, "layers", None), _cache_layer_types()
    if not _supported(cache, index):
        kinds = sorted({type(layer).__name__ for layer in (layers or [])[index:] if type(layer) not in supported})
        raise RuntimeError(
            f"SCALE: RouterConfig.preservation_copy stacks the batch with the base model's copy from decoder layer {index} "
            f"up, which needs the cache to grow to twice the rows there; a {type(cache).__name__} cannot"
            f"{f' (its {kinds} layers)' if kinds else ''}. Use the default DynamicCache (generate() without "
            "cache_implementation), or no cache (use_cache=False), or set RouterConfig(preservation_copy=False)."
        )


def _filled_lazily(cache, index: int) -> bool:
    """Whether every layer of ``cache`` from ``index`` up takes the rows its first update brings (a dynamic layer,
    of any subclass): an empty one can hold the copy's ``2B`` rows for one pass, though not be continued."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if not isinstance(cache, DynamicCache) or getattr(cache, "layers", None) is None:
        return False
    lazy = tuple(kind for kind in _cache_layer_types() if kind.__name__ != "DummyLayer") + (DynamicLayer,)
    return all(isinstance(layer, lazy) or type(layer).__name__ == "DummyLayer" for layer in cache.layers[index:])


def _state_slots(layer):
    """``(states, index)`` of every per-row state tensor a linear-attention cache layer holds (conv and recurrent
    states, where initialised): ``states[index]`` is the tensor."""
    slots = []
    for kind in ("conv", "recurrent"):
        states = getattr(layer, f"{kind}_states", None)
        initialised = getattr(layer, f"is_{kind}_states_initialized", {})
        if isinstance(states, dict):
            slots += [(states, i) for i, tensor in states.items() if initialised.get(i) and tensor is not None]
    return slots


def _has_keys(layer) -> bool:
    keys = getattr(layer, "keys", None)
    return getattr(layer, "is_initialized", False) and isinstance(keys, torch.Tensor) and keys.numel() > 0


def _duplicate_rows(cache, index: int) -> None:
    """Stack the rows of the cache's layers from ``index`` up with themselves (their states are the base model's)."""
    for layer in cache.layers[index:]:
        if _has_keys(layer):
            layer.keys, layer.values = torch.cat([layer.keys, layer.keys]), torch.cat([layer.values, layer.values])
        for states, i in _state_slots(layer):
            states[i] = torch.cat([states[i], states[i]])


def _cache_rows(layer) -> Optional[int]:
    """The rows a cache layer holds (``None``: it holds nothing)."""
    if _has_keys(layer):
        return layer.keys.shape[0]
    slots = _state_slots(layer)
    return slots[0][0][slots[0][1]].shape[0] if slots else None


def _follow_both_halves(layer) -> None:
    """Wrap one cache layer's row operations (on this instance) so they act on both halves of its ``2B`` rows: the
    rows a ``B``-row operation keeps (``cache_rows.kept_rows``), in the adapted half and again in the copy's."""
    if getattr(layer, "_scale_both_halves", False) or _cache_rows(layer) is None:
        return

    def select(rows):
        if _has_keys(layer):
            layer.keys, layer.values = layer.keys[rows], layer.values[rows]
        for states, i in _state_slots(layer):
            states[i] = states[i].index_select(0, rows.to(states[i].device))

    def follow(operation):
        def wrapped(argument):
            half = _cache_rows(layer) // 2
            device = layer.keys.device if _has_keys(layer) else None
            rows = kept_rows(operation, argument, half, device)
            select(torch.cat([rows, rows + half]))

        return wrapped

    for operation in ROW_OPERATIONS:
        setattr(layer, operation, follow(operation))
    layer._scale_both_halves = True


class PreservationCopy:
    """The preservation copy of the learned routers that read decoder layer ``index`` (one per such layer, owned by
    its gate hook, ``peft_scale.gate_hook.GateHook``).

    The gate hook calls ``begin`` after the routers decided; the hooks installed on first use (pre-hooks of the
    layers above ``index``: ``_stack_kwargs``; a forward hook of the last layer: ``_select``) do the rest.
    """

    def __init__(self, layers: nn.ModuleList, index: int) -> None:
        self.layers = layers
        self.index = index
        # while the pass in flight carries the copy: its batch size, routing, gates and cache
        self.batch: Optional[int] = None
        self._to_base: Optional[torch.Tensor] = None
        self._gates: dict[str, torch.Tensor] = {}
        self._names: list[str] = []
        self._cache = None
        # the pass's arguments stacked once, for every layer that receives the same object: id -> (it, stacked)
        self._stacked_arguments: dict[int, tuple] = {}
        self._handles: list = []

    def _install(self) -> None:
        if self._handles:
            return
        self._handles = [
            layer.register_forward_pre_hook(self._stack_kwargs, with_kwargs=True) for layer in self.layers[self.index + 1 :]
        ]
        self._handles.append(self.layers[-1].register_forward_hook(self._select))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self.batch = [], None

    def refuse_carried(self, cache) -> None:
        """A pass that does not carry the copy (adapters disabled, copy switched off, gradients on) cannot continue
        a cache that holds it (twice the rows above layer ``index``)."""
        if cache is not None and getattr(cache, CACHE_STATE, None) in ("carried", "single_pass"):
            raise RuntimeError(
                "SCALE: this call continues a cache filled with the preservation copy (RouterConfig(preservation_copy=True): "
                f"twice the rows from decoder layer {self.index} up), but this call does not carry the copy (adapters "
                "disabled, RouterConfig.preservation_copy switched off, or gradients recorded). Continue the cache with the "
                "same settings under torch.no_grad(), or start a new cache."
            )

    def begin(self, args, kwargs, hidden: torch.Tensor, to_base: torch.Tensor, gates: dict, names, cache, past: int):
        """Stack the batch with its copy if this pass needs it (``to_base``: ``(B, seq)`` bool, the tokens routed to
        the base model; ``gates``: the model's gates, adapter -> ``(B, seq, 1)``, of which those of ``names``, the
        pass's routed adapters, are stacked with zeros in place).
        Returns the decoder layer's new ``(args, kwargs)``, or ``None`` where the copy is not carried. (The gate
        hook clears ``batch`` at the start of every pass.)"""
        state = getattr(cache, CACHE_STATE, None) if cache is not None else None
        if past and state is None:
            raise RuntimeError(
                "SCALE: RouterConfig(preservation_copy=True), and this call continues a cache that this model did not fill "
                "with the copy's bookkeeping (filled without the copy, with gradients recorded, or by another model): "
                "whether its rows above decoder layer preserve_layers are the base model's is unknown. Fill the cache "
                "with this model under torch.no_grad() from an empty cache (as generate() does), or pass the whole "
                "sequence without a cache."
            )
        if past and state == "single_pass":
            raise RuntimeError(
                "SCALE: RouterConfig(preservation_copy=True), and this call continues a cache whose layers from "
                f"decoder layer {self.index} up ({sorted({type(layer).__name__ for layer in cache.layers[self.index:]})}) hold "
                "the copy's rows but cannot be doubled, duplicated or reordered by SCALE: it serves one pass only. "
                "Generate without a cache (use_cache=False), or set RouterConfig(preservation_copy=False)."
            )
        carried = state == "carried"
        # one device-to-host read per pass; compiled, the copy is always carried (no branch on data in the graph)
        if not carried and not torch.compiler.is_compiling() and bool(to_base.all()):
            if cache is not None:
                setattr(cache, CACHE_STATE, "base")
            return None
        if cache is not None and not past and not _supported(cache, self.index) and _filled_lazily(cache, self.index):
            # a family's own cache layers (DeepSeek V4's compressed attention): one pass fills them with 2B rows
            setattr(cache, CACHE_STATE, "single_pass")
        elif cache is not None:
            _check_cache(cache, self.index)
            if state == "base" and past:
                _duplicate_rows(cache, self.index)
            setattr(cache, CACHE_STATE, "carried")
        self._install()
        batch = hidden.shape[0]
        for name in names:
            gates[name] = torch.cat([gates[name], torch.zeros_like(gates[name])])
        self.batch, self._to_base, self._gates, self._names = batch, to_base, gates, list(names)
        self._cache = weakref.ref(cache) if cache is not None else None
        self._stacked_arguments = {}
        stacked_args, stacked_kwargs = self._stack_arguments(args[1:], kwargs)
        if args:
            return (torch.cat([hidden, hidden]), *stacked_args), stacked_kwargs
        return args, {**stacked_kwargs, "hidden_states": torch.cat([hidden, hidden])}

    def _stack_arguments(self, args, kwargs) -> tuple[tuple, dict]:
        """A decoder layer's other arguments with their ``B`` rows stacked (``_stacked``), each object once per
        pass: the layers receive the same position embeddings and mask objects, one after the other."""

        def stacked(value, key=None):
            known = self._stacked_arguments.get(id(value))
            if known is None or known[0] is not value:
                stack = _stacked_batch_major if key in BATCH_TIMES_HEADS_KWARGS else _stacked
                known = self._stacked_arguments[id(value)] = (value, stack(value, self.batch))
            return known[1]

        return tuple(stacked(arg) for arg in args), {key: stacked(value, key) for key, value in kwargs.items()}

    def _stack_kwargs(self, module, args, kwargs):
        """Pre-hook of a layer above ``index``: its ``B``-row arguments, stacked like the hidden states."""
        if self.batch is None:
            return None
        stacked_args, stacked_kwargs = self._stack_arguments(args[1:], kwargs)
        return ((args[0], *stacked_args) if args else args), stacked_kwargs

    def _select(self, module, args, output):
        """Forward hook of the last decoder layer: per token, the copy's row or the adapted one (``B`` rows again)."""
        if self.batch is None:
            return None
        batch, self.batch, self._stacked_arguments = self.batch, None, {}
        sequence = isinstance(output, (tuple, list))  # (OpenAI GPT's block returns a list)
        hidden = output[0] if sequence else output
        # (batch, seq) -> (batch, seq, 1, ...): a stream of parallel copies (DeepSeek V4) has one more dimension
        to_base = self._to_base.reshape(*self._to_base.shape, *(1,) * (hidden.dim() - self._to_base.dim()))
        chosen = torch.where(to_base, hidden[batch:], hidden[:batch])
        for name in self._names:
            self._gates[name] = self._gates[name][:batch]
        cache = self._cache() if self._cache is not None else None
        if cache is not None and getattr(cache, CACHE_STATE, None) == "carried":
            for layer in cache.layers[self.index :]:
                _follow_both_halves(layer)
        return type(output)([chosen, *output[1:]]) if sequence else chosen
