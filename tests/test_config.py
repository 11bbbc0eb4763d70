"""``peft_scale.config``: ``ScaleConfig``, its JSON round trip, old saved configs, and every bad value named (moved from
``test_model.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from peft import PeftConfig

from peft_scale import RouterConfig, ScaleConfig


def test_config_round_trips_through_json(tmp_path):
    config = ScaleConfig(
        ffn_expansion=16,
        target_modules=["gate_proj", "up_proj", "down_proj"],
        layers_to_transform=[0],
        init="normal",
        init_weights=False,
    )
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, ScaleConfig)
    assert loaded.to_dict() == {**config.to_dict(), "target_modules": loaded.target_modules}
    assert loaded.target_modules == {"gate_proj", "up_proj", "down_proj"} and loaded.init_weights is False


def test_a_config_saved_by_version_0_1_still_loads():
    """Frozen copy of an adapter_config.json written by peft-scale 0.1.0: it must keep loading."""
    saved = json.loads((Path(__file__).parent / "data" / "adapter_config_v0.1.json").read_text())
    config = PeftConfig.from_peft_type(**saved)
    assert isinstance(config, ScaleConfig)
    assert config.ffn_expansion == 8 and config.init == "svd" and config.base_ffn_shapes == [[32, 64]]
    assert "init_weights" not in saved and config.init_weights is True  # fields added later take their default


ROUTED_V010 = Path(__file__).parent / "data" / "routed_v0.1.0"


@pytest.mark.parametrize("name", ["defaults", "options"])
def test_a_learned_route_adapter_saved_by_0_1_0_loads_and_routes_exactly_as_before(name):
    """Adapters written by peft-scale 0.1.0 (``tests/data/routed_v0.1.0/make.py``): the 0.1.0 router defaults, and
    every router option away from its default (smoothing falling faster, started from the old side, a soft gate, the
    preservation copy). Their flat ``router_*`` fields become a ``RouterConfig`` with 0.1.0's values, and the logits
    are 0.1.0's, bit for bit up to float noise."""
    import sys

    import torch
    from peft import PeftModel

    sys.path.insert(0, str(ROUTED_V010))
    from make import ADAPTERS  # noqa: E402  (the settings the adapters were saved with)
    from tiny_models import tiny_model

    from peft_scale import RouterConfig

    expected = torch.load(ROUTED_V010 / name / "expected.pt")
    base = tiny_model("llama", num_hidden_layers=4)
    with torch.no_grad():
        assert torch.equal(base(input_ids=expected["input_ids"]).logits, expected["base_logits"]), "base rebuilt"
    model = PeftModel.from_pretrained(base, ROUTED_V010 / name).eval()
    flat = {key.removeprefix("router_"): value for key, value in ADAPTERS[name].items()}
    assert model.peft_config["default"].router == RouterConfig(
        **{"smoothing": 0.0, "gate": "hard", "preservation_copy": False, **flat},
        calibrate_on="held_out", max_old_error=0.01,
    )
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=expected["input_ids"]).logits, expected["logits"], rtol=0, atol=1e-6)
    # a 0.1.0 config saved before a router field existed takes 0.1.0's value for it, not the new default
    saved = json.loads((ROUTED_V010 / name / "adapter_config.json").read_text())
    for key in ("router_gate", "router_preservation_copy"):  # (the two added last)
        saved.pop(key, None)
    config = PeftConfig.from_peft_type(**saved)
    assert (config.router.gate, config.router.preservation_copy) == ("hard", False)


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
        ({"ffn_expansion": 8, "init_weights": "gaussian"}, r"init_weights='gaussian'\): pass True .* or False"),
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


# ------------------------------------------------------------------------- RouterConfig (moved from test_routing.py)


def test_soft_gate_config_errors():
    with pytest.raises(ValueError, match="gate='sigmoid'.*'soft'.*'hard'"):
        RouterConfig(gate="sigmoid")
    with pytest.raises(ValueError, match="router=RouterConfig.*variant='adapt'.*drop router"):
        ScaleConfig(ffn_expansion=8, variant="adapt", preserve_layers=1, router=RouterConfig(gate="soft"))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (dict(ffn_expansion=8, variant="route", route_rule="nearest"), r"route_rule='nearest'\): choose one of"),
        (dict(ffn_expansion=8, variant="route", route_in_training=True), "an option of the cosine rule"),
        (dict(ffn_expansion=8, variant="route", route_rule="cosine"), r"route_rule='cosine'\) needs hidden_expansion"),
        (dict(ffn_expansion=8, router=RouterConfig(hidden=4), route_rule="cosine", hidden_expansion=16),
         r"sets a learned router, but this config has variant='route', route_rule='cosine'"),
    ],
)
def test_config_errors(config, message):
    with pytest.raises(ValueError, match=message):
        ScaleConfig(**config)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(smoothing=1.0), r"smoothing=1.0\): the moving average's coefficient a must be a number in \[0, 1\)"),
        (dict(smoothing=-0.1), r"smoothing=-0.1\): .* in \[0, 1\)"),
        (dict(smoothing="0.8"), r"smoothing='0.8'\): .* in \[0, 1\)"),
        (dict(hidden=-1), r"hidden=-1\): a non-negative integer"),
        (dict(preservation_copy=1), r"preservation_copy=1\): pass True or False"),
        (dict(max_old_error=0.5), r"max_old_error=0.5\): a share between 0 and 0.5"),
        (dict(seed=1.5), r"seed=1.5\): an integer"),
        (dict(outranks="fr"), r"outranks='fr'\): a list of adapter names"),
    ],
)
def test_router_config_errors(settings, message):
    with pytest.raises(ValueError, match=r"RouterConfig\(" + message):
        RouterConfig(**settings)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(smoothing=0.8, smoothing_start="first"), r"smoothing_start='first'\): 'token' or 'old'"),
        (dict(smoothing=0.0, smoothing_start="old"), r"smoothing_start='old'\) needs smoothing > 0"),
        (dict(smoothing=0.0, smoothing_fall=0.4), r"smoothing_fall=0.4\) needs smoothing > 0"),
        (dict(smoothing=0.8, smoothing_fall=1.0), r"smoothing_fall=1.0\): a number in \[0, 1\)"),
        (dict(smoothing=0.8, smoothing_fall="0.4"), r"smoothing_fall='0.4'\): a number in \[0, 1\)"),
        (dict(smoothing=0.8, smoothing_fall=True), r"smoothing_fall=True\): a number in \[0, 1\)"),
    ],
)
def test_the_options_kept_for_0_1_0_adapters_are_checked_and_refused_on_a_new_config(settings, message):
    with pytest.raises(ValueError, match=r"RouterConfig\(" + message):
        RouterConfig(**settings)
    for legacy in (dict(smoothing_fall=0.4), dict(smoothing_start="old")):
        with pytest.raises(ValueError, match="kept only so that adapters saved by peft-scale 0.1.0 load"):
            ScaleConfig(ffn_expansion=8, router=RouterConfig(**legacy))
    assert RouterConfig(smoothing_fall=0).smoothing_fall == 0.0


def test_a_router_config_makes_a_routed_adapter_with_the_settings_that_met_the_goals():
    config = ScaleConfig(ffn_expansion=8, preserve_layers=1, router=RouterConfig())
    assert (config.variant, config.route_rule) == ("route", "learned")
    assert config.router == RouterConfig(
        hidden=64, smoothing=0.8, gate="soft", preservation_copy=True, calibrate_on="cross_fitted", max_old_error=None
    )
    assert ScaleConfig(ffn_expansion=8, variant="route").router == RouterConfig()  # the learned rule's defaults
    assert ScaleConfig(ffn_expansion=8).variant == "adapt" and ScaleConfig(ffn_expansion=8).router is None
    as_dict = ScaleConfig(ffn_expansion=8, router={"gate": "hard"})  # a dict is read as a RouterConfig
    assert as_dict.router == RouterConfig(gate="hard")
    with pytest.raises(TypeError, match=r"router_smoothing=...\): the learned router's settings moved into "
                       r"RouterConfig .* router=peft_scale.RouterConfig\(smoothing=0.8\)"):
        ScaleConfig(ffn_expansion=8, variant="route", router_smoothing=0.8)
    with pytest.raises(ValueError, match="pass a peft_scale.RouterConfig"):
        ScaleConfig(ffn_expansion=8, router="soft")
