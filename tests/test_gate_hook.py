"""``peft_scale.gate_hook``: where a token's routing decision is made (the hook on decoder layer ``preserve_layers``)
and what the gated modules do with it: tokens routed to the base model get exactly its logits and give the expansion
no gradient, a soft gate weighs the expansion, an inference pass skips an adapter no token goes to, and a smoothed
router's average is carried along the sequence and across cached calls (or the continuation is refused).

The setting (``conftest.py``): two separable synthetic domains on a tiny 4-layer Llama, the *old* domain token ids
4-63 (the base model is first trained to speak it), the *new* domain ids 64-127; the router reads the stream
entering layer ``PRESERVE``.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import (
    FALL, MODES, NEW, OLD, PRESERVE, SMOOTHING, domain_ids, fitted, old_then_new, reference_ema, reference_falling,
    routed, routed_share, router_logits, scale_parameters,
)  # fmt: skip
from peft import PeftModel
from tiny_models import perturb_adapter

from peft_scale import ScaleConfig, fit_router
from peft_scale.gate_hook import gate_values


@pytest.mark.parametrize("mode", list(MODES))
def test_tokens_routed_to_the_base_get_the_base_models_logits(old_speaker, mode):
    reference, model, _ = fitted(old_speaker, mode)
    perturb_adapter(model, scale=0.5)  # stand-in for training: the expansion now changes what it touches
    old, new = domain_ids(OLD, 4, 16, seed=7), domain_ids(NEW, 4, 16, seed=8)
    with torch.no_grad():
        old_logits = model(input_ids=old).logits
        assert model.base_model.last_routing.to_preservation.all()
        assert (old_logits - reference(input_ids=old).logits).abs().max() <= 1e-6
        new_logits = model(input_ids=new).logits
        assert model.base_model.last_routing.to_preservation.float().mean() < 0.1  # (the router is not perfect)
        assert (new_logits - reference(input_ids=new).logits).abs().max() > 1e-2
        # the same expansion, ungated, would have changed the old sequence too
        model.base_model.scale_router["default"].threshold.fill_(0.0)
        assert (model(input_ids=old).logits - reference(input_ids=old).logits).abs().max() > 1e-2


@pytest.mark.parametrize("mode", list(MODES))
def test_tokens_routed_to_the_base_give_the_expansion_no_gradient(old_speaker, mode):
    _, model, _ = fitted(old_speaker, mode)
    perturb_adapter(model, scale=0.5)
    model.train()
    params = scale_parameters(model)
    assert params and all(p.requires_grad for p in params.values())
    old = domain_ids(OLD, 4, 16, seed=7)
    model(input_ids=old, labels=old).loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in params.values())
    model.zero_grad()
    new = domain_ids(NEW, 4, 16, seed=8)
    model(input_ids=new, labels=new).loss.backward()
    assert sum(p.grad is not None and bool(p.grad.any()) for p in params.values()) == len(params)
    # the router is a set of frozen buffers: nothing for an optimizer to move
    assert not any("router" in name for name, _ in model.named_parameters())


def test_ffn_mode_widens_only_the_layers_the_router_gates(old_speaker):
    _, model = routed(old_speaker)
    assert model.base_model.router_layer("default") is model.base_model.model.model.layers[PRESERVE]
    with pytest.raises(ValueError, match="adapter 'other' has no learned router"):
        model.base_model.router_layer("other")
    assert model.peft_config["default"].layers_to_transform == [2, 3]
    gated = sorted(name for name, m in model.named_modules() if any(getattr(m, "route_gated", {}).values()))
    assert gated == [f"base_model.model.model.layers.{i}.mlp.down_proj" for i in (2, 3)]


@pytest.mark.parametrize("mode", list(MODES))
def test_a_soft_gate_weighs_the_expansion_by_how_far_the_score_clears_the_threshold(old_speaker, mode):
    _, model = routed(old_speaker, mode, router_gate="soft")
    new, old = domain_ids((34, 94), seed=1), domain_ids(OLD, seed=2)  # overlapping: scores spread over (0, 1)
    fit_router(model, new, old, progress=False)
    scale_model = model.base_model
    router = scale_model.scale_router["default"]
    first_gated = f"layers.{PRESERVE}.mlp.down_proj"
    module = next(m for name, m in scale_model.model.named_modules() if name.endswith(first_gated))
    captured = {}
    handle = module.register_forward_hook(lambda mod, args, out: captured.update(x=args[0], y=out))
    torch.manual_seed(0)
    with torch.no_grad():
        module.scale_w12["default"].normal_(0, 0.1)  # (zero at the start: no expansion to weigh)
        model(input_ids=torch.cat([new[:2], old[:2]]))
    handle.remove()
    score, tau = scale_model.last_routing.scores, router.threshold[0]
    gate = scale_model._routing.gates.gates["default"][..., 0]
    expected = torch.where(score >= tau, (score - tau) / (1 - tau), torch.zeros_like(score))
    torch.testing.assert_close(gate, expected, rtol=0, atol=1e-6)
    assert ((gate > 0.05) & (gate < 0.95)).any() and (gate == 0).any() and (gate > 0.95).any()
    # the first gated module: y = W x + b + g W12 x_up, g per token
    x, d = captured["x"], module.base_layer.in_features
    base_out = module.base_layer(x[..., :d].contiguous())
    from_new = x[..., d:] @ module.scale_w12["default"].T
    torch.testing.assert_close(captured["y"][..., :base_out.shape[-1]], base_out + gate[..., None] * from_new)
    # training: the gradient a token gives W12 is scaled by its gate (none below the threshold)
    model.train()
    weights = torch.rand(4, new.shape[1], base_out.shape[-1])
    out = {}
    handle = module.register_forward_hook(lambda mod, args, y: out.update(y=y))
    model(input_ids=torch.cat([new[:2], old[:2]]))
    handle.remove()
    (out["y"][..., : base_out.shape[-1]] * weights).sum().backward()
    expected_grad = (gate[..., None] * weights).flatten(0, 1).T @ x[..., d:].flatten(0, 1)
    torch.testing.assert_close(module.scale_w12["default"].grad, expected_grad, rtol=1e-4, atol=1e-5)


def test_an_unfitted_router_is_an_error_that_says_to_fit_it(old_speaker):
    _, model = routed(old_speaker)
    with pytest.raises(RuntimeError, match=r"has not been fitted. Call peft_scale.fit_router\(model, new_data\)"):
        model(input_ids=domain_ids(NEW, 2, 8))
    with model.disable_adapter():  # the base model needs no router
        model(input_ids=domain_ids(NEW, 2, 8))


@pytest.mark.parametrize("mode", list(MODES))
def test_generate_cache_equals_no_cache_and_old_prompts_generate_as_the_base(old_speaker, mode):
    reference, model, _ = fitted(old_speaker, mode)
    perturb_adapter(model, scale=0.5)
    model.eval()
    settings = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    new_prompt = domain_ids(NEW, 2, 6, seed=9)
    cached = model.generate(input_ids=new_prompt, use_cache=True, **settings)
    uncached = model.generate(input_ids=new_prompt, use_cache=False, **settings)
    assert torch.equal(cached, uncached)
    old_prompt = torch.cat([torch.ones(2, 1, dtype=torch.long), domain_ids(OLD, 2, 6, seed=10)], 1)
    generated = model.generate(input_ids=old_prompt, **settings)
    assert torch.equal(generated, reference.generate(input_ids=old_prompt, **settings))
    assert (generated[:, 7:] < OLD[1]).all()  # the base model continues in its own domain


def run_recording_up_widths(model, ids, grad: bool = False):
    """``(logits, output width of every widened up_proj)`` of one forward pass."""
    widths = []
    ups = [m for name, m in model.named_modules() if name.endswith("mlp.up_proj") and hasattr(m, "out_expansion")]
    handles = [m.register_forward_hook(lambda module, args, out: widths.append(out.shape[-1])) for m in ups]
    try:
        with torch.set_grad_enabled(grad):
            logits = model(input_ids=ids).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, widths


def test_an_inference_pass_that_routes_nothing_to_the_expansion_skips_its_work(old_speaker):
    reference, model, _ = fitted(old_speaker)
    perturb_adapter(model, scale=0.5)
    model.eval()
    base_width = old_speaker.config.intermediate_size
    routing = model.base_model._routing
    old, new = domain_ids(OLD, 2, 16, seed=7), domain_ids(NEW, 2, 16, seed=8)
    logits, widths = run_recording_up_widths(model, old)
    assert model.base_model.last_routing.to_preservation.all()
    assert widths and set(widths) == {base_width}  # the new neurons were not computed
    assert (logits - reference(input_ids=old).logits).abs().max() <= 1e-6
    routing.skip_idle = False
    computed, widths = run_recording_up_widths(model, old)
    assert set(widths) == {base_width + 16}
    assert torch.equal(logits, computed)  # the skip changes no bit: the gate multiplied the products by zero
    routing.skip_idle = True
    # a pass with any token for the expansion computes it (whole pass: no gather), as does a training pass
    _, widths = run_recording_up_widths(model, torch.cat([old[:1], new[:1]]))
    assert set(widths) == {base_width + 16}
    _, widths = run_recording_up_widths(model, old, grad=True)
    assert set(widths) == {base_width + 16}
    # generation: one decoding step at a time, skipped or not per step; cache == no cache
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    prompt = torch.cat([torch.ones(1, 1, dtype=torch.long), domain_ids(OLD, 1, 6, seed=10)], 1)
    generated = model.generate(input_ids=prompt, **settings)
    assert torch.equal(generated, reference.generate(input_ids=prompt, **settings))
    mixed = torch.cat([domain_ids(OLD, 1, 6, seed=11), domain_ids(NEW, 1, 6, seed=12)], 1)
    cached = model.generate(input_ids=mixed, use_cache=True, **settings)
    assert torch.equal(cached, model.generate(input_ids=mixed, use_cache=False, **settings))


def test_full_width_is_never_skipped(old_speaker):
    _, model, _ = fitted(old_speaker, "full_width")
    model.eval()
    _, widths = run_recording_up_widths(model, domain_ids(OLD, 2, 16, seed=7))
    assert model.base_model.last_routing.to_preservation.all()
    assert set(widths) == {old_speaker.config.intermediate_size + 8}  # its widened stream runs through every layer


def test_of_two_routed_adapters_the_one_given_no_token_is_skipped(old_speaker):
    _, model, _ = fitted(old_speaker)
    perturb_adapter(model, scale=0.5)
    model.add_adapter("other", ScaleConfig(ffn_expansion=4, variant="route", preserve_layers=PRESERVE))
    fit_router(model, domain_ids(OLD, seed=3), domain_ids(NEW, seed=4), adapter_name="other", progress=False)
    model.base_model.set_adapter(["default", "other"])
    model.eval()
    new = domain_ids(NEW, 2, 16, seed=8)
    logits, widths = run_recording_up_widths(model, new)
    assert (model.base_model.last_routing.choice == 0).all()  # every token to "default"
    assert set(widths) == {old_speaker.config.intermediate_size + 16}  # "other"'s 4 neurons not computed
    model.base_model._routing.skip_idle = False
    computed, widths = run_recording_up_widths(model, new)
    assert set(widths) == {old_speaker.config.intermediate_size + 16 + 4}
    assert torch.equal(logits, computed)


def test_no_smoothing_decides_on_each_tokens_own_logit(old_speaker):
    _, default, default_report = fitted(old_speaker)
    _, explicit, explicit_report = fitted(old_speaker, router_smoothing=0.0)
    assert default.peft_config["default"].router.smoothing == 0.0
    assert (default_report.threshold, default_report.old_to_base, default_report.new_to_expansion) == (
        explicit_report.threshold, explicit_report.old_to_base, explicit_report.new_to_expansion,
    )
    ids = old_then_new()
    logits = router_logits(default, ids)
    result = default.base_model.last_routing
    router = default.base_model.scale_router["default"]
    assert torch.equal(result.scores, torch.sigmoid(logits))  # the token's own score, bit for bit
    assert torch.equal(~result.to_preservation, torch.sigmoid(logits) >= router.threshold[0])
    cached = default.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert cached.shape == (1, 27) and default.base_model._routing.averages._smoothing == {}  # no state is kept


def test_a_smoothed_decision_is_the_moving_average_of_the_logits(smoothed):
    _, model, _ = smoothed
    ids = old_then_new()
    logits = router_logits(model, ids)
    result = model.base_model.last_routing
    threshold = float(model.base_model.scale_router["default"].threshold)
    expected = torch.sigmoid(reference_ema(logits, SMOOTHING))
    assert torch.allclose(result.scores.double(), expected, atol=1e-6, rtol=0)
    clear = (expected - threshold).abs() > 1e-5  # (no score lies this close to the threshold here)
    assert clear.all() and torch.equal(~result.to_preservation, expected >= threshold)
    # it bites: the decisions switch less often along a row than the tokens' own scores would (isolated flips go);
    # and causal: a row's decisions on its first half do not depend on its second half
    own = torch.sigmoid(logits) >= threshold
    assert not torch.equal(own, ~result.to_preservation)
    assert (result.to_preservation.diff(dim=1) != 0).sum() < (own.diff(dim=1) != 0).sum()
    prefix = router_logits(model, ids[:, :12])
    assert torch.equal(model.base_model.last_routing.to_preservation, result.to_preservation[:, :12])
    assert torch.allclose(prefix, logits[:, :12], atol=1e-6)


def test_left_padding_does_not_enter_the_average(smoothed):
    _, model, _ = smoothed
    ids = old_then_new()[[0, 2]]
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids[1:, :-5]], 1)  # row 1: 5 pad tokens, 19 tokens
    padded = torch.cat([ids[:1], padded])
    mask = torch.ones_like(padded)
    mask[1, :5] = 0
    with torch.no_grad():
        model(input_ids=padded, attention_mask=mask)
        padded_scores = model.base_model.last_routing.scores
        model(input_ids=ids[1:, :-5])
        alone = model.base_model.last_routing.scores
    assert torch.allclose(padded_scores[1, 5:], alone[0], atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match=r"attention_mask .* of shape \(2, 3\)"):
        with torch.no_grad():
            model(input_ids=padded, attention_mask=mask[:, :3])


@pytest.mark.parametrize("mode", list(MODES))
def test_a_smoothed_router_keeps_all_old_sequences_on_the_base_model(old_speaker, mode):
    reference, model, _ = fitted(old_speaker, mode, router_smoothing=SMOOTHING)
    perturb_adapter(model, scale=0.5)
    old = domain_ids(OLD, 4, 16, seed=7)
    with torch.no_grad():
        assert (model(input_ids=old).logits - reference(input_ids=old).logits).abs().max() <= 1e-6
        assert model.base_model.last_routing.to_preservation.all()
        model(input_ids=domain_ids(NEW, 4, 16, seed=8))
        assert model.base_model.last_routing.to_preservation.float().mean() < 0.1


def test_smoothed_generate_with_cache_equals_without(smoothed):
    reference, model, _ = smoothed
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    prompts = old_then_new(length=4)  # the prompts switch domain, so the average's history matters
    for extra in ({}, {"num_beams": 2}):
        cached = model.generate(input_ids=prompts, use_cache=True, **settings, **extra)
        uncached = model.generate(input_ids=prompts, use_cache=False, **settings, **extra)
        assert torch.equal(cached, uncached), extra
    # a batch of 2 with left padding: the shorter prompt's padding enters neither the average nor the output
    padded = prompts[[0, 2]].clone()
    padded[1, :3] = 0
    mask = torch.ones_like(padded)
    mask[1, :3] = 0
    for extra in ({}, {"num_beams": 2}):
        cached = model.generate(input_ids=padded, attention_mask=mask, use_cache=True, **settings, **extra)
        uncached = model.generate(input_ids=padded, attention_mask=mask, use_cache=False, **settings, **extra)
        assert torch.equal(cached, uncached), extra
        alone = model.generate(input_ids=padded[1:, 3:], use_cache=True, **settings, **extra)
        assert torch.equal(cached[1, 3:], alone[0]), extra
    # all-old prompts generate as the base model
    old_prompt = torch.cat([torch.ones(2, 1, dtype=torch.long), domain_ids(OLD, 2, 6, seed=10)], 1)
    assert torch.equal(model.generate(input_ids=old_prompt, **settings), reference.generate(input_ids=old_prompt, **settings))


def test_continuing_a_cache_the_router_did_not_follow_is_refused(smoothed, old_speaker):
    _, model, _ = smoothed
    prompts, step = old_then_new(length=4), domain_ids(NEW, 4, 1, seed=30)
    with torch.no_grad():
        first = model(input_ids=prompts, use_cache=True).cache
        second = model(input_ids=prompts, use_cache=True).cache
        model(input_ids=step, cache=second)  # the cache the router followed last: fine
        with pytest.raises(RuntimeError, match=r"continues a cache that holds 8 token\(s\) at decoder layer 2, but no "
                           r"earlier call on this cache object went through this model's router.*without a cache"):
            model(input_ids=step, cache=first)
        second.crop(-1)  # (assisted decoding's rollback)
        with pytest.raises(RuntimeError, match=r"the cache was cropped \(cache.crop\(\)"):
            model(input_ids=step, cache=second)
        # the state follows the cache's rows (beam search's reorder_cache, batch_select_indices)
        third = model(input_ids=prompts, use_cache=True).cache
        third.batch_select_indices(torch.tensor([3, 1]))
        model(input_ids=step[:2], cache=third)
        continued = model.base_model.last_routing.scores[:, -1]
        model(input_ids=torch.cat([prompts[[3, 1]], step[:2]], 1))
        assert torch.allclose(continued, model.base_model.last_routing.scores[:, -1], atol=1e-5, rtol=0)
        fourth = model(input_ids=prompts, use_cache=True).cache
        fourth.reorder_cache(torch.tensor([2, 0, 3, 1]))
        model(input_ids=step, cache=fourth)
        continued = model.base_model.last_routing.scores[:, -1]
        model(input_ids=torch.cat([prompts[[2, 0, 3, 1]], step], 1))
        assert torch.allclose(continued, model.base_model.last_routing.scores[:, -1], atol=1e-5, rtol=0)
        # a cache the router never saw (the base model filled it)
        with model.disable_adapter():
            foreign = model(input_ids=prompts, use_cache=True).cache
        with pytest.raises(RuntimeError, match="no earlier call on this cache object"):
            model(input_ids=step, cache=foreign)


def test_gradient_checkpointing_recomputes_the_same_smoothed_decisions(smoothed):
    """A left-padded training batch gives the same gradients with gradient checkpointing as without (transformers
    checkpoints the layers' ``forward``, so layer L's gate hook decides once, outside the recomputation)."""
    _, model, _ = smoothed
    model = copy.deepcopy(model)  # (a deep copy's hooks write to its own routing)
    ids = old_then_new()
    mask = torch.ones_like(ids)
    mask[2, :6] = 0
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.base_model.model.activation_checkpointing_enable({"use_reentrant": False})
        model.train()
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({name: p.grad.clone() for name, p in scale_parameters(model).items() if p.grad is not None})
    model.eval()
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5), name


def test_the_average_starts_from_the_old_sides_median_logit(smoothed_from_old):
    _, model, report = smoothed_from_old
    router = model.base_model.scale_router["default"]
    # the start is the median of the kept router's logits on all the old data it was fitted on
    old_logits = router_logits(model, domain_ids(OLD, seed=2))
    assert float(router.start) == pytest.approx(float(old_logits.flatten().median()), abs=1e-4)
    assert float(router.start) < -3  # old text, confidently
    ids = old_then_new()
    logits = router_logits(model, ids)
    result = model.base_model.last_routing
    expected = torch.sigmoid(reference_ema(logits, SMOOTHING, start=float(router.start)))
    assert torch.allclose(result.scores.double(), expected, atol=1e-6, rtol=0)
    assert torch.equal(~result.to_preservation, expected >= float(router.threshold))
    # what it changes: a new-domain row's first token, whose own logit sends it to the expansion from "token",
    # goes to the base model; later tokens of the row reach the expansion all the same
    new_rows = domain_ids(NEW, 4, 16, seed=8)
    own = torch.sigmoid(router_logits(model, new_rows))
    model(input_ids=new_rows)
    decisions = ~model.base_model.last_routing.to_preservation
    assert (own[:, 0] >= float(router.threshold)).sum() >= 2 and not decisions[:, 0].any()
    assert decisions[:, -4:].all()
    assert model.peft_config["default"].router.smoothing_start == "old"


def test_a_token_start_router_stores_the_start_but_does_not_use_it(smoothed):
    _, model, report = smoothed
    router = model.base_model.scale_router["default"]
    assert torch.isfinite(router.start).all() and model.peft_config["default"].router.smoothing_start == "token"
    ids = old_then_new()
    logits = router_logits(model, ids)
    expected = torch.sigmoid(reference_ema(logits, SMOOTHING))
    assert torch.allclose(model.base_model.last_routing.scores.double(), expected, atol=1e-6, rtol=0)
    assert "median logit" not in str(report)


def test_generate_from_the_old_start_with_cache_equals_without(smoothed_from_old):
    reference, model, _ = smoothed_from_old
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    prompts = old_then_new(length=4)
    for extra in ({}, {"num_beams": 2}):
        cached = model.generate(input_ids=prompts, use_cache=True, **settings, **extra)
        uncached = model.generate(input_ids=prompts, use_cache=False, **settings, **extra)
        assert torch.equal(cached, uncached), extra
    padded = prompts[[0, 2]].clone()  # left padding: the average starts from c at the row's first real token
    padded[1, :3] = 0
    mask = torch.ones_like(padded)
    mask[1, :3] = 0
    cached = model.generate(input_ids=padded, attention_mask=mask, use_cache=True, **settings)
    assert torch.equal(cached, model.generate(input_ids=padded, attention_mask=mask, use_cache=False, **settings))
    assert torch.equal(cached[1, 3:], model.generate(input_ids=padded[1:, 3:], use_cache=True, **settings)[0])
    old_prompt = torch.cat([torch.ones(2, 1, dtype=torch.long), domain_ids(OLD, 2, 6, seed=10)], 1)
    assert torch.equal(model.generate(input_ids=old_prompt, **settings), reference.generate(input_ids=old_prompt, **settings))


@pytest.fixture(scope="module")
def smoothed_falling(old_speaker):
    """(untouched base, model routed with router_smoothing=0.8 falling with 0.4, perturbed; report)."""
    reference, model, report = fitted(old_speaker, router_smoothing=SMOOTHING, router_smoothing_fall=FALL)
    perturb_adapter(model, scale=0.5)
    return reference, model.eval(), report


def test_a_falling_router_decides_on_the_asymmetric_average(smoothed_falling):
    _, model, report = smoothed_falling
    ids = old_then_new()
    logits = router_logits(model, ids)
    result = model.base_model.last_routing
    threshold = float(model.base_model.scale_router["default"].threshold)
    expected = torch.sigmoid(reference_falling(logits, SMOOTHING, FALL))
    assert torch.allclose(result.scores.double(), expected, atol=1e-6, rtol=0)
    assert torch.equal(~result.to_preservation, expected >= threshold)
    # it bites where the rows switch from new to old: the average falls sooner than a = 0.8 both ways would
    plain = torch.sigmoid(reference_ema(logits, SMOOTHING))
    assert (expected[2:, 12:] < plain[2:, 12:] - 1e-3).any() and (expected[2:, 12:] <= plain[2:, 12:] + 1e-9).all()
    assert model.peft_config["default"].router.smoothing_fall == FALL
    # the report's shares are the model's decisions (fit_router calibrates on the same average)
    assert routed_share(model, domain_ids(NEW, seed=1)) == pytest.approx(report.fitted_new_to_expansion, abs=2e-3)


def test_generate_with_a_falling_router_with_cache_equals_without(smoothed_falling, old_speaker, tmp_path):
    reference, model, _ = smoothed_falling
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    prompts = old_then_new(length=4)
    for extra in ({}, {"num_beams": 2}):
        cached = model.generate(input_ids=prompts, use_cache=True, **settings, **extra)
        assert torch.equal(cached, model.generate(input_ids=prompts, use_cache=False, **settings, **extra)), extra
    padded = prompts[[0, 2]].clone()
    padded[1, :3] = 0
    mask = torch.ones_like(padded)
    mask[1, :3] = 0
    cached = model.generate(input_ids=padded, attention_mask=mask, use_cache=True, **settings)
    assert torch.equal(cached, model.generate(input_ids=padded, attention_mask=mask, use_cache=False, **settings))
    old_prompt = torch.cat([torch.ones(2, 1, dtype=torch.long), domain_ids(OLD, 2, 6, seed=10)], 1)
    assert torch.equal(model.generate(input_ids=old_prompt, **settings), reference.generate(input_ids=old_prompt, **settings))
    # saved and loaded with the adapter; a config saved before the field existed loads as None (a both ways)
    ids = old_then_new()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["router"]["smoothing_fall"] == FALL
    with torch.no_grad():
        assert torch.equal(PeftModel.from_pretrained(copy.deepcopy(old_speaker), tmp_path)(input_ids=ids).logits, expected)
    flat = {key: value for key, value in saved.items() if key != "router"}  # as 0.1.0 saved it, before the field
    flat.update(route_rule="learned", router_smoothing=SMOOTHING)
    (tmp_path / "adapter_config.json").write_text(json.dumps(flat))
    assert PeftModel.from_pretrained(copy.deepcopy(old_speaker), tmp_path).peft_config["default"].router.smoothing_fall is None


def test_a_gate_is_one_or_weighs_the_score_above_the_threshold():
    to_expansion, score, tau = torch.tensor([[True, True, False]]), torch.tensor([[0.9, 0.6, 0.3]]), torch.tensor(0.5)
    hard = gate_values(to_expansion, score, tau, soft=False, dtype=torch.bfloat16)
    assert hard.shape == (1, 3, 1) and hard.dtype == torch.bfloat16 and hard[..., 0].tolist() == [[1.0, 1.0, 0.0]]
    soft = gate_values(to_expansion, score, tau, soft=True, dtype=torch.float32)
    assert torch.allclose(soft[..., 0], torch.tensor([[0.8, 0.2, 0.0]]))  # (p - tau) / (1 - tau)
    # a threshold of 1 leaves no room above it: the gate is 0, not a division by zero
    top = gate_values(torch.tensor([[True]]), torch.tensor([[1.0]]), torch.tensor(1.0), soft=True, dtype=torch.float32)
    assert top.tolist() == [[[0.0]]]
