"""Hub-ready adapters: loading base model and adapter from a Hub-style cache folder with ``HF_HUB_OFFLINE=1``
(``PeftModel.from_pretrained("org/name")`` and ``AutoPeftModelForCausalLM``). The model card: ``test_model_card.py``."""

from __future__ import annotations

import hashlib
import os
import shutil

import torch
from conftest import random_ids, run_in_fresh_process, tiny_llama
from peft import get_peft_model
from safetensors.torch import save_file
from tiny_models import perturb_adapter

from peft_scale import ScaleConfig

BASE_REPO = "tiny-org/tiny-llama"
ADAPTER_REPO = "tiny-org/scale-tiny-llama"
REVISION = "0123456789abcdef0123456789abcdef01234567"  # a commit hash, as the Hub cache names snapshots


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
    base = tiny_llama()
    base.name_or_path = base.config._name_or_path = BASE_REPO  # what from_pretrained("org/name") records
    model = get_peft_model(base, ScaleConfig(ffn_expansion=8, task_type="CAUSAL_LM"))
    perturb_adapter(model, seed=3)  # stand-in for training, so that the adapter changes the logits
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
