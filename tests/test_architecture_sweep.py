"""FFN mode with no module names on every causal-LM family registered in the installed transformers.

Each family is built tiny (1 layer, ``tests/tiny_models.REGISTRY_SIZES``); one that cannot be built or run at these
sizes is skipped with the reason and does not count. Every other family either passes the whole check
(``check_family_end_to_end``: base logits at init, a training step, ``disable_adapter``, save/load, a merged
checkpoint loaded without peft) or is listed below with the SCALE error it must raise.
"""

from __future__ import annotations

import pytest
import torch

import peft_scale
from tiny_models import built_registry_model, check_family_end_to_end, registry_model_types

torch.set_num_threads(1)

_NO_FIELD = ("Cannot merge: no field of", "the config has no intermediate-size field (the FFN is 4 x hidden in code)")

# The one list of families that still fail, with the start of the SCALE error they raise and why.
SCALE_FAILURES = {
    **{name: _NO_FIELD for name in ("bloom", "mpt", "openai-gpt")},
    "gpt_neox_japanese": (
        "Cannot merge: GPTNeoXJapaneseConfig derives the intermediate size",
        "I = hidden_size x an integer field: 8 new neurons give no integer (ffn_expansion=32 merges)",
    ),
    "bitnet": ("SCALE could not find the FFN", "a norm (ffn_sub_norm) between the projections: not elementwise"),
    "dory": ("SCALE could not find the FFN", "a norm (ffn_sub_norm) and per-neuron scales between the projections"),
    "mamba": ("SCALE could not find the FFN", "no FFN: a state-space model"),
    "falcon_mamba": ("SCALE could not find the FFN", "no FFN: a state-space model"),
}
# Families whose merged checkpoint transformers itself cannot load with AutoModelForCausalLM (LoRA fails there too).
RELOAD_UNSUPPORTED = {"emu3", "mllama"}


@pytest.mark.parametrize("model_type", registry_model_types())
def test_ffn_mode_with_no_names(model_type, tmp_path):
    try:
        built_registry_model(model_type)
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"cannot be built tiny: {type(error).__name__}: {str(error)[:120]}")
    if model_type in RELOAD_UNSUPPORTED:
        pytest.skip("AutoModelForCausalLM.from_pretrained cannot load this family's own checkpoint")
    config = peft_scale.ScaleConfig(ffn_expansion=8)
    if model_type in SCALE_FAILURES:
        message, _ = SCALE_FAILURES[model_type]
        with pytest.raises(ValueError, match=message):
            check_family_end_to_end(model_type, config, tmp_path)
        return
    check_family_end_to_end(model_type, config, tmp_path)
