"""The generic matrix: every architecture with a built-in FFN layout, on a tiny random model."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import BLOCK_PEFT, run_in_fresh_process
from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from tiny_models import TINY_CONFIGS, VOCAB, perturb_adapter, random_ids, tiny_model

from peft_scale import FFN_LAYOUTS, ScaleConfig, ScaleLayer

ARCHITECTURES = sorted(TINY_CONFIGS)
EXPANSION = 8


def test_every_built_in_layout_is_tested():
    assert sorted(FFN_LAYOUTS) == ARCHITECTURES


def wrapped(model_type: str, seed: int = 0, **config):
    base = tiny_model(model_type, seed=seed)
    reference = copy.deepcopy(base)
    model = get_peft_model(base, ScaleConfig(ffn_expansion=EXPANSION, **config))
    return reference, model


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_logits_equal_base_at_init(model_type):
    reference, model = wrapped(model_type)
    ids = random_ids(vocab=VOCAB)
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max() <= 1e-6


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_every_mlp_widened_whole(model_type):
    _, model = wrapped(model_type)
    layout = FFN_LAYOUTS[model_type]
    layers = {name: m for name, m in model.named_modules() if isinstance(m, ScaleLayer)}
    n_layers = model.config.num_hidden_layers
    assert len(layers) == n_layers * len(layout.target_modules)
    for name, layer in layers.items():
        if name.endswith(layout.output_module):
            assert layer.in_expansion == {"default": EXPANSION} and set(layer.scale_w12) == {"default"}
            assert not layer.scale_w21
        else:
            parts = layout.fused_modules.get(name.rpartition(".")[2], 1)
            assert layer.scale_w21["default"].shape == (parts * EXPANSION, layer.in_features)
            assert not layer.scale_w12


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_training_moves_only_the_expansion(model_type):
    reference, model = wrapped(model_type)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".scale_w" in n or ".scale_b21." in n for n in trainable)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ids = random_ids(vocab=VOCAB)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max() > 1e-3
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, base_before[name]), name


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_disable_adapter_reproduces_base(model_type):
    reference, model = wrapped(model_type)
    perturb_adapter(model)
    ids = random_ids(vocab=VOCAB)
    with torch.no_grad():
        adapted = model(ids).logits
        with model.disable_adapter():
            disabled = model(ids).logits
        assert torch.equal(disabled, reference(ids).logits)
        assert (adapted - disabled).abs().max() > 1e-3
        assert torch.equal(model(ids).logits, adapted)  # enabled again


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_merge_and_unload_gives_a_plain_wider_model(model_type):
    _, model = wrapped(model_type)
    perturb_adapter(model)
    ids = random_ids(vocab=VOCAB)
    with torch.no_grad():
        adapted = model(ids).logits
        merged = model.merge_and_unload()
        assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
        field = FFN_LAYOUTS[model_type].size_field
        assert getattr(merged.config, field) == TINY_CONFIGS[model_type].get(field, 64) + EXPANSION
        assert (merged(ids).logits - adapted).abs().max() <= 1e-5


def test_save_load_in_fresh_process_every_architecture(tmp_path):
    """Adapters saved here load in a new process (after `import peft_scale`) with the same logits."""
    ids = random_ids(vocab=VOCAB)
    for model_type in ARCHITECTURES:
        _, model = wrapped(model_type, seed=3)
        perturb_adapter(model)
        model.save_pretrained(tmp_path / model_type)
        with torch.no_grad():
            torch.save(model(ids).logits, tmp_path / model_type / "expected.pt")
    out = run_in_fresh_process(
        f"""
import torch, peft_scale
from peft import PeftModel
from tiny_models import random_ids
from tiny_models import tiny_model, VOCAB
ids = random_ids(vocab=VOCAB)
for model_type in {ARCHITECTURES!r}:
    folder = {str(tmp_path)!r} + "/" + model_type
    model = PeftModel.from_pretrained(tiny_model(model_type, seed=3), folder)
    with torch.no_grad():
        diff = (model(ids).logits - torch.load(folder + "/expected.pt")).abs().max().item()
    print(model_type, diff)
"""
    )
    diffs = dict(line.split() for line in out.strip().splitlines())
    assert sorted(diffs) == ARCHITECTURES
    assert all(float(d) == 0.0 for d in diffs.values()), diffs


def test_merged_checkpoints_load_without_peft(tmp_path):
    """merge_and_unload -> save_pretrained -> AutoModelForCausalLM in a process where peft cannot be imported."""
    ids = random_ids(vocab=VOCAB)
    for model_type in ARCHITECTURES:
        _, model = wrapped(model_type)
        perturb_adapter(model)
        with torch.no_grad():
            expected = model(ids).logits
        model.merge_and_unload().save_pretrained(tmp_path / model_type)
        torch.save(expected, tmp_path / model_type / "expected.pt")
    out = run_in_fresh_process(
        BLOCK_PEFT
        + f"""
import torch
from transformers import AutoModelForCausalLM
from tiny_models import random_ids
from tiny_models import VOCAB
ids = random_ids(vocab=VOCAB)
for model_type in {ARCHITECTURES!r}:
    folder = {str(tmp_path)!r} + "/" + model_type
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        diff = (model(ids).logits - torch.load(folder + "/expected.pt")).abs().max().item()
    print(model_type, diff)
assert "peft" not in sys.modules or sys.modules["peft"] is None
"""
    )
    diffs = dict(line.split() for line in out.strip().splitlines())
    assert sorted(diffs) == ARCHITECTURES
    assert all(float(d) <= 1e-5 for d in diffs.values()), diffs


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_bf16_base(model_type):
    base = tiny_model(model_type, dtype=torch.bfloat16)
    ids = random_ids(vocab=VOCAB)
    with torch.no_grad():
        expected = base(ids).logits
    model = get_peft_model(base, ScaleConfig(ffn_expansion=EXPANSION))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)  # W12 = 0 adds exact zeros, even in bf16
    layer = next(m for m in model.modules() if isinstance(m, ScaleLayer))
    assert layer.get_base_layer().weight.dtype == torch.bfloat16
    assert next(iter(layer.scale_w21.values() or layer.scale_w12.values())).dtype == torch.float32  # PEFT autocast
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
