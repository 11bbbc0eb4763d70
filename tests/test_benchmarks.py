"""Smoke test of benchmarks/throughput.py: a --quick run completes, and its JSON is complete and self-consistent."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from conftest import REPO

# The --quick run takes ~2 s here (under 10 s), so the test is not marked slow.


def load_throughput():
    spec = importlib.util.spec_from_file_location("benchmarks_throughput", REPO / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def check_timing(row: dict) -> None:
    for key in ("median_s", "min_s", "max_s", "tokens_per_s"):
        assert positive_finite(row[key]), (key, row[key])
    assert row["min_s"] <= row["median_s"] <= row["max_s"]
    assert len(row["samples_s"]) == 2 and all(positive_finite(t) for t in row["samples_s"])
    assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["median_s"])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    throughput = load_throughput()
    out = tmp_path_factory.mktemp("bench")
    result = throughput.main(["--quick", "--model", "tiny", "--output-dir", str(out)])
    files = list(out.glob("throughput_tiny_quick_*.json"))
    assert len(files) == 1
    return throughput, result, json.loads(files[0].read_text())


def test_quick_run_writes_every_row(quick_run):
    throughput, _, data = quick_run
    assert data["machine"]["cpu_count"] and data["machine"]["torch"] and data["machine"]["device"]
    assert data["workload"]["warmup"] == 1 and data["workload"]["repeats"] == 2
    assert [run["dtype"] for run in data["runs"]][0] == "float32"
    for run in data["runs"]:
        assert set(run["training"]) == set(throughput.TRAIN_ROWS)
        assert set(run["inference"]) == set(throughput.INFER_ROWS)
        for name, row in run["training"].items():
            check_timing(row)
            memory = row["memory"]
            for key in ("param_mib", "activation_mib", "est_peak_mib"):
                assert positive_finite(memory[key]), (name, key, memory[key])
        for name, row in run["inference"].items():
            check_timing(row["prefill"])
            check_timing(row["decode"])


def test_trainable_parameter_counts(quick_run):
    _, _, data = quick_run
    train = data["runs"][0]["training"]
    assert train["floor"]["trainable_params"] == 0
    assert train["floor"]["memory"]["grad_mib"] == 0 and train["floor"]["memory"]["optimizer_mib"] == 0
    for name in ("full_ft", "lora", "scale_ffn", "scale_preserve", "scale_route", "dense_ffn", "dense_wide"):
        assert train[name]["trainable_params"] > 0, name
    # LoRA's rank is chosen to match SCALE-FFN's trainable size: within one rank's worth.
    scale, lora = train["scale_ffn"]["trainable_params"], train["lora"]["trainable_params"]
    per_rank = lora / data["runs"][0]["lora_rank"]
    assert abs(scale - lora) <= per_rank / 2 + 1
    assert train["dense_wide"]["trainable_params"] > train["dense_ffn"]["trainable_params"] > train["full_ft"][
        "trainable_params"]


def test_ratios_match_absolute_numbers(quick_run):
    throughput, _, data = quick_run
    for run in data["runs"]:
        bounds = {"full_width_arithmetic", "scale_preserve/(floor*arithmetic)", "scale_route/(floor*arithmetic)"}
        assert set(run["training_ratios"]) == {name for name, _, _ in throughput.TRAIN_RATIOS} | bounds
        for name, num, den in throughput.TRAIN_RATIOS:
            expected = run["training"][num]["median_s"] / run["training"][den]["median_s"]
            assert positive_finite(run["training_ratios"][name])
            assert run["training_ratios"][name] == pytest.approx(expected), name
        arithmetic = run["training_ratios"]["full_width_arithmetic"]
        assert arithmetic > 1
        for variant in ("scale_preserve", "scale_route"):
            bound = run["training_ratios"][f"{variant}/floor"] / arithmetic
            assert run["training_ratios"][f"{variant}/(floor*arithmetic)"] == pytest.approx(bound)
        for phase in ("prefill", "decode"):
            for name, num, den in throughput.INFER_RATIOS:
                expected = run["inference"][num][phase]["median_s"] / run["inference"][den][phase]["median_s"]
                assert run["inference_ratios"][phase][name] == pytest.approx(expected), (phase, name)


def test_arithmetic_ratio_on_a_hand_counted_layer(quick_run):
    throughput, _, _ = quick_run
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=2,
                         num_hidden_layers=1, vocab_size=10)
    # base per token: projections 8*(2*8 + 2*8) + 3*8*16 = 640, attention 2*1*8 = 16, head 8*10 = 80 -> 736
    # one new head (d_up = 4): 12*(2*12 + 2*12) + 3*12*16 = 1152, attention 24, head 80 + 8*4 = 112 -> 1288
    assert throughput.arithmetic_ratio(config, seq=1, hidden_extra=4, ffn_extra=0) == pytest.approx(1288 / 736)


def test_table_is_printed(quick_run):
    throughput, result, _ = quick_run
    table = throughput.format_table(result)
    for name in throughput.TRAIN_ROWS + throughput.INFER_ROWS:
        assert name in table
    assert "scale_ffn/lora" in table and "scale_merged/dense_ffn" in table
