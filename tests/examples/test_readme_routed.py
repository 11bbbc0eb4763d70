"""The README's routed example ("Keep the base model: the learned router"), run as written on a tiny model.

The block is taken from README.md and executed with ``exec``: ``base`` is ``conftest.py``'s tiny Llama (``old_speaker``) that speaks
the old synthetic domain, ``new_blocks`` a ``datasets.Dataset`` of the new domain (``input_ids`` and ``labels``),
``old_blocks`` one of the old domain. Only the sizes change, by the replacements below (asserted to apply), so a
misspelled function or argument in the README fails here. What it checks is the example's promise: the router is
fitted with the defaults, the adapter trains with the SCALE optimiser, and old text keeps the base model's output.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import MODES, NEW, OLD, PRESERVE, domain_ids, readme_block
from datasets import Dataset

import peft_scale
from peft_scale import RouterConfig

HEADING = "## Keep the base model: the learned router"
SIZES = {  # the README's sizes are SmolLM2's (30 layers); the tiny model has 4
    "ffn_expansion=256": f"ffn_expansion={MODES['ffn']['ffn_expansion']}",
    "preserve_layers=8": f"preserve_layers={PRESERVE}",
    "max_steps=40": "max_steps=4",
}


def test_readme_routed_block_runs_as_written(old_speaker, tmp_path, monkeypatch):
    code = readme_block(HEADING)
    for readme_size, tiny_size in SIZES.items():
        assert readme_size in code, f"README block no longer says {readme_size}: update SIZES"
        code = code.replace(readme_size, tiny_size)
    new = domain_ids(NEW, seed=1).tolist()
    namespace = dict(
        base=copy.deepcopy(old_speaker),
        new_blocks=Dataset.from_dict({"input_ids": new, "labels": new}),
        old_blocks=Dataset.from_dict({"input_ids": domain_ids(OLD, seed=2).tolist()}),
    )
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md: Keep the base model", "exec"), namespace)

    model, report = namespace["model"], namespace["report"]
    config = model.peft_config["default"]
    assert config.router == RouterConfig() and config.variant == "route"
    assert report.calibrate_on == "cross_fitted" and report.max_old_error == 0.005
    assert model.base_model.scale_router["default"].is_fitted
    # trained: the new neurons reach the output, W12 at 4x the rate of W21
    w12 = [p for n, p in model.named_parameters() if "scale_w12" in n]
    assert w12 and all(p.abs().max() > 0 for p in w12)
    rates = {g["block"]: g["initial_lr"] for g in namespace["optimizer"].param_groups}  # (the schedule ended at 0)
    assert rates == {"w12": 1.2e-2, "w21": 3e-3}
    # old text: the tokens routed to the base model get its predictions exactly, and nearly all are
    old_ids = domain_ids(OLD, 4, 24, seed=5)
    with torch.no_grad():
        ours = model(input_ids=old_ids).logits
        to_base = model.base_model.last_routing.to_preservation
        with model.disable_adapter():
            theirs = model(input_ids=old_ids).logits
    assert to_base.float().mean() >= 0.95 and torch.allclose(ours[to_base], theirs[to_base], atol=1e-5)
    audit = peft_scale.forgetting(model, old_ids)
    assert audit.drift <= 0.01 and audit.expansion_share == pytest.approx(1 - float(to_base.float().mean()))
    assert (tmp_path / "out" / "adapter_config.json").is_file()
