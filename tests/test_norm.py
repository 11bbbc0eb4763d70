"""``peft_scale.norm``: the split RMSNorm on its own (``RMSNorm``, formerly ``ScaleNorm``), the split LayerNorm, and
their merged forms ``SplitRMSNorm`` / ``SplitLayerNorm``. Inside whole models, full width is tested in
``test_full_width.py``."""

from __future__ import annotations

import math

import pytest
import torch

from torch import nn

from peft_scale.norm import LayerNorm, RMSNorm, SplitLayerNorm, SplitRMSNorm, rms_norm


# ------------------------------------------------------------------------------------- the layer on its own


def llama_norm(d=8, seed=0):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(seed)
    norm = LlamaRMSNorm(d, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(d) + 0.5)
    return norm.requires_grad_(False)


def test_each_slice_is_normalised_on_its_own():
    base = llama_norm()
    norm = RMSNorm(base, "a", expansion=4)
    x = torch.randn(2, 3, 12)
    out = norm(x)
    assert out.shape == (2, 3, 12)
    assert torch.equal(out[..., :8], base(x[..., :8].contiguous()))  # the original slice: the base norm alone
    gain = norm.scale_gain["a"]
    assert torch.allclose(gain, torch.full((4,), base.weight.mean().item()))  # starts at the base gain's mean
    assert torch.allclose(out[..., 8:], rms_norm(x[..., 8:], gain, 1e-6))
    x_big_up = x.clone()
    x_big_up[..., 8:] *= 100  # the new features do not move the original ones through a shared statistic
    assert torch.equal(norm(x_big_up)[..., :8], out[..., :8])


def test_the_final_norm_gives_the_base_width_and_the_head_block_starts_at_zero():
    base = llama_norm()
    norm = RMSNorm(base, "a", expansion=4, final=True)
    x = torch.randn(2, 3, 12)
    assert torch.equal(norm(x), base(x[..., :8].contiguous()))  # P = 0: the LM head sees the base hidden state
    with torch.no_grad():
        norm.scale_head["a"].normal_()
    expected = base(x[..., :8].contiguous()) + rms_norm(x[..., 8:], norm.scale_gain["a"], 1e-6) @ norm.scale_head["a"].T
    torch.testing.assert_close(norm(x), expected)


def test_init_weights_false_draws_the_head_block_as_a_fresh_linear_over_the_widened_stream():
    torch.manual_seed(0)
    norm = RMSNorm(llama_norm(d=64), "a", expansion=32, final=True, init_weights=False)
    head, bound = norm.scale_head["a"], 1 / math.sqrt(64 + 32)
    assert head.shape == (64, 32) and bound >= head.abs().max() > 0.9 * bound
    assert math.isclose(head.std().item(), bound / math.sqrt(3), rel_tol=0.05)
    assert torch.equal(norm.scale_gain["a"], RMSNorm(llama_norm(d=64), "a", expansion=32).scale_gain["a"])  # as before


def test_a_stream_of_the_wrong_width_names_the_cause():
    norm = RMSNorm(llama_norm(), "a", expansion=4)
    with pytest.raises(RuntimeError, match=r"SCALE norm expected 12 input features \(8 original \+ \{'a': 4\} new\) but got 10"):
        norm(torch.randn(2, 10))


def test_the_frozen_slice_is_normalised_by_the_base_norm_at_evaluation_only():
    base = llama_norm()
    norm = RMSNorm(base, "a", expansion=4, frozen_slice="eval")
    x_pres, x = torch.randn(2, 8), torch.randn(2, 12)
    assert norm(x).shape == (2, 12)  # training: no slice
    norm.eval()
    out = norm(torch.cat([x_pres, x], dim=-1))
    assert torch.equal(out[..., :8], base(x_pres)) and torch.equal(out[..., 8:], norm.train()(x))


@pytest.mark.parametrize("final", [False, True])
def test_merging_gives_a_split_rms_norm_with_the_same_output(final):
    norm = RMSNorm(llama_norm(), "a", expansion=4, final=final)
    if final:
        with torch.no_grad():
            norm.scale_head["a"].normal_()
    x = torch.randn(2, 3, 12)
    merged = norm.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
    assert isinstance(merged, SplitRMSNorm)
    torch.testing.assert_close(merged(x), norm(x))
    assert norm.unload_and_optionally_merge_module(merge=False, safe_merge=False, adapter_names=None) is norm.base_layer


# ------------------------------------------------------------------------- other conventions: Gemma, LayerNorm


def test_a_one_plus_w_norm_keeps_its_convention_on_the_original_slice_and_the_new_gain_starts_at_its_scale():
    """Gemma's RMSNorm computes x (1 + w): the original slice is still the base norm; the new slice's plain gain
    starts at the mean of 1 + w (the mean of w would start the new features near zero)."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    torch.manual_seed(0)
    base = GemmaRMSNorm(8, eps=1e-6).requires_grad_(False)
    with torch.no_grad():
        base.weight.copy_(torch.rand(8) * 0.2 - 0.3)  # mean about -0.2: the gain is about 0.8
    norm = RMSNorm(base, "a", expansion=4)
    x = torch.randn(2, 3, 12)
    out = norm(x)
    assert torch.equal(out[..., :8], base(x[..., :8].contiguous()))
    torch.testing.assert_close(norm.scale_gain["a"], torch.full((4,), 1 + base.weight.mean().item()))
    torch.testing.assert_close(out[..., 8:], rms_norm(x[..., 8:], norm.scale_gain["a"], 1e-6))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("final", [False, True])
def test_a_layer_norm_is_split_with_its_own_statistics_on_each_slice(bias, final):
    torch.manual_seed(0)
    base = nn.LayerNorm(8, eps=1e-5, bias=bias).requires_grad_(False)
    with torch.no_grad():
        base.weight.copy_(torch.rand(8) + 0.5)
        if bias:
            base.bias.normal_()
    norm = LayerNorm(base, "a", expansion=4, final=final)
    assert torch.allclose(norm.scale_gain["a"], torch.full((4,), base.weight.mean().item()))
    assert ("a" in norm.scale_bias) == bias
    with torch.no_grad():  # a trained affine, and P, away from their initial values
        norm.scale_gain["a"].normal_()
        if bias:
            norm.scale_bias["a"].normal_()
        if final:
            norm.scale_head["a"].normal_()
    x = torch.randn(2, 3, 12) * 3 + 1
    out = norm(x)
    original = base(x[..., :8].contiguous())  # mean and variance over the original features only
    x_up = x[..., 8:]
    new = (x_up - x_up.mean(-1, keepdim=True)) / torch.sqrt(x_up.var(-1, unbiased=False, keepdim=True) + 1e-5)
    new = new * norm.scale_gain["a"] + (norm.scale_bias["a"] if bias else 0)
    if final:
        assert out.shape == (2, 3, 8)
        torch.testing.assert_close(out, original + new @ norm.scale_head["a"].T)
    else:
        assert torch.equal(out[..., :8], original)
        torch.testing.assert_close(out[..., 8:], new)
        x_big_up = x.clone()
        x_big_up[..., 8:] *= 100
        assert torch.equal(norm(x_big_up)[..., :8], original)
    merged = norm.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
    assert isinstance(merged, SplitLayerNorm)
    torch.testing.assert_close(merged(x), out)
