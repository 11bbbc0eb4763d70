"""SCALE layers under torch.compile: compiled and eager outputs and gradients agree."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_models import perturb_adapter, random_ids, tiny_model

from peft_scale import ScaleConfig

pytestmark = pytest.mark.slow  # compiling takes ~15 s per model on a CPU


@pytest.mark.parametrize(
    "config",
    [ScaleConfig(ffn_expansion=8), ScaleConfig(hidden_expansion=16, ffn_expansion=8, variant="route", route_rule="cosine")],
    ids=["ffn", "full-width-route"],
)
def test_compiled_matches_eager(config):
    model = get_peft_model(tiny_model("llama"), config).eval()
    perturb_adapter(model)
    ids = random_ids()
    with torch.no_grad():
        eager = model(ids).logits
        compiled_model = torch.compile(model)
        assert (compiled_model(ids).logits - eager).abs().max() <= 1e-5
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    eager_loss = model(input_ids=ids, labels=ids).loss
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in trained]
    model.zero_grad(set_to_none=True)
    compiled_loss = compiled_model(input_ids=ids, labels=ids).loss
    compiled_loss.backward()
    assert torch.isclose(compiled_loss, eager_loss, atol=1e-5)
    # the compiled graph traces the layers' hand-written backward (WidenedLinear): same gradients as eager
    assert trained and all(p.grad is not None for p in trained)
    for p, expected in zip(trained, eager_grads):
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6)
