"""``peft_scale.routing``: installing SCALE-Route on a model and taking it off again, with the router saved, loaded and
deleted with its adapter; injection errors; and the defaults, end to end.

The setting (``conftest.py``): two separable synthetic domains on a tiny 4-layer Llama, the *old* domain token ids
4-63 (the base model is first trained to speak it, so that its own samples are old-domain text), the *new* domain
ids 64-127. The router reads the stream entering layer ``PRESERVE``.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import LAYERS, NEW, OLD, PRESERVE, SMOOTHING, domain_ids, fitted, old_then_new, run_in_fresh_process
from peft import PeftModel, get_peft_model
from tiny_models import perturb_adapter

from peft_scale import RouterConfig, ScaleConfig, fit_router


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (dict(ffn_expansion=8, variant="route", preserve_layers=LAYERS), "leaves nothing to widen"),
        (dict(hidden_expansion=16, variant="route", preserve_layers=LAYERS), "leaves nothing to widen"),
        (dict(ffn_expansion=8, variant="route", preserve_layers=2, layers_to_transform=[1, 2, 3]), "none below it"),
    ],
)
def test_injection_errors(old_speaker, config, message):
    with pytest.raises(ValueError, match=message):
        get_peft_model(copy.deepcopy(old_speaker), ScaleConfig(**config))


def test_merging_a_learned_route_adapter_is_refused(old_speaker):
    _, model, _ = fitted(old_speaker)
    with pytest.raises(ValueError, match="learned router's gate depends on the input"):
        model.merge_and_unload()


def test_save_and_load_in_a_fresh_process_with_a_second_plain_adapter(old_speaker, tmp_path):
    reference = copy.deepcopy(old_speaker)
    model = get_peft_model(
        copy.deepcopy(old_speaker), ScaleConfig(ffn_expansion=16, variant="route", preserve_layers=PRESERVE),
        adapter_name="routed",
    )
    fit_router(model, domain_ids(NEW, seed=1), domain_ids(OLD, seed=2), progress=False)
    model.add_adapter("plain", ScaleConfig(ffn_expansion=8))
    perturb_adapter(model, "routed", seed=1, scale=0.5)
    perturb_adapter(model, "plain", seed=2, scale=0.5)
    mixed = torch.cat([domain_ids(OLD, 1, 24, seed=11), domain_ids(NEW, 1, 24, seed=12)])  # an old and a new row
    expected = {}
    with torch.no_grad():
        for name in ("routed", "plain"):
            model.set_adapter(name)
            expected[name] = model(input_ids=mixed).logits
        routing = model.base_model.last_routing
        model.set_adapter("routed")
        model(input_ids=mixed)
        mask = model.base_model.last_routing.to_preservation
    assert routing is not None and mask[0].all() and (~mask[1]).float().mean() > 0.8
    reference.save_pretrained(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapters")
    saved = json.loads((tmp_path / "adapters" / "routed" / "adapter_config.json").read_text())  # PEFT: one folder each
    assert saved["route_rule"] == "learned" and saved["router_report"]["old_source"] == "old data"
    torch.save({"mixed": mixed}, tmp_path / "inputs.pt")
    run_in_fresh_process(
        f"""
import torch, peft_scale
from pathlib import Path
from peft import PeftModel
from transformers import AutoModelForCausalLM
root = Path({str(tmp_path)!r})
torch.set_num_threads(1)
base = AutoModelForCausalLM.from_pretrained(root / "base").eval()
folder = root / "adapters"
model = PeftModel.from_pretrained(base, folder / "routed", adapter_name="routed")
model.load_adapter(folder / "plain", adapter_name="plain")
mixed = torch.load(root / "inputs.pt")["mixed"]
out = {{}}
with torch.no_grad():
    for name in ("plain", "routed"):
        model.set_adapter(name)
        out[name] = model(input_ids=mixed).logits
    out["mask"] = model.base_model.last_routing.to_preservation
torch.save(out, root / "loaded.pt")
"""
    )
    loaded = torch.load(tmp_path / "loaded.pt")
    assert torch.equal(loaded["mask"], mask)
    for name in ("routed", "plain"):
        assert torch.allclose(loaded[name], expected[name], atol=1e-6, rtol=0), name


@pytest.mark.parametrize("loader", ["peft", "peft_low_cpu_mem_usage", "transformers_load_adapter"])
def test_every_loading_path_brings_the_fitted_router(old_speaker, loader, tmp_path):
    _, model, _ = fitted(old_speaker)
    perturb_adapter(model, scale=0.5)
    ids = torch.cat([domain_ids(OLD, 2, 24, seed=11), domain_ids(NEW, 2, 24, seed=12)])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    mask = model.base_model.last_routing.to_preservation
    model.save_pretrained(tmp_path)
    base = copy.deepcopy(old_speaker)
    if loader == "transformers_load_adapter":  # no PeftModel: the router must live inside the model itself
        base.load_adapter(str(tmp_path))
        loaded = base
    else:
        loaded = PeftModel.from_pretrained(base, tmp_path, low_cpu_mem_usage=loader.endswith("usage"))
        assert torch.equal(loaded.base_model.scale_router["default"].threshold, model.base_model.scale_router["default"].threshold)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)
    if loader != "transformers_load_adapter":
        assert torch.equal(loaded.base_model.last_routing.to_preservation, mask)


def test_delete_adapter_removes_its_router(old_speaker):
    _, model, _ = fitted(old_speaker)
    model.add_adapter("other", ScaleConfig(ffn_expansion=8))
    model.set_adapter("other")
    model.delete_adapter("default")
    assert "default" not in model.base_model.scale_router
    assert not any("scale_router" in key for key in model.state_dict())
    model(input_ids=domain_ids(OLD, 2, 8))  # the gate hook went with the adapter


def test_saved_cosine_route_config_without_route_rule_loads_as_cosine(tmp_path):
    config = ScaleConfig(hidden_expansion=16, ffn_expansion=8, variant="route", route_rule="cosine")
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    del saved["route_rule"], saved["router"], saved["router_report"]  # an adapter saved before the router
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(tmp_path).route_rule == "cosine"
    assert ScaleConfig(ffn_expansion=8, variant="route").route_rule == "learned"


def test_router_smoothing_is_saved_and_loaded(smoothed, old_speaker, tmp_path):
    _, model, _ = smoothed
    ids = old_then_new()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    mask = model.base_model.last_routing.to_preservation
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["router"]["smoothing"] == SMOOTHING
    loaded = PeftModel.from_pretrained(copy.deepcopy(old_speaker), tmp_path)
    assert loaded.peft_config["default"].router.smoothing == SMOOTHING
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)
    assert torch.equal(loaded.base_model.last_routing.to_preservation, mask)
    # a 0.1.0 config saved before the option existed loads as 0 (each token decides on its own logit)
    flat = {key: value for key, value in saved.items() if key != "router"}
    flat.update(route_rule="learned", router_hidden=saved["router"]["hidden"])
    (tmp_path / "adapter_config.json").write_text(json.dumps(flat))
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(tmp_path).router.smoothing == 0.0


def test_the_defaults_route_a_trained_adapter_with_old_text_exact(old_speaker):
    """RouterConfig() end to end: fitted, trained, and old text computes the base model's logits (the
    preservation copy makes old tokens exact after new ones in the same sequence too)."""
    reference = copy.deepcopy(old_speaker)
    model = get_peft_model(
        copy.deepcopy(old_speaker), ScaleConfig(ffn_expansion=16, preserve_layers=PRESERVE, router=RouterConfig())
    )
    report = fit_router(model, domain_ids(NEW, seed=1), domain_ids(OLD, seed=2), progress=False)
    assert report.calibrate_on == "cross_fitted" and report.old_to_base == 1.0
    perturb_adapter(model, scale=0.5)
    model.eval()
    old = domain_ids(OLD, 2, 24, seed=30)
    mixed = torch.cat([domain_ids(NEW, 2, 8, seed=31), old], 1)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=old).logits, reference(input_ids=old).logits, atol=1e-5)
        out = model(input_ids=mixed).logits
        to_base = model.base_model.last_routing.to_preservation
        base = reference(input_ids=mixed).logits
    # the average leaves the expansion a few old tokens after the switch; from there on, old tokens are exact
    assert not to_base[:, 2:8].any() and to_base[:, -8:].all()
    assert torch.allclose(out[to_base], base[to_base], atol=1e-5)


# ------------------------------------------------------------------- families whose layers the router reads apart


@pytest.mark.parametrize("model_type", ["opt", "qwen2_moe"])
def test_mlps_that_flatten_the_tokens_are_routed_per_token(model_type):
    """OPT's MLP and Qwen2-MoE's shared expert run on ``(batch * seq, d)``: routed per token, with the copy."""
    from tiny_models import assert_base_routed_tokens_exact, routed_registry_model, switching_rows

    base, routed, old, new = routed_registry_model(model_type)
    assert_base_routed_tokens_exact(base, routed, switching_rows(old, new))


def test_the_router_reads_its_layer_where_that_layer_widens_nothing(tmp_path):
    """Nemotron-H's layer 0 is a Mamba mixer (no FFN): the router still reads the stream entering it, and lives in
    the first gated module above; it routes, and is saved and loaded with its adapter."""
    from tiny_models import assert_base_routed_tokens_exact, routed_registry_model, switching_rows, tiny_registry_model

    base, routed, old, new = routed_registry_model("nemotron_h")
    assert routed.base_model.router_layer("default") is routed.base_model.model.model.layers[0]
    holders = [name for name, module in routed.named_modules() if "default" in getattr(module, "scale_router", {})]
    holders = [name for name in holders if ".layers." in name]  # (the PEFT model's own mapping aside)
    assert len(holders) == 1 and ".layers.0." not in holders[0]
    ids = switching_rows(old, new)
    logits = assert_base_routed_tokens_exact(base, routed, ids)
    routed.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_registry_model("nemotron_h"), tmp_path).eval()
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - logits).abs().max() <= 1e-5


def test_a_stream_of_parallel_copies_is_read_as_their_mean():
    """DeepSeek V4 carries ``hc_mult`` copies of the stream, ``(batch, seq, n, d)``: the router reads their mean
    (``router_stream``), in fitting and in the forward pass alike, and routes per token."""
    from tiny_models import assert_base_routed_tokens_exact, routed_registry_model, switching_rows

    from peft_scale.token_router import router_stream

    streams = torch.randn(2, 3, 4, 5)
    assert torch.equal(router_stream(streams, 5), streams.mean(2))
    assert torch.equal(router_stream(streams[:, :, 0], 3), streams[:, :, 0, :3])
    base, routed, old, new = routed_registry_model("deepseek_v4")
    assert_base_routed_tokens_exact(base, routed, switching_rows(old, new))
