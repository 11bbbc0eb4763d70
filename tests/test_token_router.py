"""``peft_scale.token_router``: the router network itself (its logits from the stream's direction, its decision, the
buffers saved and loaded with the adapter, an adapter saved before the ``start`` buffer existed)."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import old_then_new
from peft import PeftModel

from peft_scale.token_router import TokenRouter, rms_normalise

# what a saved adapter holds of its router, under ``...scale_router.<adapter>.``: renaming one breaks every saved adapter
SAVED_BUFFERS = ["b_in", "b_out", "feature_mean", "feature_scale", "fitted", "start", "threshold", "w_in", "w_out"]


@pytest.mark.parametrize("hidden", [0, 4])
def test_the_router_decides_on_the_streams_direction_through_its_buffers(hidden):
    torch.manual_seed(0)
    router = TokenRouter(8, hidden)
    assert sorted(router.state_dict()) == SAVED_BUFFERS and not list(router.parameters())
    assert not router.is_fitted and torch.isnan(router.start).all()
    for name in ("feature_mean", "feature_scale", "w_in", "b_in", "w_out", "b_out"):
        getattr(router, name).normal_()
    router.feature_scale.abs_().add_(0.5)
    h = torch.randn(2, 3, 8, dtype=torch.float64)
    f = (h / h.pow(2).mean(-1, keepdim=True).sqrt() - router.feature_mean.double()) / router.feature_scale.double()
    if hidden == 0:  # a linear probe
        expected = f @ router.w_in[0].double() + router.b_out[0].double()
    else:
        expected = F.gelu(f @ router.w_in.double().T + router.b_in.double()) @ router.w_out.double() + router.b_out[0].double()
    assert torch.allclose(router.logits(h).double(), expected, atol=1e-4)
    assert torch.allclose(router.logits(5 * h), router.logits(h), atol=1e-5)  # the scale of the stream does not count
    assert torch.allclose(rms_normalise(h).pow(2).mean(-1), torch.ones(2, 3), atol=1e-5)
    router.threshold.fill_(0.6)
    to_expansion, score = router(h)
    assert torch.equal(score, torch.sigmoid(router.logits(h))) and torch.equal(to_expansion, score >= 0.6)


def test_the_start_is_saved_and_an_adapter_saved_before_it_loads(smoothed_from_old, old_speaker, tmp_path):
    _, model, _ = smoothed_from_old
    ids = old_then_new()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["router"]["smoothing_start"] == "old"
    loaded = PeftModel.from_pretrained(copy.deepcopy(old_speaker), tmp_path)
    assert torch.equal(loaded.base_model.scale_router["default"].start, model.base_model.scale_router["default"].start)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)
    # an adapter saved before the start existed: no `start` among its router's numbers, no such config key
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "adapter_model.safetensors")
    old_weights = {key: value for key, value in weights.items() if not key.endswith("scale_router.start")}
    assert len(old_weights) == len(weights) - 1
    save_file(old_weights, tmp_path / "adapter_model.safetensors")
    saved["router"]["smoothing_start"] = "token"
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = PeftModel.from_pretrained(copy.deepcopy(old_speaker), tmp_path)
    assert not [w for w in caught if "missing" in str(w.message).lower()]  # (PEFT's "missing adapter keys")
    assert old.peft_config["default"].router.smoothing_start == "token"
    assert torch.isnan(old.base_model.scale_router["default"].start).all()
    with torch.no_grad():
        old(input_ids=ids)  # from its first token, as it was saved
    old.peft_config["default"].router.smoothing_start = "old"
    with pytest.raises(RuntimeError, match=r"RouterConfig.smoothing_start='old', but its router was fitted before the start "
                       r"value existed .* call peft_scale.fit_router\(model, new_data, ..., adapter_name='default'\) again"):
        with torch.no_grad():
            old(input_ids=ids)
