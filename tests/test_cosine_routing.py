"""``peft_scale.cosine_routing``: the cosine rule on hand-checked logits, its threshold lookup and its modes. The rule on
whole full-width models (the frozen slice, both heads, generation): ``test_full_width.py``."""

from __future__ import annotations

import pytest
import torch

from peft_scale import ScaleConfig
from peft_scale.cosine_routing import cosine_threshold, mode_applies, route


def test_the_cosine_rule_on_a_hand_checked_case():
    preservation = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 4.0]]])
    adaptation = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-3.0, -4.0]]])
    # cosines: 1, 0, 1/sqrt(2) = 0.707, -1
    routed, to_preservation = route(preservation, adaptation, threshold=0.5)
    assert to_preservation.tolist() == [[True, False, True, False]]
    assert torch.equal(routed, torch.stack([preservation[0, 0], adaptation[0, 1], preservation[0, 2], adaptation[0, 3]])[None])
    _, exactly_at = route(preservation, adaptation, threshold=1.0)
    assert exactly_at.tolist() == [[True, False, False, False]]  # >= tau goes to preservation


def test_the_modes_apply_in_evaluation_or_always():
    assert [mode_applies(mode, training=False) for mode in ("off", "eval", "always")] == [False, True, True]
    assert [mode_applies(mode, training=True) for mode in ("off", "eval", "always")] == [False, False, True]


def test_the_threshold_is_the_cosine_adapters_and_it_must_be_active_alone():
    cosine = ScaleConfig(hidden_expansion=16, ffn_expansion=8, variant="route", route_rule="cosine", route_threshold=0.3)
    assert cosine_threshold([cosine]) == 0.3
    with pytest.raises(RuntimeError, match="cosine rule needs its adapter active alone; active: 2 adapters"):
        cosine_threshold([cosine, ScaleConfig(ffn_expansion=8)])
    with pytest.raises(RuntimeError, match="active alone; active: 1 adapters"):
        cosine_threshold([ScaleConfig(ffn_expansion=8)])
