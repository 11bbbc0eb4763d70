"""How many causal-LM families of the installed transformers SCALE's FFN mode covers with no module names given,
next to LoRA with ``target_modules="all-linear"``, on the same tiny models.

Run from the repository root::

    OMP_NUM_THREADS=1 PYTHONPATH=.:tests python benchmarks/architecture_coverage.py

Every family in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` is built as a 1-layer random model
(``tests/tiny_models.tiny_registry_model``); one that cannot be built or run at those sizes is not counted. A method
works on a family when ``tests/tiny_models.check_family_end_to_end`` passes: the base logits at init, one training
step, ``disable_adapter``, save/load, and a merged checkpoint that ``AutoModelForCausalLM.from_pretrained`` loads.
Families whose experts are fused 3-D parameters are counted apart (SCALE's support for them is a separate module).
Writes ``benchmarks/results/architecture_coverage.json``.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import torch
from peft import LoraConfig
from transformers.utils import logging as hf_logging

import peft_scale
from peft_scale.ffn_detection import fused_expert_parameters, hidden_size
from tiny_models import built_registry_model, check_family_end_to_end, registry_model_types

METHODS = {
    "scale_ffn_no_names": lambda: peft_scale.ScaleConfig(ffn_expansion=8),
    "lora_all_linear": lambda: LoraConfig(target_modules="all-linear"),
}


def _outcome(model_type: str, make_config) -> str:
    with tempfile.TemporaryDirectory() as folder:
        try:
            check_family_end_to_end(model_type, make_config(), Path(folder))
        except Exception as error:  # noqa: BLE001 (the reason is the result)
            return f"{type(error).__name__}: {str(error)[:200]}"
    return "works"


def main() -> dict:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    start = time.perf_counter()
    registry = registry_model_types()
    families = {}
    for model_type in registry:
        try:
            model, _, _ = built_registry_model(model_type)
        except Exception as error:  # noqa: BLE001
            families[model_type] = {"built": False, "why": f"{type(error).__name__}: {str(error)[:200]}"}
            continue
        row = {"built": True, "fused_experts": bool(fused_expert_parameters(model, hidden_size(model)))}
        row.update({method: _outcome(model_type, make) for method, make in METHODS.items()})
        families[model_type] = row
    built = [row for row in families.values() if row["built"]]
    counts = {
        "registry": len(registry),
        "built": len(built),
        "fused_expert_families": sum(row["fused_experts"] for row in built),
        **{method: sum(row[method] == "works" for row in built) for method in METHODS},
        **{
            f"{method}_without_fused_expert_families": sum(
                row[method] == "works" for row in built if not row["fused_experts"]
            )
            for method in METHODS
        },
    }
    print(f"{'method':<22} {'works':>6} {'built':>6} {'registry':>9}   (families with fused 3-D experts: "
          f"{counts['fused_expert_families']})")
    for method in METHODS:
        print(f"{method:<22} {counts[method]:>6} {counts['built']:>6} {counts['registry']:>9}")
    return {
        "command": "OMP_NUM_THREADS=1 PYTHONPATH=.:tests python benchmarks/architecture_coverage.py",
        "machine": f"{platform.processor() or platform.machine()}, 1 thread",
        "transformers": __import__("transformers").__version__,
        "peft": __import__("peft").__version__,
        "seconds": round(time.perf_counter() - start, 1),
        "counts": counts,
        "families": families,
    }


if __name__ == "__main__":
    result = main()
    path = Path(__file__).parent / "results" / "architecture_coverage.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {os.path.relpath(path)}")
