"""benchmarks/continual_pretraining: the --quick pipeline end to end, and the measures on hand-checkable cases.

The --quick run (a tiny random Llama over the bundled tokenizer, every method for 4 steps) takes ~15 s here. It
checks that the pipeline works and what must hold exactly (no method drifts before training; SCALE-Route's
preservation-routed tokens never drift; the learned-route rows fit their routers on the sides they name, and the
base model's samples are drawn once and reused), not what the experiment finds.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("matplotlib")

from benchmarks.continual_pretraining import measures, run  # noqa: E402
from benchmarks.continual_pretraining.data import documents_or_summaries, repeat_to  # noqa: E402
from benchmarks.methods import MethodSizes  # noqa: E402
from conftest import random_ids, tiny_llama  # noqa: E402
from tiny_models import perturb_adapter  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("cpt")
    results = run.main(["--quick", "--output-dir", str(out)])
    return out, results


def test_quick_run_writes_results_table_and_plots(quick):
    out, results = quick
    assert json.loads((out / "results.json").read_text())["runs"].keys() == results["runs"].keys()
    table = (out / "results.md").read_text()
    assert "python -m benchmarks.continual_pretraining.run --quick --output-dir" in table
    for name in run.RUNS:
        assert f"`{name}`" in table
    for png in run.report.plot_files():
        assert (out / png).read_bytes()[:8] == PNG_SIGNATURE, png


def test_quick_run_has_every_method_with_finite_numbers(quick):
    _, results = quick
    assert {record["run"] for record in results["runs"].values()} == set(run.RUNS)
    assert all(math.isfinite(v) and v > 0 for k, v in results["base"].items() if not k.endswith("drift"))
    assert results["base"]["drift"] == results["base"]["switch_drift"] == 0.0
    for key, record in results["runs"].items():
        assert record["curve"]["step"] == [0, 2, 4], key
        assert len(record["train_loss"]) == 4
        for measure in ("new_perplexity", "old_perplexity", "drift", "answer_perplexity", "switch_drift"):
            values = record["curve"][measure]
            assert len(values) == 3 and all(math.isfinite(v) for v in values), (key, measure)
        assert record["trainable_parameters"] > 0
    # the replay rows train the same model as their plain rows, on different data
    assert results["runs"]["full_replay@3e-05"]["train_loss"] != results["runs"]["full@3e-05"]["train_loss"]
    assert results["runs"]["full_replay_samples@3e-05"]["train_loss"] != results["runs"]["full_replay@3e-05"]["train_loss"]


ROUTED_ROWS = {"scale_ffn_routed": "old data", "scale_ffn_routed_samples": "base model samples",
               "scale_routed": "old data", "scale_routed_samples": "base model samples"}  # fmt: skip


def test_learned_route_rows_record_their_router_and_routing(quick):
    out, results = quick
    samples = results["base_samples"]
    assert (out / samples["file"]).is_file() and samples["count"] == run.base_samples_needed(run.parse_args(["--quick"]))
    for name, old_side in ROUTED_ROWS.items():
        record = results["runs"][f"{name}@0.001"]
        router = record["router"]
        assert router["old_side"] == record["old_side"] == old_side
        assert router["base_samples_digest"] == (samples["digest"] if old_side == "base model samples" else None)
        report = router["report"]
        assert report["layer"] == results["settings"]["sizes"]["preserve_layers"]
        for key in ("old_to_base", "new_to_expansion", "first_tokens_old_to_base", "first_tokens_new_to_expansion"):
            assert 0 <= report[key] <= 1, (name, key)
        assert 0.5 <= report["threshold"] <= 1
        assert record["seconds"]["router_fit"] == router["fit_seconds"] > 0
        assert record["route_threshold_sweep"] == {}  # the sweep needs the cosine rule's two heads
        curve = record["curve"]
        for key in ("old_routed_to_preservation", "new_routed_to_preservation", "old_routed_to_preservation_first_tokens",
                    "answer_routed_to_preservation", "switch_routed_to_preservation",
                    "switch_routed_to_preservation_first_tokens"):  # fmt: skip
            assert all(0 <= share <= 1 for share in curve[key]), (name, key)
        assert "drift_on_preservation" in curve and "drift_adaptation_head" not in curve
        assert "new_perplexity_adaptation_head" not in curve
    # full fine-tuning replays the very samples the routed rows' routers read
    assert results["runs"]["full_replay_samples@3e-05"]["base_samples_digest"] == samples["digest"]
    assert results["runs"]["full_replay_samples@3e-05"]["old_side"] == "base model samples"
    section = (out / "results.md").read_text().split("## The learned router against its goals")[1].split("\n## ")[0]
    for name in ROUTED_ROWS:
        assert section.count(f"| `{name}` | 0.001 |") == 2  # the goals and the routing detail
    assert "`full_replay_samples`" not in section
    switched = (out / "results.md").read_text().split("## Text that switches language")[1].split("\n## ")[0]
    assert switched.count(" | 0.001 | ") == sum(record["lr"] == 0.001 for record in results["runs"].values())
    assert "switch_routed_to_preservation" not in results["runs"]["full@3e-05"]["final"]


def test_routed_rows_build_the_router_and_optimizer_they_name(quick):
    """The rows measured before 0.2 keep 0.1.0's router settings (with their own over them); the *_defaults rows set
    nothing but what the README's routed example sets: RouterConfig's defaults, create_scale_optimizer at lr 3e-3,
    and for the samples row no old side given (fit_router draws the base model's samples itself)."""
    from dataclasses import asdict

    from benchmarks.methods import ROUTER_0_1_0
    from peft_scale import RouterConfig

    _, results = quick
    seed = results["settings"]["seed"]
    legacy = results["runs"]["scale_ffn_routed@0.001"]
    assert legacy["router"]["config"] == asdict(RouterConfig(**ROUTER_0_1_0, seed=seed))
    assert "optimizer" not in legacy and legacy["router"]["report"]["calibrate_on"] == "held_out"
    xfit3 = results["runs"]["scale_ffn_routed_w12x4_ema_xfit3_copy@0.001"]["router"]
    assert xfit3["config"] == asdict(RouterConfig(smoothing=0.8, gate="hard", preservation_copy=True, max_old_error=0.003,
                                                  calibrate_on="cross_fitted", seed=seed))  # fmt: skip
    for name, old_source, max_old_error in (("scale_ffn_routed_defaults", "old data", 0.005),
                                            ("scale_ffn_routed_defaults_samples", "base model samples", 0.05)):  # fmt: skip
        (key,) = [key for key, record in results["runs"].items() if record["run"] == name]
        record = results["runs"][key]
        assert record["lr"] == run.README_ROUTED_LR and record["optimizer"] == "create_scale_optimizer(model, lr=lr)"
        assert record["router"]["config"] == asdict(RouterConfig(seed=seed))
        report = record["router"]["report"]
        assert (report["old_source"], report["max_old_error"], report["calibrate_on"]) == (
            old_source, max_old_error, "cross_fitted")
    samples_row = results["runs"][f"scale_ffn_routed_defaults_samples@{run.README_ROUTED_LR:g}"]["router"]
    assert samples_row["old_blocks"] is None and samples_row["report"]["sample_differences"]
    # rows whose options were removed in 0.2 are no longer run
    assert not any(name.endswith(("_ema_old", "_ema_fall", "_ema_fall_copy")) for name in run.RUNS)


def test_the_defaults_rows_train_with_create_scale_optimizer(monkeypatch):
    """The *_defaults rows' optimizer is create_scale_optimizer(model, lr=lr) with its defaults (W12 at 4x); the
    other rows' is AdamW over the runner's groups. (Stopped once the optimizer is made: nothing trains.)"""
    calls = []

    class Made(Exception):
        pass

    def recording(model, **kwargs):
        calls.append(kwargs)
        raise Made

    monkeypatch.setattr(run, "create_scale_optimizer", recording)
    args = run.parse_args(["--quick"])
    model, _ = run.load_model("tiny")
    sizes = run.default_sizes(model.config, args)
    with pytest.raises(Made):
        run.train_run(model, "scale_ffn_routed_defaults", 3e-3, None, None, sizes, args, {"old_data": None})
    assert calls == [{"lr": 3e-3}]
    with pytest.raises(AttributeError):  # past the optimizer, at the text (None here): not create_scale_optimizer's
        run.train_run(model, "scale_ffn_routed_w12x4", 3e-3, None, None, sizes, args, {"old_data": None})
    assert len(calls) == 1


def test_base_samples_are_reused_from_the_output_folder(quick, monkeypatch):
    out, results = quick
    import peft_scale.router_fitting

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled again instead of reusing base_samples.pt")

    monkeypatch.setattr(peft_scale.router_fitting, "sample_base_model", no_sampling)
    args = run.parse_args(["--quick", "--output-dir", str(out)])
    samples, described = run.base_samples(None, args)
    assert described["digest"] == results["base_samples"]["digest"] == run.digest(samples)
    assert samples.shape == (described["count"], args.seq_len)


def test_no_method_drifts_before_training(quick):
    """At step 0 every method computes the base model's logits bit for bit (zero-initialised W12, LoRA B and LLaMA
    Pro output projections; full and freeze are the base model), so KL(base || adapted) is exactly 0."""
    _, results = quick
    for key, record in results["runs"].items():
        assert record["curve"]["drift"][0] == 0.0, key
        assert record["curve"]["switch_drift"][0] == 0.0, key
        assert record["curve"]["old_perplexity"][0] == results["base"]["old_perplexity"], key
        assert record["curve"]["answer_perplexity"][0] == results["base"]["answer_perplexity"], key


def test_route_rows_report_routing_and_no_drift_on_preserved_tokens(quick):
    _, results = quick
    for key in ("scale_route@0.001", "scale_route_replay@0.001"):
        curve = results["runs"][key]["curve"]
        assert all(0 < share <= 1 for share in curve["old_routed_to_preservation"])
        assert all(0 <= share <= 1 for share in curve["new_routed_to_preservation"])
        assert all(drift == 0.0 for drift in curve["drift_on_preservation"])
        sweep = results["runs"][key]["route_threshold_sweep"]
        assert set(sweep) == {"new", "old"}
        assert [float(tau) for tau in sweep["old"]] == list(measures.ROUTE_THRESHOLDS)
        # tau 0.5 is the model's own threshold: the sweep reproduces the routed output's numbers
        assert sweep["old"]["0.5"]["drift"] == pytest.approx(curve["drift"][-1], rel=1e-6, abs=1e-12)
        assert sweep["new"]["0.5"]["perplexity"] == pytest.approx(curve["new_perplexity"][-1], rel=1e-6)
        assert sweep["old"]["0.5"]["routed_to_preservation"] == curve["old_routed_to_preservation"][-1]
        assert all(math.isfinite(v) for v in curve["answer_perplexity_adaptation_head"])
    assert "old_routed_to_preservation" not in results["runs"]["scale_adapt@0.001"]["curve"]
    assert results["runs"]["scale_adapt@0.001"]["route_threshold_sweep"] == {}


def test_report_is_rewritten_from_results_json(quick):
    out, _ = quick
    table = (out / "results.md").read_text()
    (out / "results.md").unlink()
    (out / "tradeoff_drift.png").unlink()
    run.report.main([str(out)])
    assert (out / "results.md").read_text() == table
    assert (out / "tradeoff_drift.png").read_bytes()[:8] == PNG_SIGNATURE


def test_rerun_skips_finished_runs_and_refuses_other_settings(quick, capsys):
    out, results = quick
    again = run.main(["--quick", "--output-dir", str(out), "--methods", "full", "scale_ffn"])
    assert again["runs"] == json.loads(json.dumps(results["runs"]))  # nothing retrained
    assert "full@3e-05: already in" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="other settings"):
        run.main(["--quick", "--output-dir", str(out), "--steps", "3"])


# ------------------------------------------------------------------------------------------------ the measures


def learned_route_model():
    """A tiny FFN-mode SCALE model with a fitted learned router (layer 1 of 2) and perturbed new neurons."""
    from peft import get_peft_model

    from peft_scale import ScaleConfig, fit_router

    config = ScaleConfig(ffn_expansion=16, variant="route", route_rule="learned", preserve_layers=1)
    model = get_peft_model(tiny_llama(), config)
    new, old = random_ids(batch=12, length=16, seed=3) % 64 + 64, random_ids(batch=12, length=16, seed=4) % 64
    fit_router(model, new, old, progress=False)
    perturb_adapter(model, scale=0.5)
    return model.eval()


def half_routed(blocks):
    """``(learned_route_model() with its threshold at the median score of blocks, its router, the base model's
    log-probabilities of blocks)``: about half the tokens go each way."""
    base_logprobs = measures.block_logprobs(tiny_llama(), blocks, 2, "fp32")
    model = learned_route_model()
    router = model.base_model.scale_router["default"]
    with torch.no_grad():
        model(input_ids=blocks)
    assert model.base_model.last_routing.adaptation_logits is None
    router.threshold.fill_(model.base_model.last_routing.scores.median().item())
    return model, router, base_logprobs


def test_learned_route_text_measures_split_the_drift_by_routing_decision():
    blocks = random_ids(batch=4, length=16)
    model, router, base_logprobs = half_routed(blocks)

    result = measures.text_measures(model, blocks, 2, "fp32", base_logprobs, route_thresholds=(0.5, 0.9))
    assert set(result) == {"perplexity", "drift", "routed_to_preservation", "routed_to_preservation_first_tokens",
                           "drift_on_preservation", "drift_on_adaptation"}  # no head-only numbers, no threshold sweep
    share = result["routed_to_preservation"]
    assert 0.3 < share < 0.7
    assert result["drift_on_adaptation"] > 0
    assert result["drift"] == pytest.approx(
        share * result["drift_on_preservation"] + (1 - share) * result["drift_on_adaptation"], rel=1e-5
    )
    with torch.no_grad():
        model(input_ids=blocks[:2])
    first = model.base_model.last_routing.to_preservation[:, : measures.FIRST_TOKENS]
    with torch.no_grad():
        model(input_ids=blocks[2:])
    first = torch.cat([first, model.base_model.last_routing.to_preservation[:, : measures.FIRST_TOKENS]])
    assert result["routed_to_preservation_first_tokens"] == first.float().mean().item()

    router.threshold.fill_(2.0)  # every token to the base model: exactly the base model's computation
    everything = measures.text_measures(model, blocks, 2, "fp32", base_logprobs)
    assert everything["routed_to_preservation"] == 1.0
    assert everything["drift"] == 0.0 and everything["drift_on_preservation"] == 0.0
    assert everything["drift_on_adaptation"] is None
    assert everything["perplexity"] == pytest.approx(base_perplexity(blocks), rel=1e-6)
    router.threshold.fill_(0.0)  # none: the ungated expansion
    nothing = measures.text_measures(model, blocks, 2, "fp32", base_logprobs)
    assert nothing["routed_to_preservation"] == 0.0 and nothing["drift_on_preservation"] is None
    assert nothing["drift"] == pytest.approx(nothing["drift_on_adaptation"], rel=1e-6)

    answers = [measures.ChatAnswer("a", [5, 6, 7], [8, 9]), measures.ChatAnswer("b", [5, 6], [10, 11, 12])]
    assert measures.answer_measures(model, answers, 2, "fp32", pad_id=0)["routed_to_preservation"] == 0.0
    router.threshold.fill_(2.0)
    assert set(measures.answer_measures(model, answers, 2, "fp32", pad_id=0)) == {"perplexity", "routed_to_preservation"}


def test_switch_measures_score_only_the_old_half_after_the_new_one():
    """Text that switches language: the drift and the routing shares count the positions from the switch on."""
    blocks = random_ids(batch=4, length=16)
    model, router, base_logprobs = half_routed(blocks)
    result = measures.switch_measures(model, blocks, 8, base_logprobs, 2, "fp32")
    kl, kept = [], []
    for start in (0, 2):
        with torch.no_grad():
            logits = model(input_ids=blocks[start : start + 2]).logits
        kl.append(measures.token_kl(base_logprobs[start : start + 2], logits))
        kept.append(model.base_model.last_routing.to_preservation)
    kl, kept = torch.cat(kl), torch.cat(kept)
    assert result["drift"] == pytest.approx(kl[:, 8:].mean().item(), rel=1e-6)
    assert result["drift"] != pytest.approx(kl.mean().item(), rel=1e-3)  # not the whole block's
    assert result["routed_to_preservation"] == kept[:, 8:].float().mean().item()
    assert result["routed_to_preservation_first_tokens"] == kept[:, 8 : 8 + measures.FIRST_TOKENS].float().mean().item()
    after, kept_after = kl[:, 8:], kept[:, 8:]
    assert result["drift_on_preservation"] == pytest.approx(after[kept_after].mean().item(), rel=1e-6)
    assert result["drift_on_adaptation"] == pytest.approx(after[~kept_after].mean().item(), rel=1e-6)
    router.threshold.fill_(2.0)  # every token to the base model: no drift after the switch either
    everything = measures.switch_measures(model, blocks, 8, base_logprobs, 2, "fp32")
    assert everything["drift"] == everything["drift_on_preservation"] == 0.0
    assert everything["drift_on_adaptation"] is None
    # a model without routing: the drift only
    assert set(measures.switch_measures(tiny_llama(), blocks, 8, base_logprobs, 2, "fp32")) == {"drift"}


def test_switch_eval_joins_the_first_half_of_new_blocks_to_the_second_half_of_old_ones():
    from benchmarks.continual_pretraining.data import ExperimentText

    new, old = torch.arange(24).view(3, 8), 100 + torch.arange(24).view(3, 8)
    text = ExperimentText(new_train=new, replay_train=None, new_eval=new, old_eval=old, epochs=1.0)
    assert text.switch_at == 4
    assert torch.equal(text.switch_eval, torch.cat([new[:, :4], old[:, 4:]], dim=1))


def test_replay_of_two_old_sources_puts_them_at_the_same_steps():
    from benchmarks.continual_pretraining.data import as_blocks, replay_stream, replayed_rows

    new, old_a, old_b = torch.zeros(40, 3, dtype=torch.long), torch.ones(40, 3, dtype=torch.long), torch.arange(120).view(40, 3) + 2
    a = replay_stream(as_blocks(new), as_blocks(old_a), 0.25, 0, 40)
    b = replay_stream(as_blocks(new), as_blocks(old_b), 0.25, 0, 40)
    assert torch.equal(a[:, 0] != 0, b[:, 0] != 0)  # the same positions
    taken = b[b[:, 0] != 0]
    assert torch.equal(taken, old_b[: len(taken)])  # the first rows of the old source, in order
    assert len(taken) == replayed_rows(0.25, 0, 40) > 0


def route_model(threshold: float):
    from peft import get_peft_model

    from peft_scale import ScaleConfig

    config = ScaleConfig(hidden_expansion=16, ffn_expansion=16, variant="route", preserve_layers=1, route_threshold=threshold,
                         route_rule="cosine")
    model = get_peft_model(tiny_llama(), config)
    perturb_adapter(model, scale=0.5)
    return model.eval()


def test_route_drift_is_zero_exactly_on_tokens_sent_to_the_preservation_head():
    base = tiny_llama()
    blocks = random_ids(batch=4, length=16)
    base_logprobs = measures.block_logprobs(base, blocks, 2, "fp32")
    model = route_model(threshold=0.5)
    with torch.no_grad():
        model(input_ids=blocks)
    routing = model.base_model.last_routing
    cosine = torch.nn.functional.cosine_similarity(routing.preservation_logits, routing.adaptation_logits, dim=-1)
    model.peft_config["default"].route_threshold = cosine.median().item()  # about half the tokens each way

    result = measures.text_measures(model, blocks, 2, "fp32", base_logprobs, route_thresholds=(-1.0, 2.0))
    assert 0.3 < result["routed_to_preservation"] < 0.7
    assert result["drift_on_preservation"] == 0.0
    assert result["drift_on_adaptation"] > 0
    share = result["routed_to_preservation"]
    assert result["drift"] == pytest.approx((1 - share) * result["drift_on_adaptation"], rel=1e-5)
    assert result["drift_adaptation_head"] >= result["drift"]
    # tau -1: every token to the base model's logits; tau 2: none, i.e. the adaptation head alone
    everything, nothing = result["threshold_sweep"]["-1"], result["threshold_sweep"]["2"]
    assert everything == {"routed_to_preservation": 1.0, "drift": 0.0, "perplexity": pytest.approx(base_perplexity(blocks))}
    assert nothing["routed_to_preservation"] == 0.0
    assert nothing["drift"] == pytest.approx(result["drift_adaptation_head"], rel=1e-6)
    assert nothing["perplexity"] == pytest.approx(result["perplexity_adaptation_head"], rel=1e-6)


def base_perplexity(blocks) -> float:
    with torch.no_grad():
        return math.exp(tiny_llama()(input_ids=blocks, labels=blocks).loss.item())


def test_text_measures_perplexity_and_drift_by_hand():
    base, other = tiny_llama(seed=0), tiny_llama(seed=1)
    blocks = random_ids(batch=3, length=10)
    base_logprobs = measures.block_logprobs(base, blocks, 2, "fp32")
    same = measures.text_measures(base, blocks, 2, "fp32", base_logprobs)
    assert same["drift"] == 0.0
    with torch.no_grad():
        loss = base(input_ids=blocks, labels=blocks).loss
        other_logprobs = torch.log_softmax(other(input_ids=blocks).logits, -1)
    assert same["perplexity"] == pytest.approx(math.exp(loss.item()), rel=1e-5)
    kl = (base_logprobs.exp() * (base_logprobs - other_logprobs)).sum(-1).mean()
    assert measures.text_measures(other, blocks, 2, "fp32", base_logprobs)["drift"] == pytest.approx(kl.item(), rel=1e-5)


def test_answer_perplexity_scores_only_the_answer_tokens():
    model = tiny_llama()
    answers = [measures.ChatAnswer("a", [5, 6, 7], [8, 9]), measures.ChatAnswer("b", [5, 6], [10, 11, 12])]
    with torch.no_grad():
        nll = 0.0
        for answer in answers:
            ids = torch.tensor([answer.prompt_ids + answer.answer_ids])
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0], -1)
            start = len(answer.prompt_ids)
            nll -= sum(logprobs[start - 1 + i, token].item() for i, token in enumerate(answer.answer_ids))
    expected = math.exp(nll / 5)
    assert measures.answer_measures(model, answers, 2, "fp32", pad_id=0) == {"perplexity": pytest.approx(expected, rel=1e-5)}


def test_default_sizes_for_smollm2_shapes():
    from transformers import LlamaConfig

    smollm2 = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, head_dim=64)  # fmt: skip
    args = run.parse_args([])
    assert run.default_sizes(smollm2, args) == MethodSizes(256, 192, 8, 6)
    args = run.parse_args(["--ffn-expansion", "64", "--preserve-layers", "0", "--llama-pro-blocks", "10"])
    assert run.default_sizes(smollm2, args) == MethodSizes(64, 192, 0, 10)
    args = run.parse_args(["--scale-option", "adapt_modules=attention", "--scale-option", "route_threshold=0.9"])
    assert run.default_sizes(smollm2, args).scale_options == {"adapt_modules": "attention", "route_threshold": 0.9}


def test_planned_runs_put_every_methods_middle_learning_rate_first():
    args = run.parse_args(["--methods", "full", "scale_route"])
    assert run.planned_runs(args) == [
        ("full", 3e-5), ("scale_route", 1e-3), ("full", 1e-5), ("scale_route", 3e-4), ("full", 1e-4), ("scale_route", 3e-3)
    ]  # fmt: skip
    assert run.planned_runs(run.parse_args(["--methods", "lora", "--lrs", "1", "2"])) == [("lora", 2.0), ("lora", 1.0)]


def test_documents_split_at_blank_lines_and_blocks_repeat(tmp_path):
    from datasets import Dataset

    (tmp_path / "a.txt").write_text("one\nline two\n\n\nthree\n\n")
    (tmp_path / "b.txt").write_text("four")
    assert documents_or_summaries([tmp_path / "a.txt", tmp_path / "b.txt"], "es") == ["one\nline two", "three", "four"]
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="No text"):
        documents_or_summaries([tmp_path / "empty.txt"], "es")
    blocks = Dataset.from_dict({"input_ids": [[1], [2], [3]]})
    assert repeat_to(blocks, 7)["input_ids"] == [[1], [2], [3], [1], [2], [3], [1]]
