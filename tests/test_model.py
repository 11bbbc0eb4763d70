"""ScaleModel and the PEFT integration: injection, adapters, custom models, loading, and their documented errors.

Elsewhere: the config (``test_config.py``), registration (``test_registration.py``), the plan and its whole-model
checks (``test_plan.py``), merging (``test_merge.py``)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import run_in_fresh_process
from peft import PeftModel, get_peft_model
from torch import nn
from tiny_models import perturb_adapter, random_ids, tiny_llama, tiny_model

from peft_scale import ScaleConfig, ScaleLayer


# ------------------------------------------------------------------------------------------- injection


def test_trainable_parameter_count():
    model = get_peft_model(tiny_llama(), ScaleConfig(ffn_expansion=8))
    trainable, _ = model.get_nb_trainable_parameters()
    # per layer: gate and up get 8 rows of 32 inputs, down gets 8 columns of 32 outputs; 2 layers
    assert trainable == 2 * (8 * 32 + 8 * 32 + 32 * 8)


@pytest.mark.parametrize("widths", [{"ffn_expansion": 8}, {"ffn_expansion": 8, "hidden_expansion": 16}])
def test_init_weights_false_changes_the_output_from_the_start(widths, tmp_path):
    ids = random_ids()
    with torch.no_grad():
        base = tiny_llama()(ids).logits
        exact = get_peft_model(tiny_llama(), ScaleConfig(**widths))
        assert torch.allclose(exact(ids).logits, base, atol=1e-6, rtol=0)
        drawn = get_peft_model(tiny_llama(), ScaleConfig(**widths, init_weights=False))
        assert (drawn(ids).logits - base).abs().max() > 1e-3  # logits of about 0.1 here
        drawn.save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
        assert loaded.peft_config["default"].init_weights is False
        assert torch.equal(loaded(ids).logits, drawn(ids).logits)


def test_the_callers_config_is_kept_with_what_scale_fills_in():
    config = ScaleConfig(ffn_expansion=4)
    model = get_peft_model(tiny_llama(), config)
    assert model.peft_config["default"] is config  # as in PEFT: later edits of the object reach the model
    assert config.target_modules == {"gate_proj", "up_proj", "down_proj"} and config.ffn_output_modules == ["down_proj"]
    assert config.base_ffn_shapes == [[32, 64]]


def test_a_config_reused_for_another_model_is_copied_for_that_model():
    config = ScaleConfig(ffn_expansion=4)
    first = get_peft_model(tiny_llama(), config)
    second = get_peft_model(tiny_llama(hidden_size=48, intermediate_size=96), config)  # the same object, reused
    third = get_peft_model(tiny_model("gpt2"), config)  # and for another family
    same_base = get_peft_model(tiny_llama(), config)  # the same values follow: the object is kept
    assert first.peft_config["default"] is config and same_base.peft_config["default"] is config
    assert config.base_ffn_shapes == [[32, 64]] and config.target_modules == {"gate_proj", "up_proj", "down_proj"}
    copied, gpt2 = second.peft_config["default"], third.peft_config["default"]
    assert copied is not config and copied.base_ffn_shapes == [[48, 96]]
    assert copied.target_modules == config.target_modules
    assert gpt2.target_modules == {"mlp.c_fc", "mlp.c_proj"} and gpt2.ffn_output_modules == ["mlp.c_proj"]
    assert gpt2.base_ffn_shapes == [[32, 64]]
    with torch.no_grad():  # each model runs with its own description
        for model in (first, second, third):
            model(random_ids())


def test_two_adapters_of_one_model_never_share_a_config_object():
    config = ScaleConfig(ffn_expansion=4)
    model = get_peft_model(tiny_llama(), config)
    model.add_adapter("other", config)  # what is done to one adapter (fit_router's report) is recorded in its config
    assert model.peft_config["default"] is config and model.peft_config["other"] is not config
    assert model.peft_config["other"].to_dict() == config.to_dict()


def test_from_pretrained_keeps_the_config_passed(tmp_path):
    config = ScaleConfig(ffn_expansion=4, init_weights=False)
    model = get_peft_model(tiny_llama(), config)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, config=config)  # the object get_peft_model filled in
    assert loaded.peft_config["default"] is config and config.inference_mode
    fresh = ScaleConfig(ffn_expansion=4)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, config=fresh)  # one that no model has filled in
    assert loaded.peft_config["default"] is fresh and fresh.base_ffn_shapes == [[32, 64]]
    with torch.no_grad():
        assert torch.equal(loaded(random_ids()).logits, model(random_ids()).logits)


def test_unknown_architecture_says_how_to_name_the_modules():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.w_in = nn.Linear(8, 16)
            self.w_out = nn.Linear(16, 8)

        def forward(self, x):
            return x + self.w_out(torch.relu(self.w_in(x)))

    with pytest.raises(ValueError, match=r"could not find the FFN of Block.*no config.hidden_size.*ffn_output_modules"):
        get_peft_model(Block(), ScaleConfig(ffn_expansion=4))
    with pytest.raises(ValueError, match=r"ffn_output_modules is not.*name the output projection"):
        get_peft_model(Block(), ScaleConfig(ffn_expansion=4, target_modules=["w_in", "w_out"]))


class CustomMLP(nn.Module):
    """A model outside transformers: two residual MLP blocks with a gated FFN (names of its own)."""

    def __init__(self, d=8, hidden=16, vocab=20):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"w_gate": nn.Linear(d, hidden), "w_val": nn.Linear(d, hidden), "w_out": nn.Linear(hidden, d)})
            for _ in range(2)
        )
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block["w_out"](torch.nn.functional.gelu(block["w_gate"](x)) * block["w_val"](x))
        return self.head(x)


def test_custom_module_with_named_ffn_works_end_to_end(tmp_path):
    torch.manual_seed(0)
    base = CustomMLP()
    reference = copy.deepcopy(base)
    ids = torch.randint(0, 20, (3, 5))
    config = ScaleConfig(ffn_expansion=4, target_modules=["w_gate", "w_val", "w_out"], ffn_output_modules=["w_out"])
    model = get_peft_model(base, config)
    assert torch.equal(model(ids), reference(ids))
    perturb_adapter(model, "default", seed=0)
    adapted = model(ids)
    assert (adapted - reference(ids)).abs().max() > 1e-3
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path)
    assert torch.equal(loaded(ids), adapted)
    merged = loaded.merge_and_unload()  # no config to update: the modules are simply wider
    assert merged.blocks[0]["w_out"].in_features == 20
    torch.testing.assert_close(merged(ids), adapted)


# ------------------------------------------------------------------------------------------- adapters


def test_two_adapters_coexist_switch_and_delete():
    ids = random_ids()
    reference = tiny_llama()
    model = get_peft_model(tiny_llama(), ScaleConfig(ffn_expansion=8), adapter_name="one")
    model.add_adapter("two", ScaleConfig(ffn_expansion=4, init="normal"))
    perturb_adapter(model, "one", seed=0)
    perturb_adapter(model, "two", seed=1)
    with torch.no_grad():
        out_a = model(ids).logits
        model.set_adapter("two")
        out_b = model(ids).logits
        assert (out_a - out_b).abs().max() > 1e-3
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(".two" in n and ".one" not in n for n in trainable)
        model.set_adapter("one")
        assert torch.equal(model(ids).logits, out_a)
        with model.disable_adapter():
            assert torch.equal(model(ids).logits, reference(ids).logits)
        model.delete_adapter("one")
        assert model.active_adapters == ["two"]
        assert torch.equal(model(ids).logits, out_b)
        assert not any("one" in layer.out_expansion for layer in model.modules() if isinstance(layer, ScaleLayer))


def test_two_active_adapters_add_both_neuron_sets_and_merge_to_the_same():
    ids = random_ids()
    model = get_peft_model(tiny_llama(), ScaleConfig(ffn_expansion=8), adapter_name="one")
    model.add_adapter("two", ScaleConfig(ffn_expansion=4))
    perturb_adapter(model, "one", seed=0)
    perturb_adapter(model, "two", seed=1)
    model.base_model.set_adapter(["one", "two"])
    with torch.no_grad():
        both = model(ids).logits
        model.set_adapter("one")
        assert (model(ids).logits - both).abs().max() > 1e-3
        model.base_model.set_adapter(["one", "two"])
        merged = model.merge_and_unload()
        assert merged.config.intermediate_size == 64 + 8 + 4
        assert (merged(ids).logits - both).abs().max() <= 1e-5


# -------------------------------------------------------------------------------------------- loading


@pytest.fixture
def saved_adapter(tmp_path):
    model = get_peft_model(tiny_llama(), ScaleConfig(ffn_expansion=8))
    perturb_adapter(model, "default", seed=0)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        return tmp_path, model(random_ids()).logits


def test_transformers_load_adapter(saved_adapter):
    folder, expected = saved_adapter
    model = tiny_llama()
    model.load_adapter(str(folder))
    with torch.no_grad():
        assert torch.equal(model(random_ids()).logits, expected)


def test_low_cpu_mem_usage_loading(saved_adapter):
    folder, expected = saved_adapter
    model = PeftModel.from_pretrained(tiny_llama(), folder, low_cpu_mem_usage=True)
    assert not any(p.device.type == "meta" for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(random_ids()).logits, expected)


@pytest.mark.parametrize("loader", ["peft", "transformers"])
def test_loading_into_a_base_of_other_sizes_names_the_cause(saved_adapter, loader):
    folder, _ = saved_adapter
    other = tiny_llama(hidden_size=48, intermediate_size=96)
    message = r"made for a base model whose FFNs have \[input, intermediate\] sizes \[\[32, 64\]\], but .* \[\[48, 96\]\]"
    with pytest.raises(ValueError, match=message):
        if loader == "peft":
            PeftModel.from_pretrained(other, folder)
        else:
            other.load_adapter(str(folder))


def test_loading_in_a_fresh_process_without_importing_peft_scale(saved_adapter):
    """The installed autoload hook registers SCALE when peft is imported; no `import peft_scale` needed."""
    import importlib.util

    if importlib.util.find_spec("_peft_scale_autoload") is None:
        pytest.skip("peft-scale is not installed (the autoload hook comes with `pip install .`, not `-e .`)")
    folder, expected = saved_adapter
    torch.save(expected, folder / "expected.pt")
    out = run_in_fresh_process(
        f"""
import sys, torch
from peft import PeftModel, AutoPeftModelForCausalLM
from tiny_models import tiny_llama, random_ids
model = PeftModel.from_pretrained(tiny_llama(), {str(folder)!r})
base = tiny_llama()
base.load_adapter({str(folder)!r})
expected = torch.load({str(folder)!r} + "/expected.pt")
with torch.no_grad():
    print(torch.equal(model(random_ids()).logits, expected), torch.equal(base(random_ids()).logits, expected))
"""
    )
    assert out.split() == ["True", "True"]




def test_the_learned_router_of_a_composite_config_reads_the_text_models_width():
    """Fuyu's config has no ``hidden_size`` of its own (its text config has): the router is as wide as the stream."""
    from tiny_models import assert_base_routed_tokens_exact, routed_registry_model, switching_rows

    base, routed, old, new = routed_registry_model("fuyu")
    assert routed.base_model.scale_router["default"].features == base.config.get_text_config().hidden_size
    assert_base_routed_tokens_exact(base, routed, switching_rows(old, new))
