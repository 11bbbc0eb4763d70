"""The code block of docs/several-domains.md (one routed adapter per domain), run as written on a tiny model.

The block is taken from the page (the first ```python fence after its title) and executed with ``exec``: ``base``
is ``conftest.py``'s tiny Llama (``speaker``) that knows the three synthetic domains' tokens, and
``english_ids`` / ``spanish_ids`` / ``french_ids`` are text of those domains (the base domain, ``es``, ``fr``). Only
the sizes are changed, by the string replacements below (asserted to apply); every other character runs as printed,
so a misspelled function, argument or a placeholder that is not Python fails here.
"""

from __future__ import annotations

import copy
import json
import warnings

import torch
from conftest import BASE, ES, FR, LAYERS, MODES, PRESERVE, domain_ids, readme_block
from peft import get_peft_model

import peft_scale
from peft_scale import RouterConfig, ScaleConfig

PAGE = "docs/several-domains.md"
HEADING = "# Several domains: one routed adapter each"

# The page's sizes are a real model's (SmolLM2: 30 layers); the tiny model has LAYERS layers and an FFN of 64.
SIZES = {
    "ffn_expansion=256": f"ffn_expansion={MODES['ffn']['ffn_expansion']}",  # 16 new neurons per MLP
    "preserve_layers=10": f"preserve_layers={PRESERVE}",  # of LAYERS = 4 (the routers read layer 2)
}


def test_readme_several_adapters_block_runs_as_written(speaker, tmp_path, monkeypatch):
    block = readme_block(HEADING, PAGE)
    code = block
    for readme_size, tiny_size in SIZES.items():
        assert readme_size in code, f"{PAGE}'s block no longer says {readme_size}: update SIZES"
        code = code.replace(readme_size, tiny_size)
    assert LAYERS > PRESERVE
    namespace = dict(
        base=copy.deepcopy(speaker),
        english_ids=domain_ids(BASE, 64, 48, seed=2),
        spanish_ids=domain_ids(ES, 64, 48, seed=1),
        french_ids=domain_ids(FR, 64, 48, seed=3),
        torch=torch,
        peft_scale=peft_scale,
        get_peft_model=get_peft_model,
        ScaleConfig=ScaleConfig,
        RouterConfig=RouterConfig,
    )
    monkeypatch.chdir(tmp_path)  # model.save_pretrained("out") -> tmp_path / "out"
    # es's router, fitted before French existed, claims French, but fr's outranks it: no warning, no refit
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fit_router")
        exec(compile(code, "docs/several-domains.md", "exec"), namespace)

    model = namespace["model"]
    scale_model = model.base_model
    assert scale_model.active_adapters == ["es", "fr"]
    routers = scale_model.scale_router
    assert set(routers) == {"es", "fr"}
    for name in ("es", "fr"):
        assert routers[name].is_fitted, f"{name}'s router is not fitted"
        config = scale_model.peft_config[name]
        assert config.variant == "route" and config.preserve_layers == PRESERVE
    assert scale_model.peft_config["fr"].router.outranks == ["es"]
    assert scale_model.peft_config["es"].router.outranks == []
    assert scale_model.peft_config["fr"].router_report["claimed_by_other_adapters"]["es"] >= 0.9  # es never saw French

    # most of each domain's tokens go to its own adapter, the base domain's to the base model
    shares = namespace["shares"]
    assert set(shares) == {"es", "fr", "base"}
    for domain, row in shares.items():
        assert list(row) == ["es", "fr", "base"] and abs(sum(row.values()) - 1) < 1e-6
        assert row[domain] >= 0.9, f"{domain}: {row}"

    # PEFT's layout for named adapters: one subfolder each, the model card at the top
    out = tmp_path / "out"
    for name in ("es", "fr"):
        saved = json.loads((out / name / "adapter_config.json").read_text())
        assert saved["peft_type"] == "SCALE" and saved["ffn_expansion"] == MODES["ffn"]["ffn_expansion"]
        assert (out / name / "adapter_model.safetensors").is_file()
    assert (out / "README.md").is_file()
