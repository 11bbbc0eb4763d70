"""The layers do the arithmetic of their blocks and nothing more: exact FLOP counts of a training step, and no
copy of a frozen weight in the forward or backward pass (the performance issue's memory rule). Timing belongs in
benchmarks/throughput.py; these tests assert the properties that make the timings possible."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from peft_scale import ScaleConfig
from peft_scale.layer import ScaleLayer
from tiny_models import random_ids, tiny_model

TOKENS, D_IN, D_OUT = 6, 8, 12


def training_flops(layer: nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        layer(x).sum().backward()
    return counter.get_total_flops()


def matmul(rows: int, inner: int, cols: int) -> int:
    return 2 * rows * inner * cols


@pytest.mark.parametrize(
    "out_expansion, in_expansion, open_w12",
    [(5, 0, True), (0, 3, True), (5, 3, True), (5, 3, False)],
    ids=["w21 only (gate/up)", "w12 only (down)", "all four blocks", "preserve: no w12"],
)
@pytest.mark.parametrize("input_needs_grad", [False, True])
def test_a_training_step_does_exactly_the_arithmetic_of_its_blocks(out_expansion, in_expansion, open_w12,
                                                                    input_needs_grad):
    """Forward: one product per block. Backward: a weight gradient per trained block (W12, W21, W22), an input
    gradient per block whose input needs one, and nothing for the frozen W beyond its input gradient."""
    base = nn.Linear(D_IN, D_OUT).requires_grad_(False)  # frozen, as the tuner leaves it
    layer = ScaleLayer(base, "default", out_expansion, in_expansion, open_w12=open_w12)
    x = torch.randn(TOKENS, D_IN + in_expansion, requires_grad=input_needs_grad)
    n, k, e = TOKENS, out_expansion, in_expansion
    blocks = {"w": (D_IN, D_OUT, False)}  # name: (inputs, outputs, trained)
    if k:
        blocks["w21"] = (D_IN, k, True)
    if e and open_w12:
        blocks["w12"] = (e, D_OUT, True)
    if k and e:
        blocks["w22"] = (e, k, True)
    expected = 0
    for inputs, outputs, trained in blocks.values():
        expected += matmul(n, inputs, outputs)  # forward
        expected += matmul(n, inputs, outputs) if trained else 0  # weight gradient
        expected += matmul(n, outputs, inputs) if input_needs_grad else 0  # input gradient
    assert training_flops(layer, x) == expected


class FrozenWeightUses(TorchDispatchMode):
    """Records every aten op that receives a frozen parameter (by storage), with the op's name."""

    def __init__(self, frozen: list[torch.Tensor]):
        super().__init__()
        self.frozen = {p.untyped_storage().data_ptr() for p in frozen}
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.frozen for t in flat):
            self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


# Ops that read a weight in place: products, views, the embedding lookup, the norms' elementwise gain and
# autograd's bookkeeping. A copy (cat, clone, copy_, contiguous, index_put, ...) of a frozen weight is what the
# performance issue forbids: it would cost a frozen weight's memory and bandwidth on every step.
READS = {
    "mm", "addmm", "bmm", "matmul", "linear", "t", "transpose", "view", "_unsafe_view", "reshape", "expand",
    "permute", "embedding", "mul", "detach", "alias", "slice", "unsqueeze", "select", "split", "split_with_sizes",
    "chunk", "as_strided", "_to_copy", "to",
}


@pytest.mark.parametrize(
    "config",
    [dict(ffn_expansion=8), dict(hidden_expansion=16, ffn_expansion=8, variant="adapt"),
     dict(hidden_expansion=16, ffn_expansion=8, variant="route", preserve_layers=1, route_rule="cosine")],
    ids=["ffn", "full-width adapt", "full-width route"],
)
def test_no_frozen_weight_is_copied_in_a_training_step_or_a_routed_evaluation(config):
    model = get_peft_model(tiny_model("llama"), ScaleConfig(**config))
    frozen = [p for p in model.parameters() if not p.requires_grad]
    ids = random_ids()
    uses = FrozenWeightUses(frozen)
    with uses:
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
    assert uses.ops, "the dispatch mode saw no frozen weight: the test is not looking"
    assert "mm" in uses.ops or "addmm" in uses.ops
    copies = uses.ops - READS
    assert not copies, f"frozen weights went through {sorted(copies)}"
    # `_to_copy` is allowed above only as a dtype cast; in fp32 nothing casts a frozen weight
    assert "_to_copy" not in uses.ops
