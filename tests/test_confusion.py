"""``peft_scale.confusion``: ``routing_confusion`` counts each token where the model's routers send it.

Here on routers set by hand, so that the count is known without fitting: each adapter's router is a linear probe on
the input of layer 0 (the token's embedding) that claims exactly one token id. The report on fitted routers over
three domains, every data form and every bad input: ``test_several_routed_adapters.py``."""

from __future__ import annotations

import re

import pytest
import torch
from peft import get_peft_model
from tiny_models import tiny_model

from peft_scale import RouterConfig, ScaleConfig, routing_confusion

CLAIMED = {"es": 5, "fr": 6}  # adapter -> the one token id its router claims


def claiming(token: int, direction: int, model) -> dict[str, torch.Tensor]:
    """Buffers of a fitted linear-probe router that claims ``token`` only: the token's embedding gets a feature
    ``direction`` that no other embedding has, and the probe reads that feature alone."""
    embedding = model.get_input_embeddings().weight
    with torch.no_grad():
        embedding[:, direction] = 0.0
        embedding[token, direction] = 1.0
    w_in = torch.zeros(1, embedding.shape[1])
    w_in[0, direction] = 10.0
    # logit 10 / rms(E[token]) - 1 > 0 for the token (its row's rms is below 10), -1 for every other token
    return {"w_in": w_in, "b_out": torch.tensor([-1.0]), "fitted": torch.ones(1)}


@pytest.fixture
def model():
    base = tiny_model("llama", num_hidden_layers=2)
    per_token = RouterConfig(hidden=0, smoothing=0.0)  # a linear probe deciding on each token's own logit
    config = ScaleConfig(ffn_expansion=8, preserve_layers=0, router=per_token)
    model = get_peft_model(base, config, adapter_name="es")
    model.add_adapter("fr", config)
    for direction, (name, token) in enumerate(CLAIMED.items()):
        buffers = claiming(token, direction, model.get_base_model())
        router = model.base_model.scale_router[name]
        for key, value in buffers.items():
            getattr(router, key).copy_(value)
    model.base_model.set_adapter(["es", "fr"])
    return model.eval()


def test_each_token_is_counted_where_it_is_routed_and_padding_is_not(model):
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7, 5]]))
    assert model.base_model.last_routing.choice.tolist() == [[0, 1, -1, 0]]  # the routers claim as set
    confusion = routing_confusion(
        model,
        {
            "es_only": torch.tensor([[5, 5, 5], [5, 5, 5]]),
            "mixed": torch.tensor([[5, 6, 7, 8], [9, 9, 5, 6]]),
            "ragged": [[5, 7], [6, 6, 6, 6, 7, 5]],  # 8 tokens; the first row's padding (4 ids 0) is not counted
        },
        batch_size=2,
    )
    assert confusion == {
        "es_only": {"es": 1.0, "fr": 0.0, "base": 0.0},
        "mixed": {"es": 2 / 8, "fr": 2 / 8, "base": 4 / 8},
        "ragged": {"es": 2 / 8, "fr": 4 / 8, "base": 2 / 8},
    }


def test_only_the_active_routed_adapters_are_reported(model):
    model.base_model.set_adapter("fr")
    assert routing_confusion(model, {"x": torch.tensor([[5, 6, 7, 6]])}) == {"x": {"fr": 0.5, "base": 0.5}}


def test_the_models_training_mode_is_restored_even_after_an_error(model):
    model.train()
    assert routing_confusion(model, {"x": torch.tensor([[5, 6]])}) == {"x": {"es": 0.5, "fr": 0.5, "base": 0.0}}
    assert model.training
    with pytest.raises(ValueError, match=r"data\['bad'\] holds token id 500"):
        routing_confusion(model, {"x": torch.tensor([[5, 6]]), "bad": torch.tensor([[500]])})
    assert model.training


def test_no_active_routed_adapter_names_the_call_that_activates_them():
    base = tiny_model("llama", num_hidden_layers=2)
    model = get_peft_model(base, ScaleConfig(ffn_expansion=8), adapter_name="plain")
    model.add_adapter("es", ScaleConfig(ffn_expansion=8, variant="route", preserve_layers=0))
    message = (
        "routing_confusion: no learned-route adapter is active (active: ['plain']; learned-route adapters: ['es']). "
        "Activate the adapters to compare, e.g. model.base_model.set_adapter(['es'])."
    )
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        routing_confusion(model, {"x": torch.tensor([[5]])})
