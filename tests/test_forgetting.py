"""The forgetting audit: ``peft_scale.forgetting`` and ``ForgettingCallback``."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from tiny_models import perturb_adapter, random_ids, tiny_llama
from transformers import Trainer, TrainerCallback, TrainingArguments
from datasets import Dataset

import peft_scale
from peft_scale import ForgettingCallback, ScaleConfig, forgetting

OLD = [random_ids(1, length, seed=10 + length)[0] for length in (5, 12, 9)]  # three old sequences, unequal lengths


def adapted(**config):
    base = tiny_llama()
    model = get_peft_model(copy.deepcopy(base), ScaleConfig(ffn_expansion=8, **config))
    return base, model


def by_hand(base, model, sequences):
    """(drift, perplexity ratio) computed one sequence at a time against a separate copy of the base model."""
    kl, nll_base, nll_model, positions, predicted = 0.0, 0.0, 0.0, 0, 0
    with torch.no_grad():
        for ids in sequences:
            p = F.log_softmax(base(input_ids=ids[None]).logits[0].double(), -1)
            q = F.log_softmax(model(input_ids=ids[None]).logits[0].double(), -1)
            kl += (p.exp() * (p - q)).sum().item()
            nll_base -= p[:-1].gather(-1, ids[1:, None]).sum().item()
            nll_model -= q[:-1].gather(-1, ids[1:, None]).sum().item()
            positions += len(ids)
            predicted += len(ids) - 1
    return kl / positions, math.exp((nll_model - nll_base) / predicted)


def test_a_new_adapter_has_not_forgotten_anything():
    _, model = adapted()
    report = forgetting(model, OLD)
    assert report.drift == pytest.approx(0.0, abs=1e-7)
    assert report.perplexity_ratio == pytest.approx(1.0, abs=1e-6)
    assert report.expansion_share is None  # not a routed adapter: every token reaches the expansion
    assert report.tokens == sum(len(ids) for ids in OLD)


def test_a_trained_adapter_matches_the_hand_computation_whatever_the_batching():
    base, model = adapted()
    perturb_adapter(model, scale=0.5)
    drift, ratio = by_hand(base, model.eval(), OLD)
    assert drift > 1e-3
    for batch_size in (1, 2, 8):  # padding inside a batch is not measured
        report = forgetting(model, OLD, batch_size=batch_size)
        assert report.drift == pytest.approx(drift, rel=1e-4)
        assert report.perplexity_ratio == pytest.approx(ratio, rel=1e-4)


def test_the_model_keeps_its_mode_and_its_adapter():
    _, model = adapted()
    perturb_adapter(model, scale=0.5)
    model.train()
    before = forgetting(model, OLD)
    assert model.training
    assert forgetting(model, OLD) == before  # the adapter is enabled again after the base pass


def routed_model(score_bias: float):
    """A routed adapter (moved away from zero) whose router sends every token to the base model (negative bias) or
    to the expansion (positive bias): its weights are zero, so its score is ``sigmoid(score_bias)``."""
    base, model = adapted(variant="route", preserve_layers=1)
    perturb_adapter(model, scale=0.5)
    router = model.base_model.scale_router["default"]
    router.fitted.fill_(1.0)
    router.b_out.fill_(score_bias)
    return base, model


def test_a_routed_adapter_that_sends_nothing_to_the_expansion_has_zero_drift():
    _, model = routed_model(-10.0)
    report = forgetting(model, OLD)
    assert report.expansion_share == 0.0
    assert report.drift == pytest.approx(0.0, abs=1e-7)
    assert report.perplexity_ratio == pytest.approx(1.0, abs=1e-6)


def test_a_routed_adapter_that_sends_everything_to_the_expansion_drifts_as_computed_by_hand():
    base, model = routed_model(10.0)
    report = forgetting(model, OLD, batch_size=2)
    drift, ratio = by_hand(base, model.eval(), OLD)
    assert report.expansion_share == 1.0
    assert drift > 1e-3
    assert report.drift == pytest.approx(drift, rel=1e-4)
    assert report.perplexity_ratio == pytest.approx(ratio, rel=1e-4)


class WordTokenizer:
    """A stand-in tokenizer: one id per character (mod the vocabulary), after a start token."""

    def __call__(self, text):
        return {"input_ids": [1] + [ord(c) % 128 for c in text]}


def test_old_data_as_strings_with_the_tokenizer_or_as_a_dataset():
    _, model = adapted()
    perturb_adapter(model, scale=0.5)
    texts = ["the old text", "more of it"]
    tokenizer = WordTokenizer()
    from_text = forgetting(model, texts, tokenizer=tokenizer)
    ids = [torch.tensor(tokenizer(t)["input_ids"]) for t in texts]
    assert from_text == forgetting(model, ids)
    assert forgetting(model, Dataset.from_dict({"input_ids": [i.tolist() for i in ids]})) == from_text


@pytest.mark.parametrize(
    "data, kwargs, error, message",
    [
        (["some text"], {}, ValueError, "pass the model's tokenizer"),
        ("some text", {}, TypeError, "old_data is a str"),
        ([torch.tensor([3])], {}, ValueError, "single token"),
        ([torch.tensor([3, 500])], {}, ValueError, "outside the model's vocabulary"),
        ([], {}, ValueError, "old_data is empty"),
    ],
)
def test_bad_old_data(data, kwargs, error, message):
    _, model = adapted()
    with pytest.raises(error, match=message):
        forgetting(model, data, **kwargs)


def test_a_model_that_is_not_a_peft_model_is_refused():
    with pytest.raises(TypeError, match="not a PEFT model"):
        forgetting(tiny_llama(), OLD)


@pytest.mark.parametrize("kwargs, message", [({"every": 0}, "integer >= 1"), ({"max_drift": -1.0}, ">= 0")])
def test_callback_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ForgettingCallback(OLD, **kwargs)


class LogRecorder(TrainerCallback):
    """Stands for a reporting integration (TensorBoard, W&B): keeps what each on_log hands it."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def train(tmp_path, callback, max_steps=4):
    _, model = adapted()
    data = Dataset.from_dict({"input_ids": [random_ids(1, 16, seed=s)[0].tolist() for s in range(16)]})
    data = data.map(lambda row: {"labels": row["input_ids"]})
    recorder = LogRecorder()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=100, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[recorder, callback])
    trainer.train()
    return model, trainer, recorder


def test_the_callback_logs_through_the_trainer_and_reaches_reporters_before_it(tmp_path):
    callback = ForgettingCallback(OLD, every=2)
    model, trainer, recorder = train(tmp_path, callback)
    assert [step for step, _ in callback.history] == [2, 4]
    final = callback.history[-1][1]
    assert final.drift > 0
    assert final == forgetting(model, OLD)  # the last measurement is the trained model's
    logged = [entry for entry in trainer.state.log_history if "forgetting/drift" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]
    assert logged[-1]["forgetting/drift"] == final.drift
    # the reporter was registered before the callback, and still got every measurement with its step's logs
    assert [entry["forgetting/drift"] for entry in recorder.logs if "forgetting/drift" in entry] == [
        report.drift for _, report in callback.history
    ]


def test_the_callback_stops_training_past_the_drift_budget(tmp_path):
    callback = ForgettingCallback(OLD, every=1, max_drift=0.0)
    _, trainer, _ = train(tmp_path, callback, max_steps=6)
    assert trainer.state.global_step == 1
    assert len(callback.history) == 1 and callback.history[0][1].drift > 0


def test_public_names():
    assert peft_scale.forgetting is forgetting
    assert peft_scale.ForgettingCallback is ForgettingCallback
