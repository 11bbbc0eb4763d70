"""SCALE layers under torch.compile: compiled and eager outputs agree, and training steps run."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_models import perturb_adapter, random_ids, tiny_model

from peft_scale import ScaleConfig

pytestmark = pytest.mark.slow  # compiling takes ~15 s per model on a CPU


@pytest.mark.parametrize(
    "config",
    [ScaleConfig(ffn_expansion=8), ScaleConfig(hidden_expansion=16, ffn_expansion=8, variant="route")],
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
    eager_loss = model(input_ids=ids, labels=ids).loss
    compiled_loss = compiled_model(input_ids=ids, labels=ids).loss
    compiled_loss.backward()
    assert torch.isclose(compiled_loss, eager_loss, atol=1e-5)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
