"""benchmarks/methods.py and benchmarks/llama_pro.py: what each compared method trains, and that it starts as the base."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from conftest import REPO, random_ids, tiny_llama

sys.path.insert(0, str(REPO))  # the `benchmarks` package

from benchmarks.llama_pro import expand_depth, inserted_block_indices  # noqa: E402
from benchmarks.methods import (  # noqa: E402
    METHODS,
    MethodSizes,
    lora_parameters_per_rank,
    prepare_method,
    trainable_parameters,
)

# Tiny llama: 2 layers, hidden 32, 4 heads of 8 over 2 key-value heads -> hidden_expansion in steps of 16.
SIZES = MethodSizes(ffn_expansion=16, hidden_expansion=16, preserve_layers=1, llama_pro_blocks=2)


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def build(name: str, sizes: MethodSizes = SIZES):
    return prepare_method(name, tiny_llama(), sizes)


def test_full_and_freeze_trainable_counts():
    base = tiny_llama()
    assert trainable_parameters(build("full")) == numel(base)
    frozen = numel(base.model.embed_tokens) + numel(base.model.layers[0])
    freeze = build("freeze")
    assert trainable_parameters(freeze) == numel(base) - frozen
    assert not any(p.requires_grad for p in freeze.model.layers[0].parameters())
    assert all(p.requires_grad for p in freeze.model.layers[1].parameters())
    assert freeze.lm_head.weight.requires_grad and not freeze.model.embed_tokens.weight.requires_grad


def test_llama_pro_trains_only_the_inserted_blocks():
    base = tiny_llama()
    model = build("llama_pro")
    assert inserted_block_indices(2, 2) == [1, 3]
    assert len(model.model.layers) == model.config.num_hidden_layers == 4
    assert trainable_parameters(model) == 2 * numel(base.model.layers[0])
    for index, block in enumerate(model.model.layers):
        assert block.self_attn.layer_idx == index
        assert all(p.requires_grad == (index in (1, 3)) for p in block.parameters())
    # the copy is of the block just below, with zero output projections
    torch.testing.assert_close(model.model.layers[1].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    assert model.model.layers[3].mlp.down_proj.weight.abs().sum() == 0


def test_llama_pro_block_count_must_divide_the_layers():
    with pytest.raises(ValueError, match="positive divisor"):
        expand_depth(tiny_llama(num_hidden_layers=4), 3)


def test_lora_rank_is_closest_to_scale_adapt():
    adapt = trainable_parameters(build("scale_adapt"))
    lora = build("lora")
    rank = lora.peft_config["default"].r
    per_rank = lora_parameters_per_rank(tiny_llama())
    assert per_rank == 2 * (2 * (32 + 32) + 2 * (32 + 16) + 3 * (32 + 64))  # 2 layers x (q, o; k, v; gate, up, down)
    assert trainable_parameters(lora) == rank * per_rank
    assert all(abs(rank * per_rank - adapt) <= abs(r * per_rank - adapt) for r in (rank - 1, rank + 1) if r >= 1)
    assert set(lora.peft_config["default"].target_modules) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }


def test_scale_methods_train_only_scale_parameters():
    counts = {}
    for name in ("scale_ffn", "scale_preserve", "scale_adapt", "scale_route"):
        model = build(name)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert names and all(".scale_" in n for n in names), name
        counts[name] = len(names), trainable_parameters(model)
        w12 = [n for n in names if ".scale_w12." in n]
        if name == "scale_preserve":
            assert w12 == []
        elif name in ("scale_adapt", "scale_route"):  # W12 opens above preserve_layers=1 only
            assert w12 and all(".layers.1." in n for n in w12)
    assert counts["scale_adapt"] == counts["scale_route"]
    assert counts["scale_preserve"][1] < counts["scale_adapt"][1]
    ffn = build("scale_ffn")
    assert ffn.peft_config["default"].hidden_expansion == 0 and ffn.peft_config["default"].ffn_expansion == 16


@pytest.mark.parametrize("name", METHODS)
def test_every_method_starts_as_the_base_model(name):
    ids = random_ids()
    with torch.no_grad():
        expected = tiny_llama()(ids).logits
        got = build(name).eval()(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_a_training_step_moves_only_trainable_parameters(name):
    model = build(name).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    ids = random_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, name
    assert changed <= trainable, sorted(changed - trainable)


def test_llama_pro_generates_with_kv_cache():
    base = tiny_llama()
    model = expand_depth(copy.deepcopy(base), 2)
    prompt = random_ids(batch=1, length=5)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(model.generate(prompt, **kwargs), base.generate(prompt, **kwargs))
    with torch.no_grad():  # move the new blocks away from identity: the cache must still give each layer its slot
        for index in (1, 3):
            for param in model.model.layers[index].parameters():
                param.add_(torch.randn_like(param) * 0.1)
    cached = model.generate(prompt, use_cache=True, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    torch.testing.assert_close(cached, uncached)
    assert len(model.generate(prompt, use_cache=True, return_dict_in_generate=True, **kwargs).past_key_values) == 4
