"""The smoothed decision: a router's logits averaged along the sequence before the threshold.

With ``RouterConfig.smoothing = a > 0`` a token is routed on the exponential moving average of its router's logits
over the preceding tokens of its row, ``s_t = a s_{t-1} + (1 - a) l_t`` (``smooth_logits``), not on its own logit
alone: a domain is a property of a stretch of text, and a single token's logit is noisy. The same function serves
both places that decide: ``router_fitting`` (calibrating the threshold on whole sequences) and the gate hook
(``peft_scale.gate_hook``, which carries the average from one cached call to the next).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .token_router import TokenRouter


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
