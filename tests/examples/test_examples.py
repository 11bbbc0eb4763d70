"""The examples in examples/: each runs end to end in its ``--tiny`` configuration (a tiny random Llama with
SmolLM2's tokenizer and a few bundled summaries), plus their shared helpers (replay mixing, text files, the
forgetting/learning perplexity callback)."""

from __future__ import annotations

import json
import math

import pytest
from conftest import run_python
from datasets import Dataset
from huggingface_hub import ModelCard
from transformers import TrainerControl, TrainerState, TrainingArguments

pytestmark = pytest.mark.slow  # each run loads SmolLM2's tokenizer from the bundled GGUF file (~8 s)


def run_example(script: str, *flags: str) -> str:
    return run_python(f"examples/{script}", "--tiny", *flags)


def assert_scale_adapter(folder, ffn_expansion: int = 16) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "SCALE" and config["ffn_expansion"] == ffn_expansion
    assert (folder / "adapter_model.safetensors").is_file()
    assert "## SCALE adapter" in ModelCard.load(folder / "README.md").text


# --------------------------------------------------------------------------------------------- the examples


def test_continual_pretraining_with_replay_and_mer_logs_forgetting_and_learning(tmp_path):
    out = run_example(
        "continual_pretraining.py", "--replay", "0.25", "--mer", "2", "0.5", "--output-dir", str(tmp_path)
    )
    assert "replay fraction 0.25" in out
    table = out.split("Held-out perplexity (old text: forgetting; new text: learning)\n")[1].splitlines()
    rows = [line.split() for line in table[1:4]]
    assert [row[0] for row in rows] == ["0", "2", "4"]  # eval_on_start, then every --eval-steps 2 of 4 steps
    assert all(math.isfinite(float(value)) for row in rows for value in row[1:])
    assert_scale_adapter(tmp_path)


def test_continual_pretraining_with_the_learned_router(tmp_path):
    """--variant route: the router is fitted (on the new text, against the base model's samples) before training."""
    from safetensors.torch import load_file

    run_example(
        "continual_pretraining.py", "--variant", "route", "--preserve-layers", "1", "--replay", "0.25",
        "--output-dir", str(tmp_path),
    )
    assert_scale_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["route_rule"], config["layers_to_transform"]) == ("learned", [1])
    assert config["router_report"]["old_source"] == "base model samples"
    saved = load_file(tmp_path / "adapter_model.safetensors")
    # the router lives in the first module it gates: layer 1's down_proj
    assert saved["base_model.model.model.layers.1.mlp.down_proj.scale_router.fitted"].item() == 1


def test_sft_with_trl(tmp_path):
    out = run_example("sft_trl.py", "--output-dir", str(tmp_path))
    assert "\nQ: ¿Qué es " in out and "\nA: " in out
    assert_scale_adapter(tmp_path)


def test_custom_accelerate_loop(tmp_path):
    out = run_example("accelerate_loop.py", "--grad-accum", "2", "--output-dir", str(tmp_path))
    assert [line.split()[:2] for line in out.splitlines() if line.startswith("step")] == [
        ["step", str(i)] for i in (1, 2, 3, 4)
    ]
    assert "Held-out es loss: " in out and "1 process(es)" in out
    assert_scale_adapter(tmp_path)


# ------------------------------------------------------------------------------------------ shared helpers


def test_replay_mix_draws_the_asked_fraction_of_old_examples_and_nothing_else():
    from text_blocks import replay_mix

    new = Dataset.from_dict({"source": ["new"] * 4000, "i": list(range(4000))})
    old = Dataset.from_dict({"source": ["old"] * 4000, "i": list(range(4000))})
    mixed = replay_mix(new, old, 0.2, seed=0)
    sources = mixed["source"]
    # first_exhausted: the mix stops when the new source runs out (the old one, sampled 1 in 5, is far from empty)
    assert sources.count("new") == 4000
    assert abs(sources.count("old") / len(sources) - 0.2) < 0.02  # binomial sd 0.006 at n = 5000
    # each source's examples keep their order, and none repeats
    assert [i for s, i in zip(sources, mixed["i"]) if s == "new"] == list(range(4000))
    olds = [i for s, i in zip(sources, mixed["i"]) if s == "old"]
    assert olds == list(range(len(olds)))
    assert replay_mix(new, old, 0.2, seed=0)["source"] == sources  # seeded
    assert replay_mix(new, old, 0.0, seed=0) is new
    with pytest.raises(ValueError, match="0 <= fraction < 1"):
        replay_mix(new, old, 1.0, seed=0)


def test_read_documents_by_line_paragraph_and_file(tmp_path):
    from text_blocks import read_documents

    (tmp_path / "a.txt").write_text("one\ntwo\n\nthree\n\n\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("four", encoding="utf-8")
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    assert read_documents(files, "line") == ["one", "two", "three", "four"]
    assert read_documents(files, "paragraph") == ["one\ntwo", "three", "four"]
    assert read_documents(files, "document") == ["one\ntwo\n\nthree", "four"]
    with pytest.raises(ValueError, match="choose one of"):
        read_documents(files, "sentence")


def test_forgetting_learning_callback_adds_perplexity_and_its_change_to_the_logs(tmp_path):
    from continual_pretraining import ForgettingLearningCallback

    callback, state = ForgettingLearningCallback(), TrainerState()
    args, control = TrainingArguments(output_dir=str(tmp_path), report_to=[]), TrainerControl()
    first_loss = {"old": 2.0, "new": 3.0}
    for step, old_loss, new_loss in [(0, 2.0, 3.0), (5, 2.5, 2.0)]:
        state.global_step = step
        for name, loss in (("old", old_loss), ("new", new_loss)):
            logs = {f"eval_{name}_loss": loss, "epoch": 0.0}
            state.log_history.append({**logs, "step": step})  # what Trainer.log stores before the callbacks
            callback.on_log(args, state, control, logs=logs)
            expected = {
                f"eval_{name}_perplexity": math.exp(loss),
                f"eval_{name}_perplexity_change": math.exp(loss) / math.exp(first_loss[name]) - 1,
            }
            for key, value in expected.items():
                assert logs[key] == pytest.approx(value, rel=1e-12)
                assert state.log_history[-1][key] == logs[key]
    assert state.log_history[-1]["eval_new_perplexity_change"] == pytest.approx(math.exp(2.0 - 3.0) - 1)
    training_log = {"loss": 1.0}
    callback.on_log(args, state, control, logs=training_log)
    assert training_log == {"loss": 1.0}  # training losses are not evaluation sets
