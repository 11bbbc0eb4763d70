"""``peft_scale.experts``: fused mixture-of-experts layers (Mixtral, Qwen2-MoE, gpt-oss) widened expert by expert, and
experts kept as a ``ModuleList`` of MLPs (widened as dense MLPs)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import BLOCK_PEFT, run_in_fresh_process
from peft import PeftModel, get_peft_model
from tiny_models import VOCAB, perturb_adapter, random_ids, tiny_llama, tiny_model, tiny_registry_model
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.integrations import use_experts_implementation

from peft_scale import RouterConfig, ScaleConfig, ScaleLayer
from peft_scale.experts import Experts, UnsupportedExperts, experts_layout, find_fused_experts, fused_expert_targets

FAMILIES = ["mixtral", "qwen2_moe", "gpt_oss"]
EXPANSION = 8
# (config field, I, transposed, interleaved, biases): what each family's experts must be read as
EXPECTED = {
    "mixtral": ("intermediate_size", 24, False, False, False),
    "qwen2_moe": ("moe_intermediate_size", 16, False, False, False),
    "gpt_oss": ("intermediate_size", 24, True, True, True),
}


def wrapped(model_type: str, **overrides):
    base = tiny_model(model_type, **overrides)
    reference = copy.deepcopy(base)
    return reference, get_peft_model(base, ScaleConfig(ffn_expansion=EXPANSION))


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.mark.parametrize("model_type", FAMILIES)
def test_each_familys_experts_are_found_with_their_layout(model_type):
    model = tiny_model(model_type)
    found, refused = find_fused_experts(model)
    _, intermediate, transposed, interleaved, biases = EXPECTED[model_type]
    assert list(found) == ["model.layers.0.mlp.experts"] and not refused
    layout = found["model.layers.0.mlp.experts"]
    assert (layout.num_experts, layout.hidden, layout.intermediate, layout.parts) == (4, 32, intermediate, 2)
    assert (layout.transposed, layout.interleaved, layout.input_bias is not None) == (transposed, interleaved, biases)
    assert fused_expert_targets(model) == ["mlp.experts"]


@pytest.mark.parametrize("model_type, implementation", [(f, None) for f in FAMILIES] + [("mixtral", "eager")])
def test_init_is_exact_and_the_expert_choice_is_the_base_models(model_type, implementation):
    reference, model = wrapped(model_type, experts_implementation=implementation)
    assert model.peft_config["default"].target_modules == {"mlp.experts"}
    layer = model.base_model.model.model.layers[0].mlp.experts
    assert isinstance(layer, Experts)
    w21, w12 = layer.scale_w21["default"], layer.scale_w12["default"]
    lay = layer.layout
    assert w21.shape == ((4, 32, 2 * EXPANSION) if lay.transposed else (4, 2 * EXPANSION, 32))
    assert w12.shape == ((4, EXPANSION, 32) if lay.transposed else (4, 32, EXPANSION)) and not w12.any()
    assert w21.flatten(1).abs().sum(1).gt(0).all()  # every expert's new rows drawn from its own
    ids = random_ids(vocab=VOCAB)
    assert torch.equal(logits(model, ids), logits(reference, ids))  # base output + exact zeros
    # trained (stand-in): the output moves, the router's choice does not
    perturb_adapter(model)
    with torch.no_grad():
        ours, base = model(ids, output_router_logits=True), reference(ids, output_router_logits=True)
    assert (ours.logits - base.logits).abs().max() > 1e-3
    assert all(torch.equal(a, b) for a, b in zip(ours.router_logits, base.router_logits))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_training_reaches_the_new_neurons_and_disabling_gives_the_base(model_type):
    reference, model = wrapped(model_type)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".scale_w" in name or ".scale_b21" in name for name in trainable)
    ids = random_ids(vocab=VOCAB)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    layer = model.base_model.model.model.layers[0].mlp.experts
    losses, w21_grads = [], []
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        loss.backward()
        assert layer.scale_w12["default"].grad.abs().sum() > 0
        losses.append(loss.item())
        w21_grads.append(layer.scale_w21["default"].grad.abs().sum().item())
        optimizer.step()
        optimizer.zero_grad()
    assert w21_grads[0] == 0 and w21_grads[1] > 0  # W21 gets gradient once W12 has moved off zero
    assert losses[-1] < losses[0]
    model.eval()
    assert not torch.equal(logits(model, ids), logits(reference, ids))
    with model.disable_adapter():
        assert torch.equal(logits(model, ids), logits(reference, ids))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_save_and_load_round_trip(model_type, tmp_path):
    _, model = wrapped(model_type)
    perturb_adapter(model)
    ids = random_ids(vocab=VOCAB)
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(model_type), tmp_path)
    assert torch.equal(logits(loaded, ids), expected)


def test_merged_checkpoints_load_without_peft_and_give_the_same_logits(tmp_path):
    ids = random_ids(vocab=VOCAB)
    for model_type in FAMILIES:
        _, model = wrapped(model_type)
        perturb_adapter(model)
        unmerged = logits(model, ids)
        model.merge_adapter()
        assert (logits(model, ids) - unmerged).abs().max() <= 1e-5
        model.unmerge_adapter()
        assert torch.equal(logits(model, ids), unmerged)  # the pre-trained experts swapped back
        merged = model.merge_and_unload()
        field, intermediate, *_ = EXPECTED[model_type]
        experts = merged.model.layers[0].mlp.experts
        assert type(experts) is type(tiny_model(model_type).model.layers[0].mlp.experts)
        assert getattr(merged.config, field) == intermediate + EXPANSION
        assert (logits(merged, ids) - unmerged).abs().max() <= 1e-5
        merged.save_pretrained(tmp_path / model_type)
        torch.save(unmerged, tmp_path / f"{model_type}.pt")
    out = run_in_fresh_process(
        BLOCK_PEFT
        + f"""
import torch
from transformers import AutoModelForCausalLM
for model_type in {FAMILIES!r}:
    model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + '/' + model_type).eval()
    with torch.no_grad():
        got = model(torch.tensor({ids.tolist()})).logits
    print(model_type, (got - torch.load({str(tmp_path)!r} + '/' + model_type + '.pt')).abs().max().item())
"""
    )
    diffs = dict(line.split() for line in out.strip().splitlines())
    assert sorted(diffs) == sorted(FAMILIES) and all(float(d) <= 1e-5 for d in diffs.values()), out


def test_several_adapters_add_their_own_neurons():
    reference, model = wrapped("gpt_oss")
    model.add_adapter("second", ScaleConfig(ffn_expansion=4))
    perturb_adapter(model, "default", seed=1)
    perturb_adapter(model, "second", seed=2)
    ids = random_ids(vocab=VOCAB)
    layer = model.base_model.model.model.layers[0].mlp.experts
    outputs = []
    layer.register_forward_hook(lambda module, args, output: outputs.append(output))

    def experts_output(adapters):
        model.base_model.set_adapter(adapters)
        logits(model, ids)
        return outputs[-1]

    with model.disable_adapter():
        base = experts_output("default")
    default, second, both = experts_output("default"), experts_output("second"), experts_output(["default", "second"])
    assert (both - (default + second - base)).abs().max() <= 1e-6  # each adapter adds its own neurons' output
    expected = logits(model, ids)
    model.merge_adapter(["default", "second"])
    assert (logits(model, ids) - expected).abs().max() <= 1e-5
    assert layer.get_base_layer().down_proj.shape == (4, 24 + 8 + 4, 32)


def test_the_learned_router_gates_the_new_neurons_per_token():
    base = tiny_model("qwen2_moe")
    reference = copy.deepcopy(base)
    per_token = RouterConfig(hidden=0, smoothing=0.0, gate="hard", preservation_copy=False)  # a linear probe
    config = ScaleConfig(ffn_expansion=EXPANSION, preserve_layers=0, router=per_token)
    model = get_peft_model(base, config)
    layer = model.base_model.model.model.layers[0].mlp.experts
    assert layer.route_gated == {"default": True} and "default" in layer.scale_router  # the router lives here
    router = model.base_model.scale_router["default"]
    with torch.no_grad():  # a fitted linear probe on one feature of the embeddings: about half the tokens each way
        router.w_in[0, 3] = 1.0
        router.fitted.fill_(1.0)
    perturb_adapter(model)
    ids = random_ids(vocab=VOCAB)
    ours, expected = logits(model, ids), logits(reference, ids)
    to_base = model.base_model.last_routing.to_preservation
    assert to_base.any() and (~to_base).any()
    assert torch.equal(ours[to_base], expected[to_base])  # 1 layer: a token's MLP output is its own
    assert (ours[~to_base] - expected[~to_base]).abs().amax(-1).gt(1e-4).all()


# ------------------------------------------------------------------------------------------- explicit names


def test_experts_can_be_named_explicitly():
    reference = tiny_model("mixtral")
    model = get_peft_model(copy.deepcopy(reference), ScaleConfig(ffn_expansion=4, target_modules=["experts"]))
    assert isinstance(model.base_model.model.model.layers[0].mlp.experts, Experts)
    ids = random_ids(vocab=VOCAB)
    assert torch.equal(logits(model, ids), logits(reference, ids))


class ModuleListMoe(nn.Module):
    """A top-2 MoE block whose experts are a ``ModuleList`` of the family's dense MLPs (no such causal LM ships in
    transformers 5.25; the dense FFN path widens each expert as an MLP)."""

    def __init__(self, mlps: list[nn.Module]) -> None:
        super().__init__()
        self.router = nn.Linear(mlps[0].gate_proj.in_features, len(mlps), bias=False)
        self.experts = nn.ModuleList(mlps)
        self.choices = []

    def forward(self, x):
        weights, chosen = self.router(x).softmax(-1).topk(2, dim=-1)
        self.choices.append(chosen)
        out = torch.zeros_like(x)
        for k in range(2):
            for e, expert in enumerate(self.experts):
                mask = (chosen[..., k] == e).unsqueeze(-1)
                out = out + torch.where(mask, expert(x) * weights[..., k : k + 1], 0)
        return out


def test_module_list_experts_are_widened_as_dense_mlps():
    reference = tiny_llama()
    torch.manual_seed(3)
    for layer in reference.model.layers:
        layer.mlp = ModuleListMoe([copy.deepcopy(layer.mlp) for _ in range(3)])
        for expert in layer.mlp.experts:
            for p in expert.parameters():
                p.data.normal_(0, 0.2)
    model = get_peft_model(copy.deepcopy(reference), ScaleConfig(ffn_expansion=4))
    widened = {n for n, m in model.named_modules() if isinstance(m, ScaleLayer)}
    assert len(widened) == 2 * 3 * 3 and all(".mlp.experts." in n for n in widened)  # layers x experts x projections
    ids = random_ids(vocab=VOCAB)
    assert (logits(model, ids) - logits(reference, ids)).abs().max() <= 1e-5
    for ours_layer, base_layer in zip(model.base_model.model.model.layers, reference.model.layers):
        assert torch.equal(ours_layer.mlp.choices[-1], base_layer.mlp.choices[-1])  # the router's choice, every layer
    perturb_adapter(model)
    ours = logits(model, ids)
    with model.disable_adapter():
        assert torch.equal(logits(model, ids), logits(reference, ids))
    merged = model.merge_and_unload()
    assert (logits(merged, ids) - ours).abs().max() <= 1e-5


# ------------------------------------------------------------------------------ classes that declare no layout

# registry family -> {experts module: (inputs, E, I, transposed)}, from UNDECLARED_LAYOUTS (registry sizes: D = 32)
UNDECLARED = {
    "llama4_text": {"model.layers.0.feed_forward.experts": (("gate_up_proj",), 4, 48, True)},
    "inkling_text": {
        "model.layers.0.mlp.experts": (("gate_up_proj",), 4, 24, False),  # declared by its class
        "model.layers.0.mlp.shared_experts": (("gate_proj", "up_proj"), 2, 24, False),  # gate and up kept apart
    },
    "jetmoe": {"model.layers.0.mlp": (("input_linear.weight",), 4, 48, False)},  # the whole MoE layer
}


@pytest.mark.parametrize("model_type", sorted(UNDECLARED))
def test_undeclared_experts_are_read_from_their_row(model_type):
    found, refused = find_fused_experts(tiny_registry_model(model_type))
    assert not refused
    got = {name: (lay.inputs, lay.num_experts, lay.intermediate, lay.transposed) for name, lay in found.items()}
    assert got == UNDECLARED[model_type]  # JetMoE's attention experts (self_attention.experts) are not FFNs


def test_experts_with_gate_and_up_apart_merge_part_by_part():
    """Inkling's shared experts keep gate_proj and up_proj as two parameters: the new rows are one packed W21 whose
    halves go to each, and the merged model is Inkling's own class at the wider size."""
    ids = random_ids(batch=1, length=6)
    model = get_peft_model(tiny_registry_model("inkling_text"), ScaleConfig(ffn_expansion=EXPANSION))
    shared = model.base_model.model.model.layers[0].mlp.shared_experts
    assert shared.scale_w21["default"].shape == (2, 2 * EXPANSION, 32)
    perturb_adapter(model)
    unmerged = logits(model, ids)
    merged = model.merge_and_unload()
    shared = merged.model.layers[0].mlp.shared_experts
    assert type(shared).__name__ == "InklingSharedExperts"
    assert shared.gate_proj.shape == shared.up_proj.shape == (2, 24 + EXPANSION, 32)
    assert merged.config.moe_intermediate_size == 24 + EXPANSION
    assert (logits(merged, ids) - unmerged).abs().max() <= 1e-5


def test_jetmoe_routes_once_and_records_its_router_logits_once():
    """JetMoE's experts module is its whole MoE layer, router included: the new neurons' pass takes the base pass's
    routing (``replayed``), so the router logits (and the auxiliary loss made from them) are the base model's."""
    base = tiny_registry_model("jetmoe")
    reference = copy.deepcopy(base)
    model = get_peft_model(base, ScaleConfig(ffn_expansion=EXPANSION))
    perturb_adapter(model)
    ids = random_ids(batch=1, length=6)
    with torch.no_grad():
        ours = model(ids, labels=ids, output_router_logits=True)
        theirs = reference(ids, labels=ids, output_router_logits=True)
    assert len(ours.router_logits) == len(theirs.router_logits)
    assert all(torch.equal(a, b) for a, b in zip(ours.router_logits, theirs.router_logits))
    assert torch.equal(ours.aux_loss, theirs.aux_loss) and (ours.logits - theirs.logits).abs().max() > 1e-3
    layer = model.base_model.model.model.layers[0].mlp
    assert type(layer.get_base_layer().router).__name__ == "JetMoeTopKGating"  # put back after the pass


def test_shared_experts_side_by_side_get_new_neurons_per_expert(tmp_path):
    """Aria's shared-experts MLP holds its 2 shared experts side by side (intermediate_size x 2 wide): it gets
    ffn_expansion neurons per expert, 2 x 8, so that the merged config (intermediate_size = I + 8) builds every
    widened shape: the routed experts' I + 8 and the shared MLP's 2 (I + 8)."""
    ids = random_ids(batch=1, length=6)
    model = get_peft_model(tiny_registry_model("aria_text"), ScaleConfig(ffn_expansion=EXPANSION))
    moe = model.base_model.model.model.layers[0].mlp
    assert moe.experts.expansion["default"] == EXPANSION
    assert moe.shared_experts.down_proj.in_expansion["default"] == 2 * EXPANSION
    perturb_adapter(model)
    unmerged = logits(model, ids)
    merged = model.merge_and_unload()
    assert merged.config.intermediate_size == 48 + EXPANSION
    assert merged.model.layers[0].mlp.shared_experts.gate_proj.out_features == 2 * (48 + EXPANSION)
    merged.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (logits(loaded, ids) - unmerged).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------------------- refusals


class UndeclaredExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(4, 48, 32))
        self.down_proj = nn.Parameter(torch.zeros(4, 32, 24))


class RelativeBias(nn.Module):  # 3-D parameters of another kind: ignored
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(2, 3, 4))


class Config:
    _experts_implementation = "eager"


@use_experts_implementation(has_post_expert_norm=True)
class NormalisedExperts(UndeclaredExperts):
    def __init__(self, config):
        super().__init__()


@use_experts_implementation
class MisshapenExperts(UndeclaredExperts):
    def __init__(self, config):
        super().__init__()
        self.down_proj = nn.Parameter(torch.zeros(4, 32, 20))


@pytest.mark.parametrize(
    "module, message",
    [
        (UndeclaredExperts(), "UndeclaredExperts holds 3-D parameters"),
        (NormalisedExperts(Config()), "NormalisedExperts normalises each expert's output"),
        (MisshapenExperts(Config()), "MisshapenExperts's shapes"),
    ],
)
def test_experts_scale_cannot_read_are_refused_by_class(module, message):
    with pytest.raises(UnsupportedExperts, match=message):
        experts_layout(module)
    assert experts_layout(RelativeBias()) is None and experts_layout(nn.Conv1d(2, 2, 3)) is None


def test_a_model_with_unreadable_experts_is_refused_before_anything_is_touched():
    model = tiny_model("mixtral")
    model.model.layers[0].mlp.experts.has_post_expert_norm = True
    with pytest.raises(ValueError, match="model.layers.0.mlp.experts.*normalises each expert's output"):
        get_peft_model(model, ScaleConfig(ffn_expansion=4))
    assert not any(isinstance(m, Experts) for m in model.modules())
    with pytest.raises(ValueError, match="target 'model.layers.0.mlp.experts'.*normalises"):
        get_peft_model(model, ScaleConfig(ffn_expansion=4, target_modules=["experts"]))


def test_merging_experts_of_different_widths_is_refused():
    model = get_peft_model(
        tiny_model("mixtral", num_hidden_layers=2), ScaleConfig(ffn_expansion=4, layers_to_transform=[0])
    )
    with pytest.raises(ValueError, match="different intermediate sizes"):
        model.merge_and_unload()


def test_a_merge_whose_config_would_build_other_shapes_cannot_be_saved(tmp_path):
    # Dots1's shared experts are moe_intermediate_size * n_shared_experts wide: widening the experts moves them too
    model = tiny_model("dots1")
    with pytest.warns(UserWarning, match="cannot be saved as a standard checkpoint"):
        merged = get_peft_model(model, ScaleConfig(ffn_expansion=EXPANSION)).merge_and_unload()
    assert merged.config.moe_intermediate_size == 16 + EXPANSION
    with pytest.raises(ValueError, match=r"shared_experts\.gate_proj\.weight: \(32, 32\) \(the config builds \(48, 32\)\)"):
        merged.save_pretrained(tmp_path)


def test_init_weights_false_moves_the_experts_output_from_the_start():
    base = tiny_model("mixtral", num_hidden_layers=1)
    ids = random_ids()
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        model = get_peft_model(copy.deepcopy(base), ScaleConfig(ffn_expansion=8, init_weights=False))
        assert (model(input_ids=ids).logits - expected).abs().max() > 1e-3


def test_experts_given_every_token_once_per_expert_are_gated_per_token():
    """Llama 4's experts receive ``(experts * tokens, d)`` (every token once per expert): the learned router's
    gate is repeated alike, so a token routed to the base model gets the base model's logits."""
    from tiny_models import assert_base_routed_tokens_exact, routed_registry_model, switching_rows

    base, routed, old, new = routed_registry_model("llama4_text")
    assert_base_routed_tokens_exact(base, routed, switching_rows(old, new))
