"""``fit_router(..., BaseModelSamples(in_new_data_format=True))``: the base model's samples in the new data's format (format_sampling.py).

Templated new data on a tiny Llama: ``<s> 10 name name 11 12 value 13``, a value of one or two tokens, with the
template tokens 1, 10, 11, 12 and 13 in every sequence (format) and the name and value tokens each in few (content).
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from peft import get_peft_model
from tiny_models import tiny_model

from peft_scale import BaseModelSamples, RouterConfig, ScaleConfig, fit_router
from peft_scale.format_sampling import _TemplateWalk, format_tokens, longest_last_run, sample_in_format, slot_starts

FORMAT = {1, 10, 11, 12, 13}


def templated(n: int = 40, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        first, last, value, more = (int(torch.randint(lo, lo + 20, (1,), generator=g)) for lo in (64, 84, 104, 104))
        rows.append(torch.tensor([1, 10, first, last, 11, 12, value, *([more] if i % 2 else []), 13]))
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
    lengths = set()
    for sample in samples:
        ids = sample.tolist()
        assert ids[:2] == [1, 10] and ids[4:6] == [11, 12] and ids[-1] == 13  # the format, copied
        assert ids[2] in names and ids[6] in values  # a slot's first token: its type
        assert ids[3] not in FORMAT  # inside a run: any content token; the name run keeps the template's length
        lengths.add(len(ids) - 7)  # the last run: as long as the model makes it, up to the new data's longest (2)
        assert not set(ids[6:-1]) & FORMAT
    assert lengths == {1, 2}  # some draws end the value early (the model wrote 13 there), some do not
    keys = [tuple(s.tolist()) for s in samples]
    assert len(set(keys)) == len(keys)  # repeats dropped
    new_prefixes = {tuple(x[:6].tolist()) for x in new}
    assert not any(k[:-1] in new_prefixes for k in keys)  # a draw that writes back a new name is new, not old
    again = sample_in_format(base, new, 200, 0.2, 16, seed=0, progress=False)
    assert [s.tolist() for s in again] == [s.tolist() for s in samples]
    other = sample_in_format(base, new, 200, 0.2, 16, seed=1, progress=False)
    assert [s.tolist() for s in other] != [s.tolist() for s in samples]


def test_the_last_run_ends_where_the_model_writes_the_next_format_token_or_at_the_longest_run():
    template = [1, 10, 70, 90, 11, 12, 110, 13]
    assert longest_last_run([torch.tensor(template), torch.tensor([1, 10, 70, 11, 12, 110, 111, 112, 13])], FORMAT) == 3
    content = torch.ones(128, dtype=torch.bool)
    content[list(FORMAT)] = False
    slots = {10: torch.zeros(128, dtype=torch.bool), 12: torch.zeros(128, dtype=torch.bool)}
    slots[10][70] = slots[12][110] = True
    short = _TemplateWalk(template, FORMAT, max_run=2)
    assert short.forced() == 10 and short.advance(10) is None and short.forced() is None
    assert torch.equal(short.allowed(content, slots), slots[10])  # a run's first token: the slot's type
    short.advance(70)
    assert torch.equal(short.allowed(content, slots), content)  # the name run: the template's length, content only
    short.advance(95)
    assert short.forced() == 11 and short.advance(11) is None and short.forced() == 12
    short.advance(12)
    assert torch.equal(short.allowed(content, slots), slots[12])
    short.advance(110)
    allowed = short.allowed(content, slots)
    assert allowed[13] and allowed[111] and not allowed[11]  # the last run: content, or the token that ends it
    short.advance(13)  # the model ends the value after one token
    assert short.done and short.tokens == [1, 10, 70, 95, 11, 12, 110, 13]
    long = _TemplateWalk(template, FORMAT, max_run=2)
    for token in (10, 70, 95, 11, 12, 110, 111):
        long.advance(token)
    assert long.forced() == 13  # the longest last run reached: its end is copied
    fixed = _TemplateWalk([1, 10, 70, 11, 110], FORMAT, max_run=2)  # a last run with nothing after it
    for token in (10, 71, 11, 111):
        fixed.advance(token)
    assert fixed.done and fixed.tokens == [1, 10, 71, 11, 111]  # keeps the template's length


def test_data_without_content_or_with_nothing_left_is_a_clear_error(base):
    same = [torch.tensor([1, 10, 64, 11, 100])] * 10
    with pytest.raises(ValueError, match="no content for the base model to fill in.*Lower format_share"):
        sample_in_format(base, same, 20, 0.05, 8, seed=0, progress=False)
    # the only content is the last run, so every draw repeats a new sequence up to it: all dropped
    one_slot = [torch.tensor([1, 10, 11, 64 + i % 2]) for i in range(10)]
    with pytest.raises(ValueError, match=r"0 of 20 draws were kept.*BaseModelSamples\(count=...\)"):
        sample_in_format(base, one_slot, 20, 1.0, 8, seed=0, progress=False)


def routed(base):
    config = ScaleConfig(ffn_expansion=16, preserve_layers=2, router=RouterConfig())
    return get_peft_model(copy.deepcopy(base), config)


def test_fit_router_samples_the_old_side_in_the_new_data_format(base):
    model = routed(base)
    new = [{"input_ids": ids.tolist()} for ids in templated(60)]  # of two lengths: a list of dicts
    samples = BaseModelSamples(in_new_data_format=True, format_share=0.2, count=120)
    report = fit_router(model, new, samples, progress=False)
    assert report.old_source == "base model samples in the new data's format"
    assert 3 * 8 <= report.tokens["old"] <= 120 * 9 and report.tokens["new"] == 30 * 8 + 30 * 9
    assert "measured on the base model's own samples, not on the old task's text" in str(report)
    # the split format_share made: the 5 template tokens (in every sequence), the most frequent content token
    content = Counter(t for row in new for t in set(row["input_ids"]) if t not in FORMAT)
    assert report.format_split == {"format_share": 0.2, "format_tokens": 5, "rarest_format_share": 1.0,
                                   "commonest_content_share": max(content.values()) / 60, "draws": 120,
                                   "kept": report.format_split["kept"]}
    assert 3 <= report.format_split["kept"] <= 120 and report.tokens["old"] >= 8 * report.format_split["kept"]
    assert "format (format_share=0.2): 5 tokens, the rarest in 100.0% of the new sequences" in str(report)
    assert model.base_model.scale_router["default"].is_fitted
    assert model.peft_config["default"].router_report["old_source"] == report.old_source


def test_bad_sampling_options_are_clear_errors():
    with pytest.raises(ValueError, match="prompts do not apply"):
        BaseModelSamples(in_new_data_format=True, prompts=torch.ones(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"format_share=0.0\): a share of the new sequences in \(0, 1\]"):
        BaseModelSamples(in_new_data_format=True, format_share=0.0)
