"""Smoke tests of benchmarks/diagnostics/: each diagnostic runs in its --quick mode (a tiny random model, a few
blocks or steps) into a temporary folder, and writes its JSON with the keys its findings file reads. The numbers of a
quick run mean nothing; what is checked is that the script still runs on the library as it is now, and the few
relations its rows must keep whatever the model (the w=1 row is fit_router's report, a threshold read twice off the
same scores is the same).

The diagnostics of continual_pretraining/cpu_40_steps share router_smoothing.setup (one per process), so they run
one after another in this process; the biography ones share one stage-2 model through run.py's --cache-dir.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys

import pytest

from conftest import REPO

DIAGNOSTICS = REPO / "benchmarks" / "diagnostics"
CPU_40_STEPS = DIAGNOSTICS / "continual_pretraining" / "cpu_40_steps"
BIOGRAPHY = DIAGNOSTICS / "biography"
OLD_SIDES = ("old_data", "base_samples")


def cpu_40_steps(name: str):
    """A diagnostic of cpu_40_steps/, imported under the name the others import it by (``router_smoothing``)."""
    if str(CPU_40_STEPS) not in sys.path:
        sys.path.insert(0, str(CPU_40_STEPS))
    return importlib.import_module(name)


def biography(path: str):
    spec = importlib.util.spec_from_file_location("diagnostic_" + path.replace("/", "_")[:-3], BIOGRAPHY / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def share(value) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


@pytest.fixture(scope="module")
def cpu_40_steps_output(tmp_path_factory):
    return tmp_path_factory.mktemp("cpu_40_steps")


@pytest.fixture(scope="module")
def smoothing(cpu_40_steps_output):
    out = cpu_40_steps("router_smoothing").main(["--quick", "--output-dir", str(cpu_40_steps_output)])
    return out, json.loads((cpu_40_steps_output / "router_smoothing.json").read_text())


def test_router_smoothing_w1_row_is_fit_routers_report(smoothing):
    """router_smoothing.py: every candidate for both old sides; its w=1 row equals a fit_router call's report."""
    returned, written = smoothing
    assert written == json.loads(json.dumps(returned, default=str))
    assert written["settings"]["quick"] is True
    seq_len = written["settings"]["benchmark_settings"]["seq_len"]
    rs = cpu_40_steps("router_smoothing")
    assert set(written["old_sides"]) == set(OLD_SIDES)
    for old_side in OLD_SIDES:
        result = written["old_sides"][old_side]
        assert set(result["candidates"]) == set(rs.CANDIDATES)
        assert "recorded_check" not in result  # (only a full run has the folder's results.json to compare with)
        check = result["w1_check"]
        assert set(check) >= {"threshold", "held_out_old_to_base", "held_out_new_to_expansion"}
        assert all(row["equal"] for row in check.values()), check
        for candidate in result["candidates"].values():
            assert candidate["threshold"] >= 0.5  # _threshold's floor
            shares = {k: v for k, v in candidate.items() if k.endswith(("_to_base", "_to_expansion"))}
            assert len(shares) == 6 + 2 * 2 * (2 + len(rs.POSITIONS))
            # a position range past --quick's 32-token blocks has no token: its share is NaN, every other a share
            empty = {name for name, (start, _) in rs.POSITIONS.items() if start >= seq_len}
            assert all(math.isnan(v) if k.split("_", 3)[3].rsplit("_to_", 1)[0] in empty else share(v)
                       for k, v in shares.items() if k.startswith("eval_") and "_pos_" in k), shares
            assert all(share(v) for k, v in shares.items() if "_pos_" not in k), shares


def test_router_first_tokens_runs(smoothing, cpu_40_steps_output):
    """router_first_tokens.py: the short-window candidates and the held-out / cross-fitted calibrations."""
    ft = cpu_40_steps("router_first_tokens")
    ft.main(["--quick", "--output-dir", str(cpu_40_steps_output)])
    written = json.loads((cpu_40_steps_output / "router_first_tokens.json").read_text())
    assert written["quick"] is True and written["eval_blocks"] == ft.QUICK_EVAL_BLOCKS
    for old_side in OLD_SIDES:
        rows = written["results"][old_side]
        expected = {f"short_{k}{kind}" for k in ft.QUICK_LENGTHS for kind in ("", "_position", "_cal") if k or kind != "_cal"}
        assert set(rows) == expected | {"calibration"}
        for name in expected - {f"short_{k}_position" for k in ft.QUICK_LENGTHS}:
            assert all(share(v) for key in ("eval_old_to_expansion", "eval_new_to_expansion") for v in rows[name][key].values())
        calibration = rows["calibration"]
        assert set(calibration) == {"cross_fit_seconds"} | {f"{how}_{b}" for how in ("held_out", "cross_fitted") for b in ft.BUDGETS}
        # today's calibration at 1% is short_0's threshold: the same scores, the same budget
        assert calibration["held_out_0.01"]["threshold"] == rows["short_0"]["threshold"]


def test_router_first_token_rules_runs(smoothing, cpu_40_steps_output):
    """router_first_token_rules.py: the three first-token rules, calibrated and on the frontier."""
    ftr = cpu_40_steps("router_first_token_rules")
    ftr.main(["--quick", "--output-dir", str(cpu_40_steps_output)])
    written = json.loads((cpu_40_steps_output / "router_first_token_rules.json").read_text())
    first_tokens = json.loads((cpu_40_steps_output / "router_first_tokens.json").read_text())
    assert written["quick"] is True
    for old_side in OLD_SIDES:
        row = written["results"][old_side]
        assert set(row) == {"auc_at_position", *ftr.RULES}
        assert row["auc_at_position"] and all(share(v) for v in row["auc_at_position"].values())
        for rule in ftr.RULES:
            assert set(row[rule]) == {"calibrated_0.01", "calibrated_0.005", "frontier"}
            assert set(row[rule]["frontier"]) == {str(b) for b in ftr.FRONTIER}
        # the rule the library routes by ("ema"), computed here by a loop, calibrates as the library's smoothing did
        ema = row["ema"]["calibrated_0.01"]["threshold"]
        assert ema == pytest.approx(first_tokens["results"][old_side]["short_0"]["threshold"], abs=1e-5)


def test_router_language_switch_runs(smoothing, cpu_40_steps_output):
    """router_language_switch.py: each rule's shares before and after a switch of language."""
    cpu_40_steps("router_language_switch").main(["--quick", "--output-dir", str(cpu_40_steps_output)])
    written = json.loads((cpu_40_steps_output / "router_language_switch.json").read_text())
    half = written["settings"]["half"]
    assert half == 16 and set(written["settings"]["offsets"]) == {"0-7", "8-15"}  # --quick's blocks: 32 tokens
    for old_side in OLD_SIDES:
        rules = written["old_sides"][old_side]["rules"]
        assert set(rules) == {"per_token", "ema_token_start", "ema_old_start"}
        for row in rules.values():
            assert set(row) == {"threshold", "en->es", "es->en"}
            assert set(row["es->en"]) == {"es (before) -> expansion", "en (after) -> expansion",
                                          "en after, offset 0-7 -> expansion", "en after, offset 8-15 -> expansion"}
            assert all(share(v) for name in ("en->es", "es->en") for v in row[name].values())


@pytest.fixture(scope="module")
def stage2_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("biography_cache")


@pytest.mark.filterwarnings("ignore:fit_router. more than max_old_error:UserWarning")  # (the quick model)
def test_routing_check_runs_and_filters(stage2_cache, tmp_path):
    """format_samples/routing_check.py: the router fitted on format samples; --min-p keeps a subset of the draws,
    and the library's sampler is restored afterwards."""
    from peft_scale import router_fitting

    sampler = router_fitting.sample_in_format
    check = biography("format_samples/routing_check.py")
    common = ["--quick", "--cache-dir", str(stage2_cache)]
    every = check.main([str(tmp_path / "every.json"), *common])
    # the quick stage-2 model gives its answers' first tokens p ~0.002-0.005: 0.0033 keeps some draws, not all
    sure = check.main([str(tmp_path / "sure.json"), *common, "--min-p", "0.0033", "--max-old-error", "0.02"])
    assert router_fitting.sample_in_format is sampler
    assert json.loads((tmp_path / "every.json").read_text()) == every
    for out in (every, sure):
        assert {"threshold", "kept", "exact_task0_questions", "task0_name", "task1_name"} <= set(out)
        assert share(out["task0_first_answer_to_expansion"]) and share(out["task1_first_answer_to_expansion"])
        assert out["threshold"] >= 0.5  # (above 1 when the router sends nothing to the expansion)
    assert (every["min_p"], sure["min_p"], sure["max_old_error"]) == (0.0, 0.0033, 0.02)
    assert 3 <= sure["kept"] < every["kept"] <= every["draws"]  # (fit_router needs 3 old sequences)


def test_diagnose_router_runs(stage2_cache, tmp_path):
    """learned_router/diagnose_router.py: both routed rows' shares per token role, and the base model's samples."""
    out = biography("learned_router/diagnose_router.py").main([str(stage2_cache), "--quick", "--output-dir", str(tmp_path)])
    assert json.loads((tmp_path / "diagnose_router.json").read_text()) == json.loads(json.dumps(out))
    assert set(out) == {"quick", "stage2", "scale_ffn_routed", "scale_ffn_routed+samples", "samples"}
    for row in ("scale_ffn_routed", "scale_ffn_routed+samples"):
        assert set(out[row]) == {"report", "task0", "task1"}
        for task in ("task0", "task1"):
            first = out[row][task]["first_answer_position"]
            assert share(first["to_expansion"]) and first["n"] > 0
    # the plain row fits on Task-0 questions, so some are in its fitting part; the +samples row fits on none
    assert any(key.endswith("/fitted") for key in out["scale_ffn_routed"]["task0"])
    assert not any(key.endswith("/fitted") for key in out["scale_ffn_routed+samples"]["task0"])


def test_question_prompts_runs(stage2_cache, tmp_path):
    """learned_router/question_prompts.py: one sample per Task-1 question, grouped by the question's template."""
    from benchmarks.biography.run import Settings

    out = biography("learned_router/question_prompts.py").main([str(stage2_cache), "--quick", "--output-dir", str(tmp_path)])
    assert json.loads((tmp_path / "question_prompts.json").read_text()) == out
    templates = out["templates"]
    settings = Settings.quick()
    questions_per_person = sum(t["samples"] for t in templates.values()) / settings.task1_people
    assert questions_per_person == len(templates)  # one question per template and person
    for template in templates.values():
        assert all(share(template[k]) for k in ("first_name_next", "task0_full_name_next",
                                                   "task0_name_then_question_mark_answer"))
