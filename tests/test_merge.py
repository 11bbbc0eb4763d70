"""``peft_scale.merge``: folding the blocks into wider layers, and the whole-model merge policy (the one intermediate
size, what is refused, the merged checkpoint). Moved from ``test_model.py`` (FFN mode) and ``test_full_width.py``
(full width)."""

from __future__ import annotations

import pytest
import torch
from conftest import BLOCK_PEFT, full_width, run_in_fresh_process, train_on_random_tokens
from peft import get_peft_model
from tiny_models import VOCAB, perturb_adapter, random_ids, tiny_llama, tiny_registry_model
from transformers import AutoModelForCausalLM

from peft_scale import ScaleConfig, ScaleLayer, architectures
from peft_scale.layer import ScaleTunerLayer
from peft_scale.norm import SplitRMSNorm


# --------------------------------------------------------------------------------------------------- FFN mode


def test_merge_adapter_and_unmerge_adapter_in_place():
    ids = random_ids()
    model = get_peft_model(tiny_llama(), ScaleConfig(ffn_expansion=8))
    perturb_adapter(model, "default", seed=0)
    with torch.no_grad():
        adapted = model(ids).logits
        model.merge_adapter()
        down = model.base_model.model.model.layers[0].mlp.down_proj
        assert down.merged and down.base_layer.in_features == 72
        assert (model(ids).logits - adapted).abs().max() <= 1e-5
        with model.disable_adapter():  # unmerges on the fly, all three projections together
            assert torch.equal(model(ids).logits, tiny_llama()(ids).logits)
        assert down.base_layer.in_features == 64
        assert torch.equal(model(ids).logits, adapted)


def test_unload_returns_the_base_model_unchanged():
    ids = random_ids()
    model = get_peft_model(tiny_llama(), ScaleConfig(ffn_expansion=8))
    perturb_adapter(model, "default", seed=0)
    model.merge_adapter()
    base = model.unload()
    assert base.config.intermediate_size == 64
    assert torch.equal(base(ids).logits, tiny_llama()(ids).logits)


def test_merging_different_widths_per_layer_is_an_error():
    model = get_peft_model(tiny_llama(), ScaleConfig(ffn_expansion=8, layers_to_transform=[0]))
    with pytest.raises(ValueError, match=r"different intermediate sizes \(72: 1 layers.*64: 1 layers.*LlamaConfig holds one"):
        model.merge_and_unload()
    assert isinstance(model.base_model.model.model.layers[0].mlp.down_proj, ScaleLayer)  # nothing was merged


def test_merged_model_needs_no_peft(tmp_path):
    model = get_peft_model(tiny_llama(), ScaleConfig(ffn_expansion=8))
    perturb_adapter(model, "default", seed=0)
    with torch.no_grad():
        torch.save(model(random_ids()).logits, tmp_path / "expected.pt")
    model.merge_and_unload().save_pretrained(tmp_path / "dense")
    out = run_in_fresh_process(
        BLOCK_PEFT
        + f"""
import torch
from transformers import AutoModelForCausalLM
from tiny_models import random_ids
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "dense")!r}).eval()
with torch.no_grad():
    print(model.config.intermediate_size, (model(random_ids()).logits - torch.load({str(tmp_path)!r} + "/expected.pt")).abs().max().item())
"""
    )
    size, diff = out.split()
    assert int(size) == 72 and float(diff) <= 1e-5


@pytest.mark.parametrize(
    "model_type, expansion, written",
    [
        # LFM2 builds 256 features from intermediate_size=48 (2/3 of it, rounded up to 256): 264 only with the
        # adjustment off.
        ("lfm2", 8, {"intermediate_size": 264, "block_auto_adjust_ff_dim": False}),
        ("moshi", 8, {"ffn_dim": 2 * (24 + 8)}),  # fc1 writes [gate; up]: twice the intermediate size
        ("gpt_neox_japanese", 32, {"intermediate_multiple_size": 5}),  # 128 + 32 = 32 x 5
    ],
)
def test_a_family_that_derives_its_size_merges_into_the_fields_its_code_reads(model_type, expansion, written, tmp_path):
    """``architectures.DERIVED_SIZES``: the merge writes the fields the family's code derives the FFN width from, and
    the merged checkpoint loads with plain transformers."""
    ids = random_ids(batch=1, length=6)
    model = get_peft_model(tiny_registry_model(model_type), ScaleConfig(ffn_expansion=expansion))
    perturb_adapter(model, "default", seed=0)
    with torch.no_grad():
        adapted = model(ids).logits
    merged = model.merge_and_unload()
    assert {name: getattr(merged.config, name) for name in written} == written
    merged.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert (loaded(ids).logits - adapted).abs().max() <= 1e-5


def test_a_merged_size_the_derived_fields_cannot_hold_is_refused_before_merging():
    model = get_peft_model(tiny_registry_model("gpt_neox_japanese"), ScaleConfig(ffn_expansion=8))
    with pytest.raises(ValueError, match=r"hidden_size x intermediate_multiple_size.*no value of them gives .* 136"):
        model.merge_and_unload()
    assert isinstance(model.base_model.model.gpt_neox_japanese.layers[0].mlp.dense_4h_to_h, ScaleLayer)


def test_a_merged_config_that_builds_other_shapes_cannot_be_saved(monkeypatch, tmp_path):
    """The merge checks what it wrote: a config that would build other shapes (here a wrong rule) warns, and the
    merged model refuses to save a checkpoint that would not load."""
    wrong = architectures.DerivedSize(
        size=architectures.DERIVED_SIZES["moshi"].size, fields=lambda config, size: {"ffn_dim": size}, rule="wrong"
    )
    monkeypatch.setitem(architectures.DERIVED_SIZES, "moshi", wrong)
    model = get_peft_model(tiny_registry_model("moshi"), ScaleConfig(ffn_expansion=8))
    with pytest.warns(UserWarning, match=r"cannot be saved as a standard checkpoint.*fc1.weight: \(64, 32\)"):
        merged = model.merge_and_unload()
    with pytest.raises(ValueError, match="Cannot save this merged SCALE model as a checkpoint"):
        merged.save_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------- full width


@pytest.mark.parametrize("variant", ["preserve", "adapt"])
def test_merge_folds_into_wider_linears_with_the_same_logits(variant):
    _, model = full_width("llama", variant)
    train_on_random_tokens(model, steps=5)
    ids = random_ids(vocab=VOCAB)
    with torch.no_grad():
        expected = model(ids).logits
        merged = model.merge_and_unload()
        layer = merged.model.layers[0]
        assert type(layer.self_attn.q_proj) is torch.nn.Linear and layer.self_attn.q_proj.weight.shape == (48, 48)
        assert isinstance(layer.input_layernorm, SplitRMSNorm) and merged.model.embed_tokens.weight.shape[1] == 48
        assert (merged(ids).logits - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_full_width_merge_adapter_round_trips_inside_the_peft_model(model_type):
    reference, model = full_width(model_type, "adapt", init_weights=False)
    perturb_adapter(model, "default", seed=0)  # every block, the new gains and the embedding's columns too
    model.eval()
    ids = random_ids(vocab=VOCAB)
    pretrained = {name: m.base_layer for name, m in model.named_modules() if isinstance(m, ScaleTunerLayer)}
    base_state = {key: value.clone() for key, value in reference.state_dict().items()}
    with torch.no_grad():
        expected = model(ids).logits
        assert (expected - reference(ids).logits).abs().max() > 1e-2  # the adapter does something
        model.merge_adapter()
        layer = model.base_model.model.model.layers[0]
        assert type(layer.self_attn.q_proj.base_layer) is torch.nn.Linear and layer.self_attn.q_proj.merged
        assert isinstance(layer.input_layernorm.base_layer, SplitRMSNorm)
        assert model.base_model.model.model.embed_tokens.base_layer.weight.shape == (VOCAB, 48)
        assert (model(ids).logits - expected).abs().max() <= 1e-5
        model.unmerge_adapter()  # the pre-trained layers themselves come back
        back = {name: m for name, m in model.named_modules() if name in pretrained}
        assert all(m.base_layer is pretrained[name] and not m.merged for name, m in back.items())
        assert torch.equal(model(ids).logits, expected)
        model.merge_adapter()
        with model.disable_adapter():  # unmerges on the fly, every module together
            assert torch.equal(model(ids).logits, reference(ids).logits)
        assert not any(m.merged for m in model.modules() if isinstance(m, ScaleTunerLayer))
        unloaded = model.unload().state_dict()  # and they are bit for bit what they were
        assert unloaded.keys() == base_state.keys()
        assert all(torch.equal(unloaded[key], value) for key, value in base_state.items())


def test_safe_merge_checks_every_block_before_merging_anything():
    _, model = full_width("llama", "adapt")
    with torch.no_grad():
        model.base_model.model.model.norm.scale_head["default"][0, 0] = float("nan")  # the last module merged
    message = r"^NaNs detected in the merged weights\. The adapter default seems to be broken: its SCALE block scale_h"
    with pytest.raises(ValueError, match=message):
        model.merge_adapter(safe_merge=True)
    assert not any(m.merged for m in model.modules() if isinstance(m, ScaleTunerLayer))
    with pytest.raises(ValueError, match=message):
        model.merge_and_unload(safe_merge=True)
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj, ScaleLayer)  # nothing was unloaded


def test_a_merged_full_width_model_refuses_to_save_as_a_plain_checkpoint(tmp_path):
    _, model = full_width("llama", "adapt")
    merged = model.merge_and_unload()
    with pytest.raises(ValueError, match=r"cannot be saved as a LlamaForCausalLM checkpoint: its norms normalise"):
        merged.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())


def test_merging_a_route_adapter_is_an_error():
    _, model = full_width("llama", "route")
    for merge in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(ValueError, match="Cannot merge a SCALE-Route adapter: its preservation head needs"):
            merge()
    assert not any(m.merged for m in model.modules() if isinstance(m, ScaleTunerLayer))


def test_merging_an_unknown_adapter_names_the_adapters():
    model = get_peft_model(tiny_llama(), ScaleConfig(ffn_expansion=8))
    for merge in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(ValueError, match=r"Cannot merge \['other'\]: this model has no such adapter \(it has \["):
            merge(adapter_names=["other"])
