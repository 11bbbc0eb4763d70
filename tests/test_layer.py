"""``peft_scale.layer.Linear`` (``ScaleLayer``) on its own: the block matrix, initialisation, packed projections, merging."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_scale.layer import ScaleLayer, init_rows_normal, init_rows_svd


def linear(in_features, out_features, bias=False, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias).requires_grad_(False)


def test_output_widening_appends_w21_rows():
    base = linear(6, 10, bias=True)
    layer = ScaleLayer(base, "a", out_expansion=3)
    x = torch.randn(4, 6)
    y = layer(x)
    assert y.shape == (4, 13)
    assert torch.equal(y[:, :10], base(x))
    expected_new = x @ layer.scale_w21["a"].T + layer.scale_b21["a"]
    torch.testing.assert_close(y[:, 10:], expected_new)
    assert torch.count_nonzero(layer.scale_b21["a"]) == 0  # new biases start at zero


def test_input_widening_adds_w12_columns_starting_at_zero():
    base = linear(6, 10)
    layer = ScaleLayer(base, "a", in_expansion=3)
    x, x_up = torch.randn(4, 6), torch.randn(4, 3)
    assert torch.count_nonzero(layer.scale_w12["a"]) == 0
    assert torch.equal(layer(torch.cat([x, x_up], -1)), base(x))  # zero W12: original output untouched
    with torch.no_grad():
        layer.scale_w12["a"].normal_()
    torch.testing.assert_close(layer(torch.cat([x, x_up], -1)), base(x) + x_up @ layer.scale_w12["a"].T)


def test_init_weights_false_draws_w12_and_b21_as_a_fresh_linear_over_the_widened_input():
    base = linear(60, 100, bias=True)
    exact = ScaleLayer(base, "a", out_expansion=20, in_expansion=40)
    torch.manual_seed(0)
    drawn = ScaleLayer(base, "a", out_expansion=20, in_expansion=40, init_weights=False)
    w12, b21 = drawn.scale_w12["a"], drawn.scale_b21["a"]
    bound = 1 / math.sqrt(60 + 40)  # torch's nn.Linear(100, ...): uniform in +-1/sqrt(fan_in)
    for block in (w12, b21):
        assert block.abs().max() <= bound and block.abs().max() > 0.9 * bound
        assert math.isclose(block.std().item(), bound / math.sqrt(3), rel_tol=0.15)
    assert torch.count_nonzero(exact.scale_w12["a"]) == 0 and torch.count_nonzero(exact.scale_b21["a"]) == 0
    x = torch.randn(4, 60 + 40)
    y = drawn(x)  # the original output moves from the start: W x + b + W12 x_up
    torch.testing.assert_close(y[:, :100], base(x[:, :60]) + x[:, 60:] @ w12.T)
    torch.testing.assert_close(y[:, 100:], x @ torch.cat([drawn.scale_w21["a"], drawn.scale_w22["a"]], 1).T + b21)


def test_packed_projections_get_new_rows_after_each_part():
    """Phi-3's gate_up_proj packs [gate; up]; after widening, chunk(2) must give [gate; gate_new], [up; up_new]."""
    base = linear(6, 2 * 8)
    layer = ScaleLayer(base, "a", out_expansion=3, out_parts=2)
    w21 = layer.scale_w21["a"]
    assert w21.shape == (6, 6)
    x = torch.randn(5, 6)
    gate, up = layer(x).chunk(2, dim=-1)
    base_gate, base_up = base(x).chunk(2, dim=-1)
    torch.testing.assert_close(gate, torch.cat([base_gate, x @ w21[:3].T], -1))
    torch.testing.assert_close(up, torch.cat([base_up, x @ w21[3:].T], -1))


def test_packed_parts_initialised_from_their_own_rows():
    base = linear(16, 2 * 8)
    with torch.no_grad():
        base.weight[8:] *= 100.0  # the `up` half is much larger than the `gate` half
    layer = ScaleLayer(base, "a", out_expansion=4, out_parts=2)
    gate_rows, up_rows = layer.scale_w21["a"][:4], layer.scale_w21["a"][4:]
    assert up_rows.norm() > 20 * gate_rows.norm()


@pytest.mark.parametrize("shape", [(64, 32), (1600, 1100)])  # exact SVD; randomized SVD (r small next to the rank)
def test_svd_init_lies_in_the_principal_subspace_at_the_base_scale(shape):
    torch.manual_seed(0)
    n, d = shape
    weight = torch.randn(n, d) @ torch.diag(1.0 / torch.arange(1, d + 1))  # power-law spectrum, as trained weights
    _, _, vh = torch.linalg.svd(weight, full_matrices=False)
    k = 4
    rows = init_rows_svd(weight, k)
    assert rows.shape == (k, d)
    # the rows are combinations of the top-k right singular vectors (up to the randomized SVD's accuracy)
    outside = rows - rows @ vh[:k].T @ vh[:k]
    assert outside.norm() / rows.norm() < 1e-3


def test_svd_init_matches_the_top_k_second_moment():
    torch.manual_seed(0)
    weight = torch.randn(64, 32) @ torch.diag(1.0 / torch.arange(1, 33))
    k = 4
    # expected squared row norm: sum of the top-k squared singular values over the number of rows
    expected = (torch.linalg.svdvals(weight)[:k] ** 2).sum() / weight.shape[0]
    torch.manual_seed(1)
    samples = torch.stack([init_rows_svd(weight, k).pow(2).sum(1).mean() for _ in range(400)])
    assert abs(samples.mean() / expected - 1) < 0.1


def test_svd_init_full_rank_matches_the_rows_second_moment():
    torch.manual_seed(0)
    weight = torch.randn(12, 5)
    rows = init_rows_svd(weight, 20000)  # num_rows >= rank: drawn from N(0, WᵀW / n)
    empirical = rows.T @ rows / rows.shape[0]
    torch.testing.assert_close(empirical, weight.T @ weight / weight.shape[0], atol=0.05, rtol=0.05)


def test_normal_init_uses_the_base_weight_scale():
    torch.manual_seed(0)
    weight = torch.randn(200, 100) * 0.3
    rows = init_rows_normal(weight, 500)
    assert math.isclose(rows.std().item(), 0.3, rel_tol=0.02)
    assert abs(rows.mean().item()) < 0.01


def test_several_active_adapters_concatenate_in_order():
    gate = ScaleLayer(linear(6, 10), "a", out_expansion=2)
    gate.update_layer("b", out_expansion=3, in_expansion=0, init="normal")
    gate.set_adapter(["a", "b"])
    x = torch.randn(4, 6)
    y = gate(x)
    assert y.shape == (4, 15)
    torch.testing.assert_close(y[:, 10:12], x @ gate.scale_w21["a"].T)
    torch.testing.assert_close(y[:, 12:], x @ gate.scale_w21["b"].T)


def test_wrong_input_width_names_the_problem():
    layer = ScaleLayer(linear(6, 10), "a", in_expansion=3)
    with pytest.raises(RuntimeError, match=r"expected 9 input features \(6 original \+ \{'a': 3\} new\) but got 7"):
        layer(torch.randn(2, 7))


def test_only_linear_and_conv1d_can_be_widened():
    with pytest.raises(TypeError, match="SCALE widens nn.Linear and transformers Conv1D layers, got Embedding"):
        ScaleLayer(nn.Embedding(10, 4), "a", out_expansion=2)


def test_packed_parts_must_divide_the_output():
    with pytest.raises(ValueError, match="cannot hold 3 packed projections"):
        ScaleLayer(linear(6, 10), "a", out_expansion=2, out_parts=3)


def test_conv1d_is_widened_like_linear():
    torch.manual_seed(0)
    base = Conv1D(10, 6).requires_grad_(False)  # GPT-2 style: weight is (in, out)
    nn.init.normal_(base.bias)
    up = ScaleLayer(base, "a", out_expansion=3)
    x = torch.randn(2, 5, 6)
    y = up(x)
    assert torch.equal(y[..., :10], base(x))
    torch.testing.assert_close(y[..., 10:], x @ up.scale_w21["a"].T)
    down = ScaleLayer(Conv1D(6, 10).requires_grad_(False), "a", in_expansion=3)
    with torch.no_grad():
        down.scale_w12["a"].normal_()
    h = torch.randn(2, 5, 13)
    torch.testing.assert_close(down(h), down.base_layer(h[..., :10].contiguous()) + h[..., 10:] @ down.scale_w12["a"].T)


@pytest.mark.parametrize("base_cls", ["linear", "conv1d"])
def test_merge_builds_one_wider_layer_and_unmerge_restores_the_original(base_cls):
    torch.manual_seed(0)
    base = linear(6, 2 * 8, bias=True) if base_cls == "linear" else Conv1D(16, 6).requires_grad_(False)
    layer = ScaleLayer(base, "a", out_expansion=3, in_expansion=2, out_parts=2)
    with torch.no_grad():
        for p in [*layer.scale_w12.values(), *layer.scale_w21.values(), *layer.scale_b21.values()]:
            p.normal_()
    x = torch.randn(4, 8)
    expected = layer(x)
    layer.merge()
    assert layer.merged and type(layer.base_layer) is type(base) and layer.base_layer is not base
    torch.testing.assert_close(layer.base_layer(x), expected)
    torch.testing.assert_close(layer(x), expected)
    layer.unmerge()
    assert layer.base_layer is base and not layer.merged
    torch.testing.assert_close(layer(x), expected)


def test_merging_two_adapters_matches_both_active():
    layer = ScaleLayer(linear(6, 10, bias=True), "a", out_expansion=2, in_expansion=3)
    layer.update_layer("b", out_expansion=4, in_expansion=1, init="svd")
    layer.set_adapter(["a", "b"])
    with torch.no_grad():
        for p in [*layer.scale_w12.values(), *layer.scale_b21.values()]:
            p.normal_()
    x = torch.randn(4, 6 + 3 + 1)
    expected = layer(x)
    assert expected.shape == (4, 16)
    layer.merge()
    assert layer.merged_adapters == ["a", "b"]
    torch.testing.assert_close(layer(x), expected)


def test_safe_merge_refuses_non_finite_weights():
    layer = ScaleLayer(linear(6, 10), "a", out_expansion=2)
    with torch.no_grad():
        layer.scale_w21["a"][0, 0] = float("nan")
    # PEFT's words first (callers match on them), then SCALE's
    with pytest.raises(
        ValueError,
        match=r"^NaNs detected in the merged weights\. The adapter a seems to be broken: its SCALE block scale_w21",
    ):
        layer.merge(safe_merge=True)
    assert not layer.merged


def test_both_sides_widened_uses_all_four_blocks():
    base = linear(6, 10, bias=True)
    layer = ScaleLayer(base, "a", out_expansion=3, in_expansion=2)
    with torch.no_grad():
        layer.scale_w12["a"].normal_()
    x, x_up = torch.randn(4, 6), torch.randn(4, 2)
    y = layer(torch.cat([x, x_up], -1))
    w12, w21, w22, b21 = (layer.scale_w12["a"], layer.scale_w21["a"], layer.scale_w22["a"], layer.scale_b21["a"])
    assert torch.count_nonzero(w22) > 0  # new -> new starts non-zero
    torch.testing.assert_close(y[:, :10], base(x) + x_up @ w12.T)
    torch.testing.assert_close(y[:, 10:], x @ w21.T + b21 + x_up @ w22.T)


def test_a_closed_w12_is_absent_so_the_original_output_never_changes():
    base = linear(6, 10)
    layer = ScaleLayer(base, "a", out_expansion=3, in_expansion=2, open_w12=False)
    assert "a" not in layer.scale_w12 and "a" in layer.scale_w22
    x = torch.randn(4, 8)
    assert torch.equal(layer(x)[:, :10], base(x[:, :6].contiguous()))


@pytest.mark.parametrize("mode", ["always", "eval"])
def test_the_frozen_slice_sees_only_the_frozen_base(mode):
    base = linear(6, 10, bias=True)
    layer = ScaleLayer(base, "a", out_expansion=3, in_expansion=2)
    with torch.no_grad():
        layer.scale_w12["a"].normal_()
    layer.frozen_slice["a"] = mode
    layer.eval()
    x_pres, x, x_up = torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 2)
    y = layer(torch.cat([x_pres, x, x_up], -1))
    assert y.shape == (4, 10 + 10 + 3)
    assert torch.equal(y[:, :10], base(x_pres))
    layer.frozen_slice["a"] = "off"
    torch.testing.assert_close(y[:, 10:], layer(torch.cat([x, x_up], -1)))
    if mode == "eval":  # in training the slice is not carried
        layer.frozen_slice["a"] = mode
        layer.train()
        assert layer(torch.cat([x, x_up], -1)).shape == (4, 13)


def test_the_names_before_peft_s_convention_still_name_the_same_classes():
    """``Linear`` / ``RMSNorm`` / ``Embedding`` on the mixin ``ScaleTunerLayer``, as in PEFT's ``lora``; the old names
    stay, for user code and for modules pickled under them."""
    import pickle

    import peft_scale
    from peft_scale.embedding import Embedding, ScaleEmbedding
    from peft_scale.layer import Linear, ScaleTunerLayer
    from peft_scale.norm import RMSNorm, ScaleNorm

    assert ScaleLayer is Linear and peft_scale.ScaleLayer is Linear and ScaleNorm is RMSNorm and ScaleEmbedding is Embedding
    assert all(issubclass(cls, ScaleTunerLayer) for cls in (Linear, RMSNorm, Embedding))
    layer = ScaleLayer(linear(6, 10), "a", out_expansion=2)
    assert repr(layer).startswith("scale.Linear(")
    restored = pickle.loads(pickle.dumps(layer))
    x = torch.randn(2, 6)
    assert type(restored) is Linear and torch.equal(restored(x), layer(x))
    new_name, old_name = b"cpeft_scale.layer\nLinear\n", b"cpeft_scale.layer\nScaleLayer\n"
    pickled = pickle.dumps(layer, protocol=2)  # protocol 2 names a class in one GLOBAL opcode
    assert new_name in pickled
    assert type(pickle.loads(pickled.replace(new_name, old_name))) is Linear  # as pickled before the rename
