"""Finding the FFN by its shape (``peft_scale.ffn_detection``): what is found, what is refused and why, and the
config field a merge of a shape-detected model writes."""

from __future__ import annotations

import types

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM

from peft_scale import ScaleConfig
from peft_scale.ffn_detection import find_ffn
from tiny_models import random_ids, tiny_llama, tiny_registry_model


class MoEModel(nn.Module):
    """One layer of a mixture of experts kept as a ModuleList, with a router (d -> E) and a shared expert."""

    def __init__(self, d=8, inter=12, shared=20, experts=3, two_outputs=False):
        super().__init__()
        self.config = types.SimpleNamespace(hidden_size=d)
        self.router = nn.Linear(d, experts)
        self.experts = nn.ModuleList(_Mlp(d, inter, two_outputs) for _ in range(experts))
        self.shared_expert = _Mlp(d, shared)

    def forward(self, x):
        weights = self.router(x).softmax(-1)
        return sum(w[..., None] * e(x) for w, e in zip(weights.unbind(-1), self.experts)) + self.shared_expert(x)


class _Mlp(nn.Module):
    def __init__(self, d, size, two_outputs=False, act=torch.nn.functional.silu):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, size), nn.Linear(d, size), nn.Linear(size, d)
        self.down_b = nn.Linear(size, d) if two_outputs else None
        self.act = act

    def forward(self, x):
        h = self.act(self.gate(x)) * self.up(x)
        return self.down(h) + (self.down_b(h) if self.down_b is not None else 0)


def test_moe_experts_and_shared_expert_are_found_and_the_router_is_not():
    found = find_ffn(MoEModel())
    assert found.input_modules == ("gate", "up") and found.output_modules == ("down",)
    assert sorted(found.mlps) == ["experts.0", "experts.1", "experts.2", "shared_expert"]
    assert "router" not in found.target_modules


def test_two_output_projections_are_ambiguous_and_named():
    message = r"cannot tell the FFN of 'experts.0'.*several output projections.*'experts.0.down'.*target_modules"
    with pytest.raises(ValueError, match=message):
        find_ffn(MoEModel(two_outputs=True))


def test_an_activation_that_mixes_features_is_not_an_ffn():
    model = MoEModel()
    for expert in [*model.experts, model.shared_expert]:
        expert.act = lambda h: h.softmax(-1)  # mixes the intermediate features: widening would change the output
    with pytest.raises(ValueError, match=r"could not find the FFN of MoEModel.*not elementwise"):
        find_ffn(model)


def test_projections_split_over_two_levels_are_one_mlp():
    """CPM-Ant keeps its input projections one level below its output projection (``ffn.w_in.w_0`` / ``w_1`` next to
    ``ffn.w_out``): they are grouped where the output projection is, and checked there as one MLP."""
    found = find_ffn(tiny_registry_model("cpmant"))
    assert found.input_modules == ("w_0", "w_1") and found.output_modules == ("w_out",)
    assert found.mlps == ("cpmant.encoder.layers.0.ffn.ffn",)


def test_shape_detected_family_end_to_end_with_its_config_field(tmp_path):
    """GPT-J is not in the table: fc_in/fc_out are found, and the merge writes n_inner (its INTERMEDIATE_SIZE_FIELDS
    entry), so the merged checkpoint loads without peft."""
    ids = random_ids(batch=1, length=6)
    model = get_peft_model(tiny_registry_model("gptj"), ScaleConfig(ffn_expansion=8))
    config = model.peft_config["default"]
    assert sorted(config.target_modules) == ["fc_in", "fc_out"] and config.ffn_output_modules == ["fc_out"]
    assert config.ffn_found_by == "shape"
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
        adapted = model(ids).logits
    merged = model.merge_and_unload()
    assert merged.config.n_inner == 48 + 8
    merged.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(ids).logits, adapted, atol=1e-5, rtol=0)


def test_table_family_says_table_and_the_card_and_print_say_which(capsys):
    model = get_peft_model(tiny_llama(), ScaleConfig(ffn_expansion=8))
    assert model.peft_config["default"].ffn_found_by == "table"
    model.print_trainable_parameters()
    assert "FFN projections gate_proj, up_proj -> down_proj (from the family's table)" in capsys.readouterr().out


def test_a_merge_without_a_config_field_is_refused_before_merging():
    model = get_peft_model(tiny_registry_model("openai-gpt"), ScaleConfig(ffn_expansion=8))
    with pytest.raises(ValueError, match=r"Cannot merge: no field of OpenAIGPTConfig holds the intermediate size 128"):
        model.merge_and_unload()
    assert model.base_model.model.transformer.h[0].mlp.c_fc.in_features == 32  # still a SCALE layer, unmerged
