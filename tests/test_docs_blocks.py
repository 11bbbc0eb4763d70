"""The code blocks of the docs pages (docs/**/*.md): each python block runs here on a tiny model, with the page's
sizes replaced by the tiny model's (each replacement asserted to apply), or carries a marker saying where it runs or
why it cannot (``conftest.check_block_marker``); each shell block's files, extras and flags exist. A block uses the
names its page describes (``base``, ``name``, ``new_blocks``, ...): ``inputs`` gives them tiny values."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import REPO, DocBlock, check_block_marker, check_shell_block, doc_blocks
from datasets import Dataset
from peft import PeftModel, get_peft_model
from tiny_models import VOCAB, random_ids, tiny_llama
from transformers import TrainingArguments

from peft_scale import ScaleConfig

PAGES = sorted(path.relative_to(REPO).as_posix() for path in (REPO / "docs").rglob("*.md"))
BLOCKS = [block for page in PAGES for block in doc_blocks(page)]
RUN = [block for block in BLOCKS if check_block_marker(block) == "run"]
SKIP = [block for block in BLOCKS if check_block_marker(block) == "skip"]
SHELL = [block for block in BLOCKS if block.language == "bash"]

# (page, heading) -> the page's sizes (a real model's) and the tiny model's (2 layers, hidden 32 in 4 heads of 8 over
# 2 key-value heads: hidden_expansion in multiples of 16; an FFN of 64).
SIZES = {
    ("docs/full-width.md", "# Full width and the variants"): {
        "hidden_expansion=192,": "hidden_expansion=16,", "ffn_expansion=512,": "ffn_expansion=8,",
        "preserve_layers=8,": "preserve_layers=1,",
    },
}  # fmt: skip


def inputs(tmp_path) -> dict:
    """Tiny values of the names the docs' blocks take as given."""
    base = tiny_llama()
    base.save_pretrained(tmp_path / "tiny")
    ids = random_ids(batch=8, length=16, vocab=VOCAB, seed=3).tolist()
    new_blocks = Dataset.from_dict({"input_ids": ids[:6], "labels": ids[:6]})
    old_blocks = Dataset.from_dict({"input_ids": ids[6:] * 2, "labels": ids[6:] * 2})
    return dict(
        base=base, name=str(tmp_path / "tiny"), path=str(tmp_path / "tiny"), new_blocks=new_blocks,
        old_blocks=old_blocks, f=0.25, train=new_blocks,
        peft_model=get_peft_model(copy.deepcopy(base), ScaleConfig(ffn_expansion=8)),
        args=TrainingArguments(str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, report_to=[]),
    )  # fmt: skip


def test_every_block_is_run_checked_or_says_why_not():
    kinds = {block.where: check_block_marker(block) for block in BLOCKS}
    assert PAGES and "docs/router.md" in PAGES
    assert RUN, "no docs block runs here"
    skipped = [where for where, kind in kinds.items() if kind == "skip"]
    assert len(skipped) <= 1, f"more docs blocks skipped than before ({skipped}): run them on a tiny model"


@pytest.mark.parametrize("block", RUN + SKIP, ids=lambda block: f"{block.page}:{block.line}")
def test_block_runs(block, tmp_path, monkeypatch):
    if block in SKIP:
        pytest.skip(f"{block.where}: {block.marker}")
    code = block.code
    for page_size, tiny_size in SIZES.get((block.page, block.heading), {}).items():
        assert page_size in code, f"{block.where} no longer says {page_size}: update SIZES"
        code = code.replace(page_size, tiny_size)
    namespace = inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, block.where, "exec"), namespace)
    CHECKS.get(block.page, lambda namespace: None)(namespace)


def check_full_width(namespace):
    model = namespace["model"]
    assert isinstance(model, PeftModel) and model.peft_config["default"].variant == "route"
    ids = random_ids()
    with torch.no_grad():  # the cosine rule at initialisation: every token gets the base model's logits
        routed = model(ids).logits
        with model.disable_adapter():
            torch.testing.assert_close(routed, model(ids).logits, rtol=0, atol=1e-5)


def check_quantized(namespace):
    import bitsandbytes as bnb

    down = namespace["model"].base_model.model.model.layers[0].mlp.down_proj
    assert isinstance(down.base_layer, bnb.nn.Linear4bit) and down.base_layer.weight.quant_type == "nf4"


def check_replay_mer(namespace):
    if "trainer" in namespace:  # the MER block: the callback is the Trainer's, and it trains
        trainer = namespace["trainer"]
        assert any(type(callback).__name__ == "MERCallback" for callback in trainer.callback_handler.callbacks)
        trainer.train()
    else:  # the replay block: a mix of both sources
        train = namespace["train"]
        rows = {tuple(row) for row in train["input_ids"]}
        assert rows & {tuple(row) for row in namespace["old_blocks"]["input_ids"]}
        assert rows & {tuple(row) for row in namespace["new_blocks"]["input_ids"]}


CHECKS = {"docs/full-width.md": check_full_width, "docs/quantized.md": check_quantized, "docs/replay-mer.md": check_replay_mer}


@pytest.mark.parametrize("block", SHELL, ids=lambda block: f"{block.page}:{block.line}")
def test_shell_block_names_what_exists(block):
    check_shell_block(block)


@pytest.mark.parametrize(
    "language, code, marker, message",
    [
        ("bash", "python examples/no_such_example.py\n", "", "does not exist"),
        ("bash", 'pip install ".[no_such_extra]"\n', "", "no extra"),
        ("bash", "python examples/continual_pretraining.py --no-such-flag 1\n", "", "has no --no-such-flag"),
        ("python", "x = 1\n", "run by tests/no_such_test.py", "does not exist"),
        ("python", "x = 1\n", "same as README.md", "not the same"),
        ("python", "x = 1\n", "skip:", "unknown test marker"),
        ("console", "x\n", "", "fence language"),
    ],
)  # fmt: skip
def test_the_checks_fail_on_a_broken_block(language, code, marker, message):
    block = DocBlock("docs/x.md", 1, language, code, "# X", marker)
    with pytest.raises(AssertionError, match=message):
        check_shell_block(block) if language == "bash" else check_block_marker(block)
