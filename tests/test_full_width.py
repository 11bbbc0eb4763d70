"""Full-width SCALE: residual stream, attention heads, embedding, split norms; Preserve, Adapt and Route.

Its helpers (``full_width``, ``decoder_outputs``, ``train``) also serve ``test_plan.py`` and ``test_merge.py``, where
the full-width tests of the plan and of merging are."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from tiny_models import VOCAB, random_ids, tiny_model

from peft_scale import ScaleConfig
from peft_scale.routing import route

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
VARIANTS = ["preserve", "adapt", "route"]
HIDDEN = 32  # tiny models: hidden 32, 4 heads of 8 over 2 key-value heads -> hidden_expansion in multiples of 16
LAYERS = 4


def full_width(model_type="llama", variant="route", preserve_layers=2, seed=0, **config):
    base = tiny_model(model_type, seed=seed, num_hidden_layers=LAYERS)
    reference = copy.deepcopy(base)
    cfg = ScaleConfig(hidden_expansion=16, ffn_expansion=8, variant=variant, preserve_layers=preserve_layers, route_rule="cosine", **config)
    return reference, get_peft_model(base, cfg)


def decoder_outputs(model, ids) -> list[torch.Tensor]:
    """The output of every decoder layer (the residual stream after it), via forward hooks."""
    layers = model.get_decoder().layers
    outputs = []
    handles = [layer.register_forward_hook(lambda m, a, out: outputs.append(out)) for layer in layers]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def train(model, steps=50, lr=1e-2, seed=0):
    """AdamW on random tokens, as the issue asks: enough to move every open block far."""
    model.train()
    ids = random_ids(batch=4, length=16, vocab=VOCAB, seed=seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_equal_base_at_init(model_type, variant):
    reference, model = full_width(model_type, variant)
    model.eval()
    ids = random_ids(vocab=VOCAB)
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max() <= 1e-6


@pytest.mark.parametrize("variant", ["preserve", "route"])
def test_persistent_preservation_after_training(variant):
    reference, model = full_width("llama", variant, preserve_layers=2)
    train(model)
    ids = random_ids(vocab=VOCAB, seed=7)
    base_states = decoder_outputs(reference, ids)
    states = decoder_outputs(model, ids)
    # the original slice (for route: the preservation copy, first in the stream) of every layer is the base model's
    assert len(states) == LAYERS
    for widened, original in zip(states, base_states):
        assert (widened[..., :HIDDEN] - original).abs().max() <= 1e-5
    with torch.no_grad():
        base_logits = reference(ids).logits
        preservation_logits = reference.lm_head(reference.model.norm(states[-1][..., :HIDDEN]))
        out = model(ids)
    assert (preservation_logits - base_logits).abs().max() <= 1e-5
    if variant == "route":
        assert (model.base_model.last_routing.preservation_logits - base_logits).abs().max() <= 1e-5
        adaptation = model.base_model.last_routing.adaptation_logits
    else:
        adaptation = out.logits
    assert (adaptation - base_logits).abs().max() > 0.1  # the adaptation head has learned


def test_adapt_preserves_the_layers_below_preserve_layers_only():
    reference, model = full_width("llama", "adapt", preserve_layers=2)
    train(model)
    ids = random_ids(vocab=VOCAB, seed=7)
    base, widened = decoder_outputs(reference, ids), decoder_outputs(model, ids)
    drift = [(w[..., :HIDDEN] - b).abs().max().item() for w, b in zip(widened, base)]
    assert drift[:2] == [0.0, 0.0]  # layers 0 and 1: no W12
    assert min(drift[2:]) > 1e-3  # layers 2 and 3 have opened W12


def test_route_trains_on_the_adaptation_head_and_carries_the_copy_only_when_routing():
    _, model = full_width("llama", "route", preserve_layers=2)
    ids = random_ids(vocab=VOCAB)
    model.train()
    assert [h.shape[-1] for h in decoder_outputs(model, ids)] == [HIDDEN + 16] * LAYERS
    assert model.base_model.last_routing is None
    model.eval()
    assert [h.shape[-1] for h in decoder_outputs(model, ids)] == [48, 48, 80, 80]  # layers 2, 3: [x_pres; x; x_up]
    routing = model.base_model.last_routing
    assert routing.preservation_logits.shape == routing.adaptation_logits.shape == (2, 12, VOCAB)
    with model.disable_adapter():
        assert [h.shape[-1] for h in decoder_outputs(model, ids)] == [HIDDEN] * LAYERS


def test_route_in_training_routes_the_training_loss_too():
    with pytest.warns(UserWarning, match="nothing trains"):
        _, model = full_width("llama", "route", route_in_training=True)
    model.train()
    model(random_ids(vocab=VOCAB))
    assert model.base_model.last_routing is not None


def test_route_in_training_gives_a_new_adapter_no_gradient_as_its_warning_says():
    """At initialisation both heads agree exactly, every token takes the frozen preservation head: zero gradient."""
    with pytest.warns(UserWarning, match="route_in_training=True"):
        _, model = full_width("llama", "route", route_in_training=True)
    model.train()
    ids = random_ids(vocab=VOCAB)
    model(input_ids=ids, labels=ids).loss.backward()
    assert bool(model.base_model.last_routing.to_preservation.all())
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is None or not g.any() for g in grads)


@pytest.mark.parametrize("preserve_layers", [0, LAYERS])
def test_route_at_the_extremes_of_preserve_layers(preserve_layers):
    """L_fp = 0 copies from the embedding on; L_fp = L is the Preserve body with two heads."""
    reference, model = full_width("llama", "route", preserve_layers=preserve_layers)
    train(model, steps=20)
    ids = random_ids(vocab=VOCAB, seed=3)
    with torch.no_grad():
        model(ids)
        base = reference(ids).logits
    assert (model.base_model.last_routing.preservation_logits - base).abs().max() <= 1e-5


def test_threshold_minus_one_routes_every_token_to_the_base_model_and_above_one_none():
    reference, model = full_width("llama", "route")
    train(model, steps=20)
    ids = random_ids(vocab=VOCAB, seed=3)
    with torch.no_grad():
        base = reference(ids).logits
        model.peft_config["default"].route_threshold = -1.0
        everything = model(ids).logits
        assert model.base_model.last_routing.to_preservation.all()
        assert (everything - base).abs().max() <= 1e-5
        model.peft_config["default"].route_threshold = 1.01
        nothing = model(ids).logits
        routing = model.base_model.last_routing
        assert not routing.to_preservation.any()
        assert torch.equal(nothing, routing.adaptation_logits)


def test_the_cosine_rule_on_a_hand_checked_case():
    preservation = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 4.0]]])
    adaptation = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-3.0, -4.0]]])
    # cosines: 1, 0, 1/sqrt(2) = 0.707, -1
    routed, to_preservation = route(preservation, adaptation, threshold=0.5)
    assert to_preservation.tolist() == [[True, False, True, False]]
    assert torch.equal(routed, torch.stack([preservation[0, 0], adaptation[0, 1], preservation[0, 2], adaptation[0, 3]])[None])
    _, exactly_at = route(preservation, adaptation, threshold=1.0)
    assert exactly_at.tolist() == [[True, False, False, False]]  # >= tau goes to preservation


def test_full_width_on_an_architecture_without_a_decoder_layout():
    with pytest.raises(ValueError, match=r"knows the decoder layout of \['llama', 'mistral', 'qwen2', 'qwen3'\], not of .*'gpt2'"):
        get_peft_model(tiny_model("gpt2"), ScaleConfig(hidden_expansion=16))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"target_modules": ["gate_proj", "up_proj", "down_proj"]}, "target_modules cannot be chosen"),
        ({"layers_to_transform": [0]}, "layers_to_transform and exclude_modules do not apply"),
        ({"preserve_layers": 9}, "preserve_layers=9 exceeds the model's 2 layers"),
    ],
)
def test_full_width_config_errors(config, message):
    with pytest.raises(ValueError, match=message):
        get_peft_model(tiny_model("llama"), ScaleConfig(hidden_expansion=16, **config))


def test_one_route_adapter_per_model():
    _, model = full_width("llama", "route")
    with pytest.raises(ValueError, match="Only one SCALE-Route adapter with the cosine rule per model"):
        model.add_adapter("second", ScaleConfig(hidden_expansion=16, variant="route", route_rule="cosine"))


def test_the_saved_adapter_holds_only_the_new_blocks(tmp_path):
    from safetensors.torch import load_file

    _, model = full_width("llama", "route")
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all(".scale_" in key for key in saved)  # no frozen base weight (e.g. the embedding) is copied
    trainable, _ = model.get_nb_trainable_parameters()
    assert sum(t.numel() for t in saved.values()) == trainable
