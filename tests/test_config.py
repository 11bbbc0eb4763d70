"""``peft_scale.config``: ``ScaleConfig``, its JSON round trip, old saved configs, and every bad value named (moved from
``test_model.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from peft import PeftConfig

from peft_scale import ScaleConfig


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
