"""``peft_scale.route_decisions``: what a routed pass decided (``RouteResult.sent_to``) and the gates of the pass in
flight (``RouteGates``: a missing or stale gate is an error, an idle adapter is dropped only for this pass's input)."""

from __future__ import annotations

import pytest
import torch

from peft_scale.route_decisions import RouteGates, RouteResult


def test_sent_to_gives_each_adapters_tokens_and_the_base_models():
    choice = torch.tensor([[0, 1, -1, 0]])
    result = RouteResult(to_preservation=choice < 0, adapters=("es", "fr"), choice=choice)
    assert result.sent_to("es").tolist() == [[True, False, False, True]]
    assert result.sent_to("fr").tolist() == [[False, True, False, False]]
    assert result.sent_to(None).tolist() == [[False, False, True, False]]
    with pytest.raises(KeyError, match=r"adapter 'de' did not route this forward pass \(the routed adapters were "
                       r"\['es', 'fr'\]\)"):
        result.sent_to("de")


def test_a_gate_is_read_only_for_the_input_it_was_made_for():
    gates = RouteGates()
    x = torch.zeros(2, 5, 8)
    with pytest.raises(RuntimeError, match="no routing decision of adapter 'es' for this input of shape"):
        gates.get("es", x)
    gates.gates["es"] = torch.ones(2, 5, 1)
    assert gates.get("es", x) is gates.gates["es"]
    with pytest.raises(RuntimeError, match=r"of shape \(2, 4, 8\).*Call the whole model, not a single layer"):
        gates.get("es", torch.zeros(2, 4, 8))


def test_an_idle_adapter_is_dropped_only_where_its_gate_is_this_inputs():
    gates = RouteGates()
    gates.gates = {"es": torch.zeros(2, 5, 1), "fr": torch.ones(2, 5, 1)}
    gates.idle = frozenset({"es"})
    assert gates.busy(["es", "fr"], torch.zeros(2, 5, 8)) == ["fr"]
    assert gates.busy(["es", "fr"], torch.zeros(2, 3, 8)) == ["es", "fr"]  # another input: the decision is not its


def test_a_gate_reaches_a_module_that_flattens_the_tokens():
    """``RouteGates.get`` for an input ``(batch * seq, in)``: the gate's tokens in order; any other count is no
    decision of this pass."""
    gates = RouteGates()
    gates.gates["a"] = torch.arange(6.0).reshape(2, 3, 1)
    assert torch.equal(gates.get("a", torch.zeros(6, 4)), torch.arange(6.0).reshape(6, 1))
    assert torch.equal(gates.get("a", torch.zeros(2, 3, 4)), gates.gates["a"])
    gates.idle = frozenset({"a"})
    assert gates.busy(["a"], torch.zeros(6, 4)) == [] and gates.busy(["a"], torch.zeros(5, 4)) == ["a"]
    with pytest.raises(RuntimeError, match="no routing decision of adapter 'a' for this input of shape"):
        gates.get("a", torch.zeros(5, 4))
