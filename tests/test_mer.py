"""``MERCallback``: the exact Reptile interpolation every k optimizer steps, with SCALE, LoRA and full fine-tuning."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_llama
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from peft_scale import MERCallback, ScaleConfig


def trainable(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


class Recorder(TrainerCallback):
    """The trainable weights at the start of training and at the end of every optimizer step (before or after the
    callbacks that follow it in the list, depending on where it is placed)."""

    def __init__(self):
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights[0] = trainable(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = trainable(model)


def make_model(method: str):
    base = tiny_llama()
    if method == "scale":
        return get_peft_model(base, ScaleConfig(ffn_expansion=8))
    if method == "lora":
        return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return base.train()  # full fine-tuning: every weight is trainable


def train(model, tmp_path, callbacks, steps: int = 6, **overrides) -> None:
    ids = random_ids(batch=24, length=12, seed=5).tolist()
    args = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=steps,
        learning_rate=1e-2,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    args.update(overrides)
    Trainer(
        model=model,
        args=TrainingArguments(**args),
        train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
        callbacks=callbacks,
    ).train()


@pytest.mark.parametrize("method", ["scale", "lora", "full"])
def test_every_k_steps_the_weights_become_start_plus_gamma_times_the_window_update(tmp_path, method):
    k, gamma, steps = 3, 0.25, 6
    trained, interpolated = Recorder(), Recorder()  # before and after the MER callback, in callback order
    model = make_model(method)
    train(model, tmp_path, [trained, MERCallback(k=k, gamma=gamma), interpolated], steps=steps)
    assert sorted(trained.weights) == list(range(steps + 1))
    window_start = trained.weights[0]
    for step in range(1, steps + 1):
        after_optimizer, after_mer = trained.weights[step], interpolated.weights[step]
        if step % k:
            for name in after_optimizer:  # inside a window: MER leaves the optimizer's step alone
                assert torch.equal(after_mer[name], after_optimizer[name]), (step, name)
            continue
        moved = 0
        for name, start in window_start.items():
            expected = start + gamma * (after_optimizer[name] - start)
            assert torch.equal(after_mer[name], expected), (step, name)
            moved += not torch.equal(after_optimizer[name], start)
        assert moved > 0  # the window trained something, so the check above is not start == start
        window_start = after_mer
    final = trainable(model)
    assert all(torch.equal(final[name], interpolated.weights[steps][name]) for name in final)


def test_gamma_one_is_plain_training(tmp_path):
    plain, with_mer = make_model("scale"), make_model("scale")
    train(plain, tmp_path / "plain", [], steps=4)
    train(with_mer, tmp_path / "mer", [MERCallback(k=1, gamma=1.0)], steps=4)
    a, b = trainable(plain), trainable(with_mer)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_windows_count_optimizer_steps_under_gradient_accumulation(tmp_path):
    trained, interpolated = Recorder(), Recorder()
    train(
        make_model("scale"),
        tmp_path,
        [trained, MERCallback(k=2, gamma=0.5), interpolated],
        steps=4,
        gradient_accumulation_steps=3,
    )
    assert sorted(trained.weights) == [0, 1, 2, 3, 4]
    changed = [
        step
        for step in (1, 2, 3, 4)
        if any(not torch.equal(trained.weights[step][n], interpolated.weights[step][n]) for n in trained.weights[step])
    ]
    assert changed == [2, 4]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(k=0, gamma=0.5), "integer >= 1"),
        (dict(k=2.0, gamma=0.5), "integer >= 1"),
        (dict(k=True, gamma=0.5), "integer >= 1"),
        (dict(k=2, gamma=0.0), "0 < gamma <= 1"),
        (dict(k=2, gamma=1.5), "0 < gamma <= 1"),
        (dict(k=2, gamma=-0.1), "0 < gamma <= 1"),
        (dict(k=2, gamma="0.5"), "0 < gamma <= 1"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MERCallback(**kwargs)
