"""benchmarks/biography: the generator is seeded, the metrics are exact, and the --quick pipeline writes its outputs.

The --quick run (~10 s here) checks that every stage and method runs and that the outputs are complete; it asserts
nothing about the numbers (a few steps on a tiny model mean nothing).
"""

from __future__ import annotations

import contextlib
import json
import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO))  # the `benchmarks` package

from benchmarks.biography.data import (  # noqa: E402
    ATTRIBUTES,
    EMPLOYERS,
    biographies,
    build_tokenizer,
    make_profiles,
    make_tasks,
    qa_pairs,
)
from benchmarks.biography.train import IGNORE, QAEvalSet, encode_qa, qa_accuracy, repeat_shuffled  # noqa: E402


def test_generator_is_deterministic_and_seeded():
    first = make_tasks(30, 10, seed=7)
    assert first == make_tasks(30, 10, seed=7)
    assert first != make_tasks(30, 10, seed=8)
    assert biographies(first[0], 3, seed=1) == biographies(first[0], 3, seed=1)
    assert biographies(first[0], 3, seed=1) != biographies(first[0], 3, seed=2)


def test_tasks_are_disjoint_people_with_consistent_attributes():
    task0, task1 = make_tasks(50, 20, seed=0)
    names0, names1 = {p.name for p in task0}, {p.name for p in task1}
    assert len(names0) == 50 and len(names1) == 20 and not names0 & names1
    assert all(EMPLOYERS[p.employer] == p.employer_city for p in task0 + task1)
    with pytest.raises(ValueError, match="unique names"):
        make_profiles(10**6, seed=0)


def test_every_biography_states_all_six_attributes_in_shuffled_order():
    profile = make_profiles(1, seed=3)[0]
    bios = biographies([profile], 8, seed=0)
    assert len(bios) == 8 and len(set(bios)) > 1
    for bio in bios:
        assert bio.count(".") == 6 and bio.count(profile.name) == 6
        for attribute in ATTRIBUTES:
            assert profile.value(attribute) in bio


def test_tokenizer_knows_every_generated_word():
    tokenizer = build_tokenizer()
    task0, task1 = make_tasks(100, 50, seed=0)
    words = {w for text in biographies(task0 + task1, 2, seed=0) for w in text.split()}
    words |= {w for pair in qa_pairs(task0 + task1) for w in f"{pair.prompt} {pair.answer}".split()}
    ids = tokenizer.convert_tokens_to_ids(sorted(words))
    assert tokenizer.unk_token_id not in ids and len(set(ids)) == len(words)
    assert tokenizer.decode(tokenizer(" ".join(sorted(words)))["input_ids"]) == " ".join(sorted(words))


def test_qa_encoding_puts_the_loss_on_the_answer_only():
    tokenizer = build_tokenizer()
    pair = qa_pairs(make_profiles(1, seed=0))[0]  # the birth date: "Month D , YYYY" (4 tokens)
    row = encode_qa(tokenizer, pair)
    prompt_length = 1 + len(pair.prompt.split())
    assert row["labels"][:prompt_length] == [IGNORE] * prompt_length
    assert row["labels"][prompt_length:] == row["input_ids"][prompt_length:]
    assert tokenizer.convert_ids_to_tokens(row["input_ids"][prompt_length:-1]) == pair.answer.split()
    assert row["input_ids"][-1] == tokenizer.eos_token_id


class Oracle(torch.nn.Module):
    """Predicts the true next token of ``targets`` everywhere, except at the (row, position) pairs in ``wrong``.

    Serves the rows of ``targets`` in order over successive calls (``qa_accuracy`` evaluates in chunks).
    """

    def __init__(self, targets: torch.Tensor, vocab: int, wrong=()):
        super().__init__()
        self.next_ids = torch.roll(targets, -1, dims=1)
        for row, position in wrong:
            self.next_ids[row, position] = (self.next_ids[row, position] + 1) % vocab
        self.vocab, self.served = vocab, 0

    def forward(self, input_ids, attention_mask=None):
        next_ids = self.next_ids[self.served : self.served + input_ids.shape[0]]
        self.served += input_ids.shape[0]
        return type("Output", (), {"logits": torch.nn.functional.one_hot(next_ids, self.vocab).float()})


def test_qa_accuracy_counts_first_token_and_exact_match():
    tokenizer = build_tokenizer()
    pairs = qa_pairs(make_profiles(2, seed=0))  # 12 questions; index 0 and 6 are birth dates (4 answer tokens)
    eval_set = QAEvalSet.build(tokenizer, pairs)
    vocab = len(tokenizer)
    perfect = qa_accuracy(Oracle(eval_set.input_ids, vocab), eval_set, "cpu", torch.no_grad)
    assert perfect == {"first_token": 1.0, "exact_match": 1.0}
    start = eval_set.answer_start
    # question 0: its 3rd answer token wrong (first token right); question 6: its first token wrong;
    # question 1: the token after the answer (</s>) wrong, which neither metric looks at.
    wrong = [(0, start[0].item() + 1), (6, start[6].item() - 1), (1, (start[1] + eval_set.answer_length[1]).item() - 1)]
    scores = qa_accuracy(Oracle(eval_set.input_ids, vocab, wrong), eval_set, "cpu", torch.no_grad, chunk=5)
    assert scores == {"first_token": 11 / 12, "exact_match": 10 / 12}


def test_repeat_shuffled_is_whole_shuffled_epochs():
    from datasets import Dataset

    data = Dataset.from_dict({"x": list(range(10))})
    stream = repeat_shuffled(data, 25, seed=0)["x"]
    assert len(stream) == 25 and sorted(stream[:10]) == sorted(stream[10:20]) == list(range(10))
    assert stream == repeat_shuffled(data, 25, seed=0)["x"] and stream[:10] != stream[10:20]


def test_quick_run_writes_complete_results(tmp_path):
    from benchmarks.biography.run import METRICS, README_RECIPE, README_RECIPE_ROWS, ROUTED_ROWS, ROWS, main
    from peft_scale import RouterConfig

    result = main(["--quick", "--output-dir", str(tmp_path)])
    for name in ("results.json", "results.md", "task0_first_token.png", "task1_first_token.png", "tradeoff.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["table"]) == set(saved["sweep"]) == set(ROWS)
    for row, entry in saved["table"].items():
        run = saved["sweep"][row][str(entry["lr"])]
        assert len(run["curve"]["step"]) >= 2 and run["curve"]["step"][-1] == saved["settings"]["continual_steps"]
        for metric in METRICS:
            assert all(0.0 <= value <= 1.0 for value in run["curve"][metric]), (row, metric)
            assert entry[metric] == run["curve"][metric][-1]
        assert entry["trainable_parameters"] > 0
    route = saved["sweep"]["scale_route"][str(saved["table"]["scale_route"]["lr"])]["curve"]
    for key in ("to_preservation", "preservation_first_token", "adaptation_first_token"):  # routing diagnostics
        assert all(0.0 <= value <= 1.0 for value in route[f"task0_{key}"] + route[f"task1_{key}"]), key
    assert route["task1_first_token_tau_0.5"] == route["task1_first_token"]  # the default threshold, recomputed
    assert "task0_to_preservation" not in saved["sweep"]["scale_adapt"][str(saved["table"]["scale_adapt"]["lr"])]["curve"]
    assert 0.0 <= saved["pretraining"]["qa_after_stage2"]["task0_first_token"] <= 1.0
    assert "python -m benchmarks.biography.run --quick" in (tmp_path / "results.md").read_text()
    assert result["table"].keys() == saved["table"].keys()
    assert (tmp_path / "route_thresholds.png").stat().st_size > 0
    for row in ROUTED_ROWS:  # the learned router: fitted before stage 3, its report kept, its routing diagnosed
        run = saved["sweep"][row][str(saved["table"][row]["lr"])]
        for key in ("old_to_base", "new_to_expansion", "first_tokens_old_to_base", "first_tokens_new_to_expansion"):
            assert 0.0 <= run["router"][key] <= 1.0, (row, key)
        # just above 1 (float32's next value): no token reaches the expansion (fit_router warns), as a smoke run can give
        assert 0.5 <= run["router"]["threshold"] <= 1.0 + 2 ** -23
        assert run["router"]["layer"] == saved["settings"]["sizes"]["preserve_layers"]
        # "+fitted": the threshold set on all Task-0 QA; None (the *_defaults rows): RouterConfig's own default
        assert run["router"]["calibrate_on"] == (ROUTED_ROWS[row][2] or RouterConfig().calibrate_on)
        for task in ("task0", "task1"):
            curve = run["curve"]
            assert all(0.0 <= v <= 1.0 for v in curve[f"{task}_to_preservation"] + curve[f"{task}_to_base_answer"])
            right = curve[f"{task}_first_token_right_at_base"][-1] + curve[f"{task}_first_token_right_at_expansion"][-1]
            assert right == pytest.approx(curve[f"{task}_first_token"][-1])
        assert saved["bar"][row]["meets_goal"] in (True, False)
    for row in ("scale_ffn_routed+samples", "scale_routed+samples"):  # fitted on the samples full+replay_samples replays
        router = saved["sweep"][row][str(saved["table"][row]["lr"])]["router"]
        assert router["old_source"] == "base model samples" and router["samples_equal_replay_samples"] is True
    for row in ("scale_ffn_routed+format", "scale_routed+format"):  # the draws full+replay_format_samples replays
        router = saved["sweep"][row][str(saved["table"][row]["lr"])]["router"]
        assert router["old_source"] == "base model samples in the new data's format"
        assert router["samples_equal_replay_samples"] is True and 3 <= router["samples_kept"] <= router["num_samples"]
    for row in README_RECIPE_ROWS:  # the README's example: its rate only, RouterConfig() with nothing else set
        assert list(saved["sweep"][row]) == [str(README_RECIPE["lr"])]
        router = saved["sweep"][row][str(README_RECIPE["lr"])]["router"]
        assert router["max_old_error"] is not None and router["layer"] == saved["settings"]["sizes"]["preserve_layers"]
    samples = saved["sweep"]["scale_ffn_routed_defaults+samples"][str(README_RECIPE["lr"])]["router"]
    assert samples["old_source"] == "base model samples" and samples["sample_differences"]["median_length"]["new"] > 0
    assert "| scale_routed+samples |" in (tmp_path / "results.md").read_text()
    assert "| scale_routed+format |" in (tmp_path / "results.md").read_text()

    notes = tmp_path / "notes.md"
    notes.write_text("SCALE-Route's finding goes here.")
    main(["--render", str(tmp_path / "results.json"), "--notes", str(notes)])  # re-render with findings
    assert "## Findings\n\nSCALE-Route's finding goes here." in (tmp_path / "results.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["sweep"] == saved["sweep"]

    # --merge: a run of one row at another learning rate joins the existing results (the same stage-2 model)
    main(["--quick", "--output-dir", str(tmp_path), "--methods", "scale_ffn_routed", "--lr", "scale_ffn_routed=0.01",
          "--merge"])
    merged = json.loads((tmp_path / "results.json").read_text())
    assert set(merged["sweep"]["scale_ffn_routed"]) == {str(saved["table"]["scale_ffn_routed"]["lr"]), "0.01"}
    assert {row: runs for row, runs in merged["sweep"].items() if row != "scale_ffn_routed"} == {
        row: runs for row, runs in saved["sweep"].items() if row != "scale_ffn_routed"}
    assert merged["command"] == saved["command"] and merged["merged_runs"][0]["rows"] == ["scale_ffn_routed"]
    assert "SCALE-Route's finding goes here." in (tmp_path / "results.md").read_text()  # the notes are kept
    with pytest.raises(SystemExit, match="--merge: this run does not match"):
        main(["--quick", "--output-dir", str(tmp_path), "--methods", "full", "--size", "ffn_expansion=8", "--merge"])


def test_the_readme_recipe_rows_build_routerconfig_defaults():
    """The ``*_defaults`` rows build ``RouterConfig()`` with nothing set (``+fitted``: its one field), whatever the
    0.1.0 settings the other routed rows carry; a ``--scale-option router=...`` still reaches them."""
    import dataclasses

    from benchmarks.biography.run import Experiment, Settings
    from benchmarks.methods import scale_config
    from peft_scale import RouterConfig

    experiment = Experiment(Settings.quick(), torch.device("cpu"), "fp32")
    config = scale_config("scale_ffn_routed", experiment.row_sizes("scale_ffn_routed_defaults"))
    assert config.router == RouterConfig()
    fitted = scale_config("scale_ffn_routed", experiment.row_sizes("scale_ffn_routed_defaults+fitted"))
    assert fitted.router == RouterConfig(calibrate_on="fitted")
    assert scale_config("scale_ffn_routed", experiment.row_sizes("scale_ffn_routed")).router != RouterConfig()
    experiment.settings.sizes = dataclasses.replace(experiment.settings.sizes, scale_options={"router": {"hidden": 8}})
    assert scale_config("scale_ffn_routed", experiment.row_sizes("scale_ffn_routed_defaults")).router == RouterConfig(hidden=8)


def test_train_clips_the_gradient_norm_when_asked(monkeypatch):
    """``max_grad_norm`` (the README recipe's, as the ``Trainer`` clips): the gradient AdamW steps with has at most
    that norm; without it, its whole norm."""
    from datasets import Dataset

    from benchmarks.biography.train import train

    class Regression(torch.nn.Module):  # what the loop calls: model(input_ids=..., labels=...).loss
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(3))

        def forward(self, input_ids, labels):
            loss = ((self.weight[input_ids].sum(-1) - labels.float().sum(-1)) ** 2).mean()
            return type("Output", (), {"loss": loss})()

    def collate(rows):
        return {key: torch.tensor([row[key] for row in rows]) for key in ("input_ids", "labels")}

    norms, step = [], torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        norms.append(torch.cat([p.grad.flatten() for group in self.param_groups for p in group["params"]]).norm().item())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    rows = Dataset.from_dict({"input_ids": [[0, 1], [2, 2]], "labels": [[5, 5], [7, 0]]})
    for max_grad_norm in (0.5, None):
        train(Regression(), rows, collator=collate, batch_size=2, lr=0.1, device=torch.device("cpu"),
              autocast=contextlib.nullcontext, scheduler="constant", max_grad_norm=max_grad_norm)
    # loss ((w0 + w1 - 10)^2 + (2 w2 - 7)^2) / 2 at w = 1: gradient (-8, -8, -10), norm sqrt(228) > 0.5
    assert norms == pytest.approx([0.5, 228 ** 0.5])


def test_w12_lr_ratio_changes_the_scale_rows_only(tmp_path):
    """``--w12-lr-ratio``: SCALE's W12 trains at its own rate (the run records it); full fine-tuning has no W12 and
    trains exactly as without it."""
    from benchmarks.biography.run import main

    runs = {}
    for ratio in ("1", "8"):
        out = tmp_path / ratio
        runs[ratio] = main(["--quick", "--output-dir", str(out), "--methods", "full", "scale_ffn", "--w12-lr-ratio", ratio,
                            "--cache-dir", str(tmp_path / "cache")])
    assert runs["8"]["settings"]["w12_lr_ratio"] == 8.0 and runs["1"]["settings"]["w12_lr_ratio"] == 1.0
    assert runs["8"]["pretraining"] == runs["1"]["pretraining"]  # the same stage-2 model (cached once)
    (lr,) = runs["1"]["sweep"]["full"]
    assert runs["8"]["sweep"]["full"][lr]["final_loss"] == runs["1"]["sweep"]["full"][lr]["final_loss"]
    (lr,) = runs["1"]["sweep"]["scale_ffn"]
    assert runs["8"]["sweep"]["scale_ffn"][lr]["final_loss"] != runs["1"]["sweep"]["scale_ffn"][lr]["final_loss"]


def test_format_rows_fit_with_the_given_format_share_and_max_old_error(tmp_path, monkeypatch):
    """``--format-share`` / ``--format-max-old-error`` reach the +format rows' router (the run records them): the
    format share in ``BaseModelSamples``, the bound in its ``RouterConfig``; the other routed rows keep 0.1.0's."""
    from benchmarks.biography import run
    from peft_scale import BaseModelSamples

    calls = {}
    original = run.fit_method_router

    def recording(model, new, old=None, **kwargs):
        name = "format" if isinstance(old, BaseModelSamples) and old.in_new_data_format else "task0"
        calls[name] = (old, model.peft_config["default"].router)
        return original(model, new, old, **kwargs)

    monkeypatch.setattr(run, "fit_method_router", recording)
    result = run.main(["--quick", "--output-dir", str(tmp_path), "--methods", "scale_ffn_routed+format",
                       "scale_ffn_routed", "--format-share", "0.1", "--format-max-old-error", "0.02"])
    assert result["settings"]["router_format_share"] == 0.1 and result["settings"]["router_format_max_old_error"] == 0.02
    samples, router = calls["format"]
    assert samples.format_share == 0.1 and samples.count == result["settings"]["router_format_samples"]
    assert router.max_old_error == 0.02 and router.hidden == result["settings"]["router_hidden"]
    _, router = calls["task0"]
    assert router.max_old_error == run.ROUTER_0_1_0["max_old_error"] and router.gate == "hard"
    (fitted,) = result["sweep"]["scale_ffn_routed+format"].values()
    assert fitted["router"]["max_old_error"] == 0.02
