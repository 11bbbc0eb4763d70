"""Smoke test of benchmarks/throughput.py: a --quick run completes, and its JSON is complete and self-consistent."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import statistics

import pytest
import torch

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
        assert set(run["route_eval"]) == set(throughput.ROUTE_EVAL_ROWS)
        for row in run["route_eval"].values():
            check_timing(row)
        for name, row in run["training"].items():
            check_timing(row)
            assert isinstance(row["flops"], int) and row["flops"] > 0, (name, row["flops"])
            assert isinstance(row["aten_ops"], int) and row["aten_ops"] > 0, (name, row["aten_ops"])
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
        train = run["training"]
        arithmetic = {f"arithmetic:{n}" for n in throughput.ARITHMETIC_ROWS}
        bounded = {f"{n}/(floor*arithmetic)" for n in throughput.ARITHMETIC_ROWS}
        assert set(run["training_ratios"]) == {name for name, _, _ in throughput.TRAIN_RATIOS} | arithmetic | bounded
        for name, num, den in throughput.TRAIN_RATIOS:
            expected = train[num]["median_s"] / train[den]["median_s"]
            assert positive_finite(run["training_ratios"][name])
            assert run["training_ratios"][name] == pytest.approx(expected), name
        for name in throughput.ARITHMETIC_ROWS:
            flops_ratio = train[name]["flops"] / train["floor"]["flops"]
            assert run["training_ratios"][f"arithmetic:{name}"] == pytest.approx(flops_ratio)
            time_ratio = train[name]["median_s"] / train["floor"]["median_s"]
            assert run["training_ratios"][f"{name}/(floor*arithmetic)"] == pytest.approx(time_ratio / flops_ratio)
        # full width does more arithmetic than the floor; full fine-tuning adds every weight gradient
        assert run["training_ratios"]["arithmetic:scale_preserve"] > 1
        assert train["full_ft"]["flops"] > train["floor"]["flops"]
        evaluation = run["route_eval"]
        bound = evaluation["scale_adapt"]["median_s"] + evaluation["base_upper"]["median_s"]
        assert run["route_eval_ratios"]["scale_route/(scale_adapt+base_upper)"] == pytest.approx(
            evaluation["scale_route"]["median_s"] / bound)
        key = "peak_mib" if run["device"] == "cuda" else "est_peak_mib"
        for name in throughput.MEMORY_ROWS:
            mem, floor = train[name]["memory"], train["floor"]["memory"]
            bound = (train["lora"]["memory"][key] + 2 * mem["grad_mib"] + mem["optimizer_mib"]
                     + mem["activation_mib"] - floor["activation_mib"])
            assert run["memory_ratios"][f"{name}/(lora+new state+new activations)"] == pytest.approx(mem[key] / bound)
        for phase in ("prefill", "decode"):
            for name, num, den in throughput.INFER_RATIOS:
                expected = run["inference"][num][phase]["median_s"] / run["inference"][den][phase]["median_s"]
                assert run["inference_ratios"][phase][name] == pytest.approx(expected), (phase, name)


def test_base_upper_keeps_the_top_layers(quick_run):
    throughput, _, _ = quick_run
    base = throughput.build_base("tiny_quick", torch.float32, 0)
    upper = throughput.base_upper(base, 1)
    assert upper.config.num_hidden_layers == 1 and len(upper.model.layers) == 1
    assert torch.equal(upper.model.layers[0].mlp.down_proj.weight, base.model.layers[1].mlp.down_proj.weight)
    assert len(base.model.layers) == 2  # the base is not modified


def test_table_is_printed(quick_run):
    throughput, result, _ = quick_run
    table = throughput.format_table(result)
    for name in throughput.TRAIN_ROWS + throughput.INFER_ROWS:
        assert name in table
    assert "scale_ffn/lora" in table and "scale_merged/dense_ffn" in table
    assert "scale_route/(scale_adapt+base_upper)" in table and "lora+new state+new activations" in table


def test_router_cost_quick_run_writes_its_table_and_json(tmp_path):
    """benchmarks/router_cost.py: the router's share of a step and routed inference against the base model."""
    from benchmarks import router_cost

    output = tmp_path / "router_cost.json"
    result = router_cost.main(["--quick", "--output", str(output)])
    data = json.loads(output.read_text())
    assert set(data["train"]) == {"scale_ffn_upper", "scale_ffn_routed"}
    assert set(data["inference"]) == {
        "base", "scale_ffn_upper", "scale_ffn_routed", "scale_ffn_routed_node", "scale_ffn_routed_old",
        "scale_ffn_routed_old_no_skip", "scale_ffn_routed_copy", "scale_ffn_routed_copy_old",
    }
    assert data["ratios"]["router/step"] == data["router"]["median_s"] / data["train"]["scale_ffn_routed"]["median_s"]
    # an inference ratio: the median over repeats of the two rows' ratio within each repeat
    decode = {row: data["inference"][row]["decode"]["samples_s"] for row in ("base", "scale_ffn_routed_old")}
    within = [a / b for a, b in zip(decode["scale_ffn_routed_old"], decode["base"])]
    assert data["paired_ratios"]["routed_decode_old_text/base"] == within
    assert data["ratios"]["routed_decode_old_text/base"] == statistics.median(within)
    prefill = {row: data["inference"][row]["prefill"]["samples_s"] for row in ("scale_ffn_upper", "scale_ffn_routed")}
    within = [a / b for a, b in zip(prefill["scale_ffn_routed"], prefill["scale_ffn_upper"])]
    assert data["ratios"]["routed_prefill_new_text/unrouted"] == statistics.median(within)
    assert set(data["paired_ratios"]) == set(data["ratios"]) - {"router/step", "scale_ffn_routed/scale_ffn_upper"}
    assert all(len(data["inference"][row]["decode"]["samples_s"]) == data["workload"]["repeats"] for row in decode)
    # the benchmark's toggle of the widened layers' autograd node is undone
    import peft_scale.layer
    from peft_scale.widened_linear import widened_linear

    assert peft_scale.layer.widened_linear is widened_linear
    assert data["ratios"]["copy_decode_new_text/routed"] == statistics.median(
        [a / b for a, b in zip(*(data["inference"][row]["decode"]["samples_s"] for row in ("scale_ffn_routed_copy", "scale_ffn_routed")))]
    )
    assert set(data["goals"]) == {"router/step"} | {
        f"routed_{phase}_{text}_text/base" for phase in ("prefill", "decode") for text in ("new", "old")
    }
    # the two training rows widen the same layers: the router adds no trainable parameter
    assert data["train"]["scale_ffn_upper"]["trainable_params"] == data["train"]["scale_ffn_routed"]["trainable_params"]
    assert result["ratios"] == data["ratios"]


def test_interleaved_inference_runs_each_rows_setup_before_each_of_its_runs_in_a_rotated_order():
    """bench_inference_interleaved: every repeat times every row once (prefill, then decode), the order rotated by one
    per repeat, and a row's setup runs right before each of its timed calls (rows may share a model)."""
    from benchmarks import throughput

    model = throughput.build_base("tiny_quick", torch.float32, 0)
    calls = []
    original_generate = model.generate

    def generate(*args, **kwargs):
        calls.append(("decode", state["row"]))
        return original_generate(*args, **kwargs)

    def forward_pre_hook(module, args, kwargs):
        if not kwargs.get("use_cache", True):
            calls.append(("prefill", state["row"]))

    state = {}
    model.generate = generate
    model.register_forward_pre_hook(forward_pre_hook, with_kwargs=True)
    setup = lambda row: lambda: state.update(row=row)  # noqa: E731
    ids = torch.randint(3, 200, (2, 6))
    result = throughput.bench_inference_interleaved(
        {"a": (model, setup("a")), "b": (model, setup("b"))}, ids, ids[:, :3], 2, warmup=1, repeats=2,
        precision=contextlib.nullcontext,
    )
    order = [(phase, row) for phase, row in calls]
    assert order == [
        ("prefill", "a"), ("decode", "a"), ("prefill", "b"), ("decode", "b"),  # warm-up
        ("prefill", "b"), ("decode", "b"), ("prefill", "a"), ("decode", "a"),
        ("prefill", "a"), ("decode", "a"), ("prefill", "b"), ("decode", "b"),
    ]
    assert set(result) == {"a", "b"}
    for row in result.values():
        assert len(row["prefill"]["samples_s"]) == len(row["decode"]["samples_s"]) == 2
        assert row["decode"]["tokens"] == 2 * 2 and row["prefill"]["tokens"] == ids.numel()
