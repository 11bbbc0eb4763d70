"""Full-width SCALE (``hidden_expansion > 0``) in the workflows people run: saving and loading in a new process,
several adapters on one model, transformers' Trainer and TRL's SFTTrainer, generation with routing and the KV cache,
and the real SmolLM2-135M.

Tiny models: 4 decoder layers (hidden 32, 4 heads over 2 key-value heads, head_dim 8, so ``hidden_expansion`` comes
in multiples of 16), ``preserve_layers=2``, so the bottom half keeps ``W12`` closed and, for SCALE-Route, the top
half carries the frozen slice ``[x_pres; x; x_up]`` in eval mode."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    SENTENCE,
    adapter_params,
    assert_bit_identical,
    base_weights,
    run_in_fresh_process,
    step_losses,
    training_args,
    word_tokenizer,
)
from datasets import Dataset
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from tiny_models import perturb_adapter, random_ids, tiny_model
from transformers import Trainer

from peft_scale import ScaleConfig, ScaleLayer
from peft_scale.embedding import ScaleEmbedding
from peft_scale.norm import ScaleNorm

HIDDEN = 32
D_UP = 16  # one new key/value head and its 2 query heads (head_dim 8)
I_UP = 8
LAYERS = 4
PRESERVE = 2
VARIANTS = ("preserve", "adapt", "route")


# ----------------------------------------------------------------------------------------------------- helpers


def tiny_base(model_type: str = "llama", seed: int = 0):
    """A 4-layer tiny random model (hidden 32, 4 heads / 2 KV heads), in eval mode."""
    return tiny_model(model_type, seed=seed, num_hidden_layers=LAYERS)


def full_width_config(variant: str, **overrides) -> ScaleConfig:
    kwargs = dict(
        hidden_expansion=D_UP, ffn_expansion=I_UP, variant=variant, preserve_layers=PRESERVE, route_rule="cosine"
    )
    kwargs.update(overrides)
    return ScaleConfig(**kwargs)


def wrapped(variant: str, model_type: str = "llama", seed: int = 0, adapter_name: str = "default", **overrides):
    """(untouched copy of the base, full-width SCALE model in eval mode); the adapter's random init is seeded."""
    base = tiny_base(model_type, seed)
    reference = copy.deepcopy(base)
    torch.manual_seed(0)
    model = get_peft_model(base, full_width_config(variant, **overrides), adapter_name=adapter_name)
    return reference, model.eval()


def routing(model):
    return model.base_model.last_routing


def cosines(result) -> torch.Tensor:
    return F.cosine_similarity(result.preservation_logits.float(), result.adaptation_logits.float(), dim=-1)


def median_threshold(model, ids) -> float:
    """A threshold halfway between the two middle per-token cosines: about half the tokens route each way."""
    with torch.no_grad():
        model(ids)
    values = cosines(routing(model)).flatten().sort().values
    middle = values.numel() // 2
    assert values[middle - 1] < values[middle]
    return ((values[middle - 1] + values[middle]) / 2).item()


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The causal LM loss as transformers computes it (next-token cross-entropy, mean over tokens)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten()).item()


def scale_modules(model) -> list:
    return [m for m in model.modules() if isinstance(m, (ScaleLayer, ScaleNorm, ScaleEmbedding))]


def original_slices_equal_base(model, reference, ids, atol: float, final_norm: bool = True) -> None:
    """The hidden states the model reports (embedding output, each decoder layer's output, and the final norm's
    output, which ``hidden_states`` holds in place of the last layer's) hold the base model's in their first
    ``hidden`` features: the original slice, or in the routed layers of SCALE-Route in eval mode the preservation
    copy (``[x_pres; x; x_up]``, and ``[norm(x_pres); out]`` after the final norm). ``final_norm=False`` leaves out
    the final norm's output (without routing it is ``norm(x) + P rms(x_up) g_up``, which training changes)."""
    hidden = reference.config.hidden_size
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states
        base_states = reference(ids, output_hidden_states=True).hidden_states
    assert len(states) == len(base_states) == reference.config.num_hidden_layers + 1
    pairs = list(zip(states, base_states))
    for index, (state, base_state) in enumerate(pairs if final_norm else pairs[:-1]):
        diff = (state[..., :hidden] - base_state).abs().max().item()
        assert diff <= atol, f"hidden state {index}: original slice differs from the base model's by {diff}"


# ----------------------------------------------------------------------------- 1. save / load in a fresh process

SAVE_LOAD_CASES = [
    ("llama", "preserve"),
    ("llama", "adapt"),
    ("llama", "route"),
    ("mistral", "adapt"),
    ("qwen2", "preserve"),
    ("qwen3", "route"),
]


def test_full_width_adapters_save_and_load_in_a_fresh_process(tmp_path):
    """Each variant, perturbed (a stand-in for training), saved here and loaded with ``PeftModel.from_pretrained``
    in a new process after ``import peft_scale``: the same logits, bit for bit; for SCALE-Route also the same
    preservation logits (the base model's) and routing mask, under the threshold stored in the adapter config."""
    ids = random_ids(seed=5)
    for model_type, variant in SAVE_LOAD_CASES:
        name = f"{model_type}-{variant}"
        reference, model = wrapped(variant, model_type, seed=3)
        perturb_adapter(model)
        expected = {}
        if variant == "route":
            # A threshold that sends about half the tokens each way, saved with the adapter: a loaded model that
            # ignored it would route differently (the perturbed heads' cosines are all below the default 0.5 here).
            model.peft_config["default"].route_threshold = median_threshold(model, ids)
        with torch.no_grad():
            expected["logits"] = model(ids).logits
            base_logits = reference(ids).logits
        # The adapter really changes the model, so agreeing below can only come from loading it.
        assert (expected["logits"] - base_logits).abs().max() > 1e-2, name
        if variant == "route":
            result = routing(model)
            expected["preservation"] = result.preservation_logits
            expected["mask"] = result.to_preservation
            assert torch.equal(result.preservation_logits, base_logits), name
            assert 0 < result.to_preservation.sum() < result.to_preservation.numel(), name
            assert torch.equal(
                expected["logits"],
                torch.where(result.to_preservation[..., None], result.preservation_logits, result.adaptation_logits),
            )
        model.save_pretrained(tmp_path / name)
        torch.save(expected, tmp_path / name / "expected.pt")
        saved = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert (saved["peft_type"], saved["hidden_expansion"], saved["ffn_expansion"]) == ("SCALE", D_UP, I_UP)
        assert (saved["variant"], saved["preserve_layers"]) == (variant, PRESERVE)
        assert saved["route_threshold"] == model.peft_config["default"].route_threshold

    out = run_in_fresh_process(
        f"""
import json, torch, peft_scale
from peft import PeftModel
from tiny_models import random_ids, tiny_model
ids = random_ids(seed=5)
for model_type, variant in {SAVE_LOAD_CASES!r}:
    folder = {str(tmp_path)!r} + f"/{{model_type}}-{{variant}}"
    expected = torch.load(folder + "/expected.pt")
    base = tiny_model(model_type, seed=3, num_hidden_layers={LAYERS})
    with torch.no_grad():
        base_logits = base(ids).logits
    model = PeftModel.from_pretrained(base, folder).eval()
    with torch.no_grad():
        logits = model(ids).logits
    report = {{"case": f"{{model_type}}-{{variant}}", "logits": (logits - expected["logits"]).abs().max().item()}}
    if variant == "route":
        result = model.base_model.last_routing
        report["preservation"] = (result.preservation_logits - expected["preservation"]).abs().max().item()
        report["preservation_vs_base"] = (result.preservation_logits - base_logits).abs().max().item()
        report["mask_equal"] = torch.equal(result.to_preservation, expected["mask"])
    print(json.dumps(report))
"""
    )
    reports = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["case"] for r in reports] == [f"{m}-{v}" for m, v in SAVE_LOAD_CASES]
    for report in reports:
        assert report["logits"] == 0.0, report
        if report["case"].endswith("route"):
            assert report["preservation"] == 0.0 and report["preservation_vs_base"] == 0.0, report
            assert report["mask_equal"] is True, report


# ------------------------------------------------------------------------------------------ 2. several adapters


def two_adapter_model():
    """A tiny Llama with two perturbed full-width adapters, "pres" (preserve, active) and "adapt" (adapt); and for
    each, a single-adapter model holding the same tensors, the reference for what that adapter computes."""
    reference, model = wrapped("preserve", adapter_name="pres")
    torch.manual_seed(1)
    model.add_adapter("adapt", full_width_config("adapt"))
    model.eval()
    perturb_adapter(model, "pres", seed=0)
    perturb_adapter(model, "adapt", seed=1)
    singles = {}
    for name, variant in (("pres", "preserve"), ("adapt", "adapt")):
        _, single = wrapped(variant, adapter_name=name)
        state = get_peft_model_state_dict(model, adapter_name=name)
        result = set_peft_model_state_dict(single, state, adapter_name=name)
        assert result.unexpected_keys == [] and not [k for k in result.missing_keys if "scale_" in k]
        singles[name] = single.eval()
    return reference, model, singles


def test_set_adapter_switches_between_two_full_width_adapters():
    reference, model, singles = two_adapter_model()
    ids = random_ids()
    with torch.no_grad():
        base_logits = reference(ids).logits
        expected = {name: single(ids).logits for name, single in singles.items()}
    # The two adapters compute different things, and both differ from the base model.
    assert (expected["pres"] - expected["adapt"]).abs().max() > 1e-2
    assert min((e - base_logits).abs().max() for e in expected.values()) > 1e-2
    assert model.active_adapters == ["pres"]
    for name in ("adapt", "pres", "adapt"):
        model.set_adapter(name)
        assert model.active_adapters == [name]
        # Every widened module (linear layers, norms, embedding) switched: only this adapter is active and trainable.
        modules = scale_modules(model)
        assert len(modules) == 1 + LAYERS * (7 + 2) + 1
        stale = sorted({type(m).__name__ for m in modules if m.active_adapters != [name]})
        assert not stale, f"set_adapter({name!r}) left {stale} on another adapter"
        trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {name}
        with torch.no_grad():
            logits = model(ids).logits
        # Exactly what a model holding this adapter alone computes.
        assert torch.equal(logits, expected[name]), name


def test_disable_adapter_with_two_full_width_adapters_gives_the_base_model():
    reference, model, _ = two_adapter_model()
    ids = random_ids()
    with torch.no_grad():
        base_logits = reference(ids).logits
        base_states = reference(ids, output_hidden_states=True).hidden_states
        adapted = model(ids).logits
        assert (adapted - base_logits).abs().max() > 1e-2
        with model.disable_adapter():
            out = model(ids, output_hidden_states=True)
        # The base model bit for bit, at the base width everywhere.
        assert torch.equal(out.logits, base_logits)
        assert all(s.shape[-1] == HIDDEN and torch.equal(s, b) for s, b in zip(out.hidden_states, base_states))
        assert torch.equal(model(ids).logits, adapted)  # enabled again


def test_delete_adapter_removes_a_full_width_adapter_everywhere():
    reference, model, singles = two_adapter_model()
    ids = random_ids()
    with torch.no_grad():
        expected = singles["adapt"](ids).logits
    model.set_adapter("adapt")
    model.delete_adapter("pres")
    assert list(model.peft_config) == ["adapt"]
    assert model.active_adapters == ["adapt"]
    # No tensor of the deleted adapter is left in any widened module (norms and embedding included).
    left = sorted(n for n, _ in model.named_parameters() if n.endswith(".pres"))
    assert not left, f"{len(left)} tensors of the deleted adapter remain, e.g. {left[:3]}"
    assert all("pres" not in m.active_adapters for m in scale_modules(model))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)
        with model.disable_adapter():
            assert torch.equal(model(ids).logits, reference(ids).logits)
    assert set(get_peft_model_state_dict(model, adapter_name="adapt")) == set(
        get_peft_model_state_dict(singles["adapt"], adapter_name="adapt")
    )


def test_route_adapter_next_to_a_preserve_adapter():
    """Switching between a preserve adapter and a route adapter: the route adapter routes (its preservation logits
    are the base model's), the preserve adapter computes what it computes alone, and deleting the route adapter
    removes its LM-head hooks."""
    reference, model = wrapped("preserve", adapter_name="pres")
    torch.manual_seed(1)
    model.add_adapter("route", full_width_config("route"))
    model.eval()
    perturb_adapter(model, "pres", seed=0)
    perturb_adapter(model, "route", seed=1)
    ids = random_ids()
    with torch.no_grad():
        base_logits = reference(ids).logits
        pres_logits = model(ids).logits
        assert routing(model) is None
        model.set_adapter("route")
        routed = model(ids).logits
        result = routing(model)
        assert result is not None
        assert torch.equal(result.preservation_logits, base_logits)
        assert (result.adaptation_logits - base_logits).abs().max() > 1e-2
        assert torch.equal(
            routed, torch.where(result.to_preservation[..., None], result.preservation_logits, result.adaptation_logits)
        )
        model.set_adapter("pres")
        assert torch.equal(model(ids).logits, pres_logits)
        model.delete_adapter("route")
        head = model.base_model.model.lm_head
        assert not head._forward_pre_hooks and not head._forward_hooks
        assert model.active_adapters == ["pres"]
        assert torch.equal(model(ids).logits, pres_logits)


# ----------------------------------------------------------------------------------- 3. Trainer with SCALE-Route


def test_trainer_trains_route_on_the_adaptation_head_and_keeps_the_preservation_path(tmp_path):
    sequence = random_ids(batch=1, length=12, seed=11)[0].tolist()
    # One sequence repeated: every batch is the same, so each logged loss is that of a known batch.
    data = Dataset.from_dict({"input_ids": [sequence] * 16, "labels": [sequence] * 16})
    batch = torch.tensor([sequence] * 4)
    reference, model = wrapped("route")
    model.train()
    base_before = base_weights(model)
    before = adapter_params(model)
    # lr 3e-3 (not the 1e-2 of training_args): on one repeated batch each step then lowers the loss.
    trainer = Trainer(model=model, args=training_args(tmp_path, learning_rate=3e-3), train_dataset=data)
    result = trainer.train()
    assert result.global_step == 4
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-4"]
    config = json.loads((tmp_path / "checkpoint-4" / "adapter_config.json").read_text())
    assert (config["variant"], config["hidden_expansion"], config["route_in_training"]) == ("route", D_UP, False)

    # In training the model never routed: the LM head saw the base width and the adaptation head alone.
    assert routing(model) is None
    losses = step_losses(trainer.state.log_history)
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
    with torch.no_grad():
        base_loss = lm_loss(reference(batch).logits, batch)
    assert abs(losses[1] - base_loss) <= 1e-6  # at init both heads are the base model's (measured equal)
    assert losses[1] > losses[2] > losses[3] > losses[4]
    # Step 3 ran on the state saved in checkpoint-2: its loss is the adaptation head's there, not the routed one's.
    at_2 = PeftModel.from_pretrained(tiny_base(), tmp_path / "checkpoint-2").eval()
    with torch.no_grad():
        routed_logits = at_2(batch).logits
    mid = routing(at_2)
    adaptation_loss = lm_loss(mid.adaptation_logits, batch)
    routed_loss = lm_loss(routed_logits, batch)
    assert mid.to_preservation.any()  # routing would change the loss ...
    assert abs(routed_loss - adaptation_loss) > 1e-2
    assert abs(losses[3] - adaptation_loss) <= 1e-6  # ... but training used the adaptation head (measured equal)

    # Every adapter tensor trained, no base weight moved.
    after = adapter_params(model)
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert not torch.equal(after[name], tensor), f"{name} did not train"
    assert_bit_identical(base_before, base_weights(model))

    # In eval mode: the checkpoint reproduces the trained model; the preservation head and the frozen slice in
    # every layer are still the base model's.
    model.eval()
    ids = random_ids(seed=7)
    with torch.no_grad():
        logits = model(ids).logits
        trained = routing(model)
        base_logits = reference(ids).logits
        reloaded = PeftModel.from_pretrained(tiny_base(), tmp_path / "checkpoint-4").eval()
        assert torch.equal(reloaded(ids).logits, logits)
        assert torch.equal(routing(reloaded).preservation_logits, trained.preservation_logits)
    assert (trained.adaptation_logits - base_logits).abs().max() > 1e-2
    assert (trained.preservation_logits - base_logits).abs().max() <= 1e-5
    original_slices_equal_base(model, reference, ids, atol=1e-5)


# -------------------------------------------------------------------------------------------- 4. TRL SFTTrainer


def sft_text():
    """A 10-word text of the word-level tokenizer's vocabulary, and a data set of 12 copies of it."""
    words = random_ids(batch=1, length=10, vocab=124, seed=3)[0].tolist()
    return words, Dataset.from_dict({"text": [" ".join(f"w{i}" for i in words)] * 12})


def sft_args(output_dir, **overrides):
    from trl import SFTConfig

    kwargs = dict(
        output_dir=str(output_dir),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=3e-3,  # small enough that each step on the one repeated text lowers its loss
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        max_length=16,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


@pytest.mark.parametrize("variant", ["preserve", "route"])
def test_trl_sft_trainer_trains_a_full_width_adapter(tmp_path, variant):
    from trl import SFTTrainer
    from trl.trainer.utils import add_fused_lm_head

    tokenizer = word_tokenizer()
    words, data = sft_text()
    base = tiny_base()
    reference = copy.deepcopy(base)
    base_before = base_weights(base)
    # Every example is the same text, so each batch is four copies of it (TRL appends the EOS token). The step-1
    # reference is the base model's loss through TRL's own fused LM head, under the bf16 autocast SFTConfig trains in
    # by default (the fused reduction differs from transformers' loss by ~5e-7 on this model).
    token_ids = torch.tensor([[4 + i for i in words] + [tokenizer.eos_token_id]] * 4)
    fused_base = copy.deepcopy(base).train()
    add_fused_lm_head(fused_base, outputs=("log_probs", "entropy", "is_top1"))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        base_loss = fused_base(input_ids=token_ids, labels=token_ids, fused_lm_head=True).loss.item()
    args = sft_args(tmp_path)
    torch.manual_seed(0)
    config = ScaleConfig(hidden_expansion=D_UP, ffn_expansion=I_UP, variant=variant, route_rule="cosine")
    trainer = SFTTrainer(model=base, peft_config=config, train_dataset=data, args=args, processing_class=tokenizer)
    model = trainer.model
    assert isinstance(model, PeftModel)
    assert args.bf16 and args.gradient_checkpointing
    assert trainer.train_dataset[0]["input_ids"] == token_ids[0].tolist()
    assert model.peft_config["default"].hidden_expansion == D_UP
    assert model.peft_config["default"].variant == variant
    # The widened modules are the embedding, 7 linear layers and 2 norms per layer, and the final norm; the LM head
    # stays a plain Linear, which TRL's fused LM head requires.
    assert len(scale_modules(model)) == 1 + LAYERS * 9 + 1
    assert type(model.get_output_embeddings()) is torch.nn.Linear
    before = adapter_params(model)

    result = trainer.train()
    assert result.global_step == 3
    losses = step_losses(trainer.state.log_history)
    assert sorted(losses) == [1, 2, 3]
    assert all(math.isfinite(loss) for loss in losses.values())
    # Step 1 ran the just-wrapped model: the final norm hands TRL's fused head norm(x) + P rms(x_up) g_up with P = 0,
    # exactly the base model's last hidden state, so the loss is the base model's bit for bit.
    assert losses[1] == base_loss
    assert losses[1] > losses[2] > losses[3]
    assert routing(model) is None  # route trained on the adaptation head: nothing was routed in training
    after = adapter_params(model)
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert not torch.equal(after[name], tensor), f"{name} did not train"
    assert all(t.dtype == torch.float32 for t in after.values())
    assert_bit_identical(base_before, base_weights(model))
    assert type(model.get_output_embeddings()) is torch.nn.Linear

    # After training, in eval mode and in fp32 (accelerate left the forward under bf16 autocast: unwrap it): the
    # adapted logits moved, the original computation did not.
    model = trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False).eval()
    ids = random_ids(seed=7)
    with torch.no_grad():
        logits = model(ids).logits
        base_logits = reference(ids).logits
    assert logits.dtype == torch.float32
    if variant == "route":
        result = routing(model)
        assert (result.adaptation_logits - base_logits).abs().max() > 1e-2
        assert (result.preservation_logits - base_logits).abs().max() <= 1e-5
    else:
        assert (logits - base_logits).abs().max() > 1e-2
    # Every layer's original slice (route: the frozen slice, and the final norm's norm(x_pres)) is the base's.
    original_slices_equal_base(model, reference, ids, atol=1e-5, final_norm=variant == "route")


@pytest.mark.parametrize("variant", ["preserve", "route"])
def test_trl_sft_trainer_evaluates_a_full_width_adapter(tmp_path, variant):
    """SFTTrainer's evaluation runs the model in eval mode, through TRL's fused LM head like training. At init the
    eval loss is the base model's, bit for bit (both of route's heads are the base model's then, so this holds
    whichever head the evaluation scores), and evaluating during training works."""
    from trl import SFTTrainer

    tokenizer = word_tokenizer()
    _, data = sft_text()
    plain = SFTTrainer(
        model=tiny_base(), train_dataset=data, eval_dataset=data, args=sft_args(tmp_path / "base"),
        processing_class=tokenizer,
    )
    base_loss = plain.evaluate()["eval_loss"]
    assert math.isfinite(base_loss)
    args = sft_args(tmp_path / "scale", max_steps=2, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4)
    torch.manual_seed(0)
    config = ScaleConfig(hidden_expansion=D_UP, ffn_expansion=I_UP, variant=variant, route_rule="cosine")
    trainer = SFTTrainer(
        model=tiny_base(), peft_config=config, train_dataset=data, eval_dataset=data, args=args,
        processing_class=tokenizer,
    )
    assert trainer.evaluate()["eval_loss"] == base_loss
    trainer.train()
    evals = {entry["step"]: entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry}
    assert sorted(evals) == [1, 2] and all(math.isfinite(v) for v in evals.values())


# -------------------------------------------------------------------------------- 5. generation with SCALE-Route


def greedy(model, ids, use_cache: bool) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, use_cache=use_cache
        )
    assert out.shape == (ids.shape[0], ids.shape[1] + 6)
    assert torch.equal(out[:, : ids.shape[1]], ids)
    return out


def test_generate_with_routing_and_the_kv_cache():
    reference, model = wrapped("route")
    perturb_adapter(model)
    ids = random_ids(batch=2, length=8, seed=4)
    base_tokens = greedy(reference, ids, use_cache=True)
    assert torch.equal(greedy(reference, ids, use_cache=False), base_tokens)

    # tau = 0.5: the cache (which holds the frozen slice's keys and values too) changes nothing.
    with_cache = greedy(model, ids, use_cache=True)
    assert torch.equal(greedy(model, ids, use_cache=False), with_cache)
    assert not torch.equal(with_cache, base_tokens)  # the adapter changes the greedy continuation

    # A threshold that splits the prompt's tokens between the heads: generation mixes both, with or without cache.
    model.peft_config["default"].route_threshold = median_threshold(model, ids)
    with_cache = greedy(model, ids, use_cache=True)
    assert torch.equal(greedy(model, ids, use_cache=False), with_cache)
    with torch.no_grad():
        model(with_cache)  # (generate computes the logits of the last position only)
    mask = routing(model).to_preservation
    assert mask.shape == (2, ids.shape[1] + 6) and 0 < mask.sum() < mask.numel()

    # tau = -1: every token takes the preservation head, i.e. exactly the base model's greedy continuation.
    model.peft_config["default"].route_threshold = -1.0
    for use_cache in (True, False):
        assert torch.equal(greedy(model, ids, use_cache=use_cache), base_tokens), use_cache
    assert routing(model).to_preservation.all()

    # tau = 2: no token takes the preservation head, i.e. the SCALE-Adapt model with the same tensors.
    model.peft_config["default"].route_threshold = 2.0
    _, adapt = wrapped("adapt")
    loaded = set_peft_model_state_dict(adapt, get_peft_model_state_dict(model))
    assert loaded.unexpected_keys == []
    adapt_tokens = greedy(adapt.eval(), ids, use_cache=True)
    for use_cache in (True, False):
        assert torch.equal(greedy(model, ids, use_cache=use_cache), adapt_tokens), use_cache
    assert not routing(model).to_preservation.any()


# ------------------------------------------------------------------------------------- 6. the real SmolLM2-135M

SMOL_HIDDEN, SMOL_LAYERS, SMOL_PRESERVE = 576, 30, 20


@pytest.fixture(scope="module")
def smol_ids(smollm2):
    """32 tokens of a real English Wikipedia summary to train on, and a different sentence to evaluate on."""
    from bundled import wiki_summaries

    _, tokenizer = smollm2
    text = next(t for t in wiki_summaries("en") if t.startswith("Mount Everest is the highest mountain"))
    train = tokenizer(text, return_tensors="pt").input_ids[:, :32]
    evaluate = tokenizer(SENTENCE, return_tensors="pt").input_ids
    assert train.shape == (1, 32) and evaluate.shape[0] == 1
    return train, evaluate


@pytest.fixture(scope="module")
def smol_base(smollm2, smol_ids):
    """The base model's logits and hidden states on the evaluation sentence."""
    model, _ = smollm2
    with torch.no_grad():
        out = model(smol_ids[1], output_hidden_states=True)
    return out.logits, out.hidden_states


def last_layer_output(model, ids) -> torch.Tensor:
    """The output of the last decoder layer (``hidden_states`` reports the final norm's output in its place)."""
    layers = model.get_base_model().model.layers
    captured = []
    handle = layers[-1].register_forward_hook(
        lambda module, args, output: captured.append(output[0] if isinstance(output, tuple) else output)
    )
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    return captured[0]


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_smollm2_full_width_keeps_the_base_model(smollm2, smol_ids, smol_base, variant):
    base, _ = smollm2
    train_ids, ids = smol_ids
    base_logits, base_states = smol_base
    config = ScaleConfig(
        hidden_expansion=192, ffn_expansion=64, variant=variant, preserve_layers=SMOL_PRESERVE, route_rule="cosine"
    )
    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(base), config)

    # At init the wrapped model computes the base model's logits (for route: both heads, and the routed output).
    model.eval()
    with torch.no_grad():
        init_logits = model(ids).logits
    assert (init_logits - base_logits).abs().max().item() <= 1e-6
    assert torch.equal(init_logits, base_logits)  # measured bit-identical: W12 = 0 and P = 0 add exact zeros
    if variant == "route":
        assert (routing(model).adaptation_logits - base_logits).abs().max().item() <= 1e-6
        assert routing(model).to_preservation.all()

    # Two AdamW steps on the real text.
    adapters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(adapters, lr=1e-3)
    model.train()
    losses = []
    for _ in range(2):
        loss = model(input_ids=train_ids, labels=train_ids).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(math.isfinite(v) for v in losses)
    assert losses[1] < losses[0]  # measured 3.31 -> 1.86 (preserve), 1.18 (adapt, route)
    model.eval()

    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == SMOL_LAYERS + 1
    if variant == "preserve":
        # The new features reach the logits (through P) ...
        assert (out.logits - base_logits).abs().max().item() > 1e-3
        # ... while every decoder layer's original slice, and the preservation logits W_out norm(x), are the base's.
        for index in range(SMOL_LAYERS):
            assert (out.hidden_states[index][..., :SMOL_HIDDEN] - base_states[index]).abs().max().item() <= 1e-5, index
        h_last = last_layer_output(model, ids)
        assert h_last.shape[-1] == SMOL_HIDDEN + 192
        with torch.no_grad():
            preservation = base.lm_head(base.model.norm(h_last[..., :SMOL_HIDDEN]))
        assert (preservation - base_logits).abs().max().item() <= 1e-5
    elif variant == "route":
        result = routing(model)
        assert (result.adaptation_logits - base_logits).abs().max().item() > 1e-3
        assert (result.preservation_logits - base_logits).abs().max().item() <= 1e-5
        assert 0 < result.to_preservation.sum() < result.to_preservation.numel()  # measured 15 of 19 tokens
        assert torch.equal(
            out.logits,
            torch.where(result.to_preservation[..., None], result.preservation_logits, result.adaptation_logits),
        )
        # every hidden state's first 576 features: the original slice below layer 20, the frozen slice above
        for index, (state, base_state) in enumerate(zip(out.hidden_states, base_states)):
            assert (state[..., :SMOL_HIDDEN] - base_state).abs().max().item() <= 1e-5, index
        assert out.hidden_states[SMOL_PRESERVE + 1].shape[-1] == 2 * SMOL_HIDDEN + 192
    else:
        # Adapt: below preserve_layers no W12 exists, so the hidden states there are the base model's exactly;
        # from layer 20 on the trained W12 change the original slice.
        for index in range(SMOL_PRESERVE + 1):  # the embedding output and the outputs of layers 0..19
            assert torch.equal(out.hidden_states[index][..., :SMOL_HIDDEN], base_states[index]), index
        first_open = out.hidden_states[SMOL_PRESERVE + 1][..., :SMOL_HIDDEN]  # the output of layer 20
        assert (first_open - base_states[SMOL_PRESERVE + 1]).abs().max().item() > 1e-4  # measured 2.6
        assert (out.logits - base_logits).abs().max().item() > 1e-3
