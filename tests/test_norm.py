"""``peft_scale.norm``: the split RMSNorm on its own (``RMSNorm``, formerly ``ScaleNorm``) and its merged form
``SplitRMSNorm``. Inside whole models, full width is tested in ``test_full_width.py``."""

from __future__ import annotations

import math

import pytest
import torch

from peft_scale.norm import RMSNorm, SplitRMSNorm, rms_norm


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


def test_the_preservation_copy_is_normalised_by_the_base_norm_at_evaluation_only():
    base = llama_norm()
    norm = RMSNorm(base, "a", expansion=4, preservation_copy="eval")
    x_pres, x = torch.randn(2, 8), torch.randn(2, 12)
    assert norm(x).shape == (2, 12)  # training: no copy
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
