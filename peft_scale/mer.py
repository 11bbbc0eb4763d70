"""``MERCallback``: efficient meta-experience replay (Reptile-style interpolation) for the HF ``Trainer``.

Abbes et al. (*Revisiting Replay and Gradient Alignment for Continual Pre-Training of Large Language Models*,
arXiv 2508.01908) find that replaying a small fraction of old data stabilises continual pre-training, and that
meta-experience replay (MER) adds the benefits of gradient alignment at almost no cost when implemented the
Reptile way: train as usual for ``k`` optimizer steps (on batches that mix new and replayed data), then pull the
weights back toward where the window started::

    theta <- theta_start + gamma * (theta - theta_start)

A Reptile step of this kind moves along the average of the window's updates and, to second order, rewards
directions in which the gradients of the window's batches agree (the batches' inner products), which is the
gradient alignment MER asks for, without any second-order computation.

The callback is independent of the PEFT method: it interpolates whatever parameters have ``requires_grad`` when
training begins (a SCALE or LoRA adapter, or every weight in full fine-tuning). Its only memory cost is one
copy of those parameters. The optimizer's state (Adam's moments, the learning-rate schedule) is left alone: the
paper's efficient MER interpolates the weights only.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers import TrainerCallback


class MERCallback(TrainerCallback):
    """Every ``k`` optimizer steps, interpolate the trainable weights toward their values ``k`` steps earlier.

    With ``theta_start`` the trainable weights at the start of a window of ``k`` optimizer steps and ``theta`` the
    weights after it, the callback sets ``theta <- theta_start + gamma * (theta - theta_start)`` and starts the
    next window from the result. ``gamma = 1`` is plain training (the callback then never touches the weights);
    smaller ``gamma`` keeps a fraction of each window's progress.

    Windows count optimizer steps (``state.global_step``), so gradient accumulation does not change them. The
    first window starts when training (or a resumed run) begins; windows end at multiples of ``k``. Under DDP
    every process holds the same weights after each step and applies the same update, so they stay identical;
    under FSDP each process applies the (elementwise) update to its own shard.

    Args:
        k: optimizer steps per window (the paper's number of batches per Reptile step).
        gamma: the Reptile interpolation factor, ``0 < gamma <= 1`` (the fraction of the window's update kept).

    Raises:
        ValueError: ``k`` is not a positive integer or ``gamma`` is outside ``(0, 1]``.

    Example::

        >>> trainer = Trainer(model=peft_model, args=args, train_dataset=mixed, callbacks=[MERCallback(k=5, gamma=0.3)])
    """

    def __init__(self, k: int, gamma: float):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(
                f"MERCallback(k={k!r}): k is the number of optimizer steps per window; use an integer >= 1."
            )
        if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not 0 < gamma <= 1:
            raise ValueError(
                f"MERCallback(gamma={gamma!r}): gamma is the fraction of each window's update that is kept; "
                "use 0 < gamma <= 1 (1 disables the interpolation)."
            )
        self.k = k
        self.gamma = float(gamma)
        self._window_start: Optional[dict[str, torch.Tensor]] = None

    @staticmethod
    def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
        return {name: param for name, param in model.named_parameters() if param.requires_grad}

    def _snapshot(self, model: nn.Module) -> None:
        self._window_start = {name: param.detach().clone() for name, param in self._trainable(model).items()}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.gamma < 1:
            self._snapshot(model)

    @torch.no_grad()
    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.gamma == 1 or state.global_step % self.k != 0:
            return
        params = self._trainable(model)
        if params.keys() != self._window_start.keys():
            raise RuntimeError(
                "MERCallback: the set of trainable parameters changed during training; it interpolates the "
                "parameters that were trainable when training began."
            )
        for name, param in params.items():
            start = self._window_start[name]
            # theta <- theta_start + gamma * (theta - theta_start), in place, in the parameter's own dtype.
            param.sub_(start).mul_(self.gamma).add_(start)
            start.copy_(param)  # the next window starts here

    def on_train_end(self, args, state, control, **kwargs):
        self._window_start = None
