"""SCALE inside the training stacks people use: transformers' Trainer, TRL's SFTTrainer, gradient checkpointing,
bf16 base models and PEFT's ``low_cpu_mem_usage`` loading. Tiny random Llamas, a few seconds per test."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import (
    adapter_params,
    assert_bit_identical,
    base_weights,
    random_ids,
    step_losses,
    tiny_llama,
    training_args,
    word_tokenizer,
)
from datasets import Dataset
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback

from peft_scale import ScaleConfig, ScaleLayer

EXPANSION = 8
# tiny_llama(): 2 layers, each MLP's gate/up/down widened -> 6 adapter tensors.
ADAPTER_SUFFIXES = ("scale_w21", "scale_w12")


# ----------------------------------------------------------------------------------------------------- helpers


def checkpoint_adapter(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def assert_adapter_equals_checkpoint(model, folder) -> None:
    """The model's adapter tensors are exactly the ones stored in ``folder``."""
    saved = checkpoint_adapter(folder)
    current = get_peft_model_state_dict(model)
    assert saved.keys() == current.keys()
    assert len(saved) == 6
    for key, tensor in saved.items():
        assert torch.equal(current[key], tensor), key


def lm_dataset(n: int = 16, length: int = 12, seed: int = 1) -> Dataset:
    ids = random_ids(batch=n, length=length, seed=seed).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def wrapped_llama(seed: int = 0, init_seed: int = 0):
    """A tiny Llama wrapped with SCALE; ``init_seed`` draws the new rows W21."""
    base = tiny_llama(seed)
    torch.manual_seed(init_seed)
    return get_peft_model(base, ScaleConfig(ffn_expansion=EXPANSION))


class FirstStepSnapshot(TrainerCallback):
    """Records the adapter tensors and the global step when the first optimisation step of a run begins."""

    def __init__(self):
        self.weights = None
        self.global_step = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.weights is None:
            self.weights = get_peft_model_state_dict(model)
            self.weights = {k: v.detach().clone() for k, v in self.weights.items()}
            self.global_step = state.global_step


# ------------------------------------------------------------------------------------------- 1. Trainer resume


def test_trainer_checkpoint_resume_continues_the_run(tmp_path):
    data = lm_dataset()
    # The uninterrupted reference run: 4 steps, checkpoints at steps 2 and 4.
    model = wrapped_llama()
    base_before = base_weights(model)
    trainer = Trainer(model=model, args=training_args(tmp_path / "full"), train_dataset=data)
    result = trainer.train()
    assert result.global_step == 4
    assert sorted(os.listdir(tmp_path / "full")) == ["checkpoint-2", "checkpoint-4"]
    assert_bit_identical(base_before, base_weights(model))
    full_losses = step_losses(trainer.state.log_history)
    assert sorted(full_losses) == [1, 2, 3, 4]
    assert all(math.isfinite(loss) for loss in full_losses.values())
    checkpoint = tmp_path / "full" / "checkpoint-2"
    # The checkpoint holds the adapter, not a copy of the base model.
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "trainer_state.json"} <= set(
        os.listdir(checkpoint)
    )
    assert not (checkpoint / "model.safetensors").exists()
    assert all(key.split(".")[-1] in ADAPTER_SUFFIXES for key in checkpoint_adapter(checkpoint))

    # Resume in a new Trainer on a freshly wrapped model whose new rows W21 were drawn differently, so that agreeing
    # with the checkpoint can only come from loading it.
    fresh = wrapped_llama(init_seed=123)
    fresh_base = base_weights(fresh)
    saved = checkpoint_adapter(checkpoint)
    fresh_adapter = get_peft_model_state_dict(fresh)
    assert any(not torch.equal(fresh_adapter[k], saved[k]) for k in saved)
    snapshot = FirstStepSnapshot()
    resumed = Trainer(
        model=fresh, args=training_args(tmp_path / "resumed"), train_dataset=data, callbacks=[snapshot]
    )
    resumed_result = resumed.train(resume_from_checkpoint=str(checkpoint))

    # The first step of the resumed run is step 3, starting from exactly the checkpoint's adapter tensors.
    assert snapshot.global_step == 2
    for key, tensor in saved.items():
        assert torch.equal(snapshot.weights[key], tensor), key
    assert resumed_result.global_step == 4
    assert resumed.state.global_step == 4
    # Training proceeded: the adapter moved away from the checkpoint, the base did not move at all ...
    after = get_peft_model_state_dict(fresh)
    assert all(not torch.equal(after[k], saved[k]) for k in saved)
    assert_bit_identical(fresh_base, base_weights(fresh))
    # ... and it is the same run as the uninterrupted one: same data order, optimizer state and losses for steps 3
    # and 4, and the same final adapter (CPU, same process and thread count: the same ops in the same order, so
    # exactly equal).
    resumed_losses = step_losses(resumed.state.log_history)
    assert sorted(resumed_losses) == [1, 2, 3, 4]  # steps 1-2 come from the checkpoint's trainer_state.json
    for step in (3, 4):
        assert resumed_losses[step] == full_losses[step], step
    assert_adapter_equals_checkpoint(fresh, tmp_path / "full" / "checkpoint-4")


# ------------------------------------------------------------------- 2. best checkpoint and reloading a checkpoint


def test_trainer_load_best_model_at_end_and_checkpoint_reload(tmp_path):
    data = lm_dataset()
    model = wrapped_llama()
    base_before = base_weights(model)
    # Training and evaluating on the same data at a high learning rate, the eval loss falls, so with
    # greater_is_better=True the "best" checkpoint is the first one: loading it at the end is a real change.
    args = training_args(
        tmp_path,
        learning_rate=5e-2,
        eval_strategy="steps",
        eval_steps=2,
        per_device_eval_batch_size=8,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()

    evals = {entry["step"]: entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry}
    assert sorted(evals) == [2, 4]
    assert evals[4] < evals[2]
    best = tmp_path / "checkpoint-2"
    assert os.path.samefile(trainer.state.best_model_checkpoint, best)
    for folder in (best, tmp_path / "checkpoint-4"):
        files = set(os.listdir(folder))
        assert {"adapter_model.safetensors", "adapter_config.json"} <= files
        assert not files & {"model.safetensors", "pytorch_model.bin"}
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["peft_type"] == "SCALE"
        assert config["ffn_expansion"] == EXPANSION
    # The two checkpoints differ, and the model in memory is now the best one.
    last = checkpoint_adapter(tmp_path / "checkpoint-4")
    assert all(not torch.equal(tensor, last[k]) for k, tensor in checkpoint_adapter(best).items())
    assert_adapter_equals_checkpoint(trainer.model, best)
    assert_bit_identical(base_before, base_weights(trainer.model))

    # A checkpoint folder is a normal PEFT adapter: loading it onto a fresh base gives the trained model's logits.
    ids = random_ids(seed=7)
    trained = trainer.model.eval()
    with torch.no_grad():
        expected = trained(ids).logits
        reloaded = PeftModel.from_pretrained(tiny_llama(), best).eval()
        assert torch.equal(reloaded(ids).logits, expected)
        # and the trained adapter really changed the model (so the comparison above is not trivially base == base)
        assert not torch.allclose(tiny_llama()(ids).logits, expected, atol=1e-4)


# ----------------------------------------------------------------------------------------------- 3. TRL SFTTrainer


def test_trl_sft_trainer_trains_scale_adapter(tmp_path):
    from trl import SFTConfig, SFTTrainer

    tokenizer = word_tokenizer()
    assert len(tokenizer) == 128
    words = random_ids(batch=1, length=10, vocab=124, seed=3)[0].tolist()
    text = " ".join(f"w{i}" for i in words)
    # Every example is the same text, so the first batch is known whatever order the sampler draws: TRL's loss on it
    # can be checked against the base model's own loss.
    data = Dataset.from_dict({"text": [text] * 12})
    base = tiny_llama()
    base_before = base_weights(base)
    token_ids = torch.tensor([[4 + i for i in words] + [tokenizer.eos_token_id]])  # TRL appends the EOS token
    # SFTConfig's defaults train under bf16 autocast (also on CPU) with activation checkpointing; they are kept, so
    # the reference loss is the base model's under the same autocast.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        base_loss = base(input_ids=token_ids, labels=token_ids).loss.item()

    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        max_length=16,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=base, peft_config=ScaleConfig(ffn_expansion=EXPANSION), train_dataset=data, args=args,
        processing_class=tokenizer,
    )
    assert args.bf16 and args.gradient_checkpointing
    assert isinstance(trainer.model, PeftModel)
    assert trainer.model.peft_config["default"].peft_type == "SCALE"
    assert trainer.train_dataset[0]["input_ids"] == token_ids[0].tolist()
    assert sum(isinstance(m, ScaleLayer) for m in trainer.model.modules()) == 6
    # FFN mode leaves the LM head a plain Linear, which TRL's fused head requires.
    assert type(trainer.model.get_output_embeddings()) is torch.nn.Linear
    before = adapter_params(trainer.model)
    assert len(before) == 6

    result = trainer.train()
    assert result.global_step == 3
    losses = step_losses(trainer.state.log_history)
    assert sorted(losses) == [1, 2, 3]
    assert all(math.isfinite(loss) for loss in losses.values())
    # Step 1 runs the just-wrapped model through TRL's fused (tiled) LM head, which never calls the LM head module:
    # SCALE leaves the backbone's last hidden state unchanged at init, so this is the base model's loss up to the
    # fused head's own reduction order: bit-equal on the machine this was written on; 1.0e-7 relative on an AMD EPYC
    # without AVX512-BF16 (the same gap before and after the learned router landed, so not SCALE's); without
    # autocast the fused reduction differs from the HF loss by ~5e-7.
    assert losses[1] == pytest.approx(base_loss, rel=1e-6, abs=0)
    # Training on one repeated text lowers its loss.
    assert losses[3] < losses[1]
    after = adapter_params(trainer.model)
    for name, tensor in before.items():
        assert not torch.equal(after[name], tensor), f"{name} did not train"
    assert_bit_identical(base_before, base_weights(trainer.model))
    assert all(t.dtype == torch.float32 for t in after.values())


# ------------------------------------------------------------------------------------- 4. gradient checkpointing


def adapter_grads(use_reentrant=None):
    """Loss and adapter gradients of one forward/backward in train mode; counts forward calls of one ScaleLayer."""
    base = tiny_llama()
    if use_reentrant is not None:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    torch.manual_seed(5)
    model = get_peft_model(base, ScaleConfig(ffn_expansion=EXPANSION)).train()
    calls = []
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    assert isinstance(layer, ScaleLayer)
    # A pre-hook: non-reentrant checkpointing stops recomputing once the last saved tensor is rebuilt (inside this
    # layer), so a forward (post-)hook would not see the recomputation.
    handle = layer.register_forward_pre_hook(lambda *a: calls.append(1))
    ids = random_ids()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    handle.remove()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, len(calls), model


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_adapter_gradients(use_reentrant):
    loss, grads, calls, _ = adapter_grads()
    ckpt_loss, ckpt_grads, ckpt_calls, model = adapter_grads(use_reentrant)
    assert model.base_model.model.is_gradient_checkpointing
    # Checkpointing is really on: the MLP runs again in the backward pass.
    assert (calls, ckpt_calls) == (1, 2)
    assert grads.keys() == ckpt_grads.keys()
    assert len(grads) == 6 and all(name.rsplit(".", 2)[-2] in ADAPTER_SUFFIXES for name in grads)
    assert torch.equal(ckpt_loss, loss)
    for name, grad in grads.items():
        assert ckpt_grads[name] is not None, f"no gradient reached {name} under checkpointing"
        # The recomputation repeats the same ops on the same inputs: allclose, and measured exactly equal.
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=0, atol=1e-7)
        if "scale_w12" in name:
            # W12 is the only block with a gradient at step 0 (W21's gradient flows through W12, which is zero).
            assert grad.abs().max() > 0
        else:
            assert torch.count_nonzero(grad) == 0
    # The base stays frozen under checkpointing too.
    assert all(
        p.grad is None for n, p in model.named_parameters() if "scale_" not in n
    )


# ----------------------------------------------------------------------------------------------------- 5. bf16 base


def test_bf16_base_model_is_preserved_and_trains():
    base = tiny_llama().to(torch.bfloat16)
    ids = random_ids()
    with torch.no_grad():
        reference = base(ids).logits
    base_before = base_weights(base)
    model = get_peft_model(base, ScaleConfig(ffn_expansion=EXPANSION))
    # PEFT's default autocast_adapter_dtype=True keeps the new blocks in fp32 on a bf16 base.
    adapters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(adapters) == 6 and all(p.dtype == torch.float32 for p in adapters.values())
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if not p.requires_grad)
    with torch.no_grad():
        logits = model(ids).logits
    # Exactly the base model's bf16 logits, not just within bf16 rounding: the original slice runs the same bf16
    # ops on the same tensors, and the only extra term, W12 x_up, is an exact +0 (W12 == 0) added in bf16.
    assert logits.dtype == torch.bfloat16
    assert torch.equal(logits, reference)

    model.train()
    optimizer = torch.optim.AdamW(adapters.values(), lr=1e-2)
    losses = []
    for _ in range(2):  # two steps: W21 only gets a gradient once W12 has moved off zero
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        loss.backward()
        assert all(p.grad.dtype == torch.float32 for p in adapters.values())
        optimizer.step()
        optimizer.zero_grad()
    assert all(math.isfinite(loss) for loss in losses)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in adapters.values())
    assert_bit_identical(base_before, base_weights(model))
    assert all(t.dtype == torch.bfloat16 for t in base_weights(model).values())
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
    assert trained.dtype == torch.bfloat16
    assert torch.isfinite(trained).all()
    assert not torch.equal(trained, reference)
    # With the adapter disabled the model is the bf16 base model again, bit for bit.
    with model.disable_adapter(), torch.no_grad():
        assert torch.equal(model(ids).logits, reference)


# ------------------------------------------------------------------------------------------ 6. low_cpu_mem_usage


def trained_adapter(tmp_path):
    """A wrapped tiny Llama with random (non-initial) adapter values, saved to ``tmp_path``."""
    model = wrapped_llama()
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(tmp_path)
    return model.eval()


def test_low_cpu_mem_usage_from_pretrained_matches_normal_load(tmp_path):
    model = trained_adapter(tmp_path)
    ids = random_ids(seed=9)
    with torch.no_grad():
        expected = model(ids).logits
        normal = PeftModel.from_pretrained(tiny_llama(), tmp_path)
        low_mem = PeftModel.from_pretrained(tiny_llama(), tmp_path, low_cpu_mem_usage=True)
        assert all(p.device.type == "cpu" for p in low_mem.parameters())
        assert torch.equal(normal(ids).logits, expected)
        assert torch.equal(low_mem(ids).logits, expected)
        assert not torch.allclose(tiny_llama()(ids).logits, expected, atol=1e-3)
    for name, tensor in adapter_params(low_mem).items():
        assert torch.equal(tensor, adapter_params(normal)[name]), name


def test_low_cpu_mem_usage_get_peft_model_creates_meta_adapters_that_loading_fills(tmp_path):
    source = trained_adapter(tmp_path)
    ids = random_ids(seed=9)
    with torch.no_grad():
        expected = source(ids).logits
    state = get_peft_model_state_dict(source)
    assert len(state) == 6

    # As for LoRA: the adapter tensors are created on the meta device, the base model is untouched.
    empty = get_peft_model(tiny_llama(), ScaleConfig(ffn_expansion=EXPANSION), low_cpu_mem_usage=True)
    devices = {n: p.device.type for n, p in empty.named_parameters()}
    assert {d for n, d in devices.items() if "scale_" in n} == {"meta"}
    assert {d for n, d in devices.items() if "scale_" not in n} == {"cpu"}
    assert sum("scale_" in n for n in devices) == 6

    result = set_peft_model_state_dict(empty, state, low_cpu_mem_usage=True)
    assert result.unexpected_keys == []
    assert not [key for key in result.missing_keys if "scale_" in key]
    assert all(p.device.type == "cpu" for p in empty.parameters())
    assert sorted(n for n, p in empty.named_parameters() if p.requires_grad) == sorted(
        n for n in devices if "scale_" in n
    )
    with torch.no_grad():
        assert torch.equal(empty.eval()(ids).logits, expected)

    # The same through load_adapter from the saved folder.
    other = get_peft_model(tiny_llama(), ScaleConfig(ffn_expansion=EXPANSION), low_cpu_mem_usage=True)
    other.load_adapter(tmp_path, adapter_name="default", low_cpu_mem_usage=True)
    assert all(p.device.type == "cpu" for p in other.parameters())
    with torch.no_grad():
        assert torch.equal(other.eval()(ids).logits, expected)
