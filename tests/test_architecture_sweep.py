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


# Families where the learned router cannot work, with the start of the SCALE error and why (beyond SCALE_FAILURES'
# families whose merge fails: routing never merges, so those are tried here).
_NOT_ROUTED = "SCALE's learned router .* cannot route model_type"
ROUTE_FAILURES = {
    **{name: SCALE_FAILURES[name] for name in ("bitnet", "dory", "mamba", "falcon_mamba")},  # no FFN found to widen
    # (peft_scale.architectures.LEARNED_ROUTE_REFUSED)
    "hrm_text": (_NOT_ROUTED, "its decoder layers run several times per forward pass: no layer reads the base stream"),
    "xlnet": (_NOT_ROUTED, "its layers take (seq, batch, features) and two streams"),
    "cpmant": (_NOT_ROUTED, "it prepends prompt positions of its own inside the model"),
}


@pytest.mark.parametrize("model_type", registry_model_types())
def test_the_learned_router_with_its_defaults(model_type, tmp_path, monkeypatch):
    """``ScaleConfig(ffn_expansion=8, router=RouterConfig())`` with no names: ``fit_router`` tells two token ranges
    apart on the stream entering layer 0 (the embeddings), and after the adapter moved, text of the old range gets
    the base model's logits exactly and text of the new range does not; save/load keeps the router."""
    from peft import PeftModel, get_peft_model
    from tiny_models import VOCAB, perturb_adapter, tiny_registry_model

    import peft_scale.router_fitting

    # (a fifth of fit_router's training steps, for the sweep's time: these routers tell embeddings apart well
    # within them, and the wiring is under test, not the router's fit)
    monkeypatch.setattr(peft_scale.router_fitting, "ROUTER_STEPS", 60)

    try:
        model, _, _ = built_registry_model(model_type)
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"cannot be built tiny: {type(error).__name__}: {str(error)[:120]}")
    config = peft_scale.ScaleConfig(ffn_expansion=8, router=peft_scale.RouterConfig())
    if model_type in ROUTE_FAILURES:
        with pytest.raises(ValueError, match=ROUTE_FAILURES[model_type][0]):
            get_peft_model(model, config)
        return
    generator = torch.Generator().manual_seed(0)
    old, new = (torch.randint(low, high, (32, 12), generator=generator) for low, high in ((4, VOCAB // 2), (VOCAB // 2, VOCAB)))
    with torch.no_grad():
        base_old = model(old[:2]).logits
    peft_model = get_peft_model(model, config)
    report = peft_scale.fit_router(peft_model, new, old, progress=False)
    # (random tiny models, ids told apart by their embeddings alone: the wiring is under test here, not the router)
    assert report.old_to_base >= 0.8 and report.new_to_expansion >= 0.3, report
    perturb_adapter(peft_model, scale=0.5)
    peft_model.eval()
    with torch.no_grad():
        routed_old = peft_model(old[:2]).logits
        to_base = peft_model.base_model.last_routing.to_preservation
        routed_new = peft_model(new[:2]).logits
        to_expansion = ~peft_model.base_model.last_routing.to_preservation
    assert to_base.float().mean() >= 0.8 and to_expansion.any()
    assert (routed_old - base_old)[to_base].abs().max() <= 1e-5, "old tokens routed to the base model drifted"
    with torch.no_grad(), peft_model.disable_adapter():
        assert (routed_new - peft_model(new[:2]).logits).abs().max() > 1e-4, "the expansion changed nothing"
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_registry_model(model_type), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (loaded(new[:2]).logits - routed_new).abs().max() <= 1e-5, "save/load changed the routed logits"
