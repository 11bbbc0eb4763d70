"""``peft_scale.smoothing``: the moving average of a router's logits along the sequence, on hand-checked cases, and
where it starts. The average inside a model, across cached calls: ``test_gate_hook.py``."""

from __future__ import annotations

import pytest
import torch
from conftest import FALL, reference_falling, route_config

from peft_scale.smoothing import smooth_logits, smoothing_start
from peft_scale.token_router import TokenRouter


def test_smooth_logits_falls_with_its_own_coefficient():
    logits = torch.tensor([[0.0, 10.0, 0.0, 10.0], [10.0, 0.0, 0.0, 0.0]])
    # a = 0.5 both ways: 0, 5, 2.5, 6.25; falling with 0: every drop is followed at once
    assert torch.equal(smooth_logits(logits, 0.5)[0][0], torch.tensor([0.0, 5.0, 2.5, 6.25]))
    out, last, started = smooth_logits(logits, 0.5, fall=0.0)
    assert torch.equal(out, torch.tensor([[0.0, 5.0, 0.0, 5.0], [10.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(last, torch.tensor([5.0, 0.0])) and started.all()
    # from a start value c = -4: the first step rises from c (0 >= -4: a), the next falls (-8 < -2: fall)
    out = smooth_logits(torch.tensor([[0.0, -8.0]]), 0.5, start=torch.tensor([-4.0]), fall=0.25)[0]
    assert torch.allclose(out, torch.tensor([[-2.0, -6.5]]))
    # padding leaves the average as it is; a continuation from the returned state gives what the whole row gives
    rows = torch.randn(3, 9, generator=torch.Generator().manual_seed(0)) * 4
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, :3] = False
    whole = smooth_logits(rows, 0.8, mask, fall=FALL)[0]
    head, last, started = smooth_logits(rows[:, :5], 0.8, mask[:, :5], fall=FALL)
    tail = smooth_logits(rows[:, 5:], 0.8, mask[:, 5:], last, started, fall=FALL)[0]
    assert torch.equal(torch.cat([head, tail], 1), whole)
    assert torch.allclose(whole[1, 3:].double(), reference_falling(rows[1:, 3:], 0.8, FALL)[0], atol=1e-5)
    # fall = a is the plain average
    assert torch.allclose(smooth_logits(rows, 0.8, fall=0.8)[0], smooth_logits(rows, 0.8)[0], atol=1e-6)


def test_the_average_starts_from_the_routers_start_only_where_the_config_says_old():
    router = TokenRouter(4, 0)
    from_token = route_config(router_smoothing=0.8)
    from_old = route_config(router_smoothing=0.8, router_smoothing_start="old")  # as a 0.1.0 adapter loads
    assert smoothing_start("default", from_token, router) is None
    with pytest.raises(RuntimeError, match=r"smoothing_start='old', but its router was fitted before the start value "
                       r"existed .* adapter_name='default'"):
        smoothing_start("default", from_old, router)
    router.start.fill_(-1.5)
    assert smoothing_start("default", from_old, router) is router.start
