"""``peft_scale.model_card``: the SCALE section of the model card ``save_pretrained`` writes (what the adapter is, how
to load it), kept apart from the rest of the card (moved from ``test_hub.py``). The card of several routed adapters
and ``push_to_hub``: ``test_several_routed_adapters.py``."""

from __future__ import annotations

import os

import torch
from conftest import tiny_llama
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model

from peft_scale import ScaleConfig
from peft_scale.model_card import (
    PAPER_URL,
    SECTION_END,
    SECTION_START,
    install_model_card_hook,
    scale_section,
    write_scale_section,
)

BASE_REPO = "tiny-org/tiny-llama"


def wrapped(config: ScaleConfig, name_or_path: str = BASE_REPO):
    base = tiny_llama()
    base.name_or_path = base.config._name_or_path = name_or_path  # what from_pretrained("org/name") records
    return get_peft_model(base, config)


def read_card(folder) -> ModelCard:
    return ModelCard.load(os.path.join(folder, "README.md"))


# ------------------------------------------------------------------------------------------- save_pretrained's card


def test_card_names_the_method_sizes_variant_base_model_and_shows_how_to_load(tmp_path):
    model = wrapped(ScaleConfig(ffn_expansion=8, task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "scale-tiny")
    card = read_card(tmp_path / "scale-tiny")
    text = card.text
    assert card.data.library_name == "peft"
    assert card.data.base_model == BASE_REPO
    assert {"scale", "peft-scale", "arxiv:2511.03270"} <= set(card.data.tags)
    assert "## SCALE adapter" in text and PAPER_URL in text
    assert f"- **Base model:** `{BASE_REPO}`" in text
    # tiny_llama: hidden 32, FFN 64; FFN mode adds 8 neurons and trains W12 from layer 0 up
    assert "| `default` | `.` | FFN | unchanged | 64 + 8 | gate_proj, up_proj -> down_proj (from the family's table) | adapt | FFN, layers 0 and up | svd |" in text
    assert "pip install peft-scale" in text
    assert "import peft_scale" in text
    assert f'base = AutoModelForCausalLM.from_pretrained("{BASE_REPO}")' in text
    assert 'model = PeftModel.from_pretrained(base, "scale-tiny")' in text
    assert 'AutoPeftModelForCausalLM.from_pretrained("scale-tiny")' in text
    assert "merge_and_unload()" in text
    assert "KeyError: 'SCALE'" in text


def test_card_of_a_full_width_route_adapter_and_a_second_adapter(tmp_path):
    model = wrapped(ScaleConfig(hidden_expansion=16, ffn_expansion=8, variant="route", preserve_layers=1, route_rule="cosine"))
    model.add_adapter("extra", ScaleConfig(hidden_expansion=16, ffn_expansion=4, variant="preserve"))
    model.save_pretrained(tmp_path / "out")
    text = read_card(tmp_path / "out").text
    assert (
        "| `default` | `.` | full width | 32 + 16 | 64 + 8 | every projection (full width) | route (cosine rule, tau = 0.5) | all, layers 1 and up | svd |"
        in text
    )
    assert "| `extra` | `extra` | full width | 32 + 16 | 64 + 4 | every projection (full width) | preserve | none (W12 = 0 everywhere) | svd |" in text
    assert "merge_and_unload" not in text  # neither can be saved merged
    assert "AutoPeftModelForCausalLM" not in text  # no task_type: PeftModel only


def test_card_of_a_learned_route_adapter_gives_its_routers_held_out_accuracy(tmp_path):
    import peft_scale

    per_token = peft_scale.RouterConfig(smoothing=0.0, gate="hard", preservation_copy=False, calibrate_on="held_out")
    model = wrapped(ScaleConfig(ffn_expansion=8, preserve_layers=1, router=per_token))
    model.save_pretrained(tmp_path / "unfitted")
    assert "route (learned router on the input of layer 1; not fitted yet" in read_card(tmp_path / "unfitted").text
    generator = torch.Generator().manual_seed(0)
    new, old = torch.randint(64, 128, (16, 12), generator=generator), torch.randint(4, 64, (16, 12), generator=generator)
    report = peft_scale.fit_router(model, new, old, progress=False)
    model.save_pretrained(tmp_path / "fitted")
    text = read_card(tmp_path / "fitted").text
    assert (
        f"route (learned router on the input of layer 1; held out: {report.old_to_base:.1%} of old tokens to the base "
        f"model, {report.new_to_expansion:.1%} of new tokens to the expansion; old side: old data)"
    ) in text
    assert "merge_and_unload" not in text  # a routed adapter cannot be merged
    model.peft_config["default"].router.calibrate_on = "fitted"
    peft_scale.fit_router(model, new, old, progress=False)
    model.save_pretrained(tmp_path / "fitted_on_all")
    assert "old side: old data; threshold set on all of the old data given)" in read_card(tmp_path / "fitted_on_all").text
    model.peft_config["default"].router.calibrate_on = "cross_fitted"
    peft_scale.fit_router(model, new, old, progress=False)
    model.save_pretrained(tmp_path / "cross_fitted")
    assert (
        "old side: old data; threshold set on every old sequence, scored by routers that did not see it)"
        in read_card(tmp_path / "cross_fitted").text
    )
    model.peft_config["default"].router.calibrate_on = "fitted"
    peft_scale.fit_router(model, new, old, progress=False)
    model.peft_config["default"].router.preservation_copy = True
    model.save_pretrained(tmp_path / "with_copy")
    assert (
        "given; preservation copy in inference: base-routed tokens exact in mixed sequences too)"
        in read_card(tmp_path / "with_copy").text
    )
    model.peft_config["default"].router.gate = "soft"
    model.save_pretrained(tmp_path / "soft")
    assert "; soft gate: the expansion weighed by how far the router's score clears its threshold;" in read_card(
        tmp_path / "soft"
    ).text


def test_card_names_the_widened_layers_when_not_all_are(tmp_path):
    wrapped(ScaleConfig(ffn_expansion=8, layers_to_transform=[1])).save_pretrained(tmp_path)
    assert "| `default` | `.` | FFN (layers 1) | unchanged | 64 + 8 |" in read_card(tmp_path).text


def test_saving_again_replaces_the_section_and_keeps_the_rest_of_the_card(tmp_path):
    folder = tmp_path / "out"
    wrapped(ScaleConfig(ffn_expansion=8)).save_pretrained(folder)
    card = read_card(folder)
    card.text += "\n## Notes by the author\n\nTrained on my data.\n"
    card.save(folder / "README.md")
    wrapped(ScaleConfig(ffn_expansion=12)).save_pretrained(folder)
    text = read_card(folder).text
    assert text.count(SECTION_START) == 1
    assert "64 + 12" in text and "64 + 8" not in text
    assert "Trained on my data." in text


def test_other_peft_methods_get_peft_card_unchanged(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "lora")
    card = read_card(tmp_path / "lora")
    assert SECTION_START not in card.text and "scale" not in card.data.tags



# ------------------------------------------------------------------------------------------- the section alone

USER_NAMED = ScaleConfig(ffn_expansion=8, target_modules=["up_proj", "down_proj"], ffn_output_modules=["down_proj"])


def test_section_without_a_recorded_base_model_and_with_an_adapter_in_a_subfolder():
    text = scale_section({"es": USER_NAMED}, "me/es")
    assert text.startswith(SECTION_START + "\n## SCALE adapter\n") and text.endswith("\n" + SECTION_END)
    assert "- **Base model:** not recorded (the model it was trained on)" in text
    # no base_ffn_shapes recorded (not injected yet): the expansion alone
    assert "| `es` | `es` | FFN | unchanged | +8 | up_proj -> down_proj (named by the user) | adapt |" in text
    assert 'base = AutoModelForCausalLM.from_pretrained("BASE_MODEL")' in text
    assert 'model = PeftModel.from_pretrained(base, "me/es", subfolder="es", adapter_name="es")' in text


def test_the_section_goes_under_the_cards_title_or_first(tmp_path):
    for before, expected in [
        ("# My adapter\n\nSome words.\n", f"# My adapter\n\n{SECTION_START}"),
        ("Some words first.\n", SECTION_START),
    ]:
        card = tmp_path / "README.md"
        ModelCard(f"---\nlicense: mit\n---\n{before}").save(card)
        write_scale_section(str(card), {"default": USER_NAMED}, "me/adapter")
        written = ModelCard.load(card)
        assert written.text.startswith(expected) and before.strip().splitlines()[-1] in written.text
        assert written.data.license == "mit" and "peft-scale" in written.data.tags


def test_installing_the_hook_twice_wraps_peft_once():
    wrapped_methods = (PeftModel.create_or_update_model_card, PeftModel.print_trainable_parameters, PeftModel.push_to_hub)
    install_model_card_hook()  # already installed by `import peft_scale`
    assert (PeftModel.create_or_update_model_card, PeftModel.print_trainable_parameters, PeftModel.push_to_hub) == (
        wrapped_methods
    )
    assert PeftModel.create_or_update_model_card._adds_scale_section
