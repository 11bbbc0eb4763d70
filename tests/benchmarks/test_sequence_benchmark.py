"""benchmarks/continual_pretraining/sequence.py: the --quick pipeline (English -> Spanish -> French on a tiny random
Llama over the bundled tokenizer, every row, a few steps; ~30 s here). It checks the results' structure (every row
has every measure after every stage, the goals are judged, the files are written), not what the experiment finds."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest

pytest.importorskip("matplotlib")

from benchmarks.continual_pretraining import sequence  # noqa: E402
from benchmarks.methods import ROUTER_0_1_0  # noqa: E402
from peft_scale import RouterConfig  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MEASURES = ("es_perplexity", "fr_perplexity", "en_perplexity", "drift", "answer_perplexity")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("sequence")
    return out, sequence.main(["--quick", "--output-dir", str(out)])


def test_every_row_has_every_measure_after_every_stage(quick):
    out, results = quick
    assert json.loads((out / "results.json").read_text())["runs"].keys() == results["runs"].keys() == set(sequence.ROWS)
    assert all(math.isfinite(results["base"][key]) for key in MEASURES) and results["base"]["drift"] == 0
    steps = results["settings"]["steps"]
    for name, record in results["runs"].items():
        row = sequence.ROWS[name]
        assert [stage["language"] for stage in record["stages"]] == list(row.languages), name
        for stage in record["stages"]:
            assert len(stage["train_loss"]) == steps and stage["trainable_parameters"] > 0, name
            for key in MEASURES:
                assert math.isfinite(stage["measures"][key]), (name, stage["language"], key)


def test_routed_rows_fit_one_router_per_domain_and_refit_the_earlier_one(quick):
    _, results = quick
    first, second = results["runs"]["scale_ffn_routed"]["stages"]
    assert first["router"]["old_side"] == ["en"]
    assert second["router"]["old_side"] == ["en", "es"]
    assert second["refitted"]["es"]["old_side"] == ["en", "fr"]
    for confusion in second["routing_confusion"].values():
        assert set(confusion) == {"es", "fr", "base"}
        for shares in confusion.values():
            assert list(shares) == ["es", "fr", "base"] and sum(shares.values()) == pytest.approx(1)
    for stage in (first, second):
        for language in ("es", "fr", "en"):
            assert 0 <= stage["measures"][f"{language}_routed_to_preservation"] <= 1
    assert results["runs"][sequence.FRENCH_REFERENCE]["stages"][0]["router"]["old_side"] == ["en"]


def test_the_pairwise_row_gives_the_other_language_as_other_domains(quick):
    """``scale_ffn_routed_pairwise``: every router's old side is English alone, the other language is
    ``fit_router``'s ``other_domains`` (its report says the share of it the router claims)."""
    _, results = quick
    first, second = results["runs"]["scale_ffn_routed_pairwise"]["stages"]
    assert first["router"]["old_side"] == ["en"] and "other_domains" not in first["router"]
    assert first["router"]["report"]["other_to_expansion"] == {}
    for record, other in ((second["router"], "es"), (second["refitted"]["es"], "fr")):
        assert record["old_side"] == ["en"] and record["other_domains"] == [other]
        assert list(record["report"]["other_to_expansion"]) == [other]
        assert record["old_blocks"] == first["router"]["old_blocks"]  # English only
    assert set(second["routing_confusion"]) == {"before_refit", "after_refit"}


def test_the_outranking_row_does_not_refit_the_earlier_router(quick):
    """``scale_ffn_routed_outranking_defaults``: fr's router is fitted with the Spanish blocks as
    ``other_domains={"es": ...}`` and outranks es's, which stays as stage 1 fitted it (no refit)."""
    _, results = quick
    first, second = results["runs"]["scale_ffn_routed_outranking_defaults"]["stages"]
    assert first["router"]["config"]["outranks"] == []
    assert second["router"]["other_domains"] == ["es"] and second["router"]["config"]["outranks"] == ["es"]
    assert "refitted" not in second and set(second["routing_confusion"]) == {"no_refit"}
    # the pairwise row's routers are fitted against each other: neither outranks the other
    pairwise = results["runs"]["scale_ffn_routed_pairwise"]["stages"][1]
    assert pairwise["router"]["config"]["outranks"] == ["es"] and pairwise["refitted"]["es"]["config"]["outranks"] == ["fr"]


def test_goals_are_judged_for_every_two_stage_row(quick):
    _, results = quick
    goals = results["goals"]
    assert set(goals) == {name for name, row in sequence.ROWS.items() if len(row.languages) == 2}
    for name, goal in goals.items():
        assert isinstance(goal["spanish_kept"], bool) and isinstance(goal["english_drift_met"], bool), name
        assert math.isfinite(goal["spanish_rise"]) and math.isfinite(goal["english_drift"])
        # French is judged against a single-stage run of the same method (SCALE's only) that learned French at all
        # (on the tiny random model the defaults' router may send every held-out French token to the base model)
        reference = results["runs"][goal["french_reference"]]["stages"][-1]["measures"]["fr_perplexity"]
        judged = name.startswith("scale_ffn_routed") and reference < results["base"]["fr_perplexity"]
        assert isinstance(goal["french_learned"], bool) == judged, name
        assert goal["meets_all"] in (True, False, None)
    assert isinstance(goals["scale_ffn_routed"]["french_learned"], bool)  # the reference of 0.1.0's rows learned


def test_report_plots_and_merge(quick, tmp_path):
    out, results = quick
    table = (out / "results.md").read_text()
    assert "python -m benchmarks.continual_pretraining.sequence --quick --output-dir" in table
    for name in sequence.ROWS:
        assert f"| `{name}` |" in table
    for png in sequence.plot_files():
        assert (out / png).read_bytes()[:8] == PNG_SIGNATURE, png
    merged = sequence.main(["--quick", "--output-dir", str(tmp_path), "--merge-parts", str(out)])
    assert merged["goals"] == json.loads(json.dumps(results["goals"]))
    assert (tmp_path / "results.md").read_text() == table


def test_merge_joins_parts_made_with_more_or_fewer_rows(quick, tmp_path):
    """A part made before a row was added to ``ROWS`` (its settings list fewer rows) merges with a newer one; a row
    defined differently in two parts does not."""
    out, results = quick
    older = json.loads(json.dumps(results))
    del older["settings"]["rows"]["scale_ffn_routed_pairwise"], older["runs"]["scale_ffn_routed_pairwise"]
    newer = json.loads(json.dumps(results))
    newer["runs"] = {"scale_ffn_routed_pairwise": newer["runs"]["scale_ffn_routed_pairwise"]}
    for name, part in (("older", older), ("newer", newer)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(part))
    merged = sequence.main(["--quick", "--output-dir", str(tmp_path / "merged"), "--merge-parts",
                            str(tmp_path / "older"), str(tmp_path / "newer")])  # fmt: skip
    assert list(merged["runs"]) == list(results["runs"]) and merged["settings"]["rows"] == results["settings"]["rows"]
    newer["settings"]["rows"]["scale_ffn_routed"]["lr"] = 1.0
    (tmp_path / "newer" / "results.json").write_text(json.dumps(newer))
    with pytest.raises(ValueError, match="row 'scale_ffn_routed' is defined differently"):
        sequence.main(["--quick", "--output-dir", str(tmp_path / "merged"), "--merge-parts", str(tmp_path / "older"),
                       str(tmp_path / "newer")])  # fmt: skip


def test_a_row_is_judged_against_its_own_single_stage_reference(quick):
    """The defaults row's settings reach both stages' adapters (RouterConfig's defaults, the README's optimizer), the
    other rows keep 0.1.0's router settings, and its French is judged against the single-stage row made at its
    settings, not against the default reference."""
    _, results = quick
    goals = sequence.goals_of(results)
    row, reference = "scale_ffn_routed_pairwise_defaults", "scale_ffn_routed_fr_only_defaults"
    assert goals[row]["french_reference"] == reference
    assert goals["scale_ffn_routed_pairwise"]["french_reference"] == sequence.FRENCH_REFERENCE
    base = results["base"]["fr_perplexity"]
    fr = lambda name: results["runs"][name]["stages"][-1]["measures"]["fr_perplexity"]  # noqa: E731
    ratio = goals[row]["french_ratio_to_single_stage_scale"]
    if base > fr(reference):
        assert ratio == pytest.approx((base - fr(row)) / (base - fr(reference)))
    else:  # the reference learned no French (the tiny model's router may send all of it to the base model)
        assert ratio is None
    seed = results["settings"]["seed"]
    for stage in results["runs"][row]["stages"]:
        assert stage["router"]["config"] == {**asdict(RouterConfig(seed=seed)), "outranks": stage["router"]["config"]["outranks"]}
        assert stage["router"]["report"]["calibrate_on"] == "cross_fitted"
    for stage in results["runs"]["scale_ffn_routed"]["stages"]:  # 0.1.0's settings
        config = stage["router"]["config"]
        assert {key: config[key] for key in ROUTER_0_1_0} == ROUTER_0_1_0 and config["seed"] == seed
    settings = results["settings"]["rows"]
    assert settings[row]["scale_optimizer"] is True and settings[row]["router_options"] == {}
    assert "w12_lr_ratio" not in settings["scale_ffn_routed"] and "router_options" not in settings["scale_ffn_routed"]


def test_a_results_file_with_a_removed_row_is_judged_against_its_recorded_reference(quick):
    """A row no longer in ROWS (the *_ema_old rows of results made before 0.2) keeps the reference its results
    recorded."""
    _, results = quick
    renamed = json.loads(json.dumps(results))
    renamed["runs"]["old_row"] = renamed["runs"]["scale_ffn_routed_pairwise_defaults"]
    renamed["settings"]["rows"]["old_row"] = renamed["settings"]["rows"]["scale_ffn_routed_pairwise_defaults"]
    goals = sequence.goals_of(renamed)
    assert goals["old_row"]["french_reference"] == "scale_ffn_routed_fr_only_defaults"
