"""ScaleModel and the PEFT integration: adapters, configs, custom models, loading, and every documented error."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import BLOCK_PEFT, run_in_fresh_process
from peft import PeftConfig, PeftModel, get_peft_model
from peft.utils import PeftType
from torch import nn
from tiny_models import perturb_adapter, random_ids, tiny_llama, tiny_model

from peft_scale import ScaleConfig, ScaleLayer, register_scale


# ------------------------------------------------------------------------------------------ registration


def test_registered_as_a_peft_type():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    from peft_scale import ScaleModel

    assert PeftType("SCALE") is PeftType.SCALE and "SCALE" in list(PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING["SCALE"] is ScaleConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["SCALE"] is ScaleModel
    assert ScaleConfig(ffn_expansion=4).peft_type is PeftType.SCALE


def test_registering_twice_is_harmless():
    register_scale()
    register_scale()
    assert list(PeftType).count(PeftType.SCALE) == 1


def test_another_package_claiming_the_type_is_an_error(monkeypatch):
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    class Impostor:
        pass

    monkeypatch.setitem(PEFT_TYPE_TO_CONFIG_MAPPING, PeftType.SCALE, Impostor)
    with pytest.raises(RuntimeError, match="already registered to .*Impostor; two packages claim the same PEFT type"):
        register_scale()


# ------------------------------------------------------------------------------------------------ config


def test_config_round_trips_through_json(tmp_path):
    config = ScaleConfig(
        ffn_expansion=16, target_modules=["gate_proj", "up_proj", "down_proj"], layers_to_transform=[0], init="normal"
    )
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, ScaleConfig)
    assert loaded.to_dict() == {**config.to_dict(), "target_modules": loaded.target_modules}
    assert loaded.target_modules == {"gate_proj", "up_proj", "down_proj"}


def test_a_config_saved_by_version_0_1_still_loads():
    """Frozen copy of an adapter_config.json written by peft-scale 0.1.0: it must keep loading."""
    saved = json.loads((Path(__file__).parent / "data" / "adapter_config_v0.1.json").read_text())
    config = PeftConfig.from_peft_type(**saved)
    assert isinstance(config, ScaleConfig)
    assert config.ffn_expansion == 8 and config.init == "svd" and config.base_ffn_shapes == [[32, 64]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, r"needs something to widen: ffn_expansion > 0 .* and/or hidden_expansion > 0"),
        ({"ffn_expansion": -3}, r"ffn_expansion=-3\): must be a non-negative integer"),
        ({"ffn_expansion": 2.5}, "must be a non-negative integer"),
        ({"ffn_expansion": 8, "variant": "route", "route_rule": "cosine"}, r"route_rule='cosine'\) needs hidden_expansion > 0"),
        ({"ffn_expansion": 8, "variant": "wide"}, r"variant='wide'\): choose one of"),
        ({"ffn_expansion": 8, "adapt_modules": "attention"}, "needs hidden_expansion > 0: FFN mode widens no attention"),
        ({"ffn_expansion": 8, "init": "zeros"}, r"init='zeros'\): choose one of \['svd', 'normal'\]"),
        ({"ffn_expansion": 8, "layers_pattern": "layers"}, "only has an effect together with `layers_to_transform`"),
        ({"ffn_expansion": 8, "ffn_fused_modules": {"gate_up_proj": 0}}, "must be a positive integer"),
    ],
)
def test_bad_config_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScaleConfig(**kwargs)


def test_trl_fields_exist():
    config = ScaleConfig(ffn_expansion=4)
    assert config.modules_to_save is None and config.trainable_token_indices is None


# ------------------------------------------------------------------------------------------- injection


def test_trainable_parameter_count():
    model = get_peft_model(tiny_llama(), ScaleConfig(ffn_expansion=8))
    trainable, _ = model.get_nb_trainable_parameters()
    # per layer: gate and up get 8 rows of 32 inputs, down gets 8 columns of 32 outputs; 2 layers
    assert trainable == 2 * (8 * 32 + 8 * 32 + 32 * 8)


def test_the_callers_config_is_not_modified():
    config = ScaleConfig(ffn_expansion=4)
    first = get_peft_model(tiny_llama(), config)
    second = get_peft_model(tiny_llama(hidden_size=48, intermediate_size=96), config)  # the same object, reused
    assert config.target_modules is None and config.base_ffn_shapes is None
    assert first.peft_config["default"].base_ffn_shapes == [[32, 64]]
    assert second.peft_config["default"].base_ffn_shapes == [[48, 96]]


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


def test_unknown_architecture_says_how_to_name_the_modules():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.w_in = nn.Linear(8, 16)
            self.w_out = nn.Linear(16, 8)

        def forward(self, x):
            return x + self.w_out(torch.relu(self.w_in(x)))

    with pytest.raises(ValueError, match=r"does not know where the FFN of model_type 'custom' is.*ffn_output_modules"):
        get_peft_model(Block(), ScaleConfig(ffn_expansion=4))
    with pytest.raises(ValueError, match="cannot choose `ffn_output_modules`"):
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
