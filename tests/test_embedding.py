"""``peft_scale.embedding``: the widened token embedding on its own (``Embedding``, formerly ``ScaleEmbedding``).
Inside whole models, full width is tested in ``test_full_width.py``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_scale.embedding import Embedding


def test_every_token_gets_new_features_next_to_its_frozen_embedding():
    torch.manual_seed(0)
    base = nn.Embedding(20, 8).requires_grad_(False)
    weight = base.weight.clone()
    embedding = Embedding(base, "a", expansion=4)
    ids = torch.randint(0, 20, (2, 5))
    out = embedding(ids)
    assert out.shape == (2, 5, 12)
    assert torch.equal(out[..., :8], base(ids)) and torch.equal(base.weight, weight)
    assert torch.equal(out[..., 8:], embedding.scale_embedding["a"][ids])
    assert embedding.scale_embedding["a"].abs().min() > 0  # non-zero: the new slice of the stream comes from here
    embedding.enable_adapters(False)  # disable_adapter(): the base embedding alone
    assert torch.equal(embedding(ids), base(ids))


def test_the_svd_init_draws_columns_at_the_scale_of_the_existing_ones():
    torch.manual_seed(0)
    base = nn.Embedding(500, 16).requires_grad_(False)
    new = Embedding(base, "a", expansion=64).scale_embedding["a"]
    ratio = new.pow(2).mean() / base.weight.pow(2).mean()
    assert 0.7 < ratio < 1.3


def test_only_an_nn_embedding_is_widened():
    with pytest.raises(TypeError, match="ScaleEmbedding widens nn.Embedding, got Linear"):
        Embedding(nn.Linear(4, 4), "a", expansion=2)


def test_merging_gives_a_wider_plain_embedding_with_the_same_output():
    torch.manual_seed(0)
    base = nn.Embedding(20, 8, padding_idx=0).requires_grad_(False)
    embedding = Embedding(base, "a", expansion=4)
    ids = torch.randint(0, 20, (2, 5))
    merged = embedding.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
    assert type(merged) is nn.Embedding and merged.weight.shape == (20, 12) and merged.padding_idx == 0
    assert torch.equal(merged(ids), embedding(ids))
    assert embedding.unload_and_optionally_merge_module(merge=False, safe_merge=False, adapter_names=None) is base


def test_on_the_meta_device_nothing_is_drawn():
    with torch.device("meta"):
        base = nn.Embedding(20, 8)
    embedding = Embedding(base, "a", expansion=4)  # low_cpu_mem_usage: the values come from the checkpoint
    assert embedding.scale_embedding["a"].device.type == "meta"


def test_a_scaled_embedding_scales_the_new_columns_like_the_old_and_merges_into_its_own_class():
    """Gemma multiplies the embedding by sqrt(hidden_size) inside the module: the new columns get the same factor,
    and the merged embedding is still the scaled class, with the scale."""
    from transformers.models.gemma.modeling_gemma import GemmaTextScaledWordEmbedding

    torch.manual_seed(0)
    base = GemmaTextScaledWordEmbedding(20, 8, padding_idx=0, embed_scale=8**0.5).requires_grad_(False)
    embedding = Embedding(base, "a", expansion=4)
    ids = torch.randint(0, 20, (2, 5))
    out = embedding(ids)
    assert torch.equal(out[..., :8], base(ids))
    torch.testing.assert_close(out[..., 8:], embedding.scale_embedding["a"][ids] * 8**0.5)
    merged = embedding.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
    assert type(merged) is GemmaTextScaledWordEmbedding and merged.weight.shape == (20, 12)
    assert merged.embedding_dim == 12 and base.weight.shape == (20, 8)  # the base is left as it was
    torch.testing.assert_close(merged(ids), out)
