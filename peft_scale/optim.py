"""Per-block learning rates for SCALE adapters: optimizer parameter groups by the role of each block.

SCALE's trainable tensors have very different roles and starting points (``peft_scale/layer.py``, ``norm.py``,
``embedding.py``):

- ``w12``: ``scale_w12``, new -> original features (FFN mode: the new neurons' columns of ``down_proj``). Starts at
  zero: it is the only path from the expansion to the original features.
- ``w21``: ``scale_w21`` and ``scale_b21``, original -> new (FFN mode: the new neurons' rows of ``gate``/``up``).
  ``W21`` starts at the base weight's scale (SVD rows), ``b21`` at zero.
- ``w22``: ``scale_w22``, new -> new; normal at the base weight's scale.
- ``head``: ``scale_head``, the ``P`` of the LM head's new block ``W_out P``; zero.
- ``gain``: ``scale_gain``, the new slice's norm gain; the base gain's mean (and ``scale_bias``, a split LayerNorm's
  new bias; zero).
- ``embedding``: ``scale_embedding``, ``E_up``; at the base embedding's scale.
- ``other``: anything else trainable (``modules_to_save``, trainable tokens).

The maths, for Adam-type optimizers
-----------------------------------
Adam normalises each entry's step by its own gradient statistics, so after the first few steps every entry of a
block moves by about ``lr`` per step (less where the gradient's sign is not consistent), *whatever the size of
its gradient*. What that step means depends on the block's scale:

- ``W12`` starts at zero. After ``t`` steps its entries are at most about ``sum of lr over the steps`` (all of it only
  if the gradient's sign never changes), which at the usual rates and run lengths is small against the entries of
  the base projection it sits next to, while ``W21``, which starts at its working scale, moves by a small share of
  its norm. The new neurons' output ``W12 h`` is bounded by that: it is the block that limits how far the
  expansion can move the model per step (measured: docs/evidence/learning-per-step.md).
- The function-space step of ``W12`` is ``lr * |h|`` (``h``, the new neurons' activations, is what multiplies it),
  so with Adam the activation scale of the new neurons acts as a multiplier of ``W12``'s learning rate.
- ``W21``'s gradient is proportional to ``W12`` (``dL/dW21 = (W12^T dL/dy * act') x^T``): zero at step 0, tiny
  while ``W12`` is small; Adam still gives it full-size steps, of a noisier direction.

So one learning rate for all blocks is a compromise between a zero-started block that has to grow to a scale
(``W12``, like LoRA's ``B``: LoRA+, arXiv 2402.12354, gives ``B`` a larger rate for that reason) and blocks that
start at their working scale (``W21``, ``W22``, ``E_up``, the gains). ``scale_optimizer_param_groups`` gives each
block its own rate, ``lr * ratio``.

What it buys, and the default
-----------------------------
A larger ``W12`` rate is a step along SCALE's learning-vs-drift curve, not a way off it: ungated, old text pays for
the larger steps about as it pays for a larger global rate. Behind a learned router (``RouterConfig``) old text
computes the base model's function and no longer pays, so the larger steps are mostly learning: the routed
settings that met the project's goals train ``W12`` at 4x the rate, the default here. Rate guidance, in one
sentence: a routed adapter trains at ``lr=3e-3`` with these defaults; an unrouted one forgets less at
``w12_lr_ratio=1`` and ``lr=1e-3``. (Measurements: docs/evidence/learning-per-step.md and docs/evidence/continual-pretraining-router.md.)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

# Parameter-name fragments of each SCALE block (the ParameterDict attribute names of the SCALE modules).
BLOCK_OF_NAME = {
    "scale_w12": "w12",
    "scale_w21": "w21",
    "scale_b21": "w21",
    "scale_w22": "w22",
    "scale_head": "head",
    "scale_gain": "gain",
    "scale_bias": "gain",
    "scale_embedding": "embedding",
}
BLOCKS = ("w12", "w21", "w22", "head", "gain", "embedding", "other")


def scale_block_of(parameter_name: str) -> str:
    """The block (``BLOCKS``) a parameter of a SCALE model belongs to, from its name.

    ``"base_model.model.model.layers.3.mlp.down_proj.scale_w12.default"`` -> ``"w12"``; a parameter that is not one
    of SCALE's blocks (``modules_to_save`` copies, trainable tokens) -> ``"other"``.
    """
    for part in parameter_name.split("."):
        if part in BLOCK_OF_NAME:
            return BLOCK_OF_NAME[part]
    return "other"


def scale_optimizer_param_groups(
    model: nn.Module,
    lr: float,
    *,
    w12_lr_ratio: float = 4.0,
    lr_ratios: Optional[dict[str, float]] = None,
    weight_decay: float = 0.0,
) -> list[dict]:
    """Torch optimizer parameter groups of ``model``'s trainable parameters, one group per SCALE block.

    Each group is ``{"params": [...], "lr": lr * ratio, "weight_decay": ..., "block": name}``, for the blocks of
    ``BLOCKS`` that have trainable parameters, in that order. The ratio of ``w12`` is ``w12_lr_ratio`` (default 4:
    module docstring); ``lr_ratios`` sets any block's ratio (``{"w21": 2.0}``) and wins over it; every other block
    gets ratio 1. Weight decay applies to matrices only: 1-D parameters (``b21``,
    the gains, biases of ``modules_to_save``) get none, as in the Trainer's default grouping. Frozen parameters are
    left out; a parameter shared by several names (tied weights) is listed once.

    Raises:
        ValueError: an unknown block in ``lr_ratios``, a negative ratio, or no trainable parameter.
    """
    ratios = {block: 1.0 for block in BLOCKS}
    ratios.update(w12=w12_lr_ratio)
    for block, ratio in (lr_ratios or {}).items():
        if block not in ratios:
            raise ValueError(f"lr_ratios: unknown block {block!r}; the blocks are {list(BLOCKS)}.")
        ratios[block] = ratio
    for block, ratio in ratios.items():
        if not ratio >= 0:  # also refuses NaN
            raise ValueError(f"The learning-rate ratio of block {block!r} must be >= 0, got {ratio!r}.")

    members: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        members.setdefault((scale_block_of(name), param.ndim >= 2), []).append(param)
    if not members:
        raise ValueError("The model has no trainable parameter: nothing to optimise.")

    groups = []
    for block in BLOCKS:
        for decays in (True, False):
            params = members.get((block, decays))
            if params:
                groups.append(
                    {
                        "params": params,
                        "lr": lr * ratios[block],
                        "weight_decay": weight_decay if decays else 0.0,
                        "block": block,
                    }
                )
    return groups


def create_scale_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    *,
    lr: float,
    w12_lr_ratio: float = 4.0,
    lr_ratios: Optional[dict[str, float]] = None,
    weight_decay: float = 0.0,
    **kwargs,
) -> torch.optim.Optimizer:
    """An optimizer over ``scale_optimizer_param_groups(model, lr, ...)``, in the style of PEFT's
    ``create_loraplus_optimizer``; ``kwargs`` go to ``optimizer_cls`` (``betas``, ``eps``, ...).

    With the Hugging Face ``Trainer``::

        optimizer = create_scale_optimizer(model, lr=3e-3)  # AdamW, W12 at 4x
        trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))

    The Trainer then builds its learning-rate schedule over this optimizer; a schedule scales every group's rate by
    the same factor, so the ratios hold at every step. (``TrainingArguments.learning_rate`` is not used: the rates
    are the groups'.)
    """
    groups = scale_optimizer_param_groups(
        model, lr, w12_lr_ratio=w12_lr_ratio, lr_ratios=lr_ratios, weight_decay=weight_decay
    )
    return optimizer_cls(groups, lr=lr, **kwargs)


__all__ = ["BLOCKS", "create_scale_optimizer", "scale_block_of", "scale_optimizer_param_groups"]
