"""Full-width SCALE: residual stream, attention heads, embedding, split norms; Preserve, Adapt and Route; every family
of ``FULL_WIDTH_LAYOUTS`` (the Llama family on 4 layers, the others on 2) and the refused ones.

The full-width tests of the plan and of merging are in ``test_plan.py`` and ``test_merge.py``; the helpers they share
with this file (``full_width``, ``decoder_outputs``, ``train_on_random_tokens``) are in ``conftest.py``."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import HIDDEN, LAYERS, decoder_outputs, full_width, train_on_random_tokens
from peft import PeftModel, get_peft_model
from tiny_models import VOCAB, perturb_adapter, random_ids, tiny_model

from peft_scale import ScaleConfig
from peft_scale.architectures import FULL_WIDTH_LAYOUTS, FULL_WIDTH_REFUSED
from peft_scale.norm import ScaleNorm, SplitRMSNorm

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
VARIANTS = ["preserve", "adapt", "route"]
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
    train_on_random_tokens(model)
    ids = random_ids(vocab=VOCAB, seed=7)
    base_states = decoder_outputs(reference, ids)
    states = decoder_outputs(model, ids)
    # the original slice (for route: the cosine rule's frozen slice, first in the stream) of every layer is the base model's
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
    train_on_random_tokens(model)
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
    train_on_random_tokens(model, steps=20)
    ids = random_ids(vocab=VOCAB, seed=3)
    with torch.no_grad():
        model(ids)
        base = reference(ids).logits
    assert (model.base_model.last_routing.preservation_logits - base).abs().max() <= 1e-5


def test_threshold_minus_one_routes_every_token_to_the_base_model_and_above_one_none():
    reference, model = full_width("llama", "route")
    train_on_random_tokens(model, steps=20)
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


def test_full_width_on_an_architecture_without_a_decoder_layout():
    with pytest.raises(ValueError, match=r"knows the decoder layout of \['gemma', .*'llama', .*\], not of .*'gpt2'"):
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


# --------------------------------------------------------------------------------- the families beyond Llama's
# What each adds (FULL_WIDTH_LAYOUTS' comments): Gemma's scaled embedding and `1 + w` norms, Gemma 2/3's norms on the
# sublayers' outputs and softcapping, Granite's multipliers (all four away from 1 in the tiny config), OLMo 2's norms
# after the sublayers and q/k norms over the whole projection, StarCoder 2's LayerNorms with biases. Two layers,
# preserve_layers=1: layer 0 keeps W12 closed, layer 1 opens it (adapt/route) and carries route's frozen slice.

OTHER_FAMILIES = ["gemma", "gemma2", "gemma3_text", "granite", "olmo2", "starcoder2"]
FAMILY_VARIANTS = {
    "preserve": dict(variant="preserve"),
    "adapt": dict(variant="adapt"),
    "cosine": dict(variant="route", route_rule="cosine"),
    "learned": dict(variant="route", route_rule="learned"),
}


def test_every_full_width_family_is_tested():
    assert sorted(FULL_WIDTH_LAYOUTS) == sorted(FAMILIES + OTHER_FAMILIES)


def family_model(model_type, variant="preserve", seed=0):
    """(untouched copy of the base, full-width SCALE model): a 2-layer tiny model of ``model_type``."""
    base = tiny_model(model_type, seed=seed)
    reference = copy.deepcopy(base)
    torch.manual_seed(0)
    config = ScaleConfig(hidden_expansion=16, ffn_expansion=8, preserve_layers=1, **FAMILY_VARIANTS[variant])
    model = get_peft_model(base, config)
    if variant == "learned":  # a router "fitted" by hand: its score is sigmoid(0) = 0.5 for every token
        router = model.base_model.scale_router["default"]
        router.fitted.fill_(1.0)
    return reference, model.eval()


def unroutable(model, variant):
    """Route every token to the base model: the cosine rule's threshold -1, the learned router's above 1."""
    if variant == "cosine":
        model.peft_config["default"].route_threshold = -1.0
    else:
        model.base_model.scale_router["default"].threshold.fill_(1.5)


@pytest.mark.parametrize("model_type", OTHER_FAMILIES)
def test_other_families_split_every_norm_wider_than_a_head(model_type):
    """Every norm of the residual stream, and OLMo 2's query/key norms over the whole projection, is split (by the
    new features of what it normalises); only per-head norms (Gemma 3's q_norm/k_norm, over head_dim) are not."""
    base = tiny_model(model_type)
    norms = {name: m.weight.shape[0] for name, m in base.named_modules() if "norm" in type(m).__name__.lower()}
    _, model = family_model(model_type)
    split = {
        name.removeprefix("base_model.model."): m.expansion["default"]
        for name, m in model.named_modules() if isinstance(m, ScaleNorm)
    }  # fmt: skip
    head_dim = 8
    new_features = {HIDDEN: 16, 4 * head_dim: 16, 2 * head_dim: 8}  # stream / queries: 2 new heads; keys: 1
    assert split == {name: new_features[width] for name, width in norms.items() if width > head_dim}
    if model_type == "olmo2":
        assert split["model.layers.0.self_attn.k_norm"] == 8


@pytest.mark.parametrize("variant", list(FAMILY_VARIANTS))
@pytest.mark.parametrize("model_type", OTHER_FAMILIES)
def test_other_families_equal_the_base_at_init(model_type, variant):
    reference, model = family_model(model_type, variant)
    ids = random_ids(vocab=VOCAB)
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max() <= 1e-5
        with model.disable_adapter():
            assert torch.equal(model(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("model_type", OTHER_FAMILIES)
def test_other_families_preserve_the_base_after_training(model_type, tmp_path):
    """SCALE-Preserve trained: every layer's original slice is the base model's, and the logits differ from the
    base model's only through the LM head's new block P (zero it: the base logits). Then disable_adapter, a save/load
    round trip, and merge_and_unload (whose model refuses to be saved as a checkpoint of its architecture)."""
    reference, model = family_model(model_type, "preserve")
    ids = random_ids(batch=4, length=16, vocab=VOCAB, seed=0)  # what `train` trains on
    with torch.no_grad():
        loss_before = model(input_ids=ids, labels=ids).loss
    train_on_random_tokens(model, steps=8)
    with torch.no_grad():
        assert model(input_ids=ids, labels=ids).loss < loss_before

    ids = random_ids(vocab=VOCAB, seed=7)
    with torch.no_grad():
        base_logits = reference(ids).logits
        logits = model(ids).logits
    assert (logits - base_logits).abs().max() > 1e-3  # the new block has learned
    for widened, original in zip(decoder_outputs(model, ids), decoder_outputs(reference, ids), strict=True):
        assert widened.shape[-1] == HIDDEN + 16
        assert (widened[..., :HIDDEN] - original).abs().max() <= 1e-5
    with torch.no_grad():
        with model.disable_adapter():
            assert torch.equal(model(ids).logits, base_logits)
        heads = {name: p.detach().clone() for name, p in model.named_parameters() if ".scale_head." in name}
        assert len(heads) == 1
        for name, p in model.named_parameters():
            if name in heads:
                p.zero_()
        assert (model(ids).logits - base_logits).abs().max() <= 1e-5
        for name, p in model.named_parameters():
            if name in heads:
                p.copy_(heads[name])

        model.save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(tiny_model(model_type), tmp_path).eval()
        assert torch.equal(loaded(ids).logits, logits)

        merged = model.merge_and_unload()
        assert isinstance(merged.get_decoder().norm, SplitRMSNorm)
        assert (merged(ids).logits - logits).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="cannot be saved as a .* checkpoint"):
        merged.save_pretrained(tmp_path / "merged")


@pytest.mark.parametrize("model_type", OTHER_FAMILIES)
def test_other_families_adapt_keeps_the_layers_below_preserve_layers(model_type):
    reference, model = family_model(model_type, "adapt")
    train_on_random_tokens(model, steps=5)
    ids = random_ids(vocab=VOCAB, seed=7)
    widened, base = decoder_outputs(model, ids), decoder_outputs(reference, ids)
    assert torch.equal(widened[0][..., :HIDDEN], base[0])  # layer 0: no W12
    assert (widened[1][..., :HIDDEN] - base[1]).abs().max() > 1e-3  # layer 1 has opened W12


@pytest.mark.parametrize("variant", ["cosine", "learned"])
@pytest.mark.parametrize("model_type", OTHER_FAMILIES)
def test_other_families_route_nothing_to_the_expansion_gives_the_base(model_type, variant):
    """SCALE-Route, its W12 opened (perturbed: a stand-in for training): with every token sent to the base model the
    logits are the base model's (the family's softcapping or logits_scaling applies after the routing, per token);
    with the tokens sent to the expansion they are not."""
    reference, model = family_model(model_type, variant)
    perturb_adapter(model)
    ids = random_ids(vocab=VOCAB, seed=3)
    with torch.no_grad():
        base_logits = reference(ids).logits
        if variant == "learned":
            model.base_model.scale_router["default"].threshold.fill_(0.0)  # every token to the expansion
            assert (model(ids).logits - base_logits).abs().max() > 1e-3
        unroutable(model, variant)
        assert (model(ids).logits - base_logits).abs().max() <= 1e-5
        if variant == "cosine":
            assert model.base_model.last_routing.to_preservation.all()
            model.peft_config["default"].route_threshold = 2.0  # no token to the preservation head
            assert (model(ids).logits - base_logits).abs().max() > 1e-3


@pytest.mark.parametrize("model_type", sorted(FULL_WIDTH_REFUSED))
def test_full_width_refuses_a_family_it_cannot_widen_and_says_why(model_type):
    base = tiny_model(model_type)
    with pytest.raises(ValueError, match=rf"cannot widen model_type '{model_type}': .* Use FFN mode"):
        get_peft_model(base, ScaleConfig(hidden_expansion=16))
    assert not any("scale" in type(m).__module__ for m in base.modules())
