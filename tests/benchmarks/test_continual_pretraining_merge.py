"""benchmarks.continual_pretraining.merge: parallel parts join into one results dict, or refuse to."""

from __future__ import annotations

import pytest

from benchmarks.continual_pretraining.merge import merge_results


def part(runs: dict, settings: dict | None = None, commands=("cmd",)) -> dict:
    return {"settings": settings or {"steps": 60}, "runs": runs, "commands": list(commands), "base": {"x": 1}}


def test_runs_and_commands_are_joined_and_the_parts_untouched():
    first, second = part({"full@1e-05": {"a": 1}}, commands=["c1"]), part({"lora@0.0003": {"b": 2}}, commands=["c2"])
    merged = merge_results([first, second])
    assert merged["runs"] == {"full@1e-05": {"a": 1}, "lora@0.0003": {"b": 2}}
    assert merged["commands"] == ["c1", "c2"] and merged["base"] == {"x": 1}
    assert first["runs"] == {"full@1e-05": {"a": 1}} and first["commands"] == ["c1"]


def test_a_field_only_a_later_part_has_is_kept():
    first, second = part({"full@1e-05": {}}), {**part({"scale_ffn_routed_samples@0.001": {}}), "base_samples": {"digest": "d"}}
    second["base"] = {"x": 2}
    merged = merge_results([first, second])
    assert merged["base_samples"] == {"digest": "d"} and merged["base"] == {"x": 1}  # the first part's base


def test_parts_made_with_other_settings_are_refused():
    with pytest.raises(ValueError, match="other settings"):
        merge_results([part({}, {"steps": 60}), part({}, {"steps": 100})])
    with pytest.raises(ValueError, match="Nothing to merge"):
        merge_results([])
