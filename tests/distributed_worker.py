"""One process of a multi-process SCALE training run with the HF ``Trainer`` (launched by ``torchrun`` from
``tests/test_distributed.py``; not a test file itself).

Every process trains the same tiny random Llama, wrapped with full-width SCALE-Adapt, for a few steps on its own
shard of the data (DDP, gloo on CPU), with ``MERCallback`` interpolating the adapter every two steps. Then each
process writes what it holds; the test compares them:

- ``rank<r>.safetensors``: this process's adapter tensors (``get_peft_model_state_dict``);
- ``rank<r>.json``: the world size and the number of optimizer steps this process saw;
- from rank 0 only: ``adapter/`` (``Trainer.save_model``: the adapter and its model card), ``initial.safetensors``
  (the adapter before training) and ``logits.safetensors`` (the trained model's logits on fixed ids).

Usage: ``torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py OUT_DIR [ddp|fsdp|fsdp1|fully_shard]``
(the repo and tests/ on PYTHONPATH). accelerate sets up FSDP only on accelerators, so ``fsdp``/``fsdp1`` need a GPU;
``fully_shard`` (below) runs torch's FSDP2 on CPU without the Trainer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)  # see tests/conftest.py: threads spin-wait on a loaded machine

from peft import get_peft_model, get_peft_model_state_dict  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tiny_models import random_ids, tiny_llama  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

import peft_scale  # noqa: E402

# Full width on the tiny Llama (head_dim 8, 2 query heads per key-value head): 16 = one new key-value group.
SCALE_CONFIG = dict(hidden_expansion=16, ffn_expansion=8, variant="adapt", task_type="CAUSAL_LM")
STEPS = 4
MER = dict(k=2, gamma=0.5)
# TrainingArguments that pick the distributed engine (accelerate sets it up from these).
ENGINES = {
    "ddp": {},
    "fsdp": dict(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}),
    "fsdp1": dict(fsdp=True, fsdp_config={"version": 1, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}),
}


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """The adapter's tensors, whole (FSDP2 holds each parameter as a DTensor sharded across the processes)."""
    tensors = {}
    for key, tensor in get_peft_model_state_dict(model).items():
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        tensors[key] = tensor.detach().cpu().clone().contiguous()
    return tensors


def main(out: Path, engine: str = "ddp") -> None:
    model = wrapped_model()
    initial = adapter_tensors(model)
    ids = random_ids(batch=32, length=12, seed=3).tolist()
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=2,
        max_steps=STEPS,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        save_strategy="no",
        logging_steps=1,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=0,
        disable_tqdm=True,
        **ENGINES[engine],
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=[{"input_ids": row, "labels": row} for row in ids],  # a list is a map-style dataset
        callbacks=[peft_scale.MERCallback(**MER)],
    )
    trainer.train()

    rank = args.process_index
    record = {
        "world_size": args.world_size,
        "steps": trainer.state.global_step,
        "engine": trainer.accelerator.distributed_type.value,
        "fsdp_version": trainer.accelerator.state.fsdp_plugin.fsdp_version if trainer.is_fsdp_enabled else None,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    save_file(adapter_tensors(model), str(out / f"rank{rank}.safetensors"))
    trainer.save_model(str(out / "adapter"))  # writes on the main process only
    model.eval()
    with torch.no_grad():  # every process runs the forward pass: under FSDP it gathers the shards collectively
        logits = model(input_ids=random_ids(seed=7).to(args.device)).logits
    if rank == 0:
        save_file(initial, str(out / "initial.safetensors"))
        save_file({"logits": logits.cpu().contiguous()}, str(out / "logits.safetensors"))


# ------------------------------------------------------------------------------ FSDP2 on CPU, without the Trainer
# accelerate (and so the Trainer) sets FSDP up only on accelerators, but torch's FSDP2 itself, ``fully_shard``, runs
# on CPU over gloo. This variant shards the same model the way accelerate's FSDP2 plugin does (one unit per decoder
# layer, then the root) and trains it with plain SGD, so that the test can compare it with one process training on
# the whole batch: the gradients FSDP averages over the processes are that process's gradients.

SHARDED_STEPS = 3
SHARDED_LR = 0.1


def sharded_run_batch() -> torch.Tensor:
    return random_ids(batch=4, length=12, seed=3)


def wrapped_model():
    return get_peft_model(tiny_llama(seed=0), peft_scale.ScaleConfig(**SCALE_CONFIG))


def train_with_sgd(model, ids: torch.Tensor) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=SHARDED_LR)
    for _ in range(SHARDED_STEPS):
        model(input_ids=ids, labels=ids).loss.backward()  # mean over this process's tokens
        optimizer.step()
        optimizer.zero_grad()


def main_fully_shard(out: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world_size,))
    model = wrapped_model()
    for layer in model.get_base_model().model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ids = sharded_run_batch().chunk(world_size)[rank]  # each process trains on its own rows
    train_with_sgd(model, ids)
    record = {
        "world_size": world_size,
        # every trainable parameter is a DTensor holding only this process's shard
        "sharded": all(type(p).__name__ == "DTensor" and p.to_local().numel() < p.numel() for p in trainable),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    save_file(adapter_tensors(model), str(out / f"rank{rank}.safetensors"))  # gathers every shard
    dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[2:] == ["fully_shard"]:
        main_fully_shard(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]), *sys.argv[2:])
