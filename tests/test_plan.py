"""``peft_scale.plan``: the whole model's plan (widths, which modules and which ``W12`` blocks, where routing
starts) and the whole-model checks made before any module is touched (every MLP widened whole). Moved from
``test_model.py`` (FFN mode) and ``test_full_width.py`` (full width), plus the plan on its own."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import HIDDEN, LAYERS, decoder_outputs, full_width
from peft import get_peft_model
from tiny_models import VOCAB, perturb_adapter, random_ids, tiny_llama, tiny_model

from peft_scale import RouterConfig, ScaleConfig, ScaleLayer
from peft_scale.architectures import LEARNED_ROUTE_REFUSED
from peft_scale.layer import ScaleTunerLayer
from peft_scale.norm import ScaleNorm
from peft_scale.plan import plan_model, plan_module


# --------------------------------------------------------------------------------------------------- FFN mode


def test_layers_to_transform_widens_only_those_layers():
    model = get_peft_model(tiny_llama(), ScaleConfig(ffn_expansion=8, layers_to_transform=[1]))
    widened = sorted(name for name, m in model.named_modules() if isinstance(m, ScaleLayer))
    assert widened == [f"base_model.model.model.layers.1.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")]


def test_ffn_mode_preserve_layers_keeps_the_bottom_layers_w12_at_zero():
    reference = tiny_llama()
    model = get_peft_model(tiny_llama(), ScaleConfig(ffn_expansion=8, preserve_layers=1))
    downs = [layer.mlp.down_proj for layer in model.base_model.model.model.layers]
    assert [("default" in down.scale_w12) for down in downs] == [False, True]
    perturb_adapter(model)
    captured = []
    handle = model.base_model.model.model.layers[0].register_forward_hook(lambda m, a, out: captured.append(out))
    reference_handle = reference.model.layers[0].register_forward_hook(lambda m, a, out: captured.append(out))
    ids = random_ids()
    with torch.no_grad():
        model(ids)
        reference(ids)
    handle.remove()
    reference_handle.remove()
    assert torch.equal(captured[0], captured[1])  # layer 0 still computes exactly what the base model does
    with pytest.raises(ValueError, match="preserve_layers=3 exceeds the model's 2 layers"):
        get_peft_model(tiny_llama(), ScaleConfig(ffn_expansion=8, preserve_layers=3))


def test_an_mlp_matched_in_part_is_an_error():
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    config = ScaleConfig(ffn_expansion=8, exclude_modules=["model.layers.0.mlp.down_proj"])
    with pytest.raises(ValueError, match=r"widens each MLP whole.*'model.layers.0.mlp'.*output projections \[\]"):
        get_peft_model(model, config)
    assert not any(isinstance(m, ScaleLayer) for m in model.modules())  # checked before anything was touched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_projections_of_different_ffns_are_an_error():
    config = ScaleConfig(ffn_expansion=4, target_modules=["gate_up_proj", "down_proj"], ffn_fused_modules={})
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate_up_proj' produces 128 features but .* reads 64"):
        get_peft_model(tiny_model("phi3"), config)


def test_no_matching_module_lists_the_linear_layers():
    config = ScaleConfig(ffn_expansion=4, target_modules=["fc_in", "fc_out"], ffn_output_modules=["fc_out"])
    with pytest.raises(ValueError, match=r"no module of LlamaForCausalLM matches .*Linear layers .*'down_proj'"):
        get_peft_model(tiny_llama(), config)


def test_non_linear_target_is_an_error():
    config = ScaleConfig(ffn_expansion=4, target_modules=["embed_tokens", "down_proj"], ffn_output_modules=["down_proj"])
    with pytest.raises(ValueError, match="widens each MLP whole"):
        get_peft_model(tiny_llama(), config)


# ------------------------------------------------------------------------------------------------- full width


def test_every_module_touching_the_residual_stream_is_widened():
    _, model = full_width("llama", "adapt", preserve_layers=0)
    layer = model.base_model.model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    # q: 2 new heads of 8 (16 features); k, v: one new key-value head (8) in the 4:2 group ratio
    assert (attn.q_proj.in_expansion["default"], attn.q_proj.out_expansion["default"]) == (16, 16)
    assert (attn.k_proj.in_expansion["default"], attn.k_proj.out_expansion["default"]) == (16, 8)
    assert (attn.v_proj.in_expansion["default"], attn.v_proj.out_expansion["default"]) == (16, 8)
    assert (attn.o_proj.in_expansion["default"], attn.o_proj.out_expansion["default"]) == (16, 16)
    assert (mlp.gate_proj.in_expansion["default"], mlp.gate_proj.out_expansion["default"]) == (16, 8)
    assert (mlp.down_proj.in_expansion["default"], mlp.down_proj.out_expansion["default"]) == (8, 16)
    assert isinstance(layer.input_layernorm, ScaleNorm) and isinstance(layer.post_attention_layernorm, ScaleNorm)
    assert model.base_model.model.model.norm.final
    assert type(model.base_model.model.lm_head) is torch.nn.Linear  # the head is never wrapped (TRL's fused head)
    with torch.no_grad():
        outputs = decoder_outputs(model, random_ids(vocab=VOCAB))
    assert [h.shape[-1] for h in outputs] == [HIDDEN + 16] * LAYERS


@pytest.mark.parametrize(
    ("variant", "adapt_modules", "open_layers", "open_kinds"),
    [
        ("preserve", "all", [], set()),
        ("adapt", "all", [2, 3], {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        ("adapt", "attention", [2, 3], {"q_proj", "k_proj", "v_proj", "o_proj"}),
        ("route", "ffn", [2, 3], {"gate_proj", "up_proj", "down_proj"}),
    ],
)
def test_the_variant_decides_which_w12_blocks_exist(variant, adapt_modules, open_layers, open_kinds):
    _, model = full_width("llama", variant, preserve_layers=2, adapt_modules=adapt_modules)
    opened = {
        (int(name.split(".layers.")[1].split(".")[0]), name.rsplit(".", 1)[1])
        for name, module in model.named_modules()
        if isinstance(module, ScaleLayer) and "default" in module.scale_w12
    }
    assert opened == {(layer, kind) for layer in open_layers for kind in open_kinds}
    assert all(p.requires_grad for n, p in model.named_parameters() if ".scale_" in n)


@pytest.mark.parametrize(("expansion", "suggestion"), [(24, "16 or 32"), (8, "16"), (40, "32 or 48")])
def test_hidden_expansion_must_fit_the_head_layout(expansion, suggestion):
    with pytest.raises(ValueError, match=rf"hidden_expansion={expansion} does not fit .* Nearest valid sizes: {suggestion}\."):
        get_peft_model(tiny_model("llama"), ScaleConfig(hidden_expansion=expansion))


# ------------------------------------------------------------------------------------- the plan on its own


@pytest.mark.parametrize(
    "config",
    [
        dict(ffn_expansion=8, preserve_layers=1, variant="adapt"),
        dict(hidden_expansion=16, ffn_expansion=8, preserve_layers=2, variant="route", route_rule="cosine"),
        dict(hidden_expansion=16, ffn_expansion=8, preserve_layers=1, variant="route", route_rule="learned"),
        dict(hidden_expansion=16, ffn_expansion=8, preserve_layers=2, variant="adapt", adapt_modules="attention"),
    ],
)
def test_the_model_plan_decides_once_what_plan_module_decides_module_by_module(config):
    model = get_peft_model(tiny_model("llama", num_hidden_layers=4), ScaleConfig(**config))
    scale_model = model.base_model
    plan = scale_model._plans["default"]
    filled = model.peft_config["default"]
    assert plan.config is filled and plan.num_layers == 4
    assert (plan.decoder is not None) == bool(filled.hidden_expansion)
    keys = [key for key, module in scale_model.model.named_modules() if isinstance(module, ScaleTunerLayer)]
    assert keys
    for key in keys:
        assert plan.module(key) == plan_module(filled, scale_model.model.config, key, 4), key


def test_the_learned_route_in_ffn_mode_widens_the_mlps_from_preserve_layers_up():
    def config():
        return ScaleConfig(ffn_expansion=8, variant="route", route_rule="learned", preserve_layers=1)

    alone = config()
    plan = plan_model(alone, tiny_model("llama", num_hidden_layers=3).config)  # from the config alone
    assert alone.layers_to_transform == [1, 2] and plan.learned and not plan.cosine
    model = get_peft_model(tiny_model("llama", num_hidden_layers=3), config())
    plan = model.base_model._plans["default"]
    assert plan.config.layers_to_transform == [1, 2]
    assert plan.module("model.layers.1.mlp.down_proj").route_gated
    gate = plan.module("model.layers.1.mlp.gate_proj")
    assert (gate.role, gate.in_expansion, gate.out_expansion) == ("ffn_input", 0, 8)


def test_packed_projections_are_planned_with_their_parts():
    model = get_peft_model(tiny_model("phi3"), ScaleConfig(ffn_expansion=4))
    plan = model.base_model._plans["default"]
    assert plan.module("model.layers.0.mlp.gate_up_proj").out_parts == 2
    assert plan.module("model.layers.0.mlp.down_proj").out_parts == 1


@pytest.mark.parametrize("model_type", sorted(LEARNED_ROUTE_REFUSED))
def test_families_the_learned_router_cannot_route_are_refused_by_get_peft_model(model_type):
    from tiny_models import tiny_registry_model

    model = tiny_registry_model(model_type)
    with pytest.raises(ValueError, match=f"cannot route model_type '{model_type}'.*no router="):
        get_peft_model(model, ScaleConfig(ffn_expansion=8, router=RouterConfig()))
    get_peft_model(tiny_registry_model(model_type), ScaleConfig(ffn_expansion=8))  # FFN mode works
