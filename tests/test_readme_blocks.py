"""Every code block of README.md is tested: each python block runs here on a tiny model (with the README's sizes
replaced by the tiny model's, each replacement asserted to apply) or names the test that runs it; each shell block's
files, extras and flags exist (``conftest.check_shell_block``). The README's markers and their meaning:
``conftest.check_block_marker``."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, check_block_marker, check_shell_block, doc_blocks
from peft import PeftModel, get_peft_model
from tiny_models import random_ids, tiny_llama
from transformers import AutoModelForCausalLM

from peft_scale import ScaleConfig

BLOCKS = doc_blocks("README.md")
RUN = [block for block in BLOCKS if check_block_marker(block) == "run"]
SHELL = [block for block in BLOCKS if block.language == "bash"]


def test_every_block_is_run_checked_or_named():
    kinds = [check_block_marker(block) for block in BLOCKS]
    assert "skip" not in kinds, "README.md: every python block runs (here or in the test its marker names)"
    python = [block for block in BLOCKS if block.language == "python"]
    assert len(python) == 3 and len(RUN) == 2, "README.md's python blocks changed: check what runs them"


@pytest.mark.parametrize("block", SHELL, ids=lambda block: f"line{block.line}")
def test_shell_block_names_what_exists(block):
    check_shell_block(block)


def test_install_pins_the_torch_ci_installs():
    install = next(block for block in SHELL if block.heading == "## Install")
    assert "pip install torch==2.13.0" in install.code and "pip install -q torch==2.13.0" in (REPO / ".ci/run").read_text()


def test_quick_start_runs_and_merges_into_a_plain_checkpoint(tmp_path, monkeypatch):
    block = next(block for block in RUN if block.heading == "## Quick start")
    tiny_llama().save_pretrained(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    hub_id = 'name = "HuggingFaceTB/SmolLM2-135M"'
    assert hub_id in block.code, "the quick start no longer names its model as before: update this test"
    code = block.code.replace(hub_id, f"name = {str(tmp_path / 'base')!r}")  # the tiny model, offline
    namespace = {}
    exec(compile(code, block.where, "exec"), namespace)
    assert isinstance(namespace["model"], PeftModel)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")  # no peft needed
    assert merged.config.intermediate_size == 64 + 64
    ids = random_ids()
    with torch.no_grad():  # untrained: the merged model computes the base model's logits
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        torch.testing.assert_close(merged(ids).logits, base(ids).logits, rtol=0, atol=1e-5)


def test_naming_your_own_ffn_builds_that_config(tmp_path):
    block = next(block for block in RUN if block.heading == "## Supported architectures")
    config = eval(compile(block.code, block.where, "eval"), {"ScaleConfig": ScaleConfig})
    assert config.ffn_expansion == 64 and set(config.target_modules) == {"w_gate", "w_val", "w_out"}

    class Mlp(torch.nn.Module):  # an FFN with the names the README's block gives
        def __init__(self):
            super().__init__()
            self.w_gate, self.w_val, self.w_out = torch.nn.Linear(8, 16), torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

        def forward(self, x):
            return self.w_out(torch.nn.functional.silu(self.w_gate(x)) * self.w_val(x))

    mlp, x = Mlp(), torch.randn(3, 8)
    expected = mlp(x)
    model = get_peft_model(mlp, config)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)  # the base model's output at initialisation
    trainable = {name.removeprefix("base_model.model."): tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {  # 64 new neurons: rows of both input projections, columns of the output projection
        "w_gate.scale_w21.default": (64, 8), "w_gate.scale_b21.default": (64,),
        "w_val.scale_w21.default": (64, 8), "w_val.scale_b21.default": (64,), "w_out.scale_w12.default": (8, 64),
    }  # fmt: skip


def test_the_router_block_is_the_one_its_test_runs():
    routed = next(block for block in BLOCKS if block.marker.startswith("run by"))
    assert routed.heading == "## Keep the base model: the learned router"
    assert "peft_scale.fit_router" in routed.code and "RouterConfig()" in routed.code


