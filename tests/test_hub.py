"""Hub-ready adapters: the model card ``save_pretrained`` writes, and loading base model and adapter from a Hub-style
cache folder with ``HF_HUB_OFFLINE=1`` (``PeftModel.from_pretrained("org/name")`` and ``AutoPeftModelForCausalLM``)."""

from __future__ import annotations

import hashlib
import os
import shutil

import torch
from conftest import random_ids, run_in_fresh_process, tiny_llama
from huggingface_hub import ModelCard
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from tiny_models import perturb_adapter

from peft_scale import ScaleConfig
from peft_scale.model_card import PAPER_URL, SECTION_START

BASE_REPO = "tiny-org/tiny-llama"
ADAPTER_REPO = "tiny-org/scale-tiny-llama"
REVISION = "0123456789abcdef0123456789abcdef01234567"  # a commit hash, as the Hub cache names snapshots


def wrapped(config: ScaleConfig, name_or_path: str = BASE_REPO):
    base = tiny_llama()
    base.name_or_path = base.config._name_or_path = name_or_path  # what from_pretrained("org/name") records
    return get_peft_model(base, config)


def read_card(folder) -> ModelCard:
    return ModelCard.load(os.path.join(folder, "README.md"))


# ------------------------------------------------------------------------------------------------ model card


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

    model = wrapped(ScaleConfig(ffn_expansion=8, variant="route", preserve_layers=1))
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
    peft_scale.fit_router(model, new, old, calibrate_on="fitted", progress=False)
    model.save_pretrained(tmp_path / "fitted_on_all")
    assert "old side: old data; threshold set on all of the old data given)" in read_card(tmp_path / "fitted_on_all").text
    peft_scale.fit_router(model, new, old, calibrate_on="cross_fitted", progress=False)
    model.save_pretrained(tmp_path / "cross_fitted")
    assert (
        "old side: old data; threshold set on every old sequence, scored by routers that did not see it)"
        in read_card(tmp_path / "cross_fitted").text
    )
    peft_scale.fit_router(model, new, old, calibrate_on="fitted", progress=False)
    model.peft_config["default"].router_preservation_copy = True
    model.save_pretrained(tmp_path / "with_copy")
    assert (
        "given; preservation copy in inference: base-routed tokens exact in mixed sequences too)"
        in read_card(tmp_path / "with_copy").text
    )
    model.peft_config["default"].router_gate = "soft"
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


# ------------------------------------------------------------------------------------------- Hub-style cache


def put_in_hub_cache(cache, repo_id: str, folder) -> None:
    """Lay out ``folder`` as huggingface_hub's cache does after a download of ``repo_id`` at ``REVISION``:
    ``models--org--name/blobs/<sha256>``, ``snapshots/<revision>/<file>`` (links to the blobs), ``refs/main``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / REVISION).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    for name in os.listdir(folder):
        data = (folder / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, repo / "snapshots" / REVISION), repo / "snapshots" / REVISION / name)


def test_adapter_and_base_model_load_offline_from_a_hub_cache_in_a_fresh_process(tmp_path):
    model = wrapped(ScaleConfig(ffn_expansion=8, task_type="CAUSAL_LM"))
    perturb_adapter(model, seed=3)  # stand-in for training, so that the adapter changes the logits
    model.get_base_model().config._name_or_path = BASE_REPO
    ids = random_ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with model.disable_adapter():
            assert not torch.allclose(model(input_ids=ids).logits, expected)
    model.save_pretrained(tmp_path / "adapter")
    # The base model, saved plainly (what the Hub repo BASE_REPO holds).
    tiny_llama().save_pretrained(tmp_path / "base")
    cache = tmp_path / "hub"
    put_in_hub_cache(cache, BASE_REPO, tmp_path / "base")
    put_in_hub_cache(cache, ADAPTER_REPO, tmp_path / "adapter")
    shutil.rmtree(tmp_path / "adapter")  # only the cache is left to load from
    shutil.rmtree(tmp_path / "base")
    save_file({"ids": ids, "logits": expected}, str(tmp_path / "expected.safetensors"))

    out = run_in_fresh_process(
        f"""
import os
os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE={str(cache)!r}, HF_HOME={str(tmp_path / "hf_home")!r})
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
import peft_scale
expected = load_file({str(tmp_path / "expected.safetensors")!r})
base = AutoModelForCausalLM.from_pretrained({BASE_REPO!r})
model = PeftModel.from_pretrained(base, {ADAPTER_REPO!r}).eval()
auto = AutoPeftModelForCausalLM.from_pretrained({ADAPTER_REPO!r}).eval()
with torch.no_grad():
    for loaded in (model, auto):
        assert isinstance(loaded.peft_config["default"], peft_scale.ScaleConfig)
        assert torch.equal(loaded(input_ids=expected["ids"]).logits, expected["logits"])
print("loaded", auto.peft_config["default"].base_model_name_or_path)
"""
    )
    assert out.strip() == f"loaded {BASE_REPO}"
