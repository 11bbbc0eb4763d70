"""``fit_router(sample_format="new_data")``: the base model's samples in the new data's format (format_sampling.py).

Templated new data on a tiny Llama: ``<s> 10 name name 11 12 value`` with the template tokens 1, 10, 11 and 12 in
every sequence (format) and the name and value tokens each in few (content).
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from tiny_models import tiny_model

from peft_scale import ScaleConfig, fit_router
from peft_scale.format_sampling import format_tokens, sample_in_format, slot_starts

FORMAT = {1, 10, 11, 12}


def templated(n: int = 40, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        first, last, value = (int(torch.randint(lo, lo + 20, (1,), generator=g)) for lo in (64, 84, 104))
        rows.append(torch.tensor([1, 10, first, last, 11, 12, value]))
    return rows


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return tiny_model("llama", num_hidden_layers=4).eval().requires_grad_(False)


def test_format_and_slot_types_are_read_off_the_new_data():
    new = templated()
    formats = format_tokens(new, 0.2)
    assert formats == FORMAT
    starts = slot_starts(new, formats)
    assert set(starts) == {10, 12}  # 11 follows content, and content never follows 1 or 11
    assert set(starts[10]) == {int(x[2]) for x in new} and set(starts[12]) == {int(x[6]) for x in new}


def test_samples_keep_the_format_and_fill_each_slot_with_its_type(base):
    new = templated()
    samples = sample_in_format(base, new, 200, 0.2, 16, seed=0, progress=False)
    names, values = {int(x[2]) for x in new}, {int(x[6]) for x in new}
    assert 3 <= len(samples) <= 200
    for sample in samples:
        assert len(sample) == 7 and sample[[0, 1, 4, 5]].tolist() == [1, 10, 11, 12]
        assert int(sample[2]) in names and int(sample[6]) in values  # a slot's first token: its type
        assert int(sample[3]) not in FORMAT  # inside a run: any content token
    keys = [tuple(s.tolist()) for s in samples]
    assert len(set(keys)) == len(keys)  # repeats dropped
    new_prefixes = {tuple(x[:6].tolist()) for x in new}
    assert not any(k[:6] in new_prefixes for k in keys)  # a draw that writes back a new name is new, not old
    again = sample_in_format(base, new, 200, 0.2, 16, seed=0, progress=False)
    assert [s.tolist() for s in again] == [s.tolist() for s in samples]
    other = sample_in_format(base, new, 200, 0.2, 16, seed=1, progress=False)
    assert [s.tolist() for s in other] != [s.tolist() for s in samples]


def test_data_without_content_or_with_nothing_left_is_a_clear_error(base):
    same = [torch.tensor([1, 10, 64, 11, 100])] * 10
    with pytest.raises(ValueError, match="no content for the base model to fill in.*Lower format_share"):
        sample_in_format(base, same, 20, 0.05, 8, seed=0, progress=False)
    # the only content is the last run, so every draw repeats a new sequence up to it: all dropped
    one_slot = [torch.tensor([1, 10, 11, 64 + i % 2]) for i in range(10)]
    with pytest.raises(ValueError, match="0 of 20 draws were kept.*num_samples"):
        sample_in_format(base, one_slot, 20, 1.0, 8, seed=0, progress=False)


def routed(base):
    config = ScaleConfig(ffn_expansion=16, variant="route", preserve_layers=2)
    return get_peft_model(copy.deepcopy(base), config)


def test_fit_router_samples_the_old_side_in_the_new_data_format(base):
    model = routed(base)
    new = torch.stack(templated(60))
    report = fit_router(model, new, None, sample_format="new_data", format_share=0.2, num_samples=120, progress=False)
    assert report.old_source == "base model samples in the new data's format"
    assert 3 * 7 <= report.tokens["old"] <= 120 * 7 and report.tokens["new"] == 60 * 7
    assert "measured on the base model's own samples, not on the old task's text" in str(report)
    assert model.base_model.scale_router["default"].is_fitted
    assert model.peft_config["default"].router_report["old_source"] == report.old_source


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sample_format="prose"), "sample_format='prose'.*'free'.*'new_data'"),
        (dict(sample_format="new_data", old_data=True), "old_data was given too"),
        (dict(sample_format="new_data", sample_prompts=torch.ones(1, 1, dtype=torch.long)), "sample_prompts do not apply"),
        (dict(sample_format="new_data", format_share=0.0), r"format_share=0.0.*\(0, 1\]"),
    ],
)
def test_bad_sampling_options_are_clear_errors(base, kwargs, message):
    model = routed(base)
    new = torch.stack(templated(20))
    old = new.clone() if kwargs.pop("old_data", None) else None
    with pytest.raises(ValueError, match=message):
        fit_router(model, new, old, progress=False, **kwargs)
