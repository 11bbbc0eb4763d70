"""peft_scale.optim: which parameter lands in which optimizer group at which learning rate, and the Trainer with it."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_ids, tiny_llama
from datasets import Dataset
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from peft_scale import ScaleConfig
from peft_scale.optim import BLOCKS, create_scale_optimizer, scale_block_of, scale_optimizer_param_groups

LR = 1e-3


def ffn_model():
    torch.manual_seed(0)
    return get_peft_model(tiny_llama(), ScaleConfig(ffn_expansion=8))


def full_width_model():
    torch.manual_seed(0)
    return get_peft_model(tiny_llama(), ScaleConfig(hidden_expansion=16, ffn_expansion=8, variant="adapt"))


def names_by_group(model, groups) -> dict[tuple[str, float, float], set[str]]:
    """(block, lr, weight decay) -> the parameter names in that group."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {(g["block"], g["lr"], g["weight_decay"]): {name_of[id(p)] for p in g["params"]} for g in groups}


@pytest.mark.parametrize(
    "name, block",
    [
        ("base_model.model.model.layers.0.mlp.down_proj.scale_w12.default", "w12"),
        ("base_model.model.model.layers.0.mlp.gate_proj.scale_w21.default", "w21"),
        ("base_model.model.model.layers.1.self_attn.q_proj.scale_b21.default", "w21"),
        ("base_model.model.model.layers.1.self_attn.o_proj.scale_w22.default", "w22"),
        ("base_model.model.model.norm.scale_head.default", "head"),
        ("base_model.model.model.layers.0.input_layernorm.scale_gain.default", "gain"),
        ("base_model.model.model.layers.0.input_layernorm.scale_bias.default", "gain"),  # a split LayerNorm's
        ("base_model.model.model.embed_tokens.scale_embedding.default", "embedding"),
        ("base_model.model.score.modules_to_save.default.weight", "other"),
        ("base_model.model.model.layers.0.mlp.down_proj.base_layer.weight", "other"),
    ],
)
def test_block_of_a_parameter_name(name, block):
    assert scale_block_of(name) == block


def test_ffn_mode_groups_w12_and_w21_with_their_rates():
    model = ffn_model()
    groups = scale_optimizer_param_groups(model, LR, w12_lr_ratio=16.0, lr_ratios={"w21": 0.5}, weight_decay=0.1)
    by_group = names_by_group(model, groups)
    assert set(by_group) == {("w12", 16 * LR, 0.1), ("w21", 0.5 * LR, 0.1)}
    # tiny_llama: 2 layers; down_proj holds W12, gate_proj and up_proj hold W21 (no bias: no b21)
    assert by_group[("w12", 16 * LR, 0.1)] == {
        f"base_model.model.model.layers.{i}.mlp.down_proj.scale_w12.default" for i in range(2)
    }
    assert by_group[("w21", 0.5 * LR, 0.1)] == {
        f"base_model.model.model.layers.{i}.mlp.{proj}.scale_w21.default"
        for i in range(2)
        for proj in ("gate_proj", "up_proj")
    }


def test_every_trainable_parameter_is_in_exactly_one_group_and_frozen_ones_in_none():
    for model in (ffn_model(), full_width_model()):
        groups = scale_optimizer_param_groups(model, LR, w12_lr_ratio=4.0)
        grouped = [id(p) for g in groups for p in g["params"]]
        assert len(grouped) == len(set(grouped))
        assert set(grouped) == {id(p) for p in model.parameters() if p.requires_grad}


def test_full_width_blocks_and_ratios():
    model = full_width_model()
    groups = scale_optimizer_param_groups(
        model, LR, w12_lr_ratio=2.0, lr_ratios={"head": 8.0, "w21": 3.0, "w12": 4.0}, weight_decay=0.01
    )
    rates = {(g["block"], g["weight_decay"]): g["lr"] for g in groups}
    # lr_ratios wins over w12_lr_ratio; blocks without a ratio get lr itself; 1-D gains get no weight decay
    assert rates == {
        ("w12", 0.01): 4 * LR,
        ("w21", 0.01): 3 * LR,
        ("w22", 0.01): LR,
        ("head", 0.01): 8 * LR,
        ("gain", 0.0): LR,
        ("embedding", 0.01): LR,
    }
    assert [g["block"] for g in groups] == [b for b in BLOCKS if any(g["block"] == b for g in groups)]
    for group in groups:
        kinds = {scale_block_of(n) for n, p in model.named_parameters() if any(p is q for q in group["params"])}
        assert kinds == {group["block"]}
        assert all((p.ndim >= 2) == (group["weight_decay"] == 0.01) for p in group["params"])


def test_by_default_w12_trains_at_four_times_the_rate_and_every_other_block_at_it():
    model = full_width_model()
    rates = {g["block"]: g["lr"] for g in scale_optimizer_param_groups(model, LR)}
    assert rates.pop("w12") == 4 * LR and set(rates.values()) == {LR}
    assert {g["block"]: g["lr"] for g in create_scale_optimizer(ffn_model(), lr=LR).param_groups} == {
        "w12": 4 * LR, "w21": LR,
    }
    assert isinstance(create_scale_optimizer(ffn_model(), lr=LR), torch.optim.AdamW)


def test_other_trainable_parameters_and_biases():
    model = get_peft_model(tiny_llama(), ScaleConfig(ffn_expansion=8, modules_to_save=["lm_head"]))
    groups = scale_optimizer_param_groups(model, LR, w12_lr_ratio=4.0, weight_decay=0.1)
    by_group = names_by_group(model, groups)
    other = by_group[("other", LR, 0.1)]
    assert other and all("modules_to_save" in name for name in other)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr_ratios": {"w13": 2.0}}, "unknown block 'w13'"),
        ({"w12_lr_ratio": -1.0}, "must be >= 0"),
        ({"lr_ratios": {"gain": float("nan")}}, "must be >= 0"),
    ],
)
def test_bad_ratios_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        scale_optimizer_param_groups(ffn_model(), LR, **kwargs)


def test_no_trainable_parameter_is_refused():
    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        scale_optimizer_param_groups(model, LR)


def test_create_scale_optimizer_passes_kwargs_and_steps_each_group_at_its_rate():
    model = ffn_model()
    optimizer = create_scale_optimizer(model, torch.optim.SGD, lr=0.1, w12_lr_ratio=4.0, momentum=0.0)
    assert isinstance(optimizer, torch.optim.SGD)
    assert {g["block"]: g["lr"] for g in optimizer.param_groups} == {"w12": 0.4, "w21": 0.1}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = random_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    for name, param in model.named_parameters():
        if param.requires_grad:  # plain SGD: the step is exactly rate x gradient
            rate = 0.4 if "scale_w12" in name else 0.1
            torch.testing.assert_close(param.detach(), before[name] - rate * grads[name], rtol=0, atol=1e-7)


def test_trainer_trains_with_the_scale_optimizer_and_keeps_the_ratio(tmp_path):
    model = ffn_model()
    optimizer = create_scale_optimizer(model, torch.optim.AdamW, lr=1e-2, w12_lr_ratio=4.0, weight_decay=0.0)
    ids = random_ids(batch=16, length=12, seed=1).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, learning_rate=5e-5,
        lr_scheduler_type="linear", warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, seed=0, disable_tqdm=True,
    )  # fmt: skip
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
    trainer.train()
    assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is optimizer  # accelerate may wrap it
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    # the linear schedule scaled both groups alike (it ends at 0); the ratio held: the initial rates are the groups'
    assert {g["block"]: g["initial_lr"] for g in optimizer.param_groups} == {"w12": 4e-2, "w21": 1e-2}
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert not torch.equal(param.detach(), adapter_before[name]), f"{name} did not train"
        else:
            assert torch.equal(param.detach(), base_before[name]), f"frozen {name} changed"
