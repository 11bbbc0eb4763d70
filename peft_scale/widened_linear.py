"""One adapter's widened linear layer as a single autograd node, its backward written out by hand."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _product(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` computed in ``dtype``: the dtype the matching forward product ran in (autocast's, or the weight's)."""
    return a.to(dtype) @ b.to(dtype)


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    """``out += a @ b`` in place (``out`` may be a column slice of a larger buffer)."""
    if out.dtype == a.dtype == b.dtype == dtype:
        torch.addmm(out, a, b, out=out)  # addmm.out, not addmm_: FLOP counters count the former only
    else:
        out.add_(_product(a, b, dtype))


def _blocks_forward(x, weight, bias, w12, w21, b21, w22, gate):
    """``WidenedLinear``'s forward: ``(y, [W21 W22] or None, the dtype each product ran in)``."""
    d = weight.shape[1]
    # the base product sees exactly what nn.Linear would: the original features as a contiguous tensor
    x_orig = x[..., :d].contiguous() if x.shape[-1] > d else x
    y = F.linear(x_orig, weight, bias)
    dtypes = {"base": y.dtype}
    if w12 is not None:
        from_new = F.linear(x[..., d:].to(w12.dtype), w12)
        dtypes["w12"] = from_new.dtype
        from_new = from_new.to(y.dtype)
        y = y + (from_new * gate.to(y.dtype) if gate is not None else from_new)
    w_new = None
    if w21 is not None:
        # [W21 W22] concatenates the small trainable blocks, never the frozen W
        w_new = w21 if w22 is None else torch.cat([w21, w22], dim=1)
        new = F.linear((x_orig if w22 is None else x).to(w_new.dtype), w_new, b21)
        dtypes["new"] = new.dtype
        y = torch.cat([y, new.to(y.dtype)], dim=-1)
    return y, w_new, dtypes


class WidenedLinear(torch.autograd.Function):
    """The block matrix of ``peft_scale.layer.Linear`` for one adapter, forward and backward in one node::

        [ y    ]   [ W    W12 ] [ x    ]   [ b   ]
        [ y_up ] = [ W21  W22 ] [ x_up ] + [ b21 ]

    Forward does what ``layer.Linear``'s general path does: ``W x + b`` exactly as ``nn.Linear`` computes it on a
    contiguous copy of the original features (so the original output stays bit-identical to the base layer's),
    ``W12 x_up`` added to it, and ``[W21 W22] [x; x_up]`` as one product. Backward, with ``g = [g_y; g_up]``::

        dx          = g_up [W21 W22] + [g_y W ; g_y W12]      (one buffer; the second term added into its slices)
        dW12        = g_yᵀ x_up
        d[W21 W22]  = g_upᵀ [x; x_up]
        db21        = Σ g_up

    These are exactly the blocks' products (the FLOPs autograd would do: ``tests/test_efficiency.py``). What
    recording the general path would add, and this node does not: one autograd node per op (the input's split,
    the copy of its original slice, each product, the output's concatenation), the zero-filled gradient of the
    unused split piece, the concatenation of the split's gradients and the sum of the input's two gradients. At
    small token counts, where a step's time follows its number of operations (a GPU on a 135M model), that
    overhead is most of what full width costs beyond its arithmetic.

    With a gate ``g`` (the learned router's 0/1 or soft value per token, shape ``(..., 1)``) the first row is
    ``y = W x + b + g W12 x_up``, and ``g_y`` reaches ``W12`` and ``x_up`` as ``g g_y``: a token routed to the base
    model gives the new -> original block no gradient.

    ``W`` and ``b`` are frozen (the caller checks): they get no gradient. An absent block is ``None``. Each
    product's backward runs in the dtype its forward ran in, as autograd's would (under autocast: the autocast
    dtype; otherwise the weight's dtype, the input cast to it as PEFT's layers do).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, w12, w21, b21, w22, gate):
        y, w_new, dtypes = _blocks_forward(x, weight, bias, w12, w21, b21, w22, gate)
        ctx.dtypes = dtypes
        ctx.has_w22 = w22 is not None
        ctx.save_for_backward(x, weight, w12, w_new, gate)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, w12, w_new, gate = ctx.saved_tensors
        out, d = weight.shape
        dtypes = ctx.dtypes
        need_x, _, _, need_w12, need_w21, need_b21, need_w22, _ = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        g_y, g_up = g[:, :out], g[:, out:]
        # what reaches W12 and x_up through it: g g_y (the gated tokens' rows are zero)
        g_y12 = g_y if gate is None else g_y * gate.reshape(-1, 1).to(g_y.dtype)
        grad_x = grad_w12 = grad_w21 = grad_b21 = grad_w22 = None
        if need_x:
            if ctx.has_w22:  # g_up [W21 W22] spans every input column: start from it, add the rest into its slices
                grad_x = _product(g_up, w_new, dtypes["new"]).to(x.dtype)
                _add_product(grad_x[:, :d], g_y, weight, dtypes["base"])
                if w12 is not None:
                    _add_product(grad_x[:, d:], g_y12, w12, dtypes["w12"])
            else:
                grad_x = _product(g_y, weight, dtypes["base"]).to(x.dtype)
                if w_new is not None:  # W21 alone: the input is not widened
                    _add_product(grad_x, g_up, w_new, dtypes["new"])
                if x2.shape[1] > d:  # widened input without W21/W22: only W12 (or nothing) reads x_up
                    if w12 is not None:
                        from_new = _product(g_y12, w12, dtypes["w12"]).to(x.dtype)
                    else:
                        from_new = grad_x.new_zeros(len(g_y), x2.shape[1] - d)
                    grad_x = torch.cat([grad_x, from_new], dim=1)
            grad_x = grad_x.view(x.shape)
        if need_w12:
            grad_w12 = _product(g_y12.T, x2[:, d:], dtypes["w12"])
        if need_w21 or need_w22:
            grad_new = _product(g_up.T, x2 if ctx.has_w22 else x2[:, :d], dtypes["new"])
            grad_w21, grad_w22 = (grad_new[:, :d], grad_new[:, d:]) if ctx.has_w22 else (grad_new, None)
        if need_b21:
            grad_b21 = g_up.to(dtypes["new"]).sum(0)
        return grad_x, None, None, grad_w12, grad_w21, grad_b21, grad_w22, None


def widened_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    w12: Optional[torch.Tensor] = None,
    w21: Optional[torch.Tensor] = None,
    b21: Optional[torch.Tensor] = None,
    w22: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``[W x + b + g W12 x_up ; W21 x + b21 + W22 x_up]`` for ``x = [x; x_up]`` (see ``WidenedLinear``).

    Where no gradient is recorded (``torch.no_grad()``, inference mode: evaluation and ``generate()``) the same
    products run without the autograd node: creating it and saving its inputs is a fixed cost per call, which at a
    decoding step's few tokens is a visible share of a widened layer's time (``benchmarks/router_cost.py``, the
    ``with_node/without`` ratio).
    """
    if not torch.is_grad_enabled():
        return _blocks_forward(x, weight, bias, w12, w21, b21, w22, gate)[0]
    return WidenedLinear.apply(x, weight, bias, w12, w21, b21, w22, gate)
