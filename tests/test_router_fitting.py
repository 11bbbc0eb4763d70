"""``peft_scale.router_fitting``: ``fit_router`` (data forms, the old side sampled from the base model, the
calibration of the threshold, the report, every bad call), ``BaseModelSamples`` and ``RouterFitCallback`` with the
Trainer and TRL.

The setting (``conftest.py``): the tiny Llama that speaks the old domain (ids 4-63), the new domain ids 64-127.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import (
    MODES, NEW, OLD, PRESERVE, SMOOTHING, calibrate_on, domain_ids, fitted, routed, routed_share, scale_parameters,
)  # fmt: skip
from datasets import Dataset
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

import peft_scale
from peft_scale import BaseModelSamples, RouterConfig, RouterFitCallback, ScaleConfig, fit_router
from peft_scale.router_fitting import cut_like_new_data


@pytest.mark.parametrize("mode", list(MODES))
def test_fit_router_with_old_data_separates_the_domains(old_speaker, mode):
    _, model, report = fitted(old_speaker, mode)
    assert report.old_source == "old data"
    assert report.old_to_base >= 0.99 and report.new_to_expansion >= 0.99, report
    assert report.threshold >= 0.5
    assert report.held_out_tokens["old"] > 0 and report.tokens["old"] == 64 * 48
    assert model.peft_config["default"].router_report["old_to_base"] == round(report.old_to_base, 4)
    assert "held-out old tokens routed to the base model" in str(report)
    assert "own samples" not in str(report)
    # one routed adapter: no other router to claim its tokens (tests/test_several_routed_adapters.py: several)
    assert report.claimed_by_other_adapters == {} and "claimed by other adapters" not in str(report)


def test_fit_router_without_old_data_samples_the_base_model(old_speaker):
    _, model = routed(old_speaker)
    # 128 samples: the new data are windows (they never start with <s>), so each sample loses 1 to 6 of its 24
    # first tokens, and a window's first tokens have little context to be told apart by (64 samples: 98.1% new)
    report = fit_router(model, domain_ids(NEW, seed=1), BaseModelSamples(count=128, length=24), progress=False)
    assert report.old_source == "base model samples"
    assert report.format_split == {} and "format (" not in str(report)  # sample_format="new_data" only
    assert 128 * 18 <= report.tokens["old"] <= 128 * 23
    assert report.old_to_base >= 0.99 and report.new_to_expansion >= 0.99, report
    assert "measured on the base model's own samples, not on the old task's text" in str(report)


def test_samples_are_cut_like_the_new_data():
    prompts = torch.tensor([[1]])
    samples = [torch.cat([torch.ones(1, dtype=torch.long), torch.arange(10 + i, 33 + i)]) for i in range(8)]  # 24 long
    windows = [torch.arange(64, 80)] * 4
    cut = cut_like_new_data(samples, windows, prompts, seed=0)
    assert all(1 <= 24 - len(c) <= 6 and int(c[0]) != 1 for c in cut)
    assert all(torch.equal(c, s[24 - len(c) :]) for c, s in zip(cut, samples))
    assert len({len(c) for c in cut}) > 1  # a random cut per sample
    starting = [torch.cat([torch.ones(1, dtype=torch.long), w]) for w in windows]  # new data that starts with <s>
    assert cut_like_new_data(samples, starting, prompts, seed=0) is samples


def test_the_kept_router_is_refitted_on_every_sequence(old_speaker):
    """Overlapping domains (ids 34-63 in both), so the router is imperfect and where it was fitted shows."""
    _, model = routed(old_speaker)
    new, old = domain_ids((34, 94), seed=1), domain_ids(OLD, seed=2)
    report = fit_router(model, new, old, progress=False)
    assert report.calibrate_on == "held_out"
    # the adapter routes all of the data given exactly as the report's fitted shares say
    assert routed_share(model, new) == pytest.approx(report.fitted_new_to_expansion, abs=2e-3)
    assert 1 - routed_share(model, old) == pytest.approx(report.fitted_old_to_base, abs=2e-3)
    # and it saw every sequence: it routes the new data better than a router that held some out did on those
    assert report.fitted_new_to_expansion > report.new_to_expansion
    assert "refitted on all sequences" in str(report)
    assert model.peft_config["default"].router_report["fitted_new_to_expansion"] == round(
        report.fitted_new_to_expansion, 4
    )


def test_calibrating_on_the_fitted_old_data_keeps_exactly_that_data(old_speaker):
    _, model = routed(old_speaker)
    new, old = domain_ids((34, 94), seed=1), domain_ids(OLD, seed=2)
    held_out = fit_router(model, new, old, progress=False)
    fitted_rule = fit_router(calibrate_on(model, "fitted"), new, old, progress=False)
    assert fitted_rule.calibrate_on == "fitted" and model.peft_config["default"].router_report["calibrate_on"] == "fitted"
    assert fitted_rule.threshold < held_out.threshold
    assert routed_share(model, old) <= 0.01 + 2e-3  # at most max_old_error of the given old tokens
    assert fitted_rule.fitted_new_to_expansion > held_out.fitted_new_to_expansion
    with pytest.raises(ValueError, match="calibrate_on='all'.*'held_out'"):
        RouterConfig(calibrate_on="all")


def test_cross_fitted_calibration_reads_the_bound_off_every_old_sequence(old_speaker):
    _, model = routed(old_speaker)
    new, old = domain_ids((34, 94), seed=1), domain_ids(OLD, seed=2)
    held_out = fit_router(model, new, old, progress=False)
    cross = fit_router(calibrate_on(model, "cross_fitted"), new, old, progress=False)
    assert cross.calibrate_on == "cross_fitted"
    assert model.peft_config["default"].router_report["calibrate_on"] == "cross_fitted"
    fitted = fit_router(calibrate_on(model, "fitted"), new, old, progress=False)
    # the tail is read off every old token (each scored by a router that did not see its sequence), not a fifth
    assert cross.calibration_tokens == cross.tokens["old"] == fitted.calibration_tokens
    assert held_out.calibration_tokens < cross.tokens["old"] / 4
    assert cross.calibration_old_to_base >= 1 - 0.01  # at most max_old_error of those scores reach the threshold
    # out of fold the old tokens score higher than in the sample the kept router was fitted on (overlapping
    # domains: ids 34-63 in both), so the bound sits above the one set on the fitted data
    assert cross.threshold > fitted.threshold
    assert f"threshold set on {cross.tokens['old']:,} cross-fitted old tokens" in str(cross)
    # the same data and seed: the same threshold, and the kept router is the one the other calibrations keep
    assert fit_router(calibrate_on(model, "cross_fitted"), new, old, progress=False).threshold == cross.threshold
    assert cross.fitted_new_to_expansion >= 0 and cross.held_out_tokens == held_out.held_out_tokens
    with pytest.raises(ValueError, match="old side has 4 sequence.*each of the 5 folds.*calibrate_on='held_out'"):
        fit_router(model, new, old[:4], progress=False)
    with pytest.raises(ValueError, match="'cross_fitted'"):
        RouterConfig(calibrate_on="crossfit")


def test_fit_router_accepts_datasets_and_lists_of_dicts(old_speaker):
    new, old = domain_ids(NEW, seed=1), domain_ids(OLD, seed=2)
    _, model = routed(old_speaker)
    from_tensor = fit_router(model, new, old, progress=False)
    as_dataset = fit_router(model, Dataset.from_dict({"input_ids": new.tolist()}), [{"input_ids": r} for r in old])
    as_rows = fit_router(model, list(new), [r.tolist() for r in old])  # lists of 1-D sequences (tensors, lists)
    for report in (as_dataset, as_rows):
        assert (report.old_to_base, report.new_to_expansion, report.threshold) == (
            from_tensor.old_to_base, from_tensor.new_to_expansion, from_tensor.threshold,
        )
    # padding marked by an attention mask is not a token
    padded = [{"input_ids": list(r) + [0] * 4, "attention_mask": [1] * len(r) + [0] * 4} for r in new.tolist()]
    assert fit_router(model, padded, old).tokens["new"] == new.numel()


def test_the_threshold_leans_towards_the_base_model(old_speaker):
    """With overlapping domains, a smaller allowed share of old tokens in the expansion raises the threshold."""
    _, model = routed(old_speaker)
    new = domain_ids((34, 94), seed=1)  # shares ids 34-63 with the old domain
    old = domain_ids(OLD, seed=2)
    loose = fit_router(model, new, old, max_old_error=0.2, progress=False)
    strict = fit_router(model, new, old, max_old_error=0.01, progress=False)
    assert strict.threshold > loose.threshold
    assert strict.calibration_old_to_base >= 0.99 > loose.calibration_old_to_base
    assert strict.new_to_expansion < loose.new_to_expansion


def test_a_threshold_above_every_score_is_warned_about(old_speaker, monkeypatch):
    """More than ``max_old_error`` of the old calibration tokens at a saturated 1.0 put the threshold just above 1:
    nothing would reach the expansion, and fit_router says so and how to fix it (a smoke run of the biographies with
    format samples got there; the threshold itself is exact, patched in only to reach the warning here)."""
    from peft_scale import router_fitting

    assert router_fitting._threshold(torch.tensor([0.2] * 95 + [1.0] * 5), 0.01) > 1.0
    assert router_fitting._threshold(torch.tensor([0.2] * 99 + [1.0]), 0.01) < 1.0  # 1 of 100 may reach it
    _, model = routed(old_speaker)
    new, old = domain_ids(NEW, seed=1), domain_ids(OLD, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a separable old side: no warning
        fit_router(model, new, old, progress=False)
    monkeypatch.setattr(router_fitting, "_threshold", lambda scores, error: float(torch.nextafter(torch.tensor(1.0),
                                                                                                  torch.tensor(2.0))))
    with pytest.warns(UserWarning, match=r"threshold is 1\.0000001.*no token reaches the expansion.*give old data"):
        report = fit_router(model, new, old, progress=False)
    assert report.new_to_expansion == 0.0


def test_few_new_tokens_reaching_the_expansion_is_warned_about(old_speaker):
    """New facts in the old data's format: new sequences that are old text with one new token in eight. The
    threshold set on old text the router did not see leaves most of the new sequences' tokens on the base model, and
    fit_router says so and names calibrate_on="fitted"; with it (the old data is what must be kept), no warning."""
    from peft_scale.router_fitting import LITTLE_NEW_WARNING

    new = domain_ids(OLD, seed=3)
    new[:, ::8] = domain_ids(NEW, length=6, seed=4)
    old = domain_ids(OLD, seed=2)
    _, model = routed(old_speaker)
    with pytest.warns(UserWarning, match=r"only \d+\.\d% of the held-out new tokens reach the expansion.*"
                                         r"calibrate_on=\"fitted\""):
        report = fit_router(model, new, old, progress=False)
    assert report.new_to_expansion < LITTLE_NEW_WARNING
    _, model = routed(old_speaker)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_router(calibrate_on(model, "fitted"), new, old, progress=False)


@pytest.mark.parametrize(
    ("new", "old", "error", "message"),
    [
        (torch.zeros(0, 5, dtype=torch.long), None, ValueError, "new_data is empty"),
        ("some text", None, TypeError, "new_data is a str. Give new_data as a LongTensor"),
        (torch.rand(4, 5), None, ValueError, r"new_data is a torch.float32 tensor of shape \(4, 5\)"),
        (Dataset.from_dict({"text": ["a b"]}), None, ValueError, r"no 'input_ids'. Tokenize it first"),
        ([1, 2, 3], None, ValueError, "^fit_router: new_data is a list whose items are not dicts with 'input_ids' nor "
         "1-D token id sequences"),
        (domain_ids(NEW), torch.rand(4, 5), ValueError,
         r"^fit_router: old_data is a torch.float32 tensor of shape \(4, 5\). Give old_data as a LongTensor"),
        (domain_ids(NEW), [[1, -3]], ValueError,
         "^fit_router: old_data holds token id -3, outside the model's vocabulary"),
        (torch.full((4, 5), 500), None, ValueError, "token id 500, outside the model's vocabulary of 128"),
        (domain_ids(NEW, n=2), domain_ids(OLD), ValueError, r"new side has 2 sequence\(s\); at least 3"),
    ],
)
def test_fit_router_bad_data(old_speaker, new, old, error, message):
    _, model = routed(old_speaker)
    with pytest.raises(error, match=message):
        fit_router(model, new, old if old is not None else domain_ids(OLD), progress=False)


def test_fit_router_bad_calls(old_speaker):
    _, model = routed(old_speaker)
    with pytest.raises(ValueError, match=r"BaseModelSamples\(length=100\) is longer than the model's 64 positions"):
        fit_router(model, domain_ids(NEW), BaseModelSamples(length=100), progress=False)
    with pytest.raises(ValueError, match="max_old_error=0.7"):
        fit_router(model, domain_ids(NEW), domain_ids(OLD), max_old_error=0.7)
    no_bos = copy.deepcopy(model)
    no_bos.base_model.model.config.bos_token_id = None
    no_bos.base_model.model.generation_config.bos_token_id = None
    with pytest.raises(ValueError, match=r"has no bos_token_id. Pass old_data=BaseModelSamples\(prompts=...\)"):
        fit_router(no_bos, domain_ids(NEW), BaseModelSamples(length=16), progress=False)
    with pytest.raises(ValueError, match=r"new_data is a list of strings; tokenize it first, or pass the model's tokenizer \(tokenizer=...\)"):
        fit_router(model, ["un texte", "deux", "trois"], domain_ids(OLD), progress=False)
    with pytest.raises(TypeError, match="num_samples"):  # moved into BaseModelSamples(count=...)
        fit_router(model, domain_ids(NEW), None, num_samples=8)
    plain = get_peft_model(copy.deepcopy(old_speaker), ScaleConfig(ffn_expansion=8))
    with pytest.raises(ValueError, match="has no learned-route SCALE adapter"):
        fit_router(plain, domain_ids(NEW), domain_ids(OLD))
    with pytest.raises(TypeError, match="needs a model made by get_peft_model"):
        fit_router(old_speaker, domain_ids(NEW), domain_ids(OLD))


def new_domain_dataset(n=32, length=48, seed=3) -> Dataset:
    ids = domain_ids(NEW, n, length, seed=seed).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def trainer_args(tmp_path, **overrides):
    return TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
        lr_scheduler_type="constant", save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        logging_steps=1, **overrides,
    )


@pytest.mark.parametrize("mode", list(MODES))
def test_trainer_with_the_router_callback_trains_and_keeps_the_base(old_speaker, mode, tmp_path):
    reference, model = routed(old_speaker, mode)
    before = {name: p.detach().clone() for name, p in scale_parameters(model).items()}
    callback = RouterFitCallback(old_data=domain_ids(OLD, seed=2), progress=False)
    trainer = Trainer(model=model, args=trainer_args(tmp_path), train_dataset=new_domain_dataset(),
                      callbacks=[callback])
    trainer.train()
    assert len(callback.reports) == 1 and callback.reports[0].new_to_expansion >= 0.95  # fitted on 8 batches
    router = {k: v.clone() for k, v in model.base_model.scale_router["default"].state_dict().items()}
    after = scale_parameters(model)
    assert all(not torch.equal(after[name], tensor) for name, tensor in before.items())
    model.eval()
    old = domain_ids(OLD, 4, 16, seed=7)
    with torch.no_grad():
        assert (model(input_ids=old).logits - reference(input_ids=old).logits).abs().max() <= 1e-6
    # training again leaves the (already fitted) router as it is
    Trainer(model=model, args=trainer_args(tmp_path), train_dataset=new_domain_dataset(seed=4),
            callbacks=[RouterFitCallback()]).train()
    for key, value in model.base_model.scale_router["default"].state_dict().items():
        assert torch.equal(value, router[key]), key


def test_trl_sft_trainer_trains_a_routed_adapter(old_speaker, tmp_path):
    from conftest import word_tokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = word_tokenizer()  # "w{i}" is token id 4 + i
    texts = [" ".join(f"w{i - 4}" for i in row) for row in domain_ids(NEW, 12, 12, seed=5).tolist()]
    reference = copy.deepcopy(old_speaker)
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        lr_scheduler_type="constant", save_strategy="no", max_length=16, report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True, logging_steps=1,
    )
    trainer = SFTTrainer(
        model=copy.deepcopy(old_speaker),
        peft_config=ScaleConfig(ffn_expansion=16, variant="route", preserve_layers=PRESERVE),
        train_dataset=Dataset.from_dict({"text": texts}), args=args, processing_class=tokenizer,
        callbacks=[RouterFitCallback(old_data=domain_ids(OLD, seed=2), progress=False)],
    )
    assert args.bf16 and args.gradient_checkpointing  # TRL's defaults, kept: the gate survives both
    before = {name: p.detach().clone() for name, p in scale_parameters(trainer.model).items()}
    trainer.train()
    after = scale_parameters(trainer.model)
    assert all(not torch.equal(after[name], tensor) for name, tensor in before.items())
    model = trainer.model.eval()
    old = domain_ids(OLD, 4, 16, seed=7)
    # accelerate leaves the trained model's forward under the bf16 autocast TRL trained it with: compare alike
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=old).logits
        whole_rows = model.base_model.last_routing.to_preservation.all(dim=1)  # every token of the row to the base
        assert whole_rows.sum() >= 3
        assert (logits - reference(input_ids=old).logits)[whole_rows].abs().max() <= 1e-6


def test_public_names():
    assert peft_scale.fit_router is fit_router and peft_scale.RouterFitCallback is RouterFitCallback


def test_fit_router_calibrates_and_reports_the_smoothed_decisions(old_speaker):
    """Overlapping domains (ids 34-63 in both): the per-token router is imperfect, and the average helps."""
    new, old = domain_ids((34, 94), seed=1), domain_ids(OLD, seed=2)
    _, plain = routed(old_speaker)
    per_token = fit_router(plain, new, old, progress=False)
    _, model = routed(old_speaker, router_smoothing=SMOOTHING)
    report = fit_router(model, new, old, progress=False)
    assert report.threshold != per_token.threshold
    assert report.calibration_old_to_base >= 0.99
    # the report's shares are the model's smoothed decisions on the data
    assert routed_share(model, new) == pytest.approx(report.fitted_new_to_expansion, abs=2e-3)
    assert 1 - routed_share(model, old) == pytest.approx(report.fitted_old_to_base, abs=2e-3)
    # and they differ from what the same kept router, deciding per token, would do
    model.peft_config["default"].router.smoothing = 0.0
    assert routed_share(model, new) != pytest.approx(report.fitted_new_to_expansion, abs=2e-3)


def test_fit_router_has_at_most_eight_parameters():
    import inspect

    assert list(inspect.signature(fit_router).parameters) == [
        "model", "new_data", "old_data", "tokenizer", "other_domains", "adapter_name", "max_old_error", "progress"
    ]


def test_max_old_error_defaults_by_the_old_side_and_is_recorded(old_speaker):
    from peft_scale.config import DEFAULT_MAX_OLD_ERROR

    _, model = routed(old_speaker, router_max_old_error=None)
    report = fit_router(model, domain_ids(NEW, seed=1), domain_ids(OLD, seed=2), progress=False)
    assert report.max_old_error == DEFAULT_MAX_OLD_ERROR["old data"] == 0.005
    assert model.peft_config["default"].router_report["max_old_error"] == 0.005
    assert "max_old_error 0.005" in str(report)
    sampled = fit_router(model, domain_ids(NEW, seed=1), BaseModelSamples(count=24, length=24), progress=False)
    assert sampled.max_old_error == DEFAULT_MAX_OLD_ERROR["base model samples"] == 0.05
    samples = BaseModelSamples(count=24, length=24)
    assert fit_router(model, domain_ids(NEW, seed=1), samples, max_old_error=0.2, progress=False).max_old_error == 0.2
    model.peft_config["default"].router.max_old_error = 0.1  # the config's value wins over the default
    assert fit_router(model, domain_ids(NEW, seed=1), domain_ids(OLD, seed=2), progress=False).max_old_error == 0.1


def test_the_router_seed_makes_a_refit_reproducible(old_speaker):
    _, model = routed(old_speaker)
    new, old = domain_ids((34, 94), seed=1), domain_ids(OLD, seed=2)
    first = fit_router(model, new, old, progress=False)
    state = {k: v.clone() for k, v in model.base_model.scale_router["default"].state_dict().items()}
    again = fit_router(model, new, old, progress=False)
    assert again == first
    assert all(torch.equal(v, state[k]) for k, v in model.base_model.scale_router["default"].state_dict().items())
    model.peft_config["default"].router.seed = 1
    assert fit_router(model, new, old, progress=False).threshold != first.threshold or not torch.equal(
        model.base_model.scale_router["default"].w_in, state["w_in"]
    )


class CharTokenizer:
    """A stand-in tokenizer: one token per character, ids 64 + (ord % 64) (the new domain's ids)."""

    def __call__(self, text):
        return {"input_ids": [1] + [64 + ord(c) % 64 for c in text]}

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_fit_router_reads_strings_with_the_tokenizer(old_speaker):
    _, model = routed(old_speaker)
    texts = ["".join(chr(48 + (i * 7 + j) % 60) for j in range(40)) for i in range(12)]
    tokenizer = CharTokenizer()
    from_text = fit_router(model, texts, domain_ids(OLD, seed=2), tokenizer=tokenizer, progress=False)
    from_ids = fit_router(model, [tokenizer(t)["input_ids"] for t in texts], domain_ids(OLD, seed=2), progress=False)
    assert from_text == from_ids and from_text.tokens["new"] == 12 * 41


def test_with_samples_the_report_says_how_they_differ_from_the_new_data(old_speaker):
    from peft_scale.router_fitting import sample_differences

    new = [torch.tensor([5, 6, 7, 8]), torch.tensor([5, 6, 9])]
    samples = [torch.tensor([5, 50, 50, 51, 50, 1]), torch.tensor([6, 50, 52, 1, 1, 7])]
    assert sample_differences(new, samples) == {
        "median_length": {"new": 3, "samples": 6},
        "shared_vocabulary": round(5 / 7, 4),  # 5, 6, 7, 5, 6 of the 7 new tokens occur in the samples
        "sample_only": [[50, 0.3333], [1, 0.25], [51, 0.0833], [52, 0.0833]],
    }
    assert sample_differences(new, samples, CharTokenizer(), top=1)["sample_only"] == [["2", 0.3333]]
    _, model = routed(old_speaker)
    report = fit_router(model, domain_ids(NEW, seed=1), BaseModelSamples(count=24, length=24), progress=False)
    assert report.sample_differences["median_length"]["samples"] > 0
    assert "give a few thousand tokens of it as old_data" in str(report)
    assert fit_router(model, domain_ids(NEW, seed=1), domain_ids(OLD), progress=False).sample_differences == {}


def test_base_model_samples_errors():
    with pytest.raises(ValueError, match=r"BaseModelSamples\(count=0\): a positive integer"):
        BaseModelSamples(count=0)
    with pytest.raises(ValueError, match=r"prompts=...\): a LongTensor of prompt token ids of shape"):
        BaseModelSamples(prompts=torch.ones(3))
    with pytest.raises(ValueError, match="prompts do not apply"):
        BaseModelSamples(in_new_data_format=True, prompts=torch.ones(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"format_share=0\): a share"):
        BaseModelSamples(format_share=0)
