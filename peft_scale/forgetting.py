"""The forgetting audit: how far an adapted model has moved from its base model on text it must keep.

For old-domain text ``x`` (what the model must not forget) and every position ``t`` of it::

    drift  = mean_t KL( p_base(. | x_<t) || p_adapted(. | x_<t) )          (nats per token)
    ppl    = exp( mean_t -log p(x_t | x_<t) )                                (over the positions t >= 1)
    perplexity_ratio = ppl_adapted / ppl_base

and, for a routed adapter, the share of the tokens the routing sent to an expansion (a token that stays with the
base model gets its computation). A PEFT model gives the base model's logits under ``disable_adapter()``, so no
second copy of the model is kept: each batch is run twice, once with the adapter and once without.

``forgetting(model, old_data)`` measures once; ``ForgettingCallback`` measures every ``every`` optimizer steps of a
``Trainer`` run, adds the numbers to the Trainer's logs (so the console, ``trainer.state.log_history`` and the
reporting integrations such as TensorBoard or Weights & Biases get them) and can stop training past a drift budget.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler
from transformers.utils import logging

from .router_fitting import token_sequences

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class ForgettingReport:
    """What ``forgetting`` measured on the old data.

    Attributes:
        drift: mean over every position of ``KL(p_base || p_adapted)``, in nats per token (0: the base model's
            predictions exactly).
        perplexity_ratio: the adapted model's perplexity of the old data over the base model's (1: no change; above
            1: the old data became less likely).
        expansion_share: routed adapters only: the share of the old tokens sent to an expansion rather than to the
            base model (``None`` for an adapter that does not route: every token reaches it).
        tokens: the positions measured.
    """

    drift: float
    perplexity_ratio: float
    expansion_share: Optional[float]
    tokens: int

    def metrics(self, prefix: str = "forgetting/") -> dict[str, float]:
        """The report as a flat dict of floats, as a ``Trainer`` logs it."""
        values = {"drift": self.drift, "perplexity_ratio": self.perplexity_ratio}
        if self.expansion_share is not None:
            values["expansion_share"] = self.expansion_share
        return {prefix + name: value for name, value in values.items()}

    def __str__(self) -> str:
        routed = "" if self.expansion_share is None else f", {self.expansion_share:.2%} of tokens to the expansion"
        return (
            f"SCALE forgetting audit on {self.tokens} old tokens: drift {self.drift:.4g} nats/token (KL to the base "
            f"model), perplexity x{self.perplexity_ratio:.4f}{routed}"
        )


def _peft_model(model: nn.Module):
    if not hasattr(model, "disable_adapter") or not hasattr(model, "base_model"):
        raise TypeError(
            f"forgetting: model is a {type(model).__name__}, not a PEFT model. Pass the model get_peft_model or "
            "PeftModel.from_pretrained returned: its disable_adapter() gives the base model to compare with."
        )
    return model


def _padded(sequences: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(ids, mask)`` of a batch of 1-D sequences (padding with token 0, masked out)."""
    length = max(len(ids) for ids in sequences)
    ids = torch.zeros(len(sequences), length, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = sequence
        mask[row, : len(sequence)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def forgetting(model: nn.Module, old_data, *, tokenizer=None, batch_size: int = 8) -> ForgettingReport:
    """Measure how far ``model`` (a PEFT model with its adapter active) has moved from its base model on ``old_data``.

    The model is evaluated in ``eval()`` mode (where a routed adapter routes), under ``torch.no_grad``, and put back
    in the mode it was in. Padding inside a batch is masked and not measured.

    Args:
        model: a ``PeftModel`` (the base model is its ``disable_adapter()``).
        old_data: text the model must keep: token ids in any form ``fit_router`` takes (a ``LongTensor`` ``(n,
            seq)``, a list of 1-D sequences, a ``datasets.Dataset`` with ``input_ids``, dicts with ``input_ids``),
            or a list of strings with ``tokenizer``.
        tokenizer: the model's tokenizer, for ``old_data`` given as strings.
        batch_size: sequences per forward pass.

    Returns:
        A ``ForgettingReport`` (``drift``, ``perplexity_ratio``, ``expansion_share``, ``tokens``).

    Raises:
        TypeError: ``model`` is not a PEFT model, or ``old_data`` is of an unsupported type.
        ValueError: ``old_data`` has no sequence of two tokens or more (nothing to predict), ids outside the
            vocabulary, or strings without ``tokenizer``.
    """
    model = _peft_model(model)
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if tokenizer is None and isinstance(old_data, (list, tuple)) and old_data and isinstance(old_data[0], str):
        raise ValueError("forgetting: old_data is a list of strings; pass the model's tokenizer (tokenizer=...) to "
                         "tokenize them, or give token ids.")
    sequences = token_sequences(
        old_data, "old_data", vocab_size, caller="forgetting", if_empty="It is the text whose drift is measured.",
        tokenizer=tokenizer,
    )
    sequences = [ids for ids in sequences if len(ids) > 1]
    if not sequences:
        raise ValueError("forgetting: every sequence of old_data has a single token; at least two are needed to "
                         "predict one from the other.")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    kl_sum, nll_adapted, nll_base, routed_sum, routed_count, positions = 0.0, 0.0, 0.0, 0, 0, 0
    try:
        for start in range(0, len(sequences), batch_size):
            ids, mask = _padded(sequences[start : start + batch_size], device)
            adapted = model(input_ids=ids, attention_mask=mask).logits.float()
            routing = getattr(model.base_model, "last_routing", None)
            with model.disable_adapter():
                base = model(input_ids=ids, attention_mask=mask).logits.float()
            real = mask.bool()
            base_logprobs = F.log_softmax(base, dim=-1)
            adapted_logprobs = F.log_softmax(adapted, dim=-1)
            kl = F.kl_div(adapted_logprobs, base_logprobs, log_target=True, reduction="none").sum(-1)  # (B, T)
            kl_sum += kl[real].sum().item()
            positions += int(real.sum())
            # next-token NLL: position t predicts token t + 1, where both are real
            targets = ids[:, 1:].unsqueeze(-1)
            scored = real[:, 1:]
            nll_adapted -= adapted_logprobs[:, :-1].gather(-1, targets).squeeze(-1)[scored].sum().item()
            nll_base -= base_logprobs[:, :-1].gather(-1, targets).squeeze(-1)[scored].sum().item()
            if routing is not None:
                to_expansion = ~routing.to_preservation.to(device)
                routed_sum += int(to_expansion[real].sum())
                routed_count += int(real.sum())
    finally:
        model.train(was_training)
    predicted = sum(len(ids) - 1 for ids in sequences)
    return ForgettingReport(
        drift=kl_sum / positions,
        perplexity_ratio=math.exp((nll_adapted - nll_base) / predicted),
        expansion_share=routed_sum / routed_count if routed_count else None,
        tokens=positions,
    )


class ForgettingCallback(TrainerCallback):
    """Run the forgetting audit every ``every`` optimizer steps of a ``Trainer`` run, log it, and optionally stop.

    ``Trainer(..., callbacks=[peft_scale.ForgettingCallback(old_data, every=50, max_drift=0.02)])``: at every
    multiple of ``every`` optimizer steps (``state.global_step``) and at the last step, ``forgetting(model,
    old_data)`` is measured and its numbers join that step's logs as ``forgetting/drift``,
    ``forgetting/perplexity_ratio`` and, for a routed adapter, ``forgetting/expansion_share``: printed, kept in
    ``trainer.state.log_history`` and sent to the reporting integrations (TensorBoard, Weights & Biases, ...). The
    reports are also kept in ``self.history`` as ``(step, ForgettingReport)``. With ``max_drift``, training stops
    after the first measurement whose drift exceeds it (a warning says so).

    The callback puts itself first among the Trainer's callbacks when training begins, so that the reporting
    integrations, which log each step's numbers when the Trainer hands them over, find its numbers already there.

    Args:
        old_data: text the model must keep, in any form ``forgetting`` takes (keep it small: it is run through the
            model twice per measurement).
        every: optimizer steps between measurements.
        max_drift: the drift budget in nats per token, or ``None`` (never stop).
        tokenizer: the model's tokenizer, for ``old_data`` given as strings.
        batch_size: sequences per forward pass.

    Raises:
        ValueError: ``every`` is not a positive integer or ``max_drift`` is negative.
    """

    def __init__(self, old_data, every: int = 100, max_drift: Optional[float] = None, tokenizer=None, batch_size: int = 8):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"ForgettingCallback(every={every!r}): the optimizer steps between measurements; use an "
                             "integer >= 1.")
        if max_drift is not None and not max_drift >= 0:
            raise ValueError(f"ForgettingCallback(max_drift={max_drift!r}): a drift budget in nats per token, >= 0 "
                             "(or None to never stop).")
        self.old_data, self.every, self.max_drift = old_data, every, max_drift
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.history: list[tuple[int, ForgettingReport]] = []
        self._pending: Optional[dict[str, float]] = None

    def on_train_begin(self, args, state, control, **kwargs):
        # The Trainer builds each step's logs and hands them to its callbacks in order; the reporting integrations
        # come first in that order (the Trainer puts them before the user's callbacks), so this callback's numbers
        # would reach them one logging step late, never for the last measurement. No event gives a callback its
        # handler, so it is found in the caller's frame (CallbackHandler.call_event), and this callback moved first.
        frame = inspect.currentframe()
        caller = frame.f_back.f_locals.get("self") if frame is not None and frame.f_back is not None else None
        if isinstance(caller, CallbackHandler) and self in caller.callbacks:
            caller.callbacks.remove(self)
            caller.callbacks.insert(0, self)

    def _measure(self, state, control, model) -> None:
        report = forgetting(model, self.old_data, tokenizer=self.tokenizer, batch_size=self.batch_size)
        self.history.append((state.global_step, report))
        self._pending = report.metrics()
        control.should_log = True
        if self.max_drift is not None and report.drift > self.max_drift:
            logger.warning(f"{report}: above max_drift={self.max_drift}; training stops at step {state.global_step}.")
            control.should_training_stop = True

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._measure(state, control, model)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending is not None and logs is not None:
            logs.update(self._pending)
            if state.log_history:
                state.log_history[-1].update(self._pending)
            self._pending = None
        return control
