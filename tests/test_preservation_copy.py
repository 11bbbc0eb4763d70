"""The learned rule's preservation copy (``RouterConfig.preservation_copy``): tokens routed to the base model get the base
model's logits inside mixed sequences too, and tokens routed to the expansion get what they get without it.

The setting of ``conftest.py``'s learned-router helpers: a tiny 4-layer Llama that speaks the old domain (ids 4-63), the new domain ids
64-127, the router reading the stream entering layer 2, the expansion moved by seeded noise (a stand-in for
training) so that it changes every token it reaches.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MODES, NEW, OLD, domain_ids, fitted, old_then_new
from peft import PeftModel
from tiny_models import perturb_adapter
from transformers import DynamicCache, StaticCache

from peft_scale import RouterConfig, ScaleConfig


def copying(model, on: bool = True):
    model.peft_config["default"].router.preservation_copy = on
    return model


def switching(n: int = 2, length: int = 12) -> torch.Tensor:
    """Rows that switch domain halfway: new then old (the case the copy is for) and old then new."""
    rows = old_then_new(n, length)
    return torch.cat([rows[n:], rows[:n]])


@pytest.fixture(scope="module", params=list(MODES))
def routed_pair(request, old_speaker):
    """(untouched base, routed model of each mode with its expansion moved, copy off)."""
    reference, model, _ = fitted(old_speaker, request.param)
    perturb_adapter(model, scale=0.5)
    return reference, model.eval()


def test_base_routed_tokens_of_mixed_sequences_get_the_base_models_logits(routed_pair):
    reference, model = routed_pair
    ids = switching()
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        plain = copying(model, False)(input_ids=ids).logits
        to_base = model.base_model.last_routing.to_preservation.clone()
        copied = copying(model)(input_ids=ids).logits
        assert torch.equal(model.base_model.last_routing.to_preservation, to_base)
    copying(model, False)
    assert 0.2 < to_base.float().mean() < 0.8  # mixed rows: both kinds of token
    # without the copy, the old half after the switch reads keys and values the expansion changed
    assert (plain - expected)[to_base].abs().max() > 1e-3
    assert (copied - expected)[to_base].abs().max() <= 1e-6
    # the tokens routed to the expansion are computed as without the copy
    assert (copied - plain)[~to_base].abs().max() <= 1e-6
    assert (copied - expected)[~to_base].abs().max() > 1e-2


def test_padded_rows_with_the_copy(routed_pair):
    reference, model = routed_pair
    ids = switching()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding of one row: the 4-D mask has B rows and is stacked with the batch
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
        copied = copying(model)(input_ids=ids, attention_mask=mask).logits
        to_base = model.base_model.last_routing.to_preservation & mask.bool()
    copying(model, False)
    assert to_base.any()
    assert (copied - expected)[to_base].abs().max() <= 1e-6


def rows_above_the_router(model, ids, grad: bool = False) -> list[int]:
    """The batch size every decoder layer received in one forward pass (with gradients: and its backward)."""
    rows, handles = [], []
    for layer in model.base_model.model.model.layers:
        handles.append(layer.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0])))
    try:
        with torch.set_grad_enabled(grad):
            output = model(input_ids=ids, labels=ids)
            if grad:
                output.loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    return rows


def test_the_copy_is_carried_only_while_a_token_has_gone_to_the_expansion(routed_pair):
    _, model = routed_pair
    copying(model)
    try:
        old, mixed = domain_ids(OLD, 3, 16, seed=7), switching()  # (every token of `old` goes to the base)
        assert rows_above_the_router(model, old) == [3, 3, 3, 3]  # all old: nothing to copy
        assert rows_above_the_router(model, mixed) == [4, 4, 8, 8]  # stacked from layer 2 (preserve_layers) up
        model.train()  # gradients recorded: training computes the adapted rows alone
        assert rows_above_the_router(model, mixed, grad=True) == [4, 4, 4, 4]
    finally:
        model.eval().zero_grad()
        copying(model, False)


def test_a_training_pass_is_the_same_with_the_flag(routed_pair):
    _, model = routed_pair
    ids = switching()
    model.train()
    try:
        losses = [copying(model, on)(input_ids=ids, labels=ids).loss.item() for on in (False, True)]
    finally:
        model.eval()
        copying(model, False)
    assert losses[0] == losses[1]


def test_a_cache_continued_across_a_switch_equals_the_whole_sequence(routed_pair):
    """Old text first (the copy not carried), then new text (the cache's upper rows are duplicated), then old."""
    reference, model = routed_pair
    copying(model)
    old = domain_ids(OLD, 3, 16, seed=7)[:2, :5]  # (a prefix of rows the router sends to the base whole)
    new, later = domain_ids(NEW, 2, 5, seed=42), domain_ids(OLD, 2, 6, seed=43)
    try:
        with torch.no_grad():
            cache = DynamicCache()
            pieces = []
            for part in (old, new, later[:, :3], later[:, 3:4], later[:, 4:]):
                pieces.append(model(input_ids=part, cache=cache, use_cache=True).logits)
            assert cache.layers[3].keys.shape[0] == 4 and cache.layers[1].keys.shape[0] == 2
            whole_ids = torch.cat([old, new, later], 1)
            whole = model(input_ids=whole_ids).logits
            to_base = model.base_model.last_routing.to_preservation
            expected = reference(input_ids=whole_ids).logits
    finally:
        copying(model, False)
    assert (torch.cat(pieces, 1) - whole).abs().max() <= 1e-5
    assert to_base[:, :5].all() and to_base[:, 10:].any()
    assert (torch.cat(pieces, 1) - expected)[to_base].abs().max() <= 1e-5


@pytest.mark.parametrize("beams", [1, 2])
def test_generate_with_the_copy_cache_equals_no_cache(routed_pair, beams):
    reference, model = routed_pair
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, num_beams=beams)
    prompt = switching(length=6)
    copying(model)
    try:
        cached = model.generate(input_ids=prompt, use_cache=True, **settings)
        uncached = model.generate(input_ids=prompt, use_cache=False, **settings)
        old_prompt = torch.cat([torch.ones(2, 1, dtype=torch.long), domain_ids(OLD, 2, 6, seed=10)], 1)
        assert torch.equal(model.generate(input_ids=old_prompt, **settings), reference.generate(input_ids=old_prompt, **settings))
    finally:
        copying(model, False)
    assert torch.equal(cached, uncached)


def test_contrastive_style_cache_row_operations_keep_both_halves(routed_pair):
    _, model = routed_pair
    ids, step = switching(length=5), domain_ids(OLD, 4, 1, seed=44)
    copying(model)
    try:
        with torch.no_grad():
            cache = model(input_ids=ids, use_cache=True).cache
            cache.batch_select_indices(torch.tensor([3, 0]))
            cache.batch_repeat_interleave(2)  # rows 3, 3, 0, 0
            continued = model(input_ids=step, cache=cache).logits[:, -1]
            rows = ids[[3, 3, 0, 0]]
            whole = model(input_ids=torch.cat([rows, step], 1)).logits[:, -1]
    finally:
        copying(model, False)
    assert (continued - whole).abs().max() <= 1e-5


def test_caches_the_copy_cannot_continue_are_refused(routed_pair):
    _, model = routed_pair
    ids, step = switching(length=5), domain_ids(OLD, 4, 1, seed=45)
    with torch.no_grad():
        uncopied = copying(model, False)(input_ids=ids, use_cache=True).cache
        copying(model)
        try:
            with pytest.raises(RuntimeError, match="continues a cache that this model did not fill with the copy"):
                model(input_ids=step, cache=uncopied)
            carried = model(input_ids=ids, use_cache=True).cache
            if model.peft_config["default"].hidden_expansion == 0:  # (full width's cache has the new heads anyway)
                with model.disable_adapter(), pytest.raises(RuntimeError, match="does not carry the copy"):
                    model(input_ids=step, cache=carried)
            copying(model, False)
            with pytest.raises(RuntimeError, match="does not carry the copy"):
                model(input_ids=step, cache=carried)
            copying(model)
            static = StaticCache(config=model.config, max_cache_len=16)
            with pytest.raises(RuntimeError, match="a StaticCache cannot"):
                model(input_ids=ids, cache=static, use_cache=True)
        finally:
            copying(model, False)


def test_the_copy_with_a_smoothed_router(old_speaker):
    reference, model, _ = fitted(old_speaker, router_smoothing=0.8, router_preservation_copy=True)
    perturb_adapter(model, scale=0.5)
    model.eval()
    ids = switching()
    with torch.no_grad():
        copied = model(input_ids=ids).logits
        to_base = model.base_model.last_routing.to_preservation
        expected = reference(input_ids=ids).logits
    assert to_base.any() and (~to_base).any()
    assert (copied - expected)[to_base].abs().max() <= 1e-6
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = model.generate(input_ids=ids[:, :8], use_cache=True, **settings)
    assert torch.equal(cached, model.generate(input_ids=ids[:, :8], use_cache=False, **settings))


def test_the_flag_is_saved_and_loaded(routed_pair, old_speaker, tmp_path):
    import copy

    _, model = routed_pair
    copying(model)
    try:
        model.save_pretrained(tmp_path)
        ids = switching()
        with torch.no_grad():
            expected = model(input_ids=ids).logits
    finally:
        copying(model, False)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["router"]["preservation_copy"] is True
    loaded = PeftModel.from_pretrained(copy.deepcopy(old_speaker), tmp_path).eval()
    assert loaded.peft_config["default"].router.preservation_copy is True
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)


def test_config_errors():
    with pytest.raises(ValueError, match=r"RouterConfig\(preservation_copy=1\): pass True or False"):
        RouterConfig(preservation_copy=1)
    with pytest.raises(ValueError, match="sets a learned router, but this config has variant='route', "
                       "route_rule='cosine'"):  # the cosine rule always carries its own copy
        ScaleConfig(hidden_expansion=16, variant="route", route_rule="cosine", router=RouterConfig())


def test_hidden_states_of_the_layers_that_carry_the_copy_hold_both_halves(routed_pair):
    _, model = routed_pair
    ids = switching()
    copying(model)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
            plain = copying(model, False)(input_ids=ids, output_hidden_states=True)
    finally:
        copying(model, False)
    # embeddings, layers 0-2 (from layer 2 up: the adapted rows, then the copy's), the final norm's (selected)
    assert [h.shape[0] for h in out.hidden_states] == [4, 4, 4, 8, 4]
    assert torch.equal(out.hidden_states[3][:4], plain.hidden_states[3])


# ------------------------------------------------------------------------------ families with their own layer inputs


@pytest.mark.parametrize("model_type", ["bloom", "openai-gpt"])
def test_the_copy_on_alibi_rows_and_list_outputs(model_type):
    """BLOOM's ALiBi bias has ``batch x heads`` rows (stacked per batch row, its heads together); OpenAI GPT's block
    returns a list. Base-routed tokens of mixed sequences get the base model's logits there too."""
    from tiny_models import assert_base_routed_tokens_exact, routed_registry_model, switching_rows

    base, routed, old, new = routed_registry_model(model_type)
    assert_base_routed_tokens_exact(base, routed, switching_rows(old, new))


@pytest.fixture(scope="module")
def hybrid():
    """LFM3 (tiny): its decoder layer's cache is a linear-attention layer (conv states per row)."""
    from tiny_models import routed_registry_model

    return routed_registry_model("lfm3", smoothing=0.0)


def test_a_linear_attention_cache_continued_across_a_switch_equals_the_whole_sequence(hybrid):
    """Old text first (the copy not carried), then new text (the cache's conv states are duplicated), then old;
    cache row operations keep both halves of the states."""
    from tiny_models import assert_base_routed_tokens_exact

    base, routed, old, new = hybrid
    ids = torch.cat([old[:2, :4], new[2:4, :4], old[4:6, :4]], 1)
    whole = assert_base_routed_tokens_exact(base, routed, ids)
    with torch.no_grad():
        cache = DynamicCache(config=routed.config)
        pieces = [routed(input_ids=part, cache=cache, use_cache=True).logits for part in ids.split([4, 4, 2, 1, 1], 1)]
        assert type(cache.layers[0]).__name__ == "LinearAttentionLayer"
        assert cache.layers[0].conv_states[0].shape[0] == 4  # the copy's rows beside the adapted ones
        assert (torch.cat(pieces, 1) - whole).abs().max() <= 1e-5
        cache.batch_select_indices(torch.tensor([1, 0]))
        cache.batch_repeat_interleave(2)  # rows 1, 1, 0, 0
        step = old[6:10, :1]
        continued = routed(input_ids=step, cache=cache).logits[:, -1]
        rows = ids[[1, 1, 0, 0]]
        expected = routed(input_ids=torch.cat([rows, step], 1)).logits[:, -1]
    assert (continued - expected).abs().max() <= 1e-5


def test_a_familys_own_cache_layers_carry_the_copy_for_one_pass_only():
    """DeepSeek V4's cache layers (compressed attention) cannot be doubled or reordered by SCALE: a pass that fills
    an empty one carries the copy (its base-routed tokens exact); continuing it is refused, and a cache that first
    got only base-routed tokens is refused when the copy would have to start."""
    from tiny_models import assert_base_routed_tokens_exact, routed_registry_model, switching_rows

    base, routed, old, new = routed_registry_model("deepseek_v4")
    ids = switching_rows(old, new)
    assert_base_routed_tokens_exact(base, routed, ids)  # (the model's own cache: use_cache defaults to True)
    with torch.no_grad():
        cache = routed(input_ids=ids, use_cache=True).cache
        with pytest.raises(RuntimeError, match="serves one pass only.*use_cache=False.*preservation_copy=False"):
            routed(input_ids=old[:2, :1], cache=cache)
        cache = routed(input_ids=old[:2, :4], use_cache=True).cache  # every token to the base: no copy yet
        with pytest.raises(RuntimeError, match="a DynamicCache cannot \\(its \\['DeepseekV4HCACache'\\] layers\\)"):
            routed(input_ids=new[:2, :4], cache=cache)
