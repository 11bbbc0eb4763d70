"""WidenedLinear, the single autograd node of one adapter's widened linear layer: its hand-written backward against
finite differences and against autograd's own gradients of the general path, in fp32, mixed dtypes and autocast;
and when ScaleLayer uses it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_scale.layer import ScaleLayer
from peft_scale.widened_linear import widened_linear

D_IN, D_OUT = 5, 7

# (out_expansion, in_expansion, open_w12): every combination of blocks a layer can hold
BLOCKS = {
    "w21 only (gate/up)": (3, 0, True),
    "w12 only (down)": (0, 2, True),
    "all four blocks": (3, 2, True),
    "w21 and w22 (preserve)": (3, 2, False),
    "widened input, no block reads it": (0, 2, False),
}


def make_layer(out_expansion, in_expansion, open_w12, bias=True, dtype=torch.float32, adapter_dtype=None):
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT, bias=bias).to(dtype).requires_grad_(False)
    layer = ScaleLayer(base, "a", out_expansion, in_expansion, open_w12=open_w12)
    with torch.no_grad():  # every block non-zero, so each gradient path is exercised
        for blocks in (layer.scale_w12, layer.scale_w21, layer.scale_b21, layer.scale_w22):
            for p in blocks.values():
                p.normal_()
    if adapter_dtype is not None:
        for blocks in (layer.scale_w12, layer.scale_w21, layer.scale_b21, layer.scale_w22):
            for name in list(blocks):
                blocks[name] = nn.Parameter(blocks[name].detach().to(adapter_dtype))
    return layer


def blocks_of(layer):
    get = lambda blocks: blocks.get("a")  # noqa: E731
    return [get(layer.scale_w12), get(layer.scale_w21), get(layer.scale_b21), get(layer.scale_w22)]


def general_path(layer, x):
    """The layer's general path (several ops, autograd's own backward), which the single node replaces."""
    layer._takes_one_node = lambda: False
    try:
        return layer(x)
    finally:
        del layer._takes_one_node


def gradients(layer, x, forward):
    x = x.detach().requires_grad_(True)
    params = [p for p in blocks_of(layer) if p is not None]
    out = forward(layer, x)
    torch.manual_seed(1)
    (out.float() * torch.randn(out.shape)).sum().backward()
    grads = [x.grad] + [p.grad for p in params]
    for t in [x, *params]:
        t.grad = None
    return out, grads


@pytest.mark.parametrize("blocks", list(BLOCKS.values()), ids=list(BLOCKS))
def test_backward_matches_finite_differences(blocks):
    layer = make_layer(*blocks, dtype=torch.float64, adapter_dtype=torch.float64)
    base = layer.base_layer
    x = torch.randn(2, 3, D_IN + blocks[1], dtype=torch.float64, requires_grad=True)
    params = blocks_of(layer)

    def fn(x, *params):
        return widened_linear(x, base.weight, base.bias, *params)

    assert torch.autograd.gradcheck(fn, (x, *params))


@pytest.mark.parametrize("blocks", list(BLOCKS.values()), ids=list(BLOCKS))
@pytest.mark.parametrize("bias", [True, False])
def test_one_node_equals_the_general_path_in_fp32(blocks, bias):
    layer = make_layer(*blocks, bias=bias)
    x = torch.randn(2, 3, D_IN + blocks[1])
    out, grads = gradients(layer, x, lambda layer, x: layer(x))
    assert out.grad_fn.name() == "WidenedLinearBackward"
    reference, reference_grads = gradients(layer, x, general_path)
    assert out.grad_fn.name() != reference.grad_fn.name()  # the comparison is between two different paths
    assert torch.equal(out, reference)  # the same forward ops: bit-identical
    for grad, expected in zip(grads, reference_grads):
        torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("blocks", list(BLOCKS.values()), ids=list(BLOCKS))
def test_one_node_equals_the_general_path_with_bf16_base_and_fp32_adapter(blocks):
    """PEFT keeps adapter weights in fp32 on a bf16 model: each product runs in its weight's dtype."""
    layer = make_layer(*blocks, dtype=torch.bfloat16, adapter_dtype=torch.float32)
    x = torch.randn(2, 3, D_IN + blocks[1], dtype=torch.bfloat16)
    out, grads = gradients(layer, x, lambda layer, x: layer(x))
    reference, reference_grads = gradients(layer, x, general_path)
    assert out.dtype == torch.bfloat16 and torch.equal(out, reference)
    for grad, expected in zip(grads, reference_grads):
        assert grad.dtype == expected.dtype
        torch.testing.assert_close(grad, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("blocks", list(BLOCKS.values()), ids=list(BLOCKS))
def test_one_node_equals_the_general_path_under_autocast(blocks):
    """What Trainer(bf16=True) does: fp32 weights, products in bf16 under autocast, backward outside it."""
    layer = make_layer(*blocks)
    x = torch.randn(2, 3, D_IN + blocks[1])

    def autocast(forward):
        def run(layer, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return forward(layer, x)

        return run

    out, grads = gradients(layer, x, autocast(lambda layer, x: layer(x)))
    reference, reference_grads = gradients(layer, x, autocast(general_path))
    assert out.dtype == torch.bfloat16 and torch.equal(out, reference)
    for grad, expected in zip(grads, reference_grads):
        assert grad.dtype == expected.dtype == torch.float32
        torch.testing.assert_close(grad, expected, rtol=2e-2, atol=2e-2)


def test_the_general_path_runs_where_the_one_node_does_not_apply():
    class QuantizedLinear(nn.Linear):  # a subclass with its own forward, as bitsandbytes' layers have
        def forward(self, x):
            return super().forward(x)

    def grad_fn(layer, width):
        return layer(torch.randn(2, width, requires_grad=True)).grad_fn.name()

    plain = ScaleLayer(nn.Linear(D_IN, D_OUT).requires_grad_(False), "a", 3, 2)
    assert grad_fn(plain, D_IN + 2) == "WidenedLinearBackward"
    own_forward = ScaleLayer(QuantizedLinear(D_IN, D_OUT).requires_grad_(False), "a", 3, 2)
    trained_base = ScaleLayer(nn.Linear(D_IN, D_OUT), "a", 3, 2)  # the base weight itself needs a gradient
    packed = ScaleLayer(nn.Linear(D_IN, 2 * D_OUT).requires_grad_(False), "a", 3, 0, out_parts=2)
    two_adapters = ScaleLayer(nn.Linear(D_IN, D_OUT).requires_grad_(False), "a", 3, 2)
    two_adapters.update_layer("b", 1, 1, init="normal")
    two_adapters.set_adapter(["a", "b"])
    for layer, width in [(own_forward, D_IN + 2), (trained_base, D_IN + 2), (packed, D_IN), (two_adapters, D_IN + 3)]:
        assert grad_fn(layer, width) != "WidenedLinearBackward"
    trained = [p for p in trained_base.parameters() if p.requires_grad]
    trained_base(torch.randn(2, D_IN + 2)).sum().backward()
    assert all(p.grad is not None for p in trained)  # base weight included


# ------------------------------------------------------------------------ the learned router's per-token gate

GATED_BLOCKS = {name: blocks for name, blocks in BLOCKS.items() if blocks[1] and blocks[2]}  # layers with a W12


def gated_layer(blocks, gate, **kwargs):
    """A layer whose W12 the router gates, with the gate of this forward pass set as the router would set it."""
    from peft_scale.route_decisions import RouteGates

    layer = make_layer(*blocks, **kwargs)
    layer.route_gated["a"] = True
    layer.route_gates = RouteGates()
    layer.route_gates.gates["a"] = gate
    return layer


@pytest.mark.parametrize("blocks", list(GATED_BLOCKS.values()), ids=list(GATED_BLOCKS))
def test_gated_backward_matches_finite_differences(blocks):
    layer = make_layer(*blocks, dtype=torch.float64, adapter_dtype=torch.float64)
    base = layer.base_layer
    x = torch.randn(2, 3, D_IN + blocks[1], dtype=torch.float64, requires_grad=True)
    # 0/1 (router_gate="hard") and fractional (router_gate="soft") gates
    gate = torch.tensor([[1.0, 0.0, 0.3], [0.0, 0.7, 1.0]], dtype=torch.float64).unsqueeze(-1)

    def fn(x, *params):
        return widened_linear(x, base.weight, base.bias, *params, gate=gate)

    assert torch.autograd.gradcheck(fn, (x, *blocks_of(layer)))


@pytest.mark.parametrize("blocks", list(GATED_BLOCKS.values()), ids=list(GATED_BLOCKS))
def test_gated_one_node_equals_the_gated_general_path(blocks):
    gate = torch.tensor([[1.0, 0.0, 0.3], [0.0, 0.7, 1.0]]).unsqueeze(-1)  # (fractional: router_gate="soft")
    layer = gated_layer(blocks, gate)
    x = torch.randn(2, 3, D_IN + blocks[1])
    out, grads = gradients(layer, x, lambda layer, x: layer(x))
    assert out.grad_fn.name() == "WidenedLinearBackward"
    reference, reference_grads = gradients(layer, x, general_path)
    assert torch.equal(out, reference)
    for grad, expected in zip(grads, reference_grads):
        torch.testing.assert_close(grad, expected)
    # a gated token's original output is exactly the base layer's
    closed = gate[..., 0] == 0
    base_out = layer.base_layer(x[..., :D_IN].contiguous())
    assert torch.equal(out[..., :D_OUT][closed], base_out[closed])
    assert not torch.equal(out[..., :D_OUT][~closed], base_out[~closed])


def test_a_gate_of_another_shape_is_a_clear_error():
    layer = gated_layer(GATED_BLOCKS["all four blocks"], torch.ones(2, 5, 1))
    with pytest.raises(RuntimeError, match=r"no routing decision of adapter 'a' for this input of shape \(2, 3, 7\)"):
        layer(torch.randn(2, 3, D_IN + 2))


@pytest.mark.parametrize("blocks", list(BLOCKS.values()), ids=list(BLOCKS))
@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode"])
def test_without_grad_the_products_run_without_the_node_and_give_the_same_output(blocks, grad_mode, monkeypatch):
    """Evaluation and generate(): no autograd node is created, and the output is the node's, bit for bit."""
    from peft_scale import widened_linear as module

    layer = make_layer(*blocks)
    x = torch.randn(2, 3, D_IN + blocks[1])
    with torch.no_grad():
        expected = module.WidenedLinear.apply(x, layer.base_layer.weight, layer.base_layer.bias, *blocks_of(layer), None)
    applied = []
    monkeypatch.setattr(module.WidenedLinear, "apply", lambda *args: applied.append(args))
    with getattr(torch, grad_mode)():
        out = layer(x)
    assert applied == [] and out.grad_fn is None
    assert torch.equal(out, expected)


def test_without_grad_a_gated_token_still_gets_the_base_layers_output():
    gate = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]).unsqueeze(-1)
    layer = gated_layer(GATED_BLOCKS["all four blocks"], gate)
    x = torch.randn(2, 3, D_IN + 2)
    with torch.no_grad():
        out = layer(x)
        reference = general_path(layer, x)
        base_out = layer.base_layer(x[..., :D_IN].contiguous())
    assert torch.equal(out, reference)
    closed = gate[..., 0] == 0
    assert torch.equal(out[..., :D_OUT][closed], base_out[closed])
    assert not torch.equal(out[..., :D_OUT][~closed], base_out[~closed])
