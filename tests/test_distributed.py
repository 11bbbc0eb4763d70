"""Multi-process training: two processes (``torchrun``, DDP over gloo on CPU) train SCALE with the HF ``Trainer``.

``tests/distributed_worker.py`` is what each process runs. Its FSDP variants with the Trainer need a GPU (accelerate
sets FSDP up only on accelerators; the README says how they were run), but torch's FSDP2 (``fully_shard``) runs on
CPU over gloo, and is tested here against one process training on the whole batch.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_in_fresh_process, run_python
from safetensors.torch import load_file

WORLD_SIZE = 2


def launch_worker(out, engine: str):
    """Run ``tests/distributed_worker.py`` in WORLD_SIZE processes (torchrun, gloo on CPU); return ``out``."""
    run_python("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD_SIZE}",
               "tests/distributed_worker.py", str(out), engine)
    return out


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """The output folder of one 2-process DDP run of the worker with the Trainer (about 15 s)."""
    return launch_worker(tmp_path_factory.mktemp("ddp"), "ddp")


def test_every_process_trained_in_one_ddp_group(ddp_run):
    for rank in range(WORLD_SIZE):
        record = json.loads((ddp_run / f"rank{rank}.json").read_text())
        assert record == {"world_size": WORLD_SIZE, "steps": 4, "engine": "MULTI_CPU", "fsdp_version": None}


def test_adapter_weights_are_identical_across_processes_and_trained(ddp_run):
    rank0 = load_file(ddp_run / "rank0.safetensors")
    rank1 = load_file(ddp_run / "rank1.safetensors")
    initial = load_file(ddp_run / "initial.safetensors")
    assert rank0.keys() == rank1.keys() == initial.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between the processes"
    # Every adapter tensor moved (full-width adapt: the embedding's new columns, split norms' gains, attention and
    # FFN blocks, the LM head's P), so the comparison above compares trained weights.
    unchanged = [key for key in rank0 if torch.equal(rank0[key], initial[key])]
    assert unchanged == []


def test_saved_adapter_is_what_the_processes_held_and_loads_with_the_same_logits(ddp_run):
    saved = load_file(ddp_run / "adapter" / "adapter_model.safetensors")
    rank0 = load_file(ddp_run / "rank0.safetensors")
    assert saved.keys() == rank0.keys()
    assert all(torch.equal(saved[key], rank0[key]) for key in saved)
    assert "SCALE" in (ddp_run / "adapter" / "README.md").read_text()
    run_in_fresh_process(
        f"""
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tiny_models import random_ids, tiny_llama
import peft_scale
model = PeftModel.from_pretrained(tiny_llama(seed=0), {str(ddp_run / "adapter")!r}).eval()
with torch.no_grad():
    logits = model(input_ids=random_ids(seed=7)).logits
assert torch.equal(logits, load_file({str(ddp_run / "logits.safetensors")!r})["logits"])
"""
    )


def test_fsdp2_fully_shard_on_cpu_trains_the_sharded_adapter_like_one_process_on_the_whole_batch(tmp_path):
    from distributed_worker import sharded_run_batch, train_with_sgd, wrapped_model
    from peft import get_peft_model_state_dict

    out = launch_worker(tmp_path, "fully_shard")
    for rank in range(WORLD_SIZE):
        assert json.loads((out / f"rank{rank}.json").read_text()) == {"world_size": WORLD_SIZE, "sharded": True}
    rank0, rank1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    # One process, the same initialisation, the whole batch: FSDP averages the two halves' gradients, which is the
    # gradient of the whole batch's mean loss (every row has the same number of tokens).
    reference = wrapped_model()
    initial = {key: tensor.clone() for key, tensor in get_peft_model_state_dict(reference).items()}
    train_with_sgd(reference, sharded_run_batch())
    expected = get_peft_model_state_dict(reference)
    assert rank0.keys() == rank1.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(rank0[key], rank1[key]), key
        assert not torch.equal(tensor, initial[key]), key  # trained
        # the same sums in another order (all-reduce, sharded updates): equal to float rounding
        torch.testing.assert_close(rank0[key], tensor, rtol=1e-5, atol=1e-6)
